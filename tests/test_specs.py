"""Spec validation: the shipped specs load, and every kind of bad hand edit is rejected with
file, line, key, what was found and what is allowed. Each negative case copies the shipped
spec folder, breaks one thing, and runs the real CLI on it."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from dtypeforge.cli import main
from dtypeforge.codegen.plan import resolve
from dtypeforge.codegen.specs import DEFAULT_SPECS, load_specs


@pytest.fixture
def specs_dir(tmp_path) -> Path:
    d = tmp_path / "specs"
    shutil.copytree(DEFAULT_SPECS, d)
    return d


def edit(path: Path, old: str, new: str) -> int:
    """Replace ``old`` (must occur once) and return the 1-based line it was on."""
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path}"
    line = text[: text.index(old)].count("\n") + 1
    path.write_text(text.replace(old, new))
    return line


def op_index(specs: Path, op: str) -> int:
    import yaml
    return [o["op"] for o in yaml.safe_load((specs / "models/llama.yaml").read_text())["decode_step"]].index(op)


def run_cli(specs: Path, capsys, *args) -> tuple[int, str]:
    code = main(["build", "--check", "--specs", str(specs), "--out", str(specs.parent / "gen"), *args])
    return code, capsys.readouterr().err


def assert_spec_error(code, err, file: Path, line: int | None, *fragments):
    assert code == 2, err
    where = f"{file}:{line}:" if line else f"{file}"
    assert where in err, f"expected {where!r} in {err!r}"
    for f in fragments:
        assert f in err, f"expected {f!r} in {err!r}"


def test_shipped_specs_load_and_every_device_runs_its_default():
    specs = load_specs()
    assert {"f32", "f16-storage-f32-compute", "f16-resident", "bf16", "f16", "fp8-e4m3-weights",
            "int8-weights"} <= set(specs.policies["llama"])
    assert {"m40", "h100", "h200", "b200", "gb10", "reference"} <= set(specs.devices)
    for dev in specs.devices.values():
        resolve(specs, dev.name, dev.default_policy, "separate")


def test_m40_policy_stores_f16_and_computes_f32(capsys):
    assert main(["explain", "--device", "m40"]) == 0
    out = capsys.readouterr().out
    rows = {l.split()[0]: l.split() for l in out.splitlines() if l.startswith("  ")}
    for role in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert rows[role][1:5] == ["f16", "f32", "f32", "f32"], rows[role]
    assert rows["kv_cache"][1] == "f16"
    assert rows["activations"][1:3] == ["f32", "f32"]


def test_explain_diff_shows_only_changed_roles(capsys):
    assert main(["explain", "--device", "h100", "--policy", "f16-resident", "--diff", "f32"]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "f16 <- f32" in out
    assert "kv_cache" not in out and "embedding" not in out


def test_unknown_dtype(specs_dir, capsys):
    f = specs_dir / "policies/f16.yaml"
    line = edit(f, "q_proj:      {storage: f16,", "q_proj:      {storage: f17,")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "roles.q_proj.storage", "'f17'", "allowed: f32, f16, bf16, fp8e4m3, int8")


def test_unknown_key_in_policy(specs_dir, capsys):
    f = specs_dir / "policies/f16-resident.yaml"
    line = edit(f, "name: f16-resident", "name: f16-resident\ncolour: blue")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line + 1, "colour", "unknown key", "allowed: name, roles, extends, description")


def test_unknown_field_for_role(specs_dir, capsys):
    f = specs_dir / "policies/f16.yaml"
    line = edit(f, "embedding:   {storage: f16}", "embedding:   {storage: f16, compute: f16}")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "roles.embedding.compute", "role embedding has no field 'compute'",
                      "allowed: storage")


def test_unknown_role(specs_dir, capsys):
    f = specs_dir / "policies/bf16.yaml"
    line = edit(f, "  embedding:   {storage: bf16}", "  embeding:   {storage: bf16}")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "roles.embeding", "unknown role", "embedding")


def test_missing_role(specs_dir, capsys):
    f = specs_dir / "policies/f32.yaml"
    edit(f, "  kv_cache:    {storage: f32, compute: f32, accumulate: f32, output: f32}\n", "")
    code, err = run_cli(specs_dir, capsys)
    assert code == 2 and f"{f}:" in err and "missing kv_cache" in err, err


def test_missing_field(specs_dir, capsys):
    f = specs_dir / "policies/f32.yaml"
    line = edit(f, "o_proj:      {storage: f32, compute: f32, accumulate: f32, output: f32}",
                "o_proj:      {storage: f32, compute: f32, output: f32}")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "roles.o_proj", "role o_proj needs accumulate")


def test_quantized_storage_needs_scale(specs_dir, capsys):
    f = specs_dir / "policies/int8-weights.yaml"
    line = edit(f, "up_proj:   {storage: int8, quant: per_output_channel, scale: f32, compute: f16}",
                "up_proj:   {storage: int8, quant: per_output_channel, compute: f16}")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "role up_proj needs scale", "quantized")


def test_scale_without_quantized_storage(specs_dir, capsys):
    f = specs_dir / "policies/f16.yaml"
    line = edit(f, "gate_proj:   {storage: f16,", "gate_proj:   {scale: f32, storage: f16,")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "roles.gate_proj.scale", "not quantized")


def test_bf16_compute_on_sm52_rejected(specs_dir, capsys):
    f = specs_dir / "devices/m40.yaml"
    line = edit(f, "default_policy: f16-storage-f32-compute", "default_policy: bf16")
    code, err = run_cli(specs_dir, capsys)
    bf16 = specs_dir / "policies/bf16.yaml"
    assert code == 2, err
    assert re.search(rf"{re.escape(str(bf16))}:\d+: roles\.\w+\.compute: found 'bf16'", err), err
    assert "device m40 (sm_52" in err and "needs native_bf16_arith" in err, err
    assert line > 0


def test_fp8_on_sm52_rejected(specs_dir, capsys):
    f = specs_dir / "policies/f16-storage-f32-compute.yaml"
    line = edit(f, "q_proj:     {storage: f16}", "q_proj:     {storage: fp8e4m3, quant: per_output_channel, scale: f32}")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "roles.q_proj.storage", "'fp8e4m3'", "needs fp8_convert")


def test_explicit_incompatible_target_rejected(capsys):
    code = main(["build", "--check", "--device", "m40", "--policy", "f16"])
    err = capsys.readouterr().err
    assert code == 2 and "policies/f16.yaml:" in err and "native_f16_arith" in err, err


def test_extends_cycle(specs_dir, capsys):
    f = specs_dir / "policies/f32.yaml"
    edit(f, "name: f32\n", "name: f32\nextends: int8-weights\n")
    code, err = run_cli(specs_dir, capsys)
    assert code == 2 and "extends must not form a cycle" in err, err
    # reported at the `extends:` line that closes the loop, naming the whole loop
    m = re.search(r"policies/([\w-]+)\.yaml:(\d+): extends: .*cycle \(([^)]*)\)", err)
    assert m, err
    loop = m.group(3).split(" -> ")
    assert loop[0] == loop[-1] and set(loop) == {"f32", "int8-weights", "f16"}, err
    assert (specs_dir / "policies" / f"{m.group(1)}.yaml").read_text().splitlines()[int(m.group(2)) - 1].startswith("extends:")


def test_extends_unknown_policy(specs_dir, capsys):
    f = specs_dir / "policies/bf16.yaml"
    line = edit(f, "extends: f32", "extends: f31")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "extends", "'f31'", "allowed:")


def test_duplicate_key(specs_dir, capsys):
    f = specs_dir / "devices/h100.yaml"
    line = edit(f, "  fp8_convert: true\n", "  fp8_convert: true\n  fp8_convert: false\n")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line + 1, "capabilities.fp8_convert", "duplicate key")


def test_yaml_syntax_error(specs_dir, capsys):
    f = specs_dir / "devices/b200.yaml"
    edit(f, "arch: sm_100", "arch: [sm_100")
    code, err = run_cli(specs_dir, capsys)
    assert code == 2 and f"{f}:" in err and "valid YAML" in err, err


def test_yaml_tags_rejected(specs_dir, capsys):
    f = specs_dir / "devices/b200.yaml"
    line = edit(f, "arch: sm_100", "arch: !!python/object/apply:os.system ['echo pwned']")
    code, err = run_cli(specs_dir, capsys)
    assert code == 2 and f"{f}:{line}" in err and "no tags" in err, err


@pytest.mark.parametrize("arch", ["sm_90; system(\"x\")", "sm_90\n#include </etc/passwd>", "compute_90", "sm_9"])
def test_arch_cannot_inject(specs_dir, capsys, arch):
    f = specs_dir / "devices/b200.yaml"
    import json
    line = edit(f, "arch: sm_100", f"arch: {json.dumps(arch)}")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "arch", "an SM architecture")


@pytest.mark.parametrize("bad", ["'hidden; rm -rf /'", "__import__('os')", "hidden ** 2", "'hidden.__class__'", "open"])
def test_shape_expressions_cannot_inject(specs_dir, capsys, bad):
    f = specs_dir / "models/llama.yaml"
    line = edit(f, "o:        {dtype: o_proj.output, shape: [hidden]}", f"o:        {{dtype: o_proj.output, shape: [{bad}]}}")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "buffers.o.shape.0")


@pytest.mark.parametrize("bad", ["x-y", "x */ int main(){", "1abc"])
def test_names_reaching_generated_code_are_identifiers(specs_dir, capsys, bad):
    f = specs_dir / "models/llama.yaml"
    import json
    i = op_index(specs_dir, "silu_mul")
    line = edit(f, "{op: silu_mul,", f"{{op: {json.dumps(bad)},")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, f"decode_step.{i}.op", "C identifier")


def test_policy_name_must_match_file(specs_dir, capsys):
    f = specs_dir / "policies/bf16.yaml"
    line = edit(f, "name: bf16", "name: \"bf16 */ evil\"")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "name", "lowercase name")


def test_decode_step_unknown_kernel_and_arg(specs_dir, capsys):
    f = specs_dir / "models/llama.yaml"
    i = op_index(specs_dir, "silu_mul")
    line = edit(f, "kernel: silu_mul, role: activations, per_layer: true, layout: separate, args: {gate: gate,", "kernel: gelu_mul, role: activations, per_layer: true, layout: separate, args: {gate: gate,")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, f"decode_step.{i}.kernel", "'gelu_mul'", "allowed:")


def test_decode_step_binding_unknown_buffer(specs_dir, capsys):
    f = specs_dir / "models/llama.yaml"
    i = op_index(specs_dir, "ffn_residual")
    line = edit(f, "args: {x: x, d: down, n: hidden}", "args: {x: x, d: dwn, n: hidden}")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, f"decode_step.{i}.args.d", "'dwn'", "must name a buffer or weight")


def test_buffer_dtype_must_name_role_field(specs_dir, capsys):
    f = specs_dir / "models/llama.yaml"
    line = edit(f, "act:      {dtype: activations.storage,", "act:      {dtype: activations.output,")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "buffers.act.dtype", "<role>.<field>")


def test_fused_layout_needs_shared_dtypes(specs_dir, capsys):
    f = specs_dir / "policies/f16-resident.yaml"
    line = edit(f, "k_proj:    {storage: f16, compute: f16}", "k_proj:    {storage: f32, compute: f16}")
    code, err = run_cli(specs_dir, capsys, "--device", "h100", "--policy", "f16-resident", "--layout", "fused")
    assert_spec_error(code, err, f, line, "fuses q_proj, k_proj, v_proj", "share dtypes")


def test_device_capability_must_be_known(specs_dir, capsys):
    f = specs_dir / "devices/gb10.yaml"
    line = edit(f, "  tensor_cores: true\n", "  tensor_cores: true\n  warp_specialization: true\n")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line + 1, "capabilities.warp_specialization", "unknown key")


@pytest.mark.parametrize("text, key, message", [
    ("  gemv_loads: 8\n", "tuning.gemv_loads", "allowed: 2, 4, 8, 16"),
    ("  gemv_loads: 8\n", "tuning.gemv_loads", "expected int"),
    ("  gemv_loads: 8\n", "tuning.unroll", "unknown key"),
])
def test_device_tuning_is_validated(specs_dir, capsys, text, key, message):
    """Tuning values reach generated C (#define DTF_GEMV_LOADS): only listed values pass."""
    f = specs_dir / "devices/h100.yaml"
    new = {"allowed: 2, 4, 8, 16": "  gemv_loads: 12\n", "expected int": "  gemv_loads: \"8); evil(\"\n",
           "unknown key": "  gemv_loads: 8\n  unroll: 4\n"}[message]
    line = edit(f, text, new)
    assert_spec_error(*run_cli(specs_dir, capsys), f, line + (message == "unknown key"), key, message)


@pytest.mark.parametrize("spec, old, new, key, message", [
    ("devices/m40.yaml", "  gemv_loads: 8\n", "  l2_prefetch_kib: 4096\n  gemv_loads: 8\n", "tuning.l2_prefetch_kib",
     "needs sm_90 or newer"),
    ("devices/h100.yaml", "  l2_prefetch_kib: 4096\n", "  l2_prefetch_kib: 5000\n", "tuning.l2_prefetch_kib", "allowed: 0, 1024"),
    ("devices/h200.yaml", "  gemv_rotate_batches: 4\n", "  gemv_rotate_batches: 5\n", "tuning.gemv_rotate_batches",
     "allowed: 0, 2, 3, 4, 8, 16"),
    ("models/llama.yaml", "prefetch: wgate_up}}", "prefetch: attn}}", "prefetch", "names a packed weight"),
])
def test_l2_prefetch_values_are_validated(specs_dir, capsys, spec, old, new, key, message):
    """cp.async.bulk.prefetch is sm_90+ and its size one of the listed; the attention op's `prefetch`
    names what it asks the L2 for, a packed weight (a buffer is refused); a GEMV's rotation threshold
    is one of the listed too."""
    f = specs_dir / spec
    line = edit(f, old, new)
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, key, message)


