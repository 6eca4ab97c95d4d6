"""Comparing pairwise similarity scores (incident 1: small scores and relative tolerances).

Each score is judged by the tolerance rule ``|t − b| ≤ max(atol, rtol·|b|)`` (tolerance of the
name ``scores`` from the policy: ``--rtol/--atol``, ``--tol scores:…`` or a profile entry, else
the default of the lower-precision dtype). Each row says which part of the rule decided it:
the **relative** part (rtol·|b| ≥ atol) or the **absolute floor** (atol > rtol·|b|) — for small
scores the floor decides, which is exactly what a per-backend floor is for. Rows also carry the
smallest atol that would pass the row at this rtol.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from parity.compare.tolerance import TolerancePolicy


def pair_scores(embeddings: np.ndarray) -> np.ndarray:
    """Cosine scores of consecutive rows (0 with 1, 2 with 3, …) of normalised embeddings."""
    return np.einsum("ij,ij->i", embeddings[0::2], embeddings[1::2])


def compare_scores(pairs: Sequence[tuple[str, str]], base: np.ndarray, target: np.ndarray, *,
                   policy: TolerancePolicy, baseline_dtype: str, target_dtype: str,
                   base_emb: np.ndarray | None = None, target_emb: np.ndarray | None = None) -> dict[str, Any]:
    """Per-score verdicts and a summary (JSON-ready)."""
    tol = policy.resolve("scores", baseline_dtype, target_dtype)
    rows = []
    for (a, b_text), b, t in zip(pairs, base, target):
        diff = abs(float(t) - float(b))
        relative = tol.rtol * abs(float(b))
        allowed = max(tol.atol, relative)
        rows.append({"text_a": a, "text_b": b_text, "baseline": float(b), "target": float(t), "abs_diff": diff,
                     "rel_diff": diff / abs(float(b)) if b else float("inf") if diff else 0.0,
                     "allowed": allowed, "decided_by": "relative" if relative >= tol.atol else "absolute floor",
                     "pass": diff <= allowed, "needed_atol": diff if diff > relative else 0.0})
    out: dict[str, Any] = {"tolerance": tol.to_json(), "rule": "|t - b| <= max(atol, rtol * |b|)", "rows": rows,
                           "verdict": "pass" if all(r["pass"] for r in rows) else "fail",
                           "max_abs_diff": max(r["abs_diff"] for r in rows)}
    if base_emb is not None and target_emb is not None:
        cos = np.einsum("ij,ij->i", base_emb, target_emb)
        rel = np.linalg.norm(target_emb - base_emb, axis=1) / np.linalg.norm(base_emb, axis=1)
        out["embeddings"] = {"min_cosine": float(cos.min()), "max_rel_l2": float(rel.max()), "texts": len(cos)}
    return out


def render_scores(result: dict[str, Any], baseline: str, target: str, console: Any) -> None:
    """Table of scores with the part of the rule that decided each."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from parity.report.terminal import g

    tol = result["tolerance"]
    console.print(f"baseline: {baseline}")
    console.print(f"target:   {target}")
    console.print(f"rule: {result['rule']}; rtol={tol['rtol']:g}, atol={tol['atol']:g} ({tol['source']})")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("pair", "baseline", "target", "|Δ|", "allowed", "decided by", "verdict"):
        table.add_column(col, justify="left" if col in ("pair", "decided by", "verdict") else "right",
                         overflow="ellipsis", no_wrap=True, max_width=32 if col == "pair" else None)
    for row in result["rows"]:
        table.add_row(f"{row['text_a'][:14]}… / {row['text_b'][:14]}…", f"{row['baseline']:.4f}",
                      f"{row['target']:.4f}", g(row["abs_diff"]), g(row["allowed"]), row["decided_by"],
                      Text("pass" if row["pass"] else "FAIL", style="green" if row["pass"] else "red"))
    console.print(table)
    if "embeddings" in result:
        e = result["embeddings"]
        console.print(f"embeddings: min cosine {e['min_cosine']:.6f}, max rel L2 {g(e['max_rel_l2'])} "
                      f"over {e['texts']} texts")
    failed = [r for r in result["rows"] if not r["pass"]]
    console.print(f"{result['verdict'].upper()}: {len(result['rows']) - len(failed)} of {len(result['rows'])} scores "
                  f"within tolerance; max |Δ| {g(result['max_abs_diff'])}")
