"""Metrics of one pair of tensors, computed in one chunked pass with float64 accumulation.

For baseline ``b`` (the reference) and target ``t``, over the elements finite on both sides:

- ``max_abs``: max |t−b|, with its index and both values there; ``mean_abs``: mean |t−b|.
- ``max_rel``: max |t−b| / |b| over elements with b ≠ 0 (``inf`` if some b = 0 has t ≠ 0).
- ``rel_l2``: ‖t−b‖₂ / ‖b‖₂ (0 when both are 0, ``inf`` when only b is 0).
- ``rms_baseline``: √(Σb² / n) over the elements finite on both sides (the scale floor's scale).
- ``cosine``: ⟨t,b⟩ / (‖t‖‖b‖) (1 when both are all-zero, 0 when only one is).
- ``sqnr_db``: 10·log10(‖b‖² / ‖t−b‖²) (``inf`` when identical).
- ``mismatched`` / ``mismatch_fraction``: elements with |t−b| > max(atol, rtol·|b|).
- ``needed_atol``: the smallest atol that passes every element at the given rtol;
  ``needed_rtol``: the smallest rtol that passes at the given atol (``inf`` when an element
  with b = 0 fails the atol).
- ``nan_*``, ``inf_*``: counts per side; ``nonfinite_mismatch``: positions where the two sides
  are not the same non-finite value (a NaN facing a number, +inf facing −inf, …).
- ``all_zero_*``, ``constant_*``: degenerate-tensor flags per side (constant needs ≥ 2 elements).

``CHUNK_ELEMENTS`` (default 64 Ki elements) bounds the working memory per chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from parity.jsonsafe import json_safe
from parity.store.safetensors_io import to_float

__all__ = ["PairMetrics", "assemble_metrics", "pair_metrics", "worst_failing_element"]

#: Elements per chunk (default 64 Ki: 512 KB per float64 temporary, cache-friendly).
CHUNK_ELEMENTS = 1 << 16


@dataclass
class PairMetrics:
    """Everything measured on one pair; see the module docstring for definitions."""

    numel: int
    max_abs: float
    max_abs_index: list[int]
    baseline_at_max: float | None
    target_at_max: float | None
    mean_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    sqnr_db: float
    mismatched: int
    mismatch_fraction: float
    needed_rtol: float
    needed_atol: float
    nan_baseline: int
    nan_target: int
    inf_baseline: int
    inf_target: int
    nonfinite_mismatch: int
    all_zero_baseline: bool
    all_zero_target: bool
    constant_baseline: bool
    constant_target: bool
    rms_baseline: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become the strings ``inf``, ``-inf``, ``nan``)."""
        # what asdict() gives (field order, the index list copied), without its recursive deep copy
        return {f: json_safe(getattr(self, f)) for f in _FIELD_NAMES}


_FIELD_NAMES = tuple(f.name for f in fields(PairMetrics))


class _Side:
    def __init__(self) -> None:
        self.nan = 0
        self.inf = 0
        self.nonzero = 0
        self.lo = math.inf
        self.hi = -math.inf
        self.first: float | None = None
        self.varies = False

    def update(self, x: np.ndarray, finite: np.ndarray | None) -> None:
        if finite is not None:
            self.nan += int(np.isnan(x).sum())
            self.inf += int(np.isinf(x).sum())
        self.nonzero += int(np.count_nonzero(x))
        if finite is not None:
            x = x[finite]
        if x.size:
            lo, hi = float(np.min(x)), float(np.max(x))
            if self.first is None:
                self.first = float(x[0])
            if not lo == hi == self.first:
                self.varies = True
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)


