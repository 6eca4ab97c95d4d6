"""The comparison engine: pair two runs, evaluate every pair, build the :class:`Report`.

One pair is read and evaluated at a time (tensors are memory-mapped and processed in chunks),
so peak memory does not grow with the number of records. Pairs of at least
:data:`FAST_MIN_ELEMENTS` elements use the compiled two-thread kernel of
:mod:`parity.compare.fastpath` when numba is installed (same results); others the numpy
reference of :mod:`parity.compare.metrics`. Defaults of :func:`compare`: no
rename rules, no allow patterns, :class:`TolerancePolicy` defaults (per-dtype table).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from parity.capturing.taps import Tap, compile_tap, layer_of, tap_kind, unmatched_error
from parity.compare.fingerprint import is_fingerprint, judge_fingerprints
from parity.compare.metrics import error_distribution, pair_metrics, worst_failing_element
from parity.compare.pairing import Pair, RenameRule, pair_records
from parity.compare.result import LayerError, Outcome, Report, Side
from parity.compare.tolerance import Tolerance, TolerancePolicy, lower_precision
from parity.compare.verdict import (DEFAULT_M, FIRST_DEPARTURE_U, OK_GRADES, TwinEvidence, declared_dtype,
                                    dtype_mismatch, grade_with_twin, headline,
                                    locate_jump, precision_rank, twin_eps)
from parity.errors import CorruptDataError, DumpError, UsageError
from parity.store.format import FLOAT_DTYPES, Record, sample_positions
from parity.store.reader import Run, load_run
from parity.store.safetensors_io import to_float

Progress = Callable[[int, int, str], None]


def _matches(taps: Sequence[Tap], name: str) -> bool:
    return any(tap.matches(name) for tap in taps)


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


#: Pairs with at least this many elements go through the compiled kernel when numba is there
#: (it wins from about 1 Ki elements: loading its cached machine code takes a few ms); smaller
#: ones through the numpy reference.
FAST_MIN_ELEMENTS = 1 << 10


def _metrics(base: Any, base_dtype: str, target: Any, target_dtype: str, *, rtol: float, atol: float) -> Any:
    if base.size >= FAST_MIN_ELEMENTS:
        from parity.compare import fastpath

        if fastpath.available():
            return fastpath.fast_pair_metrics(base, base_dtype, target, target_dtype, rtol=rtol, atol=atol)
    return pair_metrics(base, base_dtype, target, target_dtype, rtol=rtol, atol=atol)


def attach_worst_failing(outcome: Outcome, pair: Pair, base: Any, target: Any) -> None:
    """Find the element of ``outcome``'s pair that fails the rule by the largest factor and name it
    in the reason, before the largest |Δ| (a different element in general).

    One extra pass over one pair: :func:`compare` does it for the first divergence only (the
    compiled kernel does not track this element, and a pass per failing pair would cost the
    throughput of large failing comparisons).
    """
    m, tol = outcome.metrics, outcome.tolerance
    b, t = pair.baseline, pair.target
    if m is None or tol is None or b is None or t is None or m.mismatched <= m.nonfinite_mismatch:
        return
    worst = _on_pair_data(pair, base, target, lambda b_arr, t_arr: worst_failing_element(
        b_arr, b.dtype, t_arr, t.dtype, rtol=tol.rtol, atol=tol.effective_atol))
    if worst is None:
        return
    outcome.worst_failing = worst
    text = (f"worst element {worst['index']}: |Δ| {_fmt(worst['abs_diff'])} > allowed {_fmt(worst['allowed'])} "
            f"(x{_fmt(worst['excess'])}; baseline {_fmt(worst['baseline'])}, target {_fmt(worst['target'])}); "
            f"largest max |Δ|")
    outcome.reason = outcome.reason.replace("max |Δ|", text, 1)


def attach_distribution(outcome: Outcome, pair: Pair, base: Any, target: Any) -> None:
    """The error distribution of ``outcome``'s pair (:func:`~parity.compare.metrics.error_distribution`):
    percentiles of |Δ| and of the relative error, and the error left after rounding both sides
    to the lower precision. One extra pass over the pair: the first divergence only."""
    b, t = pair.baseline, pair.target
    if outcome.metrics is None or b is None or t is None:
        return
    outcome.distribution = _on_pair_data(pair, base, target,
                                         lambda b_arr, t_arr: error_distribution(b_arr, b.dtype, t_arr, t.dtype))


def _on_pair_data(pair: Pair, base: Any, target: Any, work: Callable[[Any, Any], Any]) -> Any:
    """``work(baseline array, target array)`` on a pair's stored data in the shape it is compared
    in (:func:`read_pair`); the pages are given back afterwards."""
    b, t = pair.baseline, pair.target
    shape = b.shape if b.shape == t.shape else _squeezed(b.shape)
    base_arr, target_arr = read_pair(base, b, target, t)
    try:
        return work(base_arr.reshape(shape), target_arr.reshape(shape))
    finally:
        base.release(b)
        target.release(t)


def attach_routing(outcomes: Sequence[Outcome], pairs: Sequence[Pair], base: Any, target: Any) -> None:
    """Expert-selection agreement (:mod:`parity.compare.routing`) for every router tap pair,
    when the baseline's header records the model's ``experts_per_token``."""
    from parity.compare.routing import is_router, routing_agreement

    k = base.header.model.get("experts_per_token") if base.header.model else None
    if not isinstance(k, int):
        return
    for outcome, pair in zip(outcomes, pairs):
        b, t = pair.baseline, pair.target
        if not is_router(pair.name) or b is None or t is None or outcome.metrics is None or outcome.tolerance is None:
            continue
        tol = outcome.tolerance
        outcome.routing = routing_agreement(base.array(b), target.array(t), k,
                                            lambda x: np.maximum(tol.effective_atol, tol.rtol * np.abs(x)))
        base.release(b)
        target.release(t)


def _incomplete(record: Any) -> str | None:
    return record.tags.get("incomplete") if record is not None else None


def _with_findings(kind: str, reason: str, rank: int, notes: list[str], base: Any, b: Any, target: Any, t: Any,
                   passing: str) -> tuple[str, str, int]:
    """Fold shard findings (multi-rank runs) into an outcome: a degenerate or disagreeing
    replicated copy fails the pair and names its rank (``passing`` then describes the rebuilt
    tensor, which passed); an all-zero or non-finite split/sum shard explains a pair that fails
    anyway (kind ``degenerate``, its rank) and is only a note on one that passes."""
    findings = [("baseline", f) for f in base.findings(b)] + [("target", f) for f in target.findings(t)]
    if not findings:
        return kind, reason, rank
    hard = [item for item in findings if item[1].hard]
    if not hard and kind in OK_GRADES:  # e.g. an all-zero partial sum of an expert rank without tokens
        notes.extend(f"{s} {f.message}" for s, f in findings)
        return kind, reason, rank
    side, worst = next(((s, f) for s, f in (hard or findings) if f.degenerate), (hard or findings)[0])
    notes.extend(f"{s} {f.message}" for s, f in findings if f is not worst)
    if kind == "nonfinite":
        notes.append(f"{side} {worst.message}")
        return kind, reason, worst.rank
    new_reason = f"{side} {worst.message}; " + (passing if kind in OK_GRADES else reason)
    return ("degenerate" if worst.degenerate else "fail"), new_reason, worst.rank


def _sampled(run: Any, record: Any, other: Any) -> Any:
    """The full side of a full dump compared with a statistics-only one: ``record`` with a
    ``stats.sample`` read from its data at the positions of ``other``'s sample (when ``other``
    has one). Its data is read either way, so a multi-rank full side reports its shard findings
    (a degenerate or disagreeing copy) as in a full comparison. Other records come back as they are."""
    if record.file is None:
        return record
    flat = run.raw(record).reshape(-1)
    sample = other.stats.get("sample")
    if "sample" not in record.stats and isinstance(sample, list) and sample:
        values = to_float(flat[sample_positions(flat.size, len(sample))], record.dtype).tolist()
        record = replace(record, stats={**record.stats, "sample": values})
    del flat
    run.release(record)
    return record


@dataclass
class TwinContext:
    """The twin run of precision-aware mode (see :mod:`parity.compare.verdict`).

    ``records`` maps (name, step, rank) to the twin's records; ``m`` is the twin rule's factor
    (default :data:`~parity.compare.verdict.DEFAULT_M`); ``equal_so_far`` tracks, per
    (step, rank), whether the target equalled the lower-precision run at every tap so far.
    """

    run: Any
    records: dict[tuple[str, int, int], Any]
    m: float = DEFAULT_M
    equal_so_far: dict[tuple[int, int], bool] = field(default_factory=dict)

    @classmethod
    def open(cls, run: Any, m: float = DEFAULT_M) -> "TwinContext":
        """Index ``run``'s records (a loaded run or its logical view)."""
        return cls(run, {(r.name, r.step, r.rank): r for r in run.records}, m)


