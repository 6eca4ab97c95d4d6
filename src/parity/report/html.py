"""The HTML report: one self-contained file that works offline.

:func:`write_html` renders the JSON report dict (``Report.to_json()``, docs/json-schema.md) into a
single HTML file with its styles, script and data inline: no CDN, no fonts or images fetched, no
network at all. Contents, top to bottom:

- the verdict and counts, both runs, the first divergence (reason, tolerance and its source, the
  tolerance that would pass, metrics, notes) and the tolerance rules used, rendered in Python
  (readable without JavaScript);
- drawn by the inline script as SVG: error along depth per tap kind (rel L2 from
  ``layers[].by_kind``; max |Δ| with each tap kind's ``atol`` as the tolerance line; 1 − cosine),
  a steps × depth heatmap of the worst rel L2 per (step, layer), the error per token position of
  the first divergence (labelled with decoded tokens when the report has them), the end-to-end
  comparison when the report has an ``end_to_end`` key (shape in docs/reports.md);
- the table of every pair, sortable by clicking a header and filterable by name and outcome.

Strings from the report (record names, tokens, notes) come from untrusted dumps: Python-rendered
text goes through :func:`html.escape`; the data reaches the script as JSON inside
``<script type="application/json">`` with ``<``, ``>`` and ``&`` written as ``\\u003c`` etc., is
read with ``JSON.parse`` and written into the page only through ``textContent`` and
``setAttribute`` on non-URL attributes. The page has a Content-Security-Policy that forbids any
network access.

Size: about 320 bytes per pair plus ~45 kB of fixed markup and script (a 92-pair report is ~75 kB).
The file is written atomically (temp file + ``os.replace``); I/O errors raise
:class:`parity.errors.UsageError`.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from typing import Any

from parity.compare.verdict import OK_GRADES, OUTCOMES, outcome_ok
from parity.jsonsafe import json_float
from parity.report.files import num, worse, write_text_atomic
from parity.untrusted import shown


#: Columns of the compact pair rows embedded for the table (one list per pair).
PAIR_COLUMNS = ("index", "step", "rank", "layer", "name", "outcome", "allowed", "rel_l2", "max_abs",
                "cosine", "mismatch_fraction", "needed_atol", "needed_rtol", "rtol", "atol", "source",
                "reason", "notes")


_num = num


def _is_worse(new: float, old: float | None) -> bool:
    """Whether error ``new`` is worse than ``old`` (None: nothing yet; NaN is worst)."""
    if old is None:
        return True
    if math.isnan(old):
        return False
    return math.isnan(new) or new > old


def _g(x: Any) -> str:
    """3 significant digits; ``-`` for missing values."""
    value = _num(x)
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.3g}"


def _g_up(x: Any) -> str:
    """Like :func:`_g` but rounded up, for a tolerance that must still pass when copied."""
    from parity.report.terminal import g_up

    value = _num(x)
    return g_up(value) if value is not None else "-"


def _kind(name: str) -> str:
    from parity.capturing.taps import tap_kind

    return tap_kind(name)


def _clauses(reason: str) -> list[str]:
    """A reason split at ``"; "`` outside parentheses (one list item per clause)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(reason):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and reason.startswith("; ", i):
            out.append(reason[start:i])
            start = i + 2
    return [*out, reason[start:]]


def _spec_text(run: dict[str, Any]) -> str:
    spec = run.get("spec") or {}
    if not isinstance(spec, dict) or not spec:
        return "no spec recorded"
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in spec.items())


