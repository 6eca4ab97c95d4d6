"""``parity.capture``: record module outputs of any torch model with forward hooks.

Usage::

    with parity.capture(model, "dumps/baseline") as session:
        model(input_ids)

Defaults: ``taps=None`` (the decoder-LM tap set of :mod:`parity.capturing.taps`, or every leaf
module when that matches nothing), ``mode="full"`` (tensors; ``"stats"`` keeps statistics
and a sample of ``sample`` = 32 elements per tensor only), ``spec`` / ``model_info`` are stored
in the run header as given.

A ``torch.compile(model)`` wrapper is captured through the module it compiled (same names as
the eager model); its compiled code is discarded when the capture starts and ends
(``torch._dynamo.reset()``, which affects every compiled function of the process), so the
first forward pass under capture recompiles with the hooks traced in.

Each call of the root module's ``forward`` is one step. Its ``input_ids``, ``position_ids`` and
``attention_mask`` (keyword or first positional argument) are stored as step metadata:
``input_ids``, ``positions``, ``seq_lens`` (non-padding tokens per sequence) and, when the
batch is padded, the ``attention_mask`` itself. Hooks never
raise into the model and return nothing, so outputs are unchanged (bitwise).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence

import torch

from parity import _explicit
from parity.capturing.flatten import flatten_output, select_element
from parity.capturing.session import CaptureSession
from parity.capturing.stats import SAMPLE_SIZE
from parity.capturing.taps import Tap, model_taps


def _step_tags(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    tags: dict[str, Any] = {}
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    if isinstance(ids, torch.Tensor):
        tags["input_ids"] = ids
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor):
        tags["positions"] = positions
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        tags["seq_lens"] = mask.sum(dim=-1)
        if not bool(mask.all()):  # where the padding is (left or right): the token aligner needs it
            tags["attention_mask"] = mask
    elif isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        tags["seq_lens"] = [ids.shape[-1]] * (ids.shape[0] if ids.dim() == 2 else 1)
    return tags


def _make_hook(session: CaptureSession, name: str, tap: Tap, module_class: str):
    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if not session.active:
            return
        try:
            value = output if tap.index is None else select_element(output, tap.index)
            found, skipped = flatten_output(name, value)
            for message in skipped:
                session.note_once(message)
            for leaf_name, tensor in found:
                session.record(leaf_name, tensor, tags={"module": module_class})
        except Exception as exc:  # never raise into the host
            session.note_once(f"hook on {name!r}: {type(exc).__name__}: {exc}; this call not recorded")
    return hook


@contextlib.contextmanager
def capture(model: torch.nn.Module, out_dir: str | os.PathLike[str] | None = None, taps: Sequence[str] | None = None,
            *, mode: str = "full", spec: str | dict[str, Any] | None = None,
            model_info: dict[str, Any] | None = None, sharding: dict[str, str] | None = None,
            layout: dict[str, int] | None = None, sample: int = SAMPLE_SIZE) -> Iterator[CaptureSession]:
    """Record the outputs of ``model``'s tapped modules into the dump directory ``out_dir``, or,
    with ``out_dir=None`` (the default), into memory: ``session.run`` after the block is the run
    to pass to :func:`parity.compare` (same records, statistics and validation as a dump; for
    models small enough to hold, see :mod:`parity.store.memory`).

    ``spec`` (default None) says how the model runs, as a SPEC string (``"dtype=bfloat16,attn=sdpa"``,
    see :mod:`parity.backends.spec`) or a dict; ``model_info`` (default None) what it is, e.g.
    ``{"path": MODEL_DIR}``. With both, ``parity explain`` can replay the dump (it reloads the
    model from that path under that spec).

    ``taps``: tap patterns (a list, or one pattern as a string; default the decoder-LM tap set);
    a pattern that matches no module is a :class:`~parity.errors.UsageError` naming the closest
    module names, raised here, before anything is captured.

    Yields the :class:`~parity.capturing.session.CaptureSession` (``session.error`` says why
    capture turned itself off, if it did). ``parity.dump`` calls inside the block go to the same
    dump. The dump is complete when the block exits. Under torch.distributed call it on every
    rank with the same ``out_dir``; ``sharding`` ({tap pattern: ``split:DIM`` | ``sum`` |
    ``replicated``}, default none) says how each tap's shards rebuild the full tensor and
    ``layout`` (``tp_rank``/``tp_size``/``dp_rank``/``dp_size``, default one tensor-parallel
    group of all ranks) where this rank sits (see :mod:`parity.align.shards`). With
    ``mode="stats"``, ``sample`` elements per tensor (default 32, 0 for none) are stored with
    the statistics, at spread-out positions (see :func:`parity.store.format.sample_positions`).
    """
    compiled = _compiled_inner(model)
    if compiled is not None:  # a torch.compile'd module: hook the module it compiled, then retrace
        model = compiled
    chosen = model_taps(model, taps)
    if isinstance(spec, str):
        from parity.backends.spec import parse_spec

        spec = parse_spec(spec).to_dict()
    info = {"class": type(model).__name__, **(model_info or {})}
    session = CaptureSession(out_dir, mode=mode, spec=spec, model_info=info, sharding=sharding, layout=layout,
                             sample=sample)
    modules = dict(model.named_modules())
    hooks = [(modules[name], _make_hook(session, name, tap, type(modules[name]).__name__))
             for name, tap in chosen.items()]
    if compiled is not None:
        session.note_once("the model is torch.compile'd: its compiled code was discarded (torch._dynamo.reset()) "
                          "so the capture hooks are traced in; the first forward pass under capture recompiles")
        torch._dynamo.reset()
    try:
        with session_hooks(model, session, hooks, _step_tags):
            yield session
    finally:
        if compiled is not None:
            torch._dynamo.reset()  # compiled code that calls the removed hooks is dropped too


def _compiled_inner(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module a ``torch.compile(module)`` wrapper compiled, or None for a plain module.

    Hooks registered on submodules after the wrapper first ran never fire (the compiled code
    does not call them): :func:`capture` hooks the inner module under its own names (no
    ``_orig_mod.`` prefix, so the dump pairs with an eager one) and makes dynamo retrace."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) and type(model).__name__ == "OptimizedModule" else None


@contextlib.contextmanager
def session_hooks(model: torch.nn.Module, session: CaptureSession,
                  hooks: Sequence[tuple[torch.nn.Module, Callable[..., None]]],
                  step_tags: Callable[[tuple, dict[str, Any]], dict[str, Any]]) -> Iterator[CaptureSession]:
    """Run ``session`` on ``model``: a step per root forward (metadata from ``step_tags(args,
    kwargs)``), the given forward ``hooks``, ``parity.dump`` routed to the session; all undone and
    the session closed on exit. Nothing is installed when the session could not start."""
    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            session.next_step(step_tags(args, kwargs))
        except Exception as exc:
            session.note_once(f"step metadata: {type(exc).__name__}: {exc}; stored without it")
            session.next_step()

    handles = []
    previous = _explicit._activate(session)
    try:
        if session.active:
            handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.extend(module.register_forward_hook(hook) for module, hook in hooks)
            handles.append(model.register_forward_hook(lambda module, args, output: session.end_step()))
        yield session
    finally:
        for handle in handles:
            handle.remove()
        _explicit._restore(previous)
        session.close()
