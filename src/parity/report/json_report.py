"""Writing the JSON report (schema: docs/json-schema.md, version :data:`SCHEMA_VERSION`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from parity.compare.result import SCHEMA_VERSION, Report
from parity.errors import UsageError

__all__ = ["SCHEMA_VERSION", "write_json"]


def write_json(report: Report, path: str | os.PathLike[str]) -> None:
    """Write ``report`` as indented JSON to ``path`` (atomically: temp file + rename)."""
    target = Path(path)
    text = json.dumps(report.to_json(), indent=1, allow_nan=False) + "\n"
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise UsageError(f"cannot write JSON report {target}: {exc.strerror or exc}") from None
