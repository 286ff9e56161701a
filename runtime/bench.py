"""`codegen bench`: decode speed of a target on the GPU, against the memory roofline measured in
the same run, with per-op profiles (eager launches timed with events; and in the graph, by leaving
each op out) and an optional side-by-side with transformers.

Batch-1 decode reads every weight once per token, so the floor is weight bytes / bandwidth.
The bandwidth is measured here, now (a device-to-device copy, bytes read + written), so the
reported fraction is a ratio from one run rather than a comparison with a datasheet.
"""
from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .binding import BoundLaunch


@dataclass
class BenchResult:
    target: str
    gpu: str
    tokens: int
    ms_per_token: float          # graph replays back to back, token fed back on the device
    ms_per_token_host: float     # the same with a host round trip per token (what generate pays)
    weight_bytes: int            # read per token
    copy_gbs: float              # device-to-device copy, read + write bytes per second
    profile: list[tuple[str, int, float]]   # (kernel template/op, launches, ms per token)
    in_graph: list[tuple[str, int, float, int]]  # (op [kernel], launches, ms per token it adds to the graph,
                                                 #  weight bytes its launches read per token)
    shaped: bool = True          # the entry points compiled for the model's shapes (else shapes as arguments)
    depth: int = 0               # positions already in the context when the timed steps start
    prefill_tokens: int = 0      # a prompt of this many tokens, prefilled as generate does (0: not measured)
    prefill_ms: float = 0.0      # its prefill, up to the first token's logits
    prefill_chunk: int = 0       # rows per prefill launch
    prefill_profile: list[tuple[str, int, float, float]] = field(default_factory=list)
                                 # (op [kernel], launches, ms per prompt, TFLOP/s of its GEMMs or 0)

    @property
    def gbs(self) -> float:
        return self.weight_bytes / (self.ms_per_token * 1e-3) / 1e9

    @property
    def roofline_fraction(self) -> float:
        return self.gbs / self.copy_gbs

    def at_copy_ms(self, nbytes: int) -> float:
        """How long `nbytes` take at this run's copy bandwidth."""
        return nbytes / (self.copy_gbs * 1e9) * 1e3

    @property
    def beyond_bytes_ms(self) -> float:
        """The step's time beyond its weight bytes at the copy rate: what is not bandwidth (launch
        boundaries, the latency after each wait, attention), the part that fusion has to remove."""
        return self.ms_per_token - self.at_copy_ms(self.weight_bytes)

    @property
    def launches(self) -> int:
        return sum(n for _, n, _ in self.profile)


def weight_bytes_per_token(launches: list[BoundLaunch], table) -> int:
    """Bytes of weights one decode step reads: every weight a launch binds, once per launch;
    the embedding gather reads one row of its table. A prefetch hint is not a read (the GEMV that
    reads that weight counts it)."""
    total = 0
    for l in launches:
        for a in l.args:
            if a.buffer is None or not table[a.buffer].weight or a.kind == "prefetch":
                continue
            info = table[a.buffer]
            if l.template == "embedding_gather":
                total += math.prod(info.shape[1:]) * info.itemsize
            else:
                total += info.nbytes
    return total


def copy_bandwidth(drv, nbytes: int = 1 << 30, reps: int = 20) -> float:
    a, b = drv.mem_alloc(nbytes), drv.mem_alloc(nbytes)
    drv.memcpy_dtod(b, a, nbytes)
    start, end = drv.Event(), drv.Event()
    start.record()
    for _ in range(reps):
        drv.memcpy_dtod(b, a, nbytes)
    end.record()
    end.synchronize()
    s = start.time_till(end) * 1e-3
    a.free(), b.free()
    return 2 * nbytes * reps / s / 1e9


def profile_kernels(be, reps: int = 5) -> list[tuple[str, int, float]]:
    """Non-graph pass with CUDA events around every launch; ms per token per op."""
    drv = be.drv
    per_op: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for _ in range(reps):
        events = []
        for call, l in zip(be.calls, be.launches):
            s, e = drv.Event(), drv.Event()
            s.record(be.stream)
            call.run()
            e.record(be.stream)
            events.append((l, s, e))
        be.stream.synchronize()
        for l, s, e in events:
            per_op[f"{l.op} [{l.kernel}]"][1] += s.time_till(e) / reps
    counts = defaultdict(int)
    for l in be.launches:
        counts[f"{l.op} [{l.kernel}]"] += 1
    return sorted(((k, counts[k], v[1]) for k, v in per_op.items()), key=lambda r: -r[2])


