"""``parity watch``: compare periodically and serve Prometheus metrics (logic in :mod:`parity.watch`).

Mode by options: ``--baseline-dump DIR --ingest DIR2`` compares each new dump directory in DIR2
against DIR; otherwise model mode loads ``--model`` (default: the built-in tiny Llama) under
``--baseline`` (default ``dtype=float32,attn=eager``) and ``--target`` (default
``dtype=bfloat16,attn=sdpa``) and captures ``--sample`` prompts (default 4) of ``--prompts``
(default: the built-in set) on both each interval. Common defaults: ``--host 127.0.0.1``,
``--port 9464`` (0 picks a free port, printed), ``--interval 30`` seconds, ``--iterations 0``
(run until SIGINT/SIGTERM). Tolerance options as in ``parity compare``. Exit code 0 when
stopped by a signal or after ``--iterations``; 2 when it cannot start (one line on stderr).
"""

from __future__ import annotations

from typing import Any, Sequence

import click

from parity.commands import CONTEXT
from parity.errors import UsageError

DEFAULT_BASELINE_SPEC = "dtype=float32,attn=eager"
DEFAULT_TARGET_SPEC = "dtype=bfloat16,attn=sdpa"


def _settings(rtol: float | None, atol: float | None, tol: Sequence[str], profile: str | None,
              backend: str | None, rename: Sequence[str], allow_missing: Sequence[str],
              allow_failed: Sequence[str]) -> Any:
    from parity.commands.common import make_policy as _policy
    from parity.compare.pairing import parse_rename
    from parity.watch import CompareSettings

    return CompareSettings(policy=_policy(rtol=rtol, atol=atol, tol=tol, profile=profile, backend=backend),
                           renames=[parse_rename(r) for r in rename], allow_missing=list(allow_missing),
                           allow_failed=list(allow_failed))


@click.command("watch", context_settings=CONTEXT)
@click.option("--baseline-dump", type=click.Path(file_okay=False), default=None,
              help="Ingest mode: the reference dump every new dump is compared against.")
@click.option("--ingest", type=click.Path(file_okay=False), default=None,
              help="Ingest mode: directory where new dump directories appear (polled every --interval).")
@click.option("--include-existing", is_flag=True,
              help="Ingest mode: also compare the dumps already there at start (oldest first).")
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Model mode: local Hugging Face causal-LM folder. Default: the built-in tiny Llama.")
@click.option("--baseline", "baseline_spec", default=None, metavar="SPEC",
              help=f"Model mode: backend SPEC of the reference. Default: {DEFAULT_BASELINE_SPEC}.")
@click.option("--target", "target_spec", default=None, metavar="SPEC",
              help=f"Model mode: backend SPEC under test. Default: {DEFAULT_TARGET_SPEC}.")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None,
              help="Model mode: text file, one prompt per line. Default: the built-in prompt set.")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Model mode: prompts per comparison, round robin through the list. Default: 4.")
@click.option("--taps", multiple=True, metavar="PATTERN",
              help="Model mode: modules to capture. Default: the decoder-LM tap set.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the metrics server binds.")
@click.option("--port", type=click.IntRange(0, 65535), default=9464, show_default=True,
              help="Port of the metrics server (0: pick a free port and print it).")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds between comparisons (model mode) or directory polls (ingest mode).")
