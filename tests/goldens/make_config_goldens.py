"""Tiny random Llama-family checkpoints, one per config feature, with transformers' greedy decoding of each.

transformers is an implementation we did not write, so its float32 decoding of these checkpoints is the
answer the runtime has to reproduce for RoPE scaling (llama3, linear), rope_theta given only inside
rope_parameters, tied embeddings and a Mistral checkpoint whose math is Llama's; two more checkpoints
(attention bias, GELU) describe math the spec does not have and must be refused. The checkpoints are
small enough to commit (float32, ~0.4 MB each), so tests/test_config_goldens.py needs no torch.

Not run by CI: it needs torch + transformers. Regenerate with the throwaway virtualenv described in
make_goldens.py (CPU torch 2.13, transformers 5.x), from the repo root:

    /tmp/hfvenv/bin/python tests/goldens/make_config_goldens.py        # ~30 s on 2 cores

It replaces tests/goldens/configs/<case>/ for every case with:
  config.json, generation_config.json, model.safetensors   as save_pretrained(safe_serialization=True)
                                                           wrote them (nothing else is kept);
and, for the cases the runtime must run:
  golden.json   versions, the config keys transformers wrote that the case is about, the prompt ids,
                NEW_TOKENS greedy new ids (eager attention, KV cache, no EOS stop), the top-1/top-2
                logit margin of every step (tiny = a float tie another float32 implementation may
                break the other way), transformers' RoPE inverse frequencies, how far the logits
                move when the feature is ignored (so a runtime that ignores it cannot pass), and the
                case's rope keys in the layout transformers 4 wrote (top-level rope_theta,
                rope_scaling), which transformers 5 reads as the same model (checked: equal logits);
  golden.npz    prompt, new_ids, margins (float32), and the float32 logits of the steps in
                `logit_steps` (step k: the logits at position len(prompt) - 1 + k, which chose new_ids[k]).

Before writing a case's goldens it checks: the checkpoint reloaded from disk is the model it saved
(the goldens come from the reloaded one, so they follow config.json as transformers reads it back);
transformers' inverse frequencies equal the published formula for the case (llama3, linear) and differ
from the unscaled ones in several dims; a full forward pass over prompt + new ids gives the cached
generate's logits; the greedy run does not settle into repeating a few tokens; and no step before
position MIN_CLEAN_POSITION (where the test starts tolerating near-ties) is won by less than SAFE_MARGIN.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

HERE = Path(__file__).resolve().parent
OUT = HERE / "configs"

PROMPT = [1, 17, 42, 99, 3, 250, 7, 64]
NEW_TOKENS = 448                 # positions reach len(PROMPT) + NEW_TOKENS - 1 = 455
LOGIT_EVERY = 32                 # logits kept for steps 0, 32, ..., and the last step
NEAR_TIE = 1e-4                  # top-1/top-2 margin below which float32 implementations may disagree
MIN_CLEAN_POSITION = 400         # no near-tie allowed before this position
SAFE_MARGIN = 1e-3               # nor any margin this small: logits of two float32 implementations differ
                                 # by ~1e-5 here, so a golden token should win by far more than that
FORWARD_VS_CACHE_ATOL = 1e-4     # full forward vs cached generate: same math, different summation order
KEPT_FILES = ("config.json", "generation_config.json", "model.safetensors")

COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
    # 0.02 (the default) leaves logits within ~0.5 of each other and greedy decoding cycles through
    # two or three tokens; 0.2 gives logits spread over a few units and a varied greedy run.
    initializer_range=0.2,
)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (config class, config kwargs, seed, the runtime must run it, what it is). Seeds are the first
# that give a greedy run with no top-1/top-2 margin under SAFE_MARGIN (transformers 5.25, torch 2.13).
# The refused cases have one layer: only their config matters, and it keeps the folder near 2.5 MB.
CASES = {
    "llama3": (LlamaConfig, {"rope_parameters": dict(LLAMA3)}, 1, True,
               "llama3 RoPE scaling (theta 500000, factor 8, low/high freq factor 1/4, original context 64)"),
    "linear": (LlamaConfig, {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}, 1, True,
               "linear RoPE scaling (theta 10000, factor 4: positions divided by 4)"),
    "default-theta": (LlamaConfig, {"rope_theta": 100000.0}, 0, True,
                      "unscaled RoPE with theta 100000, which transformers 5 writes only inside rope_parameters"),
    "tied": (LlamaConfig, {"tie_word_embeddings": True}, 1, True,
             "tie_word_embeddings true: no lm_head.weight in the checkpoint"),
    "mistral": (MistralConfig, {"sliding_window": None}, 1, True,
                "MistralForCausalLM without a sliding window: the same math as Llama"),
    "bias": (LlamaConfig, {"attention_bias": True, "num_hidden_layers": 1}, 0, False,
             "attention_bias true (q/k/v/o biases, set to random values): must be refused"),
    "gelu": (LlamaConfig, {"hidden_act": "gelu", "num_hidden_layers": 1}, 0, False, "hidden_act gelu: must be refused"),
}
# config.json keys recorded per case: the ones these features live in
RECORDED_KEYS = ("architectures", "model_type", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
                 "attention_bias", "mlp_bias", "hidden_act", "sliding_window", "head_dim", "max_position_embeddings",
                 "bos_token_id", "eos_token_id", "dtype", "torch_dtype")


def dumps(obj) -> str:
    """Indented JSON, but each list of numbers on one line, so the goldens stay readable and diffable."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    return re.sub(r"\[[-0-9.e,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def llama3_inv_freq(p: dict, head_dim: int) -> np.ndarray:
    """Meta's Llama 3.1 frequency scaling, written from its reference code, not from transformers':
    wavelengths shorter than original_context / high_freq_factor are kept, longer than
    original_context / low_freq_factor divided by factor, and the band between interpolated smoothly."""
    inv = default_inv_freq(p["rope_theta"], head_dim)
    ctx = p["original_max_position_embeddings"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < ctx / p["high_freq_factor"]:
            out.append(f)
        elif wavelen > ctx / p["low_freq_factor"]:
            out.append(f / p["factor"])
        else:
            smooth = (ctx / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
            out.append((1 - smooth) * f / p["factor"] + smooth * f)
    return np.array(out)


def expected_inv_freq(rope: dict, head_dim: int) -> np.ndarray:
    kind = rope.get("rope_type", "default")
    if kind == "llama3":
        return llama3_inv_freq(rope, head_dim)
    if kind == "linear":
        return default_inv_freq(rope["rope_theta"], head_dim) / rope["factor"]
    assert kind == "default", kind
    return default_inv_freq(rope["rope_theta"], head_dim)


def build(name: str) -> torch.nn.Module:
    cls, kwargs, seed, _, _ = CASES[name]
    torch.manual_seed(seed)
    config = cls(**(COMMON | copy.deepcopy(kwargs)))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        # transformers initializes RMSNorm weights to 1 and biases to 0; random values make a runtime
        # that drops a norm's gamma, or a bias, produce different logits
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(COMMON["initializer_range"] * torch.randn_like(p))
    return model


def save(name: str, model: torch.nn.Module) -> Path:
    """save_pretrained into configs/<name>/, keeping only the checkpoint files."""
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        written = sorted(p.name for p in Path(tmp).iterdir())
        for f in KEPT_FILES:
            if (Path(tmp) / f).is_file():
                shutil.copy(Path(tmp) / f, out / f)
    print(f"  save_pretrained wrote {written}")
    return out


def reload(out: Path, saved: torch.nn.Module) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    a, b = saved.state_dict(), model.state_dict()
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        raise SystemExit(f"{out}: the reloaded checkpoint's weights differ from the saved model's")
    return model


def rope_of(config) -> dict:
    return dict(config.rope_parameters)


def check_inv_freq(name: str, model: torch.nn.Module) -> dict:
    """transformers' inverse frequencies against the published formula; scaled cases must differ from
    the unscaled frequencies (same theta) in several dims, or the goldens would not test the scaling."""
    rope, hd = rope_of(model.config), model.config.head_dim
    ours = model.model.rotary_emb.inv_freq.double().numpy()
    want = expected_inv_freq(rope, hd)
    rel = np.abs(ours - want) / want
    if rel.max() > 1e-6:
        raise SystemExit(f"{name}: transformers' inv_freq {ours} != formula {want} (max rel diff {rel.max():.3g})")
    unscaled = default_inv_freq(rope["rope_theta"], hd)
    changed = int((np.abs(ours / unscaled - 1) > 0.01).sum())
    if rope["rope_type"] != "default" and changed < 3:
        raise SystemExit(f"{name}: only {changed} of {hd // 2} inverse frequencies differ from the unscaled ones")
    scaling = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
    if scaling != 1.0:
        raise SystemExit(f"{name}: attention_scaling {scaling}; the runtime's RoPE applies none")
    print(f"  inv_freq {np.array2string(ours, precision=4)}; {changed} of {hd // 2} dims differ from unscaled")
    return {"transformers": ours.tolist(), "unscaled_same_theta": unscaled.tolist(), "dims_changed_by_scaling": changed}


def greedy(model: torch.nn.Module) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             use_cache=True, output_logits=True, return_dict_in_generate=True,
                             eos_token_id=None, pad_token_id=0)
    new = out.sequences[0, len(PROMPT):].tolist()
    if len(new) != NEW_TOKENS:
        raise SystemExit(f"generate stopped after {len(new)} of {NEW_TOKENS} new tokens")
    return new, torch.stack([step[0] for step in out.logits]).float()


def forward_logits(model: torch.nn.Module, new: list[int]) -> torch.Tensor:
    """Logits of every step from one full (uncached) forward pass over prompt + new ids (teacher forcing)."""
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + new[:-1]]), use_cache=False).logits[0].float()
    return logits[len(PROMPT) - 1:]