def _rel_l2(reference: Any, ref_dtype: str, other: Any, other_dtype: str) -> float:
    return _metrics(reference, ref_dtype, other, other_dtype, rtol=0.0, atol=0.0).rel_l2


def _twin_evidence(twin: TwinContext, b: Any, base_arr: Any, t: Any, target_arr: Any, shape: tuple[int, ...],
                   target_error: float, notes: list[str]) -> TwinEvidence | None:
    """Measure the twin rule's distances for one pair, or None (with a note) when the twin lacks it."""
    w = twin.records.get((b.name, b.step, b.rank))
    if w is None or w.numel != b.numel or w.file is None:
        why = "has no record of it" if w is None else ("holds statistics only" if w.file is None
                                                      else f"has shape {list(w.shape)}")
        notes.append(f"the twin run {why}: judged by the tolerance alone")
        return None
    twin_arr = twin.run.raw(w).reshape(shape)
    twin_error = _rel_l2(base_arr, b.dtype, twin_arr, w.dtype)
    if precision_rank(w.dtype) <= precision_rank(b.dtype):  # the twin is the run at the lower precision
        noise = twin_error
        distance = _rel_l2(twin_arr, w.dtype, target_arr, t.dtype)
        low, reference = w.dtype, "twin"
    else:  # both sides at the lower precision; the twin is the higher-precision run
        noise = _rel_l2(twin_arr, w.dtype, base_arr, b.dtype)
        distance = target_error
        low, reference = b.dtype, "baseline"
    del twin_arr
    twin.run.release(w)
    low = lower_precision(low, t.dtype)
    eps = twin_eps(low)
    return TwinEvidence(distance=distance, noise=noise, bound=twin.m * noise + eps, m=twin.m, eps=eps,
                        target_error=target_error, twin_error=twin_error, low_dtype=low, reference=reference)


