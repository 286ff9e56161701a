"""Each op of a decode step alone: its launches for every layer back to back in one CUDA graph (the
same programmatic dependent launch between them), then a few neighbouring pairs, and the GEMVs again
with other grids, in the step and alone. Their weight bytes against the copy bandwidth measured in the
same run say whether an op is slow by itself or only at its boundary with the next. Timing only:
with ops left out, the outputs are wrong. (`codegen bench`'s in-graph profile removes one op from the
step instead.)

    usage (GPU machine, after `source tools/gpu_env.sh`): python3 tools/gpu_isolate.py MODEL_DIR [POLICY] [DEVICE]
"""
import sys

from dtypeforge.runtime.bench import _replay_ms, copy_bandwidth, weight_bytes_per_token
from dtypeforge.runtime.cuda import CudaBackend, _Graph, _Launch
from dtypeforge.runtime.loader import pack_weights
from dtypeforge.runtime.target import find_target, load_target

PAIRS = [["ffn_norm_gate_up_silu", "down_proj_residual"], ["o_proj_residual", "ffn_norm_gate_up_silu"],
         ["down_proj_residual", "attn_norm_qkv_rope_kv"], ["attn_norm_qkv_rope_kv", "attention_fused", "o_proj_residual"]]
# grids as multiples of the GPU's SM count (None: the runtime's own grid); on the H200's 132 SMs the
# 132, 176, 220 and 256 blocks measured for the down projection (docs/benchmarks.md)
GRIDS = [("down_proj_residual", (1, 4 / 3, 5 / 3, None)), ("ffn_norm_gate_up_silu", (3 / 2, None)),
         ("attn_norm_qkv_rope_kv", (1, None))]


def main(model: str, policy: str = "f16", device: str = "h200") -> None:
    target = load_target(find_target(device, policy, "fused"))
    packed = pack_weights(target, model, max_seq=144)
    be = CudaBackend(target, packed, progress=False)
    try:
        copy = copy_bandwidth(be.drv)
        be.reset()
        be.step(1, 0)
        print(f"copy {copy:.1f} GB/s; full step {_replay_ms(be, be.graph, 128) * 1e3:.1f} us")
        for ops in [[o] for o in sorted({l.op for l in be.launches})] + PAIRS:
            calls = [(c, l) for c, l in zip(be.calls, be.launches) if l.op in ops]
            ms = _replay_ms(be, _Graph(be.stream, lambda: [c.run() for c, _ in calls]), 64)
            nb = weight_bytes_per_token([l for _, l in calls], be.table)
            print(f"  {'+'.join(ops):70s} x{len(calls):3d} {ms * 1e3:8.2f} us  {ms * 1e3 / len(calls):7.2f} us/launch  "
                  f"{nb / 1e6:8.1f} MB  {100 * nb / (ms * 1e-3) / (copy * 1e9):5.1f}% of copy bw")
        for op, multiples in GRIDS:
            default = next(tuple(c.cfg.grid)[0] for c, l in zip(be.calls, be.launches) if l.op == op)
            for n in [default if m is None else round(m * be.sms) for m in multiples]:
                calls = [(_Launch(c.fn, l, be._args(l), be.stream, be.pdl and i > 0, (n,) + tuple(c.cfg.grid)[1:])
                          if l.op == op else c, l) for i, (c, l) in enumerate(zip(be.calls, be.launches))]
                ms = _replay_ms(be, _Graph(be.stream, lambda: [c.run() for c, _ in calls]), 64)
                alone = [c for c, l in calls if l.op == op]
                ms2 = _replay_ms(be, _Graph(be.stream, lambda: [c.run() for c in alone]), 64)
                print(f"  {op} grid {n:4d} (default {default}): step {ms * 1e3:7.1f} us, alone {ms2 * 1e3 / len(alone):6.2f} us/launch")
    finally:
        be.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
