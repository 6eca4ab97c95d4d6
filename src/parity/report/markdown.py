"""The Markdown summary: a short report for a pull-request comment (GitHub-flavoured Markdown).

:func:`write_markdown` renders the JSON report dict (``Report.to_json()``) as, in order:

- a heading with the verdict and the pass/fail counts, and both runs' specs;
- the first divergence: name, step, layer, outcome, reason, the tolerance with its source and the
  tolerance that would pass (rounded up so a copied value passes);
- the end-to-end token match rate, when the report has an ``end_to_end`` key;
- the worst taps: top :data:`TOP` (default 10) record names by their worst relative L2 error over
  steps, with max |Δ|, lowest cosine and how many of their pairs (steps × ranks) failed; names whose pairs lack
  metrics (missing on one side, shape mismatch) come first;
- the outcome counts.

Record names come from untrusted dumps: they are written as code spans (no Markdown, HTML,
links or @-mentions take effect inside, ``|`` escaped for tables); other report text has
Markdown and HTML punctuation backslash-escaped. The file is written atomically (temp file +
``os.replace``); I/O errors raise :class:`parity.errors.UsageError`.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from parity.compare.verdict import outcome_ok
from parity.report.files import fmt, fmt_up, num, worse, write_text_atomic
from parity.untrusted import shown

#: Rows of the worst-taps table (default 10).
TOP = 10

_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~&@])")


_num = num


def _g(x: Any) -> str:
    return fmt(x, missing="–")


def _g_up(x: Any) -> str:
    return fmt_up(x, missing="–")


def text(value: Any) -> str:
    """Plain text safe in Markdown: one line, punctuation that means something backslash-escaped."""
    return _SPECIAL.sub(r"\\\1", " ".join(shown(value).split()))


def code(value: Any) -> str:
    """A code span holding ``value`` literally, usable inside a table cell."""
    body = " ".join(shown(value).split()).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if body.startswith("`") or body.endswith("`") or not body.strip() else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def _spec(run: dict[str, Any]) -> str:
    spec = run.get("spec") or {}
    if not isinstance(spec, dict) or not spec:
        return code(run.get("path", "?"))
    return code(",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in spec.items()))


def worst_taps(data: dict[str, Any], top: int = TOP) -> list[dict[str, Any]]:
    """Per record name: worst rel L2 over steps (and its step), max |Δ|, lowest cosine, failing
    pairs; sorted worst first (names with a pair lacking metrics first), ``top`` rows."""
    taps: dict[str, dict[str, Any]] = {}
    for pair in data.get("pairs", []):
        tap = taps.setdefault(pair["name"], {"name": pair["name"], "layer": pair.get("layer"), "rel_l2": None,
                                             "step": None, "max_abs": None, "cosine": None, "pairs": 0,
                                             "failed": 0, "no_metrics": False, "outcomes": set()})
        tap["pairs"] += 1
        ok = outcome_ok(pair["outcome"], pair.get("allowed"))
        if not ok:
            tap["failed"] += 1
            tap["outcomes"].add(pair["outcome"])
        metrics = pair.get("metrics")
        if not metrics:
            tap["no_metrics"] = tap["no_metrics"] or not ok
            continue
        rel = _num(metrics.get("rel_l2"))
        old = tap["rel_l2"]
        if rel is not None and (old is None or (not math.isnan(old) and (math.isnan(rel) or rel > old))):
            tap["rel_l2"], tap["step"] = rel, pair["step"]
        tap["max_abs"] = worse(tap["max_abs"], _num(metrics.get("max_abs")))
        tap["cosine"] = worse(tap["cosine"], _num(metrics.get("cosine")), high=False)

    def key(tap: dict[str, Any]) -> tuple[int, float]:
        rel = tap["rel_l2"]
        value = math.inf if rel is None or math.isnan(rel) else rel
        return (0 if tap["no_metrics"] else 1, -value)

    return sorted(taps.values(), key=key)[:top]


def render_markdown(data: dict[str, Any], top: int = TOP) -> str:
    """The Markdown summary of a JSON report dict."""
    summary = data["summary"]
    verdict = summary["verdict"]
    mark = "✅ PASS" if verdict == "pass" else "❌ FAIL"
    head = f"{summary['passed']} of {summary['pairs']} pairs passed"
    if summary.get("failed"):
        head += f", {summary['failed']} failed"
    if summary.get("allowed"):
        head += f", {summary['allowed']} allowed"
    out = [f"### parity: {mark} — {head}", "",
           f"baseline {_spec(data.get('baseline') or {})} vs target {_spec(data.get('target') or {})}", ""]
    first = data.get("first_divergence")
    if first:
        layer = "–" if first.get("layer") is None else first["layer"]
        out.append(f"**First divergence:** {code(first['name'])} — step {first['step']}, layer {layer}, "
                   f"rank {first['rank']}: **{text(first['outcome'])}**")
        out.append("")
        out.append(f"- {text(first.get('reason', ''))}")
        tol = first.get("tolerance")
        if tol:
            out.append(f"- tolerance: rtol={_g(tol.get('rtol'))} atol={_g(tol.get('atol'))} "
                       f"({text(tol.get('source', ''))})")
        needed = first.get("needed")
        if needed:
            out.append(f"- needed: atol ≥ {_g_up(needed.get('atol'))} at this rtol, "
                       f"or rtol ≥ {_g_up(needed.get('rtol'))} at this atol")
        metrics = first.get("metrics")
        if metrics:
            cos = _num(metrics.get("cosine"))
            cos_text = f"{cos:.6f}" if cos is not None and math.isfinite(cos) else _g(cos)
            out.append(f"- rel L2 {_g(metrics.get('rel_l2'))}, max abs error {_g(metrics.get('max_abs'))}, "
                       f"cosine {cos_text}")
        blame = first.get("attribution")
        if isinstance(blame, dict):
            out.append(f"- blame ({text(blame.get('verdict', ''))}): {text(blame.get('text', ''))}")
        site = first.get("call_site")
        if isinstance(site, list) and site:
            out.append(f"- called from {code(site[0])}")
        out.append("")
    else:
        out += ["No divergence: every pair passed or was allowed.", ""]
    e2e = data.get("end_to_end")
    if isinstance(e2e, dict):
        rate = _num(e2e.get("token_match_rate"))
        prompts = e2e.get("prompts") if isinstance(e2e.get("prompts"), list) else []
        diverged = sum(1 for p in prompts if isinstance(p, dict) and p.get("first_divergent_position") is not None)
        rate_text = "–" if rate is None else f"{100 * rate:.1f}%"
        line = (f"**End to end:** token match rate {rate_text} over {len(prompts)} prompt(s); "
                f"{diverged} generation(s) diverged")
        verdicts = e2e.get("verdicts") if isinstance(e2e.get("verdicts"), dict) else {}
        if verdicts:
            line += " (" + ", ".join(f"{text(k)} {v}" for k, v in verdicts.items()) + ")"
        dist = e2e.get("distributions") if isinstance(e2e.get("distributions"), dict) else {}
        if _num(dist.get("kl_mean")) is not None:
            line += f"; teacher-forced KL(baseline‖target) mean {_g(dist.get('kl_mean'))}"
            if _num(dist.get("top1_agreement")) is not None:
                line += f", top-1 agreement {100 * float(dist['top1_agreement']):.1f}%"
        out += [line, ""]
    rows = worst_taps(data, top)
    if rows:
        out += [f"<details{' open' if verdict == 'fail' else ''}><summary>Worst taps (top {len(rows)} by "
                "relative L2)</summary>", "",
                "| layer | tap | worst rel L2 | at step | max abs error | min cosine | failed pairs |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        for tap in rows:
            layer = "–" if tap["layer"] is None else str(tap["layer"])
            cos = tap["cosine"]
            cos_text = f"{cos:.6f}" if cos is not None and math.isfinite(cos) else _g(cos)
            failed = f"{tap['failed']}/{tap['pairs']}"
            if tap["outcomes"] - {"fail"}:
                failed += " (" + ", ".join(text(o) for o in sorted(tap["outcomes"])) + ")"
            step = "–" if tap["step"] is None else tap["step"]
            out.append(f"| {layer} | {code(tap['name'])} | {_g(tap['rel_l2'])} | {step} | {_g(tap['max_abs'])} | "
                       f"{cos_text} | {failed} |")
        out += ["", "</details>", ""]
    outcomes = summary.get("outcomes") or {}
    counts = " · ".join(f"{text(k)} {v}" for k, v in outcomes.items() if v)
    if summary.get("allowed"):
        counts += f" · allowed {summary['allowed']}"
    out.append(f"Counts: {counts or 'no pairs'} (of {summary['pairs']} pairs)")
    return "\n".join(out) + "\n"


def write_markdown(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the Markdown summary of ``data`` (a JSON report dict) to ``path``, atomically."""
    write_text_atomic(path, render_markdown(data), "Markdown report")
