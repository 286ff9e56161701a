"""The schema between generator and runtime (codegen/contract.py): codegen writes it, the runtime refuses
anything else by name before binding or packing."""
from __future__ import annotations

import json
import shutil

import pytest

from dtypeforge.codegen import contract
from dtypeforge.runtime.target import GENERATED, LoadError, load_target


def test_every_generated_target_follows_the_schema():
    targets = sorted(p for p in GENERATED.iterdir() if p.is_dir())
    assert len(targets) == 162
    for t in targets:
        assert load_target(t).manifest["schema"] == contract.SCHEMA


def _edit(tmp_path, name, change):
    t = shutil.copytree(GENERATED / "llama.h100.f16.fused", tmp_path / "t")
    data = json.loads((t / name).read_text())
    change(data)
    (t / name).write_text(json.dumps(data))
    return t


@pytest.mark.parametrize("name,change,says", [
    ("manifest.json", lambda m: m.update(schema=1), "has schema 1, this dtypeforge reads schema 3"),
    ("manifest.json", lambda m: m.pop("schema"), "has schema None"),
    ("manifest.json", lambda m: m["kernels"][0]["params"][0].update(dtype=16), "kernels[0].params[0].dtype is 16; the schema wants str"),
    ("manifest.json", lambda m: m["decode_step"][1].update(grid_stride="yes"), "decode_step[1].grid_stride is 'yes'; the schema wants bool"),
    ("manifest.json", lambda m: m["decode_step"][0]["args"][0].update(offset=3), "decode_step[0].args[0].offset is not in the schema"),
    ("manifest.json", lambda m: m["buffers"][0].pop("shape"), "buffers[0] lacks shape"),
    ("manifest.json", lambda m: m.update(config=[1]), "config is list; the schema wants a mapping"),
    ("packing.json", lambda p: p["weights"][0]["sources"][0].update(shape="hidden"), "weights[0].sources[0].shape is str; the schema wants a list"),
    ("packing.json", lambda p: p.pop("ignored_tensors"), "lacks ignored_tensors"),
])
def test_a_target_off_the_schema_is_refused_by_field(tmp_path, name, change, says):
    with pytest.raises(LoadError, match=r"\b" + name.replace(".", r"\.") + r"\b.*") as e:
        load_target(_edit(tmp_path, name, change))
    assert says in str(e.value)
