"""Terminal rendering of a report with rich.

Layout: run descriptions and the tolerance rule; the depth profile (worst error per layer,
with its growth over the previous layer); the first divergence in detail; the worst non-passing
pairs (default :data:`SHOW` = 12 rows; ``show_all`` lists every pair); a one-line verdict.
Width: the terminal's (or ``COLUMNS``); not truncated when the output is not a terminal and
``COLUMNS`` is unset (:data:`UNBOUNDED` columns); colour only when the console is a terminal. Every row of a
table carries the layer index (``-`` for taps outside the layer stack).
"""

from __future__ import annotations

import math
import os
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from parity.compare.result import Outcome, Report
from parity.report.safe import SafeConsole

#: Rows of the worst-pairs table shown by default.
SHOW = 12
#: Width used when writing to a file or pipe without ``COLUMNS``: wide enough that no table is cut.
UNBOUNDED = 1000

STYLE = {"identical": "green", "pass": "green", "noise": "cyan", "anomalous": "bold red", "fail": "red",
         "shape_mismatch": "magenta", "missing_in_target": "yellow",
         "missing_in_baseline": "yellow", "nonfinite": "bold red", "degenerate": "bold red", "corrupt": "bold magenta",
         "dtype_mismatch": "magenta"}


def make_console(file: Any = None) -> Console:
    """A console as wide as the terminal (rich reads its size, or ``COLUMNS`` when set); plain
    text and :data:`UNBOUNDED` columns when not writing to a terminal and ``COLUMNS`` is unset.
    No rich markup or emoji codes, and text from files escaped (:class:`~parity.report.safe.SafeConsole`)."""
    console = SafeConsole(file=file, highlight=False, soft_wrap=False, markup=False, emoji=False)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console.width = UNBOUNDED
    return console


#: Token positions of the first divergence shown (the largest errors).
WORST_POSITIONS = 3


def _token_text(ids: list, tokens: list | None, i: int) -> str:
    label = f"#{ids[i]}" if i < len(ids) else "?"
    return f"{label} {tokens[i]!r}" if tokens and i < len(tokens) else label


def _render_positions(report: Report, console: Console, prefix: str) -> None:
    """The first divergence's worst token positions, with the tokens there (when decoded)."""
    pos = report.first_positions
    if not pos or not pos.get("rel_l2"):
        return
    rel, ids, tokens = pos["rel_l2"], pos.get("token_ids") or [], pos.get("tokens")
    worst = sorted(range(len(rel)), key=lambda i: -rel[i])[:WORST_POSITIONS]
    parts = [f"{i} {_token_text(ids, tokens, i)} rel L2 {g(rel[i])}" for i in worst]
    console.print(Text(f"{prefix}worst positions of {len(rel)}: " + "; ".join(parts)))


def _render_input_differences(report: Report, console: Console) -> None:
    """Steps whose token ids differ between the runs (compared anyway), with the tokens."""
    for item in report.input_differences or []:
        tokens_b, tokens_t = item.get("baseline_tokens"), item.get("target_tokens")
        shown_pairs = [f"{p}: {_token_text(item['baseline_ids'], tokens_b, k)} vs "
                       f"{_token_text(item['target_ids'], tokens_t, k)}" for k, p in enumerate(item["positions"][:5])]
        more = f" (+{item['count'] - len(shown_pairs)} more)" if item["count"] > len(shown_pairs) else ""
        lengths = item["lengths"]
        length = f"; {lengths[0]} vs {lengths[1]} tokens" if lengths[0] != lengths[1] else ""
        console.print(Text("inputs differ: ", style="bold yellow") + Text(
            f"step {item['step']}: {item['count']} token positions{length}: " + "; ".join(shown_pairs) + more))


def _render_routing(report: Report, console: Console) -> None:
    """One line per MoE model: the top-k expert-set agreement of each layer's router (all steps)."""
    per_layer: dict[int, list[dict[str, Any]]] = {}
    for o in report.outcomes:
        if o.routing and o.layer is not None:
            per_layer.setdefault(o.layer, []).append(o.routing)
    if not per_layer:
        return
    some = next(iter(per_layer.values()))[0]
    parts = []
    for layer, items in sorted(per_layer.items()):
        tokens = sum(r["tokens"] for r in items)
        agree = sum(r["agree"] * r["tokens"] for r in items) / tokens if tokens else 1.0
        ties, swapped = sum(r["near_ties"] for r in items), sum(r["swapped"] for r in items)
        extra = ", ".join(x for x in (f"{ties} near ties" if ties else "", f"{swapped} swapped" if swapped else "") if x)
        parts.append(f"L{layer} {100 * agree:.1f}%" + (f" ({extra})" if extra else ""))
    console.print(f"expert selection (top-{some['k']} of {some['experts']} experts, tokens with the same set): "
                  + ", ".join(parts))


