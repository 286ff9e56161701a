"""Pin how closely every non-f32 policy follows the f32 goldens (transformers' SmolLM2-135M greedy run).

Run by hand, from the repo root, after a change that is meant to move these numbers (a policy, a
template's rounding points, the reference backend, the quantizer), and commit the result with it:

    .venv/bin/python tests/goldens/make_policy_agreement.py          # ~2 minutes on 2 cores

It uses only our own code (the GGUF importer, the loader, the numpy reference backend running
generated/reference.<policy>.separate) plus the goldens transformers made (smollm2_f32_greedy.json,
smollm2_prompt_logits.npz, see make_goldens.py). It writes policy_agreement.json next to itself;
tests/test_goldens.py recomputes every number with the same `measure` below and fails when a policy
gets worse than pinned. Per policy and prompt it records:

  prefix       how many of the golden greedy new tokens the policy reproduces before its first
               different token, decoding teacher-free from its own tokens (stops at EOS), out of `of`
               (the golden's new tokens, cut at NEW_TOKENS);
  margin       at the last prompt position: logit[golden first token] - max other logit, under the
               policy (how far the golden token wins; negative: the policy's first token differs);
  max_abs_dev  at the last prompt position: max |policy logit - transformers' float32 logit|;
  new_ids      the policy's tokens, and golden_margin_at_divergence: transformers' top-1/top-2 margin
               at the first differing step (a small one means the policies split a near-tie).

The reference backend costs 0.05-0.3 s per token per policy on a 2-core CPU, so to keep CI within its
budget only PROMPTS (a subset of the six golden prompts: a short chat answer that ends in EOS, a chat
prompt with a system message, plain text and code) are run, for NEW_TOKENS new tokens.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dtypeforge.codegen.specs import load_specs  # noqa: E402
from dtypeforge.runtime.generate import generate  # noqa: E402  (needs REPO on sys.path when run as a script)
from dtypeforge.runtime.gguf_import import default_gguf_path, import_gguf  # noqa: E402
from dtypeforge.runtime.loader import pack_weights  # noqa: E402
from dtypeforge.runtime.reference import ReferenceBackend  # noqa: E402
from dtypeforge.runtime.target import find_target, load_target  # noqa: E402

# every shipped policy but the golden's own f32, read from the specs: a policy added in YAML is measured
# and pinned by running this script, with no edit here
POLICIES = tuple(sorted(set(load_specs().policies["llama"]) - {"f32"}))
PROMPTS = (0, 1, 3, 4)          # indices into smollm2_f32_greedy.json's prompts
NEW_TOKENS = 16
DEVICE, LAYOUT = "reference", "separate"
OUT = HERE / "policy_agreement.json"


def load_goldens() -> tuple[dict, dict[int, np.ndarray]]:
    goldens = json.loads((HERE / "smollm2_f32_greedy.json").read_text(encoding="utf-8"))
    with np.load(HERE / "smollm2_prompt_logits.npz") as npz:
        logits = {int(k): npz[k] for k in npz.files}
    return goldens, logits


def model_dir() -> Path:
    """The imported SmolLM2 directory, where tests/conftest.py's smollm2_dir fixture keeps it."""
    gguf = default_gguf_path()
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    out = REPO / ".cache" / f"smollm2-{digest.hexdigest()[:12]}"
    if not (out / "model.safetensors").is_file():
        import_gguf(gguf, out, progress=False, force=True)
    return out


def reference_backend(policy: str, model: Path, max_seq: int) -> ReferenceBackend:
    """generated/reference.<policy>.separate with the model packed for a KV cache of max_seq positions."""
    target = load_target(find_target(DEVICE, policy, LAYOUT))
    return ReferenceBackend(target.manifest, pack_weights(target, model, max_seq=max_seq, progress=False))


class _KeepLogits:
    """Passes prefill and steps through to a backend, keeping the logits at position ``at`` (the
    prompt's last: what prefill returns)."""

    def __init__(self, backend, at: int):
        self.backend, self.at, self.logits = backend, at, None

    def reset(self) -> None:
        self.backend.reset()

    def prefill(self, tokens: list[int], pos: int) -> np.ndarray:
        logits = self.backend.prefill(tokens, pos)
        if pos + len(tokens) - 1 == self.at:
            self.logits = logits
        return logits

    def step(self, token: int, pos: int) -> np.ndarray:
        logits = self.backend.step(token, pos)
        if pos == self.at:
            self.logits = logits
        return logits


def run_prompt(backend, prompt_ids: list[int], new_tokens: int, eos_ids) -> tuple[list[int], np.ndarray]:
    """Greedy new ids (EOS included when it stops) and the logits at the last prompt position."""
    keep = _KeepLogits(backend, len(prompt_ids) - 1)
    new = generate(keep, prompt_ids, new_tokens, eos_ids)
    return new, keep.logits


def measure(backend, record: dict, golden_logits: np.ndarray, eos_ids, new_tokens: int = NEW_TOKENS) -> dict:
    """The numbers policy_agreement.json pins for one prompt (see the module docstring)."""
    new, logits = run_prompt(backend, record["prompt_ids"], new_tokens, eos_ids)
    golden = record["new_ids"][:new_tokens]
    prefix = next((i for i, (a, b) in enumerate(zip(new, golden)) if a != b), min(len(new), len(golden)))
    top1 = golden[0]
    others = np.delete(logits, top1)
    result = {
        "prefix": prefix,
        "of": len(golden),
        "margin": round(float(logits[top1] - others.max()), 5),
        "max_abs_dev": float(f"{np.abs(logits - golden_logits).max():.6g}"),
        "new_ids": [int(t) for t in new],
    }
    if prefix < len(golden):
        result["golden_margin_at_divergence"] = record["top2_margins"][prefix]
    return result


def dumps(obj) -> str:
    """Indented JSON with each list of numbers on one line (as make_goldens.py writes)."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    return re.sub(r"\[[-0-9.e,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="*", default=list(POLICIES))
    ap.add_argument("--prompts", nargs="*", type=int, default=list(PROMPTS),
                    help="prompt indices (other than the default: explore, do not pin)")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from dtypeforge.runtime.tokenizer import HFTokenizer
    goldens, golden_logits = load_goldens()
    records = {r["index"]: r for r in goldens["prompts"]}
    model = model_dir()
    eos_ids = HFTokenizer(model).eos_ids
    max_seq = max(len(records[i]["prompt_ids"]) for i in args.prompts) + args.new_tokens
    policies = {}
    for policy in args.policies:
        t0 = time.perf_counter()
        backend = reference_backend(policy, model, max_seq)
        per_prompt = {str(i): measure(backend, records[i], golden_logits[i], eos_ids, args.new_tokens)
                      for i in args.prompts}
        policies[policy] = {"prompts": per_prompt}
        summary = ", ".join(f"[{i}] {m['prefix']}/{m['of']} margin {m['margin']:+.3f} dev {m['max_abs_dev']:.3g}"
                            for i, m in per_prompt.items())
        print(f"{policy:24s} {time.perf_counter() - t0:5.1f} s  {summary}", flush=True)
    out = {
        "about": "How far each policy (reference backend, separate layout) follows transformers' float32 "
                 "SmolLM2-135M goldens; pinned by tests/test_goldens.py. Made by make_policy_agreement.py.",
        "device": DEVICE,
        "layout": LAYOUT,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "policies": policies,
    }
    args.out.write_text(dumps(out), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
