"""Summary statistics of a tensor, as stored in each manifest record.

``min``, ``max``, ``mean``, ``abs_max`` and ``l2`` are over the finite elements (None when there
are none), accumulated in float64; ``nan``, ``inf`` and ``zero`` count elements; ``numel`` is
the size. Integer and bool tensors are widened to float64 first. One ``aminmax``, one
``count_nonzero`` and one float64 sum-and-sum-of-squares pass (widened in chunks of
:data:`SUM_CHUNK` elements) decide everything for finite tensors; NaN/Inf masks are only built
when the minimum or maximum is not finite (statistics-only capture stays cheap: ~1 ms for a
4 MiB float32 tensor on this machine, was ~3.5 ms with a separate float64 sum and norm).

:func:`sample_values` takes the small sample that statistics-only capture stores with the
statistics (:data:`SAMPLE_SIZE` elements by default): one element per ``numel // k`` segment
of the flat tensor, at a varying offset (:func:`~parity.store.format.sample_positions`), so
two captures of tensors of one size sample the same positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from parity.store.format import sample_positions


def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """Statistics of ``t`` (see module docstring). ``t`` may be on any device."""
    numel = t.numel()
    stats: dict[str, Any] = {"min": None, "max": None, "mean": None, "abs_max": None, "l2": None,
                             "nan": 0, "inf": 0, "zero": 0, "numel": numel}
    if numel == 0:
        return stats
    x = t if t.is_floating_point() else t.to(torch.float64)
    stats["zero"] = numel - int(torch.count_nonzero(x))
    lo, hi = torch.aminmax(x)
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):  # NaN or Inf somewhere: the slow path
        stats["nan"] = int(torch.isnan(x).sum())
        stats["inf"] = int(torch.isinf(x).sum())
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return stats
        lo, hi = torch.aminmax(x)
        lo_f, hi_f = float(lo), float(hi)
    total, squares = _sums(x)
    stats.update(min=lo_f, max=hi_f, abs_max=max(abs(lo_f), abs(hi_f)), mean=total / x.numel(),
                 l2=math.sqrt(squares))
    return stats


#: Elements widened to float64 at a time by :func:`_sums` (bounded extra memory: 8 MiB).
SUM_CHUNK = 1 << 20


def _sums(x: torch.Tensor) -> tuple[float, float]:
    """Sum and sum of squares of ``x`` in float64, one widened chunk at a time (one pass over the
    data instead of a float64 sum plus a float64 norm)."""
    flat = x.reshape(-1)
    total = squares = 0.0
    for start in range(0, flat.numel(), SUM_CHUNK):
        chunk = flat[start:start + SUM_CHUNK].to(torch.float64)
        total += float(chunk.sum())
        squares += float(torch.dot(chunk, chunk))
    return total, squares


#: Elements sampled per tensor by statistics-only capture unless told otherwise.
SAMPLE_SIZE = 32


def sample_values(t: torch.Tensor, k: int) -> list[float]:
    """The values of ``t`` at :func:`sample_positions`, widened to float64 (exact for every
    stored dtype but int64 beyond 2^53; the manifest writer stores NaN and infinities as
    strings, as for every statistic)."""
    flat = t.reshape(-1)
    positions = sample_positions(flat.numel(), k)
    if not positions:
        return []
    index = torch.tensor(positions, dtype=torch.int64, device=flat.device)
    return flat.index_select(0, index).to("cpu", torch.float64).tolist()
