"""How a pair and a run are judged: grades, the precision-aware twin rule, the headline.

This module is the one home of the verdict: ``compare``, ``diff``, ``matrix``, the reports and
the exit code all go through :func:`grade_with_twin` / :data:`OK_GRADES` / :func:`headline`
(the element rule itself, with its per-dtype defaults, is :mod:`parity.compare.tolerance`).

Grades of a pair (``Outcome.kind``), best first:

- ``identical``: bitwise equal values (max |Δ| = 0, no NaN/Inf disagreement).
- ``pass``: every element within the tolerance rule (and, with a twin, close to the twin).
- ``noise``: *within precision noise*: some elements are outside the tolerance, but the target
  is no further from the twin than the twin's own precision error allows (twin rule below).
- ``anomalous``: the target departs from the twin more than precision explains, while its
  elements may still be within the tolerance (a fault that a loose 16-bit tolerance hides;
  when the lower dtype is float32, its tolerance is tight and decides: within it is ``pass``).
- ``fail``: elements outside the tolerance and not explained by precision (no twin, or the
  twin rule says so); ``degenerate``, ``nonfinite``, ``shape_mismatch``, ``missing_*`` and
  ``dtype_mismatch`` (:func:`dtype_mismatch`) are failures with a named reason.

The first divergence is where the error jumps (:func:`locate_jump`), not only where it first
crosses the tolerance: a 1e-4 relative change of one fp32 MLP stays inside the fp32 tolerance
at that MLP and crosses it a layer later, after a norm has amplified it. Without a twin, the
taps of the first failing pair's step up to it are scanned for the largest jump of relative L2
error over every earlier tap of the step (at least :data:`FIRST_DEPARTURE_U` unit roundoffs
as the floor of "earlier"); a jump of more than :data:`JUMP` (4x) before the failing tap makes
that tap ``anomalous``: it is the first divergence, and its reason names the failure it grows
into. A passing run is never changed by this (it only looks before a failure).

A run exits 0 when every pair is ``identical``, ``pass`` or ``noise`` (or excused by an
``--allow-*`` pattern), 1 otherwise; the first divergence is the first pair in execution
order that is neither (the first anomalous or failing tap).

The twin rule (precision-aware judgement)
    A *twin* is the baseline's settings run at the other precision: at the target's precision
    when the target is lower than the baseline (fp32 baseline, bf16 target: the twin is the
    bf16 run of the baseline's settings), or at float32 when both sides are 16-bit. Of the
    baseline and the twin, call ``H`` the higher-precision run and ``L`` the lower one: they
    differ only in precision, so ``noise = ‖L − H‖ / ‖H‖`` is what that precision costs at this
    tap. The target is judged by its distance to the run of its own precision,
    ``d = ‖T − L‖ / ‖L‖``:

        within precision noise  ⇔  d ≤ m · noise + eps

    with ``m`` = :data:`DEFAULT_M` (3: two runs at the same precision whose rounding errors are
    independent differ by about √2 × noise, and at single taps where the twin's noise happens
    to be small by more; measured on SmolLM2-135M, bf16 sdpa vs its bf16 eager twin over 16
    prompts x 153 taps: d/noise median 0.9, 99th percentile 1.3, largest 2.14) and ``eps`` =
    half a unit roundoff of the lower dtype (the rms of one rounding of every element: a tap
    the twin gets exactly may still differ by one rounding). Evidence kept per pair: ``d``, ``noise``, the bound, ``d/noise``,
    and the target's own error against the baseline with its ratio to the twin's.

    First departure: while the target is bitwise equal to ``L`` at every earlier tap of a step,
    the first tap where it differs received identical inputs, so its difference is that
    module's own. A correct kernel (another attention implementation, another summation order)
    changes its output by about one rounding: measured 0.76 unit roundoffs (bf16 sdpa vs eager,
    first attention). A first departure larger than :data:`FIRST_DEPARTURE_U` (2) unit
    roundoffs of the lower dtype is ``anomalous`` whatever the ratio: a 1-3% change of one MLP
    in a bf16 model (0.9-1.4 × the bf16 noise at that tap, so no ratio test can see it) is
    found this way when the target runs the twin's kernels up to the fault. The rule applies
    to 16-bit lower dtypes only (:data:`ONE_ROUNDING_DTYPES`): their kernels accumulate in
    float32 and round once, while a float32 kernel's own accumulation order moves its output
    by many float32 roundings (torch.compile's fused RMSNorm against eager's, in an int8
    dynamic-quantization target with float32 activations, departs by more than 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from parity.compare.tolerance import PRECISION
from parity.jsonsafe import json_float

#: Unit roundoff per dtype: the largest relative error of one rounding to nearest.
UNIT_ROUNDOFF: dict[str, float] = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11,
                                   "bfloat16": 2.0 ** -8}
#: Every outcome kind, best first: the grades, then the structural failures.
OUTCOMES = ("identical", "pass", "noise", "anomalous", "fail", "shape_mismatch", "missing_in_target",
            "missing_in_baseline", "nonfinite", "degenerate", "corrupt", "dtype_mismatch")
#: Grades that do not fail a run.
OK_GRADES = frozenset({"identical", "pass", "noise"})
#: The twin rule's factor: d <= m * noise + eps.
DEFAULT_M = 3.0
#: A first departure from a bitwise-equal twin larger than this many unit roundoffs is anomalous.
FIRST_DEPARTURE_U = 2.0
#: Dtypes whose kernels compute in a wider type and round once at the output: a different but
#: correct kernel changes such an output by about one rounding (the first-departure rule applies).
ONE_ROUNDING_DTYPES = frozenset({"bfloat16", "float16"})
#: A tap whose error is this many times every earlier one's (of its step) is where the error jumps.
JUMP = 4.0


def declared_dtype(spec: Any) -> str | None:
    """The compute dtype a run header's ``spec`` declares (``dtype=bfloat16``), or None."""
    dtype = spec.get("dtype") if isinstance(spec, dict) else None
    return dtype if isinstance(dtype, str) and dtype in UNIT_ROUNDOFF else None