def g(x: Any) -> str:
    """Compact number formatting (3 significant digits); None and NaN print as ``-``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def g_up(x: float | None) -> str:
    """Like :func:`g` but rounded up, for tolerances that must still pass when copied."""
    if x is None or not isinstance(x, float) or not math.isfinite(x) or x == 0:
        return g(x)
    text = f"{x:.3g}"
    if float(text) < x:
        exponent = math.floor(math.log10(abs(x))) - 2
        text = f"{math.ceil(x / 10 ** exponent) * 10 ** exponent:.3g}"
    return text


def _split_outside_parens(text: str, sep: str = "; ") -> list[str]:
    """Split on ``sep`` where it is not inside parentheses."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth = max(depth - 1, 0)
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _e(x: float) -> str:
    """Short exponent form, three significant digits at most: 1e-05 -> 1e-5, 2**-12 -> 2.44e-4."""
    if not x:
        return "0"
    mantissa, exponent = f"{x:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _layer(o: Outcome) -> str:
    return "-" if o.layer is None else str(o.layer)


def _spec(desc: dict[str, Any]) -> str:
    spec = desc.get("spec") or {}
    text = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in spec.items()) if spec \
        else "no spec recorded"
    return f"{desc.get('path')}  [{text}]"


def render(report: Report, console: Console, *, show: int = SHOW, show_all: bool = False) -> None:
    """Print ``report`` on ``console``."""
    tol = report.tolerance
    console.print(Text("baseline: ", style="bold") + Text(_spec(report.baseline)))
    console.print(Text("target:   ", style="bold") + Text(_spec(report.target)))
    console.print(Text("rule:     ", style="bold") + Text(tol["rule"]))
    if "oracle" in tol:
        console.print(Text("oracle:   ", style="bold") + Text(
            f"{tol['oracle']['path']}  m={tol['oracle']['m']:g}, eps=" + (
                f"{tol['oracle']['eps']:g}" if tol['oracle']['eps'] is not None else
                "by target dtype: " + ", ".join(f"{k} {v:.2g}" for k, v in tol['oracle']['default_eps'].items()))))
    else:
        _render_defaults(tol, console)
    if report.twin is not None:
        console.print(Text("twin:     ", style="bold") + Text(
            f"{_spec(report.twin)}  (precision-aware: d(target, run of its precision) <= "
            f"{tol.get('twin', {}).get('m', 2):g} x precision noise + u/2)"))
    for note in report.notes:
        console.print(Text(f"note: {note}", style="yellow"))
    if report.statistics_based:
        console.print(Text("statistics-based: ", style="bold yellow") + Text(
            "the dumps hold statistics (and sampled elements) only; a failure is certain, a pass only "
            "means no statistic or sampled element contradicts the tolerance"))
    _render_body(report, console, show=show, show_all=show_all)


def _render_defaults(tol: dict[str, Any], console: Console) -> None:
    short = {"float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    console.print(Text("defaults: ", style="bold") + Text(", ".join(
        f"{short.get(k, k)} {_e(v['rtol'])}/{_e(v['atol'])}" for k, v in tol["defaults"].items())
        + " (rtol/atol by lower dtype; scale floor = rtol x rms(b))"))
    for override in tol.get("overrides", []):
        console.print(Text("override: ", style="bold") + Text(
            f"{override['pattern']} rtol={override['rtol']:g} atol={override['atol']:g} ({override['source']})"))


