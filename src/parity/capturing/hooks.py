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

Opt-in records beside each tapped module's output (all off by default; see :func:`capture`):

- ``inputs=True``: its tensor arguments, recorded when it is called (before its output) as
  ``NAME.input.K`` (positional argument K) and ``NAME.kwargs.KEY`` (keyword argument), flattened
  like outputs (``NAME.kwargs.position_embeddings.0``), tagged ``role: "input"``;
- ``parameters=True``: a fingerprint of each parameter (:mod:`parity.capturing.fingerprint`:
  statistics and digests, no data) at the module's first call, as ``NAME.parameters.PARAM``
  (``model.layers.3.mlp.parameters.down_proj.weight``); a parameter belongs to the innermost
  tapped module that holds it, so each is fingerprinted once;
- ``call_sites=True``: the tag ``call_site`` on each of its records: the innermost
  :data:`CALL_SITE_FRAMES` frames of the Python stack that called it, outside torch and parity
  (``path:line in function: source``), taken once per module and call index.
"""

from __future__ import annotations

import contextlib
import os
import traceback
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


#: Frames of the calling code kept per call site (innermost first).
CALL_SITE_FRAMES = 4
_STDLIB = os.path.dirname(contextlib.__file__) + os.sep
#: Frames from these places are not call sites: torch, parity, and the standard library's context managers.
_SKIPPED_FRAMES = (os.path.dirname(torch.__file__) + os.sep,
                   os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
                   _STDLIB + "contextlib.py", _STDLIB + "threading.py")


def call_site(limit: int = CALL_SITE_FRAMES) -> list[str]:
    """The innermost ``limit`` frames of the current stack outside torch, parity and the standard
    library's context managers, innermost first, as ``path:line in function: source``."""
    frames = []
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_SKIPPED_FRAMES):
            continue
        frames.append(f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"[:300])
        if len(frames) == limit:
            break
    return frames


class _Extras:
    """The opt-in records of one tapped module: inputs, parameter fingerprints, call sites."""

    def __init__(self, session: CaptureSession, name: str, module_class: str, *, inputs: bool,
                 parameters: list[tuple[str, torch.nn.Parameter]], call_sites: bool) -> None:
        self.session, self.name, self.module_class = session, name, module_class
        self.inputs, self.parameters, self.call_sites = inputs, parameters, call_sites
        self.sites: dict[int, list[str]] = {}  # call index within a step -> call site
        self.calls: tuple[int, int] = (-1, 0)  # (step, calls so far in it)

    def site(self) -> list[str] | None:
        """The call site of the call in progress (taken once per call index)."""
        if not self.call_sites:
            return None
        index = self.calls[1] - 1
        if index not in self.sites:
            self.sites[index] = call_site()
        return self.sites[index]

    def before(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: count the call, fingerprint parameters once, record inputs."""
        session = self.session
        if not session.active:
            return
        try:
            step = session.current_step
            self.calls = (step, self.calls[1] + 1 if self.calls[0] == step else 1)
            tags: dict[str, Any] = {"module": self.module_class}
            if (site := self.site()) is not None:
                tags["call_site"] = site
            for relative, parameter in self.parameters:
                session.record_fingerprint(f"{self.name}.parameters.{relative}", parameter, tags=tags)
            self.parameters = []
            if self.inputs:
                values = [(f"{self.name}.input.{k}", a) for k, a in enumerate(args)]
                values += [(f"{self.name}.kwargs.{key}", v) for key, v in kwargs.items()]
                for prefix, value in values:
                    found, _ = flatten_output(prefix, value)  # caches, configs: not activations, not noted
                    for leaf_name, tensor in found:
                        session.record(leaf_name, tensor, tags={**tags, "role": "input"})
        except Exception as exc:  # never raise into the host
            session.note_once(f"input hook on {self.name!r}: {type(exc).__name__}: {exc}; inputs of this call "
                              "not recorded")


def _make_hook(session: CaptureSession, name: str, tap: Tap, module_class: str, extras: _Extras | None = None):
    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if not session.active:
            return
        try:
            value = output if tap.index is None else select_element(output, tap.index)
            found, skipped = flatten_output(name, value)
            for message in skipped:
                session.note_once(message)
            tags: dict[str, Any] = {"module": module_class}
            if extras is not None and (site := extras.site()) is not None:
                tags["call_site"] = site
            for leaf_name, tensor in found:
                session.record(leaf_name, tensor, tags=tags)
        except Exception as exc:  # never raise into the host
            session.note_once(f"hook on {name!r}: {type(exc).__name__}: {exc}; this call not recorded")
    return hook


def _owned_parameters(model: torch.nn.Module, tapped: Sequence[str]) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Each parameter of ``model`` under the innermost tapped module that holds it:
    {module name: [(name relative to it, parameter)]}; parameters outside every tap are left out."""
    owned: dict[str, list[tuple[str, torch.nn.Parameter]]] = {name: [] for name in tapped}
    by_depth = sorted(tapped, key=lambda n: n.count(".") + (n != ""), reverse=True)
    for full, parameter in model.named_parameters():
        owner = next((m for m in by_depth if m == "" or full.startswith(m + ".")), None)
        if owner is not None:
            owned[owner].append((full[len(owner) + 1:] if owner else full, parameter))
    return owned


@contextlib.contextmanager
def capture(model: torch.nn.Module, out_dir: str | os.PathLike[str] | None = None, taps: Sequence[str] | None = None,
            *, mode: str = "full", spec: str | dict[str, Any] | None = None,
            model_info: dict[str, Any] | None = None, sharding: dict[str, str] | None = None,
            layout: dict[str, int] | None = None, sample: int = SAMPLE_SIZE, inputs: bool = False,
            parameters: bool = False, call_sites: bool = False) -> Iterator[CaptureSession]:
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

    Opt-in (default False each; see the module docstring): ``inputs`` records each tapped
    module's tensor arguments, ``parameters`` a fingerprint of its parameters (compared by
    digest: "these weights differ" becomes its own finding), ``call_sites`` the code that called
    it. Inputs cost about as much capture time and disk as the outputs again.
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
    owned = _owned_parameters(model, list(chosen)) if parameters else {}
    hooks = []
    pre_hooks = []
    for name, tap in chosen.items():
        module_class = type(modules[name]).__name__
        extras = None
        if inputs or parameters or call_sites:
            extras = _Extras(session, name, module_class, inputs=inputs, parameters=owned.get(name, []),
                             call_sites=call_sites)
            pre_hooks.append((modules[name], extras.before))
        hooks.append((modules[name], _make_hook(session, name, tap, module_class, extras)))
    if compiled is not None:
        session.note_once("the model is torch.compile'd: its compiled code was discarded (torch._dynamo.reset()) "
                          "so the capture hooks are traced in; the first forward pass under capture recompiles")
        torch._dynamo.reset()
    try:
        with session_hooks(model, session, hooks, _step_tags, pre_hooks):
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
                  step_tags: Callable[[tuple, dict[str, Any]], dict[str, Any]],
                  pre_hooks: Sequence[tuple[torch.nn.Module, Callable[..., None]]] = ()) -> Iterator[CaptureSession]:
    """Run ``session`` on ``model``: a step per root forward (metadata from ``step_tags(args,
    kwargs)``), the given forward ``hooks`` and forward ``pre_hooks`` (called with args and
    kwargs, after the step began), ``parity.dump`` routed to the session; all undone and the
    session closed on exit. Nothing is installed when the session could not start."""
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
            handles.extend(module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in pre_hooks)
            handles.extend(module.register_forward_hook(hook) for module, hook in hooks)
            handles.append(model.register_forward_hook(lambda module, args, output: session.end_step()))
        yield session
    finally:
        for handle in handles:
            handle.remove()
        _explicit._restore(previous)
        session.close()
