"""Writing the JSON report (schema: docs/json-schema.md, version :data:`SCHEMA_VERSION`)."""

from __future__ import annotations

import json
import os
from typing import Any

from parity.compare.result import SCHEMA_VERSION, Report
from parity.report.files import write_text_atomic

__all__ = ["SCHEMA_VERSION", "report_text", "write_json"]


def report_text(data: dict[str, Any]) -> str:
    """The JSON text of a report: indented, except that each pair is one compact line (readable,
    greppable, and written by the C encoder: a report of thousands of pairs takes milliseconds)."""
    pairs = data.get("pairs")
    if not isinstance(pairs, list) or not pairs:
        return json.dumps(data, indent=1, allow_nan=False) + "\n"
    head = json.dumps({k: v for k, v in data.items() if k != "pairs"}, indent=1, allow_nan=False)
    lines = ",\n".join("  " + json.dumps(p, allow_nan=False, separators=(",", ":")) for p in pairs)
    return head[:-2] + ',\n "pairs": [\n' + lines + "\n ]\n}\n"


def write_json(report: Report, path: str | os.PathLike[str]) -> None:
    """Write ``report`` as JSON to ``path`` (see :func:`report_text`; atomically: temp file + rename)."""
    write_text_atomic(path, report_text(report.to_json()), "JSON report")
