"""runtime.loader packs a synthetic HF Llama checkpoint exactly as packing.json says.

Expected values are computed here from the checkpoint read independently (safetensors /
raw bytes + numpy/ml_dtypes widening, which is exact) and the shared converters, so a
loader that reads, concatenates, ties or converts the wrong thing fails. Every error case
checks that the message names the file/tensor and the expected and found values.
"""
from __future__ import annotations

import json
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
from conftest import as_json
from safetensors.numpy import load_file, save_file

from dtypeforge.codegen.contract import Tie, load_packing

from dtypeforge.codegen.dtypes import DTYPES, from_storage, quantize_per_output_channel, to_storage
from dtypeforge.codegen.expr import evaluate
from dtypeforge.codegen.specs import load_specs
from dtypeforge.runtime import loader
from dtypeforge.runtime.loader import (ConfigError, CorruptCheckpointError, LoadError, MissingFileError, MissingTensorError,
                            ShapeMismatchError, SourceDTypeError, load_checkpoint, pack_weights)
from dtypeforge.runtime.synth import write_synthetic_model
from dtypeforge.runtime.target import GENERATED, Target, TargetNotFound, find_target, load_target, model_env

POLICIES = sorted(load_specs().policies["llama"])     # every shipped policy, a new YAML one included
LAYOUTS = ["separate", "fused"]
QMAX = {"int8": 127.0, "fp8e4m3": 448.0}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("tiny") / "model", tied=True)


@pytest.fixture(scope="session")
def tiny_sources(tiny):
    return load_file(tiny / "model.safetensors")


@pytest.fixture
def model(tiny, tmp_path):
    """A private copy of the tiny model to break."""
    return shutil.copytree(tiny, tmp_path / "model")


def target(policy, layout="separate"):
    return load_target(find_target("reference", policy, layout))


def rewrite(model_dir, mutate):
    tensors = load_file(model_dir / "model.safetensors")
    mutate(tensors)
    save_file(tensors, model_dir / "model.safetensors")


def edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def concrete(entry, env):
    """(layer index or None, name, sources) for each instance of a packing entry, ties resolved."""
    tied = entry.tied_to
    for i in range(env["n_layers"]) if entry.per_layer else [None]:
        fill = (lambda s: s.replace("{i}", str(i)))
        sources = [tied.source] if tied and env[tied.when] else [s.name for s in entry.sources]
        yield i, fill(entry.name), [fill(s) for s in sources]


def _with_packing(t: Target, packing: dict) -> Target:
    """``t`` with an edited packing.json, loaded through the contract."""
    return Target(t.path, t.manifest, load_packing(packing, "edited packing.json"))


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


# ---------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", POLICIES)
def test_packs_every_entry_exactly(tiny, tiny_sources, policy, layout):
    t = target(policy, layout)
    packed = pack_weights(t, tiny, progress=False)
    env = packed.env     # RoPE's table is computed, not read (its bits are transformers', test_config_goldens.py)
    hd = env["head_dim"]
    table = (env["rope_theta"] ** -(np.arange(0, hd, 2) / hd)).astype(np.float32)
    assert np.allclose(packed.arrays["rope_freq"], table, rtol=3e-7, atol=0)
    sources_of = {**tiny_sources, "rope_inv_freq": packed.arrays["rope_freq"]}
    expected_names = set()
    for entry in t.packing.weights:
        for i, name, sources in concrete(entry, packed.env):
            arr = packed.arrays[name]
            shape = tuple(evaluate(e, packed.env) for e in entry.shape)
            assert arr.dtype == DTYPES[entry.dtype].np_dtype and arr.shape == shape, name
            src = np.concatenate([sources_of[s] for s in sources], axis=0)
            assert src.shape == shape
            expected_names.add(name)
            if not entry.scale:
                assert np.array_equal(bits(arr), bits(to_storage(src, entry.dtype))), name
                continue
            scale_name = entry.scale.name.replace("{i}", str(i))
            expected_names.add(scale_name)
            scale = packed.arrays[scale_name]
            assert scale.dtype == DTYPES[entry.scale.dtype].np_dtype and scale.shape == (shape[0],)
            q, s = quantize_per_output_channel(src, entry.dtype, entry.scale.dtype)
            assert np.array_equal(bits(arr), bits(q)) and np.array_equal(from_storage(scale, entry.scale.dtype), s)
            # independent of the shared quantizer: each row dequantizes to within half a step
            s = from_storage(scale, entry.scale.dtype)[:, None].astype(np.float64)
            deq = from_storage(arr, entry.dtype).astype(np.float64) * s
            err = np.abs(deq - src)
            if entry.dtype == "int8":
                bound = 0.5 * s
            else:   # 3 mantissa bits: half an ulp is 2**-4 relative; subnormal step is 2**-9 of the scale
                bound = np.maximum(np.abs(src) * 2.0 ** -4, s * 2.0 ** -10)
            assert np.all(err <= bound * (1 + 1e-6)), name
            assert np.allclose(s[:, 0], np.abs(src).max(axis=1) / QMAX[entry.dtype], rtol=1e-6)
    assert set(packed.arrays) == expected_names


