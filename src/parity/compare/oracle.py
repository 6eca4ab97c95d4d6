"""Oracle mode: when neither side is ground truth, judge both against a float64 run.

Two GPU vendors, two engines: which one is right? Run the baseline's configuration in float64
(the oracle) and measure each side's error against it. For every tap:

    err(side) = ‖side − oracle‖₂ / ‖oracle‖₂        (relative L2, float64 accumulation)
    pass  ⇔  err(target) ≤ m · err(baseline) + ε

Defaults: ``m`` = :data:`DEFAULT_M` (2.0: the target may be up to twice as far from the truth
as the baseline); ``ε`` by the target's dtype, :data:`DEFAULT_EPS` = one unit roundoff of that
dtype (float64 1.1e-16, float32 6.0e-8, float16 4.9e-4, bfloat16 3.9e-3), so a tap the baseline
gets exactly right may still carry the target's own rounding. Both are options
(``--oracle-m``, ``--oracle-eps``). Records missing on any of the three runs are reported as
missing, never skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from parity.capturing.taps import compile_tap, layer_of
from parity.compare.engine import depth_profile, describe_run
from parity.compare.metrics import pair_metrics
from parity.compare.pairing import RenameRule, pair_records
from parity.compare.result import Outcome, Report, Side
from parity.compare.tolerance import DEFAULTS, EXACT, Tolerance
from parity.errors import DumpError
from parity.store.reader import Run, load_run

DEFAULT_M = 2.0
DEFAULT_EPS: dict[str, float] = {"float64": 1.1e-16, "float32": 6.0e-8, "float16": 4.9e-4, "bfloat16": 3.9e-3}
RULE = "err(target) <= m * err(baseline) + eps; err = rel L2 against the float64 oracle"


def _side(run: Run, record: Any) -> Side:
    return Side(list(record.shape), record.dtype)


def compare_with_oracle(oracle: str | Path | Run, baseline: str | Path | Run, target: str | Path | Run, *,
                        m: float = DEFAULT_M, eps: float | None = None, renames: Sequence[RenameRule] = (),
                        allow_missing: Sequence[str] = (), allow_failed: Sequence[str] = (),
                        progress: Callable[[int, int, str], None] | None = None) -> Report:
    """Judge ``target`` and ``baseline`` against ``oracle`` (see the module docstring)."""
    runs = [r if isinstance(r, Run) else load_run(r) for r in (oracle, baseline, target)]
    oracle_run, base_run, target_run = runs
    for run in runs:
        if not run.records:
            raise DumpError(f"dump {run.path} holds no records")
    base_pairs = {(p.name, p.step, p.rank): p for p in pair_records(oracle_run.records, base_run.records)}
    target_pairs = pair_records(oracle_run.records, target_run.records, renames)
    missing_taps = [compile_tap(p) for p in allow_missing]
    failed_taps = [compile_tap(p) for p in allow_failed]
    outcomes: list[Outcome] = []
    seen: set[tuple[str, int, int]] = set()
    try:
        for index, pair in enumerate(target_pairs):
            seen.add((pair.name, pair.step, pair.rank))
            base_pair = base_pairs.get((pair.name, pair.step, pair.rank))
            o, t = pair.baseline, pair.target  # pair_records(oracle, target): "baseline" is the oracle
            b = base_pair.target if base_pair is not None else None
            layer = layer_of(pair.name)
            sides = (_side(base_run, b) if b else None, _side(target_run, t) if t else None)
            if o is None or b is None or t is None:
                absent = [n for n, r in (("oracle", o), ("baseline", b), ("target", t)) if r is None]
                kind = "missing_in_target" if t is None else "missing_in_baseline"
                outcome = Outcome(pair.name, pair.step, pair.rank, layer, kind,
                                  f"missing in the {' and '.join(absent)} run", *sides)
                outcome.allowed = any(tap.matches(pair.name) for tap in missing_taps)
                outcomes.append(outcome)
                continue
            if not (o.shape == b.shape == t.shape):
                outcome = Outcome(pair.name, pair.step, pair.rank, layer, "shape_mismatch",
                                  f"shapes differ: oracle {list(o.shape)}, baseline {list(b.shape)}, "
                                  f"target {list(t.shape)}", *sides)
                outcome.allowed = any(tap.matches(pair.name) for tap in failed_taps)
                outcomes.append(outcome)
                continue
            rtol, atol = DEFAULTS.get(t.dtype, EXACT)
            oracle_arr = oracle_run.raw(o)
            base_metrics = pair_metrics(oracle_arr, o.dtype, base_run.raw(b), b.dtype, rtol=rtol, atol=atol)
            metrics = pair_metrics(oracle_arr, o.dtype, target_run.raw(t), t.dtype, rtol=rtol, atol=atol)
            for run, record in ((oracle_run, o), (base_run, b), (target_run, t)):
                run.release(record)
            epsilon = DEFAULT_EPS.get(t.dtype, 0.0) if eps is None else eps
            bound = m * base_metrics.rel_l2 + epsilon
            err_b, err_t = base_metrics.rel_l2, metrics.rel_l2
            if metrics.nonfinite_mismatch and not base_metrics.nonfinite_mismatch:
                kind, reason = "nonfinite", f"target has NaN/Inf where the oracle does not ({metrics.nonfinite_mismatch})"
            elif err_t <= bound:
                kind, reason = "pass", f"target error {err_t:.3g} <= {m:g} x baseline error {err_b:.3g} + {epsilon:.2g}"
            else:
                kind, reason = "fail", (f"target error {err_t:.3g} > {m:g} x baseline error {err_b:.3g} + "
                                        f"{epsilon:.2g} = {bound:.3g} (x{err_t / err_b:.3g} the baseline's)"
                                        if err_b > 0 else
                                        f"target error {err_t:.3g} > {bound:.3g} where the baseline is exact")
            outcome = Outcome(pair.name, pair.step, pair.rank, layer, kind, reason, *sides, metrics=metrics,
                              tolerance=Tolerance(rtol=m, atol=epsilon, source="oracle rule (rtol=m, atol=eps)"),
                              notes=[f"oracle: baseline error {err_b:.3g}, target error {err_t:.3g}, bound {bound:.3g}"])
            outcome.oracle = {"baseline_error": err_b, "target_error": err_t, "bound": bound, "m": m, "eps": epsilon}
            outcome.allowed = kind != "pass" and any(tap.matches(pair.name) for tap in failed_taps)
            outcomes.append(outcome)
            if progress is not None:
                progress(index + 1, len(target_pairs), pair.name)
        for key, base_pair in base_pairs.items():  # baseline records absent from oracle and target
            if key not in seen and base_pair.target is not None:
                outcome = Outcome(key[0], key[1], key[2], layer_of(key[0]), "missing_in_target",
                                  "missing in the oracle and target run", _side(base_run, base_pair.target), None)
                outcome.allowed = any(tap.matches(key[0]) for tap in missing_taps)
                outcomes.append(outcome)
    finally:
        for run in runs:
            run.close()
    tolerance = {"rule": RULE, "defaults": {k: {"rtol": DEFAULT_M, "atol": v} for k, v in DEFAULT_EPS.items()},
                 "oracle": {"path": str(oracle_run.path), "m": m, "eps": eps, "default_eps": DEFAULT_EPS},
                 "allow_missing": list(allow_missing), "allow_failed": list(allow_failed),
                 "renames": [f"{r.regex.pattern}={r.template}" for r in renames], "overrides": []}
    notes = [f"{label}: {n}" for label, run in (("oracle", oracle_run), ("baseline", base_run),
                                                ("target", target_run)) for n in run.notes]
    report = Report(baseline=describe_run(base_run), target=describe_run(target_run), tolerance=tolerance,
                    outcomes=outcomes, layers=depth_profile(outcomes), notes=notes)
    report.oracle = describe_run(oracle_run)
    return report
