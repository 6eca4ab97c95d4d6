"""Capture under canonical tap names (see :mod:`parity.align.canonical`), for any engine.

:func:`capture_canonical` works like :func:`parity.capture` but records each rule's value
under its canonical name (``layers.3.mlp``), applying the rule's selection, residual sum,
scaling or logits derivation and the model's logit transform, and reshaping 2-D token-major tensors to ``[1, tokens, hidden]``. Canonical
taps the model cannot provide are written as notes. Each root forward is one step; its token
ids (1-D or 2-D), positions and — when the forward gets them as keywords — ``seq_lens`` and
``request_ids`` are stored as step metadata (a packed step's tokens past ``sum(seq_lens)`` are
padding). ``sharding`` and ``layout`` are passed to the session (multi-rank runs). Modules with
a PyTorch reference of their fused kernel (vLLM's rotary embeddings) are checked against it once
(:mod:`parity.capturing.kernel_check`); a disagreement is a note.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import torch

from parity.align.canonical import LogitsTransform, Rule, unmapped
from parity.capturing.flatten import select_element
from parity.capturing.hooks import session_hooks
from parity.capturing.session import CaptureSession
from parity.capturing.stats import SAMPLE_SIZE


def _head_weight(rule: Rule, modules: dict[str, torch.nn.Module]) -> torch.Tensor:
    """The weight of the first module of ``rule.logits_from`` that exists (tied heads: the embeddings)."""
    for name in rule.logits_from:
        weight = getattr(modules.get(name), "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight
    raise KeyError(f"none of {', '.join(rule.logits_from)} has a weight to derive the logits from")


def _buffer(path: str, modules: dict[str, torch.nn.Module]) -> torch.Tensor:
    owner, _, attr = path.rpartition(".")
    return getattr(modules[owner], attr)


def _value(rule: Rule, output: Any, modules: dict[str, torch.nn.Module],
           logits_columns: int | None = None) -> torch.Tensor | None:
    if rule.sum_pair and isinstance(output, (tuple, list)) and len(output) >= 2:
        value = output[0] + output[1] if output[1] is not None else output[0]
    elif rule.select is not None:
        value = select_element(output, rule.select)
    else:
        value = output
    if not isinstance(value, torch.Tensor):
        return None
    if rule.scale_by is not None:
        value = value * _buffer(rule.scale_by, modules)
    if rule.logits_from:
        weight = _head_weight(rule, modules)
        value = torch.nn.functional.linear(value.to(weight.dtype), weight)
        if logits_columns is not None:
            value = value[..., :logits_columns]
    if value.dim() == 2:
        value = value.unsqueeze(0)
    return value


def _transformed(value: torch.Tensor, transform: LogitsTransform) -> torch.Tensor:
    """``transform`` applied as the engines do (soft-cap, then scale), in the value's dtype."""
    if transform.softcap:
        value = torch.tanh(value / transform.softcap) * transform.softcap
    if transform.scale != 1.0:
        value = value * transform.scale
    return value


def _step_tags(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    positions = kwargs.get("positions", kwargs.get("position_ids", args[1] if len(args) > 1 else None))
    tags: dict[str, Any] = {}
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
        tags["input_ids"] = ids.unsqueeze(0) if ids.dim() == 1 else ids
        tags["seq_lens"] = [int(tags["input_ids"].shape[-1])] * int(tags["input_ids"].shape[0])
    if isinstance(positions, torch.Tensor):
        tags["positions"] = positions.unsqueeze(0) if positions.dim() == 1 else positions
    for key in ("seq_lens", "request_ids"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            tags[key] = list(value)
    return tags


@contextlib.contextmanager
def capture_canonical(model: torch.nn.Module, out_dir: str | os.PathLike[str], rules: tuple[Rule, ...], *,
                      num_layers: int, mode: str = "full", spec: dict[str, Any] | None = None,
                      model_info: dict[str, Any] | None = None, sharding: dict[str, str] | None = None,
                      layout: dict[str, int] | None = None,
                      extra_step_tags: Callable[[], dict[str, Any]] | None = None,
                      logits_columns: int | None = None, logits_transform: LogitsTransform | None = None,
                      sample: int = SAMPLE_SIZE) -> Iterator[CaptureSession]:
    """Record the canonical taps of ``model`` into ``out_dir`` (see the module docstring).

    ``extra_step_tags()`` (default none), called at the start of each step, adds metadata the
    forward's arguments do not carry (vLLM: the per-request token counts of its batch).
    ``logits_columns`` (default all) keeps the first columns of derived logits: a rank's
    vocabulary slice without its padding. ``sample``: elements per tensor stored with the
    statistics when ``mode="stats"`` (default 32, 0 for none). ``logits_transform`` (default
    none; see :func:`parity.align.canonical.logits_transform`) is applied to the ``logits`` tap so
    that it holds the distribution the engine samples from; a note says so.
    """
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    session = CaptureSession(out_dir, mode=mode, spec=spec,
                             model_info={"class": type(model).__name__, "taps": "canonical", **(model_info or {})},
                             sharding=sharding, layout=layout, sample=sample)
    for missing in unmapped(rules, names, num_layers):
        session.note_once(f"canonical tap {missing} is not provided by this model (not mapped)")
    if logits_transform is not None:
        session.note_once(f"logits: compared after the model's {logits_transform.describe()} "
                          "(the distribution that is sampled)")

    def make(name: str, matched: list[tuple[Rule, str]]):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not session.active:
                return
            try:
                for rule, canonical in matched:
                    value = _value(rule, output, modules, logits_columns)
                    if value is None:
                        session.note_once(f"{canonical}: {name} gave no tensor")
                        continue
                    if canonical == "logits" and logits_transform is not None:
                        value = _transformed(value, logits_transform)
                    session.record(canonical, value, tags={"module": name})
            except Exception as exc:  # never raise into the host
                session.note_once(f"canonical hook on {name!r}: {type(exc).__name__}: {exc}; this call not recorded")
        return hook

    hooks = []
    for name in names:
        matched = [(rule, c) for rule in rules if (c := rule.match(name))]
        if matched:
            hooks.append((modules[name], make(name, matched)))
    def step_tags(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        tags = _step_tags(args, kwargs)
        if extra_step_tags is not None:
            tags.update(extra_step_tags())
        return tags

    from parity.capturing.kernel_check import self_check_hooks

    check_before, check_after = self_check_hooks(model, session)  # fused kernels vs their references
    with session_hooks(model, session, hooks + check_after, step_tags, check_before):
        yield session