@pytest.mark.parametrize("policy", POLICIES)
def test_tied_lm_head_shares_the_embedding_array(tiny, tiny_sources, policy):
    t = target(policy)
    lm_head = next(e for e in t.packing.weights if e.name == "lm_head")
    assert lm_head.tied_to == Tie(source="model.embed_tokens.weight", when="tie_embeddings")
    packed = pack_weights(t, tiny, progress=False)
    assert packed.env["tie_embeddings"] is True
    assert packed.arrays["lm_head"] is packed.arrays["embed"]
    assert not packed.arrays["embed"].flags.writeable
    assert np.array_equal(bits(packed.arrays["lm_head"]),
                          bits(to_storage(tiny_sources["model.embed_tokens.weight"], lm_head.dtype)))


def test_tied_lm_head_with_another_dtype_gets_its_own_array(tiny, tiny_sources):
    t = target("f16")
    packing = as_json(t.packing)
    lm = next(e for e in packing["weights"] if e["name"] == "lm_head")
    lm["dtype"], lm["transforms"] = "f32", [{"op": "cast", "dtype": "f32"}]
    packed = pack_weights(_with_packing(t, packing), tiny, progress=False)
    assert packed.arrays["lm_head"] is not packed.arrays["embed"]
    assert packed.arrays["embed"].dtype == np.float16
    assert np.array_equal(packed.arrays["lm_head"], tiny_sources["model.embed_tokens.weight"])


def test_untied_lm_head_comes_from_lm_head_weight(model, tiny_sources):
    lm = np.random.default_rng(1).standard_normal(tiny_sources["model.embed_tokens.weight"].shape, dtype=np.float32)
    rewrite(model, lambda t: t.update({"lm_head.weight": lm}))
    edit_config(model, tie_word_embeddings=False)
    packed = pack_weights(target("f16"), model, progress=False)
    assert packed.arrays["lm_head"] is not packed.arrays["embed"]
    assert np.array_equal(bits(packed.arrays["lm_head"]), bits(to_storage(lm, "f16")))


