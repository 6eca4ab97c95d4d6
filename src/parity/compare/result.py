"""Results of a comparison: one :class:`Outcome` per pair and the :class:`Report` around them.

Outcome kinds (``Outcome.kind``; the grades and the twin rule are defined in
:mod:`parity.compare.verdict`):

- ``identical``: bitwise equal.
- ``pass``: every element within tolerance.
- ``noise``: within precision noise (twin rule): outside the tolerance, explained by precision.
- ``anomalous``: departs from the twin more than precision explains (within tolerance or not).
- ``fail``: some element outside tolerance (and, with a twin, not explained by precision).
- ``shape_mismatch``: shapes differ even after squeezing size-1 dims (both shapes given).
- ``missing_in_target`` / ``missing_in_baseline``: the record exists on one side only.
- ``nonfinite``: NaN/Inf on one side where the other has a different value.
- ``degenerate``: one side all-zero or constant where the other is not, and outside tolerance.

``allowed`` is true when an ``--allow-missing`` / ``--allow-failed`` pattern excused a non-pass
outcome: it is still reported, but does not fail the verdict. ``notes`` say what was done to
compare (dtype upcast, size-1 dims squeezed, …).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parity.compare.metrics import PairMetrics
from parity.compare.tolerance import Tolerance
from parity.compare.verdict import OK_GRADES, OUTCOMES, TwinEvidence
from parity.jsonsafe import json_float, json_safe

__all__ = ["OUTCOMES", "SCHEMA_VERSION", "LayerError", "Outcome", "Report", "Side"]

#: JSON report schema version (bumped on incompatible changes).
SCHEMA_VERSION = 2


@dataclass
class Side:
    """Shape and dtype of one side of a pair."""

    shape: list[int]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"shape": self.shape, "dtype": self.dtype}


@dataclass
class Outcome:
    """The verdict on one pair, with its metrics and the tolerance that applied."""

    name: str
    step: int
    rank: int
    layer: int | None
    kind: str
    reason: str
    baseline: Side | None
    target: Side | None
    metrics: PairMetrics | None = None
    tolerance: Tolerance | None = None
    allowed: bool = False
    notes: list[str] = field(default_factory=list)
    #: oracle mode only: baseline_error, target_error, bound, m, eps (see compare/oracle.py)
    oracle: dict[str, float] | None = None
    #: statistics-only dumps: the outcome rests on stored statistics (compare/stats_check.py)
    statistics_based: bool = False
    stats: dict[str, Any] | None = None
    stats_rel_l2: float | None = None
    #: precision-aware mode: what the twin rule measured (compare/verdict.py)
    twin: TwinEvidence | None = None
    #: failing pairs: the element that fails by the largest factor (metrics.worst_failing_element)
    worst_failing: dict[str, Any] | None = None
    #: the first divergence: percentiles of the error and the error after downcast (metrics.error_distribution)
    distribution: dict[str, Any] | None = None
    #: MoE router taps: top-k expert-set agreement (compare/routing.py)
    routing: dict[str, Any] | None = None
    #: what the pair's records are: None for a module output, ``"input"`` (a module's argument)
    #: or ``"parameter"`` (a parameter fingerprint), from the capture's opt-in records
    role: str | None = None
    #: where the module was called from (capture with call sites): innermost frame first
    call_site: list[str] | None = None

    @property
    def ok(self) -> bool:
        """Identical, passed, within precision noise, or excused by an allow pattern."""
        return self.kind in OK_GRADES or self.allowed

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (schema in docs/json-schema.md)."""
        return {
            "name": self.name, "step": self.step, "rank": self.rank, "layer": self.layer,
            "outcome": self.kind, "allowed": self.allowed, "reason": self.reason,
            "baseline": self.baseline.to_json() if self.baseline else None,
            "target": self.target.to_json() if self.target else None,
            "metrics": self.metrics.to_json() if self.metrics else None,
            "tolerance": self.tolerance.to_json() if self.tolerance else None,
            "needed": ({"rtol": json_float(self.metrics.needed_rtol), "atol": json_float(self.metrics.needed_atol)}
                       if self.metrics and self.kind in ("fail", "degenerate", "noise") and self.oracle is None
                       else None),
            "worst_failing": json_safe(self.worst_failing) if self.worst_failing else None,
            "distribution": json_safe(self.distribution) if self.distribution else None,
            "routing": self.routing,
            **({"role": self.role} if self.role else {}),
            **({"call_site": self.call_site} if self.call_site else {}),
            **({"twin": self.twin.to_json()} if self.twin is not None else {}),
            "notes": self.notes,
            **({"oracle": self.oracle} if self.oracle is not None else {}),
            **({"statistics_based": True, "stats": json_safe(self.stats),
                "stats_rel_l2": json_float(self.stats_rel_l2) if self.stats_rel_l2 is not None else None}
               if self.statistics_based else {}),
        }