def _open_twin(twin: Any, shards: Sequence[str], m: float) -> TwinContext:
    """The twin dump as a :class:`TwinContext` (its logical view when multi-rank); a dump without
    tensors is a UsageError."""
    from parity.align.shards import logical_view, shard_rules

    run: Any = as_run(twin)
    run = logical_view(run, shard_rules(list(shards))) if isinstance(run, Run) else run
    if run.header.mode == "stats" or not run.records:
        run.close()
        raise UsageError(f"twin dump {run.path} holds no tensors: the twin rule needs a full capture")
    return TwinContext.open(run, m)


def _stored_rms(record: Any) -> float | None:
    """RMS of a record's finite elements from its stored statistics (``l2``), or None."""
    stats = record.stats
    l2 = stats.get("l2")
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2):
        return None
    finite = record.numel - int(stats.get("nan") or 0) - int(stats.get("inf") or 0)
    return float(l2) / math.sqrt(finite) if finite > 0 else None


def _scaled_metrics(base_arr: Any, b: Any, target_arr: Any, t: Any, tolerance: Tolerance) -> tuple[Any, Tolerance]:
    """Metrics under the tolerance, with the scale floor ``max(atol, scale·rms(b))`` applied.

    One pass when the baseline record stores its L2 norm (every parity capture does): the floor
    is computed from it, and the pass itself measures the true RMS — a stored statistic that
    disagrees with the data (a corrupted or doctored dump) is never trusted: the pair is then
    measured again with the floor from the data. Without a stored norm, the first pass uses the
    plain atol and only a pair that fails it is measured again with the floor. The returned
    tolerance carries ``floor`` exactly when the metrics were measured with it (the needed
    tolerances are relative to ``effective_atol``).
    """
    if tolerance.scale > 0 and (hint := _stored_rms(b)) is not None:
        floor = max(tolerance.atol, tolerance.scale * hint)
        metrics = _metrics(base_arr, b.dtype, target_arr, t.dtype, rtol=tolerance.rtol, atol=floor)
        if math.isclose(metrics.rms_baseline, hint, rel_tol=1e-6):
            return metrics, replace(tolerance, floor=floor)
    metrics = _metrics(base_arr, b.dtype, target_arr, t.dtype, rtol=tolerance.rtol, atol=tolerance.atol)
    if tolerance.scale <= 0:
        return metrics, tolerance
    floor = max(tolerance.atol, tolerance.scale * metrics.rms_baseline)
    if metrics.mismatched > metrics.nonfinite_mismatch and floor > tolerance.atol:
        metrics = _metrics(base_arr, b.dtype, target_arr, t.dtype, rtol=tolerance.rtol, atol=floor)
        return metrics, replace(tolerance, floor=floor)
    return metrics, tolerance


def evaluate_pair(pair: Pair, base: Run, target: Run, policy: TolerancePolicy, *,
                  allow_missing: Sequence[Tap] = (), allow_failed: Sequence[Tap] = (),
                  twin: TwinContext | None = None, salvage: bool = False) -> Outcome:
    """:func:`_evaluate_pair`; with ``salvage`` (default False) a pair whose data is corrupted
    (:class:`~parity.errors.CorruptDataError`: a checksum mismatch, a damaged shard) is the
    outcome ``corrupt`` naming the problem instead of an error that stops the comparison."""
    try:
        outcome = _evaluate_pair(pair, base, target, policy, allow_missing=allow_missing,
                                 allow_failed=allow_failed, twin=twin)
        some = pair.baseline or pair.target
        outcome.role = some.tags.get("role") if some is not None else None
        if some is not None and isinstance(site := some.tags.get("call_site"), list):
            outcome.call_site = [str(frame) for frame in site[:8]]
        return outcome
    except CorruptDataError as exc:
        if not salvage:
            raise
        b, t = pair.baseline, pair.target
        some = b or t
        layer = some.layer if some is not None and some.layer is not None else layer_of(pair.name)
        return Outcome(pair.name, pair.step, pair.rank, layer, "corrupt", str(exc),
                       Side(list(b.shape), b.dtype) if b else None, Side(list(t.shape), t.dtype) if t else None)