def test_tied_model_ignores_a_stored_lm_head(model, tiny_sources):
    """transformers ties the weights when tie_word_embeddings is true, whatever lm_head.weight holds."""
    rewrite(model, lambda t: t.update({"lm_head.weight": np.zeros_like(t["model.embed_tokens.weight"])}))
    packed = pack_weights(target("f32"), model, progress=False)
    assert np.array_equal(packed.arrays["lm_head"], tiny_sources["model.embed_tokens.weight"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_checkpoint_packs_identically(tiny, tmp_path, layout):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(tiny / "config.json", sharded)
    tensors = load_file(tiny / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, sharded / file)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))
    t = target("int8-weights", layout)
    one, two = pack_weights(t, tiny, progress=False), pack_weights(t, sharded, progress=False)
    assert one.arrays.keys() == two.arrays.keys() and one.env == two.env
    for name, arr in one.arrays.items():
        assert arr.dtype == two.arrays[name].dtype and np.array_equal(bits(arr), bits(two.arrays[name])), name


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_sources_widen_exactly(tmp_path, dtype):
    d = write_synthetic_model(tmp_path / dtype, dtype=dtype)
    with open(d / "model.safetensors", "rb") as f:     # decode the raw bytes independently of the loader
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    h = header["model.embed_tokens.weight"]
    assert h["dtype"] == {"f16": "F16", "bf16": "BF16"}[dtype]
    raw = np.frombuffer(data[slice(*h["data_offsets"])], dtype={"f16": np.float16, "bf16": ml_dtypes.bfloat16}[dtype])
    embed = raw.astype(np.float32).reshape(h["shape"])
    packed = pack_weights(target("f32"), d, progress=False)
    assert np.array_equal(packed.arrays["embed"], embed)
    assert packed.arrays["embed"].dtype == np.float32
    assert np.array_equal(load_checkpoint(d).read("model.embed_tokens.weight"), embed)


