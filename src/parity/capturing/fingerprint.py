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

The record's ``stats`` are the usual ones (:func:`~parity.capturing.stats.tensor_stats`). Cost:
one pass over every parameter of the tapped modules, once per run (~0.2 s for 135M float32
parameters on one core), on the thread that runs the model.
"""

from __future__ import annotations

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
    return values, tensor_stats(values), tags