def _render_body(report: Report, console: Console, *, show: int, show_all: bool) -> None:
    if report.layers:
        versus = ", target vs oracle" if report.oracle is not None else (
            "; statistics: rel. difference of L2 norms" if report.statistics_based else "")
        table = Table(title=f"error along depth (worst tap per layer{versus})", box=box.SIMPLE_HEAD,
                      title_justify="left", pad_edge=False, padding=(0, 1), collapse_padding=True)
        for col, justify in (("layer", "right"), ("rel L2", "right"), ("growth", "right"),
                             ("max |Δ|", "right"), ("min cos", "right"), ("worst tap", "left")):
            table.add_column(col, justify=justify, no_wrap=col != "worst tap", overflow="fold")
        for layer in report.layers:
            growth = "-" if layer.growth is None else f"x{layer.growth:.2f}"
            table.add_row(str(layer.layer), g(layer.rel_l2), growth, g(layer.max_abs),
                          "-" if math.isnan(layer.cosine) else f"{layer.cosine:.6f}", layer.worst_name)
        console.print(table)

    _render_routing(report, console)
    _render_input_differences(report, console)
    first = report.first_divergence
    if first is not None:
        console.print(Text("first divergence: ", style="bold red") + Text(
            f"{first.name} (step {first.step}, rank {first.rank}, layer {_layer(first)}) — {first.kind}"))
        for part in _split_outside_parens(first.reason):
            console.print(f"  layer {_layer(first)}: {part}")
        if first.tolerance is not None:
            if first.oracle:
                console.print(f"  layer {_layer(first)}: oracle rule m={first.oracle['m']:g}, "
                              f"eps={first.oracle['eps']:.2g}")
            else:
                t = first.tolerance
                floor = (f", scale floor {t.scale:g} x rms {g(first.metrics.rms_baseline)} = {g(t.floor)}"
                         if t.floor is not None and first.metrics is not None and t.floor > t.atol else "")
                console.print(f"  layer {_layer(first)}: tolerance rtol={t.rtol:g} atol={t.atol:g}{floor} "
                              f"({t.source})")
            if first.metrics is not None and first.kind in ("fail", "degenerate") and not first.oracle:
                console.print(f"  layer {_layer(first)}: would pass with atol>={g_up(first.metrics.needed_atol)} "
                              f"at this rtol, or rtol>={g_up(first.metrics.needed_rtol)} at this atol")
        if first.metrics is not None:
            m = first.metrics
            console.print(f"  layer {_layer(first)}: rel L2 {g(m.rel_l2)}, cosine {m.cosine:.6f}, "
                          f"SQNR {g(m.sqnr_db)} dB, mean |Δ| {g(m.mean_abs)}, max rel {g(m.max_rel)}")
        if first.distribution and "abs" in first.distribution:
            d = first.distribution
            rel = d.get("rel")
            text = ("error distribution: |Δ| " + " ".join(f"{k} {g(v)}" for k, v in d["abs"].items())
                    + ("; relative " + " ".join(f"{k} {g(v)}" for k, v in rel.items()) if rel else ""))
            console.print(f"  layer {_layer(first)}: {text}")
            down = d.get("downcast")
            if down:
                console.print(f"  layer {_layer(first)}: both sides rounded to {down['dtype']}: "
                              f"{100 * down['equal_share']:.1f}% of elements equal, max |Δ| {g(down['max_abs'])}, "
                              f"rel L2 {g(down['rel_l2'])}")
        if first.twin is not None:
            e = first.twin
            console.print(f"  layer {_layer(first)}: twin rule: d {g(e.distance)} vs precision noise {g(e.noise)} "
                          f"(x{g(e.ratio)}; bound {g(e.bound)}); target error {g(e.target_error)}, "
                          f"twin error {g(e.twin_error)}")
        if report.attribution:
            console.print(Text(f"  layer {_layer(first)}: blame ({report.attribution['verdict']}): ", style="bold")
                          + Text(str(report.attribution["text"])))
        for frame in (first.call_site or [])[:2]:
            console.print(f"  layer {_layer(first)}: called from {frame}")
        for note in first.notes:
            console.print(f"  layer {_layer(first)}: note: {note}")
        _render_positions(report, console, f"  layer {_layer(first)}: ")

    if any(o.oracle for o in report.outcomes):
        _render_oracle(report, console)

    rows = report.outcomes if show_all else [o for o in report.outcomes if not o.ok]
    if not show_all:
        rows = sorted(rows, key=lambda o: -(o.metrics.rel_l2 if o.metrics else float("inf")))[:show]
    if rows:
        title = "all pairs" if show_all else f"worst non-passing pairs (top {min(show, len(rows))})"
        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False,
                      padding=(0, 1), collapse_padding=True)
        table.add_column("L", justify="right", no_wrap=True)
        table.add_column("step", justify="right", no_wrap=True)
        table.add_column("name", overflow="fold", ratio=1)
        table.add_column("outcome", no_wrap=True)
        table.add_column("rel L2", justify="right", no_wrap=True)
        table.add_column("max |Δ|", justify="right", no_wrap=True)
        table.add_column("cosine", justify="right", no_wrap=True)
        table.add_column("atol>=", justify="right", no_wrap=True)
        for o in rows:
            m = o.metrics
            kind = o.kind + (" (allowed)" if o.allowed else "")
            table.add_row(_layer(o), str(o.step), o.name, Text(kind, style=STYLE.get(o.kind, "")),
                          g(m.rel_l2) if m else "-", g(m.max_abs) if m else "-",
                          f"{m.cosine:.5f}" if m else "-",
                          g_up(m.needed_atol) if m and o.kind not in ("pass", "identical") else "-")
        console.print(table)

    if report.end_to_end:
        _render_e2e(report.end_to_end, console)

    counts = report.counts()
    failed = sum(1 for o in report.outcomes if not o.ok)
    detail = ", ".join(f"{k} {v}" for k, v in counts.items() if v and k not in ("pass", "identical", "noise"))
    verdict = report.verdict.upper()
    summary = Text(f"{verdict}: ", style="bold green" if verdict == "PASS" else "bold red")
    passed = counts["pass"] + counts["identical"]
    summary.append(f"{passed} of {len(report.outcomes)} pairs passed"
                   + (f" ({counts['identical']} identical)" if counts["identical"] else "")
                   + (f"; {counts['noise']} within precision noise" if counts["noise"] else "")
                   + (f"; {failed} failed" if failed else "") + (f" ({detail})" if detail else ""))
    console.print(summary)
    if report.headline:
        console.print(Text(report.headline, style="bold"))
    if first is not None:
        console.print(f"first divergence: {first.name} (step {first.step}, layer {_layer(first)})")


