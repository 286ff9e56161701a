"""GPU tests: the generated kernels on a real GPU against the numpy reference backend.

Op by op first (every distinct entry point of every target of this GPU's device, alone, on
random inputs with poisoned outputs; by default the entries compiled for the model's shapes, one
per op, and the generic ones where a test says so), then end to end on a synthetic SmolLM2-135M-shaped
model for every shipped policy. Skipped, with the reason, where there is no GPU or PyCUDA
(CI); run on the GPU machine with `tools/gpu_check.sh` and recorded in docs/gpu.md.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from dtypeforge.codegen.specs import load_specs
from dtypeforge.runtime.generate import generate
from dtypeforge.runtime.loader import pack_weights
from dtypeforge.runtime.reference import ReferenceBackend
from dtypeforge.runtime.synth import write_synthetic_model
from dtypeforge.runtime.target import find_target, load_target

pytestmark = pytest.mark.gpu


def _reason():
    from dtypeforge.runtime.cuda import unavailable_reason
    return unavailable_reason()


REASON = _reason()
if REASON:
    pytest.skip(f"no GPU backend here: {REASON}", allow_module_level=True)

from dtypeforge.runtime.cuda import CudaBackend, gpu_name  # noqa: E402
from dtypeforge.runtime.opcheck import check_prefill_ops, check_target_ops  # noqa: E402
from dtypeforge.session import names_gpu, resolve_device  # noqa: E402

SPECS = load_specs()
DEVICE = resolve_device(SPECS, "auto", "cuda")
POLICIES = sorted(SPECS.policies["llama"])
LAYOUTS = ["separate", "fused"]
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32]   # "<s>Hello, " in the synthetic byte tokenizer

# GPU-vs-reference logits agreement, as max |gpu - ref| / max |ref| over the steps compared. Same
# policy on both sides, so the differences are summation order, f32 math library ulps, and the
# occasional intermediate rounded to the other side of a tie: they scale with the narrowest dtype
# the policy does arithmetic or rounds results in (a role's compute, accumulate or output; storage
# dtypes round the same values on both sides). Derived from the policy's YAML, so a new policy is
# covered without a test edit.
ARITH_TOL = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2}


def logit_tol(policy: str) -> float:
    roles = SPECS.policies["llama"][policy].roles
    return max(ARITH_TOL[d] for r in roles.values() for f in ("compute", "accumulate", "output") if (d := r.get(f)))


def seed_of(*parts) -> int:
    """A seed fixed by the test's parameters, the same in every process (hash() of a str is not)."""
    return zlib.crc32(".".join(map(str, parts)).encode()) % 1000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("tiny"), shape="tiny", seed=1)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("smol"), shape="smollm2-135m", seed=0)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("wide"), shape="wide", seed=3)


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("long_rows"), shape="long_rows", seed=4)


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("ragged"), shape="ragged", seed=2)


def _pair(model_dir, policy, layout, max_seq, shaped=True):
    t = load_target(find_target(DEVICE, policy, layout))
    packed = pack_weights(t, model_dir, max_seq=max_seq, progress=False)
    return t, CudaBackend(t, packed, progress=False, shaped=shaped), ReferenceBackend(t.manifest, packed)


def _failures(results) -> str:
    """The op checks that failed, one per line (empty when every kernel matched its op)."""
    return "\n".join(f"{r.kernel} ({r.op}): {r.detail}" for r in results if not r.ok)


def _op_check_failures(model_dir, policy, layout, *, max_seq, seed, pos, shaped=True) -> str:
    """Every entry point of the target checked alone against its reference op (check_target_ops);
    the failures, as _failures gives them."""
    _, gpu, ref = _pair(model_dir, policy, layout, max_seq=max_seq, shaped=shaped)
    try:
        return _failures(check_target_ops(gpu, ref, seed=seed, pos=pos))
    finally:
        gpu.close()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", POLICIES)
def test_each_kernel_matches_reference_op(smol, policy, layout):
    t, gpu, ref = _pair(smol, policy, layout, max_seq=64)
    try:
        results = check_target_ops(gpu, ref, seed=seed_of(policy, layout), pos=37)
    finally:
        gpu.close()
    assert gpu.shaped     # one entry point per op, each checked
    n_grid_stride = len({e for e, l in zip(gpu.entries, gpu.launches) if l.grid_stride})
    assert len(results) == len({l.op for l in t.manifest.decode_step}) + n_grid_stride
    failed = _failures(results)
    assert not failed, failed