def test_progress_bar_goes_to_stderr(tiny, capsys):
    pack_weights(target("f16"), tiny, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "packing llama.reference.f16.separate" in err
    pack_weights(target("f16"), tiny, progress=False)
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------------------------- targets, config

def test_find_target_lists_the_devices_targets_when_absent(tmp_path):
    assert find_target("h100", "int8-weights", "fused") == GENERATED / "llama.h100.int8-weights.fused"
    with pytest.raises(TargetNotFound) as e:
        find_target("h100", "int9-weights")
    assert "h100.int9-weights.separate" in str(e.value) and "llama.h100.int8-weights.fused" in str(e.value)
    with pytest.raises(TargetNotFound, match="no targets for device 'h999'.*devices with targets: .*h100"):
        find_target("h999", "f16")


def test_load_target_refuses_a_stale_half(tmp_path):
    src = find_target("reference", "f16")
    shutil.copytree(src, tmp_path / "t")
    packing = json.loads((tmp_path / "t/packing.json").read_text())
    packing["inputs"] = "sha256:0000000000000000"
    (tmp_path / "t/packing.json").write_text(json.dumps(packing))
    with pytest.raises(LoadError, match="manifest.json has inputs 'sha256:[0-9a-f]+' but packing.json has 'sha256:0+'"):
        load_target(tmp_path / "t")


def test_model_env_defaults_in_dependency_order_and_max_seq_cap(tiny):
    m = target("f16").manifest
    cfg = json.loads((tiny / "config.json").read_text())
    env = model_env(m, cfg, "config.json")
    assert env == {"hidden": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "intermediate": 128,
                   "vocab": 512, "max_seq": 256, "rms_eps": 1e-5, "rope_theta": 10000.0, "tie_embeddings": True,
                   "chunk": 64}      # the reference device's prefill_chunk
    bare = {k: v for k, v in cfg.items() if k not in ("num_key_value_heads", "rms_norm_eps", "rope_theta",
                                                      "tie_word_embeddings")}
    bare["head_dim"] = None          # null means "derive it", as in transformers
    env = model_env(m, bare, "config.json")
    assert (env["n_kv_heads"], env["head_dim"], env["rms_eps"], env["rope_theta"], env["tie_embeddings"]) == \
        (4, 16, 1e-6, 10000.0, False)
    assert isinstance(model_env(m, {**cfg, "rope_theta": 500000}, "c")["rope_theta"], float)
    assert model_env(m, cfg, "c", max_seq=100)["max_seq"] == 100
    assert model_env(m, cfg, "c", max_seq=40)["chunk"] == 40      # the prefill buffers never exceed the context
    assert model_env(m, cfg, "c", max_seq=10_000)["max_seq"] == 256
    with pytest.raises(ConfigError, match="max_seq cap must be a positive int, found 0"):
        model_env(m, cfg, "c", max_seq=0)


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": ...}, r"config\.json: missing key hidden_size \(symbol hidden, int\), which has no default"),
    ({"hidden_size": "64"}, r"config\.json: hidden_size \(symbol hidden\) must be int, found '64'"),
    ({"num_hidden_layers": 2.0}, r"config\.json: num_hidden_layers \(symbol n_layers\) must be int, found 2\.0"),
    ({"num_hidden_layers": True}, r"num_hidden_layers \(symbol n_layers\) must be int, found True"),
    ({"tie_word_embeddings": "true"}, r"tie_word_embeddings \(symbol tie_embeddings\) must be bool, found 'true'"),
    ({"rms_norm_eps": "1e-5"}, r"rms_norm_eps \(symbol rms_eps\) must be float, found '1e-5'"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers \(symbol n_layers\) must be a positive int, found 0"),
    ({"num_attention_heads": 100, "head_dim": ...},
     r"head_dim is absent and its default hidden // n_heads gives 0; symbol head_dim must be a positive int"),
    ({"head_dim": 15}, r"head_dim is 15; RoPE rotates pairs of dims, so it must be even"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3},
     r"num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)"),
    ({"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": ...},
     r"hidden_size \(64\) is not divisible by num_attention_heads \(6\) and no head_dim is given"),
    ({"architectures": ["Qwen2ForCausalLM"]}, r"architectures is \['Qwen2ForCausalLM'\]; .*LlamaForCausalLM, MistralForCausalLM"),
    ({"attention_bias": True}, r"attention_bias is true; the llama spec computes absent or false"),
    ({"mlp_bias": True}, r"mlp_bias is true; the llama spec computes absent or false"),
    ({"hidden_act": "gelu"}, r'hidden_act is "gelu"; the llama spec computes absent or "silu"'),
    ({"sliding_window": 16}, r"sliding_window is 16; .*or at least max_seq \(256 for this run\)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling\.rope_type is 'yarn'; supported RoPE types: default, linear, llama3"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling\.rope_type is 'dynamic'"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling\.factor is None; RoPE type linear needs a positive number"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "mscale": 1.0}}, r"rope_scaling\.mscale \(1\.0\) is not a parameter of RoPE type linear"),
    ({"rope_scaling": "linear"}, r"rope_scaling is 'linear'; expected a mapping"),
    ({"rope_parameters": {"rope_type": "longrope"}}, r"rope_parameters\.rope_type is 'longrope'"),
    ({"architectures": ...}, r"architectures is None; .*LlamaForCausalLM"),
])
def test_config_errors_name_the_key_and_the_value(model, changes, match):
    edit_config(model, **changes)
    with pytest.raises(ConfigError, match=match) as e:
        pack_weights(target("f16"), model, progress=False)
    assert str(model / "config.json") in str(e.value)


# ---------------------------------------------------------------------------------- checkpoint errors

def test_missing_tensor_names_it_the_weight_and_the_closest_name(model):
    rewrite(model, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError) as e:
        pack_weights(target("f16", "fused"), model, progress=False)
    msg = str(e.value)
    assert "no tensor model.layers.1.mlp.up_proj.weight, needed by packed weight layers.1.wgate_up" in msg
    assert "closest present: model.layers.0.mlp.up_proj.weight" in msg and str(model) in msg


def test_untied_model_without_lm_head_is_a_missing_tensor(model):
    edit_config(model, tie_word_embeddings=False)
    with pytest.raises(MissingTensorError, match=r"no tensor lm_head\.weight, needed by packed weight lm_head "
                                                 r"\(tie_embeddings is false, so it is not tied to model\.embed_tokens\.weight\)"):
        pack_weights(target("f16"), model, progress=False)