def _evaluate_pair(pair: Pair, base: Run, target: Run, policy: TolerancePolicy, *,
                   allow_missing: Sequence[Tap] = (), allow_failed: Sequence[Tap] = (),
                   twin: TwinContext | None = None) -> Outcome:
    """Evaluate one pair: metrics, tolerance, outcome kind and a one-line reason.

    Multi-rank runs come in as :class:`parity.align.shards.LogicalRun` (token-aligned ones as
    :class:`parity.align.tokens.AlignedRun`): a logical record some rank (or step) lacks counts
    as missing on that side; problems with single ranks' shards (an all-zero
    shard, a replicated copy that disagrees) make the pair fail and name the rank.
    """
    b, t = pair.baseline, pair.target
    some = b or t
    assert some is not None
    layer = some.layer if some.layer is not None else layer_of(pair.name)
    sides = (Side(list(b.shape), b.dtype) if b else None, Side(list(t.shape), t.dtype) if t else None)
    for side, record, kind in (("baseline", b, "missing_in_baseline"), ("target", t, "missing_in_target")):
        if _incomplete(record):
            lacking = record.tags.get("lacking_ranks") or [pair.rank]
            outcome = Outcome(pair.name, pair.step, int(lacking[0]), layer, kind,
                              f"incomplete in the {side} run: {_incomplete(record)}", *sides)
            outcome.allowed = _matches(allow_missing, pair.name)
            return outcome
    if b is None or t is None:
        kind = "missing_in_baseline" if b is None else "missing_in_target"
        where = "target" if b is None else "baseline"
        outcome = Outcome(pair.name, pair.step, pair.rank, layer, kind,
                          f"present in the {where} run only", *sides)
        outcome.allowed = _matches(allow_missing, pair.name)
        if some.tags.get("role") == "input":  # eager attention passes a mask, sdpa None: not a divergence
            outcome.allowed = True
            outcome.notes.append("an argument passed on one side only (implementations differ in the arguments "
                                 "they take): reported, not failing")
        return outcome
    tolerance = policy.resolve(pair.name, b.dtype, t.dtype)
    notes: list[str] = []
    if b.dtype != t.dtype:
        notes.append(f"dtypes differ ({b.dtype} vs {t.dtype}): compared in float64")
    shape = b.shape
    if b.shape != t.shape:
        if _squeezed(b.shape) != _squeezed(t.shape) or b.numel != t.numel:
            for run, record in ((base, b), (target, t)):  # a manifest at odds with its data is corruption
                if isinstance(run, Run) and record.file is not None:
                    run.locate(record)
            outcome = Outcome(pair.name, pair.step, pair.rank, layer, "shape_mismatch",
                              f"shapes differ: baseline {list(b.shape)} vs target {list(t.shape)}",
                              *sides, tolerance=tolerance, notes=notes)
            outcome.allowed = _matches(allow_failed, pair.name)
            return outcome
        shape = _squeezed(b.shape)
        notes.append(f"shapes {list(b.shape)} and {list(t.shape)} differ only in size-1 dims: "
                     f"compared as {list(shape)}")
    if is_fingerprint(b) and is_fingerprint(t):  # parameters: digests, not values (compare/fingerprint.py)
        notes = [n for n in notes if not n.startswith("dtypes differ")]
        kind, reason, more = judge_fingerprints(b, t, tolerance)
        outcome = Outcome(pair.name, pair.step, pair.rank, layer, kind, reason, *sides, tolerance=tolerance,
                          notes=notes + more)
        outcome.allowed = not outcome.ok and _matches(allow_failed, pair.name)
        return outcome
    if b.file is None or t.file is None:  # statistics-only capture on at least one side
        from parity.compare.stats_check import stats_check

        if tolerance.scale > 0 and (rms := _stored_rms(b)) is not None:  # stored statistics are all there is
            tolerance = replace(tolerance, floor=max(tolerance.atol, tolerance.scale * rms))
        kind, reason, details, rel = stats_check(_sampled(base, b, t), _sampled(target, t, b), tolerance)
        kind, reason, rank = _with_findings(kind, reason, pair.rank, notes, base, b, target, t,
                                            "the statistics of the copy taken are within tolerance")
        outcome = Outcome(pair.name, pair.step, rank, layer, kind, reason, *sides, tolerance=tolerance,
                          notes=notes, statistics_based=True, stats=details, stats_rel_l2=rel)
        outcome.allowed = kind != "pass" and _matches(allow_failed, pair.name)
        return outcome
    base_arr, target_arr = read_pair(base, b, target, t)
    base_arr, target_arr = base_arr.reshape(shape), target_arr.reshape(shape)
    if b.dtype not in FLOAT_DTYPES or t.dtype not in FLOAT_DTYPES:
        notes.append("integer/bool data: compared as float64")
    metrics, tolerance = _scaled_metrics(base_arr, b, target_arr, t, tolerance)
    m = metrics
    evidence = None
    if twin is not None:
        evidence = _twin_evidence(twin, b, base_arr, t, target_arr, shape, m.rel_l2, notes)
    del base_arr, target_arr
    base.release(b)
    target.release(t)
    at = f"max |Δ| {_fmt(m.max_abs)} at {m.max_abs_index}"
    if m.max_abs_index:
        at += f" (baseline {_fmt(m.baseline_at_max)}, target {_fmt(m.target_at_max)})"
    identical = m.max_abs == 0 and m.nonfinite_mismatch == 0
    if m.nonfinite_mismatch:
        kind = "nonfinite"
        reason = (f"NaN/Inf disagree at {m.nonfinite_mismatch} elements (baseline {m.nan_baseline} NaN "
                  f"{m.inf_baseline} Inf; target {m.nan_target} NaN {m.inf_target} Inf)")
    elif identical:
        kind, reason = "identical", "bitwise equal"
    elif m.mismatched == 0:
        kind = "pass"
        reason = f"within tolerance; {at}"
    else:
        degenerate = None
        for side, zero, const, other_zero, other_const in (
                ("target", m.all_zero_target, m.constant_target, m.all_zero_baseline, m.constant_baseline),
                ("baseline", m.all_zero_baseline, m.constant_baseline, m.all_zero_target, m.constant_target)):
            if zero and not other_zero:
                degenerate = f"{side} is all zeros while the other side is not"
            elif const and not other_const:
                degenerate = f"{side} is constant while the other side is not"
            if degenerate:
                break
        kind = "degenerate" if degenerate else "fail"
        reason = (f"{degenerate}; " if degenerate else "") + (
            f"{m.mismatched} of {m.numel} elements ({100 * m.mismatch_fraction:.3g}%) outside tolerance; {at}")
    if evidence is not None and kind != "nonfinite":
        key = (pair.step, pair.rank)
        earlier_equal = twin.equal_so_far.get(key, True)  # type: ignore[union-attr]
        twin.equal_so_far[key] = earlier_equal and evidence.distance == 0  # type: ignore[union-attr]
        graded, why = grade_with_twin(evidence, within_tolerance=m.mismatched == 0, identical=identical,
                                      earlier_all_equal=earlier_equal)
        if kind == "degenerate" and graded in ("noise", "pass"):
            notes.append(f"{reason.split(';')[0]}, as in the twin")
        if kind != "degenerate" or graded in ("noise", "pass"):
            kind, reason = graded, why
    kind, reason, rank = _with_findings(kind, reason, pair.rank, notes, base, b, target, t,
                                        f"the tensor rebuilt from the agreeing copies is within tolerance; {at}")
    outcome = Outcome(pair.name, pair.step, rank, layer, kind, reason, *sides,
                      metrics=metrics, tolerance=tolerance, notes=notes, twin=evidence)
    outcome.allowed = not outcome.ok and _matches(allow_failed, pair.name)
    return outcome