def _feed_token(be, token: int = 1) -> None:
    """Fresh buffers and `token` on the device: what graph replays start from (pos is set per replay)."""
    be.reset()
    be.token[0] = token
    be.drv.memcpy_htod(be.ptr["token"], be.token)


def _replay_ms(be, graph, tokens: int, depth: int = 0) -> float:
    """ms per replay of `graph`, `tokens` replays back to back from position `depth` (the context the
    steps attend over: decode at depth D reads D cached positions per layer)."""
    drv = be.drv
    be.pos[0] = depth
    drv.memcpy_htod(be.ptr["pos"], be.pos)
    graph.launch()                                # warm
    be.pos[0] = depth
    drv.memcpy_htod(be.ptr["pos"], be.pos)
    start, end = drv.Event(), drv.Event()
    start.record(be.stream)
    for _ in range(tokens):
        graph.launch()
    end.record(be.stream)
    end.synchronize()
    return start.time_till(end) / tokens


def graph_profile(be, full_ms: float, tokens: int, depth: int = 0) -> list[tuple[str, int, float]]:
    """What each op costs inside the graph, pipelined as it really runs: the step is captured again
    without that op's launches and the difference in replay time is its share. (Outputs are wrong
    in those replays; only their timing is used.) Unlike event timing, this sees the overlap that
    programmatic dependent launch buys and none of the launch overhead."""
    from .cuda import _Graph
    groups: dict[str, list] = defaultdict(list)
    for call, l in zip(be.calls, be.launches):
        groups[f"{l.op} [{l.kernel}]"].append((call, l))
    out = []
    for name, members in groups.items():
        if name.startswith("advance_pos"):        # keeps the position moving; nothing to learn
            continue
        skip = {id(c) for c, _ in members}
        g = _Graph(be.stream, lambda: [c.run() for c in be.calls if id(c) not in skip])
        nbytes = weight_bytes_per_token([l for _, l in members], be.table)
        out.append((name, len(members), full_ms - _replay_ms(be, g, tokens, depth), nbytes))
    return sorted(out, key=lambda r: -r[2])


def time_prefill(be, n: int, reps: int = 5) -> tuple[float, list[tuple[str, int, float, float]]]:
    """The prefill of an n-token prompt from position 0 as generate runs it, up to the first token's
    logits on the host (median of `reps` after a warm-up that captures the chunk's graph), and each op's
    share: its launches of one full chunk timed alone with events, scaled to the prompt's chunks."""
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(0, be.env["vocab"], size=n)]
    be.reset()
    be.prefill(ids, 0)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        be.prefill(ids, 0)
        times.append((time.perf_counter() - t0) * 1e3)
    chunk = min(n, be.env["chunk"])
    body, _ = be.prefill_calls(chunk)
    per_op: dict[str, list] = defaultdict(lambda: [0, 0.0, 0])
    for call in body:
        s, e = be.drv.Event(), be.drv.Event()
        s.record(be.stream)
        call.run()
        e.record(be.stream)
        e.synchronize()
        row = per_op[f"{call.launch.op} [{call.launch.kernel}]"]
        row[0] += 1
        row[1] += s.time_till(e) * n / chunk
        w = next((a for a in call.launch.args if a.param == "w"), None)
        row[2] += 2 * chunk * math.prod(w.shape) if w is not None else 0
    prof = [(k, c, ms, flops * n / chunk / (ms * 1e-3) / 1e12 if flops else 0.0) for k, (c, ms, flops) in per_op.items()]
    return float(np.median(times)), sorted(prof, key=lambda r: -r[2])


def run_bench(target, packed, tokens: int = 128, progress: bool = True, shaped: bool = True, depth: int = 0,
              prefill: int = 0) -> BenchResult:
    from .cuda import CudaBackend
    be = CudaBackend(target, packed, progress=progress, shaped=shaped)
    drv = be.drv
    try:
        gpu = drv.Device(0).name()
        copy = copy_bandwidth(drv)
        be.reset()
        be.step(1, 0)
        be.greedy(1, 1, 8)                       # warm up
        prefill_ms, pprof = 0.0, []
        if prefill:
            prefill_ms, pprof = time_prefill(be, prefill)
        _feed_token(be)
        ms = _replay_ms(be, be.graph, tokens, depth)
        be.reset()
        t0 = time.perf_counter()
        be.greedy(1, depth, tokens)
        ms_host = (time.perf_counter() - t0) * 1e3 / tokens
        prof = profile_kernels(be)
        in_graph = graph_profile(be, ms, tokens, depth)
        wb = weight_bytes_per_token(be.launches, be.table)
        return BenchResult(target.name, gpu, tokens, ms, ms_host, wb, copy, prof, in_graph, be.shaped, depth,
                           prefill, prefill_ms, be.env["chunk"], pprof)
    finally:
        be.close()


