"""``parity compare``, ``parity diff`` and ``parity inspect``: dumps in, verdicts out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click

from parity.commands import CONTEXT
from parity.commands.common import (
    Progress,
    baseline_option,
    compare_and_report,
    compare_options,
    explain_dumps,
    make_policy,
    model_option,
    prepare_out,
    prompts_option,
)
from parity.errors import UsageError


@click.command("compare", context_settings=CONTEXT)
@click.argument("base_dir", type=click.Path(file_okay=False))
@click.argument("target_dir", type=click.Path(file_okay=False))
@click.option("--oracle", "oracle_dir", type=click.Path(file_okay=False), default=None,
              help="Oracle mode: judge both runs against this float64 dump (see docs/tolerances.md).")
@click.option("--twin", "twin_dir", type=click.Path(file_okay=False), default=None,
              help="Precision-aware mode: a dump of the baseline's settings at the target's precision "
                   "(float32 when both sides are 16-bit); taps are graded pass / within precision noise / "
                   "anomalous / fail against it (see docs/tolerances.md).")
@click.option("--distributed", is_flag=True,
              help="Run under torchrun: the ranks share the pairs and gather one report (rank 0 prints it).")
@click.option("--salvage", is_flag=True,
              help="Read damaged dumps as far as they go: invalid manifest lines are skipped and noted, a pair "
                   "whose data is corrupted is reported as 'corrupt' (it fails the run) instead of stopping.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(file_okay=False), default=None,
              help="Folder with a tokenizer.json to show token text beside positions "
                   "(default: the model folder recorded in BASE_DIR, when it has one).")
@click.option("--map", "map_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Name mapping file for whole module trees (msProbe layer mapping YAML, or TARGET_PREFIX: "
                   "BASELINE_PREFIX pairs; JSON or YAML), applied to target names before --rename "
                   "(see docs/importing.md).")
@compare_options
def compare_cmd(base_dir: str, target_dir: str, tokenizer_dir: str | None = None, map_file: str | None = None,
                **options: Any) -> int:
    """Compare two dumps: BASE_DIR is the reference, TARGET_DIR the run under test.

    Pairs records by (name, step, rank), computes metrics in float64, applies the tolerance rule
    |t - b| <= max(atol, rtol*|b|, scale*rms(b)) and reports the first divergence in execution
    order. With --twin, a tap outside the tolerance whose error is what the target's precision
    costs is graded "within precision noise" and does not fail the run.
    Multi-rank dumps (torchrun) are rebuilt into full tensors from their sharding annotations
    (--shard overrides them); --align tokens pairs tokens across different step layouts.
    Either side may be an SGLang dumper or msProbe dump folder (imported in memory).
    """
    from parity.commands.tokens import decoder_for

    if map_file is not None:
        from parity.store.importers.mapping import mapping_renames

        options["rename"] = (*mapping_renames(map_file), *options["rename"])
    decode = decoder_for(tokenizer_dir, base_dir)
    with Progress() as progress:
        return compare_and_report(base_dir, target_dir, progress=progress, decode=decode, **options)


@click.command("diff", context_settings=CONTEXT)
@model_option
@baseline_option
@click.option("--target", "target_spec", default="dtype=bfloat16,attn=sdpa", show_default=True,
              metavar="SPEC", help="Backend SPEC of the run under test.")
@prompts_option
@click.option("--out", type=click.Path(file_okay=False), default="parity-out", show_default=True,
              help="Where the dumps (OUT/baseline, OUT/target) and OUT/report.json go.")
@click.option("--taps", multiple=True, metavar="PATTERN",
              help="Modules to capture (segment-aware glob or re:REGEX). Default: the decoder-LM tap set.")
@click.option("--oracle", type=click.Choice(["fp64", "float64"]), default=None,
              help="Oracle mode: also run the baseline in float64 (OUT/oracle) and judge both runs against it.")
@click.option("--twin/--no-twin", "use_twin", default=True, show_default=True,
              help="When the target runs at a lower precision (or both sides are 16-bit), also run the "
                   "baseline's settings at the other precision (OUT/twin) and grade taps against it.")
@click.option("--explain", "explain_too", is_flag=True,
              help="When the runs diverge, also find the root cause (as `parity explain`).")
@click.option("--stats-only", is_flag=True,
              help="Capture statistics only (no tensors): small dumps, a statistics-based comparison.")
@click.option("--new-tokens", type=click.IntRange(min=0), default=16, show_default=True,
              help="Greedy tokens generated per prompt on both sides (0: one forward pass of the prompt).")
@click.option("--chat/--raw", "chat", default=None,
              help="Prompts as a user turn of the tokenizer's chat template, or raw text. "
                   "Default: chat when the tokenizer has a chat template.")
@click.option("--inputs", "record_inputs", is_flag=True,
              help="Also record each tapped module's tensor arguments (NAME.input.K, NAME.kwargs.KEY): the report "
                   "then tells a module's own error from what it received (transformers runs).")
@click.option("--parameters", "record_parameters", is_flag=True,
              help="Also record a fingerprint (statistics and digests) of each tapped module's parameters: "
                   "differing weights become their own finding (transformers runs).")
@click.option("--call-sites", "record_call_sites", is_flag=True,
              help="Also record the code that called each tapped module (shown with the first divergence).")
@compare_options
def diff_cmd(model_dir: str | None, baseline_spec: str, target_spec: str, prompts: str | None, out: str,
             taps: Sequence[str], oracle: str | None, use_twin: bool, explain_too: bool, stats_only: bool,
             new_tokens: int, chat: bool | None, record_inputs: bool, record_parameters: bool,
             record_call_sites: bool, **options: Any) -> int:
    """Run a model under two backend SPECs, capture every tap, compare, report.

    Both sides generate --new-tokens greedy tokens, then both run the baseline's sequences
    teacher-forced under capture; the report adds the end-to-end token and logprob comparison.
    When the target runs at a lower precision than the baseline (or both are 16-bit), a twin
    (the baseline's settings at the other precision) is captured too and every tap is graded
    against it: precision noise alone exits 0 (--no-twin: the tolerance rule alone).

    \b
    SPEC grammar: comma-separated KEY=VALUE pairs (defaults in brackets):
      engine=hf|vllm [hf]   dtype=float32|bfloat16|float16|float64 [float32]
      attn=eager|sdpa [eager]   compile=0|1 [0]   device=cpu|cuda|cuda:N [cpu]
      quant=none|int8wo|int8dyn [none] (torchao, engine=hf)   tp=N [1] (engine=vllm)
    Examples: --target dtype=bfloat16,attn=sdpa,compile=1   --target engine=vllm,dtype=bf16,tp=2
    """
    from parity.backends.hf import read_prompts, resolve_model_dir
    from parity.backends.runner import run_sides, twin_spec
    from parity.backends.spec import parse_spec

    specs = parse_spec(baseline_spec), parse_spec(target_spec)
    model_path = resolve_model_dir(model_dir)
    prompt_list = read_prompts(prompts)
    if stats_only and (oracle or explain_too):
        raise UsageError("--stats-only cannot be combined with --oracle or --explain (they need tensors)")
    if explain_too and "vllm" in (specs[0].engine, specs[1].engine):
        raise UsageError("--explain replays transformers modules: both sides must be engine=hf")
    if "vllm" in (specs[0].engine, specs[1].engine) and taps:
        raise UsageError("--taps does not apply when a side runs vLLM: both sides use the canonical taps")
    if "vllm" in (specs[0].engine, specs[1].engine) and (record_inputs or record_parameters or record_call_sites):
        raise UsageError("--inputs, --parameters and --call-sites record transformers modules under their own names; "
                         "runs against vLLM record the canonical taps only")
    out_path = Path(out)
    base_dir, target_dir, oracle_dir, twin_dir = prepare_out(out_path)
    twin = twin_spec(*specs) if use_twin and not oracle and not stats_only else None
    with Progress() as progress:
        run = run_sides(model_path, specs[0], specs[1], prompt_list, base_dir=base_dir, target_dir=target_dir,
                        oracle_dir=oracle_dir if oracle else None, new_tokens=new_tokens,
                        taps=list(taps) or None, mode="stats" if stats_only else "full", task=progress.task,
                        twin=twin, twin_dir=twin_dir, chat=chat,
                        extras={k: True for k, on in (("inputs", record_inputs), ("parameters", record_parameters),
                                                      ("call_sites", record_call_sites)) if on})
        tokenizer = run.tokenizer
        generations = ((run.baseline_generations, run.target_generations)
                       if run.baseline_generations is not None else None)
        code = compare_and_report(base_dir, target_dir, progress=progress,
                                   extra_json=str(out_path / "report.json"),
                                   decode=tokenizer.decode, generations=generations,
                                   oracle_dir=oracle_dir if oracle else None,
                                   twin_dir=twin_dir if twin is not None else None, **options)
    if explain_too and code == 1:
        click.echo("")
        with Progress() as progress:
            explain_dumps(base_dir, target_dir, json_path=str(out_path / "explain.json"), progress=progress,
                           policy=make_policy(options["rtol"], options["atol"], options["tol"], options["profile"],
                                          options["backend"]))
    return code


@click.command("inspect", context_settings=CONTEXT)
@click.argument("dump_dir", type=click.Path(file_okay=False))
@click.option("--name", "pattern", default=None, metavar="PATTERN", help="Only records matching PATTERN.")
@click.option("--step", type=int, default=None, help="Only records of this step.")
@click.option("--verify", is_flag=True,
              help="Also read every stored tensor and check it against its checksum (reads the whole dump).")
@click.option("--salvage", is_flag=True,
              help="List what is valid and what is not instead of stopping at the first problem (exit 1 if any).")
def inspect_cmd(dump_dir: str, pattern: str | None, step: int | None, verify: bool, salvage: bool) -> int:
    """List what a dump holds: header, steps, and per record its shape, dtype and statistics.

    Every data file's header is validated against the manifest first (cheap); --verify also
    reads every tensor and checks its checksum. A problem exits 2 naming the file and record;
    with --salvage every problem is listed after the valid records and the exit code is 1."""
    from parity.report.inspect_view import render_inspect
    from parity.report.terminal import make_console
    from parity.store.reader import load_run
    from parity.store.verify import check_data

    run = load_run(dump_dir, salvage=salvage)
    with Progress() as progress:
        checked = check_data(run, read=verify, salvage=salvage,
                             progress=progress.task("verifying" if verify else "checking headers"))
    console = make_console()
    render_inspect(run, console, pattern=pattern, step=step)
    console.print(checked.summary())
    problems = [*run.salvaged, *checked.problems]
    for problem in problems:
        console.print(f"invalid: {problem}", style="red")
    return 1 if problems else 0