@pytest.mark.parametrize("policy", POLICIES)
def test_decode_matches_reference(smol, policy):
    steps = 64
    t, gpu, ref = _pair(smol, policy, "separate", max_seq=len(PROMPT) + steps)
    try:
        worst = 0.0
        for be in (gpu, ref):
            be.reset()
        for pos, tok in enumerate(PROMPT):
            lg, lr = gpu.step(tok, pos), ref.step(tok, pos)
            worst = max(worst, float(np.abs(lg - lr).max() / np.abs(lr).max()))
        g_new = generate(gpu, PROMPT, steps)
        r_new = generate(ref, PROMPT, steps)
    finally:
        gpu.close()
    print(f"{policy}: max logit diff / max |logit| = {worst:.3g}")
    assert worst <= logit_tol(policy), f"{policy}: logits differ by {worst:.3g} > {logit_tol(policy)}"
    assert g_new == r_new, f"{policy}: first divergence at step {next(i for i, (a, b) in enumerate(zip(g_new, r_new)) if a != b)}"
    assert len(set(g_new)) > 8        # the synthetic model walks a permutation: tokens vary


def test_graph_replay_matches_eager_launches(tiny):
    t = load_target(find_target(DEVICE, "f16", "fused"))
    packed = pack_weights(t, tiny, max_seq=64, progress=False)
    a, b = CudaBackend(t, packed, progress=False), CudaBackend(t, packed, use_graph=False, progress=False)
    try:
        ga, gb = generate(a, PROMPT, 24), generate(b, PROMPT, 24)
        assert ga == gb
        a.reset(), b.reset()
        assert np.array_equal(a.step(5, 0), b.step(5, 0))
    finally:
        a.close(), b.close()


def test_device_side_greedy_loop_matches_host_loop(tiny):
    t = load_target(find_target(DEVICE, "f32", "separate"))
    packed = pack_weights(t, tiny, max_seq=64, progress=False)
    gpu = CudaBackend(t, packed, progress=False)
    try:
        host = generate(gpu, PROMPT, 16)
        gpu.reset()
        for pos, tok in enumerate(PROMPT[:-1]):
            gpu.step(tok, pos)
        dev = gpu.greedy(PROMPT[-1], len(PROMPT) - 1, 16)
    finally:
        gpu.close()
    assert dev == host


def test_gpu_name_selects_a_device_spec():
    assert any(names_gpu(g, gpu_name()) for g in SPECS.devices[DEVICE].gpu_names)


@pytest.mark.parametrize("policy", POLICIES)
def test_shaped_kernels_compute_exactly_what_the_generic_ones_do(smol, policy):
    """The entry points compiled for the model's shapes run the same code with constants in place of
    the shape arguments: every logit of every prefill step and the greedy tokens are bit for bit
    those of the generic entry points (shapes as arguments)."""
    t = load_target(find_target(DEVICE, policy, "fused"))
    packed = pack_weights(t, smol, max_seq=64, progress=False)
    shaped, generic = CudaBackend(t, packed, progress=False), CudaBackend(t, packed, progress=False, shaped=False)
    try:
        assert shaped.shaped and not generic.shaped and set(shaped.entries).isdisjoint(generic.entries)
        for be in (shaped, generic):
            be.reset()
        for pos, tok in enumerate(PROMPT):
            a, b = shaped.step(tok, pos), generic.step(tok, pos)
            assert np.array_equal(a, b), f"{policy}, pos {pos}: {int((a != b).sum())} logits differ"
        first = int(a.argmax())
        assert shaped.greedy(first, len(PROMPT), 16) == generic.greedy(first, len(PROMPT), 16)
    finally:
        shaped.close(), generic.close()


