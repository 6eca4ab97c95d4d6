"""Collecting tapped outputs in memory (no dump), for short repeated runs such as calibration.

:func:`collect_outputs` runs one forward pass with hooks on the tapped modules (same tap
patterns and output flattening as :func:`parity.capture`) and returns ``{name: float64 array}``.
``keep_rows`` / ``keep_tokens`` (default: everything) slice the leading batch and token axes,
so a perturbed run (a duplicated batch row, right padding) lines up with an unperturbed one.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from parity.capturing.flatten import flatten_output, select_element
from parity.capturing.taps import model_taps


def collect_outputs(model: torch.nn.Module, *, taps: Sequence[str] | None = None,
                    keep_rows: int | None = None, keep_tokens: int | None = None,
                    **inputs: Any) -> dict[str, np.ndarray]:
    """Run ``model(**inputs)`` once and return the tapped outputs as float64 numpy arrays."""
    chosen = model_taps(model, taps)
    modules = dict(model.named_modules())
    out: dict[str, np.ndarray] = {}

    def make_hook(name: str, index: int | None):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            value = output if index is None else select_element(output, index)
            for leaf, tensor in flatten_output(name, value)[0]:
                t = tensor.detach()
                if keep_rows is not None and t.dim() >= 1:
                    t = t[:keep_rows]
                if keep_tokens is not None and t.dim() >= 2:
                    t = t[:, :keep_tokens]
                key = leaf if leaf not in out else f"{leaf}#{sum(k.startswith(leaf + '#') for k in out) + 1}"
                out[key] = t.to(torch.float64).cpu().numpy()
        return hook

    handles = [modules[name].register_forward_hook(make_hook(name, tap.index)) for name, tap in chosen.items()]
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return out
