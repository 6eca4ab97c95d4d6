"""``parity calibrate``: tolerances measured from the noise floor."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import click

from parity.commands import CONTEXT
from parity.commands.common import (
    Progress,
    baseline_option,
    model_option,
    prompts_option,
)
from parity.errors import UsageError


@click.command("calibrate", context_settings=CONTEXT)
@model_option
@baseline_option
@click.option("--target", "target_spec", default="dtype=float32,attn=sdpa", show_default=True,
              metavar="SPEC", help="Backend SPEC the profile is calibrated for.")
@prompts_option
@click.option("--backend", default=None, metavar="NAME",
              help="Backend name written into every entry (then it applies only with --backend NAME).")
@click.option("--quantile", type=float, default=0.99, show_default=True,
              help="Quantile of the observed target errors that the tolerance covers.")
@click.option("--margin", type=float, default=2.0, show_default=True,
              help="Factor applied to that quantile.")
@click.option("--rtol", type=float, default=None,
              help="rtol of every entry (default: the default rtol of the pair's lower-precision dtype).")
@click.option("--perturb", multiple=True, type=click.Choice(["threads", "batch", "padding", "attn"]),
              help="Harmless perturbations to run (repeatable). Default: all four.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="parity-profile.toml",
              show_default=True, help="Where to write the profile (TOML).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the calibration summary as JSON.")
def calibrate_cmd(model_dir: str | None, baseline_spec: str, target_spec: str, prompts: str | None,
                  backend: str | None, quantile: float, margin: float, rtol: float | None,
                  perturb: Sequence[str], out_path: str, json_path: str | None) -> int:
    """Measure the noise floor and write a tolerance profile for TARGET vs BASELINE.

    Runs the baseline against itself under harmless perturbations (thread count, batch size,
    padding, attention kernel) and the target against the baseline, unperturbed and under the same
    perturbations; per tap kind, atol = MARGIN x QUANTILE of the target's observed smallest passing
    atol. Use the result with `parity diff/compare --profile FILE [--backend NAME]`.
    """
    import json as _json

    from parity.backends.hf import load, read_prompts, resolve_model_dir
    from parity.backends.spec import parse_spec
    from parity.calibration import PERTURBATIONS, calibrate, render_calibration
    from parity.report.terminal import make_console

    specs = parse_spec(baseline_spec), parse_spec(target_spec)
    model_path = resolve_model_dir(model_dir)
    prompt_list = read_prompts(prompts)
    if rtol is not None and not rtol >= 0:
        raise UsageError(f"--rtol must be >= 0, got {rtol}")
    with Progress() as progress:
        update = progress.task("loading models")
        base, target = load(model_path, specs[0]), load(model_path, specs[1])
        update(1, 1)
        result = calibrate(base, target, prompt_list, quantile=quantile, margin=margin, rtol=rtol,
                           perturbations=tuple(perturb) or PERTURBATIONS,
                           progress=progress.task("calibrating"))
    try:
        Path(out_path).write_text(result.to_toml(backend), encoding="utf-8")
        if json_path:
            Path(json_path).write_text(_json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {exc.filename}: {exc.strerror}") from None
    console = make_console()
    render_calibration(result, console)
    console.print(f"profile written to {out_path}")
    return 0