def _mark_dtype_mismatches(outcomes: list[Outcome], declared: tuple[str | None, str | None],
                           allow_failed: Sequence[Tap]) -> None:
    """Make pairs whose float dtypes differ although both runs declare one dtype the outcome
    ``dtype_mismatch`` (:func:`~parity.compare.verdict.dtype_mismatch`); the value verdict stays
    in the reason. Structural outcomes (missing, shape, corrupt) are left as they are."""
    for o in outcomes:
        if o.baseline is None or o.target is None or o.kind not in ("identical", "pass", "noise", "anomalous", "fail"):
            continue
        why = dtype_mismatch(o.baseline.dtype, o.target.dtype, declared)
        if why is not None:
            o.reason = f"{why}; values: {o.kind}, {o.reason}"
            o.kind = "dtype_mismatch"
            o.allowed = _matches(allow_failed, o.name)


def _mark_jump(outcomes: list[Outcome], first: int, allow_failed: Sequence[Tap]) -> int:
    """Make the tap where the error jumps (verdict.locate_jump) the first divergence, when it comes
    before the first failing pair; returns the index of the first divergence."""
    found = locate_jump(outcomes, first)
    if found is None or found[0] == first:
        return first
    index, jump = found
    o, failing = outcomes[index], outcomes[first]
    o.kind = "anomalous"
    error = o.metrics.rel_l2  # type: ignore[union-attr]
    o.reason = (f"the error jumps here: rel L2 {_fmt(error)} is x{_fmt(jump)} every earlier tap's of step {o.step}, "
                f"and grows into the failure at {failing.name}; {o.reason}")
    o.allowed = _matches(allow_failed, o.name)
    return first if o.allowed else index


def position_errors(pair: Pair, base: Run, target: Run,
                    decode: Callable[[int], str] | None = None) -> dict[str, Any] | None:
    """Error per token position of a pair whose tensor has a token axis, or None.

    The token axis is the last axis (before the hidden axis) whose length equals the step's
    number of tokens (``input_ids`` of the step metadata). Per position: max |Δ| and relative L2
    over the other axes; ``token_ids`` from the step metadata and, when ``decode`` is given,
    ``tokens`` (decoded text of each id).
    """
    b, t = pair.baseline, pair.target
    if b is None or t is None or b.shape != t.shape or len(b.shape) < 2:
        return None
    ids = base.step_tags(b.step, b.rank).get("input_ids")
    flat_ids: list[int] = []
    if isinstance(ids, list):
        flat_ids = [i for row in ids for i in (row if isinstance(row, list) else [row]) if isinstance(i, int)]
    axis = None
    for candidate in range(len(b.shape) - 2, -1, -1):
        if flat_ids and b.shape[candidate] == len(flat_ids):
            axis = candidate
            break
    if axis is None:
        return None
    import numpy as np

    from parity.store.safetensors_io import to_float

    bb = np.moveaxis(to_float(base.raw(b), b.dtype), axis, 0).reshape(len(flat_ids), -1)
    tt = np.moveaxis(to_float(target.raw(t), t.dtype), axis, 0).reshape(len(flat_ids), -1)
    diff = tt - bb
    norms = np.linalg.norm(bb, axis=1)
    rel = np.divide(np.linalg.norm(diff, axis=1), norms, out=np.zeros(len(flat_ids)), where=norms > 0)
    out: dict[str, Any] = {"axis": axis, "token_ids": flat_ids,
                           "max_abs": [float(x) for x in np.abs(diff).max(axis=1)],
                           "rel_l2": [float(x) for x in rel]}
    if decode is not None:
        try:
            out["tokens"] = [decode(i) for i in flat_ids]
        except Exception:  # a tokenizer that cannot decode an id must not stop the report
            pass
    base.release(b)
    target.release(t)
    return out


def depth_profile(outcomes: Sequence[Outcome]) -> list[LayerError]:
    """Worst error per layer index over taps and steps, with growth from the previous layer."""
    by_layer: dict[int, list[Outcome]] = {}
    for o in outcomes:
        if o.layer is not None and o.metrics is not None and o.role is None:  # outputs: inputs repeat them
            by_layer.setdefault(o.layer, []).append(o)
    if not by_layer:  # statistics-only: the relative difference of L2 norms stands in
        return _stats_profile(outcomes)
    profile: list[LayerError] = []
    previous: float | None = None
    for layer in sorted(by_layer):
        items = by_layer[layer]
        worst = max(items, key=lambda o: o.metrics.rel_l2)  # type: ignore[union-attr]
        kinds: dict[str, float] = {}
        for o in items:
            kind = tap_kind(o.name)
            kinds[kind] = max(kinds.get(kind, 0.0), o.metrics.rel_l2)  # type: ignore[union-attr]
        rel = worst.metrics.rel_l2  # type: ignore[union-attr]
        growth = rel / previous if previous not in (None, 0.0) else None
        profile.append(LayerError(
            layer=layer, rel_l2=rel, max_abs=max(o.metrics.max_abs for o in items),  # type: ignore[union-attr]
            cosine=min(o.metrics.cosine for o in items), worst_name=worst.name,  # type: ignore[union-attr]
            growth=growth, by_kind=kinds))
        previous = rel
    return profile


