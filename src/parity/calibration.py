"""``parity calibrate``: measure the noise floor and write a tolerance profile from it.

Instead of guessing tolerances, run the model and look at how much its taps move under changes
that must not matter:

- the **baseline against itself** under harmless perturbations — :data:`PERTURBATIONS`:
  ``threads`` (1 intra-op thread instead of the current count, or 2 if it is 1), ``batch``
  (the prompt duplicated into a batch of 2, row 0 kept), ``padding`` (3 right-padding tokens
  masked out, the real positions kept), ``attn`` (the other attention kernel, eager ↔ sdpa).
  These errors are the **noise floor**. (Forward passes are teacher-forced: there is no
  sampling, hence no sampling seed to vary.)
- the **target against the baseline**, unperturbed and under the same perturbations: the
  error a correct target shows.

Observations are per (run, prompt, tap): the smallest ``atol`` that passes the pair at the
profile's ``rtol`` (default: the default rtol of the pair's lower-precision dtype, see
:data:`parity.compare.tolerance.DEFAULTS`). Per tap kind (``model.layers.{i}.mlp`` — all
layers together) the calibrated ``atol`` is::

    atol = margin × quantile(target observations, q)

with ``q`` = :data:`DEFAULT_QUANTILE` (0.99, numpy's ``method="higher"``: an observed value)
and ``margin`` = :data:`DEFAULT_MARGIN` (2.0). The profile entry keeps the rtol, names the
pattern (``model.layers.*.mlp``), the dtype and the backend (if given), and records what was
measured. A tap kind whose target error quantile exceeds ``margin`` × its noise-floor
quantile is reported as **outside the noise floor**: the target is measurably worse there than
the harmless perturbations of the baseline.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from parity.capturing.taps import tap_kind
from parity.compare.metrics import pair_metrics
from parity.compare.tolerance import DEFAULTS, EXACT, lower_precision
from parity.errors import UsageError

PERTURBATIONS = ("threads", "batch", "padding", "attn")
DEFAULT_QUANTILE = 0.99
DEFAULT_MARGIN = 2.0
PAD_TOKENS = 3


@dataclass
class TapCalibration:
    """Observations and the calibrated tolerance of one tap kind."""

    kind: str
    dtype: str
    rtol: float
    noise: list[float] = field(default_factory=list)
    target: list[float] = field(default_factory=list)
    atol: float = 0.0
    noise_q: float = 0.0
    target_q: float = 0.0

    @property
    def pattern(self) -> str:
        """The profile pattern: the tap kind with its layer index as ``*``."""
        return self.kind.replace("{i}", "*")

    @property
    def within_noise(self) -> bool:
        """Whether the target's error quantile is within margin × the noise-floor quantile."""
        return self.target_q <= self.margin_used * self.noise_q

    margin_used: float = DEFAULT_MARGIN

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (not the raw observations)."""
        return {"kind": self.kind, "pattern": self.pattern, "dtype": self.dtype, "rtol": self.rtol,
                "atol": self.atol, "noise_quantile": self.noise_q, "target_quantile": self.target_q,
                "noise_max": max(self.noise, default=0.0), "target_max": max(self.target, default=0.0),
                "observations": {"noise": len(self.noise), "target": len(self.target)},
                "within_noise_floor": self.within_noise}


@dataclass
class Calibration:
    """The result of a calibration: per tap kind, with the settings that produced it."""

    taps: list[TapCalibration]
    baseline: str
    target: str
    model: str
    quantile: float
    margin: float
    perturbations: tuple[str, ...]
    prompts: int
    created: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"baseline": self.baseline, "target": self.target, "model": self.model,
                "quantile": self.quantile, "margin": self.margin, "perturbations": list(self.perturbations),
                "prompts": self.prompts, "created": self.created, "taps": [t.to_json() for t in self.taps]}

    def to_toml(self, backend: str | None) -> str:
        """The tolerance profile (see :mod:`parity.compare.profile`) as TOML text."""
        lines = ["# Tolerance profile written by `parity calibrate`.",
                 f"# baseline: {self.baseline}", f"# target:   {self.target}", f"# model:    {self.model}",
                 f"# atol = {self.margin:g} x quantile {self.quantile:g} of the target's observed smallest "
                 "passing atol at rtol; first matching entry wins.", ""]
        for tap in self.taps:
            note = (f"calibrated {self.created}: {self.margin:g} x q{self.quantile:g} of {len(tap.target)} "
                    f"observations of {self.target} vs {self.baseline} on {self.model}")
            lines += ["[[tolerance]]", f"pattern = {json.dumps(tap.pattern)}", f"dtype = {json.dumps(tap.dtype)}"]
            if backend:
                lines.append(f"backend = {json.dumps(backend)}")
            lines += [f"rtol = {tap.rtol!r}", f"atol = {tap.atol!r}", f"note = {json.dumps(note)}",
                      "measured = { " + ", ".join([
                          f"noise_floor = {tap.noise_q!r}", f"target_quantile = {tap.target_q!r}",
                          f"target_max = {max(tap.target, default=0.0)!r}",
                          f"observations = {len(tap.target)}",
                          f"within_noise_floor = {'true' if tap.within_noise else 'false'}"]) + " }", ""]
        return "\n".join(lines)


def _perturbed(loaded: Any, ids: Any, perturbation: str, taps: Sequence[str] | None) -> dict[str, np.ndarray]:
    import torch

    from parity.capturing.memory import collect_outputs

    model = loaded.model
    seq = ids.shape[1]
    if perturbation == "none":
        return collect_outputs(model, taps=taps, input_ids=ids, use_cache=False)
    if perturbation == "threads":
        before = torch.get_num_threads()
        torch.set_num_threads(1 if before > 1 else 2)
        try:
            return collect_outputs(model, taps=taps, input_ids=ids, use_cache=False)
        finally:
            torch.set_num_threads(before)
    if perturbation == "batch":
        return collect_outputs(model, taps=taps, keep_rows=1, input_ids=ids.repeat(2, 1), use_cache=False)
    if perturbation == "padding":
        pad_id = getattr(loaded.tokenizer, "pad_token_id", None) or 0
        padded = torch.cat([ids, torch.full((1, PAD_TOKENS), pad_id, dtype=ids.dtype)], dim=1)
        mask = torch.cat([torch.ones_like(ids), torch.zeros((1, PAD_TOKENS), dtype=ids.dtype)], dim=1)
        return collect_outputs(model, taps=taps, keep_tokens=seq, input_ids=padded, attention_mask=mask,
                               use_cache=False)
    if perturbation == "attn":
        current = loaded.spec.attn
        model.set_attn_implementation("sdpa" if current == "eager" else "eager")
        try:
            return collect_outputs(model, taps=taps, input_ids=ids, use_cache=False)
        finally:
            model.set_attn_implementation(current)
    raise UsageError(f"unknown perturbation {perturbation!r}; valid: {', '.join(PERTURBATIONS)}")


def _needed_atol(reference: np.ndarray, observed: np.ndarray, rtol: float) -> float:
    if reference.shape != observed.shape:
        raise UsageError(f"a perturbed run changed a tap's shape ({list(reference.shape)} vs "
                         f"{list(observed.shape)}); this model cannot be calibrated with that perturbation")
    return pair_metrics(reference, "float64", observed, "float64", rtol=rtol, atol=0.0).needed_atol


def calibrate(baseline: Any, target: Any, prompts: Sequence[str], *, quantile: float = DEFAULT_QUANTILE,
              margin: float = DEFAULT_MARGIN, rtol: float | None = None,
              perturbations: Sequence[str] = PERTURBATIONS, taps: Sequence[str] | None = None,
              progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Calibrate ``target`` against ``baseline`` (both :class:`parity.backends.hf.LoadedModel`)."""
    if not 0 < quantile <= 1:
        raise UsageError(f"--quantile must be in (0, 1], got {quantile}")
    if not margin >= 1:
        raise UsageError(f"--margin must be >= 1, got {margin}")
    for p in perturbations:
        if p not in PERTURBATIONS:
            raise UsageError(f"unknown perturbation {p!r}; valid: {', '.join(PERTURBATIONS)}")
    dtype = lower_precision(baseline.spec.dtype, target.spec.dtype)
    base_rtol = DEFAULTS.get(dtype, EXACT)[0] if rtol is None else rtol
    kinds: dict[str, TapCalibration] = {}
    total = len(prompts) * (1 + 2 * len(perturbations))
    done = 0
    for prompt in prompts:
        ids = baseline.tokenizer(prompt, return_tensors="pt").input_ids
        reference = _perturbed(baseline, ids, "none", taps)
        runs = [("noise", baseline, p) for p in perturbations]
        runs += [("target", target, "none")] + [("target", target, p) for p in perturbations]
        for role, loaded, perturbation in runs:
            observed = _perturbed(loaded, ids, perturbation, taps)
            missing = set(reference) ^ set(observed)
            if missing:
                raise UsageError(f"taps differ between runs ({sorted(missing)[:3]}…); "
                                 "calibration needs the same taps on both sides")
            for name, ref in reference.items():
                kind = tap_kind(name)
                cal = kinds.setdefault(kind, TapCalibration(kind=kind, dtype=dtype, rtol=base_rtol,
                                                            margin_used=margin))
                getattr(cal, role).append(_needed_atol(ref, observed[name], base_rtol))
            done += 1
            if progress is not None:
                progress(done, total)
        done += 1
    for cal in kinds.values():
        cal.noise_q = float(np.quantile(cal.noise, quantile, method="higher")) if cal.noise else 0.0
        cal.target_q = float(np.quantile(cal.target, quantile, method="higher"))
        cal.atol = margin * cal.target_q
    return Calibration(taps=list(kinds.values()), baseline=str(baseline.spec), target=str(target.spec),
                       model=str(baseline.path), quantile=quantile, margin=margin,
                       perturbations=tuple(perturbations), prompts=len(prompts),
                       created=_dt.date.today().isoformat())


