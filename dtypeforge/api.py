"""The Python API: load a Hugging Face checkpoint for a device and policy, then stream tokens.

    import dtypeforge
    with dtypeforge.load("path/to/model", device="auto", policy="f16") as engine:
        for token_id, text in engine.generate("The capital of France is", max_new_tokens=16):
            print(text, end="", flush=True)

``specs`` is a spec folder (models/, policies/, devices/), the shipped one by default; the target
is rendered from it, so a policy or device added there in YAML runs as written. Errors a user can
cause raise one of ``dtypeforge.UserError`` (a tuple, for ``except``), whose message is one line naming
what is wrong.
"""
from __future__ import annotations

from pathlib import Path

from dtypeforge.codegen.specs import DEFAULT_SPECS, load_specs
from dtypeforge.runtime.generate import Sampling
from dtypeforge.session import Engine, open_engine


def load(model_dir, device: str = "auto", policy: str | None = None, *, layout: str = "fused", backend: str = "auto",
         specs=None, max_seq: int = 4096, progress: bool = False) -> Engine:
    """A checkpoint packed for ``device`` (a device spec name, or "auto": the GPU's spec, else the CPU
    reference) under ``policy`` (default: the device's), with room for ``max_seq`` positions."""
    return open_engine(load_specs(Path(specs) if specs is not None else DEFAULT_SPECS), model_dir, device, policy,
                       layout, backend, max_seq=max_seq, progress=progress)


__all__ = ["Engine", "Sampling", "load"]