def pair_metrics(baseline: np.ndarray, baseline_dtype: str, target: np.ndarray, target_dtype: str,
                 *, rtol: float, atol: float, chunk: int = CHUNK_ELEMENTS) -> PairMetrics:
    """Compute :class:`PairMetrics` of two same-sized storage arrays (bfloat16 as uint16 bits)."""
    b_flat = baseline.reshape(-1)
    t_flat = target.reshape(-1)
    n = b_flat.size
    if t_flat.size != n:
        raise ValueError("pair_metrics needs arrays of the same size")
    sb, st = _Side(), _Side()
    sum_abs = sum_dd = sum_bb = sum_tt = sum_tb = 0.0
    max_abs, max_abs_at = -1.0, 0
    max_rel = 0.0
    needed_atol = needed_rtol = 0.0
    mismatched = nonfinite_mismatch = counted = 0
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        b = to_float(b_flat[start:end], baseline_dtype)
        t = to_float(t_flat[start:end], target_dtype)
        with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf in the fast check
            b_ok = np.isfinite(b) if not math.isfinite(float(np.sum(b))) else None
            t_ok = np.isfinite(t) if not math.isfinite(float(np.sum(t))) else None
        sb.update(b, b_ok)
        st.update(t, t_ok)
        if b_ok is not None or t_ok is not None:
            both = (b_ok if b_ok is not None else True) & (t_ok if t_ok is not None else True)
            both = np.broadcast_to(both, b.shape)
            same_nonfinite = ~both & ((b == t) | (np.isnan(b) & np.isnan(t)))
            nonfinite_mismatch += int((~both & ~same_nonfinite).sum())
            index_map = np.flatnonzero(both)
            b, t = b[both], t[both]
        else:
            index_map = None
        if b.size == 0:
            continue
        counted += b.size
        d = t - b
        ad = np.abs(d)
        ab = np.abs(b)
        sum_abs += float(ad.sum())
        sum_dd += float(np.dot(d, d))
        sum_bb += float(np.dot(b, b))
        sum_tt += float(np.dot(t, t))
        sum_tb += float(np.dot(t, b))
        i = int(np.argmax(ad))
        if ad[i] > max_abs:
            max_abs = float(ad[i])
            max_abs_at = start + (int(index_map[i]) if index_map is not None else i)
        thr = np.multiply(ab, rtol, out=d)  # d is no longer needed: reuse its memory
        over_rel = ad > thr
        if over_rel.any():
            needed_atol = max(needed_atol, float(np.max(ad, where=over_rel, initial=0.0)))
            mismatched += int(np.count_nonzero(over_rel & (ad > atol)))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.divide(ad, ab, out=thr)  # x/0 -> inf, 0/0 -> nan (ignored by fmax)
        max_rel = max(max_rel, float(np.fmax.reduce(rel, initial=0.0)))
        over_abs = ad > atol
        if over_abs.any():
            chunk_rtol = float(np.fmax.reduce(rel, where=over_abs, initial=0.0))
            if chunk_rtol != math.inf:
                # ad/ab can round down so that (ad/ab)*ab < ad: step up one ulp so it really passes
                if np.any(over_abs & (chunk_rtol * ab < ad)):
                    chunk_rtol = float(np.nextafter(chunk_rtol, math.inf))
            needed_rtol = max(needed_rtol, chunk_rtol)
    mismatched += nonfinite_mismatch
    return assemble_metrics(
        baseline=baseline, baseline_dtype=baseline_dtype, target=target, target_dtype=target_dtype,
        counted=counted, sums=(sum_abs, sum_dd, sum_bb, sum_tt, sum_tb), max_abs=max_abs, max_abs_at=max_abs_at,
        max_rel=max_rel, mismatched=mismatched, needed_rtol=needed_rtol, needed_atol=needed_atol,
        nan=(sb.nan, st.nan), inf=(sb.inf, st.inf), nonfinite_mismatch=nonfinite_mismatch,
        all_zero=(n > 0 and sb.nonzero == 0 and sb.nan == 0, n > 0 and st.nonzero == 0 and st.nan == 0),
        varies=(sb.varies, st.varies))


