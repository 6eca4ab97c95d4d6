"""Flattening a module's output into named tensors.

Rules (stable, so names line up between runs):

- a tensor is recorded under the module name;
- a tuple or list element ``i`` under ``NAME.i``;
- a dict or transformers ``ModelOutput`` entry ``k`` under ``NAME.k`` (entries that are None
  are skipped, as ModelOutput itself does);
- a dataclass field ``f`` under ``NAME.f``;
- ``None`` and Python scalars/strings are skipped silently (they carry no activation);
- any other object (a KV cache, a custom class) is returned in ``skipped`` so the caller can
  note it once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def flatten_output(name: str, value: Any, *, depth: int = 0) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Return ``([(name, tensor), ...], [skipped descriptions])`` for a module output."""
    found: list[tuple[str, torch.Tensor]] = []
    skipped: list[str] = []
    _walk(name, value, found, skipped, depth)
    return found, skipped


def _walk(name: str, value: Any, found: list, skipped: list, depth: int) -> None:
    if isinstance(value, torch.Tensor):
        found.append((name, value))
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        return
    elif depth > 8:
        skipped.append(f"{name}: nested deeper than 8 levels")
    elif isinstance(value, dict):  # includes transformers ModelOutput (an OrderedDict)
        for key, item in value.items():
            _walk(f"{name}.{key}", item, found, skipped, depth + 1)
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            _walk(f"{name}.{index}", item, found, skipped, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _walk(f"{name}.{f.name}", getattr(value, f.name), found, skipped, depth + 1)
    else:
        skipped.append(f"{name}: output of type {type(value).__name__} is not recorded")


def select_element(value: Any, index: int) -> Any:
    """Element ``index`` of a tuple/list output; the value itself when it is not a sequence."""
    if isinstance(value, (tuple, list)):
        return value[index] if index < len(value) else None
    return value
