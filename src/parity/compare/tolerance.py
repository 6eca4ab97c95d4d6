"""Tolerance rules: which (rtol, atol) applies to a pair, and where it came from.

The rule: an element passes when ``|t − b| ≤ max(atol, rtol·|b|)``, the baseline ``b`` being
the reference (pytest.approx semantics: a relative part with an absolute floor). A pair passes
when every element passes.

Resolution order for a pair named N whose lower-precision side has dtype D:

1. the first ``--tol PATTERN:rtol=R,atol=A`` on the command line whose pattern matches N;
2. the first ``[[tolerance]]`` entry of the ``--tol-file`` TOML file whose pattern matches N;
3. ``--rtol`` / ``--atol`` given on the command line (each replaces its half of the default);
4. the default for D in :data:`DEFAULTS`.

Patterns are the segment-aware globs of :mod:`parity.capturing.taps` (or ``re:REGEX``).

Defaults (rtol, atol) per dtype of the lower-precision side, sized for whole-model
activation comparisons (errors accumulate over layers, so they are looser than
``torch.testing``'s per-op defaults):

============  =======  =======  ================================================================
dtype         rtol     atol     why
============  =======  =======  ================================================================
float64       1e-7     1e-9     ~10⁹ × unit roundoff 1.1e-16: kernel-order differences only
float32       1e-4     1e-5     ~10³ × unit roundoff 6e-8; covers eager vs sdpa vs compile
float16       1e-2     1e-3     ~20 × unit roundoff 4.9e-4
bfloat16      5e-2     1e-2     ~13 × unit roundoff 3.9e-3
integer/bool  0        0        exact
============  =======  =======  ================================================================
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from parity.capturing.taps import compile_tap
from parity.errors import UsageError

RULE = "|t - b| <= max(atol, rtol * |b|)  (b = baseline, the reference)"

#: Default (rtol, atol) by dtype of the lower-precision side of a pair.
DEFAULTS: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-9),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 1e-2),
}
EXACT = (0.0, 0.0)
#: Precision order, lowest first, to pick the lower-precision side of a pair.
PRECISION = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class Tolerance:
    """The (rtol, atol) applied to a pair and where the numbers came from."""

    rtol: float
    atol: float
    source: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"rtol": self.rtol, "atol": self.atol, "source": self.source}


@dataclass(frozen=True)
class Override:
    """A per-pattern tolerance from the command line or a file."""

    pattern: str
    rtol: float
    atol: float
    source: str

    def matches(self, name: str) -> bool:
        """Whether the pair name matches the pattern."""
        return compile_tap(self.pattern).matches(name)


def lower_precision(dtype_a: str, dtype_b: str) -> str:
    """The dtype of lower precision (float types by mantissa; non-float types count as exact)."""
    ranks = [PRECISION.index(d) if d in PRECISION else len(PRECISION) for d in (dtype_a, dtype_b)]
    return (dtype_a, dtype_b)[0 if ranks[0] <= ranks[1] else 1]


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise UsageError(f"{what}: {text!r} must be a finite number >= 0")
    return value


def parse_override(text: str) -> Override:
    """Parse ``PATTERN:rtol=R,atol=A`` (either of rtol/atol may be left out: it becomes 0)."""
    pattern, sep, rest = text.rpartition(":")
    if not sep or not pattern:
        raise UsageError(f"--tol {text!r}: expected PATTERN:rtol=R,atol=A")
    values = {"rtol": 0.0, "atol": 0.0}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in values:
            raise UsageError(f"--tol {text!r}: expected rtol=R and/or atol=A after the colon")
        values[key] = _number(value.strip(), f"--tol {text!r}")
    compile_tap(pattern)
    return Override(pattern=pattern, rtol=values["rtol"], atol=values["atol"], source=f"--tol {text}")


def load_tolerance_file(path: str | Path) -> list[Override]:
    """Read ``[[tolerance]]`` entries (``pattern``, ``rtol``, ``atol``, optional ``note``) from TOML."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read tolerance file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"tolerance file {path} is not valid TOML: {exc}") from None
    entries = data.get("tolerance", [])
    if not isinstance(entries, list):
        raise UsageError(f"tolerance file {path}: 'tolerance' must be an array of tables ([[tolerance]])")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("pattern"), str):
            raise UsageError(f"tolerance file {path}: entry {i + 1} needs a string 'pattern'")
        unknown = set(entry) - {"pattern", "rtol", "atol", "note"}
        if unknown:
            raise UsageError(f"tolerance file {path}: entry {i + 1} has unknown keys {sorted(unknown)}; "
                             "valid: pattern, rtol, atol, note")
        compile_tap(entry["pattern"])
        rtol = _number(str(entry.get("rtol", 0.0)), f"{path} entry {i + 1} rtol")
        atol = _number(str(entry.get("atol", 0.0)), f"{path} entry {i + 1} atol")
        note = f" ({entry['note']})" if entry.get("note") else ""
        out.append(Override(pattern=entry["pattern"], rtol=rtol, atol=atol,
                            source=f"{path.name}: {entry['pattern']}{note}"))
    return out


@dataclass
class TolerancePolicy:
    """Resolves the tolerance of each pair. Defaults: no overrides, :data:`DEFAULTS` per dtype."""

    cli_overrides: Sequence[Override] = ()
    file_overrides: Sequence[Override] = ()
    rtol: float | None = None
    atol: float | None = None

    def resolve(self, name: str, baseline_dtype: str, target_dtype: str) -> Tolerance:
        """The tolerance for pair ``name`` (see the module docstring for the order)."""
        for override in (*self.cli_overrides, *self.file_overrides):
            if override.matches(name):
                return Tolerance(override.rtol, override.atol, override.source)
        dtype = lower_precision(baseline_dtype, target_dtype)
        rtol, atol = DEFAULTS.get(dtype, EXACT)
        source = f"default for {dtype}"
        if self.rtol is not None or self.atol is not None:
            rtol = rtol if self.rtol is None else self.rtol
            atol = atol if self.atol is None else self.atol
            given = [f"--{k} {v:g}" for k, v in (("rtol", self.rtol), ("atol", self.atol)) if v is not None]
            source = " ".join(given) + ("" if self.rtol is not None and self.atol is not None
                                        else f" (rest: default for {dtype})")
        return Tolerance(rtol, atol, source)

    def describe(self) -> dict[str, Any]:
        """The policy as JSON-ready data for the report."""
        return {
            "rule": RULE,
            "defaults": {k: {"rtol": r, "atol": a} for k, (r, a) in DEFAULTS.items()},
            "rtol": self.rtol, "atol": self.atol,
            "overrides": [{"pattern": o.pattern, "rtol": o.rtol, "atol": o.atol, "source": o.source}
                          for o in (*self.cli_overrides, *self.file_overrides)],
        }