def assemble_metrics(*, baseline: np.ndarray, baseline_dtype: str, target: np.ndarray, target_dtype: str,
                     counted: int, sums: tuple[float, float, float, float, float], max_abs: float,
                     max_abs_at: int, max_rel: float, mismatched: int, needed_rtol: float, needed_atol: float,
                     nan: tuple[int, int], inf: tuple[int, int], nonfinite_mismatch: int,
                     all_zero: tuple[bool, bool], varies: tuple[bool, bool]) -> PairMetrics:
    """The final formulas shared by every way of accumulating a pair (numpy chunks, compiled kernel).

    ``sums`` are Σ|d|, Σd², Σb², Σt², Σt·b over the ``counted`` elements finite on both sides;
    ``mismatched`` already includes ``nonfinite_mismatch``.
    """
    sum_abs, sum_dd, sum_bb, sum_tt, sum_tb = sums
    n = baseline.size
    norm_b, norm_t, norm_d = math.sqrt(sum_bb), math.sqrt(sum_tt), math.sqrt(sum_dd)
    if norm_b > 0:
        rel_l2 = norm_d / norm_b
    else:
        rel_l2 = 0.0 if norm_d == 0 else math.inf
    if sum_dd == 0 and nonfinite_mismatch == 0:
        cosine = 1.0  # identical: exactly 1, not 1 - rounding
    elif norm_b > 0 and norm_t > 0:
        cosine = max(-1.0, min(1.0, sum_tb / (norm_b * norm_t)))
    else:
        cosine = 1.0 if norm_b == norm_t == 0 else 0.0
    if sum_dd == 0:
        sqnr = math.inf
    elif sum_bb == 0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(sum_bb / sum_dd)
    found = counted > 0  # some element finite on both sides: max_abs_at is meaningful
    index = [int(i) for i in np.unravel_index(max_abs_at, baseline.shape)] if found else []
    b_at = t_at = None
    if found:
        b_flat, t_flat = baseline.reshape(-1), target.reshape(-1)
        b_at = float(to_float(b_flat[max_abs_at:max_abs_at + 1], baseline_dtype)[0])
        t_at = float(to_float(t_flat[max_abs_at:max_abs_at + 1], target_dtype)[0])
    return PairMetrics(
        numel=n, max_abs=max(max_abs, 0.0), max_abs_index=index, baseline_at_max=b_at, target_at_max=t_at,
        mean_abs=sum_abs / counted if counted else 0.0, max_rel=max_rel, rel_l2=rel_l2, cosine=cosine,
        sqnr_db=sqnr, mismatched=mismatched, mismatch_fraction=mismatched / n if n else 0.0,
        needed_rtol=needed_rtol, needed_atol=needed_atol,
        nan_baseline=nan[0], nan_target=nan[1], inf_baseline=inf[0], inf_target=inf[1],
        nonfinite_mismatch=nonfinite_mismatch, all_zero_baseline=all_zero[0], all_zero_target=all_zero[1],
        constant_baseline=n > 1 and not varies[0], constant_target=n > 1 and not varies[1],
        rms_baseline=math.sqrt(sum_bb / counted) if counted else 0.0,
    )


def worst_failing_element(baseline: np.ndarray, baseline_dtype: str, target: np.ndarray, target_dtype: str,
                          *, rtol: float, atol: float, chunk: int = CHUNK_ELEMENTS) -> dict[str, Any] | None:
    """The element that fails the rule ``|t−b| ≤ max(atol, rtol·|b|)`` by the largest factor.

    Returns ``{"index", "baseline", "target", "abs_diff", "allowed", "excess"}`` (``excess`` =
    |t−b| / allowed, > 1; ``inf`` where allowed is 0) or None when no finite element fails.
    One chunked pass, in float32 for data float32 holds exactly (float32, float16, bfloat16:
    the ratio only ranks the elements), in float64 otherwise; the chosen element's numbers are
    recomputed in float64. The largest |Δ| is a different element in general (a large baseline
    value allows a large |Δ|): the report shows both.
    """
    work = np.float32 if {baseline_dtype, target_dtype} <= {"float32", "float16", "bfloat16"} else np.float64
    b_flat, t_flat = baseline.reshape(-1), target.reshape(-1)
    best_excess, best_at = 0.0, -1
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for start in range(0, b_flat.size, chunk):
            b = to_float(b_flat[start:start + chunk], baseline_dtype, work)
            t = to_float(t_flat[start:start + chunk], target_dtype, work)
            ad = np.abs(t - b)
            allowed = np.maximum(work(atol), work(rtol) * np.abs(b))
            excess = np.where(ad > allowed, ad / allowed, 0)
            excess = np.nan_to_num(excess, nan=0.0, posinf=np.inf)
            i = int(np.argmax(excess))
            if excess[i] > max(best_excess, 0.0) and excess[i] > 0:
                best_excess, best_at = float(excess[i]), start + i
    if best_at < 0:
        return None
    b_at = float(to_float(b_flat[best_at:best_at + 1], baseline_dtype)[0])
    t_at = float(to_float(t_flat[best_at:best_at + 1], target_dtype)[0])
    ad_at, allowed_at = abs(t_at - b_at), max(atol, rtol * abs(b_at))
    if not ad_at > allowed_at:  # a float32 rounding of the ratio near 1: not a failing element after all
        return None
    return {"index": [int(i) for i in np.unravel_index(best_at, baseline.shape)], "baseline": b_at, "target": t_at,
            "abs_diff": ad_at, "allowed": allowed_at, "excess": ad_at / allowed_at if allowed_at > 0 else math.inf}


