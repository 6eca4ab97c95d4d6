"""In-memory record of module inputs (args and kwargs) and outputs for one forward pass.

Used by replay: the baseline's inputs of a module are fed to the target's copy of the module.
Every floating or integer tensor in the inputs (nested in tuples/lists/dicts too, e.g. the
``position_embeddings`` (cos, sin) pair or a 4-D attention mask) is detached and cloned;
other values (None, bools, cache objects) are kept as they are. Memory: one forward pass's
inputs and outputs of the recorded modules — fine for the models one debugs on a CPU, to be
kept in mind for big ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def primary(value: Any) -> torch.Tensor | None:
    """The main tensor of an output or input: itself, or the first tensor of a tuple/list."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = primary(item)
            if found is not None:
                return found
    return None


def cast_inputs(value: Any, dtype: torch.dtype, device: str | torch.device) -> Any:
    """Floating tensors to ``dtype`` on ``device`` (masks of -inf stay -inf); others moved only."""
    if isinstance(value, torch.Tensor):
        moved = value.to(device)
        return moved.to(dtype) if moved.is_floating_point() else moved
    if isinstance(value, tuple):
        return tuple(cast_inputs(v, dtype, device) for v in value)
    if isinstance(value, list):
        return [cast_inputs(v, dtype, device) for v in value]
    if isinstance(value, dict):
        return {k: cast_inputs(v, dtype, device) for k, v in value.items()}
    return value


@dataclass
class ModuleIO:
    """What one module received and returned in the recorded forward pass."""

    args: tuple
    kwargs: dict[str, Any]
    output: Any

    @property
    def input(self) -> torch.Tensor | None:
        """The main input tensor (first positional tensor, else ``hidden_states`` or the first kwarg tensor)."""
        found = primary(self.args)
        if found is None:
            found = self.kwargs.get("hidden_states")
            found = found if isinstance(found, torch.Tensor) else primary(list(self.kwargs.values()))
        return found

    @property
    def out(self) -> torch.Tensor | None:
        """The main output tensor."""
        return primary(self.output)


@dataclass
class Recording:
    """Module name -> :class:`ModuleIO` for one forward pass, in execution (completion) order."""

    modules: dict[str, ModuleIO] = field(default_factory=dict)
    result: Any = None


def record_forward(model: torch.nn.Module, names: Iterable[str], **inputs: Any) -> Recording:
    """Run ``model(**inputs)`` once under inference mode, recording the named modules' I/O."""
    wanted = set(names)
    modules = dict(model.named_modules())
    recording = Recording()
    pending: dict[str, tuple[tuple, dict]] = {}
    handles = []

    def make(name: str):
        def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            pending[name] = (_clone(args), _clone(kwargs))

        def post(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            a, k = pending.pop(name, ((), {}))
            recording.modules[name] = ModuleIO(args=a, kwargs=k, output=_clone(output))
        return pre, post

    for name in wanted:
        pre, post = make(name)
        handles.append(modules[name].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(modules[name].register_forward_hook(post, with_kwargs=True))
    try:
        with torch.inference_mode():
            recording.result = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return recording


def _swap_main(args: tuple, kwargs: dict[str, Any], new: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    if args and isinstance(args[0], torch.Tensor):
        return (new, *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, {**kwargs, "hidden_states": new}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return args, {**kwargs, key: new}
    raise ValueError("the module has no tensor input to replace")


def replay(module: torch.nn.Module, own: ModuleIO, main_input: torch.Tensor) -> torch.Tensor | None:
    """Run ``module`` on its own recorded call with the main input replaced by ``main_input``.

    Only the data flowing between modules (the hidden states) comes from the other run: masks,
    position ids and rotary (cos, sin) stay the module's own, as its configuration computed them,
    so an eager module never receives the ``None`` mask an sdpa run passes.
    """
    reference = own.input
    target_dtype = reference.dtype if reference is not None else main_input.dtype
    device = reference.device if reference is not None else main_input.device
    args, kwargs = _swap_main(own.args, own.kwargs, main_input.to(device=device, dtype=target_dtype))
    with torch.inference_mode():
        out = module(*args, **kwargs)
    return primary(out)
