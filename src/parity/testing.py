"""``parity.testing.assert_close``: tolerance checks for test suites, with messages that explain.

Rule (default ``rule="max"``, pytest.approx semantics): an element passes when
``|a − e| ≤ max(atol, rtol·|e|)``, ``e`` being ``expected``; with the dtype default (no
argument, no profile entry) the scale floor of ``parity compare`` joins it:
``|a − e| ≤ max(atol, rtol·|e|, rtol·rms(e))`` (see :mod:`parity.compare.tolerance`).
``rule="add"`` uses torch's ``|a − e| ≤ atol + rtol·|e|``.

Precision-aware (``twin=``, default None): ``twin`` is the same computation at ``actual``'s
precision from a backend you trust (e.g. the CUDA result of a bf16 kernel whose ROCm result is
``actual``, with ``expected`` the fp32 reference). When the elementwise rule fails, the values
still pass when ``actual`` is within precision noise of the twin:
``‖a − twin‖ / ‖twin‖ ≤ m·‖twin − e‖ / ‖e‖ + u/2`` (``twin_m``, default 2; u the unit roundoff
of the lower dtype), the twin rule of :mod:`parity.compare.verdict`. The failure message then
gives both distances.

Where the tolerance comes from, in order:

1. ``rtol`` / ``atol`` arguments (one given alone takes the other from the default below);
2. ``profile`` (a profile file path or a list of entries, see :mod:`parity.compare.profile`):
   the first entry matching ``name`` (or ``""``), the pair's lower-precision dtype and
   ``backend`` (default: the ``PARITY_BACKEND`` environment variable, else None);
3. the default for the lower-precision dtype of the pair
   (:data:`parity.compare.tolerance.DEFAULTS`, the same table ``parity compare`` uses).

Inputs: torch tensors, numpy arrays, Python scalars, and nested lists / tuples / dicts of them
(compared in parallel; the failing path is named, e.g. ``out['logits'][1]``). NaN never equals
NaN unless ``equal_nan=True`` (default False). Shapes must match exactly.

The failure message gives the mismatched count and percent, the greatest absolute and
relative differences with their index and both values there, the tolerance with its source,
and the smallest tolerance that would have passed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from parity.compare.tolerance import DEFAULTS, EXACT, SCALE, Override, lower_precision
from parity.compare.verdict import DEFAULT_M, TwinEvidence, grade_with_twin, twin_eps

__all__ = ["assert_close", "ParityAssertionError", "resolve_tolerance"]

RULES = {"max": "|a - e| <= max(atol, rtol * |e|)", "add": "|a - e| <= atol + rtol * |e|"}


class ParityAssertionError(AssertionError):
    """Raised by :func:`assert_close`; ``details`` holds the numbers of the message."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


@dataclass(frozen=True)
class ResolvedTolerance:
    """The tolerance that applies and a sentence saying where it came from."""

    rtol: float
    atol: float
    source: str
    scale: float = 0.0


def _load(profile: str | os.PathLike[str] | Sequence[Override] | None) -> tuple[list[Override], str | None]:
    if profile is None:
        return [], None
    if isinstance(profile, (str, os.PathLike)):
        from parity.compare.profile import load_profile

        return load_profile(profile), str(Path(profile))
    return list(profile), "<entries>"


def resolve_tolerance(dtype: str, *, name: str | None = None, rtol: float | None = None,
                      atol: float | None = None, profile: Any = None,
                      backend: str | None = None) -> ResolvedTolerance:
    """The tolerance for a value of (lower-precision) ``dtype``; see the module docstring."""
    default = DEFAULTS.get(dtype, EXACT)
    if rtol is not None or atol is not None:
        given = ", ".join(f"{k}={v:g}" for k, v in (("rtol", rtol), ("atol", atol)) if v is not None)
        rest = "" if rtol is not None and atol is not None else f"; the rest from the default for {dtype}"
        return ResolvedTolerance(default[0] if rtol is None else rtol, default[1] if atol is None else atol,
                                 f"explicit argument ({given}{rest})")
    entries, origin = _load(profile)
    backend = backend if backend is not None else os.environ.get("PARITY_BACKEND") or None
    for entry in entries:
        if entry.matches(name or "", backend=backend, dtype=dtype):
            return ResolvedTolerance(entry.rtol, entry.atol, f"profile {entry.source} for backend {backend or '-'}")
    note = f" (no entry of profile {origin} matched backend {backend or '-'}, dtype {dtype})" if origin else ""
    return ResolvedTolerance(default[0], default[1], f"default for {dtype}{note}", scale=SCALE.get(dtype, 0.0))


