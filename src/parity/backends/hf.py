"""Running a Hugging Face transformers causal LM under a :class:`~parity.backends.spec.Spec`.

:func:`run_and_capture` loads a local model folder (never downloads: ``HF_HUB_OFFLINE=1`` is set
unless the caller set it), applies the spec (dtype, attention implementation, torch.compile,
device), and runs one forward pass per prompt (each prompt is one step, batch 1, no padding)
under :func:`parity.capture`, so every step's token ids and positions are stored with it.

Defaults: the built-in model :data:`DEFAULT_MODEL` and prompt set :data:`DEFAULT_PROMPTS`
shipped in ``parity/assets``; the tap set of :data:`parity.capturing.taps.DECODER_LM_TAPS`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from parity.backends.spec import Spec
from parity.errors import BackendError, UsageError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "tiny-llama"
DEFAULT_PROMPTS = ASSETS / "prompts.txt"


def read_prompts(path: str | os.PathLike[str] | None) -> list[str]:
    """Prompts from a text file, one per non-empty line (default: the built-in prompt set)."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompts file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompts file {path} has no non-empty line")
    return prompts


def model_identity(model_dir: Path) -> dict[str, object]:
    """Path, a hash of config.json + weight file sizes, and for MoE models ``experts_per_token``
    (the config's ``num_experts_per_tok``, the k of the router's top-k): what the header records."""
    config = model_dir / "config.json"
    text = config.read_bytes()
    digest = hashlib.sha256(text)
    for weights in sorted(model_dir.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    identity: dict[str, object] = {"path": str(model_dir), "config_sha256": digest.hexdigest()[:16]}
    try:
        k = json.loads(text).get("num_experts_per_tok")
    except (ValueError, AttributeError):
        k = None
    if isinstance(k, int) and not isinstance(k, bool) and k > 0:
        identity["experts_per_token"] = k
    return identity


def check_model_dir(model_dir: str | os.PathLike[str]) -> Path:
    """Resolve and check a local HF model folder (it must hold config.json)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UsageError(f"model directory {path} does not exist",
                         hint="give a local Hugging Face model folder; nothing is downloaded")
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a Hugging Face model folder: no config.json in it")
    return path


def resolve_model_dir(model_dir: str | os.PathLike[str] | None) -> Path:
    """``--model DIR`` checked (:func:`check_model_dir`), or the built-in model when not given."""
    return DEFAULT_MODEL if model_dir is None else check_model_dir(model_dir)


@dataclass
class LoadedModel:
    """A model and tokenizer loaded under a spec; ``chat``: prompts go through the chat template."""

    model: object
    tokenizer: object
    spec: Spec
    path: Path
    chat: bool = False


def load(model_dir: str | os.PathLike[str], spec: Spec) -> LoadedModel:
    """Load ``model_dir`` with transformers under ``spec`` (eval mode, no grad needed)."""
    path = check_model_dir(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from parity.backends.quiet import quiet_imports

    quiet_imports()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"spec asks for device={spec.device} but torch sees no CUDA device")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, spec.dtype), attn_implementation=spec.attn)
    except Exception as exc:  # transformers raises many types for a bad folder
        hint = ("vLLM's transformers backend patched this model's classes in this process: run the "
                "transformers side first (as the baseline), or in its own process"
                if "vLLM config is not set" in str(exc) else None)
        raise BackendError(f"cannot load model from {path} under {spec}: {type(exc).__name__}: {exc}",
                           hint=hint) from None
    model.eval().to(spec.device)
    if spec.quant != "none":
        _quantize(model, spec.quant)
    if spec.compile:
        model.forward = torch.compile(model.forward)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=path)


def _quantize(model: object, quant: str) -> None:
    """torchao int8 weight-only (``int8wo``) or dynamic-activation int8 (``int8dyn``) on the linears.

    The output head (``lm_head``) stays in the model dtype, as torchao's LLM recipes do.
    """
    try:
        from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                          quantize_)
    except ImportError:
        raise BackendError(f"quant={quant} needs torchao", hint="pip install torchao") from None
    import torch

    config = Int8WeightOnlyConfig() if quant == "int8wo" else Int8DynamicActivationInt8WeightConfig()

    def only_decoder_linears(module: object, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")

    quantize_(model, config, filter_fn=only_decoder_linears)


def generate(loaded: LoadedModel, prompts: Sequence[str], *, new_tokens: int, top_k: int = 5,
             chat: bool = False) -> list:
    """Greedy generation of ``new_tokens`` per prompt (batch 1), with top-k logprobs per position;
    ``chat`` (default False): prompts through the tokenizer's chat template
    (:func:`parity.backends.generation.encode_prompt`)."""
    import torch

    from parity.backends.generation import Generation, encode_prompt

    out = []
    tok = loaded.tokenizer
    eos = _eos_ids(loaded.model, tok)
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tok, prompt, chat=chat)], device=loaded.spec.device)
        with torch.inference_mode():
            result = loaded.model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                           return_dict_in_generate=True, pad_token_id=tok.pad_token_id or 0)
        tokens = result.sequences[0, ids.shape[1]:].tolist()
        topk = []
        for position, logits in enumerate(result.logits[:len(tokens)]):
            logprobs = torch.log_softmax(logits[0].double(), dim=-1)
            values, indices = logprobs.topk(top_k)
            entry = {int(i): float(v) for i, v in zip(indices, values)}
            entry.setdefault(tokens[position], float(logprobs[tokens[position]]))
            topk.append(entry)
        out.append(Generation(prompt=prompt, prompt_ids=ids[0].tolist(), tokens=tokens, topk=topk,
                              ended_at_eos=bool(tokens) and tokens[-1] in eos, chat=chat))
    return out


def _eos_ids(model: object, tokenizer: object) -> set[int]:
    """The token ids that end a generation: the generation config's ``eos_token_id`` (int or list)
    and the tokenizer's."""
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def capture_sequences(loaded: LoadedModel, sequences: Sequence[Sequence[int]], out_dir: str | os.PathLike[str], *,
                      canonical: bool = False, taps: Sequence[str] | None = None, mode: str = "full",
                      extras: dict[str, bool] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """One teacher-forced forward pass per token sequence under capture (module or canonical taps);
    ``extras`` (default none): the opt-in records of :func:`parity.capture` (``inputs``,
    ``parameters``, ``call_sites``), for module taps."""
    import torch

    from parity.capturing.hooks import capture

    model = loaded.model
    info = {**model_identity(loaded.path), "architecture": type(model).__name__}
    if canonical:
        from parity.align.canonical import logits_transform, rules_for, supported
        from parity.capturing.canonical_hooks import capture_canonical

        model_type = getattr(model.config, "model_type", "")
        rules = rules_for("hf", model_type)
        if rules is None:
            raise BackendError(f"no canonical taps for architecture {model_type!r} (supported: {supported()})")
        context = capture_canonical(model, out_dir, rules, num_layers=model.config.num_hidden_layers, mode=mode,
                                    spec=loaded.spec.to_dict(), model_info=info,
                                    logits_transform=logits_transform(model.config))
    else:
        context = capture(model, out_dir, taps, mode=mode, spec=loaded.spec.to_dict(), model_info=info,
                          **(extras or {}))
    with context as session:
        with torch.inference_mode():
            for index, seq in enumerate(sequences):
                ids = torch.tensor([list(seq)], dtype=torch.long, device=loaded.spec.device)
                model(input_ids=ids, use_cache=False)
                if progress is not None:
                    progress(index + 1, len(sequences))
    if session.error is not None:
        raise BackendError(f"capture into {out_dir} failed: {session.error}")
    return {"records": session.records_written, "steps": len(sequences)}


def run_and_capture(loaded: LoadedModel, prompts: Sequence[str], out_dir: str | os.PathLike[str], *,
                    taps: Sequence[str] | None = None, mode: str = "full",
                    progress: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """One forward pass per prompt under capture into ``out_dir``; returns a short summary.

    Raises :class:`BackendError` when capture turned itself off (the dump would be incomplete).
    """
    from parity.backends.generation import encode_prompt

    sequences = [encode_prompt(loaded.tokenizer, prompt) for prompt in prompts]
    return capture_sequences(loaded, sequences, out_dir, taps=taps, mode=mode, progress=progress)
