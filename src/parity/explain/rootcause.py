"""Local vs inherited error by replay, and the root-cause verdict.

For every tapped module and every prompt, both models run once with their module inputs and
outputs recorded (:mod:`parity.explain.recorder`). Then the **target's** copy of the module is
replayed on the **baseline's** main input (hidden states; masks and rotary stay the target's
own). Per module:

- ``local``: error of the replayed output against the baseline output — the error the module
  makes on its own;
- ``inherited``: error of the target's input against the baseline's — what it receives;
- ``passed_on``: error of the target's output against the baseline's — what it hands on.

For ``compile=1`` targets each replayed module runs under its own ``torch.compile`` (compiled
once; slow the first time, like the compiled model itself). Fusions that cross module
boundaries in the compiled model are not reproduced by a per-module replay.

Errors are relative L2 (plus the full metrics and the elementwise verdict under the tolerance
policy of ``parity compare``). Per module the prompt with the largest local error is kept.

What a module's configuration should produce is measured in units of the target dtype's unit
roundoff (:data:`~parity.compare.verdict.UNIT_ROUNDOFF`): one rounding of the output costs
about one. Whether a local error is **anomalous** is judged against what the other modules do,
not against a fixed number: a module is anomalous when its local error exceeds both
:data:`FLOOR_U` (2) unit roundoffs (less is a different rounding) and :data:`OUTLIER` (4) times
the typical local error of its kind (the median over the modules of the same tap kind —
``mlp``, ``self_attn``, ``input_layernorm`` … — or over all modules when fewer than 3 share
it). A module whose local error stands out among modules whose local errors are 0 (same
configuration) or about one rounding (another dtype) is the cause. A whole kind is off when
its median local error exceeds :data:`SYSTEMIC_U` (64) unit roundoffs and :data:`OUTLIER` times
the median of the other kinds' medians (a wrong rotary embedding makes every attention wrong
by the same amount: no attention stands out from the others); its modules are then anomalous.
Measured on SmolLM2-135M (30 layers, fp32 eager vs bf16 sdpa): kind medians 0.37-2.25 unit
roundoffs, the largest module 1.7x its kind's median; a 2% fault in one bf16 MLP is 5x it.

Root cause (modules that contain other tapped modules — decoder layers — are reported but not
blamed; their children are):

1. **local**: the earliest anomalous module whose local error exceeds its tolerance;
2. **accumulation**: otherwise, the earliest anomalous module (its local error is within
   tolerance: the error it adds is carried on, and fails later or is hidden by a loose
   16-bit tolerance);
3. **none**: otherwise no module is named — the divergence is accumulated rounding. A module
   whose local error exceeds the tolerance while being ordinary for its dtype is listed in the
   notes: the tolerance, not the module, is off;
4. **pass**: no module is anomalous and no output exceeds its tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from parity.capturing.taps import layer_of, model_taps, tap_kind
from parity.compare.metrics import PairMetrics, pair_metrics
from parity.compare.tolerance import Tolerance, TolerancePolicy
from parity.compare.verdict import UNIT_ROUNDOFF
from parity.explain.recorder import Recording, record_forward, replay
from parity.jsonsafe import json_float

#: A local error of at most this many unit roundoffs (relative L2) is a rounding difference.
FLOOR_U = 2.0
#: A local error more than this many times the typical one of its kind is anomalous.
OUTLIER = 4.0
#: A kind of module whose median local error exceeds this many unit roundoffs (and OUTLIER x the
#: other kinds') is off as a whole: a kernel difference costs a few roundings, not this many.
SYSTEMIC_U = 64.0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def rel_l2(b: torch.Tensor | None, t: torch.Tensor | None) -> float | None:
    """‖t−b‖/‖b‖ in float64 (None when a side is missing, not floating, or shapes differ)."""
    if b is None or t is None or b.shape != t.shape or not b.is_floating_point():
        return None
    bb, tt = b.detach().double(), t.detach().double()
    norm = float(torch.linalg.vector_norm(bb))
    diff = float(torch.linalg.vector_norm(tt - bb))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


@dataclass
class ModuleError:
    """Local, inherited and passed-on error of one module (worst prompt)."""

    name: str
    layer: int | None
    module: str
    step: int
    local: PairMetrics
    passed_on: PairMetrics
    inherited: float | None
    tolerance: Tolerance
    dtype: str
    container: bool

    @property
    def local_ok(self) -> bool:
        """Local error within its tolerance."""
        return self.local.mismatched == 0

    @property
    def passed_ok(self) -> bool:
        """Passed-on error within its tolerance."""
        return self.passed_on.mismatched == 0

    @property
    def roundoffs(self) -> float:
        """Local relative L2 error in units of the target dtype's unit roundoff."""
        return self.local.rel_l2 / UNIT_ROUNDOFF.get(self.dtype, UNIT_ROUNDOFF["float32"])

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "layer": self.layer, "module": self.module, "step": self.step,
                "dtype": self.dtype, "container": self.container,
                "local": {"rel_l2": json_float(self.local.rel_l2), "max_abs": self.local.max_abs,
                          "within_tolerance": self.local_ok, "needed_atol": self.local.needed_atol},
                "inherited": {"rel_l2": json_float(self.inherited) if self.inherited is not None else None},
                "passed_on": {"rel_l2": json_float(self.passed_on.rel_l2), "max_abs": self.passed_on.max_abs,
                              "within_tolerance": self.passed_ok},
                "roundoffs": json_float(self.roundoffs), "tolerance": self.tolerance.to_json()}