def test_shape_mismatch_names_tensor_expected_expression_and_found(model):
    rewrite(model, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": np.zeros((30, 64), np.float32)}))
    with pytest.raises(ShapeMismatchError) as e:
        pack_weights(target("int8-weights", "fused"), model, progress=False)
    assert str(e.value) == ("tensor model.layers.1.self_attn.k_proj.weight in model.safetensors has shape [30, 64]; "
                            "packed weight layers.1.wqkv expects [32, 64] ([n_kv_heads * head_dim = 32, hidden = 64] "
                            "with the config.json values)")


@pytest.mark.parametrize("np_dtype, st_name", [(np.float64, "F64"), (np.int8, "I8")])
def test_unsupported_source_dtype(model, np_dtype, st_name):
    rewrite(model, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np_dtype)}))
    with pytest.raises(SourceDTypeError, match=rf"tensor model\.norm\.weight in model\.safetensors has dtype {st_name}; "
                                               r"allowed source dtypes: F32, F16, BF16"):
        pack_weights(target("f32"), model, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors_names_the_file(model, damage):
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncate" else data[:8] + b"[not json" + data[17:])
    with pytest.raises(CorruptCheckpointError, match=rf"{path} \(\d+ bytes\) is not a valid safetensors file: .*"
                                                     r"Error while deserializing header"):
        pack_weights(target("f32"), model, progress=False)


def test_missing_config_json(model):
    (model / "config.json").unlink()
    with pytest.raises(MissingFileError, match=rf"{model} has no config\.json"):
        load_checkpoint(model)


def test_missing_weights_file(model):
    (model / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match=r"has neither model\.safetensors nor model\.safetensors\.index\.json"):
        load_checkpoint(model)


def test_index_pointing_at_a_missing_shard(model):
    names = list(load_file(model / "model.safetensors"))
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MissingFileError, match=r"model\.safetensors\.index\.json maps 1 tensors \(e\.g\. model\.norm\.weight\) "
                                               r"to shard model-00002-of-00002\.safetensors, which is not in"):
        load_checkpoint(model)


def test_header_errors_come_before_any_conversion(model, monkeypatch):
    """Everything the headers can show is checked for all weights first: a bad last layer
    costs no conversion work, and nothing half-packed exists when the error is raised."""
    reads = []
    monkeypatch.setattr(loader.Checkpoint, "read", lambda self, name: reads.append(name))
    rewrite(model, lambda t: t.update({"model.norm.weight": np.zeros(63, np.float32)}))
    with pytest.raises(ShapeMismatchError, match=r"model\.norm\.weight .* has shape \[63\]"):
        pack_weights(target("f16"), model, progress=False)
    assert reads == []


def test_a_conversion_error_names_the_weight(model):
    def tiny_row(t):        # max|row| / 127 underflows float32: no usable scale (NaN / inf: test_weight_checks.py)
        w = t["model.layers.1.mlp.down_proj.weight"]
        w[3] = 0
        w[3, 5] = np.float32(1e-45)
    rewrite(model, tiny_row)
    with pytest.raises(LoadError, match=r"packed weight layers\.1\.wdown \(from model\.layers\.1\.mlp\.down_proj\.weight\): "
                                        r"rows \[3\]: scale .* underflows or overflows f32"):
        pack_weights(target("int8-weights"), model, progress=False)


def test_unsupported_transform_is_refused(tiny):
    t = target("f16")
    packing = as_json(t.packing)
    packing["weights"][0]["transforms"].insert(0, {"op": "transpose"})
    with pytest.raises(LoadError, match=r"packing\.json entry embed: transforms \[\{'op': 'transpose'\}, \{'op': 'cast', "
                                        r"'dtype': 'f16'\}\] are not supported by this loader \(expected "
                                        r"\[\{'op': 'cast', 'dtype': 'f16'\}\]\)"):
        pack_weights(_with_packing(t, packing), tiny, progress=False)


def test_packing_table_shapes_must_add_up(tiny):
    t = target("int8-weights", "fused")
    packing = as_json(t.packing)
    wqkv = next(e for e in packing["weights"] if e["name"] == "layers.{i}.wqkv")
    wqkv["scale"]["shape"] = ["n_heads * head_dim"]
    with pytest.raises(LoadError, match=r"packing\.json entry layers\.\{i\}\.wqkv: sources \[.*\] pack to \[128, 64\], "
                                        r"but the entry declares shape \[128, 64\] and scale shape \[64\]"):
        pack_weights(_with_packing(t, packing), tiny, progress=False)


# ---------------------------------------------------------------------------------- synthetic models

def test_synthetic_model_is_deterministic_and_seeded(tmp_path):
    a = write_synthetic_model(tmp_path / "a", seed=3)
    b = write_synthetic_model(tmp_path / "b", seed=3)
    c = write_synthetic_model(tmp_path / "c", seed=4)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_synthetic_tokenizer_is_byte_level_with_bos_eos(tiny):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    cfg = json.loads((tiny / "config.json").read_text())
    tc = json.loads((tiny / "tokenizer_config.json").read_text())
    assert tok.get_vocab_size() == cfg["vocab_size"] == 512
    text = "héllo, wörld\n"
    ids = tok.encode(text).ids
    assert ids == [cfg["bos_token_id"], *text.encode()]
    assert tok.decode(ids) == text
    assert tok.token_to_id(tc["bos_token"]) == cfg["bos_token_id"] and tok.token_to_id(tc["eos_token"]) == cfg["eos_token_id"]
    assert tok.decode([cfg["vocab_size"] - 1]).startswith("<|reserved_")
    assert "messages" in tc["chat_template"]


# ---------------------------------------------------------------------------- config gate

def test_a_tensor_the_spec_does_not_use_is_refused_by_name(model):
    rewrite(model, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(LoadError, match=r"has tensor model\.layers\.0\.self_attn\.q_proj\.bias, which the llama spec does not use"):
        pack_weights(target("f32"), model, progress=False)


def test_layers_beyond_num_hidden_layers_are_refused(model):
    edit_config(model, num_hidden_layers=1)
    with pytest.raises(LoadError, match=r"num_hidden_layers is 1, but the checkpoint .* has tensors of 2 layers "
                                        r"\(e\.g\. model\.layers\.1\."):
        pack_weights(target("f32"), model, progress=False)


def test_old_rotary_inv_freq_buffers_are_ignored_like_transformers_does(model, tiny):
    rewrite(model, lambda t: t.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32) for i in range(2)}))
    a, b = pack_weights(target("f32"), model, progress=False), pack_weights(target("f32"), tiny, progress=False)
    assert a.arrays.keys() == b.arrays.keys() and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


