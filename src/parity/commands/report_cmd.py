"""``parity report REPORT.json``: render a saved JSON report as HTML, JUnit XML and/or Markdown.

The report is validated before anything is written: a JSON object with ``schema_version`` 2 and
every key the writers read (docs/json-schema.md; ``end_to_end`` is optional, shape in
docs/reports.md). A file that fails is a :class:`parity.errors.UsageError` naming the first
offending field. At least one of ``--html``, ``--junit``, ``--markdown`` is required; no output
may overwrite the input or another output. Prints the verdict line (as ``parity compare`` ends)
on stdout and one ``wrote ...`` line per file on stderr.

Exit code: the report's verdict, as for every parity command (0 pass, 1 fail); 2 when it cannot
run. :func:`write_reports` is the shared entry point for ``--html/--junit/--markdown`` options.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from parity.commands import CONTEXT
from parity.errors import UsageError

#: The report schema version this command reads.
SCHEMA_VERSION = 2


class _Invalid(Exception):
    pass


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _expect(value: Any, where: str, kind: str, *, optional: bool = False) -> Any:
    """Check ``value`` is of ``kind`` (object, list, string, int, bool, number); raise _Invalid."""
    if value is None and optional:
        return value
    ok = {"object": isinstance(value, dict), "list": isinstance(value, list), "string": isinstance(value, str),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "bool": isinstance(value, bool),
          "number": (isinstance(value, (int, float)) and not isinstance(value, bool))
          or value in ("inf", "-inf", "nan")}[kind]
    if not ok:
        article = "an" if kind[0] in "aeiou" else "a"
        raise _Invalid(f"{where} must be {article} {kind}{' or null' if optional else ''}, "
                       f"got {_type_name(value)}")
    return value


def _field(obj: dict[str, Any], key: str, where: str, kind: str, *, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise _Invalid(f"{where} lacks the key {key!r}")
    return _expect(obj[key], f"{where}.{key}", kind, optional=optional)


def _check_pair(pair: Any, where: str, outcomes: tuple[str, ...]) -> None:
    _expect(pair, where, "object")
    _field(pair, "name", where, "string")
    _field(pair, "step", where, "int")
    _field(pair, "rank", where, "int")
    _field(pair, "layer", where, "int", optional=True)
    outcome = _field(pair, "outcome", where, "string")
    if outcome not in outcomes:
        raise _Invalid(f"{where}.outcome {outcome!r} is not one of {', '.join(outcomes)}")
    _field(pair, "allowed", where, "bool")
    _field(pair, "reason", where, "string")
    metrics = _field(pair, "metrics", where, "object", optional=True)
    if metrics is not None:
        for key in ("rel_l2", "max_abs", "cosine"):
            _field(metrics, key, f"{where}.metrics", "number")
    tolerance = _field(pair, "tolerance", where, "object", optional=True)
    if tolerance is not None:
        _field(tolerance, "rtol", f"{where}.tolerance", "number")
        _field(tolerance, "atol", f"{where}.tolerance", "number")
    _field(pair, "needed", where, "object", optional=True)
    _field(pair, "notes", where, "list", optional=True)


def _check_end_to_end(e2e: Any) -> None:
    _expect(e2e, "end_to_end", "object")
    for i, item in enumerate(_field(e2e, "prompts", "end_to_end", "list")):
        where = f"end_to_end.prompts[{i}]"
        _expect(item, where, "object")
        _field(item, "prompt", where, "string")
        for key in ("baseline_tokens", "target_tokens"):
            for j, token in enumerate(_field(item, key, where, "list")):
                _expect(token, f"{where}.{key}[{j}]", "string")
        _field(item, "first_divergent_position", where, "int", optional=True)
    _field(e2e, "token_match_rate", "end_to_end", "number", optional=True)


def validate_report(data: Any) -> None:
    """Raise ``_Invalid`` (message: the first offending field) unless ``data`` is a usable report."""
    from parity.compare.result import OUTCOMES

    _expect(data, "the document", "object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _Invalid(f"schema_version is {version!r}; this parity reads version {SCHEMA_VERSION} "
                       "(written by parity compare --json)")
    summary = _field(data, "summary", "report", "object")
    verdict = _field(summary, "verdict", "summary", "string")
    if verdict not in ("pass", "fail"):
        raise _Invalid(f"summary.verdict must be 'pass' or 'fail', got {verdict!r}")
    for key in ("pairs", "passed", "failed", "allowed"):
        _field(summary, key, "summary", "int")
    _field(summary, "outcomes", "summary", "object")
    for key in ("baseline", "target"):
        _field(data, key, "report", "object")
    tolerance = _field(data, "tolerance", "report", "object")
    _field(tolerance, "rule", "tolerance", "string")
    _field(tolerance, "defaults", "tolerance", "object")
    for i, layer in enumerate(_field(data, "layers", "report", "list")):
        _expect(layer, f"layers[{i}]", "object")
        _field(layer, "layer", f"layers[{i}]", "int")
        _field(layer, "by_kind", f"layers[{i}]", "object")
    _field(data, "notes", "report", "list")
    pairs = _field(data, "pairs", "report", "list")
    for i, pair in enumerate(pairs):
        _check_pair(pair, f"pairs[{i}]", OUTCOMES)
    if summary["pairs"] != len(pairs):
        raise _Invalid(f"summary.pairs is {summary['pairs']} but the report lists {len(pairs)} pairs")
    first = _field(data, "first_divergence", "report", "object", optional=True)
    if first is not None:
        _check_pair(first, "first_divergence", OUTCOMES)
        _field(first, "positions", "first_divergence", "object", optional=True)
    if "end_to_end" in data:
        _check_end_to_end(data["end_to_end"])


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a JSON report file; :class:`UsageError` with one clear line otherwise."""
    import json

    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read report {source}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                         hint="give the file written by parity compare --json") from None
    except (ValueError, RecursionError):  # numbers of thousands of digits, nesting too deep
        raise UsageError(f"{source} holds numbers or nesting beyond a reader's limits",
                         hint="give the file written by parity compare --json") from None
    try:
        validate_report(data)
    except _Invalid as exc:
        raise UsageError(f"{source} is not a parity JSON report: {exc}",
                         hint="give the file written by parity compare --json") from None
    return data