def _render_oracle(report: Report, console: Console) -> None:
    """Both sides' error against the float64 oracle, side by side, worst over steps per tap."""
    worst: dict[str, dict[str, Any]] = {}
    for o in report.outcomes:
        if not o.oracle:
            continue
        row = worst.setdefault(o.name, {"layer": o.layer, "b": 0.0, "t": 0.0, "bound": 0.0, "ok": True})
        row["b"] = max(row["b"], o.oracle["baseline_error"])
        if o.oracle["target_error"] >= row["t"]:
            row["t"], row["bound"] = o.oracle["target_error"], o.oracle["bound"]
        row["ok"] = row["ok"] and o.ok
    table = Table(title="error against the float64 oracle (rel L2, worst step)", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("L", "name", "baseline err", "target err", "ratio", "bound", "verdict"):
        table.add_column(col, justify="left" if col in ("name", "verdict") else "right",
                         no_wrap=col != "name", overflow="fold")
    for name, row in worst.items():
        ratio = row["t"] / row["b"] if row["b"] > 0 else float("inf") if row["t"] > 0 else 1.0
        table.add_row("-" if row["layer"] is None else str(row["layer"]), name, g(row["b"]), g(row["t"]),
                      g(ratio), g(row["bound"]), Text("pass" if row["ok"] else "fail",
                                                      style="green" if row["ok"] else "red"))
    console.print(table)


def _render_e2e(e2e: dict[str, Any], console: Console) -> None:
    """Generated tokens and next-token distributions (see compare/e2e.py)."""
    v = e2e["verdicts"]
    prompts = len(e2e["prompts"])
    compared = e2e.get("tokens_compared")
    what = (f"{compared} greedy tokens over {prompts} {'chat ' if e2e.get('chat') else ''}prompts (up to "
            f"{e2e['new_tokens']} each)" if isinstance(compared, int)
            else f"{e2e['new_tokens']} greedy tokens x {prompts} prompts")
    eos = e2e.get("ended_at_eos")
    if isinstance(eos, dict) and (eos.get("baseline") or eos.get("target")):
        what += f", ended at EOS: baseline {eos.get('baseline', 0)}, target {eos.get('target', 0)}"
    console.print(Text("end to end: ", style="bold") + Text(
        f"{what}: token match {100 * e2e['token_match_rate']:.1f}%; identical {v['identical']}, "
        f"benign flip {v['benign flip']}, real {v['real divergence']}"))
    dist = e2e.get("distributions")
    if dist:
        console.print(f"  teacher-forced, {dist['positions']} positions: KL(b||t) mean {g(dist['kl_mean'])}, "
                      f"max {g(dist['kl_max'])}; top-1 agreement {100 * dist['top1_agreement']:.1f}%")
        console.print(f"  max |Δlogprob| over the baseline's top-{dist['top_k']}: "
                      f"{g(dist['max_abs_delta_logprob_topk'])}")
    for index, p in enumerate(e2e["prompts"]):
        if p["first_divergent_position"] is None:
            continue
        gap = p.get("baseline_logprob_gap")
        why = (f"gap {gap:.3g} nats" if gap is not None else "target token not in the baseline's top-k")
        console.print(f"  prompt {index}: position {p['first_divergent_position']} after {p['context']!r}: "
                      f"baseline {p['baseline_token']!r} vs target {p['target_token']!r} — {p['verdict']} ({why})")