def variant(model: torch.nn.Module, rope: dict) -> torch.nn.Module:
    """The same weights with other RoPE parameters: what a runtime that misreads the config computes."""
    config = copy.deepcopy(model.config)
    config.rope_parameters = rope
    other = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    other.load_state_dict(model.state_dict())
    return other


def misreadings(model: torch.nn.Module) -> dict[str, dict]:
    """The RoPE parameters a runtime that ignores this case's feature would use instead."""
    rope = rope_of(model.config)
    out = {}
    if rope["rope_type"] != "default":
        out["scaling ignored"] = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    if rope["rope_theta"] != 10000.0:
        out["theta 10000 (rope_parameters ignored)"] = {"rope_type": "default", "rope_theta": 10000.0}
    return out


def effect(model: torch.nn.Module, new: list[int], golden: torch.Tensor, rope: dict, steps: list[int]) -> dict:
    wrong = forward_logits(variant(model, rope), new)
    moved = (wrong - golden).abs().max(dim=1).values
    flips = (wrong.argmax(dim=1) != torch.tensor(new)).nonzero().flatten().tolist()
    return {"rope_parameters": rope,
            "max_abs_logit_diff_at_logit_steps": float(moved[steps].max()),
            "max_abs_logit_diff_all_steps": float(moved.max()),
            "first_step_whose_argmax_changes": flips[0] if flips else None,
            "steps_whose_argmax_changes": len(flips)}