@dataclass
class Explanation:
    """Per-module errors in execution order, and the verdict."""

    modules: list[ModuleError]
    case: str
    root: ModuleError | None
    sentence: str
    baseline: str
    target: str
    drilldown: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"baseline": self.baseline, "target": self.target, "case": self.case,
                "root_cause": self.root.name if self.root else None, "sentence": self.sentence,
                "anomaly_rule": {"floor_roundoffs": FLOOR_U, "outlier_factor": OUTLIER,
                                 "systemic_roundoffs": SYSTEMIC_U},
                "modules": [m.to_json() for m in self.modules], "drilldown": self.drilldown, "notes": self.notes}


def tapped_modules(model: torch.nn.Module, taps: Sequence[str] | None = None) -> list[str]:
    """The module names the explanation covers (default: the decoder-LM tap set)."""
    return list(model_taps(model, taps))


_COMPILED: dict[int, Any] = {}


def _runner(module: torch.nn.Module, compiled: bool) -> Any:
    """The module itself, or (compile=1 targets) the module under torch.compile, compiled once."""
    if not compiled:
        return module
    if id(module) not in _COMPILED:
        _COMPILED[id(module)] = torch.compile(module)
    return _COMPILED[id(module)]


def analyse_step(baseline: Any, target: Any, ids: torch.Tensor, names: Sequence[str],
                 policy: TolerancePolicy, step: int) -> tuple[list[ModuleError], Recording, Recording]:
    """Record both models on ``ids`` and measure every module's local/inherited/passed-on error."""
    rec_b = record_forward(baseline.model, names, input_ids=ids.to(baseline.spec.device), use_cache=False)
    rec_t = record_forward(target.model, names, input_ids=ids.to(target.spec.device), use_cache=False)
    modules = dict(target.model.named_modules())
    containers = {n for n in names if any(o.startswith(n + ".") for o in names)}
    errors = []
    for name, b_io in rec_b.modules.items():
        t_io = rec_t.modules.get(name)
        b_out = b_io.out
        if t_io is None or b_out is None or t_io.out is None or b_io.input is None:
            continue
        local_out = replay(_runner(modules[name], target.spec.compile), t_io, b_io.input)
        if local_out is None or local_out.shape != b_out.shape:
            continue
        dtype_b, dtype_t = _dtype(b_out), _dtype(t_io.out)
        tol = policy.resolve(name, dtype_b, dtype_t)
        local = pair_metrics(_np(b_out), "float64", _np(local_out), "float64", rtol=tol.rtol, atol=tol.atol)
        passed = pair_metrics(_np(b_out), "float64", _np(t_io.out), "float64", rtol=tol.rtol, atol=tol.atol)
        errors.append(ModuleError(name=name, layer=layer_of(name), module=type(modules[name]).__name__,
                                  step=step, local=local, passed_on=passed,
                                  inherited=rel_l2(b_io.input, t_io.input), tolerance=tol, dtype=dtype_t,
                                  container=name in containers))
    return errors, rec_b, rec_t