@dataclass
class LayerError:
    """Worst error of one layer index over its taps and steps (the depth profile)."""

    layer: int
    rel_l2: float
    max_abs: float
    cosine: float
    worst_name: str
    growth: float | None
    by_kind: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"layer": self.layer, "rel_l2": json_float(self.rel_l2), "max_abs": json_float(self.max_abs),
                "cosine": json_float(self.cosine), "worst_name": self.worst_name,
                "growth": json_float(self.growth) if self.growth is not None else None,
                "by_kind": {k: json_float(v) for k, v in self.by_kind.items()}}


@dataclass
class Report:
    """All outcomes in execution order, first divergence, depth profile, run descriptions."""

    baseline: dict[str, Any]
    target: dict[str, Any]
    tolerance: dict[str, Any]
    outcomes: list[Outcome]
    layers: list[LayerError]
    notes: list[str] = field(default_factory=list)
    #: error per token position of the first divergence (see ``engine.position_errors``)
    first_positions: dict[str, Any] | None = None
    #: oracle mode only: description of the float64 oracle run
    oracle: dict[str, Any] | None = None
    #: generations and next-token distributions compared (compare/e2e.py), when the run had them
    end_to_end: dict[str, Any] | None = None
    #: precision-aware mode: description of the twin run (compare/verdict.py)
    twin: dict[str, Any] | None = None
    #: one line that answers the question of the run (verdict.headline)
    headline: str = ""
    #: whom the first divergence blames, from recorded inputs and parameters (compare/attribution.py)
    attribution: dict[str, Any] | None = None
    #: steps whose input token ids differ (compared anyway: allow_incomparable), see
    #: compare/comparable.input_differences
    input_differences: list[dict[str, Any]] | None = None

    @property
    def first_divergence(self) -> Outcome | None:
        """The earliest outcome in execution order that is neither pass nor allowed."""
        return next((o for o in self.outcomes if not o.ok), None)

    @property
    def statistics_based(self) -> bool:
        """True when some outcome rests on statistics only (statistics-only capture)."""
        return any(o.statistics_based for o in self.outcomes)

    @property
    def verdict(self) -> str:
        """``pass`` when every outcome is identical, passed, within precision noise or allowed, else ``fail``."""
        return "pass" if self.first_divergence is None else "fail"

    def counts(self) -> dict[str, int]:
        """Number of outcomes per kind (every kind listed), plus ``allowed``."""
        counts = {kind: 0 for kind in OUTCOMES}
        for outcome in self.outcomes:
            counts[outcome.kind] += 1
        counts["allowed"] = sum(1 for o in self.outcomes if o.allowed)
        return counts

    def to_json(self) -> dict[str, Any]:
        """The full report as JSON-ready data (schema in docs/json-schema.md)."""
        first = self.first_divergence
        counts = self.counts()
        return {
            "schema_version": SCHEMA_VERSION,
            "summary": {
                "verdict": self.verdict, "headline": self.headline, "pairs": len(self.outcomes),
                "passed": counts["pass"] + counts["identical"], "noise": counts["noise"],
                "failed": sum(1 for o in self.outcomes if not o.ok),
                "allowed": counts["allowed"],
                "outcomes": {k: counts[k] for k in OUTCOMES},
                "statistics_based": self.statistics_based,
            },
            "first_divergence": ({**first.to_json(), "positions": self.first_positions,
                                  **({"attribution": json_safe(self.attribution)} if self.attribution else {})}
                                 if first else None),
            "baseline": self.baseline, "target": self.target,
            **({"oracle": self.oracle} if self.oracle is not None else {}),
            **({"twin": self.twin} if self.twin is not None else {}),
            "tolerance": self.tolerance,
            "layers": [layer.to_json() for layer in self.layers],
            **({"end_to_end": self.end_to_end} if self.end_to_end is not None else {}),
            **({"input_differences": json_safe(self.input_differences)} if self.input_differences else {}),
            "notes": self.notes,
            "pairs": [o.to_json() for o in self.outcomes],
        }
