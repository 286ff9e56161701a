"""Llama-family config features against transformers' float32 decoding of tiny random checkpoints (CPU only).

The checkpoints and goldens in goldens/configs/ were written by goldens/make_config_goldens.py with
transformers (see goldens/configs/README.md); this file needs only numpy. Each accepted case is packed once
for generated/llama.reference.f32.fused and decoded on the numpy reference backend:

- greedy decoding from the golden prompt reproduces transformers' 448 new tokens (positions up to 455,
  7x the llama3 case's original context of 64), up to the first step transformers won by less than
  NEAR_TIE, which has to lie past position 400 (the current goldens have none);
- teacher-forced on transformers' tokens, every step's argmax is transformers' token (bar near-ties),
  every step's top-1/top-2 margin and the full logits at the recorded steps are transformers' within
  LOGIT_ATOL;
- each case also runs with config.json rewritten in the layout transformers 4 wrote (top-level
  rope_theta, rope_scaling), which transformers reads as the same model; the runtime must too.

The attention-bias and GELU checkpoints describe math the spec does not compute and must be refused by
name, as must a config.json whose num_hidden_layers disagrees with the checkpoint's tensors.
The checkpoints have no tokenizer, so everything is driven by token ids.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dtypeforge.runtime.generate import generate
from dtypeforge.runtime.loader import pack_weights
from dtypeforge.runtime.reference import ReferenceBackend
from dtypeforge.runtime.target import LoadError, find_target, load_target

CONFIGS = Path(__file__).resolve().parent / "goldens" / "configs"
ACCEPTED = ("llama3", "linear", "default-theta", "tied", "mistral")
REFUSED = {"bias": ("attention_bias", "true"), "gelu": ("hidden_act", "gelu")}   # key, its value as JSON spells it

# A step transformers won by less than this may go the other way in another float32 implementation.
NEAR_TIE = 1e-4
# Greedy runs must agree at least this far (a position, counting the prompt from 0) before a near-tie may end
# the comparison: the llama3 case's scaling changes 7 of 8 frequencies, visible well before here.
MIN_AGREED_POSITION = 400
# f32 reference vs transformers: the logits differ only by summation order and ulp-level differences in
# the RoPE table; measured max |diff| over the recorded steps 7.6e-6 .. 3.5e-5 (largest: default-theta),
# top-2 margins within 3.5e-5 at every step, max |logit| 7.2 .. 7.8 in every case. The bound is ~15x the
# worst of those; reading a case's feature wrongly moves logits by >= 6 (golden.json: if_misread).
LOGIT_ATOL = 5e-4


def load_golden(case: str) -> tuple[dict, dict[str, np.ndarray]]:
    golden = json.loads((CONFIGS / case / "golden.json").read_text(encoding="utf-8"))
    with np.load(CONFIGS / case / "golden.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return golden, arrays


@pytest.fixture(scope="module")
def target():
    return load_target(find_target("reference", "f32", "fused"))


def backend(target, model_dir: Path, n_positions: int) -> ReferenceBackend:
    return ReferenceBackend(target.manifest, pack_weights(target, model_dir, max_seq=n_positions, progress=False))


def teacher_forced(be: ReferenceBackend, prompt: list[int], new_ids: list[int]) -> np.ndarray:
    """float32[len(new_ids), vocab]: row k is the logits that choose new token k, feeding transformers'
    tokens rather than our own, so one differing step cannot derail the rest."""
    be.reset()
    rows = []
    for pos, tok in enumerate(prompt + new_ids[:-1]):
        logits = be.step(tok, pos)
        if pos >= len(prompt) - 1:
            rows.append(logits)
    return np.stack(rows)


def margins(logits: np.ndarray) -> np.ndarray:
    top = np.sort(logits, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


@dataclass
class Run:
    case: str
    golden: dict
    arrays: dict[str, np.ndarray]
    new_ids: list[int]          # our free-running greedy tokens
    forced: np.ndarray          # our teacher-forced logits, one row per golden step


@pytest.fixture(scope="module", params=ACCEPTED)
def run(request, target) -> Run:
    case = request.param
    golden, arrays = load_golden(case)
    prompt, n_new = golden["prompt_ids"], golden["new_tokens"]
    be = backend(target, CONFIGS / case, len(prompt) + n_new)
    new = generate(be, prompt, n_new)
    return Run(case, golden, arrays, new, teacher_forced(be, prompt, golden["new_ids"]))


# ---- the goldens themselves (no runtime involved) ----

@pytest.mark.parametrize("case", ACCEPTED)
def test_goldens_are_well_formed(case):
    """The goldens test what they claim: long enough, no early near-tie, and every way of misreading the
    case's feature moves the logits far beyond LOGIT_ATOL and changes greedy tokens."""
    golden, arrays = load_golden(case)
    prompt, new, n_new = golden["prompt_ids"], golden["new_ids"], golden["new_tokens"]
    assert arrays["prompt"].tolist() == prompt and arrays["new_ids"].tolist() == new and len(new) == n_new
    assert len(prompt) + n_new - 1 > MIN_AGREED_POSITION
    np.testing.assert_allclose(arrays["margins"], golden["top2_margins"], rtol=1e-5)
    steps = arrays["logit_steps"].tolist()
    assert steps == golden["logit_steps"] and steps[0] == 0 and steps[-1] == n_new - 1
    assert arrays["logits"].shape == (len(steps), 256) and arrays["logits"].dtype == np.float32
    assert arrays["logits"].argmax(axis=1).tolist() == [new[s] for s in steps]
    ties = np.flatnonzero(arrays["margins"] < NEAR_TIE)
    assert not ties.size or len(prompt) - 1 + ties[0] >= MIN_AGREED_POSITION
    assert len(set(new[-128:])) >= 16, "the greedy run repeats a few tokens"
    for what, e in golden["if_misread"].items():
        assert e["max_abs_logit_diff_at_logit_steps"] > 1000 * LOGIT_ATOL, what
        assert e["steps_whose_argmax_changes"] > 0, what


