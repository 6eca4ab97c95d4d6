"""Shared by the command modules: option sets, tolerance policy, progress bar, compare + report.

Imports only click at module level (``parity --help`` stays light); everything heavy is
imported inside the functions.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from parity.commands.progress import Progress
from parity.errors import ParityError, UsageError

#: ``--model DIR`` of the commands that run a causal LM (default: the built-in tiny Llama).
model_option = click.option("--model", "model_dir", type=click.Path(), default=None,
                            help="Local Hugging Face causal-LM folder. Default: the built-in tiny Llama.")
#: ``--baseline SPEC`` (default fp32 eager).
baseline_option = click.option("--baseline", "baseline_spec", default="dtype=float32,attn=eager", show_default=True,
                               metavar="SPEC", help="Backend SPEC of the reference run.")
#: ``--prompts FILE`` (default: the built-in prompt set).
prompts_option = click.option("--prompts", type=click.Path(dir_okay=False), default=None,
                              help="Text file, one prompt per line. Default: the built-in prompt set.")


def compare_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                     help="Write the full report as JSON to this file (schema: docs/json-schema.md)."),
        click.option("--rename", multiple=True, metavar="REGEX=TEMPLATE",
                     help="Rename target records before pairing (re.sub syntax). Repeatable, applied in order."),
        click.option("--allow-missing", multiple=True, metavar="PATTERN",
                     help="Records matching PATTERN may be missing on one side without failing. Repeatable."),
        click.option("--allow-failed", multiple=True, metavar="PATTERN",
                     help="Known-noisy taps: non-pass outcomes are reported but do not fail. Repeatable."),
        click.option("--shard", "shards", multiple=True, metavar="PATTERN=SPEC",
                     help="Multi-rank runs: how the ranks' records of matching taps rebuild the full tensor "
                          "(split:DIM, sum or replicated); overrides the capture's annotation. Repeatable."),
        click.option("--align", type=click.Choice(["steps", "tokens"]), default="steps", show_default=True,
                     help="steps: pair records step by step. tokens: pair tokens across steps and layouts "
                          "(padded/packed/chunked, padding dropped) by token ids, positions, sequence lengths "
                          "and request ids; tokens of one side only are reported."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Evaluate the pairs in N processes (each reads its share of the dumps)."),
        click.option("--allow-incomparable", is_flag=True,
                     help="Compare runs of different models or different inputs anyway (refused by default: "
                          "exit 2 naming the first difference)."),
        click.option("--rtol", type=float, default=None, help="Relative tolerance for every pair without a --tol match."),
        click.option("--atol", type=float, default=None, help="Absolute floor for every pair without a --tol match."),
        click.option("--tol", multiple=True, metavar="PATTERN:rtol=R,atol=A",
                     help="Tolerance for pairs whose name matches PATTERN. Repeatable; first match wins."),
        click.option("--profile", type=click.Path(dir_okay=False), default=None,
                     help="Tolerance profile: TOML [[tolerance]] entries (or pyproject.toml [tool.parity]) "
                          "with pattern, backend, dtype, rtol, atol, note. See docs/tolerances.md."),
        click.option("--backend", default=None, metavar="NAME",
                     help="Backend name that selects profile entries (e.g. rocm-mi300, cpu-avx512)."),
        click.option("--oracle-m", type=float, default=2.0, show_default=True,
                     help="Oracle mode: the target may be M times as far from the oracle as the baseline."),
        click.option("--oracle-eps", type=float, default=None,
                     help="Oracle mode: additive slack (default: unit roundoff of the target dtype)."),
        click.option("--twin-m", type=float, default=3.0, show_default=True,
                     help="Precision-aware mode: the target may sit M times the twin's precision noise "
                          "from the run of its own precision (see docs/tolerances.md)."),
        click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
                     help="Write a self-contained HTML report (plots, sortable table; works offline)."),
        click.option("--junit", "junit_path", type=click.Path(dir_okay=False), default=None,
                     help="Write JUnit XML: one test case per pair."),
        click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
                     help="Write a short Markdown summary for a pull-request comment."),
        click.option("--show", type=click.IntRange(min=0), default=12, show_default=True,
                     help="Rows of the worst-pairs table."),
        click.option("--all", "show_all", is_flag=True, help="List every pair, passing ones included."),
        click.option("--distributions", is_flag=True,
                     help="Error percentiles and the diff after downcast for every pair in the JSON report "
                          "(one extra pass per pair; default: the first divergence only)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def make_policy(rtol: float | None, atol: float | None, tol: Sequence[str], profile: str | None,
                backend: str | None):
    """The tolerance policy of the command-line options (TolerancePolicy.from_options)."""
    from parity.compare.tolerance import TolerancePolicy

    return TolerancePolicy.from_options(rtol=rtol, atol=atol, tol=tol, profile=profile, backend=backend)


def compare_and_report(base: Any, target: Any, *, json_path: str | None, rename: Sequence[str],
                        allow_missing: Sequence[str], allow_failed: Sequence[str], rtol: float | None,
                        atol: float | None, tol: Sequence[str], profile: str | None,
                        backend: str | None, show: int,
                        show_all: bool, progress: Progress, extra_json: str | None = None,
                        oracle_dir: Any = None,
                        oracle_m: float = 2.0, oracle_eps: float | None = None,
                        generations: tuple[list, list] | None = None,
                        decode: Callable[[list[int]], str] | None = None, html_path: str | None = None,
                        junit_path: str | None = None, markdown_path: str | None = None,
                        shards: Sequence[str] = (), align: str = "steps", workers: int = 1,
                        distributed: bool = False, twin_dir: Any = None, twin_m: float = 3.0,
                        allow_incomparable: bool = False, salvage: bool = False,
                        distributions: bool = False) -> int:
    """Compare two dumps (or judge them against an oracle dump), attach the end-to-end section when
    ``generations`` are given, write the requested files and print the report; returns the exit
    code (0 pass, 1 divergence). Options are those of :func:`compare_options`; ``decode`` turns
    token ids into text (default None: no token labels). ``distributed``: this process is one rank
    of a torchrun launch sharing the pairs; only rank 0 writes files and prints. ``twin_dir``
    (default None): the twin dump of precision-aware mode, graded with factor ``twin_m``."""
    from parity.compare.engine import compare
    from parity.compare.pairing import parse_rename
    from parity.report.json_report import write_json
    from parity.report.terminal import make_console, render

    renames = [parse_rename(r) for r in rename]
    rank0 = not distributed or int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK
    if oracle_dir is not None:
        from parity.compare.oracle import compare_with_oracle

        if shards or align != "steps" or workers > 1 or distributed:
            raise UsageError("--shard, --align tokens, --workers and --distributed do not apply to oracle mode (single-rank dumps only)")
        if twin_dir is not None:
            raise UsageError("--oracle and --twin are two different judgements: give one")
        if tol or profile or rtol is not None or atol is not None:
            raise UsageError("oracle mode judges by --oracle-m/--oracle-eps; "
                             "--tol, --profile, --rtol and --atol do not apply to it")
        if not oracle_m >= 1 or (oracle_eps is not None and not oracle_eps >= 0):
            raise UsageError("--oracle-m must be >= 1 and --oracle-eps >= 0")
        report = compare_with_oracle(oracle_dir, base, target, m=oracle_m, eps=oracle_eps, renames=renames,
                                     allow_missing=allow_missing, allow_failed=allow_failed,
                                     progress=progress.task("comparing against the oracle"))
    else:
        policy = make_policy(rtol, atol, tol, profile, backend)
        try:
            report = compare(base, target, policy=policy, renames=renames, allow_missing=allow_missing,
                             allow_failed=allow_failed, progress=None if distributed else progress.task("comparing"),
                             shards=shards, align=align, workers=workers, distributed=distributed,
                             twin=twin_dir, twin_m=twin_m, allow_incomparable=allow_incomparable,
                             salvage=salvage, distributions=distributions, decode=(lambda token: decode([token])) if decode is not None else None)
        except ParityError:
            if distributed and not rank0:  # every rank raised the same error: rank 0 reports it
                sys.exit(2)
            raise
        finally:
            if distributed:
                from parity.compare.parallel import finish_distributed

                finish_distributed()
    if generations is not None and decode is not None:
        from parity.compare.e2e import end_to_end

        report.end_to_end = end_to_end(base, target, *generations, decode=decode, shards=shards)
    progress.__exit__(None, None, None)
    if distributed and not rank0:  # every rank holds the report; rank 0 prints it
        return 0
    for path in (json_path, extra_json):
        if path:
            write_json(report, path)
    if html_path or junit_path or markdown_path:
        from parity.commands.report_cmd import write_reports

        write_reports(report.to_json(), html=html_path, junit=junit_path, markdown=markdown_path)
    render(report, make_console(), show=show, show_all=show_all)
    return 0 if report.verdict == "pass" else 1


def prepare_out(out: Path) -> tuple[Path, Path, Path, Path]:
    """Clear ``out/baseline``, ``out/target``, ``out/oracle`` and ``out/twin``, replacing earlier
    parity dumps only."""
    dirs = (out / "baseline", out / "target", out / "oracle", out / "twin")
    for d in dirs:
        if d.exists():
            entries = {p.name for p in d.iterdir()}
            if entries and not all(n == "data" or (n.startswith("manifest-rank") and n.endswith(".jsonl"))
                                   for n in entries):
                raise UsageError(f"{d} exists and is not a parity dump; refusing to overwrite it",
                                 hint="choose another --out")
            shutil.rmtree(d)
    return dirs


def _replay_problem(run: Any) -> str | None:
    """Why ``parity explain`` cannot replay the model of ``run``, or None when it can."""
    if run.world_size > 1:
        return f"{run.path} is a {run.world_size}-rank run; explain replays single-process transformers runs"
    spec, model = run.header.spec, run.header.model
    if not model.get("path") or not {"dtype", "attn"} <= set(spec):
        return (f"{run.path} does not say which model and spec made it; explain replays dumps written by "
                "`parity diff` (or with spec/model_info)")
    if spec.get("engine", "hf") != "hf":
        return f"{run.path} was made by {spec.get('engine')}; explain replays transformers models only"
    return None


def _explain_from_records(base_dir: str | Path, target_dir: str | Path, why: str, *, policy: Any,
                          json_path: str | None, progress: Progress) -> int:
    """Explain from the dumps' recorded inputs and parameters (no replay): the comparison and
    its blame (:mod:`parity.compare.attribution`), after a line saying why there is no replay."""
    from parity.compare.engine import compare
    from parity.report.json_report import write_json
    from parity.report.terminal import make_console, render

    report = compare(base_dir, target_dir, policy=policy, progress=progress.task("comparing"))
    progress.__exit__(None, None, None)
    if json_path:
        write_json(report, json_path)
    console = make_console()
    console.print(f"explained from the recorded inputs and parameters, without replay ({why})")
    render(report, console)
    return 0 if report.verdict == "pass" else 1


def explain_dumps(base_dir: str | Path, target_dir: str | Path, *, policy: Any, json_path: str | None,
                  progress: Progress) -> int:
    """Reload the models the two dumps name and explain their divergence (see parity.explain); when
    they cannot be replayed (vLLM, several ranks, no model recorded) but hold inputs and parameter
    fingerprints, explain from those records instead (the comparison's blame)."""
    import json as _json

    from parity.backends.hf import check_model_dir, load
    from parity.backends.spec import Spec
    from parity.explain.render import render_explanation
    from parity.explain.rootcause import explain
    from parity.report.terminal import make_console
    from parity.store.reader import load_run

    runs = load_run(base_dir), load_run(target_dir)
    problems = [problem for run in runs if (problem := _replay_problem(run))]
    if problems:
        if any(record.tags.get("role") in ("input", "parameter") for run in runs for record in run.records):
            return _explain_from_records(base_dir, target_dir, problems[0], policy=policy, json_path=json_path,
                                         progress=progress)
        raise UsageError(problems[0], hint="parity compare names the first divergent tap; dumps captured with inputs "
                                           "and parameters (--inputs --parameters) are explained without replay")
    specs, paths = [], []
    for run in runs:
        spec, model = run.header.spec, run.header.model
        try:
            specs.append(Spec(**{k: spec[k] for k in ("engine", "dtype", "attn", "device", "quant") if k in spec},
                              compile=bool(spec.get("compile", 0))))
        except TypeError:
            raise UsageError(f"{run.path}: unreadable spec {spec}") from None
        paths.append(check_model_dir(model["path"]))
    steps = sorted({r.step for r in runs[0].records})
    token_ids = []
    for step in steps:
        ids = runs[0].step_tags(step).get("input_ids")
        if not (isinstance(ids, list) and len(ids) == 1 and all(isinstance(i, int) for i in ids[0])):
            raise UsageError(f"{runs[0].path} step {step} has no single-sequence input_ids to replay")
        token_ids.append(ids[0])
    update = progress.task("loading models for replay")
    base, target = load(paths[0], specs[0]), load(paths[1], specs[1])
    update(1, 1)
    from parity.explain.reproduce import check_reproduces

    for loaded, run, side in ((base, runs[0], "baseline"), (target, runs[1], "target")):
        check_reproduces(loaded, run, token_ids[0], steps[0], side)
    result = explain(base, target, token_ids, policy=policy, progress=progress.task("replaying", len(token_ids)))
    progress.__exit__(None, None, None)
    if json_path:
        try:
            Path(json_path).write_text(_json.dumps(result.to_json(), indent=1, allow_nan=False) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {json_path}: {exc.strerror}") from None
    render_explanation(result, make_console())
    return 0 if result.case == "pass" else 1
