"""Fingerprints of parameters: enough to tell "these weights differ" without storing the weights.

A fingerprint is a statistics-only record (no tensor data) whose tags hold:

- ``role``: ``"parameter"``;
- ``digest``: XXH3-64 of the parameter's bytes in its own dtype (:mod:`parity.store.checksum`);
- ``digest_bfloat16`` / ``digest_float16`` (float32 and float64 parameters) and
  ``digest_float32`` (float64 parameters): the digest of the parameter rounded to that dtype
  (round to nearest even, as ``Tensor.to`` and a lower-precision model load do). A float32
  baseline and a bfloat16 target hold the *same* weights exactly when the baseline's
  ``digest_bfloat16`` equals the target's ``digest``;
- ``quantized``: the class name of a tensor subclass (torchao's quantized weights); its
  statistics are those of ``dequantize()`` and it has no digest (see
  :mod:`parity.compare.fingerprint` for how such a pair is judged).

The record's ``stats`` have the usual keys (:data:`~parity.store.format.STAT_KEYS`); for float
parameters ``mean`` and ``l2`` come from torch's pairwise float32 reductions (float64 parameters:
float64) instead of the float64 accumulation of :func:`~parity.capturing.stats.tensor_stats`
(relative error ~1e-7, and 10-30x faster on CPU: the statistics only say by how much two
fingerprints differ; the digests decide whether they do). Cost: a few passes over every
parameter of the tapped modules, once per run, on the thread that runs the model (measured in
``bench/opt_in_capture.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from parity.capturing.stats import tensor_stats
from parity.store.checksum import checksum, storage_array

#: Lower dtypes a parameter's rounded digests are stored for, by its own dtype.
ROUNDED: dict[torch.dtype, tuple[torch.dtype, ...]] = {
    torch.float64: (torch.float32, torch.bfloat16, torch.float16),
    torch.float32: (torch.bfloat16, torch.float16),
}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest(tensor: torch.Tensor) -> str:
    return checksum(storage_array(tensor.detach().to("cpu").contiguous()))


def parameter_fingerprint(parameter: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """``(values, stats, tags)`` of one parameter: the plain tensor its statistics describe (the
    dequantized one for a quantized subclass), its statistics and the fingerprint tags above."""
    tags: dict[str, Any] = {"role": "parameter"}
    values = parameter.detach()
    if type(values) is not torch.Tensor and hasattr(values, "dequantize"):  # torchao & co: a subclass
        tags["quantized"] = type(values).__name__
        values = values.dequantize()
    elif type(values) is not torch.Tensor:
        values = values.as_subclass(torch.Tensor)
    if "quantized" not in tags:
        tags["digest"] = _digest(values)
        for lower in ROUNDED.get(values.dtype, ()):
            tags[f"digest_{_name(lower)}"] = _digest(values.to(lower))
    return values, _stats(values), tags


def _stats(values: torch.Tensor) -> dict[str, Any]:
    """The statistics of a parameter (see module docstring): tensor_stats' keys and meaning, with
    float32 (float64 for float64 values) pairwise sums for ``mean`` and ``l2``."""
    if not values.is_floating_point() or values.numel() == 0:
        return tensor_stats(values)
    x = values if values.dtype == torch.float64 else values.float()
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/Inf in a weight: the careful path
        return tensor_stats(values)
    numel = x.numel()
    return {"min": lo, "max": hi, "mean": float(x.sum()) / numel, "abs_max": max(abs(lo), abs(hi)),
            "l2": math.sqrt(float((x * x).sum())), "nan": 0, "inf": 0, "zero": numel - int(torch.count_nonzero(x)),
            "numel": numel}
