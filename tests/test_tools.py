"""The developer tools the GPU workflow depends on (tools/), checked where CI can run them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = Path("generated") / "llama.h200.f16.fused" / "kernels.cu"
MARK = "// ab_tree test marker"


def _ab_tree(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AB_DIR": str(tmp_path), "PYTHON": sys.executable}
    return subprocess.run([str(ROOT / "tools" / "ab_tree.sh"), *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_ab_tree_renders_with_the_trees_own_templates(tmp_path: Path) -> None:
    """An A/B tree is a git ref's files, rebuilt by that tree's codegen, not the checkout's (whose
    editable install would otherwise render the checkout's templates into it)."""
    made = _ab_tree(tmp_path, "t", "HEAD")
    assert made.returncode == 0, made.stderr
    tree = tmp_path / "t"
    committed = subprocess.run(["git", "show", f"HEAD:{KERNELS.as_posix()}"], capture_output=True, text=True, cwd=ROOT)
    assert (tree / KERNELS).read_text() == committed.stdout
    template = tree / "templates" / "embedding_gather.cu.j2"   # in both layouts
    template.write_text(MARK + "\n" + template.read_text())
    rebuilt = _ab_tree(tmp_path, "t", "--build")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert MARK in (tree / KERNELS).read_text()
    assert MARK not in (ROOT / KERNELS).read_text()


def test_ab_tree_names_a_missing_ref(tmp_path: Path) -> None:
    done = _ab_tree(tmp_path, "t", "no-such-ref")
    assert done.returncode == 2
    assert "no commit 'no-such-ref'" in done.stderr
    assert not (tmp_path / "t").exists()


def test_every_gpu_probe_builds_against_the_current_generated_kernels(tmp_path: Path) -> None:
    """tools/*.cu (the standalone probes docs/benchmarks.md quotes) are run by hand on a GPU (their build line
    is in their header) and must build here, host and device code, so they are ready for the next GPU run."""
    probes = sorted((ROOT / "tools").glob("*.cu"))
    assert probes
    # gemm_check.cu (the prefill GEMM mainloop alone) also builds its Hopper wgmma path
    builds = [(p, ["-arch=sm_90"]) for p in probes] + [
        (ROOT / "tools" / "gemm_check.cu", ["-gencode=arch=compute_90a,code=sm_90a", "-DDTF_GEMM_WGMMA=1"])]
    for probe, arch in builds:
        done = subprocess.run(["nvcc", "-O3", *arch, "-std=c++17", "-Itemplates", "-o", str(tmp_path / probe.stem), str(probe)],
                              capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, f"{probe.name} {arch}: {done.stderr[-2000:]}"


def test_every_python_gpu_tool_imports_against_the_current_runtime() -> None:
    """tools/*.py run by hand on the GPU machine (docs/benchmarks.md quotes them) reach into runtime/ for the
    graph and launch helpers; importing them here, where no GPU is needed to import, fails when a name
    they use has moved, rather than on the device."""
    tools = sorted((ROOT / "tools").glob("*.py"))
    assert any(t.name == "gpu_isolate.py" for t in tools)
    for tool in tools:
        done = subprocess.run([sys.executable, "-c", f"import runpy; runpy.run_path({str(tool)!r}, run_name='probe')"],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, f"{tool.name}: {done.stderr[-2000:]}"
