"""Shared by the report writers: atomic text files and the numbers of a JSON report."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

from parity.errors import UsageError


def write_text_atomic(path: str | os.PathLike[str], text: str, what: str) -> None:
    """Write ``text`` to ``path`` through a unique temporary file and a rename (never half a file).

    ``what`` names the file in the one-line error (``cannot write HTML report …``).
    """
    target = Path(path)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
        with open(tmp, "x", encoding="utf-8") as handle:  # "x": a new file, mode from the umask
            handle.write(text)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise UsageError(f"cannot write {what} {target}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def num(x: Any) -> float | None:
    """A report number as float: the strings ``inf``/``-inf``/``nan`` become floats; anything else None."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if x in ("inf", "-inf", "nan"):
        return float(x)
    return None


def fmt(x: Any, missing: str = "-") -> str:
    """3 significant digits; ``missing`` for absent values; inf/-inf/nan spelled out."""
    value = num(x)
    if value is None:
        return missing
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.3g}"


def fmt_up(x: Any, missing: str = "-") -> str:
    """Like :func:`fmt` but rounded up, for a tolerance that must still pass when copied."""
    from parity.report.terminal import g_up

    value = num(x)
    return g_up(value) if value is not None else missing


def worse(a: float | None, b: float | None, *, high: bool = True) -> float | None:
    """The worse of two values (higher, or lower when ``high`` is false); NaN is worst, None is nothing."""
    if a is None:
        return b
    if b is None:
        return a
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b) if high else min(a, b)