@pytest.mark.parametrize("changes", [{"architectures": ["MistralForCausalLM"], "sliding_window": None},
                                     {"architectures": ["MistralForCausalLM"], "sliding_window": 4096},
                                     {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}])
def test_settings_with_llamas_math_run(model, tiny, changes):
    edit_config(model, **changes)
    a, b = pack_weights(target("f32"), model, progress=False), pack_weights(target("f32"), tiny, progress=False)
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in b.arrays)


def test_theta_is_read_from_transformers_5_rope_parameters(model):
    """transformers 5 writes no top-level rope_theta: the base lives in rope_parameters."""
    edit_config(model, rope_theta=..., rope_scaling=..., rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    packed = pack_weights(target("f32"), model, progress=False)
    hd = packed.env["head_dim"]
    assert packed.env["rope_theta"] == 500000.0
    want = (500000.0 ** -(np.arange(0, hd, 2) / hd)).astype(np.float32)
    assert np.allclose(packed.arrays["rope_freq"], want, rtol=3e-7, atol=0)


def test_linear_scaling_divides_every_frequency(model, tiny):
    edit_config(model, rope_scaling={"type": "linear", "factor": 4.0})
    scaled, plain = (pack_weights(target("f32"), m, progress=False).arrays["rope_freq"] for m in (model, tiny))
    assert np.array_equal(scaled, (plain.astype(np.float64) / 4).astype(np.float32))
