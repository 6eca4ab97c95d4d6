"""Terminal rendering of an :class:`~parity.explain.rootcause.Explanation` (rich, ≤ 100 columns).

One row per module in execution order: layer, name, local / inherited / passed-on relative L2
error, local error in unit roundoffs of the target dtype, and whether local and passed-on
errors are within tolerance; then the verdict sentence, notes and the drill-down.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from parity.explain.rootcause import FLOOR_U, OUTLIER, Explanation
from parity.report.terminal import g


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, padding=(0, 1),
                 collapse_padding=True)


def render_explanation(exp: Explanation, console: Console) -> None:
    """Print the explanation."""
    console.print(f"baseline: {exp.baseline}")
    console.print(f"target:   {exp.target}")
    console.print(f"replay: the target's module on the baseline's inputs; x unit = local error in unit "
                  f"roundoffs of the target dtype (anomalous: > {FLOOR_U:g} and > {OUTLIER:g}x the median of "
                  f"its kind)")
    table = _table("error per module (rel L2; worst prompt): local = made here, inherited = received")
    for col in ("L", "module", "local", "inherited", "passed on", "x unit", "local ok", "out ok"):
        table.add_column(col, justify="left" if col == "module" else "right", overflow="fold",
                         no_wrap=col != "module", min_width=16 if col == "module" else None)
    for m in exp.modules:
        root = exp.root is not None and m.name == exp.root.name
        name = Text(m.name + (" <- root cause" if root else ""), style="bold red" if root else "")
        table.add_row("-" if m.layer is None else str(m.layer), name, g(m.local.rel_l2), g(m.inherited),
                      g(m.passed_on.rel_l2), g(m.roundoffs),
                      Text("yes" if m.local_ok else "NO", style="" if m.local_ok else "red"),
                      Text("yes" if m.passed_ok else "NO", style="" if m.passed_ok else "red"))
    console.print(table)
    style = {"local": "bold red", "accumulation": "bold red", "none": "bold yellow", "pass": "bold green"}
    console.print(Text(f"[{exp.case}] ", style=style.get(exp.case, "")) + Text(exp.sentence))
    for note in exp.notes:
        console.print(Text(f"note: {note}", style="yellow"))
    if exp.drilldown:
        _render_drill(exp.drilldown, console)


def _render_drill(drill: dict[str, Any], console: Console) -> None:
    if drill.get("children"):
        table = _table(f"inside {drill['module']}: children replayed on the baseline's inputs")
        for col in ("child", "module", "local", "inherited", "passed on"):
            table.add_column(col, justify="left" if col in ("child", "module") else "right", overflow="fold")
        for c in drill["children"]:
            table.add_row(c["name"], c["module"], g(c["local_rel_l2"]), g(c["inherited_rel_l2"]),
                          g(c["passed_on_rel_l2"]))
        console.print(table)
    if drill.get("operations"):
        table = _table(f"inside {drill['module']}: attention operations, baseline vs target on the same input")
        table.add_column("operation")
        table.add_column("rel L2", justify="right")
        for op in drill["operations"]:
            marker = "  <- introduced here" if op["op"] == drill.get("introduced_by") else ""
            table.add_row(op["op"] + marker, g(op["rel_l2"]))
        console.print(table)
    for finding in drill.get("findings", []):
        console.print(Text("finding: ", style="bold red") + Text(finding))
    for note in drill.get("notes", []):
        console.print(Text(f"note: {note}", style="yellow"))
    if not drill.get("findings"):
        console.print(f"no automatic finding in {drill['module']} (scale, masks, eps, weights checked)")
