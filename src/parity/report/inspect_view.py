"""``parity inspect``: what a dump holds, rendered with rich.

Prints the run header (format, mode, world size, spec, model, versions), the number of steps and
records, any notes, then one row per record: step, layer, name, shape, dtype and the stored
statistics (min, max, mean, abs-max, L2, NaN/Inf/zero counts). ``pattern`` (a tap pattern) and
``step`` filter the rows; by default every record is listed.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from parity.capturing.taps import compile_tap
from parity.report.terminal import g
from parity.store.reader import Run


def render_inspect(run: Run, console: Console, *, pattern: str | None = None, step: int | None = None) -> None:
    """Print the contents of ``run``."""
    h = run.header
    steps = sorted({r.step for r in run.records})
    console.print(f"dump: {run.path}  format {h.format_version}  mode {h.mode}  world size {h.world_size}  "
                  f"created {h.created}")
    if h.spec:
        console.print("spec: " + ",".join(f"{k}={v}" for k, v in h.spec.items()))
    if h.model:
        console.print("model: " + ", ".join(f"{k}={v}" for k, v in h.model.items()))
    if h.env:
        console.print("env: " + ", ".join(f"{k}={v}" for k, v in h.env.items() if k != "platform"))
    console.print(f"records: {len(run.records)} in {len(steps)} steps; ranks {sorted(run.headers)}")
    for rank, header in sorted(run.headers.items()):
        if header.layout:
            console.print(f"rank {rank} layout: " + ", ".join(f"{k}={v}" for k, v in header.layout.items()))
    for note in run.notes:
        console.print(f"note: {note}", style="yellow")
    tap = compile_tap(pattern) if pattern else None
    rows = [r for r in run.records if (step is None or r.step == step) and (tap is None or tap.matches(r.name))]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    ranked = len(run.headers) > 1
    for col in ("step", *(("rank",) if ranked else ()), "L", "name", "dtype[shape]", "min", "max", "mean", "L2",
                "nan/inf/0"):
        table.add_column(Text(col), justify="left" if col in ("name", "dtype[shape]") else "right",
                         overflow="fold", no_wrap=col != "name", min_width=16 if col == "name" else None)
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}
    for r in rows:
        s = r.stats
        table.add_row(str(r.step), *((str(r.rank),) if ranked else ()), "-" if r.layer is None else str(r.layer),
                      r.name + (f" ({r.tags['shard']})" if ranked and r.tags.get("shard") else ""),
                      f"{short.get(r.dtype, r.dtype)}[{','.join(map(str, r.shape))}]",
                      g(s.get("min")), g(s.get("max")), g(s.get("mean")), g(s.get("l2")),
                      f"{s.get('nan', 0)}/{s.get('inf', 0)}/{s.get('zero', 0)}")
    console.print(table)
    if not rows:
        console.print("no record matches the filter" if (pattern or step is not None) else "the dump holds no records")