@pytest.mark.parametrize("spec, arch_edit", [("devices/a100.yaml", None), ("devices/h100.yaml", ("arch: sm_90a", "arch: sm_90 "))])
def test_wgmma_needs_the_sm_90a_target(specs_dir, capsys, spec, arch_edit):
    """The wgmma capability compiles warpgroup MMA into the prefill GEMMs, which only the arch-specific
    sm_90a target has: another arch with it is refused at the capability's line, naming the arch."""
    f = specs_dir / spec
    if arch_edit:
        edit(f, *arch_edit)
    else:
        edit(f, "  tensor_cores: true\n", "  tensor_cores: true\n  wgmma: true\n")
    line = next(i for i, l in enumerate(f.read_text().splitlines(), 1) if l.strip().startswith("wgmma:"))
    arch = "sm_90" if arch_edit else "sm_80"
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "capabilities.wgmma", f"wgmma needs arch sm_90a; this device has arch {arch}")


@pytest.mark.parametrize("spec, tiles, family, message", [
    ("devices/h100.yaml", "{gemm_swiglu: 128x96}", "gemm_swiglu", "'128x96'; a tile BMxBN that dtf/gemm.cuh implements: 128x128, 128x64, 64x64, 128x256"),
    ("devices/h100.yaml", "{gemm_swiglu: 128x256/3}", "gemm_swiglu", "optionally /S splitting K over S blocks, S in 2, 4, 8"),
    ("devices/a100.yaml", "{gemm_residual: 128x256}", "gemm_residual", "(128x256 and a /S split on a wgmma device)"),
    ("devices/a100.yaml", "{gemm_residual: 128x64/2}", "gemm_residual", "(128x256 and a /S split on a wgmma device)"),
    ("devices/h100.yaml", "{gemm_swiglu: 128x256, gemv: 128x64}", "gemv", "unknown GEMM family; allowed: gemm, gemm_residual"),
    ("devices/t4.yaml", "{gemm: 128x128}", "gemm", "more than capabilities.smem_per_block (65536)"),
])
def test_gemm_tiles_are_validated(specs_dir, capsys, spec, tiles, family, message):
    """Each prefill GEMM family's tile reaches the generated C (its BM x BN, its cluster's K split) and the
    launch (grid, shared memory): only tiles dtf/gemm.cuh implements pass, wide tiles and K splits only on
    wgmma devices, and only where the stages fit the device's shared memory."""
    f = specs_dir / spec
    text = f.read_text()
    if "gemm_tiles:" in text:
        text = re.sub(r"  gemm_tiles: \{.*\}\n", f"  gemm_tiles: {tiles}\n", text)
    else:
        text = text.replace("tuning:\n", f"tuning:\n  gemm_tiles: {tiles}\n") if "tuning:" in text else text + f"tuning:\n  gemm_tiles: {tiles}\n"
    f.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.strip().startswith("gemm_tiles:"))
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, f"tuning.gemm_tiles.{family}", message)


