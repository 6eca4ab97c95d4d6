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

:func:`stats_vector` and :func:`stats_from_vector` split the same statistics in two for a tensor
on an accelerator: the first queues every reduction on the tensor's device and returns one small
float64 tensor there (no ``.item()``, no host synchronization: the hook of a GPU model can call
it), the second turns that tensor's values, once on the host, into the dictionary
:func:`tensor_stats` returns. On the same device and data both give the same numbers, bit for bit:
for a finite tensor they run the very operations of :func:`tensor_stats`; with NaN or Inf,
:func:`tensor_stats` itself goes through them (the non-finite elements replaced by a finite
element of the tensor for the minimum and maximum, and by 0 for the sums, instead of being
removed: the same values, with no data-dependent size, which a device could not compute
without waiting; mean and L2 may differ in the last bit from the compacting version before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

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
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):  # NaN or Inf somewhere: the masked path
        vector, layout = stats_vector(x)
        return stats_from_vector(vector.tolist(), layout)
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


@dataclass(frozen=True)
class StatsLayout:
    """Where each value sits in a :func:`stats_vector`: ``[nan, finite, nonzero, min, max]``, then
    ``chunks`` pairs of (sum, sum of squares), then ``samples`` sampled values; ``sampled``: a
    sample was asked for (an empty tensor's is the empty list)."""

    numel: int
    chunks: int
    samples: int
    sampled: bool = False


def stats_vector(t: torch.Tensor, sample_index: torch.Tensor | None = None) -> tuple[torch.Tensor, StatsLayout]:
    """Every reduction :func:`tensor_stats` needs, queued on ``t``'s device, as one float64 1-D
    tensor on that device, with its layout; nothing waits for the device (no ``.item()``,
    ``float()`` or data-dependent shapes). ``sample_index`` (default None: no sample) is an int64
    tensor of flat positions on ``t``'s device (:func:`~parity.store.format.sample_positions`):
    the values there are appended, as :func:`sample_values` takes them. Counts are exact up to
    2^53 elements. An empty ``t`` gives an empty tensor. Finite and non-finite tensors run the
    same operations: NaN/Inf are replaced by a finite element of ``t`` (the first) for the
    minimum and maximum, and by 0 for the sums, which run in :data:`SUM_CHUNK` chunks widened to
    float64, as in :func:`tensor_stats`. Device memory it takes for a moment: a bool mask and
    one copy of ``t`` (for the minimum and maximum), then 8 bytes per element of one chunk."""
    numel = t.numel()
    sampled = sample_index is not None
    samples = 0 if sample_index is None or numel == 0 else sample_index.numel()
    if numel == 0:
        return torch.empty(0, dtype=torch.float64, device=t.device), StatsLayout(0, 0, 0, sampled)
    x = t if t.is_floating_point() else t.to(torch.float64)
    flat = x.reshape(-1)
    finite = torch.isfinite(flat)
    fill = flat.index_select(0, finite.to(torch.uint8).argmax().reshape(1))  # a finite element, if any
    lo, hi = torch.aminmax(torch.where(finite, flat, fill))  # == aminmax(x) when every element is finite
    scalars = [torch.isnan(flat).sum(), finite.sum(), torch.count_nonzero(flat), lo, hi]
    chunks = 0
    for start in range(0, numel, SUM_CHUNK):  # NaN/Inf as 0 (== x when every element is finite), chunk by chunk
        end = start + SUM_CHUNK
        chunk = torch.where(finite[start:end], flat[start:end], 0).to(torch.float64)
        scalars += [chunk.sum(), torch.dot(chunk, chunk)]
        chunks += 1
    vector = torch.stack(scalars)  # float64: the sums are, and stack promotes (counts exact below 2^53)
    if samples:
        vector = torch.cat([vector, t.reshape(-1).index_select(0, sample_index)])
    return vector, StatsLayout(numel, chunks, samples, sampled)


def stats_from_vector(values: Sequence[float], layout: StatsLayout) -> dict[str, Any]:
    """The statistics of :func:`tensor_stats` (and, when the vector holds a sample, ``"sample"``)
    from the host values of a :func:`stats_vector`: the chunk sums are added in order, as
    :func:`tensor_stats` adds them."""
    numel = layout.numel
    stats: dict[str, Any] = {"min": None, "max": None, "mean": None, "abs_max": None, "l2": None,
                             "nan": 0, "inf": 0, "zero": 0, "numel": numel}
    if numel == 0:
        if layout.sampled:
            stats["sample"] = []
        return stats
    nan, finite = int(values[0]), int(values[1])
    stats.update(nan=nan, inf=numel - nan - finite, zero=numel - int(values[2]))
    if finite:
        lo, hi = float(values[3]), float(values[4])
        total = squares = 0.0
        for i in range(layout.chunks):
            total += values[5 + 2 * i]
            squares += values[6 + 2 * i]
        stats.update(min=lo, max=hi, abs_max=max(abs(lo), abs(hi)), mean=total / finite, l2=math.sqrt(squares))
    if layout.sampled:
        start = 5 + 2 * layout.chunks
        stats["sample"] = [float(v) for v in values[start:start + layout.samples]]
    return stats