def _stats_profile(outcomes: Sequence[Outcome]) -> list[LayerError]:
    by_layer: dict[int, list[Outcome]] = {}
    for o in outcomes:
        if o.layer is not None and o.stats_rel_l2 is not None and o.role is None:
            by_layer.setdefault(o.layer, []).append(o)
    profile: list[LayerError] = []
    previous: float | None = None
    for layer in sorted(by_layer):
        items = by_layer[layer]
        worst = max(items, key=lambda o: o.stats_rel_l2)  # type: ignore[arg-type,return-value]
        rel = float(worst.stats_rel_l2)  # type: ignore[arg-type]
        kinds: dict[str, float] = {}
        for o in items:
            kinds[tap_kind(o.name)] = max(kinds.get(tap_kind(o.name), 0.0), float(o.stats_rel_l2))  # type: ignore
        profile.append(LayerError(layer=layer, rel_l2=rel, max_abs=float("nan"), cosine=float("nan"),
                                  worst_name=worst.name, growth=rel / previous if previous else None,
                                  by_kind=kinds))
        previous = rel
    return profile


def _token_outcomes(alignment: Any) -> list[Outcome]:
    """A ``tokens`` outcome per kind of token that did not pair (none when all paired); a
    ``fail`` (never allowed) when no token paired at all."""
    out = []
    if not alignment.pairs:
        out.append(Outcome("tokens", 0, 0, None, "fail", "no token of the two runs paired: nothing was compared "
                           f"({alignment.requests[0]} baseline and {alignment.requests[1]} target requests)",
                           None, None))
    for kind, items, what in (("missing_in_target", alignment.baseline_only, "in the baseline only"),
                              ("missing_in_baseline", alignment.target_only, "in the target only"),
                              ("fail", alignment.differing, "with different token ids on the two sides")):
        if items:
            out.append(Outcome("tokens", 0, 0, None, kind, f"tokens {what}: {'; '.join(items)}", None, None))
    return out


def check_patterns(names: set[str], *, allow_missing: Sequence[str] = (), allow_failed: Sequence[str] = (),
                   policy: TolerancePolicy | None = None) -> None:
    """Raise a UsageError naming every ``--allow-*`` / ``--tol`` pattern that matches no pair name
    (with the closest names): a mistyped pattern would otherwise excuse or loosen nothing, silently."""
    overrides = [o.pattern for o in policy.cli_overrides] if policy is not None else []
    for kind, patterns in (("--allow-missing pattern", allow_missing), ("--allow-failed pattern", allow_failed),
                           ("--tol pattern", overrides)):
        unmatched = [p for p, tap in ((p, compile_tap(p)) for p in patterns)
                     if not any(tap.matches(name) for name in names)]
        if unmatched:
            raise unmatched_error(kind + ("s" if len(unmatched) > 1 else ""), unmatched, sorted(names))


def profile_note(policy: TolerancePolicy) -> str | None:
    """A note when a profile was given but none of its entries can apply to ``--backend``."""
    entries = list(policy.file_overrides)
    backend = policy.backend
    if not entries or any(e.applies_to_backend(backend) for e in entries):
        return None
    backends = ", ".join(sorted({e.backend or "" for e in entries}))
    return (f"profile {policy.profile_path}: none of its {len(entries)} entries applies — they are for backend "
            f"{backends}, and --backend is {backend or 'not given'}: the defaults applied")


def describe_run(run: Run) -> dict[str, object]:
    """What the report says about one run: path, header facts, record count."""
    h = run.header
    return {"path": str(run.path), "format_version": h.format_version, "created": h.created,
            "mode": h.mode, "world_size": h.world_size, "spec": h.spec, "model": h.model,
            "env": h.env, "records": len(run.records), "notes": run.notes}


#: Pairs of at least this many bytes per side read their two sides on two threads (1 MiB).
PARALLEL_READ_BYTES = 1 << 20


def read_pair(base: Any, b: Record, target: Any, t: Record) -> tuple[Any, Any]:
    """Both sides' data (``raw``). A large pair of two distinct dump runs reads the target on a
    second thread while this one reads the baseline: the first read of a record verifies its
    checksum (:mod:`parity.store.checksum`, which releases the GIL), so the two checksums cost
    the time of one on a machine with two free cores."""
    if base is target or not (isinstance(base, Run) and isinstance(target, Run)) or b.nbytes < PARALLEL_READ_BYTES:
        return base.raw(b), target.raw(t)
    import threading

    box: dict[str, Any] = {}

    def read_target() -> None:
        try:
            box["data"] = target.raw(t)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=read_target, name="parity-read")
    thread.start()
    try:
        base_data = base.raw(b)
    finally:
        thread.join()
    if "error" in box:
        raise box["error"]
    return base_data, box["data"]


def as_run(source: Any, *, salvage: bool = False) -> Any:
    """A run to compare: a :class:`Run` or view as it is, a dump directory (str or path) loaded
    (with ``salvage``, see :func:`~parity.store.reader.load_run`), a capture session's ``run``;
    anything else is a UsageError."""
    from parity.align.shards import LogicalRun

    if isinstance(source, (Run, LogicalRun)):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_run(source, salvage=salvage)
    if hasattr(type(source), "run") and hasattr(source, "records_written"):  # a CaptureSession
        return source.run
    raise UsageError(f"compare takes dump directories, loaded runs or capture sessions, not {type(source).__name__}")