def dtype_mismatch(baseline_dtype: str, target_dtype: str, declared: tuple[str | None, str | None]) -> str | None:
    """Why a pair's dtypes are a finding of their own, or None.

    Float tensors of two dtypes are compared in float64 either way; that is expected when the
    runs were *declared* at different precisions (a float32 run against a bfloat16 one) or when a
    run declares nothing. When both runs declare the same dtype, a pair whose float dtypes differ
    means one of them computed that tap at another precision (an upcast or a downcast the other
    does not do): the outcome ``dtype_mismatch`` (a failure that ``--allow-failed`` can excuse),
    whatever the values. Integer and bool tensors (ids, masks) are never a dtype mismatch."""
    floats = set(UNIT_ROUNDOFF)
    if baseline_dtype == target_dtype or baseline_dtype not in floats or target_dtype not in floats:
        return None
    if declared[0] is None or declared[0] != declared[1]:
        return None
    return (f"dtypes differ: baseline {baseline_dtype}, target {target_dtype}, while both runs are declared "
            f"{declared[0]} (one computes this tap at another precision)")


def outcome_ok(kind: str | None, allowed: bool | None = False) -> bool:
    """Whether an outcome (by its JSON ``outcome`` and ``allowed``) leaves the run passing."""
    return kind in OK_GRADES or bool(allowed)


def unit_roundoff(dtype: str) -> float:
    """Unit roundoff of ``dtype`` (float32's for a dtype not in :data:`UNIT_ROUNDOFF`)."""
    return UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["float32"])


def precision_rank(dtype: str) -> int:
    """0 for the lowest-precision float dtype; non-float dtypes rank highest."""
    return PRECISION.index(dtype) if dtype in PRECISION else len(PRECISION)


@dataclass
class TwinEvidence:
    """What the twin rule measured on one pair (relative L2 errors, float64)."""

    distance: float  # d = ‖T − L‖ / ‖L‖
    noise: float  # ‖L − H‖ / ‖H‖
    bound: float  # m · noise + eps
    m: float
    eps: float
    target_error: float  # ‖T − B‖ / ‖B‖
    twin_error: float  # ‖W − B‖ / ‖B‖
    low_dtype: str
    first_departure: bool = False
    #: which run is the lower-precision one the target is measured against: "twin" or "baseline"
    reference: str = "twin"

    @property
    def ratio(self) -> float:
        """d / noise (``inf`` when the noise is 0 and d is not)."""
        if self.noise > 0:
            return self.distance / self.noise
        return 0.0 if self.distance == 0 else float("inf")

    @property
    def roundoffs(self) -> float:
        """d in unit roundoffs of the lower dtype."""
        return self.distance / unit_roundoff(self.low_dtype)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"distance": json_float(self.distance), "noise": json_float(self.noise),
                "bound": json_float(self.bound), "ratio": json_float(self.ratio), "m": self.m, "eps": self.eps,
                "target_error": json_float(self.target_error), "twin_error": json_float(self.twin_error),
                "low_dtype": self.low_dtype, "roundoffs": json_float(self.roundoffs),
                "first_departure": self.first_departure, "reference": self.reference}


def twin_eps(low_dtype: str) -> float:
    """The twin rule's additive slack: half a unit roundoff of the lower dtype."""
    return unit_roundoff(low_dtype) / 2