@pytest.mark.parametrize("max_seq,pos", [(64, 37), (1024, 700)])
@pytest.mark.parametrize("shaped", [True, False], ids=["shaped", "generic"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", ["f32", "f16", "fp8-e4m3-weights"])
def test_ragged_shapes_match_reference_ops(ragged, policy, layout, shaped, max_seq, pos):
    """hidden 72, intermediate 100, head_dim 24: fp8 rows (72 B) and the f16 down projection (100
    columns) are not whole 16-byte vectors and head_dim 24 is below attention's vector path, so the
    GEMVs' scalar loads and the general attention path run, in the one-split attention kernel
    (max_seq 64) and in the split one (1024); every kernel must still match its op, with these shapes
    compiled in and as arguments."""
    failed = _op_check_failures(ragged, policy, layout, max_seq=max_seq, seed=5, pos=pos, shaped=shaped)
    assert not failed, failed


@pytest.mark.parametrize("policy", ["f32", "f16", "bf16", "fp8-e4m3-weights", "f16-storage-f32-compute"])
def test_wide_hidden_matches_reference_ops(wide, policy):
    """hidden 2048, as Llama-3.2-1B (whose full checkpoint is too large for the suite): every thread
    of a norm kernel stages a 16-byte vector of x, and each GEMV row spans a whole batch of loads."""
    failed = _op_check_failures(wide, policy, "fused", max_seq=64, seed=7, pos=37)
    assert not failed, failed


@pytest.mark.parametrize("shaped", [True, False], ids=["shaped", "generic"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", ["f32", "f16", "fp8-e4m3-weights", "int8-weights"])
def test_long_rows_match_reference_ops(long_rows, policy, layout, shaped):
    """A down projection of 8800 columns: rows of 3 to 9 batches of loads, the last one partial, so
    where the device spec's tuning.gemv_rotate_batches applies, warps start their rows at rotated
    batches (and wrap through the partial one)."""
    failed = _op_check_failures(long_rows, policy, layout, max_seq=64, seed=11, pos=21, shaped=shaped)
    assert not failed, failed


@pytest.mark.parametrize("policy", ["f32", "f16", "bf16"])
def test_long_context_attention_splits_match_reference_ops(wide, policy):
    """Contexts past one attention split (the device's tuning.attn_threads positions, S): at pos S - 1
    one block per head, at S a second split of one position, at 2.5 S three splits merged by the last
    block of each head. Run in turn on one backend, so a split counter left behind by one launch
    would leave the next launch's output unwritten (poisoned), which the check catches."""
    t, gpu, ref = _pair(wide, policy, "fused", max_seq=2048)
    attention = next(l for l in t.manifest.decode_step if l.kernel.startswith("attention"))
    split = attention.variants[0].at_most["max_seq"]   # the one-split entry point's bound
    try:
        for pos in (5 * split // 2, split - 1, split, 5 * split // 2):
            failed = _failures(check_target_ops(gpu, ref, seed=pos, pos=pos))
            assert not failed, f"pos {pos}: {failed}"
    finally:
        gpu.close()


# ---- batched prefill: every kernel of the prefill step against its reference op, ragged block sizes,
# several grouped-query ratios and contexts past 8k, then prefill + decode end to end

PREFILL_TOKENS = [1, 7, 64, 513]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", POLICIES)
def test_prefill_kernels_match_reference_ops(smol, policy, layout):
    """SmolLM2's shape (9 query heads on 3 KV heads, head_dim 64): blocks of 1, 7, 64 and 513 rows (the
    GEMM tiles' and attention's partial tiles), at position 37, and a 513-row block ending at 8192."""
    t, gpu, ref = _pair(smol, policy, layout, max_seq=8192)
    try:
        assert gpu.env["chunk"] >= max(PREFILL_TOKENS), "the device's prefill_chunk is below the largest block checked"
        n_ops = len({l.op for l in t.manifest.prefill_step})
        for tokens, pos in [(n, 37) for n in PREFILL_TOKENS] + [(513, 8192 - 513)]:
            results = check_prefill_ops(gpu, ref, tokens, seed=seed_of(policy, layout, tokens), pos=pos)
            assert len(results) == n_ops
            failed = _failures(results)
            assert not failed, f"{tokens} rows at {pos}: {failed}"
    finally:
        gpu.close()


@pytest.mark.parametrize("policy", ["f32", "f16", "bf16", "int8-weights"])
@pytest.mark.parametrize("shape", ["tiny", "ragged", "wide"])
def test_prefill_gqa_ratios_match_reference_ops(request, shape, policy):
    """Grouped-query ratios 2 (tiny: 4 heads on 2), 3 (ragged: 3 on 1, head_dim 24, the general
    attention path; hidden 72 and intermediate 100, the GEMMs' ragged K) and 4 (wide: 32 on 8, hidden 2048)."""
    model = request.getfixturevalue(shape)
    _, gpu, ref = _pair(model, policy, "fused", max_seq=256)
    try:
        for tokens in (1, 7, 100):
            failed = _failures(check_prefill_ops(gpu, ref, tokens, seed=seed_of(shape, policy, tokens), pos=101))
            assert not failed, f"{tokens} rows: {failed}"
    finally:
        gpu.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_prefill_then_decode_matches_reference(smol, policy):
    """A 300-token prompt (a full chunk's graph and a partial chunk where the chunk is smaller, one
    launch otherwise) prefilled on the GPU and on the reference backend: last-token logits within the
    policy's bound, then 32 greedy tokens identical."""
    prompt = [int(x) for x in np.random.default_rng(3).integers(0, 49152, size=300)]
    _, gpu, ref = _pair(smol, policy, "fused", max_seq=400)
    try:
        lg, lr = gpu.prefill(prompt, 0), ref.prefill(prompt, 0)
        worst = float(np.abs(lg - lr).max() / np.abs(lr).max())
        g_new, r_new = generate(gpu, prompt, 32), generate(ref, prompt, 32)
    finally:
        gpu.close()
    print(f"{policy}: prefill max logit diff / max |logit| = {worst:.3g}")
    assert worst <= logit_tol(policy), f"{policy}: prefill logits differ by {worst:.3g} > {logit_tol(policy)}"
    assert g_new == r_new


def test_prefill_in_chunks_matches_one_block(smol):
    """The same prompt prefilled in several chunks (graph replays, then a partial chunk) and token by
    token through the decode step: the same first token and logits within f32's bound."""
    prompt = [int(x) for x in np.random.default_rng(5).integers(0, 49152, size=200)]
    t = load_target(find_target(DEVICE, "f32", "fused"))
    packed = pack_weights(t, smol, max_seq=256, progress=False)
    packed.env["chunk"] = 64                       # three full chunks and one of 8 rows
    gpu = CudaBackend(t, packed, progress=False)
    try:
        assert gpu.env["chunk"] == 64
        chunked = gpu.prefill(prompt, 0)
        gpu.reset()
        for pos, tok in enumerate(prompt):
            stepped = gpu.step(tok, pos)
    finally:
        gpu.close()
    assert chunked.argmax() == stepped.argmax()
    assert float(np.abs(chunked - stepped).max() / np.abs(stepped).max()) <= logit_tol("f32")


# ---- real config features: tiny checkpoints written by transformers (tests/goldens/configs), 448 greedy
# tokens (positions up to 456, where llama3 and linear RoPE scaling show) against transformers' own

CONFIGS = Path(__file__).resolve().parent / "goldens" / "configs"
CONFIG_CASES = sorted(p.name for p in CONFIGS.iterdir() if (p / "golden.json").is_file())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_goldens_match_transformers_token_for_token(case, layout):
    golden = json.loads((CONFIGS / case / "golden.json").read_text())
    prompt, want = golden["prompt_ids"], golden["new_ids"]
    t = load_target(find_target(DEVICE, "f32", layout))
    packed = pack_weights(t, CONFIGS / case, max_seq=len(prompt) + len(want), progress=False)
    gpu = CudaBackend(t, packed, progress=False)
    try:
        got = generate(gpu, prompt, len(want))
    finally:
        gpu.close()
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    assert first == len(want), f"{case}: first difference from transformers at new token {first} of {len(want)}"


def test_gemm_mainloop_matches_a_cpu_sum(tmp_path):
    """The prefill GEMM mainloop on its own (tools/gemm_check.cu: dtf::gemm_tile for every tile, f16,
    bf16, fp8 weights, f32 activations, ragged and unaligned shapes, and on Hopper the wgmma path with
    its cluster K split), each output against a CPU sum of the same rounded operands, on the path this
    GPU's specs build: sm_90a (wgmma) on an sm_90 GPU, else the GPU's own arch."""
    import subprocess

    from dtypeforge.codegen.compile import HEADERS
    from dtypeforge.runtime.cuda import _driver
    major, minor = _driver().Device(0).compute_capability()
    arch = (["-gencode=arch=compute_90a,code=sm_90a", "-DDTF_GEMM_WGMMA=1"] if (major, minor) == (9, 0)
            else [f"-arch=sm_{major}{minor}"])
    exe = tmp_path / "gemm_check"
    subprocess.run(["nvcc", "-O3", "-std=c++17", f"-I{HEADERS}", *arch, str(Path(__file__).resolve().parents[1] / "tools" / "gemm_check.cu"), "-o", str(exe)],
                   check=True, capture_output=True)
    run = subprocess.run([str(exe), "--check"], capture_output=True, text=True)
    assert run.returncode == 0 and "ALL CHECKS PASSED" in run.stdout, run.stdout + run.stderr