def anomalous(errors: Sequence[ModuleError]) -> dict[str, str]:
    """Name -> why, for every blamable module whose local error is anomalous (see the module
    docstring): an outlier among its kind, or a member of a kind that is systemically off."""
    blamable = [e for e in errors if not e.container]
    by_kind: dict[str, list[float]] = {}
    for e in blamable:
        by_kind.setdefault(tap_kind(e.name), []).append(e.roundoffs)
    everyone = [e.roundoffs for e in blamable]
    medians = {kind: float(np.median(values)) for kind, values in by_kind.items()}
    systemic = {}
    for kind, median in medians.items():
        others = [m for k, m in medians.items() if k != kind]
        threshold = max(SYSTEMIC_U, OUTLIER * float(np.median(others)) if others else 0.0)
        if len(by_kind[kind]) >= 3 and median > threshold:
            systemic[kind] = (f"every {kind.replace('{i}', '*')} makes a local error of about {median:.3g} unit "
                              f"roundoffs (median), more than {threshold:.3g}: the cause is shared by all of "
                              f"them (their kernel, the rotary embedding or a config value they share)")
    out = {}
    for e in blamable:
        kind = tap_kind(e.name)
        peers = by_kind[kind]
        typical = float(np.median(peers if len(peers) >= 3 else everyone))
        threshold = max(FLOOR_U, OUTLIER * typical)
        if e.roundoffs > threshold:
            out[e.name] = (f"{e.roundoffs:.3g} {e.dtype} unit roundoffs, more than {threshold:.3g}: {OUTLIER:g}x "
                           f"what modules of its kind do here, and more than a rounding difference")
        elif kind in systemic and e.roundoffs > FLOOR_U:
            out[e.name] = f"{e.roundoffs:.3g} {e.dtype} unit roundoffs; {systemic[kind]}"
    return out


def verdict(errors: Sequence[ModuleError]) -> tuple[str, ModuleError | None, str, list[str]]:
    """(case, root module or None, one sentence, notes) from per-module errors in execution order."""
    blamable = [e for e in errors if not e.container]
    outliers = anomalous(errors)
    notes = [f"{e.name}: local error exceeds its tolerance ({e.tolerance.source}) but is ordinary "
             f"{e.dtype} rounding ({e.roundoffs:.3g} unit roundoffs, like the other modules): the tolerance is "
             f"tighter than the dtype" for e in blamable if not e.local_ok and e.name not in outliers]
    first = next((e for e in blamable if e.name in outliers), None)
    if first is not None:
        why = outliers[first.name]
        if not first.local_ok:
            return "local", first, (
                f"root cause: {first.name} — on the baseline's own inputs it makes a local error beyond its "
                f"tolerance (rel L2 {first.local.rel_l2:.3g} = {why}; {first.local.mismatched} elements outside "
                f"rtol={first.tolerance.rtol:g}, atol={first.tolerance.effective_atol:g} from "
                f"{first.tolerance.source})"), notes
        failing = next((e for e in errors if not e.passed_ok), None)
        later = f"; it fails first at {failing.name}" if failing is not None else "; no output exceeds the tolerance"
        return "accumulation", first, (
            f"root cause: {first.name} — its local error is within tolerance but stands out (rel L2 "
            f"{first.local.rel_l2:.3g} = {why}), and it is carried on{later}"), notes
    if all(e.passed_ok for e in errors):
        return "pass", None, "every module's output is within tolerance: there is no divergence to explain", notes
    worst = max(blamable, key=lambda e: e.roundoffs, default=None)
    failing = next(e for e in errors if not e.passed_ok)
    top = f" (largest: {worst.name}, {worst.roundoffs:.3g} x the {worst.dtype} unit roundoff)" if worst else ""
    return "none", None, (
        f"no single root cause: no module's local error stands out from what the others do{top}; "
        f"the divergence first visible at {failing.name} is accumulated rounding"), notes


def explain(baseline: Any, target: Any, token_ids: Sequence[Sequence[int]], *,
            policy: TolerancePolicy | None = None, taps: Sequence[str] | None = None,
            drill: bool = True, progress: Callable[[int, int], None] | None = None) -> Explanation:
    """Explain where target diverges from baseline (both :class:`parity.backends.hf.LoadedModel`)."""
    policy = policy or TolerancePolicy()
    names = tapped_modules(baseline.model, taps)
    worst: dict[str, ModuleError] = {}
    order: list[str] = []
    worst_step_ids: dict[int, torch.Tensor] = {}
    for step, ids_list in enumerate(token_ids):
        ids = torch.tensor([list(ids_list)], dtype=torch.long)
        worst_step_ids[step] = ids
        errors, _, _ = analyse_step(baseline, target, ids, names, policy, step)
        for e in errors:
            if e.name not in worst:
                order.append(e.name)
            if e.name not in worst or e.local.rel_l2 > worst[e.name].local.rel_l2 or (
                    e.local.rel_l2 == worst[e.name].local.rel_l2 and not e.passed_ok and worst[e.name].passed_ok):
                worst[e.name] = e
        if progress is not None:
            progress(step + 1, len(token_ids))
    modules = [worst[n] for n in order]
    case, root, sentence, notes = verdict(modules)
    result = Explanation(modules=modules, case=case, root=root, sentence=sentence,
                         baseline=str(baseline.spec), target=str(target.spec), notes=notes)
    if drill and root is not None:
        from parity.explain.drilldown import drill_down

        result.drilldown = drill_down(baseline, target, root.name, worst_step_ids[root.step], policy)
    return result