@dataclass
class TimelineRow:
    name: str                # "op [kernel]"
    launches: int            # per step
    span_us: float           # mean per launch: its last block's end - the previous launch's
    released_us: float       # mean per launch: block 0 past the wait - the previous launch's end
    after_wait_us: float     # mean per launch: its end - block 0 past the wait
    started_us: float        # mean per launch: block 0 starts - the previous launch's end (< 0: resident early)


def timeline_rows(trace, names: list[str], steps: int) -> list[TimelineRow]:
    """Aggregate a timeline (``trace[i] = (start, waited, end)`` in ns for launch i of `steps`
    consecutive steps of len(names) launches) per op. The first launch of each step is measured
    from the previous step's last end, so the spans of a step add up to its time."""
    n = len(names)
    acc: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
    for s in range(1, steps):                     # step 0 has no predecessor: skipped
        for k in range(n):
            i = s * n + k
            prev_end = trace[i - 1][2]
            a = acc[names[k]]
            a[0] += 1
            a[1] += (trace[i][2] - prev_end) / 1e3
            a[2] += (trace[i][1] - prev_end) / 1e3
            a[3] += (trace[i][2] - trace[i][1]) / 1e3
            a[4] += (trace[i][0] - prev_end) / 1e3
    rows = [TimelineRow(name, round(c / (steps - 1)), sp / c, rel / c, aw / c, st / c)
            for name, (c, sp, rel, aw, st) in acc.items()]
    return sorted(rows, key=lambda r: -r.span_us * r.launches)


def run_timeline(target, packed, steps: int = 32, progress: bool = True) -> list[TimelineRow]:
    """Replay the step's graph `steps` times with kernels built with -DDTF_TRACE, which stamp
    %globaltimer when a launch's block 0 starts and passes its wait and when its last block ends:
    where the critical path of a pipelined step goes, launch by launch (the stamps cost each block
    one atomic, so absolute times run a little slow)."""
    import numpy as np

    from .cuda import CudaBackend
    be = CudaBackend(target, packed, progress=progress, options=("-DDTF_TRACE",))
    drv = be.drv
    try:
        n = len(be.launches)
        ptrs = {v: be.module.global_ptr(v) for v in ("dtf_trace", "dtf_trace_started", "dtf_trace_ended", "dtf_trace_blocks_done")}
        cap = ptrs["dtf_trace"][1] // 24
        steps = max(2, min(steps, cap // n))
        _feed_token(be)
        _replay_ms(be, be.graph, 4)                # warm
        be.pos[0] = 0
        drv.memcpy_htod(be.ptr["pos"], be.pos)
        for v in ("dtf_trace_started", "dtf_trace_ended", "dtf_trace_blocks_done"):
            drv.memset_d32(ptrs[v][0], 0, 1)
        for _ in range(steps):
            be.graph.launch()
        be.stream.synchronize()
        trace = np.empty((cap, 3), np.uint64)
        drv.memcpy_dtoh(trace, ptrs["dtf_trace"][0])
        names = [f"{l.op} [{l.kernel}]" for l in be.launches]
        return timeline_rows(trace.astype(np.int64), names, steps)
    finally:
        be.close()


def print_timeline(rows: list[TimelineRow], out=sys.stdout, top: int = 12) -> None:
    p = lambda *a: print(*a, file=out)
    total = sum(r.span_us * r.launches for r in rows)
    p(f"  timeline (kernels built with -DDTF_TRACE, graph replay; {total / 1e3:.3f} ms per step traced). Per launch:")
    p("  its span (end - previous launch's end); when its block 0 started and when its wait released, after the")
    p("  previous end (a negative start: resident and loading before it); its time after the wait:")
    for r in rows[:top]:
        p(f"    {r.span_us * r.launches / 1e3:8.4f} ms  x{r.launches:<4d} span {r.span_us:6.2f} us  "
          f"started {r.started_us:+6.2f} us  released +{r.released_us:5.2f} us  after wait {r.after_wait_us:6.2f} us  {r.name}")


def reference_ms_per_token(target, packed, tokens: int = 16, depth: int = 0) -> float:
    """ms per decode step of the numpy reference backend (what `generate` costs without a GPU), the steps
    starting at position `depth`."""
    from .reference import ReferenceBackend
    be = ReferenceBackend(target.manifest, packed)
    be.step(1, 0)                                          # first step rounds the weights once
    t0 = time.perf_counter()
    for pos in range(depth + 1, depth + tokens + 1):
        be.step(1, pos)
    return (time.perf_counter() - t0) * 1e3 / tokens


def reference_prefill_ms(target, packed, n: int) -> float:
    """ms to prefill an n-token prompt on the numpy reference backend (batched, as generate runs it)."""
    from .reference import ReferenceBackend
    be = ReferenceBackend(target.manifest, packed)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, be.env["vocab"], size=n)]
    t0 = time.perf_counter()
    be.prefill(ids, 0)
    return (time.perf_counter() - t0) * 1e3


