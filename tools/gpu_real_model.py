"""Check the real SmolLM2-135M-Instruct on the GPU once, by hand (docs/gpu.md records the result).

Imports the GGUF given on the command line, then for each golden prompt (tests/goldens, made by
Hugging Face transformers) generates 32 greedy tokens with the CUDA backend for several targets and
compares them with the goldens and with the numpy reference backend of the same target.
    usage: python3 tools/gpu_real_model.py SmolLM2.gguf [device]
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dtypeforge.codegen.specs import load_specs
from dtypeforge.runtime.cuda import CudaBackend
from dtypeforge.runtime.generate import generate
from dtypeforge.runtime.gguf_import import import_gguf
from dtypeforge.runtime.loader import pack_weights
from dtypeforge.runtime.reference import ReferenceBackend
from dtypeforge.session import resolve_device
from dtypeforge.runtime.target import find_target, load_target
from dtypeforge.runtime.tokenizer import HFTokenizer

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    model = import_gguf(Path(sys.argv[1]), Path(tempfile.mkdtemp()) / "smollm2", progress=False)
    device = sys.argv[2] if len(sys.argv) > 2 else resolve_device(load_specs(), "auto", "cuda")
    goldens = json.loads((REPO / "tests/goldens/smollm2_f32_greedy.json").read_text())
    eos = HFTokenizer(model).eos_ids
    print(f"device spec {device}; {len(goldens['prompts'])} golden prompts from transformers {goldens['versions']['transformers']}")
    print(f"{'target':34s} {'prompt':>6s} {'=golden':>8s} {'=ref':>6s} {'max|dlogit|':>11s}")
    for policy in ("f32", "f16", "bf16", "f16-resident", "fp8-e4m3-weights", "int8-weights"):
        for layout in ("fused", "separate"):
            t = load_target(find_target(device, policy, layout))
            packed = pack_weights(t, model, max_seq=128, progress=False)
            gpu, ref = CudaBackend(t, packed, progress=False), ReferenceBackend(t.manifest, packed)
            try:
                for p in goldens["prompts"]:
                    ids = p["prompt_ids"]
                    gpu.reset(), ref.reset()
                    worst = 0.0
                    for pos, tok in enumerate(ids):
                        lg, lr = gpu.step(tok, pos), ref.step(tok, pos)
                        worst = max(worst, float(np.abs(lg - lr).max()))
                    g = generate(gpu, ids, 32, eos)
                    r = generate(ref, ids, 32, eos)
                    gold = p["new_ids"]
                    same_gold = next((i for i, (a, b) in enumerate(zip(g, gold)) if a != b), min(len(g), len(gold)))
                    same_ref = next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), min(len(g), len(r)))
                    print(f"{t.name:34s} {p['index']:6d} {same_gold:3d}/{len(gold):<4d} {same_ref:3d}/{len(r):<2d} {worst:11.3g}")
            finally:
                gpu.close()


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.0f} s")
