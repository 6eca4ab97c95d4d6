"""Writing the JSON report (schema: docs/json-schema.md, version :data:`SCHEMA_VERSION`)."""

from __future__ import annotations

import json
import os

from parity.compare.result import SCHEMA_VERSION, Report
from parity.report.files import write_text_atomic

__all__ = ["SCHEMA_VERSION", "write_json"]


def write_json(report: Report, path: str | os.PathLike[str]) -> None:
    """Write ``report`` as indented JSON to ``path`` (atomically: temp file + rename)."""
    text = json.dumps(report.to_json(), indent=1, allow_nan=False) + "\n"
    write_text_atomic(path, text, "JSON report")
