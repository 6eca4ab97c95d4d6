"""``parity explain`` (root cause by replay) and ``parity inject`` (sensitivity by noise)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import click

from parity.commands import CONTEXT
from parity.commands.common import (
    Progress,
    explain_dumps,
    make_policy,
    model_option,
    prompts_option,
)
from parity.errors import UsageError


@click.command("explain", context_settings=CONTEXT)
@click.argument("base_dir", type=click.Path(file_okay=False))
@click.argument("target_dir", type=click.Path(file_okay=False))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the explanation as JSON.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (as in compare).")
@click.option("--atol", type=float, default=None, help="Absolute floor (as in compare).")
@click.option("--tol", multiple=True, metavar="PATTERN:rtol=R,atol=A", help="Per-pattern tolerance.")
@click.option("--profile", type=click.Path(dir_okay=False), default=None, help="Tolerance profile.")
@click.option("--backend", default=None, metavar="NAME", help="Backend name for the profile.")
def explain_cmd(base_dir: str, target_dir: str, json_path: str | None, rtol: float | None, atol: float | None,
                tol: Sequence[str], profile: str | None, backend: str | None) -> int:
    """Find the root cause of a divergence: local vs inherited error per module, then drill down.

    Reloads the model and specs recorded in the two dumps, replays each module of the target on the
    baseline's inputs of that module (prompts from the dumps' token ids), and names the module whose
    own error causes the divergence — or says that it is accumulated rounding. Exit 0 when nothing
    diverges, 1 when there is a divergence to explain.
    """
    with Progress() as progress:
        return explain_dumps(base_dir, target_dir, policy=make_policy(rtol, atol, tol, profile, backend),
                              json_path=json_path, progress=progress)


@click.command("inject", context_settings=CONTEXT)
@click.option("--tap", required=True, metavar="PATTERN",
              help="Modules whose output gets noise (glob / re:REGEX), or `kv` for every k_proj and v_proj.")
@click.option("--scale", type=float, required=True, help="Noise standard deviation (or a multiple of RMS).")
@click.option("--relative", is_flag=True, help="Scale is relative to the tensor's RMS at each call.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise generator.")
@model_option
@click.option("--spec", "spec_text", default="dtype=float32,attn=eager", show_default=True, metavar="SPEC",
              help="Backend SPEC to run under.")
@prompts_option
@click.option("--new-tokens", type=click.IntRange(min=1), default=24, show_default=True,
              help="Tokens generated greedily per prompt.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results as JSON.")
def inject_cmd(tap: str, scale: float, relative: bool, seed: int, model_dir: str | None, spec_text: str,
               prompts: str | None, new_tokens: int, json_path: str | None) -> int:
    """Add seeded Gaussian noise to one tap and measure how it propagates.

    Reports the error along depth (teacher-forced), the logits KL and top-1 agreement, and the token
    match rate of greedy generation against the clean run. Example, noise in the KV cache:
    parity inject --tap kv --scale 1e-3
    """
    import json as _json

    from parity.backends.hf import load, read_prompts, resolve_model_dir
    from parity.backends.spec import parse_spec
    from parity.explain.inject import inject, render_injection
    from parity.report.terminal import make_console

    spec = parse_spec(spec_text)
    model_path = resolve_model_dir(model_dir)
    prompt_list = read_prompts(prompts)
    with Progress() as progress:
        loaded = load(model_path, spec)
        result = inject(loaded, prompt_list, tap=tap, scale=scale, relative=relative, seed=seed,
                        new_tokens=new_tokens, progress=progress.task("injecting", len(prompt_list)))
    if json_path:
        try:
            Path(json_path).write_text(_json.dumps(result.to_json(), indent=1) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {json_path}: {exc.strerror}") from None
    render_injection(result, make_console())
    return 0
