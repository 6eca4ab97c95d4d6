"""Strict JSON for numbers that may not be finite: ``inf``, ``-inf`` and ``nan`` become strings.

Used by the manifest writer, the JSON report and the HTML report alike, so every file parity
writes follows one convention (documented in docs/json-schema.md).
"""

from __future__ import annotations

import math
from typing import Any


def json_float(value: Any) -> Any:
    """A non-finite float as the string ``inf``, ``-inf`` or ``nan``; anything else unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def json_safe(value: Any) -> Any:
    """:func:`json_float` applied through dicts, lists and tuples (tuples become lists)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return json_float(value)
