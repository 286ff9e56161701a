"""One generation session: pick device, policy, target and backend, tokenize, load, run.

This is the whole path behind ``codegen generate`` (and the benchmarks): every dtype it uses
comes from the target's manifest/packing; it only decides *which* target and backend.
Everything that can be refused is refused before weights are packed: an unknown device, a
prompt that does not fit the model's context, a backend that cannot run here.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dtypeforge.codegen.specs import Specs, UsageError, check_runs_on, check_selection

from dtypeforge.runtime.errors import BackendUnavailable
from dtypeforge.runtime.generate import Sampling, check_context, stream_tokens
from dtypeforge.codegen.dtypes import storage_holds
from dtypeforge.codegen.yamlsrc import SpecError
from dtypeforge.runtime.loader import Holds, check_config, load_checkpoint, pack_weights, read_config
from dtypeforge.runtime.target import ConfigError, LoadError, Target, load_target, materialize, model_env
from dtypeforge.runtime.tokenizer import HFTokenizer, StreamDecoder, check_text


@dataclass
class Result:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    prefill_s: float          # prompt steps, up to the first new token
    decode_s: float           # the remaining new tokens

    @property
    def ms_per_token(self) -> float:
        return self.decode_s * 1e3 / max(1, len(self.new_ids) - 1)


def cuda_status() -> str | None:
    """None when the CUDA backend can run here, else why not."""
    from dtypeforge.runtime import cuda
    return cuda.unavailable_reason()


def resolve_backend(backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    why = cuda_status()
    if backend == "cuda" and why:
        raise BackendUnavailable(f"--backend cuda cannot run here: {why}")
    return "cpu" if why else "cuda"


def resolve_device(specs: Specs, device: str, backend: str) -> str:
    if device != "auto":
        if device not in specs.devices:
            raise LoadError(f"unknown device {device!r}; known: {', '.join(sorted(specs.devices))}")
        return device
    if backend == "cpu":
        return "reference"
    from dtypeforge.runtime.cuda import gpu_name
    return device_for_gpu(specs, gpu_name())


def policies_holding(specs, device: str, model: str) -> Holds:
    """``holds`` for pack_weights: (role, max |value|) -> the names, sorted, of ``model``'s policies
    that run on ``device`` and whose storage for ``role`` packs values up to that magnitude without
    overflow (quantized storage: while the per-row scale stays finite in its dtype).
    ``specs`` is a codegen.specs.Specs."""
    dev = specs.devices[device]
    runnable = []
    for pol in specs.policies[model].values():
        try:
            check_runs_on(pol, dev)
        except SpecError:
            continue
        runnable.append(pol)

    def holds(role: str, max_abs: float) -> list[str]:
        return sorted(p.name for p in runnable if role in p.roles
                      and storage_holds(max_abs, p.roles[role]["storage"], p.roles[role].get("scale")))
    return holds


def model_spec_for(specs: Specs, model_dir) -> str:
    """The model spec that computes the checkpoint's architecture (config.json `architectures`)."""
    config, config_path = read_config(Path(model_dir))
    try:
        return specs.model_for(config.get("architectures"), config_path)
    except UsageError as e:        # the checkpoint's, not the command line's: a run-time error
        raise ConfigError(str(e)) from None


def target_from_specs(specs: Specs, device: str, policy: str, layout: str, model: str) -> Target:
    """The target exactly as ``specs`` resolve it: its Plan rendered in memory (tens of ms) into a cache
    folder named by the content, so a run uses the user's own specs (an edited policy, a new device)
    and never a generated/ folder that may be stale; generated/ is the golden `codegen build --check`
    holds the shipped specs to. An unknown name or a policy the device cannot run is a spec error."""
    from dtypeforge.codegen.build import render_targets
    from dtypeforge.codegen.plan import TargetKey
    key = TargetKey(model, device, policy, layout)
    return load_target(materialize(key.name, render_targets(specs, [key])[key.name]))


def names_gpu(entry: str, gpu: str) -> bool:
    """Whether a spec's gpu_names entry is a word (or run of words) of the CUDA device name, case
    aside: "A10" names "NVIDIA A10" but not "NVIDIA A100-SXM4-80GB", "L4" not "NVIDIA L40S"."""
    return re.search(rf"(?<![a-z0-9]){re.escape(entry.lower())}(?![a-z0-9])", gpu.lower()) is not None


def device_for_gpu(specs: Specs, gpu: str) -> str:
    """The one device spec whose gpu_names name this GPU (--device auto)."""
    hits = [d for d in sorted(specs.devices.values(), key=lambda d: d.name) if any(names_gpu(g, gpu) for g in d.gpu_names)]
    if len(hits) > 1:
        found = "; ".join(f"{d.src.path}: {[g for g in d.gpu_names if names_gpu(g, gpu)]}" for d in hits)
        raise LoadError(f"--device auto: the GPU {gpu!r} is named by {len(hits)} device specs ({found}); "
                        f"make their gpu_names tell it apart, or pass --device")
    if not hits:
        raise LoadError(f"--device auto: no device spec names the GPU {gpu!r} in gpu_names; "
                        f"pass --device (one of {', '.join(sorted(specs.devices))}) or add a spec")
    return hits[0].name