def write_reports(data: dict[str, Any], *, html: str | None = None, junit: str | None = None,
                  markdown: str | None = None) -> list[tuple[str, str]]:
    """Write each requested format of the report dict ``data``; returns ``(format, path)`` written."""
    from parity.report.html import write_html
    from parity.report.junit import write_junit
    from parity.report.markdown import write_markdown

    written = []
    for label, path, writer in (("HTML", html, write_html), ("JUnit XML", junit, write_junit),
                                ("Markdown", markdown, write_markdown)):
        if path:
            writer(data, path)
            written.append((label, str(path)))
    return written


def verdict_lines(data: dict[str, Any]) -> list[str]:
    """The closing lines of ``parity compare``: verdict with counts, then the first divergence."""
    summary = data["summary"]
    outcomes = summary.get("outcomes") or {}
    detail = ", ".join(f"{k} {v}" for k, v in outcomes.items() if v and k not in ("identical", "pass", "noise"))
    if summary.get("allowed"):
        detail += (", " if detail else "") + f"allowed {summary['allowed']}"
    line = (f"{summary['verdict'].upper()}: {summary['passed']} of {summary['pairs']} pairs passed"
            + (f"; {summary['failed']} failed" if summary.get("failed") else "") + (f" ({detail})" if detail else ""))
    lines = [line]
    first = data.get("first_divergence")
    if first:
        layer = "-" if first.get("layer") is None else first["layer"]
        lines.append(f"first divergence: {first['name']} (step {first['step']}, layer {layer})")
    return lines


@click.command("report", context_settings=CONTEXT)
@click.argument("report_json", type=click.Path(dir_okay=False))
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Write a self-contained HTML report (plots, sortable table; works offline).")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), default=None,
              help="Write JUnit XML: one test case per pair, failures with reason and metrics.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Write a short Markdown summary for a pull-request comment.")
def report_cmd(report_json: str, html_path: str | None, junit_path: str | None,
               markdown_path: str | None) -> int:
    """Render a saved JSON report (parity compare --json) as HTML, JUnit XML and/or Markdown.

    Prints the verdict line; the exit code is the report's verdict (0 pass, 1 fail).
    Formats: docs/reports.md.
    """
    outputs = [p for p in (html_path, junit_path, markdown_path) if p]
    if not outputs:
        raise UsageError("nothing to write", hint="give at least one of --html PATH, --junit PATH, --markdown PATH")
    resolved = [Path(p).resolve() for p in outputs]
    if Path(report_json).resolve() in resolved:
        raise UsageError(f"an output path is the input report {report_json}; refusing to overwrite it")
    if len(set(resolved)) != len(resolved):
        raise UsageError("two outputs name the same file", hint="give each format its own path")
    data = load_report(report_json)
    for label, path in write_reports(data, html=html_path, junit=junit_path, markdown=markdown_path):
        click.echo(f"wrote {label} report: {path}", err=True)
    for line in verdict_lines(data):
        click.echo(line)
    return 0 if data["summary"]["verdict"] == "pass" else 1
