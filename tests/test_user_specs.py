"""A user's own spec folder reaches the runtime: generate and bench run exactly what --specs says.

The loop the project promises: copy the specs, edit or add a policy and a device in YAML, and run
with them, without editing Python or templates and without `codegen build` into generated/. The
runtime renders the target from the given specs in memory, so an edited shipped policy runs as
edited, and a new policy and device run at all.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dtypeforge.codegen.specs import load_specs
from dtypeforge.session import open_session
from dtypeforge.runtime.synth import write_synthetic_model

REPO = Path(__file__).resolve().parent.parent
KV_F16 = """# f32 everywhere except the KV cache, stored in f16 (half the cache bytes).
name: kv-f16
extends: f32
description: f32 everywhere, KV cache stored f16
roles:
  kv_cache: {storage: f16}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("tiny") / "model", seed=2)


@pytest.fixture
def myspecs(tmp_path):
    """The shipped specs plus a policy and a device the project does not ship."""
    d = shutil.copytree(REPO / "specs", tmp_path / "myspecs")
    (d / "policies" / "kv-f16.yaml").write_text(KV_F16)
    dev = (d / "devices" / "l4.yaml").read_text().replace("name: l4", "name: rtx4000ada").replace('["L4"]', '["RTX 4000 Ada"]')
    (d / "devices" / "rtx4000ada.yaml").write_text(dev)
    return d


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dtypeforge.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_a_new_policy_and_device_run_through_generate_on_the_cpu(myspecs, tiny, tmp_path):
    r = cli("generate", "--specs", myspecs, "--model", tiny, "--backend", "cpu", "--device", "rtx4000ada",
            "--policy", "kv-f16", "--prompt", "hello", "--max-new-tokens", "4", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["device"], out["policy"], len(out["new_ids"])) == ("rtx4000ada", "kv-f16", 4)
    assert "rtx4000ada.kv-f16.fused" in r.stderr
    assert not list((REPO / "generated").glob("*rtx4000ada*"))


def test_an_edited_shipped_policy_runs_as_edited(myspecs, tiny):
    """f16 edited to store the KV cache in f32: the run's target says so, and so does its KV buffer."""
    f16 = myspecs / "policies" / "f16.yaml"
    f16.write_text(f16.read_text().replace("kv_cache:    {storage: f16,", "kv_cache:    {storage: f32,"))
    shipped = open_session(load_specs(), tiny, "reference", "f16", backend="cpu", prompt="hi", progress=False)
    edited = open_session(load_specs(myspecs), tiny, "reference", "f16", backend="cpu", prompt="hi", progress=False)
    kv = lambda s: next(b.dtype for b in s.target.manifest.buffers if b.name == "k_cache")
    assert (kv(shipped), kv(edited)) == ("f16", "f32")


def test_an_unknown_policy_in_the_users_specs_is_refused_by_name(myspecs, tiny, tmp_path):
    r = cli("generate", "--specs", myspecs, "--model", tiny, "--backend", "cpu", "--policy", "kv-f8",
            "--prompt", "hi", cwd=tmp_path)
    assert r.returncode == 2 and "--policy 'kv-f8'" in r.stderr and "kv-f16" in r.stderr, r.stderr