def prepare(baseline: Any, target: Any, *, renames: Sequence[RenameRule] = (), shards: Sequence[str] = (),
            align: str = "steps", decode: Callable[[int], str] | None = None) -> tuple[Any, Any, list[Pair], Any]:
    """Open both runs as the comparison sees them and pair their records.

    Returns (baseline view, target view, pairs, token alignment or None). Multi-rank runs become
    :class:`~parity.align.shards.LogicalRun` views (``shards`` overrides their annotations);
    ``align="tokens"`` wraps both in :class:`~parity.align.tokens.AlignedRun`.
    """
    from parity.align.shards import LogicalRun, logical_view, shard_rules

    if align not in ("steps", "tokens"):
        raise UsageError(f"align must be 'steps' or 'tokens', not {align!r}")
    overrides = shard_rules(list(shards))
    base_run, target_run = as_run(baseline), as_run(target)
    base_run = logical_view(base_run, overrides) if isinstance(base_run, Run) else base_run
    target_run = logical_view(target_run, overrides) if isinstance(target_run, Run) else target_run
    alignment = None
    if align == "tokens":
        from parity.align.tokens import AlignedRun, align_runs

        alignment = align_runs(base_run, target_run, decode)
        base_run, target_run = AlignedRun(base_run, alignment, 0), AlignedRun(target_run, alignment, 1)
    for run in (base_run, target_run):
        if not run.records:
            raise DumpError(f"dump {run.path} holds no records", hint="did the capture run any forward pass?")
    if shards and all(run.world_size == 1 for run in (base_run, target_run)):
        base_run.notes.append("--shard has no effect: both runs have a single rank")
    return base_run, target_run, pair_records(base_run.records, target_run.records, renames), alignment


