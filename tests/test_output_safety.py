"""Commands that write files touch only what they own, write atomically, and refuse bad input
(an --out holding other things, a spec that is not a regular file or expands without bound, a
device with a non-positive size) with one line, before writing anything."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_gguf

from dtypeforge.codegen import build as B
from dtypeforge.cli import main
from dtypeforge.codegen.specs import DEFAULT_SPECS, _shape_dim, load_device
from dtypeforge.codegen.yamlsrc import SpecError, load
from dtypeforge.runtime import gguf_import
from dtypeforge.runtime.gguf_import import OutputExists, import_gguf

REPO = Path(__file__).resolve().parent.parent
SELECT = ["--device", "h100", "--policy", "f16"]          # two targets: a cheap build


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtypeforge.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too) with a file's bytes."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- codegen build --out

def test_build_refuses_an_out_holding_other_files(tmp_path):
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not generated")
    (out / "notes.txt").write_text("keep me\n")
    before = snapshot(out)
    r = cli("build", "--out", out, *SELECT)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert str(out) in line and "'notes.txt'" in line and "did not write" in line
    assert snapshot(out) == before
    r = cli("build", "--check", "--out", out, *SELECT)
    assert r.returncode == 2 and "'notes.txt'" in one_error_line(r.stderr)
    assert snapshot(out) == before


def test_full_build_refuses_an_out_holding_other_files(tmp_path, capsys):
    """The case that used to delete: a full build pruned every folder that was not a target."""
    out = tmp_path / "home"
    (out / "projects" / "thesis").mkdir(parents=True)
    (out / "projects" / "thesis" / "main.tex").write_text("\\documentclass{article}\n")
    before = snapshot(out)
    assert main(["build", "--out", str(out)]) == 2
    assert "'projects'" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_build_creates_a_missing_out_and_lists_what_it_wrote(tmp_path):
    out = tmp_path / "a" / "b" / "gen"
    r = cli("build", "--out", out, *SELECT)
    assert r.returncode == 0, r.stderr
    index = (out / B.INDEX).read_text().splitlines()
    assert [l for l in index if not l.startswith("#")] == ["llama.h100.f16.fused", "llama.h100.f16.separate"]
    assert sorted(p.name for p in out.iterdir()) == [B.INDEX, "llama.h100.f16.fused", "llama.h100.f16.separate"]
    r = cli("build", "--check", "--out", out, *SELECT)
    assert r.returncode == 0, r.stderr
    # a second selection adds to the index; the first one's folders stay
    assert cli("build", "--out", out, "--device", "h200", "--policy", "f16", "--layout", "fused").returncode == 0
    owned, _ = B.owned_targets(out)
    assert owned == {"llama.h100.f16.fused", "llama.h100.f16.separate", "llama.h200.f16.fused"}


def test_build_refuses_an_out_that_is_a_file(tmp_path):
    out = tmp_path / "gen"
    out.write_text("not a folder\n")
    r = cli("build", "--out", out, *SELECT)
    assert r.returncode == 2 and "a file, not a folder" in one_error_line(r.stderr)
    assert out.read_text() == "not a folder\n"


def test_prune_removes_only_owned_targets(tmp_path):
    from dtypeforge.codegen.specs import load_specs
    specs = load_specs()
    out = tmp_path / "gen"
    both = B.render_targets(specs, B.select_targets(specs, "h100", "f16", None))
    B.write(both, out, prune=False)
    fused = {k: v for k, v in both.items() if k.endswith(".fused")}
    # an owned target that is no longer produced is reported by a full check, then pruned by a full build
    assert f"extra:   {out / 'llama.h100.f16.separate'}" in B.stale(fused, out, full=True)
    changed = B.write(fused, out, prune=True)
    assert out / "llama.h100.f16.separate" in changed and not (out / "llama.h100.f16.separate").exists()
    assert B.owned_targets(out)[0] == {"llama.h100.f16.fused"} and B.stale(fused, out, full=True) == []
    # a foreign folder blocks the build before anything is written or pruned
    B.write(both, out, prune=False)
    (out / "llama.h100.f16.fused" / "kernels.cu").write_text("// edited\n")
    (out / "stranger").mkdir()
    before = snapshot(out)
    with pytest.raises(B.OutDirError, match="'stranger'"):
        B.write(fused, out, prune=True)
    assert snapshot(out) == before
    # a file of its own in a target folder about to be pruned is never deleted either
    (out / "stranger").rmdir()
    (out / "llama.h100.f16.separate" / "my.cubin").write_bytes(b"\x7fELF")
    before = snapshot(out)
    with pytest.raises(B.OutDirError, match="'my.cubin'"):
        B.write(fused, out, prune=True)
    assert snapshot(out) == before


def test_targets_written_before_the_index_existed_are_adopted(tmp_path):
    """generated/ folders from before the index: their manifests name them as targets."""
    out = tmp_path / "gen"
    assert cli("build", "--out", out, *SELECT).returncode == 0
    (out / B.INDEX).unlink()
    r = cli("build", "--check", "--out", out, *SELECT)
    assert r.returncode == 1 and f"missing: {out / B.INDEX}" in r.stderr
    assert cli("build", "--out", out, *SELECT).returncode == 0
    assert cli("build", "--check", "--out", out, *SELECT).returncode == 0
    # without an index, a folder whose manifest names another target is not adopted
    (out / B.INDEX).unlink()
    shutil.copytree(out / "llama.h100.f16.fused", out / "copy")
    r = cli("build", "--out", out, *SELECT)
    assert r.returncode == 2 and "'copy'" in one_error_line(r.stderr)


def test_index_lines_must_be_folder_names(tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    (out / B.INDEX).write_text("../elsewhere\n")
    with pytest.raises(B.OutDirError, match="elsewhere"):
        B.owned_targets(out)


def test_interrupted_build_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "gen"
    real_write_text = pathlib.Path.write_text
    calls = []

    def write_half_then_interrupt(self, text, *a, **kw):
        calls.append(self)
        if len(calls) == 4:                         # mid-way through the third target file
            real_write_text(self, text[: len(text) // 2], *a, **kw)
            raise KeyboardInterrupt
        return real_write_text(self, text, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "write_text", write_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        B.write(_render_h100_f16(), out, prune=False)
    monkeypatch.undo()
    assert calls[3].name.endswith(".tmp")
    assert temporaries(out) == []
    problems = B.stale(_render_h100_f16(), out, full=False)
    assert problems and all(p.startswith("missing:") for p in problems) and not any(".tmp" in p for p in problems)
    # the next build finishes the job from there
    assert cli("build", "--out", out, *SELECT).returncode == 0
    assert cli("build", "--check", "--out", out, *SELECT).returncode == 0


def test_interrupt_between_write_and_rename_leaves_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "gen"
    rendered = _render_h100_f16()
    B.write(rendered, out, prune=False)
    (out / "llama.h100.f16.fused" / "kernels.cu").write_text("// old\n")
    real_replace = os.replace

    def interrupt(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(B.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        B.write(rendered, out, prune=False)
    monkeypatch.setattr(B.os, "replace", real_replace)
    assert temporaries(out) == []
    assert (out / "llama.h100.f16.fused" / "kernels.cu").read_text() == "// old\n"     # the old file, whole


def _render_h100_f16():
    from dtypeforge.codegen.specs import load_specs
    specs = load_specs()
    return B.render_targets(specs, B.select_targets(specs, "h100", "f16", None))


def _writable_despite_mode(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "owned-out"])
def test_unwritable_out_is_refused_before_writing(tmp_path, existing):
    out = tmp_path / "gen"
    if existing:
        assert cli("build", "--out", out, "--device", "h100", "--policy", "f16", "--layout", "fused").returncode == 0
    else:
        out.mkdir()
    before = snapshot(out)
    out.chmod(0o500)
    try:
        if _writable_despite_mode(out):
            pytest.skip("running as a user (root) whom a read-only folder does not stop")
        r = cli("build", "--out", out, *SELECT)
        assert r.returncode == 2
        line = one_error_line(r.stderr)
        assert str(out) in line and "cannot be written" in line
    finally:
        out.chmod(0o755)
    assert snapshot(out) == before


def test_failed_write_probe_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    """The same refusal where permissions do not stop the test's user: the probe itself fails."""
    out = tmp_path / "gen"
    out.mkdir()

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(B.tempfile, "mkstemp", denied)
    assert main(["build", "--out", str(out), *SELECT]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "cannot be written (Permission denied)" in line
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------- codegen import-gguf --out

def tiny_llama_gguf(path: Path, kv: dict | None = None, extra_tensors: dict | None = None) -> Path:
    """A minimal Llama GGUF the importer accepts: 4 tokens, 8 wide, no layers."""
    base = {"llama.embedding_length": 8, "llama.attention.head_count": 2, "llama.feed_forward_length": 16,
            "llama.block_count": 0, "llama.context_length": 64, "llama.attention.layer_norm_rms_epsilon": 1e-5}
    tensors = {"token_embd.weight": np.arange(32, dtype=np.float32).reshape(4, 8),
               "output_norm.weight": np.ones(8, np.float32), **(extra_tensors or {})}
    return write_gguf(path, {**base, **(kv or {})}, ["a", "b", "ab", "<s>"], [1, 1, 1, 3], ["a b"], tensors)


def leftovers(parent: Path, out: Path) -> list[str]:
    """Staging or swapped-out folders an import left next to its --out."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_import_refuses_a_non_empty_out(tmp_path):
    gguf = tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "model"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work\n")
    with pytest.raises(OutputExists, match=r"not empty \(it holds 'thesis.tex'\).*--force"):
        import_gguf(gguf, out, progress=False)
    assert snapshot(out) == {"thesis.tex": b"years of work\n"} and leftovers(tmp_path, out) == []
    r = cli("import-gguf", gguf, "--out", out)
    assert r.returncode == 1 and "thesis.tex" in one_error_line(r.stderr)
    assert snapshot(out) == {"thesis.tex": b"years of work\n"}


def test_import_refuses_an_out_that_is_a_file(tmp_path):
    gguf = tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "model"
    out.write_text("a file\n")
    r = cli("import-gguf", gguf, "--out", out)
    assert r.returncode == 1 and "is not a folder" in one_error_line(r.stderr)
    assert out.read_text() == "a file\n"


def test_import_into_an_empty_or_missing_out(tmp_path):
    gguf = tiny_llama_gguf(tmp_path / "m.gguf")
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):
        import_gguf(gguf, out, progress=False)
        assert json.loads((out / "config.json").read_text())["hidden_size"] == 8
        assert leftovers(tmp_path, out) == []


@pytest.mark.parametrize("what", ["folder", "file"])
def test_force_replaces_out_whole(tmp_path, what):
    gguf = tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "model"
    if what == "folder":
        out.mkdir()
        (out / "stale.bin").write_bytes(b"old")
    else:
        out.write_text("old\n")
    import_gguf(gguf, out, progress=False, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                                            "tokenizer.json", "tokenizer_config.json"])
    assert leftovers(tmp_path, out) == []


def test_interrupted_forced_import_keeps_the_old_model(tmp_path, monkeypatch):
    gguf = tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}\n')
    before = snapshot(out)

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "_write_json", interrupt)          # while writing the new folder
    with pytest.raises(KeyboardInterrupt):
        import_gguf(gguf, out, progress=False, force=True)
    assert snapshot(out) == before and leftovers(tmp_path, out) == []
    monkeypatch.undo()

    real_replace, calls = os.replace, []

    def fail_second(src, dst):                                         # during the swap itself
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(gguf_import.os, "replace", fail_second)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(gguf, out, progress=False, force=True)
    monkeypatch.setattr(gguf_import.os, "replace", real_replace)
    assert snapshot(out) == before and leftovers(tmp_path, out) == []


@pytest.mark.parametrize("kv, expected", [
    ({}, None),
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, None),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 8.0}, {"rope_type": "linear", "factor": 8.0}),
    ({"llama.rope.scaling.factor": 2.0}, {"rope_type": "linear", "factor": 2.0}),      # llama.cpp's default type
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 8192},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}),
], ids=["absent", "none", "linear", "linear-by-default", "yarn"])
def test_rope_scaling_is_carried_into_config(tmp_path, kv, expected):
    out = import_gguf(tiny_llama_gguf(tmp_path / "m.gguf", kv), tmp_path / "model", progress=False)
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == expected


def test_unknown_rope_scaling_type_is_refused(tmp_path):
    gguf = tiny_llama_gguf(tmp_path / "m.gguf", {"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 4.0})
    r = cli("import-gguf", gguf, "--out", tmp_path / "model")
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "llama.rope.scaling.type" in line and "'longrope'" in line and "linear" in line
    assert not (tmp_path / "model").exists()


def test_rope_frequency_factors_llama3_scaling_cannot_write_are_refused(tmp_path):
    # factors that fall with wavelength: llama3 scaling only ever raises them towards long wavelengths
    gguf = tiny_llama_gguf(tmp_path / "m.gguf", extra_tensors={"rope_freqs.weight": np.array([2.0, 1.0], np.float32)})
    r = cli("import-gguf", gguf, "--out", tmp_path / "model")
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "rope_freqs.weight" in line and "per-dimension RoPE frequency factors" in line and "not support" in line
    assert not (tmp_path / "model").exists() and leftovers(tmp_path, tmp_path / "model") == []


# ----------------------------------------------------------------------------- spec files

BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] +
                 [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"


def test_alias_bomb_is_refused_quickly(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    start = time.monotonic()
    with pytest.raises(SpecError) as e:
        load(path)
    assert time.monotonic() - start < 5
    assert str(path) in str(e.value) and e.value.line is not None and "alias" in str(e.value)


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("a: &a\n  - x\n  - *a\n")
    with pytest.raises(SpecError, match=r"loop\.yaml:3: .*\*a, which refers to a node that contains it"):
        load(path)


def test_modest_aliases_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {storage: f16, compute: f32}\nx: *b\ny: *b\n")
    assert load(path).data["y"] == {"storage": "f16", "compute": "f32"}


def _spec_copy(tmp_path) -> Path:
    specs = tmp_path / "specs"
    shutil.copytree(DEFAULT_SPECS, specs)
    return specs


def test_alias_bomb_in_a_spec_folder_via_the_cli(tmp_path):
    specs = _spec_copy(tmp_path)
    (specs / "devices" / "bomb.yaml").write_text(BOMB)
    r = cli("list", "--specs", specs, timeout=60)
    assert r.returncode == 2 and f"{specs / 'devices' / 'bomb.yaml'}:" in one_error_line(r.stderr)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_spec_that_is_not_a_regular_file_is_refused_without_reading(tmp_path, kind):
    specs = _spec_copy(tmp_path)
    odd = specs / "policies" / "odd.yaml"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.mkdir()
    r = cli("list", "--specs", specs, timeout=60)       # opening the FIFO would block until the timeout
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert str(odd) in line and ("a FIFO" if kind == "fifo" else "a folder") in line and "regular" in line


def test_device_file_is_refused():
    with pytest.raises(SpecError, match=r"/dev/zero: .*a device.*regular"):
        load(Path("/dev/zero"))


# ----------------------------------------------------------------------------- device and shape values

@pytest.mark.parametrize("key, value", [("memory_gb", "-80"), ("memory_gb", "0"), ("bandwidth_gbs", "0"),
                                        ("bandwidth_gbs", ".nan"), ("memory_gb", ".inf")])
def test_device_sizes_must_be_positive(tmp_path, key, value):
    text = (DEFAULT_SPECS / "devices" / "h100.yaml").read_text()
    lines = [l for l in text.splitlines() if not l.startswith(f"{key}:")] + [f"{key}: {value}"]
    path = tmp_path / "h100.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError) as e:
        load_device(path)
    assert e.value.key == key and e.value.line == len(lines) and "positive" in str(e.value)


def test_cuda_device_needs_shared_memory(tmp_path):
    text = (DEFAULT_SPECS / "devices" / "h100.yaml").read_text()
    path = tmp_path / "h100.yaml"
    path.write_text(re.sub(r"smem_per_block: \d+", "smem_per_block: 0", text))
    with pytest.raises(SpecError) as e:
        load_device(path)
    assert e.value.key == "capabilities.smem_per_block" and "positive" in str(e.value)


@pytest.mark.parametrize("dim, ok", [("n * m", True), ("n - m", True), ("cdiv(n, 3)", True), ("0", False),
                                     ("n - n", False), ("1 // n", False), ("m - 2 * m", False), ("n // (m - m)", False)])
def test_shape_dimension_must_be_positive_for_some_config(tmp_path, dim, ok):
    path = tmp_path / "model.yaml"
    path.write_text(f"tensors:\n  w:\n    shape: [{dim}]\n")
    src = load(path)
    where = ("tensors", "w", "shape", 0)
    if ok:
        assert _shape_dim(src, where, dim, ["n", "m"])
    else:
        with pytest.raises(SpecError) as e:
            _shape_dim(src, where, dim, ["n", "m"])
        assert e.value.key == "tensors.w.shape.0" and e.value.line == 3 and "positive" in str(e.value)


# ----------------------------------------------------------------------------- the cubin cache

def test_cubin_cache_verifies_its_content_hash(tmp_path):
    from dtypeforge.runtime.cuda import cache_entry
    out = tmp_path / "k.sm_90.abc.cubin"
    builds = []

    def build(tmp):
        builds.append(tmp)
        tmp.write_bytes(b"\x7fELF" + b"\0" * 1000)

    assert cache_entry(out, build) == out and len(builds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + ".sha256"]
    cache_entry(out, build)
    assert len(builds) == 1                                    # a hit
    out.write_bytes(out.read_bytes()[:500])                    # cut short
    cache_entry(out, build)
    assert len(builds) == 2 and out.stat().st_size == 1004
    (tmp_path / (out.name + ".sha256")).unlink()               # no recorded hash: not trusted
    cache_entry(out, build)
    assert len(builds) == 3 and sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + ".sha256"]


def test_interrupted_cubin_build_leaves_nothing(tmp_path):
    from dtypeforge.runtime.cuda import cache_entry
    out = tmp_path / "k.cubin"

    def interrupted(tmp):
        tmp.write_bytes(b"\x7fEL")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_entry(out, interrupted)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("add_bos", [True, False])
def test_imported_tokenizer_adds_bos_as_the_gguf_says(tmp_path, add_bos):
    """transformers decides BOS from tokenizer.json's post-processor alone, so the importer puts it there."""
    from dtypeforge.runtime.tokenizer import HFTokenizer
    kv = {"tokenizer.ggml.bos_token_id": 3, "tokenizer.ggml.add_bos_token": int(add_bos)}
    out = import_gguf(tiny_llama_gguf(tmp_path / "m.gguf", kv), tmp_path / "model", progress=False)
    assert HFTokenizer(out).encode("ab") == ([3, 2] if add_bos else [2])