def grade_with_twin(evidence: TwinEvidence, *, within_tolerance: bool, identical: bool,
                    earlier_all_equal: bool) -> tuple[str, str]:
    """(grade, reason) of a pair whose target has a twin; see the module docstring.

    ``within_tolerance``: the element rule against the baseline passed; ``identical``: the
    target equals the baseline bitwise; ``earlier_all_equal``: the target equalled the
    lower-precision run bitwise at every earlier tap of this step.
    """
    e = evidence
    if identical:
        return "identical", "bitwise equal to the baseline"
    if earlier_all_equal and e.distance > 0 and e.low_dtype in ONE_ROUNDING_DTYPES:
        e.first_departure = True
        if e.roundoffs > FIRST_DEPARTURE_U:
            return "anomalous", (f"first departure from the {e.low_dtype} twin, on identical inputs: "
                                 f"d {e.distance:.3g} = {e.roundoffs:.3g} unit roundoffs (> {FIRST_DEPARTURE_U:g}: "
                                 f"more than a different rounding; precision noise here {e.noise:.3g})")
    evidence_text = (f"d(target, {e.low_dtype} twin) {e.distance:.3g} = {e.ratio:.3g} x the precision noise "
                     f"{e.noise:.3g}")
    if e.distance > e.bound:
        if not within_tolerance:
            return "fail", f"{evidence_text} > bound {e.bound:.3g} (m={e.m:g}): more than precision explains"
        if e.low_dtype in ONE_ROUNDING_DTYPES:  # a 16-bit tolerance is loose: the twin is the sharper test
            return "anomalous", (f"{evidence_text} > bound {e.bound:.3g} (m={e.m:g}): more than precision "
                                 f"explains, although within the {e.low_dtype} tolerance")
        return "pass", (f"within tolerance; {evidence_text} (above the twin bound {e.bound:.3g}, but a "
                        f"{e.low_dtype} difference the {e.low_dtype} tolerance accepts)")
    if within_tolerance:
        return "pass", f"within tolerance; {evidence_text}"
    return "noise", f"within precision noise: {evidence_text} <= bound {e.bound:.3g}"


def locate_jump(outcomes: Sequence[Any], first: int) -> tuple[int, float] | None:
    """(index, jump factor) of the tap where the error of ``outcomes[first]``'s step jumps most,
    up to and including ``first``; None when no tap jumps by more than :data:`JUMP`.

    ``outcomes`` are :class:`Outcome` objects in execution order; only those of the same step and
    rank with metrics count. The jump of a tap is its relative L2 error over the largest error of
    the earlier taps of the step, floored at :data:`FIRST_DEPARTURE_U` unit roundoffs of the
    pair's lower dtype.
    """
    anchor = outcomes[first]
    best: tuple[int, float] | None = None
    earlier = 0.0
    for index in range(first + 1):
        o = outcomes[index]
        if o.step != anchor.step or o.rank != anchor.rank or o.metrics is None or o.baseline is None:
            continue
        low = o.baseline.dtype if precision_rank(o.baseline.dtype) <= precision_rank(o.target.dtype) \
            else o.target.dtype
        error = o.metrics.rel_l2
        jump = error / max(earlier, FIRST_DEPARTURE_U * unit_roundoff(low))
        if jump > JUMP and (best is None or jump > best[1]):
            best = (index, jump)
        if error == error:  # NaN never raises the reference level
            earlier = max(earlier, error)
    return best


def headline(outcomes: Iterable[Any], *, baseline: str, target: str, twin: str | None) -> str:
    """One line that answers the question of the run (``outcomes``: :class:`Outcome` objects)."""
    items = list(outcomes)
    bad = [o for o in items if not o.ok]
    noisy = [o for o in items if o.kind == "noise" and not o.allowed]
    if bad:
        first = bad[0]
        return f"{target} diverges from {baseline}: first at {first.name} (step {first.step}, {first.kind})"
    if twin is not None:
        judged = [o.twin for o in items if o.twin is not None]
        noise = f"{len(noisy)} taps within precision noise, none beyond"
        if judged and judged[0].reference == "baseline":  # both sides 16-bit, the twin is the wider run
            base = [e for e in judged if e.noise > 0]
            overall = sum(e.distance for e in base) / sum(e.noise for e in base) if base else 0.0
            worst = max((e.ratio for e in base), default=0.0)
            return (f"{target} agrees with {baseline} within {judged[0].low_dtype} precision noise: their difference "
                    f"is x{overall:.3g} what {judged[0].low_dtype} costs against {twin} over all taps (worst tap "
                    f"x{worst:.3g}); {noise}")
        base = [e for e in judged if e.twin_error > 0]
        overall = (sum(e.target_error for e in base) / sum(e.twin_error for e in base)) if base else 1.0
        worst = max((e.target_error / e.twin_error for e in base), default=1.0)
        cost = max((e.target_error for e in judged), default=0.0)
        return (f"{target} is as accurate as {twin}: error vs {baseline} x{overall:.3g} the twin's over all taps "
                f"(worst tap x{worst:.3g}; largest rel L2 {cost:.3g}); {noise}")
    if items and all(o.kind == "identical" for o in items):
        return f"{target} is bitwise identical to {baseline}"
    return f"{target} agrees with {baseline} within tolerance"
