"""Evaluation half of ``bench/verdicts_real_model.py``: compare, explain, sweep, print the tables."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from verdict_cases import Case, scale_mlp

TWIN_BF16 = "twin-bf16"


def _compare(out: Path, case_dir: Path, case: Case) -> Any:
    from parity.compare.engine import compare

    base = out / ("baseline-canonical" if case.canonical else case.baseline)
    if case.baseline == TWIN_BF16:  # both sides bf16: the twin is the baseline's settings in fp32
        twin = out / "baseline"
    else:
        twin = out / TWIN_BF16 if "bfloat16" in case.spec else None
    return compare(base, case_dir, twin=twin)


def _explain(model: Path, case: Case, sequences: list[list[int]], base: Any) -> Any:
    from parity.explain.rootcause import explain
    from verdicts_real_model import load_side

    target = load_side(model, case.spec, case.fault)
    return explain(base, target, sequences[:2], drill=False)


def _row(case: Case, report: Any, explanation: Any) -> dict[str, Any]:
    first = report.first_divergence
    code = 0 if report.verdict == "pass" else 1
    kinds: dict[str, int] = {}
    for o in report.outcomes:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    found = first.name if first else None
    if case.expect is None:
        correct = code == 0
    else:
        correct = code == 1 and found == case.expect
    return {"case": case.name, "expect": case.expect or "-", "exit": code, "first": found or "-",
            "grade": first.kind if first else "-", "kinds": kinds, "correct": correct,
            "root": (explanation.root.name if explanation and explanation.root else
                     ("-" if explanation is None else f"({explanation.case})")),
            "explain_case": explanation.case if explanation else None,
            "explain_ok": None if explanation is None or case.expect is None else
            (explanation.root is not None and explanation.root.name == case.expect),
            "headline": report.headline}


def _sweep(args: Any, sequences: list[list[int]], base_model: Any) -> list[tuple[str, float, bool, str]]:
    """MLP output x(1+delta) at layer 8: smallest delta found at that tap, fp32 (no twin) and bf16 (twin)."""
    from verdicts_real_model import capture, load_side, slug

    rows = []
    fp32, bf16 = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), (2.5e-3, 5e-3, 1e-2, 2e-2, 5e-2)
    for spec, deltas in (("dtype=float32,attn=eager", fp32), ("dtype=float32,attn=sdpa", fp32),
                         ("dtype=bfloat16,attn=eager", bf16), ("dtype=bfloat16,attn=sdpa", bf16)):
        for delta in deltas:
            case = Case(f"sweep {spec} {delta:g}", spec, scale_mlp(8, 1 + delta), "model.layers.8.mlp")
            where = args.out / f"sweep-{slug(spec)}-{delta:g}"
            if args.recapture or not where.is_dir():
                capture(load_side(args.model, spec, case.fault), sequences, where)
            report = _compare(args.out, where, case)
            first = report.first_divergence
            rows.append((spec.replace("dtype=", "").replace("attn=", ""), delta,
                         first is not None and first.name == case.expect,
                         f"{first.name} ({first.kind})" if first else "- (exit 0)"))
    return rows


def evaluate_all(args: Any, cases: Sequence[Case], sequences: list[list[int]], start: float) -> int:
    """Compare (and explain) every case; print the tables; exit 0 when every case is right."""
    from verdicts_real_model import BASELINE, load_side, slug

    base_model = None if args.no_explain and not args.sweep else load_side(args.model, BASELINE)
    rows = []
    for case in cases:
        t0 = time.time()
        report = _compare(args.out, args.out / slug(case.name), case)
        explanation = None
        if not args.no_explain and (case.expect is not None or "sdpa (twin)" in case.name):
            explanation = _explain(args.model, case, sequences, base_model)
        row = _row(case, report, explanation)
        row["seconds"] = time.time() - t0
        rows.append(row)
    print(f"\nverdicts on {args.model} (baseline {BASELINE}; {len(sequences)} sequences teacher-forced)\n")
    print("| case | expected first divergence | exit | first divergence (grade) | explain root cause | right |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        right = "yes" if r["correct"] and r["explain_ok"] is not False else "NO"
        print(f"| {r['case']} | {r['expect']} | {r['exit']} | {r['first']} ({r['grade']}) | {r['root']} | {right} |")
    benign = [r for r in rows if r["expect"] == "-"]
    faults = [r for r in rows if r["expect"] != "-"]
    print(f"\nbenign pairs: {sum(r['correct'] for r in benign)} of {len(benign)} exit 0 "
          f"(false alarms: {sum(not r['correct'] for r in benign)})")
    print(f"faults: {sum(r['correct'] for r in faults)} of {len(faults)} found at the faulted tap; explain names "
          f"it in {sum(bool(r['explain_ok']) for r in faults)} of {sum(r['explain_ok'] is not None for r in faults)}")
    for r in rows:
        print(f"  {r['case']}: {r['headline']}  [{', '.join(f'{k} {v}' for k, v in sorted(r['kinds'].items()))}]")
    if args.sweep:
        print("\nsmallest fault found (MLP output of layer 8 x(1+delta); found = first divergence at that tap)")
        print("| target | delta | found | first divergence |")
        print("|---|---|---|---|")
        for dtype, delta, found, first in _sweep(args, sequences, base_model):
            print(f"| {dtype} | {delta:g} | {'yes' if found else 'no'} | {first} |")
        print("(bf16 targets are judged with the bf16 eager twin; fp32 targets by the tolerance rule)")
    print(f"\ntotal {time.time() - start:.0f} s")
    return 0 if all(r["correct"] for r in rows) else 1