@click.option("--iterations", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop after this many comparisons (0: run until SIGINT/SIGTERM).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the latest JSON report to this file after each comparison.")
@click.option("--textfile", type=click.Path(dir_okay=False), default=None,
              help="Also write the metrics in Prometheus text format to this file after each comparison "
                   "(node_exporter textfile collector).")
@click.option("--rename", multiple=True, metavar="REGEX=TEMPLATE",
              help="Rename target records before pairing (re.sub syntax). Repeatable.")
@click.option("--allow-missing", multiple=True, metavar="PATTERN",
              help="Records matching PATTERN may be missing on one side without failing. Repeatable.")
@click.option("--allow-failed", multiple=True, metavar="PATTERN",
              help="Known-noisy taps: non-pass outcomes are reported but do not fail. Repeatable.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance for every pair without a --tol match.")
@click.option("--atol", type=float, default=None, help="Absolute floor for every pair without a --tol match.")
@click.option("--tol", multiple=True, metavar="PATTERN:rtol=R,atol=A",
              help="Tolerance for pairs whose name matches PATTERN. Repeatable; first match wins.")
@click.option("--profile", type=click.Path(dir_okay=False), default=None,
              help="Tolerance profile (TOML), as for parity compare.")
@click.option("--backend", default=None, metavar="NAME", help="Backend name that selects profile entries.")
def watch_cmd(baseline_dump: str | None, ingest: str | None, include_existing: bool, model_dir: str | None,
              baseline_spec: str | None, target_spec: str | None, prompts: str | None, sample: int | None,
              taps: Sequence[str], host: str, port: int, interval: float, iterations: int,
              json_path: str | None, textfile: str | None, rename: Sequence[str], allow_missing: Sequence[str],
              allow_failed: Sequence[str], rtol: float | None, atol: float | None, tol: Sequence[str],
              profile: str | None, backend: str | None) -> int:
    """Compare periodically and serve the results as Prometheus metrics on /metrics.

    \b
    ingest mode:  parity watch --baseline-dump DIR --ingest DIR2
                  compares every new dump directory appearing in DIR2 against DIR
    model mode:   parity watch [--model DIR] [--baseline SPEC] [--target SPEC] [--sample N]
                  loads both backends once, captures a sample of prompts on both each interval
    Stops cleanly on SIGINT/SIGTERM. Metrics and alert rules: docs/reports.md.
    """
    from pathlib import Path

    from parity.watch import IngestSource, ModelSource, Watcher, WatchOptions

    ingest_mode = baseline_dump is not None or ingest is not None
    if ingest_mode:
        if baseline_dump is None or ingest is None:
            raise UsageError("ingest mode needs both --baseline-dump DIR and --ingest DIR")
        given = [name for name, value in (("--model", model_dir), ("--baseline", baseline_spec),
                                          ("--target", target_spec), ("--prompts", prompts),
                                          ("--sample", sample), ("--taps", taps or None)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to model mode only, not with --ingest")
    elif include_existing:
        raise UsageError("--include-existing applies to ingest mode only (--baseline-dump, --ingest)")
    settings = _settings(rtol, atol, tol, profile, backend, rename, allow_missing, allow_failed)
    source: IngestSource | ModelSource
    if ingest_mode:
        from parity.store.reader import load_run

        assert baseline_dump is not None and ingest is not None
        base_path, ingest_path = Path(baseline_dump), Path(ingest)
        load_run(base_path).close()  # a bad baseline is an error at start, not at every comparison
        if not ingest_path.is_dir():
            raise UsageError(f"ingest directory {ingest_path} does not exist", hint="create it first")
        source = IngestSource(base_path, ingest_path, include_existing=include_existing)
    else:
        from parity.backends.hf import read_prompts, resolve_model_dir
        from parity.backends.spec import parse_spec
        from parity.watch import DEFAULT_SAMPLE

        specs = parse_spec(baseline_spec or DEFAULT_BASELINE_SPEC), parse_spec(target_spec or DEFAULT_TARGET_SPEC)
        model_path = resolve_model_dir(model_dir)
        source = ModelSource(model_path, specs[0], specs[1], read_prompts(prompts),
                             sample=sample or DEFAULT_SAMPLE, taps=list(taps) or None)
    options = WatchOptions(host=host, port=port, interval=interval, iterations=iterations, json_path=json_path,
                           textfile=textfile, settings=settings)
    watcher = Watcher(source, options, echo=click.echo, warn=lambda line: click.echo(line, err=True))
    return watcher.run()
