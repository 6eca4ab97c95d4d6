"""Summary statistics of a tensor, as stored in each manifest record.

``min``, ``max``, ``mean``, ``abs_max`` and ``l2`` are over the finite elements (None when there
are none), accumulated in float64; ``nan``, ``inf`` and ``zero`` count elements; ``numel`` is
the size. Integer and bool tensors are widened to float64 first.
"""

from __future__ import annotations

from typing import Any

import torch


def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """Statistics of ``t`` (see module docstring). ``t`` may be on any device."""
    numel = t.numel()
    stats: dict[str, Any] = {"min": None, "max": None, "mean": None, "abs_max": None, "l2": None,
                             "nan": 0, "inf": 0, "zero": 0, "numel": numel}
    if numel == 0:
        return stats
    x = t if t.is_floating_point() else t.to(torch.float64)
    stats["zero"] = int((x == 0).sum())
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        stats["nan"] = int(torch.isnan(x).sum())
        stats["inf"] = int(torch.isinf(x).sum())
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return stats
    lo, hi = torch.aminmax(x)
    lo_f, hi_f = float(lo), float(hi)
    stats.update(
        min=lo_f, max=hi_f, abs_max=max(abs(lo_f), abs(hi_f)),
        mean=float(x.sum(dtype=torch.float64)) / x.numel(),
        l2=float(torch.linalg.vector_norm(x, dtype=torch.float64)),
    )
    return stats