def _depth_series(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per tap kind, per layer: worst rel L2 (``layers[].by_kind``), max |Δ|, lowest cosine,
    whether a pair failed there, and the largest atol that applied."""
    points: dict[str, dict[int, dict[str, Any]]] = {}
    order: list[str] = []
    for pair in data.get("pairs", []):
        layer, metrics = pair.get("layer"), pair.get("metrics")
        if not isinstance(layer, int) or isinstance(layer, bool):
            continue
        kind = _kind(pair["name"])
        if kind not in points:
            points[kind] = {}
            order.append(kind)
        point = points[kind].setdefault(layer, {"layer": layer, "rel_l2": None, "max_abs": None,
                                                "cosine": None, "fail": False, "atol": None, "bound": None})
        if not outcome_ok(pair.get("outcome"), pair.get("allowed")):
            point["fail"] = True
        tolerance = pair.get("tolerance") or {}
        point["atol"] = worse(point["atol"], _num(tolerance.get("atol")))
        if isinstance(pair.get("oracle"), dict):  # oracle mode: the rel L2 bound m·err(baseline) + eps
            point["bound"] = worse(point["bound"], _num(pair["oracle"].get("bound")), high=False)
        if metrics:
            point["rel_l2"] = worse(point["rel_l2"], _num(metrics.get("rel_l2")))
            point["max_abs"] = worse(point["max_abs"], _num(metrics.get("max_abs")))
            point["cosine"] = worse(point["cosine"], _num(metrics.get("cosine")), high=False)
    for entry in data.get("layers", []):  # the depth profile is the reference for rel L2
        for kind, value in (entry.get("by_kind") or {}).items():
            if kind in points and entry.get("layer") in points[kind]:
                points[kind][entry["layer"]]["rel_l2"] = _num(value)
    series = []
    for kind in order:
        rows = [points[kind][layer] for layer in sorted(points[kind])]
        series.append({"kind": kind, "points": [
            {k: (json_float(v) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]})
    return series


def _heatmap(data: dict[str, Any]) -> dict[str, Any]:
    """Worst rel L2 per (step, depth column): one column per layer index, one per tap outside the
    layer stack (embeddings before, final norm and logits after: order of first appearance)."""
    columns: list[tuple[str, Any]] = []
    seen: set[tuple[str, Any]] = set()
    steps: list[int] = []
    cells: dict[tuple[int, tuple[str, Any]], dict[str, Any]] = {}
    for pair in data.get("pairs", []):
        layer = pair.get("layer")
        col = ("layer", layer) if isinstance(layer, int) and not isinstance(layer, bool) else ("tap", pair["name"])
        if col not in seen:
            seen.add(col)
            columns.append(col)
        step = pair.get("step")
        if step not in steps:
            steps.append(step)
        cell = cells.setdefault((step, col), {"v": None, "fail": False, "worst": "", "n": 0})
        cell["n"] += 1
        if not outcome_ok(pair.get("outcome"), pair.get("allowed")):
            cell["fail"] = True
        value = _num((pair.get("metrics") or {}).get("rel_l2"))
        if value is not None and _is_worse(value, cell["v"]):
            cell["v"], cell["worst"] = value, pair["name"]
    steps.sort()
    # Layer columns sorted by index, kept between the taps that precede and follow the stack.
    layer_cols = sorted((c for c in columns if c[0] == "layer"), key=lambda c: c[1])
    if layer_cols:
        first = next(i for i, c in enumerate(columns) if c[0] == "layer")
        before = [c for c in columns[:first] if c[0] == "tap"]
        after = [c for c in columns[first:] if c[0] == "tap"]
        columns = before + layer_cols + after
    matrix = [[({"v": json_float(cells[(s, c)]["v"]), "fail": cells[(s, c)]["fail"],
                 "worst": cells[(s, c)]["worst"], "n": cells[(s, c)]["n"]} if (s, c) in cells else None)
               for c in columns] for s in steps]
    labels = [str(c[1]) if c[0] == "layer" else c[1] for c in columns]
    return {"steps": steps, "columns": labels, "is_layer": [c[0] == "layer" for c in columns],
            "cells": matrix}


def _positions(first: dict[str, Any] | None) -> dict[str, Any] | None:
    if not first or not isinstance(first.get("positions"), dict):
        return None
    pos = first["positions"]
    max_abs, rel = pos.get("max_abs"), pos.get("rel_l2")
    if not isinstance(max_abs, list) or not isinstance(rel, list) or len(max_abs) != len(rel):
        return None
    ids = pos.get("token_ids") if isinstance(pos.get("token_ids"), list) else []
    tokens = pos.get("tokens") if isinstance(pos.get("tokens"), list) else None
    labels = [str(t) for t in tokens] if tokens and len(tokens) == len(max_abs) else \
        ([f"#{i}" for i in ids] if len(ids) == len(max_abs) else [str(i) for i in range(len(max_abs))])
    tolerance = first.get("tolerance") or {}
    return {"name": first.get("name"), "step": first.get("step"), "labels": labels,
            "decoded": bool(tokens and len(tokens) == len(max_abs)),
            "token_ids": ids if len(ids) == len(max_abs) else None,
            "max_abs": [json_float(_num(x)) for x in max_abs], "rel_l2": [json_float(_num(x)) for x in rel],
            "atol": json_float(_num(tolerance.get("atol")))}


def _end_to_end(data: dict[str, Any]) -> dict[str, Any] | None:
    """The ``end_to_end`` block when present and well-formed enough to draw, else None."""
    e2e = data.get("end_to_end")
    if not isinstance(e2e, dict) or not isinstance(e2e.get("prompts"), list):
        return None
    prompts = []
    for item in e2e["prompts"]:
        if not isinstance(item, dict):
            continue
        base = item.get("baseline_tokens") if isinstance(item.get("baseline_tokens"), list) else []
        target = item.get("target_tokens") if isinstance(item.get("target_tokens"), list) else []
        first = item.get("first_divergent_position")
        gap = _num(item.get("baseline_logprob_gap"))
        prompts.append({"prompt": str(item.get("prompt", "")), "baseline_tokens": [str(t) for t in base],
                        "target_tokens": [str(t) for t in target],
                        "first_divergent_position": first if isinstance(first, int) and not isinstance(first, bool)
                        else None,
                        "verdict": str(item["verdict"]) if isinstance(item.get("verdict"), str) else None,
                        "gap": json_float(gap)})
    verdicts = e2e.get("verdicts") if isinstance(e2e.get("verdicts"), dict) else {}
    dist = e2e.get("distributions") if isinstance(e2e.get("distributions"), dict) else {}
    return {"prompts": prompts, "token_match_rate": json_float(_num(e2e.get("token_match_rate"))),
            "verdicts": {str(k): v for k, v in verdicts.items() if isinstance(v, int) and not isinstance(v, bool)},
            "distributions": {k: json_float(_num(dist.get(k))) for k in
                              ("positions", "kl_mean", "kl_max", "top1_agreement", "max_abs_delta_logprob_topk",
                               "top_k") if _num(dist.get(k)) is not None}}


def _pair_notes(pair: dict[str, Any]) -> list[str]:
    """A pair's notes, then what kind of record it is (inputs, parameters) and where it was called from."""
    notes = [str(n) for n in pair.get("notes") or []]
    if pair.get("role"):
        notes.append(f"{pair['role']} record")
    site = pair.get("call_site")
    if isinstance(site, list) and site:
        notes.append(f"called from {site[0]}")
    return notes


def _pair_rows(data: dict[str, Any]) -> tuple[list[list[Any]], list[str]]:
    sources: list[str] = []
    index: dict[str, int] = {}
    rows = []
    for i, pair in enumerate(data.get("pairs", [])):
        m = pair.get("metrics") or {}
        tol = pair.get("tolerance") or {}
        needed = pair.get("needed") or {}
        source = tol.get("source")
        src = None
        if isinstance(source, str):
            src = index.setdefault(source, len(sources))
            if src == len(sources):
                sources.append(source)
        rows.append([i, pair.get("step"), pair.get("rank"), pair.get("layer"), pair.get("name"),
                     pair.get("outcome"), bool(pair.get("allowed")), m.get("rel_l2"), m.get("max_abs"),
                     m.get("cosine"), m.get("mismatch_fraction"), needed.get("atol"), needed.get("rtol"),
                     tol.get("rtol"), tol.get("atol"), src, pair.get("reason", ""),
                     "; ".join(_pair_notes(pair))])
    return rows, sources


def page_data(data: dict[str, Any]) -> dict[str, Any]:
    """What the page script draws, derived from the JSON report (embedded in the page as JSON)."""
    rows, sources = _pair_rows(data)
    return {
        "verdict": data["summary"]["verdict"],
        "oracle": isinstance(data.get("oracle"), dict),
        "depth": _depth_series(data),
        "heatmap": _heatmap(data),
        "positions": _positions(data.get("first_divergence")),
        "end_to_end": _end_to_end(data),
        "pair_columns": list(PAIR_COLUMNS),
        "pairs": rows,
        "sources": sources,
        "outcomes": list(OUTCOMES), "ok_grades": sorted(OK_GRADES),
        "first_index": next((i for i, p in enumerate(data.get("pairs", []))
                             if not outcome_ok(p.get("outcome"), p.get("allowed"))), None),
    }


def script_json(obj: Any) -> str:
    """JSON safe to place inside ``<script type="application/json">``: no ``<``, ``>``, ``&``."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))  # ASCII: a lone surrogate is written as \udXXX
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _e(x: Any) -> str:
    return html.escape(shown(x), quote=True)


def _summary_html(data: dict[str, Any]) -> str:
    summary = data["summary"]
    verdict = summary["verdict"]
    outcomes = summary.get("outcomes") or {}
    detail = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in outcomes.items() if v and k not in OK_GRADES)
    if summary.get("allowed"):
        detail += (", " if detail else "") + f"allowed {summary['allowed']}"
    line = f"{summary['passed']} of {summary['pairs']} pairs passed"
    if summary.get("failed"):
        line += f"; {summary['failed']} failed"
    if detail:
        line += f" ({detail})"
    runs = []
    labels = ("baseline", "target") + (("oracle",) if isinstance(data.get("oracle"), dict) else ())
    for label in labels:
        run = data.get(label) or {}
        model = run.get("model") or {}
        env = run.get("env") or {}
        extra = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers") if env.get(k))
        runs.append(
            f'<tr><th scope="row">{label}</th><td><code>{_e(_spec_text(run))}</code></td>'
            f'<td class="path">{_e(run.get("path", ""))}</td>'
            f'<td>{_e(model.get("class") or model.get("architecture") or "")}</td>'
            f'<td>{_e(run.get("records", ""))} records</td><td>{_e(extra)}</td>'
            f'<td>{_e(run.get("created", ""))}</td></tr>')
    return (f'<div class="banner {_e(verdict)}"><div id="verdict" class="verdict">{_e(verdict.upper())}</div>'
            f'<div class="counts" id="counts">{_e(line)}</div></div>'
            f'<table class="runs"><thead><tr><th></th><th>spec</th><th>dump</th><th>model</th><th>size</th>'
            f'<th>versions</th><th>captured</th></tr></thead><tbody>{"".join(runs)}</tbody></table>')


def _first_html(data: dict[str, Any]) -> str:
    first = data.get("first_divergence")
    if not first:
        return ('<section id="first" class="card ok"><h2>First divergence</h2>'
                '<p>None: every pair passed or was allowed.</p></section>')
    layer = "-" if first.get("layer") is None else first["layer"]
    parts = ['<section id="first" class="card bad"><h2>First divergence</h2>',
             f'<p class="fd-name"><code id="first-name">{_e(first["name"])}</code> '
             f'<span class="badge o-{_e(first["outcome"])}">{_e(first["outcome"].replace("_", " "))}</span></p>',
             f'<p class="meta">step {_e(first["step"])} · rank {_e(first["rank"])} · layer {_e(layer)}</p><ul>']
    for part in _clauses(str(first.get("reason", ""))):
        parts.append(f"<li>{_e(part)}</li>")
    tol, metrics, needed = first.get("tolerance"), first.get("metrics"), first.get("needed")
    if tol:
        parts.append(f'<li>tolerance rtol={_e(_g(tol.get("rtol")))} atol={_e(_g(tol.get("atol")))} '
                     f'<span class="src">({_e(tol.get("source", ""))})</span></li>')
    if needed:
        parts.append(f'<li>would pass with <b>atol ≥ {_e(_g_up(needed.get("atol")))}</b> at this rtol, '
                     f'or <b>rtol ≥ {_e(_g_up(needed.get("rtol")))}</b> at this atol</li>')
    if metrics:
        cos = _num(metrics.get("cosine"))
        cos_text = f"{cos:.6f}" if cos is not None and math.isfinite(cos) else _g(cos)
        parts.append(f'<li>rel L2 {_e(_g(metrics.get("rel_l2")))}, cosine {_e(cos_text)}, '
                     f'SQNR {_e(_g(metrics.get("sqnr_db")))} dB, mean |Δ| {_e(_g(metrics.get("mean_abs")))}, '
                     f'max rel {_e(_g(metrics.get("max_rel")))}</li>')
    blame = first.get("attribution")
    if isinstance(blame, dict):
        parts.append(f'<li id="blame"><b>blame ({_e(blame.get("verdict"))})</b>: {_e(blame.get("text"))}</li>')
    site = first.get("call_site")
    if isinstance(site, list) and site:
        frames = "".join(f"<li><code>{_e(frame)}</code></li>" for frame in site)
        parts.append(f'<li id="call-site">called from<ul class="frames">{frames}</ul></li>')
    for note in first.get("notes") or []:
        parts.append(f'<li class="note">note: {_e(note)}</li>')
    parts.append("</ul></section>")
    return "".join(parts)


def _input_differences_html(data: dict[str, Any]) -> str:
    """Steps whose input token ids differ (compared anyway), as a card; empty when none."""
    items = data.get("input_differences")
    if not isinstance(items, list) or not items:
        return ""
    rows = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("positions"), list):
            continue
        for k, position in enumerate(item["positions"]):
            cells = []
            for side in ("baseline", "target"):
                ids, tokens = item.get(f"{side}_ids") or [], item.get(f"{side}_tokens") or []
                token = f" {tokens[k]!r}" if k < len(tokens) else ""
                cells.append(f"<td>{_e(ids[k] if k < len(ids) else '?')}{_e(token)}</td>")
            rows.append(f"<tr><td>{_e(item.get('step'))}</td><td>{_e(position)}</td>{''.join(cells)}</tr>")
    counts = "; ".join(f"step {_e(i.get('step'))}: {_e(i.get('count'))} positions"
                       for i in items if isinstance(i, dict))
    return (f'<section id="input-differences" class="card bad"><h2>Inputs differ</h2><p>The runs were given '
            f'different token ids (compared anyway): {counts}.</p><table><thead><tr><th>step</th><th>position</th>'
            f'<th>baseline</th><th>target</th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def _tolerance_html(data: dict[str, Any]) -> str:
    tol = data.get("tolerance") or {}
    rows = "".join(f"<tr><td>{_e(dtype)}</td><td>{_e(_g(v.get('rtol')))}</td><td>{_e(_g(v.get('atol')))}</td></tr>"
                   for dtype, v in (tol.get("defaults") or {}).items() if isinstance(v, dict))
    items = []
    if tol.get("rtol") is not None or tol.get("atol") is not None:
        items.append(f"<li>for pairs without a pattern match: rtol={_e(_g(tol.get('rtol')))} "
                     f"atol={_e(_g(tol.get('atol')))} (--rtol / --atol; the other from the dtype default)</li>")
    oracle = tol.get("oracle")
    if isinstance(oracle, dict):
        eps = _g(oracle.get("eps")) if oracle.get("eps") is not None else "unit roundoff of the target dtype"
        items.append(f"<li>oracle mode: both runs judged against the float64 run "
                     f"<code>{_e(oracle.get('path', ''))}</code>; m={_e(_g(oracle.get('m')))}, eps={_e(eps)}</li>")
    if tol.get("profile"):
        items.append(f"<li>profile <code>{_e(tol['profile'])}</code>"
                     + (f" for backend <code>{_e(tol['backend'])}</code>" if tol.get("backend") else "") + "</li>")
    for o in tol.get("overrides") or []:
        where = ", ".join(f"{k} {o[k]}" for k in ("backend", "dtype") if o.get(k))
        note = f'<br><span class="note">{_e(o["note"])}</span>' if o.get("note") else ""
        items.append(f"<li><code>{_e(o.get('pattern'))}</code> rtol={_e(_g(o.get('rtol')))} "
                     f"atol={_e(_g(o.get('atol')))}{_e(' (' + where + ')') if where else ''} "
                     f'<span class="src">({_e(o.get("source", ""))})</span>{note}</li>')
    for key, label in (("allow_missing", "allowed to be missing"), ("allow_failed", "allowed to fail"),
                       ("renames", "target renamed")):
        for value in tol.get(key) or []:
            items.append(f"<li>{label}: <code>{_e(value)}</code></li>")
    notes = "".join(f"<li>{_e(n)}</li>" for n in data.get("notes") or [])
    notes_html = f"<h3>Notes from the dumps</h3><ul>{notes}</ul>" if notes else ""
    return (f'<section id="tolerance" class="card"><h2>Tolerance rules</h2>'
            f'<p>rule: <code>{_e(tol.get("rule", ""))}</code></p>'
            f'<div class="tolgrid"><div><h3>defaults (by the lower dtype of a pair)</h3>'
            f'<table class="defaults"><thead><tr><th>dtype</th><th>rtol</th><th>atol</th></tr></thead>'
            f'<tbody>{rows}</tbody></table></div><div><h3>overrides, allow patterns, renames</h3>'
            f'<ul class="rules">{"".join(items) or "<li>none</li>"}</ul></div></div>{notes_html}</section>')


def render_html(data: dict[str, Any]) -> str:
    """The complete HTML page for a JSON report dict."""
    verdict = data["summary"]["verdict"]
    first = data.get("first_divergence")
    title = f"parity {verdict.upper()}" + (f" — first divergence {first['name']}" if first else "")
    e2e_nav = '<a href="#end-to-end">End to end</a>' if _end_to_end(data) else ""
    caption = _DEPTH_CAPTION_ORACLE if isinstance(data.get("oracle"), dict) else _DEPTH_CAPTION
    parts = {"TITLE": _e(title), "DEPTHCAPTION": caption, "CSS": _CSS, "SUMMARY": _summary_html(data),
             "FIRST": _input_differences_html(data) + _first_html(data), "TOLERANCE": _tolerance_html(data), "E2ENAV": e2e_nav,
             "DATA": script_json(page_data(data)), "JS": _JS}
    # One pass over the template: text from the report can never be taken for a placeholder.
    return re.sub(r"@([A-Z0-9]+)@", lambda m: parts[m.group(1)], _TEMPLATE)


def write_html(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the self-contained HTML report of ``data`` (a JSON report dict) to ``path``."""
    write_text_atomic(path, render_html(data), "HTML report")


_DEPTH_CAPTION = (
    "Worst value over steps for each tap kind at each layer (log scale). Markers with a red ring: some pair "
    "of that tap kind failed at that layer. Dashed lines in the max |Δ| plot: each tap kind's "
    "<code>atol</code>, the absolute floor of the tolerance rule (a pair can exceed it and still pass "
    "through <code>rtol·|b|</code>). rel L2 and cosine have no per-element tolerance, so no line is drawn "
    "there.")
_DEPTH_CAPTION_ORACLE = (
    "Oracle mode: errors of the target against the float64 oracle, worst over steps for each tap kind at "
    "each layer (log scale). Markers with a red ring: some pair of that tap kind failed at that layer. "
    "Dashed lines in the relative L2 plot: the pass bound <code>m·err(baseline) + eps</code> of each tap "
    "kind (the tightest over steps). Max |Δ| and cosine have no tolerance in this mode.")

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<meta name="generator" content="parity">
<title>@TITLE@</title>
<style>@CSS@</style>
</head>
<body>
<header class="top"><div class="wrap"><span class="brand">parity</span> report
<nav><a href="#first">First divergence</a><a href="#tolerance">Tolerances</a><a href="#depth">Depth</a><a href="#heatmap">Heatmap</a><a href="#positions">Positions</a>@E2ENAV@<a href="#pairs">Pairs</a></nav></div></header>
<main class="wrap">
<noscript><p class="warn">The plots and the table of pairs are drawn by the page's inline script: enable JavaScript to see them.</p></noscript>
@SUMMARY@
@FIRST@
@TOLERANCE@
<section id="depth" class="card"><h2>Error along depth</h2>
<p class="caption">@DEPTHCAPTION@</p>
<div id="depth-plots" class="plots"></div><div id="depth-legend" class="legend"></div></section>
<section id="heatmap" class="card"><h2>Steps × depth heatmap</h2>
<p class="caption">Worst relative L2 error per (step, layer) over every tap of that layer; taps outside the layer stack get their own column. Colour is log-scaled; a red outline marks a cell holding a failing pair.</p>
<div id="heatmap-plot"></div></section>
<section id="positions" class="card"><h2>First divergence per token position</h2>
<p class="caption" id="positions-caption"></p><div id="positions-plots" class="plots"></div></section>
<section id="end-to-end" class="card" hidden><h2>End-to-end generation</h2><div id="e2e"></div></section>
<section id="pairs" class="card"><h2>All pairs</h2>
<div class="controls"><label>name <input id="filter-name" type="search" placeholder="substring of the record name" autocomplete="off"></label>
<label>outcome <select id="filter-outcome"></select></label><span id="pair-count" class="muted"></span></div>
<div class="tablewrap"><table id="pair-table" class="pairs"><thead></thead><tbody></tbody></table></div></section>
<footer class="muted">Generated by parity from a JSON report (schema version 1). Self-contained: no network access.</footer>
</main>
<script type="application/json" id="parity-data">@DATA@</script>
<script>@JS@</script>
</body>
</html>
"""

_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--card:#fff;--pass:#1a7f37;--fail:#cf222e;
--passbg:#dafbe1;--failbg:#ffebe9;--warn:#9a6700;--accent:#0969da}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 -apple-system,"Segoe UI","Helvetica Neue","Liberation Sans","DejaVu Sans",Arial,sans-serif;color:var(--fg);background:var(--bg)}
code,.mono{font-family:ui-monospace,"SFMono-Regular","DejaVu Sans Mono","Liberation Mono",Menlo,monospace;font-size:12.5px}
.wrap{max-width:1220px;margin:0 auto;padding:0 16px}
header.top{background:#24292f;color:#fff;padding:10px 0;font-size:15px}
header.top .wrap{display:flex;align-items:center;gap:8px;flex-wrap:wrap}
.brand{font-weight:700;letter-spacing:.5px}
nav{margin-left:auto;display:flex;gap:14px;flex-wrap:wrap}nav a{color:#c9d1d9;text-decoration:none;font-size:13px}nav a:hover{color:#fff}
h2{font-size:17px;margin:0 0 8px}h3{font-size:14px;margin:12px 0 4px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:14px 0}
.card.bad{border-left:5px solid var(--fail)}.card.ok{border-left:5px solid var(--pass)}
.banner{display:flex;align-items:center;gap:18px;margin:16px 0 8px;padding:14px 18px;border-radius:8px;border:1px solid}
.banner.pass{background:var(--passbg);border-color:#4ac26b}.banner.fail{background:var(--failbg);border-color:#ff8182}
.verdict{font-size:26px;font-weight:800;letter-spacing:1px;padding:2px 14px;border-radius:6px;color:#fff}
.banner.pass .verdict{background:var(--pass)}.banner.fail .verdict{background:var(--fail)}
.counts{font-size:15px}
table{border-collapse:collapse}
table.runs{width:100%;font-size:13px;background:var(--card);border:1px solid var(--line);border-radius:8px}
table.runs th,table.runs td{padding:5px 10px;text-align:left;border-bottom:1px solid var(--line);vertical-align:top}
table.runs td.path{word-break:break-all;color:var(--muted)}
.fd-name{font-size:16px;margin:0}.fd-name code{font-size:15px;font-weight:600}
.meta{color:var(--muted);margin:2px 0 6px}
.src{color:var(--muted)}.note{color:var(--warn)}.muted{color:var(--muted)}
.badge{display:inline-block;padding:0 8px;border-radius:10px;font-size:12px;font-weight:600;white-space:nowrap;border:1px solid transparent}
.o-pass,.o-identical,.o-noise{background:var(--passbg);color:var(--pass);border-color:#aceebb}
.o-fail,.o-anomalous,.o-nonfinite,.o-degenerate{background:var(--failbg);color:var(--fail);border-color:#ffcecb}
.o-shape_mismatch,.o-dtype_mismatch{background:#fbefff;color:#8250df;border-color:#eccbff}
.o-missing_in_target,.o-missing_in_baseline{background:#fff8c5;color:var(--warn);border-color:#f5e0a0}
.o-allowed{opacity:.65}
.tolgrid{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
table.defaults caption{caption-side:top;text-align:left;color:var(--muted);font-size:12px}
table.defaults th,table.defaults td{padding:2px 12px 2px 0;text-align:left;font-variant-numeric:tabular-nums}
ul.rules{margin:0;padding-left:18px}
.caption{color:var(--muted);font-size:13px;margin:0 0 8px}
.plots{display:flex;flex-wrap:wrap;gap:10px}
.plot{border:1px solid var(--line);border-radius:6px;background:#fff}
svg text{font-family:-apple-system,"Segoe UI","Liberation Sans","DejaVu Sans",Arial,sans-serif;fill:#1f2328}
svg .axis{stroke:#57606a;stroke-width:1}svg .grid{stroke:#e3e8ee;stroke-width:1}svg .grid.minor{stroke:#f1f3f5}
svg .tick.minor{fill:#8c959f;font-size:9.5px}
svg .tick{font-size:10.5px;fill:#57606a}svg .halo{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}svg .ptitle{font-size:13px;font-weight:600}svg .alabel{font-size:11.5px;fill:#424a53}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;margin-top:8px;font-size:12.5px}
.legend .sw{display:inline-block;width:22px;height:0;border-top:3px solid;vertical-align:middle;margin-right:6px}
.legend .sw.dash{border-top-style:dashed;border-top-width:2px}
.legend .ring{display:inline-block;width:10px;height:10px;border-radius:50%;border:2px solid var(--fail);vertical-align:middle;margin-right:6px;background:#999}
.controls{display:flex;gap:16px;align-items:center;margin-bottom:8px;flex-wrap:wrap}
.controls input,.controls select{font:inherit;padding:4px 8px;border:1px solid var(--line);border-radius:6px;margin-left:4px}
.controls input{width:280px}
.tablewrap{overflow:auto;max-height:720px;border:1px solid var(--line);border-radius:6px}
table.pairs{width:100%;font-size:12.5px}
table.pairs th{position:sticky;top:0;background:#f6f8fa;z-index:1;text-align:left;border-bottom:1px solid var(--line);padding:0;white-space:nowrap}
table.pairs th button{font:inherit;font-weight:600;background:none;border:0;padding:6px 8px;cursor:pointer;color:var(--fg);width:100%;text-align:left}
table.pairs th button:hover{background:#eaeef2}
table.pairs th[aria-sort=ascending] button::after{content:" ▲";font-size:10px}
table.pairs th[aria-sort=descending] button::after{content:" ▼";font-size:10px}
table.pairs td{padding:4px 6px;border-bottom:1px solid #eaeef2;vertical-align:top}
table.pairs td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.pairs td.name{overflow-wrap:anywhere;min-width:210px}
table.pairs td.tol{white-space:nowrap}
table.pairs td.reason{color:var(--muted);min-width:240px;font-size:12px}
table.pairs tr.first td{background:#fff1f0}
table.pairs tr:hover td{background:#f6f8fa}
.e2e-rate{font-size:15px;margin-bottom:8px}
.e2e-prompt{margin:10px 0;border-top:1px solid var(--line);padding-top:8px}
.toks{display:flex;flex-wrap:wrap;gap:3px;margin:3px 0}
.tok{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;padding:1px 5px;border-radius:4px;background:#eaeef2;white-space:pre}
.tok.diff{background:var(--failbg);color:var(--fail);outline:1px solid #ffcecb}
.tok.after{opacity:.75}
.rowlabel{display:inline-block;width:70px;color:var(--muted);font-size:12px}
.warn{background:#fff8c5;border:1px solid #f5e0a0;padding:8px 12px;border-radius:6px}
.empty{color:var(--muted);font-style:italic}
footer{margin:18px 0 30px;font-size:12px}
"""

_JS = r"""
(function () {
"use strict";
var D = JSON.parse(document.getElementById("parity-data").textContent);
var OKG = {}; (D.ok_grades || ["pass"]).forEach(function (k) { OKG[k] = true; });
var SVGNS = "http://www.w3.org/2000/svg";
var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
               "#7f7f7f", "#393b79", "#ad494a", "#637939"];
var FAIL = "#cf222e";

function num(x) {
  if (x === null || x === undefined || typeof x === "boolean") return null;
  if (typeof x === "number") return x;
  if (x === "inf") return Infinity;
  if (x === "-inf") return -Infinity;
  if (x === "nan") return NaN;
  return null;
}
function fmt(x, digits) {
  x = num(x);
  if (x === null) return "–";
  if (isNaN(x)) return "NaN";
  if (x === Infinity) return "inf";
  if (x === -Infinity) return "-inf";
  if (x === 0) return "0";
  var d = digits || 3, a = Math.abs(x);
  if (a >= 1e-3 && a < 1e5) return String(Number(x.toPrecision(d)));
  return x.toExponential(d - 1).replace(/\.?0+e/, "e").replace("e+", "e");
}
function h(tag, attrs, text) {
  var e = document.createElement(tag);
  if (attrs) for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function s(tag, attrs, text) {
  var e = document.createElementNS(SVGNS, tag);
  if (attrs) for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function tip(node, text) { node.appendChild(s("title", null, text)); return node; }
function showToken(t) {
  return String(t).replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5").replace(/^ /, "\u2423");
}
function short(text, n) { text = String(text); return text.length > n ? text.slice(0, n - 1) + "\u2026" : text; }

/* ---------- scales ---------- */
function logScale(values, lo, hi) {
  var pos = values.filter(function (v) { return v !== null && isFinite(v) && v > 0; });
  var min = pos.length ? Math.min.apply(null, pos) : 1e-6, max = pos.length ? Math.max.apply(null, pos) : 1e-6;
  var zero = values.some(function (v) { return v !== null && v <= 0; });
  var a = Math.floor(Math.log10(min)), b = Math.ceil(Math.log10(max));
  if (b <= a) b = a + 1;
  if (zero && pos.length) a -= 1;      // zeros sit on the bottom edge, a decade below the smallest value
  var ticks = [], step = Math.max(1, Math.ceil((b - a) / 6));
  for (var p = b; p >= a; p -= step) ticks.unshift(Math.pow(10, p));
  if (zero && ticks[0] !== Math.pow(10, a)) ticks.unshift(Math.pow(10, a));
  var minor = [];                      // 2x and 5x gridlines, labelled when the range is short
  if (step === 1 && b - a <= 3) {
    for (var q = zero ? a + 1 : a; q < b; q++) minor.push(2 * Math.pow(10, q), 5 * Math.pow(10, q));
  }
  return {
    minor: minor, minorLabels: b - a <= 2,
    floor: Math.pow(10, a), top: Math.pow(10, b), ticks: ticks, empty: pos.length === 0,
    y: function (v) {
      if (v === null || isNaN(v) || v === Infinity) return hi;   // non-finite: pinned to the top
      var c = v <= 0 ? a : Math.log10(Math.min(v, Math.pow(10, b)));
      return hi + (lo - hi) * (1 - (c - a) / (b - a));
    },
    label: function (t) {
      var p = Math.floor(Math.log10(t) + 1e-9), m = Math.round(t / Math.pow(10, p));
      if (zero && p === a && m === 1) return "0";
      var e = p === 0 ? "" : "e" + p;
      return m === 1 ? (p === 0 ? "1" : "1" + e) : m + e;
    }
  };
}
function linScale(values, lo, hi) {
  var fin = values.filter(function (v) { return v !== null && isFinite(v); });
  var max = fin.length ? Math.max.apply(null, fin.concat([0])) : 1;
  if (max <= 0) max = 1;
  var mag = Math.pow(10, Math.floor(Math.log10(max))), stepv = mag;
  if (max / mag < 2) stepv = mag / 4; else if (max / mag < 5) stepv = mag / 2;
  var top = Math.ceil(max / stepv) * stepv, ticks = [];
  for (var t = 0; t <= top + stepv / 2; t += stepv) ticks.push(t);
  return {
    floor: 0, top: top, ticks: ticks, empty: fin.length === 0,
    y: function (v) {
      if (v === null || isNaN(v) || v === Infinity) return hi;
      return lo - (lo - hi) * (Math.max(0, v) / top);
    },
    label: function (t) { return fmt(t); }
  };
}
function intTicks(a, b, maxTicks) {
  var span = Math.max(1, b - a), step = Math.max(1, Math.ceil(span / maxTicks)), out = [];
  for (var x = a; x <= b; x += step) out.push(x);
  return out;
}

/* ---------- depth plots ---------- */
function depthPlot(opts) {
  var W = 372, H = 270, L = 62, R = 14, T = 30, B = 44;
  var svg = s("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": "plot", role: "img",
                      "aria-label": opts.title});
  svg.appendChild(s("text", {x: L, y: 18, "class": "ptitle"}, opts.title));
  var all = [];
  opts.series.forEach(function (se) { se.points.forEach(function (p) { all.push(p.y); }); });
  (opts.refs || []).forEach(function (r) { r.points.forEach(function (p) { all.push(p.y); }); });
  var xs = [];
  opts.series.forEach(function (se) { se.points.forEach(function (p) { xs.push(p.x); }); });
  var xmin = Math.min.apply(null, xs), xmax = Math.max.apply(null, xs);
  if (xmax === xmin) { xmin -= 0.5; xmax += 0.5; }
  var X = function (x) { return L + (W - L - R) * (x - xmin) / (xmax - xmin); };
  var sc = logScale(all, H - B, T);
  sc.minor.forEach(function (t) {
    var y = sc.y(t);
    svg.appendChild(s("line", {x1: L, x2: W - R, y1: y, y2: y, "class": "grid minor"}));
    if (sc.minorLabels) svg.appendChild(s("text", {x: L - 6, y: y + 3.5, "text-anchor": "end", "class": "tick minor"},
                                          sc.label(t)));
  });
  sc.ticks.forEach(function (t) {
    var y = sc.y(t);
    svg.appendChild(s("line", {x1: L, x2: W - R, y1: y, y2: y, "class": "grid"}));
    svg.appendChild(s("text", {x: L - 6, y: y + 3.5, "text-anchor": "end", "class": "tick"}, sc.label(t)));
  });
  intTicks(Math.ceil(xmin), Math.floor(xmax), 10).forEach(function (t) {
    svg.appendChild(s("line", {x1: X(t), x2: X(t), y1: H - B, y2: H - B + 4, "class": "axis"}));
    svg.appendChild(s("text", {x: X(t), y: H - B + 16, "text-anchor": "middle", "class": "tick"}, t));
  });
  svg.appendChild(s("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, "class": "axis"}));
  svg.appendChild(s("line", {x1: L, x2: L, y1: T, y2: H - B, "class": "axis"}));
  svg.appendChild(s("text", {x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle", "class": "alabel"}, "layer"));
  svg.appendChild(s("text", {x: 14, y: (T + H - B) / 2, "text-anchor": "middle", "class": "alabel",
                             transform: "rotate(-90 14 " + (T + H - B) / 2 + ")"}, opts.ylabel));
  (opts.refs || []).forEach(function (r) {
    if (!r.points.length) return;
    var d = r.points.map(function (p, i) {
      return (i ? "L" : "M") + X(p.x).toFixed(1) + " " + sc.y(p.y).toFixed(1);
    }).join(" ");
    if (r.points.length === 1) d = "M" + L + " " + sc.y(r.points[0].y).toFixed(1) + " L" + (W - R) + " " + sc.y(r.points[0].y).toFixed(1);
    svg.appendChild(tip(s("path", {d: d, fill: "none", stroke: r.color, "stroke-width": 1.6,
                                   "stroke-dasharray": "6 4", "class": "ref"}), r.label));
    if (r.text) {
      var last = r.points[r.points.length - 1];
      svg.appendChild(s("text", {x: W - R - 2, y: sc.y(last.y) - 4, "text-anchor": "end", "class": "tick halo",
                                 fill: r.color}, r.text));
    }
  });
  opts.series.forEach(function (se) {
    var pts = se.points.filter(function (p) { return p.y !== null; });
    if (!pts.length) return;
    var d = pts.map(function (p, i) { return (i ? "L" : "M") + X(p.x).toFixed(1) + " " + sc.y(p.y).toFixed(1); }).join(" ");
    svg.appendChild(tip(s("path", {d: d, fill: "none", stroke: se.color, "stroke-width": 2, "class": "series"}), se.name));
    pts.forEach(function (p) {
      var c = s("circle", {cx: X(p.x).toFixed(1), cy: sc.y(p.y).toFixed(1), r: p.fail ? 4.2 : 3, fill: se.color,
                           stroke: p.fail ? FAIL : "none", "stroke-width": p.fail ? 2 : 0});
      tip(c, se.name + " · layer " + p.x + ": " + opts.ylabel + " " + fmt(p.y) + (p.fail ? " (a pair failed)" : ""));
      svg.appendChild(c);
    });
  });
  var nonfinite = all.some(function (v) { return v !== null && !isFinite(v); });
  if (sc.empty && !nonfinite) svg.appendChild(s("text", {x: (L + W) / 2, y: (T + H - B) / 2, "text-anchor": "middle",
                                                         "class": "alabel"}, "every value is 0"));
  if (nonfinite) svg.appendChild(s("text", {x: W - R - 2, y: T - 4, "text-anchor": "end", "class": "tick",
                                            fill: FAIL}, "top edge: inf / NaN"));
  return svg;
}

function drawDepth() {
  var box = document.getElementById("depth-plots"), legend = document.getElementById("depth-legend");
  var series = D.depth;
  if (!series.length) { box.appendChild(h("p", {"class": "empty"}, "No tap carries a layer index.")); return; }
  var colors = {};
  series.forEach(function (se, i) { colors[se.kind] = PALETTE[i % PALETTE.length]; });
  function build(key, transform) {
    return series.map(function (se) {
      return {name: se.kind, color: colors[se.kind], points: se.points.map(function (p) {
        var v = num(p[key]);
        return {x: p.layer, y: v === null ? null : transform(v), fail: p.fail};
      })};
    });
  }
  var id = function (v) { return v; };
  var atolRefs = [], sig = {};
  series.forEach(function (se) {
    var pts = se.points.filter(function (p) { return num(p.atol) !== null; })
                       .map(function (p) { return {x: p.layer, y: num(p.atol)}; });
    if (pts.length) sig[se.kind] = JSON.stringify(pts.map(function (p) { return p.y; })) + "|" +
                                   JSON.stringify(pts.map(function (p) { return p.x; }));
    atolRefs.push({kind: se.kind, points: pts});
  });
  var sigs = Object.keys(sig).map(function (k) { return sig[k]; });
  var same = sigs.length > 0 && sigs.every(function (v) { return v === sigs[0]; });
  var refs;
  if (same) {
    var p0 = atolRefs.filter(function (r) { return r.points.length; })[0].points;
    var uniform = p0.every(function (p) { return p.y === p0[0].y; });
    refs = [{points: p0, color: "#444c56", label: "atol (every tap kind)",
             text: uniform ? "atol " + fmt(p0[0].y) : "atol"}];
  } else {
    refs = atolRefs.filter(function (r) { return r.points.length; }).map(function (r) {
      return {points: r.points, color: colors[r.kind], label: "atol of " + r.kind};
    });
  }
  var bounds = series.map(function (se) {
    return {points: se.points.filter(function (p) { return num(p.bound) !== null; })
                             .map(function (p) { return {x: p.layer, y: num(p.bound)}; }),
            color: colors[se.kind], label: "pass bound of " + se.kind};
  }).filter(function (r) { return r.points.length; });
  box.appendChild(depthPlot({title: D.oracle ? "relative L2 error vs oracle, with bound" : "relative L2 error",
                             ylabel: "\u2016t\u2212b\u2016 / \u2016b\u2016", series: build("rel_l2", id),
                             refs: D.oracle ? bounds : []}));
  box.appendChild(depthPlot({title: D.oracle ? "max |\u0394|" : "max |\u0394| with atol", ylabel: "max |t\u2212b|",
                             series: build("max_abs", id), refs: D.oracle ? [] : refs}));
  box.appendChild(depthPlot({title: "1 \u2212 cosine similarity", ylabel: "1 \u2212 cos(t, b)",
                             series: build("cosine", function (v) { return 1 - v; })}));
  series.forEach(function (se) {
    var item = h("span", {"class": "item"});
    var sw = h("span", {"class": "sw"}); sw.style.borderTopColor = colors[se.kind];
    item.appendChild(sw); item.appendChild(h("code", null, se.kind)); legend.appendChild(item);
  });
  var dash = h("span", {"class": "item"}), sw2 = h("span", {"class": "sw dash"});
  sw2.style.borderTopColor = same ? "#444c56" : "#888";
  dash.appendChild(sw2); dash.appendChild(document.createTextNode(D.oracle ? "pass bound m\u00b7err(baseline) + eps (its colour)" :
                                                                  same ? "atol (tolerance floor)" : "atol per tap kind (its colour)"));
  legend.appendChild(dash);
  var ring = h("span", {"class": "item"}); ring.appendChild(h("span", {"class": "ring"}));
  ring.appendChild(document.createTextNode("a pair failed at this layer")); legend.appendChild(ring);
}

/* ---------- heatmap ---------- */
var VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
               [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]];
function viridis(t) {
  t = Math.max(0, Math.min(1, t));
  var x = t * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
  var a = VIRIDIS[i], b = VIRIDIS[i + 1];
  return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + (b[k] - a[k]) * f); }).join(",") + ")";
}
function drawHeatmap() {
  var box = document.getElementById("heatmap-plot"), M = D.heatmap;
  if (!M.steps.length || !M.columns.length) { box.appendChild(h("p", {"class": "empty"}, "No pairs.")); return; }
  var vals = [];
  M.cells.forEach(function (row) { row.forEach(function (c) { if (c) vals.push(num(c.v)); }); });
  var pos = vals.filter(function (v) { return v !== null && isFinite(v) && v > 0; });
  var lo = pos.length ? Math.log10(Math.min.apply(null, pos)) : 0, hi = pos.length ? Math.log10(Math.max.apply(null, pos)) : 1;
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  var nC = M.columns.length, nS = M.steps.length, L = 64, T = 10, R = 110;
  var longest = Math.max.apply(null, M.columns.map(function (c, i) { return M.is_layer[i] ? 2 : Math.min(14, c.split(".").pop().length); }));
  var B = 30 + longest * 6;
  var cw = Math.max(6, Math.min(64, Math.floor((1150 - L - R) / nC))), ch = Math.max(3, Math.min(30, Math.floor(480 / nS)));
  var W = L + cw * nC + R, H = T + ch * nS + B;
  var svg = s("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": "plot", role: "img",
                      "aria-label": "steps by layers heatmap of the worst relative L2 error"});
  M.cells.forEach(function (row, si) {
    row.forEach(function (c, ci) {
      var attrs = {x: L + ci * cw, y: T + si * ch, width: cw - (cw > 8 ? 1 : 0), height: ch - (ch > 6 ? 1 : 0)};
      var label = "step " + M.steps[si] + " · " + (M.is_layer[ci] ? "layer " + M.columns[ci] : M.columns[ci]);
      if (!c) { attrs.fill = "#f0f2f4"; svg.appendChild(tip(s("rect", attrs), label + ": no pair")); return; }
      var v = num(c.v);
      if (v === null) attrs.fill = "#d0d7de";
      else if (isNaN(v) || v === Infinity) attrs.fill = "#000";
      else attrs.fill = v > 0 ? viridis((Math.log10(v) - lo) / (hi - lo)) : viridis(0);
      attrs["class"] = "cell";
      if (c.fail) { attrs.stroke = FAIL; attrs["stroke-width"] = Math.min(2, Math.max(1, cw / 10)); }
      svg.appendChild(tip(s("rect", attrs), label + ": worst rel L2 " + fmt(v) + (c.worst ? " (" + c.worst + ")" : "") +
                          (c.fail ? ", a pair failed" : "") + " · " + c.n + " pair(s)"));
    });
  });
  var every = Math.max(1, Math.ceil(nC / Math.floor((cw * nC) / 16)));
  M.columns.forEach(function (c, ci) {
    if (ci % every) return;
    var x = L + ci * cw + cw / 2, y = T + nS * ch + 8;
    var text = M.is_layer[ci] ? c : short(c.split(".").pop(), 14);
    var t = s("text", {x: x, y: y, "class": "tick", "text-anchor": M.is_layer[ci] ? "middle" : "end",
                       transform: M.is_layer[ci] ? "" : "rotate(-45 " + x + " " + y + ")", dy: M.is_layer[ci] ? "0.7em" : "0.3em"}, text);
    svg.appendChild(tip(t, c));
  });
  var stepEvery = Math.max(1, Math.ceil(nS / Math.floor((ch * nS) / 13)));
  M.steps.forEach(function (st, si) {
    if (si % stepEvery) return;
    svg.appendChild(s("text", {x: L - 6, y: T + si * ch + ch / 2 + 3.5, "text-anchor": "end", "class": "tick"}, st));
  });
  svg.appendChild(s("text", {x: L + cw * nC / 2, y: H - 6, "text-anchor": "middle", "class": "alabel"}, "layer (depth)"));
  svg.appendChild(s("text", {x: 14, y: T + nS * ch / 2, "text-anchor": "middle", "class": "alabel",
                             transform: "rotate(-90 14 " + (T + nS * ch / 2) + ")"}, "step"));
  // colour bar
  var defs = s("defs"), grad = s("linearGradient", {id: "vir", x1: "0", y1: "1", x2: "0", y2: "0"});
  for (var i = 0; i <= 10; i++) grad.appendChild(s("stop", {offset: (i * 10) + "%", "stop-color": viridis(i / 10)}));
  defs.appendChild(grad); svg.appendChild(defs);
  var bx = L + cw * nC + 24, bh = Math.max(60, Math.min(200, nS * ch));
  svg.appendChild(s("rect", {x: bx, y: T, width: 14, height: bh, fill: "url(#vir)", stroke: "#57606a", "stroke-width": 0.5}));
  (pos.length ? [[hi, T], [(lo + hi) / 2, T + bh / 2], [lo, T + bh]] : []).forEach(function (p) {
    svg.appendChild(s("text", {x: bx + 20, y: p[1] + 3.5, "class": "tick"}, fmt(Math.pow(10, p[0]))));
  });
  if (!pos.length) svg.appendChild(s("text", {x: bx + 20, y: T + bh + 3.5, "class": "tick"}, "0"));
  svg.appendChild(s("text", {x: bx, y: T + bh + 16, "class": "tick"}, "rel L2 (log)"));
  svg.appendChild(s("rect", {x: bx, y: T + bh + 26, width: 14, height: 10, fill: "#fff", stroke: FAIL, "stroke-width": 2}));
  svg.appendChild(s("text", {x: bx + 20, y: T + bh + 35, "class": "tick"}, "failed"));
  box.appendChild(svg);
}

/* ---------- per-position error ---------- */
function barPlot(title, ylabel, labels, values, ref, refText) {
  var n = values.length, L = 62, R = ref !== null ? 64 : 14, T = 30;
  var bw = Math.max(2, Math.min(34, Math.floor((560 - L - R) / Math.max(1, n))));
  var longest = Math.max.apply(null, labels.map(function (l) { return Math.min(12, showToken(l).length); }).concat([1]));
  var B = 34 + longest * 6.2, W = L + bw * n + R, H = 200 + B;
  var svg = s("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": "plot", role: "img", "aria-label": title});
  svg.appendChild(s("text", {x: L, y: 18, "class": "ptitle"}, title));
  var vals = values.map(num).concat(ref !== null ? [ref] : []);
  var sc = linScale(vals, H - B, T);
  sc.ticks.forEach(function (t) {
    var y = sc.y(t);
    svg.appendChild(s("line", {x1: L, x2: W - R, y1: y, y2: y, "class": "grid"}));
    svg.appendChild(s("text", {x: L - 6, y: y + 3.5, "text-anchor": "end", "class": "tick"}, sc.label(t)));
  });
  values.forEach(function (v, i) {
    v = num(v);
    var y = sc.y(v), bad = v === null || !isFinite(v);
    var r = s("rect", {x: L + i * bw + (bw > 4 ? 1 : 0), y: y, width: Math.max(1, bw - (bw > 4 ? 2 : 0)),
                       height: Math.max(0, H - B - y), fill: bad ? FAIL : "#0969da", "class": "bar"});
    svg.appendChild(tip(r, "position " + i + " " + JSON.stringify(String(labels[i])) + ": " + fmt(v)));
  });
  if (ref !== null && isFinite(ref)) {
    var ry = sc.y(ref);
    svg.appendChild(s("line", {x1: L, x2: W - R, y1: ry, y2: ry, stroke: FAIL, "stroke-width": 1.5, "stroke-dasharray": "6 4"}));
    svg.appendChild(s("text", {x: W - R + 4, y: ry + 3.5, "class": "tick", fill: FAIL}, refText));
  }
  var every = Math.max(1, Math.ceil(n / Math.floor((bw * n) / 13)));
  labels.forEach(function (l, i) {
    if (i % every) return;
    var x = L + i * bw + bw / 2, y = H - B + 8;
    svg.appendChild(tip(s("text", {x: x, y: y, "text-anchor": "end", "class": "tick mono", dy: "0.3em",
                                   transform: "rotate(-60 " + x + " " + y + ")"}, short(showToken(l), 12)), String(l)));
  });
  svg.appendChild(s("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, "class": "axis"}));
  svg.appendChild(s("line", {x1: L, x2: L, y1: T, y2: H - B, "class": "axis"}));
  svg.appendChild(s("text", {x: 14, y: (T + H - B) / 2, "text-anchor": "middle", "class": "alabel",
                             transform: "rotate(-90 14 " + (T + H - B) / 2 + ")"}, ylabel));
  svg.appendChild(s("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", "class": "alabel"}, "token position"));
  return svg;
}
function drawPositions() {
  var P = D.positions, box = document.getElementById("positions-plots"), cap = document.getElementById("positions-caption");
  if (!P) {
    cap.textContent = D.verdict === "pass" ? "No divergence." :
      "The first divergent tensor has no token axis (or no token ids were recorded): nothing to show per position.";
    return;
  }
  cap.textContent = "Tap " + P.name + " at step " + P.step + ": error over the other axes at each token position" +
    (P.decoded ? ", labelled with the decoded tokens." : ", labelled with token ids (the report has no decoded tokens).");
  box.appendChild(barPlot("max |\u0394| per position", "max |t\u2212b|", P.labels, P.max_abs, num(P.atol),
                          "atol " + fmt(P.atol)));
  box.appendChild(barPlot("relative L2 per position", "\u2016t\u2212b\u2016 / \u2016b\u2016", P.labels, P.rel_l2, null, ""));
}

/* ---------- end to end ---------- */
function drawEndToEnd() {
  var E = D.end_to_end;
  if (!E) return;
  var sec = document.getElementById("end-to-end"), box = document.getElementById("e2e");
  sec.hidden = false;
  var rate = num(E.token_match_rate);
  box.appendChild(h("div", {"class": "e2e-rate", id: "token-match-rate"},
                    "token match rate: " + (rate === null ? "–" : (100 * rate).toFixed(1) + "%") +
                    " over " + E.prompts.length + " prompt(s)"));
  var V = Object.keys(E.verdicts || {});
  if (V.length) box.appendChild(h("div", {"class": "muted"}, V.map(function (k) {
    return k + " " + E.verdicts[k]; }).join(" · ")));
  var Q = E.distributions || {};
  if (Q.kl_mean !== undefined) box.appendChild(h("div", {"class": "muted"},
    "teacher-forced next-token distributions" + (Q.positions !== undefined ? " (" + Q.positions + " positions)" : "") +
    ": KL(b\u2016t) mean " + fmt(Q.kl_mean) + (Q.kl_max !== undefined ? ", max " + fmt(Q.kl_max) : "") +
    (Q.top1_agreement !== undefined ? "; top-1 agreement " + (100 * num(Q.top1_agreement)).toFixed(1) + "%" : "") +
    (Q.max_abs_delta_logprob_topk !== undefined ? "; max |\u0394logprob| top-" + (Q.top_k || "k") + " " +
     fmt(Q.max_abs_delta_logprob_topk) : "")));
  E.prompts.forEach(function (p) {
    var div = h("div", {"class": "e2e-prompt"});
    div.appendChild(h("div", null, "prompt: ")).appendChild(h("code", null, p.prompt));
    var fd = p.first_divergent_position;
    var line = h("div", {"class": "muted"}, fd === null ? "generations identical" :
                 "first divergent generated position: " + fd);
    if (fd !== null && p.verdict) {
      line.appendChild(document.createTextNode(" — "));
      line.appendChild(h("span", {"class": "badge " + (p.verdict === "benign flip" ? "o-missing_in_target" : "o-fail")},
                         p.verdict));
      if (num(p.gap) !== null) line.appendChild(document.createTextNode(" (baseline logprob gap " + fmt(p.gap) + " nats)"));
    }
    div.appendChild(line);
    [["baseline", p.baseline_tokens, p.target_tokens], ["target", p.target_tokens, p.baseline_tokens]].forEach(function (r) {
      var row = h("div", {"class": "toks"});
      row.appendChild(h("span", {"class": "rowlabel"}, r[0]));
      r[1].forEach(function (t, i) {
        var cls = "tok" + (r[2][i] !== t ? " diff" : "") + (fd !== null && i > fd ? " after" : "");
        row.appendChild(h("span", {"class": cls, title: "position " + i}, showToken(t)));
      });
      div.appendChild(row);
    });
    box.appendChild(div);
  });
}

/* ---------- table of pairs ---------- */
function drawTable() {
  var C = {}; D.pair_columns.forEach(function (c, i) { C[c] = i; });
  var table = document.getElementById("pair-table"), thead = table.tHead, tbody = table.tBodies[0];
  var cols = [
    {key: "index", label: "#", num: true}, {key: "step", label: "step", num: true},
    {key: "rank", label: "rank", num: true}, {key: "layer", label: "layer", num: true},
    {key: "name", label: "name"}, {key: "outcome", label: "outcome"},
    {key: "rel_l2", label: "rel L2", num: true}, {key: "max_abs", label: "max |\u0394|", num: true},
    {key: "cosine", label: "cosine", num: true, digits: 6},
    {key: "mismatch_fraction", label: "outside tol", num: true, pct: true},
    {key: "needed_atol", label: "atol \u2265", num: true}, {key: "tolerance", label: "tolerance"},
    {key: "reason", label: "reason"}
  ];
  var tr = h("tr");
  cols.forEach(function (c, i) {
    var th = h("th", {scope: "col", "aria-sort": c.key === "index" ? "ascending" : "none"});
    var b = h("button", {type: "button", title: "sort by " + c.label}, c.label);
    b.addEventListener("click", function () { sortBy(i); });
    th.appendChild(b); tr.appendChild(th);
  });
  thead.appendChild(tr);
  var rows = D.pairs.map(function (p) {
    var r = h("tr", {"data-outcome": p[C.outcome], "data-allowed": p[C.allowed] ? "1" : "0"});
    if (p[C.index] === D.first_index) r.className = "first";
    cols.forEach(function (c) {
      var td;
      if (c.key === "outcome") {
        td = h("td");
        var badge = h("span", {"class": "badge o-" + p[C.outcome] + (p[C.allowed] ? " o-allowed" : "")},
                      String(p[C.outcome]).replace(/_/g, " ") + (p[C.allowed] ? " (allowed)" : ""));
        td.appendChild(badge);
      } else if (c.key === "tolerance") {
        var src = p[C.source] === null ? "" : D.sources[p[C.source]];
        td = h("td", {"class": "tol", title: src}, p[C.rtol] === null ? "–" : "rtol " + fmt(p[C.rtol]) + " atol " + fmt(p[C.atol]));
      } else if (c.key === "reason") {
        td = h("td", {"class": "reason"}, p[C.reason]);
        if (p[C.notes]) td.title = p[C.notes];
      } else if (c.key === "name") {
        td = h("td", {"class": "name mono"}, p[C.name]);
      } else if (c.num) {
        var v = p[C[c.key]];
        var text = (c.key === "index" || c.key === "step" || c.key === "rank" || c.key === "layer") ?
          (v === null ? "–" : String(v)) : (c.pct ? (num(v) === null ? "–" : fmt(100 * num(v)) + "%") : fmt(v, c.digits));
        if (c.key === "needed_atol" && OKG[p[C.outcome]]) text = "–";
        td = h("td", {"class": "num"}, text);
      }
      r.appendChild(td);
    });
    return {row: r, data: p};
  });
  rows.forEach(function (r) { tbody.appendChild(r.row); });
  var state = {col: 0, dir: 1};
  function key(p, c) {
    if (c.key === "tolerance") return num(p[C.atol]);
    return c.num ? num(p[C[c.key]]) : String(p[C[c.key]] === null ? "" : p[C[c.key]]);
  }
  function sortBy(i) {
    state.dir = state.col === i ? -state.dir : (cols[i].num && cols[i].key !== "index" && cols[i].key !== "step" &&
                                                 cols[i].key !== "rank" && cols[i].key !== "layer" ? -1 : 1);
    state.col = i;
    var c = cols[i], numeric = c.num || c.key === "tolerance";
    rows.sort(function (a, b) {
      var x = key(a.data, c), y = key(b.data, c);
      if (numeric) {
        if (x === null && y === null) return a.data[C.index] - b.data[C.index];
        if (x === null) return 1;
        if (y === null) return -1;
        if (isNaN(x)) x = Infinity;
        if (isNaN(y)) y = Infinity;
        if (x !== y) return (x < y ? -1 : 1) * state.dir;
      } else {
        var cmp = x.localeCompare(y);
        if (cmp) return cmp * state.dir;
      }
      return a.data[C.index] - b.data[C.index];
    });
    rows.forEach(function (r) { tbody.appendChild(r.row); });
    Array.prototype.forEach.call(thead.rows[0].cells, function (th, j) {
      th.setAttribute("aria-sort", j === i ? (state.dir > 0 ? "ascending" : "descending") : "none");
    });
  }
  var sel = document.getElementById("filter-outcome"), input = document.getElementById("filter-name");
  var counts = {};
  D.pairs.forEach(function (p) { counts[p[C.outcome]] = (counts[p[C.outcome]] || 0) + 1; });
  var notOk = D.pairs.filter(function (p) { return !OKG[p[C.outcome]] && !p[C.allowed]; }).length;
  var allowed = D.pairs.filter(function (p) { return p[C.allowed]; }).length;
  sel.appendChild(h("option", {value: ""}, "all (" + D.pairs.length + ")"));
  sel.appendChild(h("option", {value: "@notok"}, "not passing (" + notOk + ")"));
  D.outcomes.forEach(function (o) {
    if (counts[o]) sel.appendChild(h("option", {value: o}, o.replace(/_/g, " ") + " (" + counts[o] + ")"));
  });
  if (allowed) sel.appendChild(h("option", {value: "@allowed"}, "allowed (" + allowed + ")"));
  var countEl = document.getElementById("pair-count");
  function applyFilter() {
    var q = input.value.trim().toLowerCase(), o = sel.value, shown = 0;
    rows.forEach(function (r) {
      var p = r.data, ok = true;
      if (q && String(p[C.name]).toLowerCase().indexOf(q) < 0) ok = false;
      if (o === "@notok") ok = ok && !OKG[p[C.outcome]] && !p[C.allowed];
      else if (o === "@allowed") ok = ok && !!p[C.allowed];
      else if (o) ok = ok && p[C.outcome] === o;
      r.row.hidden = !ok;
      if (ok) shown++;
    });
    countEl.textContent = "showing " + shown + " of " + D.pairs.length + " pairs";
  }
  input.addEventListener("input", applyFilter);
  sel.addEventListener("change", applyFilter);
  applyFilter();
}

[drawDepth, drawHeatmap, drawPositions, drawEndToEnd, drawTable].forEach(function (f) {
  try { f(); } catch (err) {
    var m = h("p", {"class": "warn draw-error"}, "Could not draw part of this report: " + err);
    document.querySelector("main").insertBefore(m, document.querySelector("main").firstChild);
  }
});
document.body.setAttribute("data-rendered", "1");
})();
"""