def render_calibration(cal: Calibration, console: Any) -> None:
    """Print the per-tap noise floor, target error and calibrated tolerance."""
    from rich import box
    from rich.table import Table

    from parity.report.terminal import g, g_up

    console.print(f"baseline: {cal.baseline}")
    console.print(f"target:   {cal.target}")
    console.print(f"perturbations: {', '.join(cal.perturbations)}; {cal.prompts} prompts; "
                  f"atol = {cal.margin:g} x q{cal.quantile:g} of the target's smallest passing atol")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True,
                  title="noise floor and target error per tap (smallest passing atol)", title_justify="left")
    for col in ("tap", "noise floor", "target", "target max", "rtol", "atol", "within floor"):
        table.add_column(col, justify="left" if col == "tap" else "right", overflow="fold",
                         no_wrap=col != "tap")
    for tap in cal.taps:
        table.add_row(tap.pattern, g(tap.noise_q), g(tap.target_q), g(max(tap.target, default=0.0)),
                      g(tap.rtol), g_up(tap.atol), "yes" if tap.within_noise else "NO")
    console.print(table)
    outside = [t.pattern for t in cal.taps if not t.within_noise]
    if outside:
        console.print(f"outside the noise floor ({len(outside)}): {', '.join(outside)}")
    else:
        console.print("every tap's target error is within the noise floor")