def compare(baseline: str | Path | Run, target: str | Path | Run, *,
            policy: TolerancePolicy | None = None, renames: Sequence[RenameRule] = (),
            allow_missing: Sequence[str] = (), allow_failed: Sequence[str] = (),
            progress: Progress | None = None, decode: Callable[[int], str] | None = None,
            shards: Sequence[str] = (), align: str = "steps", workers: int = 1,
            distributed: bool = False, twin: str | Path | Run | None = None, twin_m: float = DEFAULT_M,
            rtol: float | None = None, atol: float | None = None, tol: Sequence[str] = (),
            profile: str | Path | None = None, backend: str | None = None,
            allow_incomparable: bool = False, salvage: bool = False, distributions: bool = False) -> Report:
    """Compare two dumps (directories or loaded :class:`Run` objects) and return the report.

    ``allow_missing`` / ``allow_failed`` are tap patterns (globs or ``re:``) whose non-pass
    outcomes are reported but do not fail the verdict. ``progress(done, total, name)`` is called
    after each pair. ``decode(token_id) -> str`` labels the per-position errors of the first
    divergence with token text. ``shards`` (``PATTERN=SPEC`` strings, default none) override the
    sharding annotations of multi-rank runs (see :mod:`parity.align.shards`); a multi-rank run
    is compared one rebuilt logical tensor at a time. ``align`` is ``"steps"`` (default: pair
    records by step) or ``"tokens"`` (pair tokens across steps and layouts, see
    :mod:`parity.align.tokens`). ``workers`` (default 1) > 1 evaluates the pairs in that many
    processes; ``distributed=True`` shares them among the ranks of a torchrun launch (see
    :mod:`parity.compare.parallel`); the report is the same. ``twin`` (default None) is the
    baseline's settings run at the other precision: pairs are then graded by the twin rule of
    :mod:`parity.compare.verdict` with factor ``twin_m`` (default 3). Tolerances as on the
    command line: ``rtol``, ``atol``, ``tol`` (``PATTERN:rtol=R,atol=A`` strings), ``profile``
    (a TOML file) and ``backend`` (default none of them: the per-dtype defaults); or a ready
    ``policy`` (not both). Runs of different models or inputs are refused with a UsageError
    (:mod:`parity.compare.comparable`) unless ``allow_incomparable`` (default False).
    ``salvage`` (default False): dumps given as directories are read in salvage mode (invalid
    manifest lines skipped and noted) and a pair whose data is corrupted is the outcome
    ``corrupt`` (it fails the run) instead of an error; one process only. ``distributions``
    (default False: the first divergence only) attaches the error distribution
    (:func:`~parity.compare.metrics.error_distribution`) to every pair with metrics: one extra
    pass per pair.
    """
    options = {"rtol": rtol, "atol": atol, "tol": tol, "profile": profile, "backend": backend}
    if any(v not in (None, ()) for v in options.values()):
        if policy is not None:
            raise UsageError("give either policy= or the tolerance options (rtol, atol, tol, profile, backend)")
        policy = TolerancePolicy.from_options(**options)  # type: ignore[arg-type]
    if workers < 1:
        raise UsageError(f"workers must be >= 1, got {workers}")
    if twin is not None and (workers > 1 or distributed or align != "steps"):
        raise UsageError("a twin run (precision-aware mode) works with --align steps in one process: "
                         "--workers, --distributed and --align tokens do not apply to it")
    if salvage and (workers > 1 or distributed):
        raise UsageError("--salvage compares in one process: --workers and --distributed do not apply to it")
    baseline, target = as_run(baseline, salvage=salvage), as_run(target, salvage=salvage)
    if (workers > 1 or distributed) and not all(getattr(run, "on_disk", True) for run in (baseline, target)):
        raise UsageError("workers > 1 and distributed read the dumps from disk: in-memory runs compare in one "
                         "process (workers=1)")
    if twin is not None and not twin_m >= 1:
        raise UsageError(f"--twin-m must be >= 1, got {twin_m}")
    if distributed:
        from parity.compare.parallel import require_torchrun

        require_torchrun()
    base_run, target_run, pairs, alignment = prepare(baseline, target, renames=renames, shards=shards,
                                                     align=align, decode=decode)
    policy = policy or TolerancePolicy()
    missing_taps = [compile_tap(p) for p in allow_missing]
    failed_taps = [compile_tap(p) for p in allow_failed]
    outcomes: list[Outcome] = []
    positions = None
    attribution = None
    differences: list[dict[str, Any]] = []
    twin_context = None
    try:
        if twin is not None:
            twin_context = _open_twin(twin, shards, twin_m)
        from parity.compare.comparable import check_comparable

        incomparable = check_comparable(base_run, target_run, align=align, allow=allow_incomparable, decode=decode)
        if incomparable and align == "steps":
            from parity.compare.comparable import input_differences

            differences = input_differences(base_run, target_run, decode)
        check_patterns({p.name for p in pairs} | ({"tokens"} if alignment is not None else set()),
                       allow_missing=allow_missing, allow_failed=allow_failed, policy=policy)
        if (workers > 1 and len(pairs) > 1) or distributed:
            from parity.compare import parallel

            job = parallel.Job(str(base_run.path), str(target_run.path), policy, renames, shards, align,
                               allow_missing, allow_failed)
            outcomes = (parallel.run_distributed(job, pairs) if distributed
                        else parallel.run_workers(job, pairs, workers, progress))
        else:
            for index, pair in enumerate(pairs):
                outcome = evaluate_pair(pair, base_run, target_run, policy, allow_missing=missing_taps,
                                        allow_failed=failed_taps, twin=twin_context, salvage=salvage)
                outcomes.append(outcome)
                if progress is not None:
                    progress(index + 1, len(pairs), pair.name)
        _mark_dtype_mismatches(outcomes, (declared_dtype(base_run.header.spec), declared_dtype(target_run.header.spec)),
                               failed_taps)
        attach_routing(outcomes, pairs, base_run, target_run)
        if distributions:
            for outcome, pair in zip(outcomes, pairs):
                attach_distribution(outcome, pair, base_run, target_run)
        first = next((i for i, o in enumerate(outcomes) if not o.ok), None)
        if first is not None and twin_context is None and outcomes[first].metrics is not None:
            first = _mark_jump(outcomes, first, failed_taps)
        if first is not None and outcomes[first].metrics is not None:  # the first divergence's own pair
            attach_worst_failing(outcomes[first], pairs[first], base_run, target_run)
            if outcomes[first].distribution is None:
                attach_distribution(outcomes[first], pairs[first], base_run, target_run)
            positions = position_errors(pairs[first], base_run, target_run, decode)
        if first is not None:
            from parity.compare.attribution import attribute

            attribution = attribute(outcomes, first)
        if alignment is not None:  # tokens that did not pair come last: the taps say where it diverged
            for outcome in _token_outcomes(alignment):
                outcome.allowed = outcome.kind != "fail" and _matches(missing_taps, "tokens")
                outcomes.append(outcome)
    finally:
        base_run.close()
        target_run.close()
        if twin_context is not None:
            twin_context.run.close()
    notes = [f"baseline: {n}" for n in base_run.notes] + [f"target: {n}" for n in target_run.notes]
    notes.extend(incomparable)
    if (unused := profile_note(policy)) is not None:
        notes.append(unused)
    if alignment is not None:
        notes.insert(0, alignment.summary())
    tolerance = policy.describe()
    tolerance["allow_missing"] = list(allow_missing)
    tolerance["allow_failed"] = list(allow_failed)
    tolerance["renames"] = [f"{r.regex.pattern}={r.template}" for r in renames]
    if shards:
        tolerance["shards"] = list(shards)
    if align != "steps":
        tolerance["align"] = align
    if twin_context is not None:
        tolerance["twin"] = {"rule": "d(target, lower-precision run) <= m * noise + eps, noise = "
                                     "rel L2 between the baseline and its twin", "m": twin_m,
                             "first_departure_u": FIRST_DEPARTURE_U}
    report = Report(baseline=describe_run(base_run), target=describe_run(target_run), tolerance=tolerance,
                    outcomes=outcomes, layers=depth_profile(outcomes), notes=notes,
                    first_positions=positions or None,
                    twin=describe_run(twin_context.run) if twin_context is not None else None)
    report.attribution = attribution
    report.input_differences = differences or None
    report.headline = headline(outcomes, baseline=_label(report.baseline), target=_label(report.target),
                               twin=_label(report.twin) if report.twin is not None else None)
    return report


def _label(run: dict[str, Any]) -> str:
    """A short name of a run for the headline: its spec's non-default settings, or its path."""
    spec = run.get("spec") or {}
    if isinstance(spec, dict) and spec:
        keys = [k for k in ("engine", "dtype", "attn", "compile", "quant", "tp", "device") if k in spec]
        defaults = {"engine": "hf", "compile": 0, "quant": "none", "tp": 1, "device": "cpu"}
        parts = [str(spec[k]) if k in ("dtype", "attn", "engine") else f"{k}={spec[k]}"
                 for k in keys if spec[k] != defaults.get(k, object()) and spec[k] not in (False,)]
        if parts:
            return " ".join(parts)
    return str(run.get("path", "?"))