def print_result(r: BenchResult, out=sys.stdout, top: int = 12) -> None:
    p = lambda *a: print(*a, file=out)
    kind = "kernels compiled for this model's shapes" if r.shaped else "generic kernels (shapes as arguments)"
    at = f" at context depth {r.depth}" if r.depth else ""
    p(f"target {r.target} on {r.gpu}, {r.tokens} tokens{at}, {kind}")
    if r.prefill_tokens:
        p(f"  prefill, {r.prefill_tokens} tokens:   {r.prefill_ms:8.2f} ms = time to first token, "
          f"{r.prefill_tokens / (r.prefill_ms * 1e-3):8.0f} tokens/s (batched, chunks of {r.prefill_chunk} tokens)")
        total = sum(t for _, _, t, _ in r.prefill_profile)
        p(f"  prefill per op (launches timed alone, {total:.3f} ms in kernels):")
        for name, n, t, tf in r.prefill_profile[:top]:
            p(f"    {t:8.3f} ms  {100 * t / total:5.1f}%  x{n:<4d} {f'{tf:6.1f} TFLOP/s' if tf else ' ' * 13}  {name}")
    p(f"  device-to-device copy bandwidth (this run): {r.copy_gbs:8.1f} GB/s")
    p(f"  weight bytes read per token:                {r.weight_bytes / 1e6:8.1f} MB")
    p(f"  decode, graph replay:   {r.ms_per_token:8.3f} ms/token  {1e3 / r.ms_per_token:8.1f} tokens/s  "
      f"{r.gbs:8.1f} GB/s  = {100 * r.roofline_fraction:5.1f}% of copy bandwidth")
    p(f"  decode, host per token: {r.ms_per_token_host:8.3f} ms/token  {1e3 / r.ms_per_token_host:8.1f} tokens/s")
    if r.launches:
        p(f"  beyond the bytes:       {r.beyond_bytes_ms:8.3f} ms/token over {r.launches} launches, "
          f"{1e3 * r.beyond_bytes_ms / r.launches:.2f} us each (graph replay minus the weight bytes at the copy bandwidth)")
    total = sum(t for _, _, t in r.profile)
    p(f"  per-kernel profile (eager launches with events, {total:.3f} ms/token in kernels):")
    for name, n, t in r.profile[:top]:
        p(f"    {t:8.4f} ms  {100 * t / total:5.1f}%  x{n:<4d} {name}")
    p(f"  in-graph profile (replay time the graph loses without each op, of {r.ms_per_token:.3f} ms/token;")
    p(f"  per launch, and the op's weight bytes at the copy bandwidth as a fraction of that time):")
    for name, n, t, nbytes in r.in_graph[:top]:
        eff = f"{100 * r.at_copy_ms(nbytes) / t:4.0f}% of copy bw" if nbytes and t > 0 else " " * 15
        p(f"    {t:8.4f} ms  {100 * t / r.ms_per_token:5.1f}%  x{n:<4d} {1e3 * t / n:7.2f} us/launch "
          f"{nbytes / 1e6 / n:8.2f} MB/launch {eff}  {name}")


def compare_hf(model_dir, torch_dtype: str, tokens: int = 128) -> dict[str, float]:
    """ms/token of Hugging Face transformers on the same weights and GPU: eager, and static
    cache + torch.compile where it works."""
    import torch
    from transformers import AutoModelForCausalLM
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[torch_dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dt)
    except TypeError:                                   # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=dt)
    model = model.cuda().eval()
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda")
    out = {}

    def gen(**kw):
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kw)
        torch.cuda.synchronize()

    def timed(warm: int, **kw):
        for _ in range(warm):      # same length as the timed run: a static cache compiles once, here
            gen(**kw)
        t0 = time.perf_counter()
        gen(**kw)
        return (time.perf_counter() - t0) * 1e3 / tokens

    with torch.no_grad():
        out["hf eager"] = timed(1)
        try:   # with a static cache, generate() compiles the forward pass itself
            out["hf static cache + torch.compile"] = timed(2, cache_implementation="static")
        except Exception as e:     # noqa: BLE001 - report, do not fail the benchmark
            print(f"  (static cache + torch.compile failed: {type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
    return out