def record(name: str, model: torch.nn.Module, out: Path) -> dict:
    new, logits = greedy(model)
    top = logits.topk(2, dim=1).values
    margins = (top[:, 0] - top[:, 1]).numpy().astype(np.float32)
    full = forward_logits(model, new)
    forward_diff = float((full - logits).abs().max())
    if forward_diff > FORWARD_VS_CACHE_ATOL:
        raise SystemExit(f"{name}: full forward and cached generate logits differ by {forward_diff:.3g}")
    if full.argmax(dim=1).tolist() != new:
        raise SystemExit(f"{name}: full forward argmax differs from the cached greedy tokens")
    distinct_all, distinct_tail = len(set(new)), len(set(new[-128:]))
    if distinct_all < 32 or distinct_tail < 16:
        raise SystemExit(f"{name}: greedy run repeats itself ({distinct_all} distinct tokens, {distinct_tail} in "
                         f"the last 128); raise initializer_range or change the case's seed")
    ties = [k for k, m in enumerate(margins) if m < NEAR_TIE]
    first_tie_pos = len(PROMPT) - 1 + ties[0] if ties else None
    if ties and first_tie_pos < MIN_CLEAN_POSITION:
        raise SystemExit(f"{name}: near-tie (margin {margins[ties[0]]:.3g}) at position {first_tie_pos} < "
                         f"{MIN_CLEAN_POSITION}; change the case's seed")
    early = margins[:MIN_CLEAN_POSITION - len(PROMPT) + 1]
    if early.min() < SAFE_MARGIN:
        raise SystemExit(f"{name}: margin {early.min():.3g} at step {int(early.argmin())} < {SAFE_MARGIN}; "
                         f"change the case's seed")
    steps = sorted(set(range(0, NEW_TOKENS, LOGIT_EVERY)) | {NEW_TOKENS - 1})
    effects = {what: effect(model, new, logits, rope, steps) for what, rope in misreadings(model).items()}
    for what, e in effects.items():
        print(f"  {what}: logits move by up to {e['max_abs_logit_diff_at_logit_steps']:.3g} at the kept steps, "
              f"argmax changes at {e['steps_whose_argmax_changes']} steps, first at {e['first_step_whose_argmax_changes']}")
    np.savez_compressed(out / "golden.npz", prompt=np.array(PROMPT, np.int64), new_ids=np.array(new, np.int64),
                        margins=margins, logit_steps=np.array(steps, np.int64), logits=logits[steps].numpy())
    print(f"  {len(new)} new ids, {distinct_all} distinct; min margin {margins.min():.3g} at step "
          f"{int(margins.argmin())}; near-ties (< {NEAR_TIE}) at steps {ties}; forward vs cache {forward_diff:.3g}; "
          f"logit scale {float(logits.abs().max()):.3g}")
    return {"prompt_ids": PROMPT, "new_tokens": NEW_TOKENS, "new_ids": new,
            "top2_margins": [float(f"{m:.6g}") for m in margins],
            "min_margin": float(margins.min()), "near_tie_threshold": NEAR_TIE, "near_tie_steps": ties,
            "logit_steps": steps, "logit_positions": [len(PROMPT) - 1 + s for s in steps],
            "max_abs_logit": float(logits.abs().max()),
            "full_forward_vs_cached_generate_max_abs_diff": forward_diff,
            "if_misread": effects}


