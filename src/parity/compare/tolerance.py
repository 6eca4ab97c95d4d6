"""Tolerance rules: which (rtol, atol) applies to a pair, and where it came from.

The rule: an element passes when ``|t − b| ≤ max(atol, rtol·|b|, scale·rms(b))``, the
baseline ``b`` being the reference and ``rms(b)`` the root mean square of the whole baseline
tensor: a relative part, an absolute floor (pytest.approx semantics) and a **scale floor**
that measures small elements against the tensor's own size. A pair passes when every element
passes. Explicit tolerances (``--tol``, profile entries, ``--atol``) have no scale floor
(``scale`` 0), so they mean exactly ``|t − b| ≤ max(atol, rtol·|b|)`` as written.

Why a scale floor: a real model's activations span many orders of magnitude (SmolLM2-135M:
residual values up to ~2e4 next to elements near 0). A matmul's rounding error in an element
is proportional to the norms of the vectors it was computed from, not to the element itself,
so elements near zero carry errors of the tensor's scale: an absolute atol either sits at
their rounding noise (false alarms on fp32 eager vs sdpa, HF vs vLLM) or hides real errors
in small tensors. Measured on SmolLM2-135M fp32 (30 layers, 612 taps; benign pairs eager vs
sdpa, torch.compile, HF vs vLLM): the largest ``|t − b| / max(|b|, rms(b))`` is 2.7e-5
(transformers) and 7.7e-5 (vLLM).

Resolution order for a pair named N whose lower-precision side has dtype D:

1. the first ``--tol PATTERN:rtol=R,atol=A`` on the command line whose pattern matches N;
2. the first entry of the ``--profile`` file (:mod:`parity.compare.profile`) whose pattern
   matches N, whose ``dtype`` (if given) is D and whose ``backend`` (if given) matches the
   ``--backend`` name;
3. ``--rtol`` / ``--atol`` given on the command line (each replaces its half of the default;
   ``--atol`` also replaces the scale floor: an explicit atol is the whole floor);
4. the default for D: (rtol, atol) in :data:`DEFAULTS`, scale in :data:`SCALE`.

Patterns are the segment-aware globs of :mod:`parity.capturing.taps` (or ``re:REGEX``).

Defaults per dtype of the lower-precision side, sized for whole-model activation comparisons
(errors accumulate over layers, so they are looser than ``torch.testing``'s per-op defaults);
``scale`` = ``rtol`` (an element smaller than the tensor's RMS is judged as if it were RMS-sized):

============  ========  =======  ===============================================================
dtype         rtol      atol     why
============  ========  =======  ===============================================================
float64       1e-7      1e-9     ~10⁹ × unit roundoff 1.1e-16: kernel-order differences only
float32       2.44e-4   1e-5     2¹² × unit roundoff 6e-8: 3x the largest benign element error
                                 on SmolLM2 (7.7e-5, HF vs vLLM over 30 layers), below a 3e-4
                                 relative change of one module (a fault it must catch)
float16       1e-2      1e-3     ~20 × unit roundoff 4.9e-4
bfloat16      5e-2      1e-2     ~13 × unit roundoff 3.9e-3
integer/bool  0         0        exact
============  ========  =======  ===============================================================

16-bit runs accumulate rounding chaotically along depth: on SmolLM2, bf16 eager vs bf16 sdpa
differ by up to 4% relative L2 and single elements by half the tensor's RMS at layer 12, and
fp32 vs bf16 by up to 14%. No elementwise tolerance separates that from a fault; whether a
16-bit target is as accurate as its precision allows is judged against a *twin* run
(:mod:`parity.compare.verdict`), not by these numbers alone.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Sequence

from parity.capturing.taps import compile_tap
from parity.errors import UsageError

RULE = "|t - b| <= max(atol, rtol * |b|, scale * rms(b))  (b = baseline, the reference)"

#: Default (rtol, atol) by dtype of the lower-precision side of a pair.
DEFAULTS: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-9),
    "float32": (2.0 ** -12, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 1e-2),
}
EXACT = (0.0, 0.0)
#: Default scale-floor factor by dtype (times the baseline tensor's RMS); equal to the rtol.
SCALE: dict[str, float] = {dtype: rtol for dtype, (rtol, _) in DEFAULTS.items()}
#: Precision order, lowest first, to pick the lower-precision side of a pair.
PRECISION = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class Tolerance:
    """The (rtol, atol, scale) applied to a pair and where the numbers came from.

    ``scale`` (default 0: none) is the factor of the scale floor ``scale·rms(b)``; ``floor``
    (default None: the plain atol decided) is the absolute floor ``max(atol, scale·rms(b))``
    the pair was judged with when the plain atol alone failed it.
    """

    rtol: float
    atol: float
    source: str
    scale: float = 0.0
    floor: float | None = None

    @property
    def effective_atol(self) -> float:
        """The absolute floor actually applied: ``floor`` when computed, else ``atol``."""
        return self.atol if self.floor is None else self.floor

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"rtol": self.rtol, "atol": self.atol, "scale": self.scale, "floor": self.floor,
                "source": self.source}


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

    def applies_to_backend(self, backend: str | None) -> bool:
        """Whether this entry can apply on ``backend`` (an entry without a backend applies anywhere)."""
        if self.backend is None or self.backend == "*":
            return True
        return backend is not None and fnmatch.fnmatchcase(backend, self.backend)

    def matches(self, name: str, *, backend: str | None = None, dtype: str | None = None) -> bool:
        """Whether this entry applies to pair ``name`` of ``dtype`` on ``backend``."""
        if self.dtype is not None and self.dtype != dtype:
            return False
        if not self.applies_to_backend(backend):
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
        scale = SCALE.get(dtype, 0.0) if self.atol is None else 0.0
        source = f"default for {dtype}"
        if self.rtol is not None or self.atol is not None:
            rtol = rtol if self.rtol is None else self.rtol
            atol = atol if self.atol is None else self.atol
            given = [f"--{k} {v:g}" for k, v in (("rtol", self.rtol), ("atol", self.atol)) if v is not None]
            source = " ".join(given) + ("" if self.rtol is not None and self.atol is not None
                                        else f" (rest: default for {dtype})")
        return Tolerance(rtol, atol, source, scale=scale)

    @classmethod
    def from_options(cls, *, rtol: float | None = None, atol: float | None = None, tol: Sequence[str] = (),
                     profile: str | None = None, backend: str | None = None) -> "TolerancePolicy":
        """The policy of the CLI options ``--rtol --atol --tol --profile --backend`` (all optional;
        ``tol`` entries are ``PATTERN:rtol=R,atol=A`` strings). Raises UsageError on a bad value."""
        from parity.compare.profile import load_profile

        for name, value in (("rtol", rtol), ("atol", atol)):
            if value is not None and not value >= 0:
                raise UsageError(f"{name} (--{name}) must be >= 0, got {value}")
        if isinstance(tol, str):  # a single pattern, not its characters
            tol = [tol]
        return cls(cli_overrides=[parse_override(t) for t in tol],
                   file_overrides=load_profile(profile) if profile else [],
                   rtol=rtol, atol=atol, backend=backend, profile_path=str(profile) if profile else None)

    def describe(self) -> dict[str, Any]:
        """The policy as JSON-ready data for the report."""
        return {
            "rule": RULE,
            "defaults": {k: {"rtol": r, "atol": a, "scale": SCALE[k]} for k, (r, a) in DEFAULTS.items()},
            "rtol": self.rtol, "atol": self.atol,
            "profile": self.profile_path, "backend": self.backend,
            "overrides": [{"pattern": o.pattern, "rtol": o.rtol, "atol": o.atol, "source": o.source,
                           "backend": o.backend, "dtype": o.dtype, "note": o.note}
                          for o in (*self.cli_overrides, *self.file_overrides)],
        }