def test_transformers_config_layout():
    """What transformers 5 writes: rope_theta and any scaling only inside rope_parameters, never at the top
    level or in rope_scaling, so a runtime reading only the transformers 4 keys silently runs theta 10000."""
    configs = {p.name: json.loads((p / "config.json").read_text(encoding="utf-8"))
               for p in sorted(CONFIGS.iterdir()) if p.is_dir()}
    assert set(configs) == set(ACCEPTED) | set(REFUSED)
    for case, c in configs.items():
        assert "rope_theta" not in c and "rope_scaling" not in c, case
        assert c["head_dim"] == 16 and c["max_position_embeddings"] == 1024, case
    rope = {case: c["rope_parameters"] for case, c in configs.items()}
    assert rope["llama3"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert rope["linear"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert rope["default-theta"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert configs["tied"]["tie_word_embeddings"] is True
    assert configs["mistral"]["architectures"] == ["MistralForCausalLM"] and configs["mistral"]["sliding_window"] is None
    assert configs["bias"]["attention_bias"] is True and configs["gelu"]["hidden_act"] == "gelu"
    assert "lm_head.weight" not in load_golden("tied")[0]["tensors"]


# ---- the reference runtime against transformers ----

def test_greedy_matches_transformers(run):
    """Every token, or every token before transformers' first near-tie step (which lies past position
    MIN_AGREED_POSITION, see test_goldens_are_well_formed): from there on either choice is right."""
    golden, prompt = run.golden, run.golden["prompt_ids"]
    ours, theirs = run.new_ids, golden["new_ids"]
    assert len(ours) == len(theirs)
    ties = np.flatnonzero(run.arrays["margins"] < NEAR_TIE)
    checked = int(ties[0]) if ties.size else len(theirs)
    diff = next((k for k in range(checked) if ours[k] != theirs[k]), None)
    if diff is not None:
        pytest.fail(f"{run.case}: greedy tokens differ from transformers' at new token {diff} (position "
                    f"{len(prompt) + diff - 1}; transformers' top-1/top-2 margin there "
                    f"{golden['top2_margins'][diff]:.3g})\n  ours   {ours[max(0, diff - 4):diff + 8]}\n"
                    f"  golden {theirs[max(0, diff - 4):diff + 8]}")


def test_teacher_forced_steps_match_transformers(run):
    """All 448 steps, each from transformers' context: argmax (where not a near-tie) and top-2 margin."""
    golden = run.golden
    want = np.array(golden["new_ids"])
    clear = run.arrays["margins"] >= NEAR_TIE
    wrong = np.flatnonzero((run.forced.argmax(axis=1) != want) & clear)
    assert not wrong.size, (f"{run.case}: teacher-forced argmax differs from transformers at {wrong.size} steps, "
                            f"first {wrong[0]} (position {len(golden['prompt_ids']) + wrong[0] - 1})")
    dev = np.abs(margins(run.forced) - run.arrays["margins"])
    assert dev.max() <= 2 * LOGIT_ATOL, (f"{run.case}: top-1/top-2 margin differs from transformers' by "
                                         f"{dev.max():.3g} at step {int(dev.argmax())}")


def test_logits_match_transformers(run):
    steps = run.arrays["logit_steps"]
    ours, theirs = run.forced[steps], run.arrays["logits"]
    diff = np.abs(ours - theirs).max(axis=1)
    worst = int(diff.argmax())
    assert diff.max() <= LOGIT_ATOL, (
        f"{run.case}: max |logit - transformers'| {diff.max():.3g} at step {steps[worst]} (position "
        f"{len(run.golden['prompt_ids']) + steps[worst] - 1}; max |logit| {np.abs(theirs).max():.3g}); "
        f"per recorded step: {np.array2string(diff, precision=2)}")


def test_legacy_rope_layout_runs_the_same_model(target, run, tmp_path):
    """config.json in the transformers 4 layout (top-level rope_theta; rope_scaling with rope_type, with
    type for linear, or null) gives bit-identical logits: transformers reads both as one model."""
    golden = run.golden
    config = json.loads((CONFIGS / run.case / "config.json").read_text(encoding="utf-8"))
    del config["rope_parameters"]
    legacy = golden["legacy_layout"]
    config["rope_theta"], config["rope_scaling"] = legacy["rope_theta"], legacy["rope_scaling"]
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    shutil.copy(CONFIGS / run.case / "model.safetensors", tmp_path / "model.safetensors")
    prompt = golden["prompt_ids"]
    be = backend(target, tmp_path, len(prompt) + golden["new_tokens"])
    forced = teacher_forced(be, prompt, golden["new_ids"])
    assert np.array_equal(forced, run.forced), (
        f"{run.case}: rope_theta={legacy['rope_theta']} rope_scaling={legacy['rope_scaling']} gives logits up to "
        f"{np.abs(forced - run.forced).max():.3g} away from the rope_parameters layout's")


# ---- what must be refused ----

@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_math_is_refused(case, target):
    key, value = REFUSED[case]
    with pytest.raises(LoadError) as info:
        pack_weights(target, CONFIGS / case, max_seq=64, progress=False)
    message = str(info.value)
    assert key in message and value in message, message
    assert "\n" not in message


def test_layer_count_disagreeing_with_checkpoint_is_refused(target, tmp_path):
    """config.json says 1 layer, the checkpoint has 2: packing only layer 0 would run a different model."""
    config = json.loads((CONFIGS / "llama3" / "config.json").read_text(encoding="utf-8"))
    assert config["num_hidden_layers"] == 2
    config["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    shutil.copy(CONFIGS / "llama3" / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="num_hidden_layers"):
        pack_weights(target, tmp_path, max_seq=64, progress=False)


@pytest.mark.parametrize("case", ACCEPTED)
def test_rope_table_is_transformers_bit_for_bit(case, target):
    """The per-pair inverse frequencies the loader computes equal the ones transformers computed for the
    same config (recorded by the golden script), default, linear and llama3 alike."""
    golden = json.loads((CONFIGS / case / "golden.json").read_text())
    packed = pack_weights(target, CONFIGS / case, max_seq=16, progress=False)
    want = np.array(golden["inv_freq"]["transformers"], dtype=np.float32)
    assert np.array_equal(packed.arrays["rope_freq"], want), (packed.arrays["rope_freq"], want)
