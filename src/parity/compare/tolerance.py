"""Tolerance rules: which (rtol, atol) applies to a pair, and where it came from.

The rule: an element passes when ``|t − b| ≤ max(atol, rtol·|b|)``, the baseline ``b`` being
the reference (pytest.approx semantics: a relative part with an absolute floor). A pair passes
when every element passes.

Resolution order for a pair named N whose lower-precision side has dtype D:

1. the first ``--tol PATTERN:rtol=R,atol=A`` on the command line whose pattern matches N;
2. the first entry of the ``--profile`` file (:mod:`parity.compare.profile`) whose pattern
   matches N, whose ``dtype`` (if given) is D and whose ``backend`` (if given) matches the
   ``--backend`` name;
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

import fnmatch
from dataclasses import dataclass
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
    """A per-pattern tolerance from the command line or a profile entry.

    ``backend`` / ``dtype`` (profile entries only; None = any) restrict where it applies:
    ``backend`` is a glob over the ``--backend`` name, ``dtype`` the lower-precision dtype of
    the pair. ``note`` is the provenance the entry carries.
    """

    pattern: str
    rtol: float
    atol: float
    source: str
    backend: str | None = None
    dtype: str | None = None
    note: str = ""

    def matches(self, name: str, *, backend: str | None = None, dtype: str | None = None) -> bool:
        """Whether this entry applies to pair ``name`` of ``dtype`` on ``backend``."""
        if self.dtype is not None and self.dtype != dtype:
            return False
        if self.backend is not None and self.backend != "*":
            if backend is None or not fnmatch.fnmatchcase(backend, self.backend):
                return False
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


@dataclass
class TolerancePolicy:
    """Resolves the tolerance of each pair.

    Defaults: no overrides, no profile, ``backend=None`` (profile entries that name a backend
    then never apply), :data:`DEFAULTS` per dtype.
    """

    cli_overrides: Sequence[Override] = ()
    file_overrides: Sequence[Override] = ()
    rtol: float | None = None
    atol: float | None = None
    backend: str | None = None
    profile_path: str | None = None

    def resolve(self, name: str, baseline_dtype: str, target_dtype: str) -> Tolerance:
        """The tolerance for pair ``name`` (see the module docstring for the order)."""
        dtype = lower_precision(baseline_dtype, target_dtype)
        for override in self.cli_overrides:
            if override.matches(name):
                return Tolerance(override.rtol, override.atol, override.source)
        for override in self.file_overrides:
            if override.matches(name, backend=self.backend, dtype=dtype):
                return Tolerance(override.rtol, override.atol, override.source)
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
            "profile": self.profile_path, "backend": self.backend,
            "overrides": [{"pattern": o.pattern, "rtol": o.rtol, "atol": o.atol, "source": o.source,
                           "backend": o.backend, "dtype": o.dtype, "note": o.note}
                          for o in (*self.cli_overrides, *self.file_overrides)],
        }