class Engine:
    """A checkpoint packed for one target and backend: what ``dtypeforge.load`` returns.

    ``generate`` yields each new token as the backend produces it; the KV cache holds ``max_seq``
    positions (prompt and new tokens together), fixed when the weights were packed."""

    def __init__(self, target: Target, backend, tokenizer: HFTokenizer, max_seq: int, device: str, policy: str):
        self.target, self.backend, self.tokenizer = target, backend, tokenizer
        self.max_seq, self.device, self.policy = max_seq, device, policy

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def stream(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling()):
        """New token ids, one at a time, as they are produced (EOS included when it stops generation)."""
        check_context(len(prompt_ids), max_new_tokens, self.max_seq)
        return stream_tokens(self.backend, prompt_ids, max_new_tokens, self.tokenizer.eos_ids, sampling)

    def generate(self, prompt: str, max_new_tokens: int = 64, *, chat: bool = False, sampling: Sampling = Sampling()):
        """Yields (token id, the text it completes) per new token: text arrives whole, never half a
        UTF-8 character (a token that ends mid-character yields "" and the next one carries it)."""
        decoder = StreamDecoder(self.tokenizer)
        for t in self.stream(self.encode(prompt, chat), max_new_tokens, sampling):
            yield t, decoder.push(t)
        tail = decoder.flush()
        if tail:
            yield None, tail

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Session:
    """One command-line run: an engine sized for one prompt and its new tokens."""

    def __init__(self, engine: Engine, prompt_ids: list[int], max_new: int):
        self.engine, self.prompt_ids, self.max_new = engine, prompt_ids, max_new
        self.target, self.backend, self.tokenizer = engine.target, engine.backend, engine.tokenizer
        self.device, self.policy = engine.device, engine.policy

    def run(self, sampling: Sampling = Sampling(), stream: TextIO | None = None) -> Result:
        decoder = StreamDecoder(self.tokenizer)
        new: list[int] = []
        t0 = time.perf_counter()
        first = None
        for t in self.engine.stream(self.prompt_ids, self.max_new, sampling):
            first = first or time.perf_counter()
            new.append(t)
            if stream is not None:
                stream.write(decoder.push(t))
                stream.flush()
        t1 = time.perf_counter()
        if stream is not None:
            stream.write(decoder.flush())
        return Result(self.prompt_ids, new, self.tokenizer.decode(new, skip_special_tokens=True), first - t0, t1 - first)


def encode_prompt(tok: HFTokenizer, prompt: str, chat: bool) -> list[int]:
    """transformers' ids for the prompt: tokenizer(prompt), or with `chat` apply_chat_template of
    one user message with the generation prompt (the template writes any BOS itself)."""
    check_text(prompt, "prompt")
    if chat:
        return tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tok.encode(prompt)


def _prepare(specs: Specs, model_dir, device: str, policy: str | None, layout: str, backend: str):
    """Everything refused before a weight is read: names, backend, target, config, tokenizer."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise LoadError(f"{model_dir} is not a model directory (no config.json); "
                        f"make one with `codegen import-gguf --out {model_dir}` or `codegen synth-model`")
    model = model_spec_for(specs, model_dir)
    check_selection(specs, None if device == "auto" else device, policy, layout, model)
    kind = resolve_backend(backend)
    device = resolve_device(specs, device, kind)
    policy = policy or specs.devices[device].default_policy
    target = target_from_specs(specs, device, policy, layout, model)
    ckpt = load_checkpoint(model_dir)          # config and tensor headers: refused here, before any progress output
    env = model_env(target.manifest, ckpt.config, ckpt.config_path)
    check_config(target.manifest, ckpt.config, ckpt.config_path, env)
    return ckpt, kind, device, policy, target, env, HFTokenizer(model_dir)


def _engine(specs, ckpt, kind, device, policy, target, tok, max_seq: int, progress: bool) -> Engine:
    if progress:
        print(f"[{target.name} on the {kind} backend]", file=sys.stderr, flush=True)
    packed = pack_weights(target, ckpt.dir, max_seq=max_seq, checkpoint=ckpt, progress=progress,
                          holds=policies_holding(specs, device, target.manifest.model))
    if kind == "cuda":
        from dtypeforge.runtime.cuda import CudaBackend
        be = CudaBackend(target, packed, progress=progress)
    else:
        from dtypeforge.runtime.reference import ReferenceBackend
        be = ReferenceBackend(target.manifest, packed)
    return Engine(target, be, tok, packed.env["max_seq"], device, policy)


def open_engine(specs: Specs, model_dir, device: str = "auto", policy: str | None = None, layout: str = "fused",
                backend: str = "auto", *, max_seq: int = 4096, progress: bool = False) -> Engine:
    """An engine whose KV cache holds ``max_seq`` positions (at most the model's context)."""
    if isinstance(max_seq, bool) or not isinstance(max_seq, int) or max_seq < 2:
        raise UsageError(f"max_seq must be an int of at least 2, found {max_seq!r}")
    ckpt, kind, device, policy, target, env, tok = _prepare(specs, model_dir, device, policy, layout, backend)
    return _engine(specs, ckpt, kind, device, policy, target, tok, min(max_seq, env["max_seq"]), progress)


def open_session(specs: Specs, model_dir, device: str = "auto", policy: str | None = None, layout: str = "fused",
                 backend: str = "auto", *, prompt: str, chat: bool = False, max_new_tokens: int = 64,
                 progress: bool = True) -> Session:
    """The command line's run: the prompt is encoded and checked against the context before packing, and
    the KV cache sized for exactly the prompt and its new tokens."""
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, found {max_new_tokens}")
    ckpt, kind, device, policy, target, env, tok = _prepare(specs, model_dir, device, policy, layout, backend)
    prompt_ids = encode_prompt(tok, prompt, chat)
    check_context(len(prompt_ids), max_new_tokens, env["max_seq"])
    engine = _engine(specs, ckpt, kind, device, policy, target, tok, len(prompt_ids) + max_new_tokens, progress)
    return Session(engine, prompt_ids, max_new_tokens)
