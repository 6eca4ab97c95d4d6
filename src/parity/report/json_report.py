"""Writing the JSON report (schema: docs/json-schema.md, version :data:`SCHEMA_VERSION`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from parity.compare.result import SCHEMA_VERSION, Report
from parity.errors import UsageError

__all__ = ["SCHEMA_VERSION", "write_json"]


def write_json(report: Report, path: str | os.PathLike[str]) -> None:
    """Write ``report`` as indented JSON to ``path`` (atomically: temp file + rename)."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report.to_json(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        raise UsageError(f"cannot write JSON report {target}: {exc.strerror or exc}") from None
