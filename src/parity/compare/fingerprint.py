"""Judging a pair of parameter fingerprints (:mod:`parity.capturing.fingerprint`).

Rules, in order (``b`` = baseline, ``t`` = target; the lower dtype is the one of fewer bits):

- same dtype: ``identical`` when the digests agree, else ``fail`` — *the weights differ*;
- different float dtypes: the higher side's digest of its values rounded to the lower dtype
  against the lower side's digest: equal is ``pass`` (the same weights, held at lower
  precision: what loading a float32 checkpoint in bfloat16 gives), different is ``fail``;
- a quantized side (a tensor subclass, fingerprinted by its dequantized statistics, no digest)
  or a pair whose rounded digest was not stored: judged by statistics under the pair's
  tolerance (:func:`parity.compare.stats_check.stats_check`), and the reason says so.

The reason of a failing pair gives the relative differences of the L2 norms and means, so "the
weights differ" comes with "by how much". Each pair is one outcome of the ordinary verdict: a
differing parameter is a failure, ordered where the module was first called.
"""

from __future__ import annotations

import math
from typing import Any

from parity.compare.tolerance import Tolerance
from parity.compare.verdict import precision_rank


def is_fingerprint(record: Any) -> bool:
    """Whether a record is a parameter fingerprint."""
    return record is not None and record.tags.get("role") == "parameter" and record.file is None


def _rel(a: Any, b: Any) -> float | None:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not math.isfinite(a - b):
        return None
    return abs(a - b) / abs(b) if b else (0.0 if a == b else math.inf)


def _size(b: Any, t: Any) -> str:
    parts = []
    for key in ("l2", "mean", "abs_max"):
        rel = _rel(t.stats.get(key), b.stats.get(key))
        if rel is not None:
            parts.append(f"{key} {'+' if (t.stats.get(key) or 0) >= (b.stats.get(key) or 0) else '-'}{rel:.3g} rel")
    return ", ".join(parts) or "no statistics to compare"


def judge_fingerprints(b: Any, t: Any, tolerance: Tolerance) -> tuple[str, str, list[str]]:
    """``(kind, reason, notes)`` for a pair of parameter fingerprints (rules above)."""
    notes: list[str] = []
    quantized = [f"{side} is a quantized {r.tags['quantized']}" for side, r in (("baseline", b), ("target", t))
                 if r.tags.get("quantized")]
    if not quantized:
        if b.dtype == t.dtype:
            if b.tags.get("digest") == t.tags.get("digest"):
                return "identical", "same weights (digests agree)", notes
            return "fail", f"the weights differ (digests disagree): {_size(b, t)}", notes
        high, low = (b, t) if precision_rank(b.dtype) >= precision_rank(t.dtype) else (t, b)
        rounded = high.tags.get(f"digest_{low.dtype}")
        if rounded is not None:
            if rounded == low.tags.get("digest"):
                return "pass", f"same weights: the {high.dtype} values rounded to {low.dtype} are the {low.dtype} ones", notes
            return "fail", (f"the weights differ beyond rounding to {low.dtype} (digests disagree after rounding): "
                            f"{_size(b, t)}"), notes
        quantized = [f"no {low.dtype} digest of the {high.dtype} side"]
    from parity.compare.stats_check import stats_check

    kind, reason, _, _ = stats_check(b, t, tolerance)
    notes.append(f"compared by statistics only: {'; '.join(quantized)}")
    return kind, f"statistics: {reason}", notes
