"""Statistics-based comparison, for dumps captured with ``mode="stats"`` (no tensor data).

Without the elements, parity checks **necessary conditions** of the elementwise rule
``|t − b| ≤ max(atol, rtol·|b|)``: if any of them is violated, the elementwise comparison
would certainly fail. For a pair of n elements with baseline stats ``b`` and target stats ``t``:

=========  ============================================================================
stat       bound on |stat(t) − stat(b)|
=========  ============================================================================
l2         sqrt(n·atol² + rtol²·l2(b)²)       (‖t‖ − ‖b‖ ≤ ‖t − b‖ ≤ that)
mean       atol + rtol·abs_max(b)
min, max   max(atol, rtol·abs_max(b))
abs_max    max(atol, rtol·abs_max(b))
=========  ============================================================================

``atol`` is the absolute floor that applies: with the default scale floor,
``max(atol, scale·rms(b))`` with ``rms(b) = l2(b)/√n`` from the stored statistics (the only
scale a statistics-only dump has).

When both records hold a ``sample`` of the same size (statistics-only capture stores one: the
values at the same spread-out positions of tensors of one size; against a full dump the engine
reads the full side's values at those positions), the sampled elements are
also compared by the elementwise rule itself (NaN matches NaN, an infinity the same infinity):
that can catch what statistics cannot see — a permutation (heads or channels in the wrong
order), a sign flip of some elements — which keep every statistic but move the values. It is
a sample: a change confined to a fraction f of the elements is seen with probability about
1 - (1 - f)^k (k = 32: 87% for f = 1/16, e.g. two of 32 heads swapped).

Outcome ``fail`` when a bound is violated or a sampled element is outside tolerance;
``nonfinite`` when NaN/Inf counts differ (or sampled elements disagree on NaN/Inf: a
non-finite value on one side only, or different ones);
``degenerate`` when one side is all zeros (zero count = n) and the other is not. Otherwise
``pass`` — meaning "no statistic (and no sampled element) contradicts the tolerance", a weaker
statement than an elementwise pass, and every such outcome is marked ``statistics_based``. The
per-layer error along depth uses ``|l2(t) − l2(b)| / l2(b)``.
"""

from __future__ import annotations

import math
from typing import Any

from parity.compare.tolerance import Tolerance
from parity.store.format import Record, sample_positions


def _num(stats: dict[str, Any], key: str) -> float | None:
    value = stats.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return None


def stats_check(b: Record, t: Record, tol: Tolerance) -> tuple[str, str, dict[str, Any], float]:
    """(outcome kind, reason, per-stat details, l2 relative difference) for a pair without data."""
    sb, st = b.stats, t.stats
    n = b.numel
    details: dict[str, Any] = {}
    for key in ("nan", "inf"):
        if int(sb.get(key, 0) or 0) != int(st.get(key, 0) or 0):
            return "nonfinite", (f"{key.upper()} count differs: baseline {sb.get(key, 0)}, target {st.get(key, 0)} "
                                 "(statistics-based)"), details, math.inf
    zb, zt = int(sb.get("zero", 0) or 0), int(st.get("zero", 0) or 0)
    l2b, l2t = _num(sb, "l2"), _num(st, "l2")
    rel = abs(l2t - l2b) / l2b if l2b and l2t is not None else (0.0 if l2b == l2t else math.inf)
    amax = _num(sb, "abs_max") or 0.0
    atol = tol.effective_atol  # with the scale floor, computed from the stored l2 (engine.evaluate_pair)
    bounds = {"l2": math.sqrt(n * atol ** 2 + (tol.rtol * (l2b or 0.0)) ** 2),
              "mean": atol + tol.rtol * amax,
              "min": max(atol, tol.rtol * amax), "max": max(atol, tol.rtol * amax),
              "abs_max": max(atol, tol.rtol * amax)}
    violated = []
    for key, bound in bounds.items():
        vb, vt = _num(sb, key), _num(st, key)
        if vb is None or vt is None:
            continue
        diff = abs(vt - vb)
        ok = diff <= bound
        details[key] = {"baseline": vb, "target": vt, "diff": diff, "bound": bound, "ok": ok}
        if not ok:
            violated.append(f"{key} differs by {diff:.3g} > bound {bound:.3g}")
    sample = _compare_sample(sb.get("sample"), st.get("sample"), n, tol)
    if sample is not None:
        details["sample"] = sample
        if sample["nonfinite"]:
            return "nonfinite", (f"NaN/Inf disagree at {sample['nonfinite']} of {sample['size']} sampled elements "
                                 "(statistics-based)"), details, rel
        if sample["mismatched"]:
            violated.append(f"{sample['mismatched']} of {sample['size']} sampled elements outside tolerance "
                            f"(max |Δ| {sample['max_abs']:.3g} at flat index {sample['max_abs_at']})")
    if n and ((zt == n) != (zb == n)) and violated:
        side = "target" if zt == n else "baseline"
        return "degenerate", f"{side} is all zeros while the other side is not (statistics-based)", details, rel
    if violated:
        return "fail", "; ".join(violated) + " (statistics-based: the elementwise rule cannot hold)", details, rel
    if sample is not None:
        return "pass", (f"no statistic contradicts the tolerance and the {sample['size']} sampled elements are within "
                        "it (statistics-based; the other elements not compared)"), details, rel
    return "pass", "no statistic contradicts the tolerance (statistics-based; elements not compared)", details, rel


def _compare_sample(sb: Any, st: Any, numel: int, tol: Tolerance) -> dict[str, Any] | None:
    """The sampled elements judged by the elementwise rule (:func:`~parity.compare.metrics.pair_metrics`),
    or None when the two records do not hold samples of one size (the reader has turned them into floats)."""
    if not isinstance(sb, list) or not isinstance(st, list) or len(sb) != len(st) or not sb:
        return None
    import numpy as np

    from parity.compare.metrics import pair_metrics

    with np.errstate(all="ignore"):  # overflowing values: inf, as the rule computes them
        m = pair_metrics(np.asarray(sb, np.float64), "float64", np.asarray(st, np.float64), "float64",
                         rtol=tol.rtol, atol=tol.effective_atol)
    return {"size": len(sb), "mismatched": m.mismatched - m.nonfinite_mismatch, "nonfinite": m.nonfinite_mismatch,
            "max_abs": m.max_abs,
            "max_abs_at": sample_positions(numel, len(sb))[m.max_abs_index[0]] if m.max_abs_index else -1,
            "ok": m.mismatched == 0}