def legacy_layout(config: dict) -> dict:
    """config.json as transformers 4 wrote it (and published Llama 3.x checkpoints still carry it):
    rope_theta at the top level, the scaling, if any, in rope_scaling; linear in its oldest spelling,
    {"type": "linear"}."""
    rope = dict(config["rope_parameters"])
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    legacy["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    legacy["rope_scaling"] = (None if kind == "default" else {"type": kind, **rope} if kind == "linear"
                              else {**rope, "rope_type": kind})
    return legacy


def check_legacy(name: str, out: Path, model: torch.nn.Module, new: list[int]) -> dict:
    """transformers reads the legacy layout of this case's config as the same model: equal inverse
    frequencies and equal logits, so the test may demand the runtime's output not change either."""
    legacy = legacy_layout(json.loads((out / "config.json").read_text(encoding="utf-8")))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(legacy, indent=2), encoding="utf-8")
        shutil.copy(out / "model.safetensors", Path(tmp) / "model.safetensors")
        other = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager", dtype=torch.float32).eval()
    same_freq = torch.equal(other.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    diff = float((forward_logits(other, new) - forward_logits(model, new)).abs().max())
    print(f"  legacy layout rope_theta={legacy['rope_theta']!r} rope_scaling={legacy['rope_scaling']!r}: "
          f"same inv_freq {same_freq}, max logit diff {diff:.3g}")
    if not same_freq or diff != 0.0:
        raise SystemExit(f"{name}: transformers reads the legacy layout as a different model")
    return {"rope_theta": legacy["rope_theta"], "rope_scaling": legacy["rope_scaling"],
            "transformers_max_abs_logit_diff": diff}


def main() -> None:
    versions = {pkg: importlib.metadata.version(pkg) for pkg in ("torch", "transformers", "safetensors", "numpy")}
    print(f"versions {versions}")
    for name, (cls, kwargs, seed, runs, what) in CASES.items():
        print(f"[{name}] {what}")
        out = save(name, build(name))
        model = reload(out, build(name))
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
        print("  config.json: " + ", ".join(f"{k}={config[k]!r}" for k in RECORDED_KEYS if k in config))
        with safe_open(out / "model.safetensors", framework="pt") as f:
            tensors = sorted(f.keys())
        if name == "tied" and "lm_head.weight" in tensors:
            raise SystemExit("tied: save_pretrained kept lm_head.weight")
        if not runs:
            continue
        golden = {"case": name, "what": what, "versions": versions, "seed": seed,
                  "built_with": {"class": cls.__name__, "common": COMMON, "kwargs": kwargs,
                                 "attn_implementation": "eager", "dtype": "float32"},
                  "config_json": {k: config[k] for k in RECORDED_KEYS if k in config},
                  "config_json_has_top_level_rope_theta": "rope_theta" in config,
                  "tensors": tensors,
                  "inv_freq": check_inv_freq(name, model)}
        golden |= record(name, model, out)
        golden["legacy_layout"] = check_legacy(name, out, model, golden["new_ids"])
        (out / "golden.json").write_text(dumps(golden), encoding="utf-8")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