def test_op_dependents_is_validated(specs_dir, capsys):
    """`dependents` picks where the generated kernel lets the next launch start; only the listed values pass."""
    f = specs_dir / "models/llama.yaml"
    i = op_index(specs_dir, "down_proj_residual")
    line = edit(f, "layout: fused, dependents: early, args: {w: wdown,", "layout: fused, dependents: soon, args: {w: wdown,")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, f"decode_step.{i}.dependents", "'soon'",
                      "allowed: after_wait, early")


def test_per_run_applies_to_int_symbols_only(specs_dir, capsys):
    """`per_run` keeps a symbol out of the compiled shapes; a float is never compiled in, so it is refused there."""
    f = specs_dir / "models/llama.yaml"
    line = edit(f, "rope_theta:     {hf: [rope_theta, rope_parameters.rope_theta], type: float,", "rope_theta:     {hf: [rope_theta, rope_parameters.rope_theta], type: float, per_run: true,")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "config.rope_theta.per_run", "only int symbols")
    line = edit(f, "per_run: true,", "per_run: yes please,")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, "config.rope_theta.per_run", "'yes please'")


def test_spec_error_is_a_one_line_message_not_a_traceback(specs_dir, capsys):
    f = specs_dir / "policies/f16.yaml"
    edit(f, "v_proj:      {storage: f16,", "v_proj:      {storage: 16,")
    code, err = run_cli(specs_dir, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_user_spec_folder_with_a_new_policy(specs_dir, capsys, tmp_path):
    (specs_dir / "policies/kv-f16.yaml").write_text(
        "name: kv-f16\nextends: f32\ndescription: f32 with an f16 KV cache\nroles:\n  kv_cache: {storage: f16}\n")
    out = tmp_path / "gen"
    assert main(["build", "--specs", str(specs_dir), "--out", str(out), "--device", "h100", "--policy", "kv-f16"]) == 0
    cu = (out / "llama.h100.kv-f16.separate" / "kernels.cu").read_text()
    assert "kv_append_kf32_vf32_kcf16_vcf16" in cu and "attention_qf32_kcf16_vcf16_yf32_cf32_af32" in cu


def test_fused_kernel_needs_its_stage_roles(specs_dir, capsys):
    f = specs_dir / "models/llama.yaml"
    i = op_index(specs_dir, "ffn_norm_gate_up_silu")
    line = edit(f, "role: gate_proj, norm_role: ffn_norm, act_role: activations,", "role: gate_proj, act_role: activations,")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, f"decode_step.{i}", "<no 'norm_role'>", "norm_gemv_swiglu")