#: Percentiles of :func:`error_distribution`.
PERCENTILES = (50, 90, 99)
#: Mantissa bits of the float dtypes, to find the lower precision of a pair.
MANTISSA_BITS = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7}


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 ``values`` rounded to ``dtype`` (round to nearest even) and widened back to float64.
    bfloat16, which numpy lacks, is rounded from float32 on the bits (NaN kept NaN)."""
    if dtype == "bfloat16":
        with np.errstate(over="ignore", invalid="ignore"):
            bits = values.astype(np.float32).view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
        out = rounded.view(np.float32).astype(np.float64)
        return np.where(np.isnan(values), np.nan, out)
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype).astype(np.float64)


def error_distribution(baseline: np.ndarray, baseline_dtype: str, target: np.ndarray, target_dtype: str,
                       ) -> dict[str, Any]:
    """How the error of one pair is spread, over the elements finite on both sides.

    ``abs``: percentiles :data:`PERCENTILES` and max of |t−b|; ``rel``: the same of |t−b|/|b|
    over elements with b ≠ 0; ``downcast`` (float pairs of different dtypes): both sides rounded
    to the lower precision of the two (float16 against bfloat16: bfloat16) — ``dtype``, ``equal_share`` (share of
    elements then bitwise equal), ``max_abs`` and ``rel_l2`` after rounding. Equal after rounding
    means the target is the baseline rounded to its precision there: precision, not a different
    computation. One pass in float64 over the pair (used for the first divergence only).
    """
    b = to_float(baseline.reshape(-1), baseline_dtype)
    t = to_float(target.reshape(-1), target_dtype)
    finite = np.isfinite(b) & np.isfinite(t)
    b, t = b[finite], t[finite]
    out: dict[str, Any] = {"elements": int(b.size)}
    if not b.size:
        return out
    diff = np.abs(t - b)
    out["abs"] = {**{f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(diff, PERCENTILES))},
                  "max": float(diff.max())}
    nonzero = b != 0
    if nonzero.any():
        rel = diff[nonzero] / np.abs(b[nonzero])
        out["rel"] = {**{f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(rel, PERCENTILES))},
                      "max": float(rel.max())}
    floats = [d for d in (baseline_dtype, target_dtype) if d in MANTISSA_BITS]
    if len(floats) == 2 and baseline_dtype != target_dtype:
        lower = min(floats, key=lambda d: (MANTISSA_BITS[d], d != "bfloat16"))
        rb, rt = round_to(b, lower), round_to(t, lower)
        with np.errstate(over="ignore", invalid="ignore"):
            after = np.abs(rt - rb)
            norm = float(np.sqrt(np.sum(rb * rb)))
        out["downcast"] = {"dtype": lower, "equal_share": float(np.mean(rb == rt)),
                           "max_abs": float(np.nanmax(after)) if after.size else 0.0,
                           "rel_l2": float(np.sqrt(np.sum(after * after)) / norm) if norm > 0 else None}
    return out
