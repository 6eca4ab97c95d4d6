"""Tolerance profiles: backend × dtype × name pattern → (rtol, atol), with provenance.

A profile is TOML: either a standalone file whose top level holds ``[[tolerance]]`` entries,
or a ``pyproject.toml`` whose ``[tool.parity]`` table holds them (``[[tool.parity.tolerance]]``).
Each entry:

=========  ========  =======================================================================
key        required  meaning
=========  ========  =======================================================================
pattern    no        record-name pattern (segment-aware glob or ``re:REGEX``); default ``**``
backend    no        glob over the backend name given with ``--backend`` / ``backend=``;
                     absent or ``"*"`` = every backend (also when no backend is given)
dtype      no        lower-precision dtype of the pair (``float32``, ``bfloat16``, …);
                     absent = every dtype
rtol       yes*      relative tolerance (*at least one of rtol/atol; the other defaults to 0)
atol       yes*      absolute floor
note       no        provenance: what was measured, on what, when
measured   no        free-form table written by ``parity calibrate`` (observed errors, quantile,
                     margin, runs); shown as provenance
=========  ========  =======================================================================

The first entry that matches wins, so put specific entries before general ones.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from parity.capturing.taps import compile_tap
from parity.compare.tolerance import Override
from parity.errors import UsageError

ENTRY_KEYS = {"pattern", "backend", "dtype", "rtol", "atol", "note", "measured"}
DTYPE_NAMES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where} must be a number, got {value!r}")
    value = float(value)
    if not 0 <= value < float("inf"):
        raise UsageError(f"{where} must be a finite number >= 0, got {value!r}")
    return value


def parse_entries(entries: Any, origin: str) -> list[Override]:
    """Validate a list of entry tables (from a file named ``origin``) into overrides."""
    if not isinstance(entries, list):
        raise UsageError(f"profile {origin}: 'tolerance' must be an array of tables ([[tolerance]])")
    out: list[Override] = []
    for i, entry in enumerate(entries, start=1):
        where = f"profile {origin} entry {i}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where} is not a table")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise UsageError(f"{where} has unknown keys {sorted(unknown)}; valid: {', '.join(sorted(ENTRY_KEYS))}")
        if "rtol" not in entry and "atol" not in entry:
            raise UsageError(f"{where} needs rtol and/or atol")
        pattern = entry.get("pattern", "**")
        if not isinstance(pattern, str):
            raise UsageError(f"{where}: pattern must be a string")
        compile_tap(pattern)
        backend = entry.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise UsageError(f"{where}: backend must be a string")
        dtype = entry.get("dtype")
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise UsageError(f"{where}: unknown dtype {dtype!r}; valid: {', '.join(sorted(DTYPE_NAMES))}")
        note = entry.get("note", "")
        if not isinstance(note, str):
            raise UsageError(f"{where}: note must be a string")
        rtol = _number(entry.get("rtol", 0.0), f"{where}: rtol")
        atol = _number(entry.get("atol", 0.0), f"{where}: atol")
        scope = ", ".join(f"{k}={v}" for k, v in (("backend", backend), ("dtype", dtype)) if v)
        source = f"{Path(origin).name}: {pattern}" + (f" [{scope}]" if scope else "") + (f" ({note})" if note else "")
        out.append(Override(pattern=pattern, rtol=rtol, atol=atol, source=source,
                            backend=backend, dtype=dtype, note=note))
    return out


def load_profile(path: str | Path) -> list[Override]:
    """Read a profile file (standalone TOML or pyproject.toml with ``[tool.parity]``)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"profile {path} is not valid TOML: {exc}") from None
    table = data.get("tool", {}).get("parity") if isinstance(data.get("tool"), dict) else None
    if table is not None:
        if not isinstance(table, dict):
            raise UsageError(f"profile {path}: [tool.parity] must be a table")
        data = table
    if "tolerance" not in data:
        raise UsageError(f"profile {path} has no tolerance entries "
                         "([[tolerance]] or [[tool.parity.tolerance]])")
    return parse_entries(data["tolerance"], str(path))