def test_stage_role_must_have_the_fields_the_kernel_uses(specs_dir, capsys):
    f = specs_dir / "models/llama.yaml"
    i = op_index(specs_dir, "o_proj_residual")
    line = edit(f, "kernel: gemv_residual, role: o_proj, act_role: activations,", "kernel: gemv_residual, role: o_proj, act_role: embedding,")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line, f"decode_step.{i}.act_role", "'embedding'", "fields ['compute']")


def test_quantized_storage_on_a_role_without_scales(specs_dir, capsys):
    """An int8 KV cache would be a plain cast with no scale: a silently wrong kernel."""
    f = specs_dir / "policies/f16-resident.yaml"
    line = edit(f, "  q_proj:    {storage: f16, compute: f16}", "  q_proj:    {storage: f16, compute: f16}\n  kv_cache:  {storage: int8}")
    assert_spec_error(*run_cli(specs_dir, capsys), f, line + 1, "roles.kv_cache.storage", "'int8'",
                      "needs a quantization scale, which role kv_cache cannot have")


@pytest.mark.parametrize("old,new,key,fragment", [
    ("    llama3:  [factor,", "    yarn:    [factor,", "rope.types.yarn", "allowed: default, linear, llama3"),
    ("  theta: rope_theta", "  theta: hidden", "rope.theta", "must name a float config symbol"),
    ("    default: []\n", "", "rope.types", "'default' (no scaling) must be among the types"),
    ("  attention_bias: {values: [null, false]}", "  attention_bias: {values: [null, false], or_at_least: rms_eps}",
     "gate.attention_bias.or_at_least", "must name an int config symbol"),
    ("  mlp_bias:       {values: [null, false]}", "  mlp_bias:       {allowed: [null, false]}", "gate.mlp_bias", "unknown key"),
    ("rope_inv_freq: {computed: rope,", "rope_inv_freq: {computed: yarn,", "tensors.rope_inv_freq.computed", "allowed: rope"),
    ("rope_inv_freq: {computed: rope,", "rope_inv_freq: {hf: x.weight, computed: rope,", "tensors.rope_inv_freq", "either in the checkpoint"),
    ("architectures: [LlamaForCausalLM, MistralForCausalLM]", "architectures: []", "architectures", "at least one"),
    ("{hf: [rope_theta, rope_parameters.rope_theta],", "{hf: [rope_theta, rope parameters],", "config.rope_theta.hf.1", "dotted path"),
])
def test_model_spec_rope_gate_and_computed_tensors_are_validated(specs_dir, capsys, old, new, key, fragment):
    f = specs_dir / "models/llama.yaml"
    edit(f, old, new)
    code, err = run_cli(specs_dir, capsys)
    assert_spec_error(code, err, f, None, key, fragment)


def test_a_cuda_target_refuses_sums_its_prefill_kernels_cannot_make(specs_dir, capsys):
    """The prefill GEMMs sum in tensor-core f32 accumulators: a policy accumulating a projection in f16
    is refused for CUDA devices by file and line, and still builds for the reference device."""
    f = specs_dir / "policies/f16.yaml"
    line = edit(f, "o_proj:      {storage: f16, compute: f16, accumulate: f32,", "o_proj:      {storage: f16, compute: f16, accumulate: f16,")
    assert_spec_error(*run_cli(specs_dir, capsys, "--device", "h100", "--policy", "f16"), f, line,
                      "roles.o_proj.accumulate", "found 'f16'", "takes accumulate f32 only")
    assert main(["build", "--specs", str(specs_dir), "--out", str(specs_dir.parent / "ref"), "--device", "reference",
                 "--policy", "f16"]) == 0