def _dtype_name(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    return "float64"


def _to_numpy(value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        if tensor.is_complex():
            raise TypeError("complex tensors are not supported")
        return tensor.numpy().astype(np.float64)
    return np.asarray(value, dtype=np.float64)


def _is_leaf(value: Any) -> bool:
    return isinstance(value, (int, float, bool, np.ndarray, np.generic)) or type(value).__module__.startswith("torch")


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _fail(path: str, reason: str, **details: Any) -> ParityAssertionError:
    return ParityAssertionError(f"{reason} (at {path})", {"path": path, **details})


def _rel(reference: np.ndarray, other: np.ndarray) -> float:
    norm = float(np.linalg.norm(reference))
    dist = float(np.linalg.norm(other - reference))
    return dist / norm if norm > 0 else (0.0 if dist == 0 else math.inf)


def _twin_check(a: np.ndarray, e: np.ndarray, twin: Any, dtype: str, twin_m: float,
                path: str) -> tuple[bool, str]:
    """(within precision noise, evidence sentence) for ``actual`` against its ``twin``."""
    w = _to_numpy(twin)
    if w.shape != e.shape:
        raise _fail(path, f"twin shape {list(w.shape)} differs from expected {list(e.shape)}")
    low = lower_precision(dtype, _dtype_name(twin))
    if not (np.isfinite(a).all() and np.isfinite(w).all() and np.isfinite(e).all()):
        return False, "Twin rule: not applied (NaN/Inf present)"
    noise, distance, eps = _rel(e, w), _rel(w, a), twin_eps(low)
    evidence = TwinEvidence(distance=distance, noise=noise, bound=twin_m * noise + eps, m=twin_m, eps=eps,
                            target_error=_rel(e, a), twin_error=noise, low_dtype=low)
    grade, reason = grade_with_twin(evidence, within_tolerance=False, identical=False, earlier_all_equal=False)
    return grade == "noise", f"Twin rule: {reason}"


def _compare_leaf(actual: Any, expected: Any, path: str, label: str, *, rtol: float | None, atol: float | None,
                  profile: Any, backend: str | None, name: str | None, rule: str, equal_nan: bool,
                  twin: Any = None, twin_m: float = DEFAULT_M) -> None:
    __tracebackhide__ = True  # pytest shows the failure message, not parity's frames
    a, e = _to_numpy(actual), _to_numpy(expected)
    if a.shape != e.shape:
        raise _fail(path, f"{label}: shapes differ: actual {list(a.shape)} vs expected {list(e.shape)}")
    dtype = lower_precision(_dtype_name(actual), _dtype_name(expected))
    tol = resolve_tolerance(dtype, name=name, rtol=rtol, atol=atol, profile=profile, backend=backend)
    diff = np.abs(a - e)
    ae = np.abs(e)
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    floor = tol.atol
    if tol.scale > 0 and e.size:
        finite_e = e[np.isfinite(e)]
        floor = max(tol.atol, tol.scale * float(np.sqrt(np.mean(finite_e * finite_e)))) if finite_e.size else floor
    with np.errstate(invalid="ignore"):
        allowed = np.maximum(floor, tol.rtol * ae) if rule == "max" else tol.atol + tol.rtol * ae
        bad = ~(diff <= allowed)
        bad &= ~(a == e)  # equal values pass (also equal infinities)
        if equal_nan:
            bad &= ~(nan_a & nan_e)
    mismatched = int(bad.sum())
    if mismatched == 0:
        return
    twin_line = None
    if twin is not None:
        within, twin_line = _twin_check(a, e, twin, dtype, twin_m, path)
        if within:
            return
    total = a.size
    finite = np.isfinite(diff)
    shape = a.shape

    def where(flat: int) -> str:
        idx = tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()
        return f"index {idx}" if shape else "the value"

    lines = [f"{label} are not close! ({'name: ' + name + ', ' if name else ''}path: {path})", "",
             f"Mismatched elements: {mismatched} / {total} ({100 * mismatched / total:.1f}%)"]
    details: dict[str, Any] = {"path": path, "mismatched": mismatched, "total": total,
                               "rtol": tol.rtol, "atol": tol.atol, "source": tol.source, "rule": rule}
    nonfinite = int((bad & ~finite).sum())
    if nonfinite:
        lines.append(f"Non-finite disagreements: {nonfinite} (NaN or Inf on one side only)")
    if finite.any():
        d = np.where(finite, diff, -1.0)
        i = int(np.argmax(d))
        lines.append(f"Greatest absolute difference: {_fmt(diff.flat[i])} at {where(i)} "
                     f"(actual {_fmt(a.flat[i])}, expected {_fmt(e.flat[i])}; allowed {_fmt(allowed.flat[i])})")
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(finite & (ae > 0), diff / ae, np.where(finite & (diff > 0), np.inf, 0.0))
        j = int(np.argmax(rel))
        lines.append(f"Greatest relative difference: {_fmt(rel.flat[j])} at {where(j)} "
                     f"(actual {_fmt(a.flat[j])}, expected {_fmt(e.flat[j])})")
        with np.errstate(divide="ignore", invalid="ignore"):
            excess = np.where(bad & finite, diff / allowed, 0.0)
        k = int(np.argmax(excess))
        if excess.flat[k] > 0:
            lines.append(f"Worst failing element: {where(k)} (actual {_fmt(a.flat[k])}, expected {_fmt(e.flat[k])}; "
                         f"|a - e| {_fmt(diff.flat[k])} is {_fmt(excess.flat[k])} x the allowed {_fmt(allowed.flat[k])})")
            details.update(worst_failing_index=where(k), worst_failing_excess=float(excess.flat[k]))
        over_r = finite & (diff > tol.rtol * ae) if rule == "max" else finite
        need_atol = float(np.max(diff - (0 if rule == "max" else tol.rtol * ae), where=over_r, initial=0.0))
        over_a = finite & (diff > tol.atol)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (diff if rule == "max" else diff - tol.atol) / ae
        need_rtol = float(np.max(np.where(ae > 0, ratio, np.inf), where=over_a, initial=0.0))
        if math.isfinite(need_rtol) and need_rtol > 0:
            need_rtol = float(np.nextafter(need_rtol, math.inf))
        details.update(max_abs=float(diff.flat[i]), max_abs_index=where(i), max_rel=float(rel.flat[j]),
                       needed_atol=need_atol, needed_rtol=need_rtol)
    floor_text = f", scale floor {floor:g} (rtol x rms(e))" if floor > tol.atol and rule == "max" else ""
    lines.append(f"Tolerance: rtol={tol.rtol:g}, atol={tol.atol:g}{floor_text} from {tol.source}; rule {RULES[rule]}")
    if twin_line:
        lines.append(twin_line)
    if "needed_atol" in details:
        lines.append(f"Smallest tolerance that passes: atol >= {_fmt(details['needed_atol'])} (at rtol={tol.rtol:g})"
                     f" or rtol >= {_fmt(details['needed_rtol'])} (at atol={tol.atol:g})")
    raise ParityAssertionError("\n".join(lines), details)


def _walk(actual: Any, expected: Any, path: str, twin: Any = None, **kw: Any) -> None:
    """Compare ``actual`` with ``expected`` leaf by leaf (``twin``, when given, has the structure of
    ``expected`` and is walked alongside)."""
    __tracebackhide__ = True
    if _is_leaf(expected) or _is_leaf(actual):
        if not (_is_leaf(expected) and _is_leaf(actual)):
            raise _fail(path, f"types differ: actual {type(actual).__name__} vs expected {type(expected).__name__}")
        if twin is not None and not _is_leaf(twin):
            raise _fail(path, f"types differ: twin {type(twin).__name__} vs expected {type(expected).__name__}")
        label = "Tensor-likes" if getattr(expected, "shape", ()) != () else "Scalars"
        _compare_leaf(actual, expected, path, label, twin=twin, **kw)
    elif isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            keys = sorted(map(str, set(expected) ^ set(actual))) if isinstance(actual, dict) else "-"
            raise _fail(path, f"dict keys differ (keys on one side only: {keys})")
        if twin is not None and (not isinstance(twin, dict) or set(twin) != set(expected)):
            raise _fail(path, "twin dict keys differ from expected")
        for key in expected:
            _walk(actual[key], expected[key], f"{path}[{key!r}]", None if twin is None else twin[key], **kw)
    elif isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            got = len(actual) if isinstance(actual, (list, tuple)) else type(actual).__name__
            raise _fail(path, f"sequence lengths differ: actual {got} vs expected {len(expected)}")
        if twin is not None and (not isinstance(twin, (list, tuple)) or len(twin) != len(expected)):
            raise _fail(path, f"twin sequence length differs from expected {len(expected)}")
        for index, (x, y) in enumerate(zip(actual, expected)):
            _walk(x, y, f"{path}[{index}]", None if twin is None else twin[index], **kw)
    else:
        raise _fail(path, f"unsupported type {type(expected).__name__}")


def assert_close(actual: Any, expected: Any, *, rtol: float | None = None, atol: float | None = None,
                 profile: Any = None, backend: str | None = None, name: str | None = None,
                 rule: str = "max", equal_nan: bool = False, twin: Any = None, twin_m: float = DEFAULT_M) -> None:
    """Assert that ``actual`` is close to ``expected`` (the reference); see the module docstring.

    ``twin`` (default None): the same computation at ``actual``'s precision from a trusted
    backend, same structure as ``expected``; values within precision noise of it pass.

    Raises :class:`ParityAssertionError` (an AssertionError) with a message that explains; under
    pytest the traceback stops at the caller (``__tracebackhide__``).
    """
    __tracebackhide__ = True
    if rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, not {rule!r}")
    _walk(actual, expected, "actual", twin, rtol=rtol, atol=atol, profile=profile, backend=backend, name=name,
          rule=rule, equal_nan=equal_nan, twin_m=twin_m)
