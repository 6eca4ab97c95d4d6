"""``parity matrix``: several targets against one baseline, captured once, in one table.

The baseline runs once (generation + teacher-forced capture); each target is generated and
captured teacher-forced on the baseline's sequences, compared, and summarised in a row: the
verdict, the first divergence, the worst relative L2 error over taps, the mean logits KL
(teacher-forced), the greedy token match rate. Dumps go to ``OUT/baseline`` and
``OUT/target-K`` (K = the target's position, from 1); the full report of each target to
``OUT/target-K/report.json``. A target at a lower precision than the baseline (or a 16-bit
pair) is graded against its twin (:func:`parity.backends.runner.twin_spec`), captured once per
distinct twin spec into ``OUT/twin-J``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from parity.backends.runner import ProgressFactory, capture_baseline, capture_target, twin_spec
from parity.backends.spec import Spec
from parity.errors import UsageError


def run_matrix(model_path: Path, baseline: Spec, targets: Sequence[Spec], prompts: Sequence[str], out: Path, *,
               new_tokens: int, policy: Any, task: ProgressFactory, chat: bool | None = None) -> list[dict[str, Any]]:
    """Run the matrix; returns one JSON-ready row per target. ``chat`` as in ``parity diff``
    (default None: through the chat template when the tokenizer has one). Twins run right after
    the baseline, before any target (vLLM's transformers backend patches some transformers
    classes for the rest of the process, see :func:`parity.backends.runner.run_sides`)."""
    from parity.compare.e2e import distribution_metrics, end_to_end
    from parity.compare.engine import compare
    from parity.report.json_report import write_json
    from parity.store.reader import load_run

    if not targets:
        raise UsageError("parity matrix needs at least one --target SPEC")
    canonical = any(s.engine == "vllm" for s in (baseline, *targets))
    dirs = [out / "baseline"] + [out / f"target-{k}" for k in range(1, len(targets) + 1)]
    for d in dirs:
        _fresh(d)
    base, base_gen, sequences = capture_baseline(model_path, baseline, prompts, dirs[0], new_tokens=new_tokens,
                                                 canonical=canonical, taps=None, mode="full", task=task, chat=chat)
    rows = []
    twins: dict[Spec, Path] = {}
    for spec in targets:
        twin = twin_spec(baseline, spec)
        if twin is not None and twin not in twins:
            twins[twin] = _fresh(out / f"twin-{len(twins) + 1}")
            capture_target(model_path, twin, prompts, sequences, twins[twin], new_tokens=0, canonical=canonical,
                           taps=None, mode="full", task=task, label=f"twin {len(twins)}", chat=base.chat)
    for k, spec in enumerate(targets, start=1):
        target_dir = dirs[k]
        gen = capture_target(model_path, spec, prompts, sequences, target_dir, new_tokens=new_tokens,
                             canonical=canonical, taps=None, mode="full", task=task, label=f"target {k}",
                             chat=base.chat)
        twin = twin_spec(baseline, spec)
        report = compare(dirs[0], target_dir, policy=policy, twin=twins[twin] if twin is not None else None)
        if base_gen and gen:
            e2e = report.end_to_end = end_to_end(dirs[0], target_dir, base_gen, gen, decode=base.tokenizer.decode)
            dist = e2e["distributions"]
        else:
            e2e, dist = None, distribution_metrics(load_run(dirs[0]), load_run(target_dir))
        write_json(report, target_dir / "report.json")
        first = report.first_divergence
        worst = max((o for o in report.outcomes if o.metrics), key=lambda o: o.metrics.rel_l2, default=None)
        rows.append({"target": str(spec), "spec": spec.to_dict(), "verdict": report.verdict,
                     "headline": report.headline, "twin": str(twin) if twin is not None else None,
                     "noise_taps": sum(1 for o in report.outcomes if o.kind == "noise"),
                     "first_divergence": first.name if first else None,
                     "first_divergence_layer": first.layer if first else None,
                     "worst_rel_l2": worst.metrics.rel_l2 if worst else None,
                     "worst_tap": worst.name if worst else None,
                     "logits_kl_mean": dist["kl_mean"] if dist else None,
                     "top1_agreement": dist["top1_agreement"] if dist else None,
                     "token_match_rate": e2e["token_match_rate"] if e2e else None,
                     "report": str(target_dir / "report.json")})
    return rows


def _fresh(d: Path) -> Path:
    """Remove an earlier parity dump at ``d`` (refusing anything else); returns ``d``."""
    if d.exists():
        if not list(d.glob("manifest-rank*.jsonl")) and any(d.iterdir()):
            raise UsageError(f"{d} exists and is not a parity dump; refusing to overwrite it")
        shutil.rmtree(d)
    return d


def render_matrix(baseline: Spec, rows: list[dict[str, Any]], console: Any) -> None:
    """One table, one row per target."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from parity.report.terminal import g

    console.print(f"baseline: {baseline}")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("#", "target", "verdict", "first divergence", "worst rel L2", "KL mean", "tokens"):
        table.add_column(col, justify="left" if col in ("target", "verdict", "first divergence") else "right",
                         overflow="fold")
    for k, row in enumerate(rows, start=1):
        defaults = Spec().to_dict()
        spec = ",".join(f"{key}={value}" for key, value in row["spec"].items()
                        if defaults.get(key) != value or (key == "dtype" and row["spec"].get("engine") == "vllm"))
        tokens = "-" if row["token_match_rate"] is None else f"{100 * row['token_match_rate']:.1f}%"
        verdict = row["verdict"] + (" (noise)" if row["verdict"] == "pass" and row.get("noise_taps") else "")
        table.add_row(str(k), spec, Text(verdict, style="green" if row["verdict"] == "pass" else "red"),
                      row["first_divergence"] or "-", g(row["worst_rel_l2"]), g(row["logits_kl_mean"]), tokens)
    console.print(table)


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> None:
    """The matrix as JSON: ``{"rows": [...]}``."""
    try:
        Path(path).write_text(json.dumps({"rows": rows}, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
