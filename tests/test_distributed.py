"""Multi-rank runs: the in-repo tensor-parallel Llama under torchrun (gloo, 2 ranks) against the
TP=1 transformers run; reassembly, annotations and overrides, the all-reduce fault of incident 3,
the padding token of incident 4, token alignment across layouts, --workers and torchrun compare.

Everything runs for real: torchrun processes, gloo collectives, transformers on the tiny Llama.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity.compare.engine import compare
from parity.errors import UsageError

pytestmark = pytest.mark.xdist_group("distributed")

PROMPT = "The quick brown fox"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def tp_run(out: Path, *args: str) -> Path:
    """Run the TP=2 Llama under torchrun into ``out``."""
    result = subprocess.run([*TORCHRUN, "-m", "parity.parallel.tp_llama", "--out", str(out), "--prompt", PROMPT,
                             *args], capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def cli(*args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = [*TORCHRUN, "-m", "parity.cli"] if torchrun else [sys.executable, "-m", "parity.cli"]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300,
                          env={**_env(), "COLUMNS": "160"})


@pytest.fixture(scope="module")
def hf_tp1(fp32_model, tmp_path_factory) -> Path:
    """The transformers run (TP=1) of PROMPT under canonical taps."""
    from parity.backends.hf import capture_sequences

    out = tmp_path_factory.mktemp("dist") / "hf"
    capture_sequences(fp32_model, [fp32_model.tokenizer(PROMPT).input_ids], out, canonical=True)
    return out


@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> Path:
    return tp_run(tmp_path_factory.mktemp("dist") / "tp2")


def test_tp2_run_is_one_dump_with_a_manifest_per_rank(tp2):
    headers = [json.loads((tp2 / f"manifest-rank{r}.jsonl").read_text().splitlines()[0]) for r in (0, 1)]
    assert [(h["rank"], h["world_size"]) for h in headers] == [(0, 2), (1, 2)]
    assert headers[1]["layout"] == {"tp_rank": 1, "tp_size": 2, "dp_rank": 0, "dp_size": 1}
    records = [json.loads(line) for line in (tp2 / "manifest-rank1.jsonl").read_text().splitlines()
               if '"record"' in line]
    by_name = {r["name"]: r for r in records}
    assert by_name["logits"]["shape"] == [1, 11, 256] and by_name["logits"]["tags"]["shard"] == "split:-1"
    assert by_name["layers.0.attn"]["tags"]["shard"] == "sum"


def test_tp2_matches_tp1_at_fp32_tolerance_after_reassembly(hf_tp1, tp2):
    report = compare(hf_tp1, tp2)
    assert report.verdict == "pass", [o.reason for o in report.outcomes if not o.ok]
    names = {o.name for o in report.outcomes}
    assert {"embeddings", "layers.0.attn", "layers.3.mlp", "final_norm", "logits"} <= names
    assert len(report.outcomes) == 23  # every canonical tap of the 4-layer model, one logical tensor each
    logits = next(o for o in report.outcomes if o.name == "logits")
    assert logits.target.shape == [1, 11, 512]  # two vocabulary halves joined
    attn = next(o for o in report.outcomes if o.name == "layers.0.attn")
    assert attn.metrics.max_abs > 0  # the partial sums were added: not bit-identical, but close


def test_all_reduce_returning_zeros_on_one_rank_is_flagged_with_its_rank(hf_tp1, tmp_path):
    faulty = tp_run(tmp_path / "faulty", "--fault", "mlp:0:1")
    report = compare(hf_tp1, faulty)
    first = report.first_divergence
    assert first is not None
    assert (first.name, first.kind, first.rank) == ("layers.0.mlp", "degenerate", 1)
    assert "rank 1" in first.reason and "all zeros" in first.reason
    assert all(o.ok for o in report.outcomes[:report.outcomes.index(first)])


def test_missing_annotation_is_an_error_naming_the_tap_and_override_fixes_it(hf_tp1, tp2, tmp_path):
    dump = tmp_path / "unannotated"
    shutil.copytree(tp2, dump)
    for rank in (0, 1):
        path = dump / f"manifest-rank{rank}.jsonl"
        lines = []
        for line in path.read_text().splitlines():
            obj = json.loads(line)
            if obj.get("name") == "logits":
                obj["tags"].pop("shard")
            lines.append(json.dumps(obj))
        path.write_text("\n".join(lines) + "\n")
    result = cli("compare", str(hf_tp1), str(dump))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'logits'" in lines[0] and "no sharding annotation" in lines[0]
    assert "Traceback" not in result.stderr
    assert cli("compare", str(hf_tp1), str(dump), "--shard", "logits=split:-1").returncode == 0


def test_a_wrong_annotation_is_overridden_at_compare_time_without_a_rerun(hf_tp1, tp2):
    wrong = compare(hf_tp1, tp2, shards=["layers.*.attn=replicated"])
    attn = next(o for o in wrong.outcomes if o.name == "layers.0.attn")
    assert attn.kind == "fail" and "rank 1's copy of a replicated tensor differs" in attn.reason
    assert compare(hf_tp1, tp2, shards=["layers.*.attn=sum"]).verdict == "pass"
    bad = cli("compare", str(hf_tp1), str(tp2), "--shard", "logits=split:x")
    assert bad.returncode == 2 and "split needs an integer dimension" in bad.stderr


def test_incident_4_padding_token_is_aligned_away(hf_tp1, tmp_path):
    padded = tp_run(tmp_path / "padded", "--pad", "1")
    with pytest.raises(UsageError, match="different inputs at step 0"):  # step by step: not comparable
        compare(hf_tp1, padded)
    by_step = compare(hf_tp1, padded, allow_incomparable=True)
    assert by_step.verdict == "fail" and {o.kind for o in by_step.outcomes} == {"shape_mismatch"}
    aligned = compare(hf_tp1, padded, align="tokens")
    assert aligned.verdict == "pass", [o.reason for o in aligned.outcomes if not o.ok]
    assert any("11 tokens" in n and "1 target slot" in n for n in aligned.notes)
    result = cli("compare", str(hf_tp1), str(padded), "--align", "tokens")
    assert result.returncode == 0, result.stdout + result.stderr


def test_tokens_on_one_side_only_are_reported_not_truncated(hf_tp1, tmp_path):
    shorter = tmp_path / "short"
    result = subprocess.run([*TORCHRUN, "-m", "parity.parallel.tp_llama", "--out", str(shorter),
                             "--prompt", "The quick brown"], capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-2000:]
    report = compare(hf_tp1, shorter, align="tokens")
    tokens = [o for o in report.outcomes if o.name == "tokens"]
    assert len(tokens) == 1 and tokens[0].kind == "missing_in_target"
    assert "positions" in tokens[0].reason and report.verdict == "fail"
    assert all(o.ok for o in report.outcomes if o.name != "tokens")  # the shared prefix agrees
    assert compare(hf_tp1, shorter, align="tokens", allow_missing=["tokens"]).verdict == "pass"


def test_workers_and_torchrun_sharded_compare_give_the_serial_report(hf_tp1, tmp_path):
    faulty = tp_run(tmp_path / "faulty", "--fault", "attn:1:0")
    reports = {}
    for label, extra, torchrun in (("serial", [], False), ("workers", ["--workers", "2"], False),
                                   ("torchrun", ["--distributed"], True)):
        out = tmp_path / f"{label}.json"
        result = cli("compare", str(hf_tp1), str(faulty), "--json", str(out), *extra, torchrun=torchrun)
        assert result.returncode in (0, 1), result.stderr[-2000:]
        reports[label] = json.loads(out.read_text())
    assert reports["serial"]["summary"]["verdict"] == "fail"
    for label in ("workers", "torchrun"):
        assert reports[label]["pairs"] == reports["serial"]["pairs"], label
        assert reports[label]["first_divergence"] == reports["serial"]["first_divergence"], label


# ---------------------------------------------------------------- token layouts (real captures)
def _write(dump: Path, steps: list[dict], *, hidden: int = 8) -> Path:
    """A dump written by CaptureSession: per step, a [*, hidden] activation whose row for a token
    is a fixed function of (request, position) — so only a correct alignment compares equal."""
    from parity.capturing.session import CaptureSession

    session = CaptureSession(dump)
    for step in steps:
        session.next_step(step["tags"])
        rows = [torch.full((hidden,), -1.0) if key is None else
                torch.linspace(0, 1, hidden) * (key[1] + 1) + 10 * key[0] for key in step["rows"]]
        value = torch.stack(rows).reshape(*step.get("shape", (len(rows),)), hidden)
        session.record("layers.0.mlp", value)
        session.end_step()
    session.close()
    return dump


def test_chunked_prefill_and_padded_batches_align_with_one_packed_step(tmp_path):
    ids_a, ids_b = [5, 6, 7, 8, 9], [5, 6, 11]
    packed = _write(tmp_path / "packed", [{
        "tags": {"input_ids": [ids_a + ids_b], "positions": [[0, 1, 2, 3, 4, 0, 1, 2]], "seq_lens": [5, 3]},
        "rows": [(0, p) for p in range(5)] + [(1, p) for p in range(3)]}])
    # target: request A in two chunks (steps 0 and 1) next to B in a padded [2, 4] batch (B right-
    # padded), then A's second chunk packed with a padding slot; request ids tie the chunks together
    chunked = _write(tmp_path / "chunked", [
        {"tags": {"input_ids": [[5, 6, 7, 8], [5, 6, 11, 0]], "attention_mask": [[1, 1, 1, 0], [1, 1, 1, 0]],
                  "request_ids": ["a", "b"]},
         "rows": [(0, 0), (0, 1), (0, 2), None, (1, 0), (1, 1), (1, 2), None], "shape": (2, 4)},
        {"tags": {"input_ids": [[8, 9, 0]], "positions": [[3, 4, 0]], "seq_lens": [2], "request_ids": ["a"]},
         "rows": [(0, 3), (0, 4), None]}])
    report = compare(packed, chunked, align="tokens")
    assert report.verdict == "pass", [o.reason for o in report.outcomes]
    assert "8 tokens of 2 request(s)" in report.notes[0] and "3 target slot" in report.notes[0]
    # step by step, the layouts cannot pair
    assert compare(packed, chunked, allow_incomparable=True).verdict == "fail"


def test_requests_pair_by_request_id_in_any_order(tmp_path):
    base = _write(tmp_path / "b", [{"tags": {"input_ids": [[1, 2, 3, 4]], "seq_lens": [2, 2],
                                             "request_ids": ["x", "y"]},
                                    "rows": [(0, 0), (0, 1), (1, 0), (1, 1)]}])
    swapped = _write(tmp_path / "t", [{"tags": {"input_ids": [[3, 4, 1, 2]], "seq_lens": [2, 2],
                                                "request_ids": ["y", "x"]},
                                       "rows": [(1, 0), (1, 1), (0, 0), (0, 1)]}])
    assert compare(base, swapped, align="tokens").verdict == "pass"
    wrong = _write(tmp_path / "w", [{"tags": {"input_ids": [[3, 4, 1, 2]], "seq_lens": [2, 2],
                                              "request_ids": ["y", "x"]},
                                     "rows": [(0, 0), (0, 1), (1, 0), (1, 1)]}])  # rows not moved
    assert compare(base, wrong, align="tokens").verdict == "fail"


def test_statistics_only_multi_rank_dumps_combine_shard_statistics(fp32_model, tmp_path):
    from parity.backends.hf import capture_sequences

    hf = tmp_path / "hf-stats"
    capture_sequences(fp32_model, [fp32_model.tokenizer(PROMPT).input_ids], hf, canonical=True, mode="stats")
    report = compare(hf, tp_run(tmp_path / "tp-stats", "--stats-only"))
    by_kind = {}
    for o in report.outcomes:
        by_kind.setdefault(o.kind, []).append(o.name)
    # split (logits) and replicated taps are judged from combined statistics; partial sums cannot be
    assert sorted(by_kind["missing_in_target"]) == [f"layers.{i}.attn" for i in range(4)]
    assert set(by_kind) == {"pass", "missing_in_target"} and "logits" in by_kind["pass"]
    assert all(o.statistics_based for o in report.outcomes if o.kind == "pass")
    faulty = compare(hf, tp_run(tmp_path / "tp-stats-bad", "--stats-only", "--fault", "mlp:0:1"),
                     allow_missing=["layers.*.attn"])
    assert faulty.first_divergence is not None and faulty.first_divergence.name == "layers.0.mlp"


def test_vllm_tensor_parallel_2_matches_transformers(tmp_path):
    """vLLM with tensor_parallel_size=2 on CPU (two worker processes, each capturing its rank)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "parity.cli", "diff", "--target", "engine=vllm,tp=2",
                             "--prompts", str(prompts), "--new-tokens", "4", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env={**_env(), "COLUMNS": "160"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS" in result.stdout
    headers = [json.loads((out / "target" / f"manifest-rank{r}.jsonl").read_text().splitlines()[0]) for r in (0, 1)]
    assert [(h["rank"], h["world_size"], h["spec"]["tp"]) for h in headers] == [(0, 2, 2), (1, 2, 2)]
    report = json.loads((out / "report.json").read_text())
    logits = [p for p in report["pairs"] if p["name"] == "logits"]
    assert logits and all(p["target"]["shape"][-1] == 512 and p["outcome"] == "pass" for p in logits)
    assert report["summary"]["passed"] == report["summary"]["pairs"] == 23
    distributions = report["end_to_end"]["distributions"]  # logits rebuilt from the vocabulary slices
    assert distributions is not None and distributions["top1_agreement"] == 1.0
    step = json.loads((out / "target" / "manifest-rank1.jsonl").read_text().splitlines()[1])
    assert step["type"] == "step" and step["tags"]["seq_lens"] == [len(step["tags"]["input_ids"][0])]


def test_a_faulty_rank_of_a_full_dump_is_named_against_a_statistics_only_one(fp32_model, tmp_path):
    # The statistics-only side here has no samples (as a format 1.1 dump, or sample=0): the full
    # multi-rank side is still read, so its zero shard is found as in a full comparison.
    import json

    from parity.backends.hf import capture_sequences

    hf = tmp_path / "hf-stats"
    capture_sequences(fp32_model, [fp32_model.tokenizer(PROMPT).input_ids], hf, canonical=True, mode="stats")
    manifest = hf / "manifest-rank0.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for obj in lines:
        obj.get("stats", {}).pop("sample", None)
    manifest.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    report = compare(tp_run(tmp_path / "faulty", "--fault", "mlp:0:1"), hf)
    first = report.first_divergence
    assert (first.name, first.kind, first.rank) == ("layers.0.mlp", "degenerate", 1)
    assert first.statistics_based and "rank 1" in first.reason and "all zeros" in first.reason


def test_tensor_and_data_parallel_layout_rebuilds_per_group_then_joins_tokens(tmp_path):
    """4 ranks = TP 2 x DP 2: each DP group holds its own tokens; within a group the hidden
    axis is split (x) or replicated (y). Written by four real capture sessions."""
    from parity.capturing.session import CaptureSession

    full = torch.arange(6 * 4, dtype=torch.float32).reshape(1, 6, 4) / 7
    base = CaptureSession(tmp_path / "base")
    base.next_step({})
    base.record("x", full)
    base.record("y", full * 2)
    base.close()
    for rank in range(4):
        tp, dp = rank % 2, rank // 2
        session = CaptureSession(tmp_path / "tpdp", rank=rank, world_size=4,
                                 layout={"tp_rank": tp, "tp_size": 2, "dp_rank": dp, "dp_size": 2},
                                 sharding={"x": "split:-1", "y": "replicated"})
        session.next_step({})
        tokens = full[:, 3 * dp:3 * dp + 3]
        session.record("x", tokens[..., 2 * tp:2 * tp + 2])
        session.record("y", tokens * 2)
        session.close()
    report = compare(tmp_path / "base", tmp_path / "tpdp")
    assert report.verdict == "pass" and [o.target.shape for o in report.outcomes] == [[1, 6, 4], [1, 6, 4]]
    assert all(o.metrics.max_abs == 0 for o in report.outcomes)


def test_inspect_shows_ranks_layouts_and_annotations_and_explain_refuses_multi_rank(hf_tp1, tp2):
    shown = cli("inspect", str(tp2), "--name", "logits")
    assert shown.returncode == 0
    assert "rank 1 layout: tp_rank=1, tp_size=2" in shown.stdout and "split:-1" in shown.stdout
    refused = cli("explain", str(hf_tp1), str(tp2))
    assert refused.returncode == 2 and "2-rank run" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_padded_transformers_batch_aligns_with_one_request_per_step(fp32_model, tmp_path):
    """transformers, left-padded batch of two prompts (mask and positions captured automatically)
    against the same prompts run one per step: --align tokens pairs every real token."""
    import parity

    model, tok = fp32_model.model, fp32_model.tokenizer
    prompts = ["The quick brown fox", "A"]
    singles = tmp_path / "singles"
    with parity.capture(model, singles), torch.inference_mode():
        for text in prompts:
            model(input_ids=torch.tensor([tok(text).input_ids]), use_cache=False)
    ids = [tok(text).input_ids for text in prompts]
    width = max(map(len, ids))
    pad = model.config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = tmp_path / "batched"
    with parity.capture(model, batched), torch.inference_mode():
        model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
    report = compare(singles, batched, align="tokens")
    assert report.verdict == "pass", [o.reason for o in report.outcomes if not o.ok][:3]
    assert f"{sum(map(len, ids))} tokens of 2 request(s)" in report.notes[0]
    assert f"{2 * width - sum(map(len, ids))} target slot" in report.notes[0]


def _dp_run(path: Path, groups: list[dict], *, tp: int = 1, sharding: dict | None = None) -> Path:
    """A TP x DP run written by one real capture session per rank: ``groups[dp]`` gives that DP
    group's step tags and its full [1, T, H] tensor (split over tp along the last axis)."""
    from parity.capturing.session import CaptureSession

    world = tp * len(groups)
    for rank in range(world):
        tp_rank, dp_rank = rank % tp, rank // tp
        session = CaptureSession(path, rank=rank, world_size=world,
                                 layout={"tp_rank": tp_rank, "tp_size": tp, "dp_rank": dp_rank, "dp_size": len(groups)},
                                 sharding=sharding or {"**": "split:-1"})
        group = groups[dp_rank]
        session.next_step(group["tags"])
        width = group["value"].shape[-1] // tp
        session.record("layers.0.mlp", group["value"][..., tp_rank * width:(tp_rank + 1) * width])
        session.end_step()
        session.close()
    return path


def test_incident_4_empty_data_parallel_rank_adds_a_padding_token(tmp_path):
    """DP=2 x TP=2 where DP rank 1 had no request and contributed one padding token: [6, ...]
    against the baseline's [5, ...]; the step metadata of each DP group rebuilds the real tokens."""
    from parity.capturing.session import CaptureSession

    value = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0))
    ids = [7, 8, 9, 10, 11]
    base = CaptureSession(tmp_path / "tp2")
    base.next_step({"input_ids": [ids]})
    base.record("layers.0.mlp", value)
    base.close()
    target = _dp_run(tmp_path / "tp2dp2", [
        {"tags": {"input_ids": [ids], "seq_lens": [5]}, "value": value},
        {"tags": {"input_ids": [[0]], "seq_lens": []}, "value": torch.zeros(1, 1, 8)}], tp=2)
    by_step = compare(tmp_path / "tp2", target, allow_incomparable=True)
    assert [o.kind for o in by_step.outcomes] == ["shape_mismatch"] and "[1, 6, 8]" in by_step.outcomes[0].reason
    aligned = compare(tmp_path / "tp2", target, align="tokens")
    assert aligned.verdict == "pass" and aligned.outcomes[0].metrics.max_abs == 0
    assert "5 tokens of 1 request(s)" in aligned.notes[0] and "1 target slot" in aligned.notes[0]


def test_shard_faults_stay_visible_under_token_alignment(tmp_path):
    value = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    tags = {"input_ids": [[1, 2, 3, 4]]}
    from parity.capturing.session import CaptureSession

    base = CaptureSession(tmp_path / "base")
    base.next_step(tags)
    base.record("layers.0.mlp", value)
    base.close()
    for rank in range(2):
        session = CaptureSession(tmp_path / "tp", rank=rank, world_size=2, sharding={"**": "replicated"})
        session.next_step(tags)
        session.record("layers.0.mlp", value if rank == 0 else torch.zeros_like(value))
        session.close()
    for align in ("steps", "tokens"):
        outcome = compare(tmp_path / "base", tmp_path / "tp", align=align).outcomes[0]
        assert (outcome.kind, outcome.rank) == ("degenerate", 1), align
        assert "rank 1's shard (replicated) is all zeros" in outcome.reason


def test_replicated_copies_take_the_majority_and_zero_split_shards_are_only_notes(tmp_path):
    from parity.capturing.session import CaptureSession

    value = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(2))
    base = CaptureSession(tmp_path / "base")
    base.next_step({})
    base.record("r", value)
    base.record("s", torch.cat([value[..., :4], torch.zeros(1, 4, 4)], dim=-1))
    base.close()
    for rank in range(3):
        session = CaptureSession(tmp_path / "tp", rank=rank, world_size=3,
                                 sharding={"r": "replicated", "s": "sum"})
        session.next_step({})
        session.record("r", value + 1 if rank == 0 else value)  # rank 0 alone is wrong
        partial = torch.cat([value[..., :4], torch.zeros(1, 4, 4)], dim=-1) if rank == 1 else torch.zeros(1, 4, 8)
        session.record("s", partial)  # ranks 0 and 2 legitimately contribute nothing
        session.close()
    report = compare(tmp_path / "base", tmp_path / "tp")
    r, s = report.outcomes
    assert (r.kind, r.rank) == ("fail", 0) and "copy of ranks 1, 2" in r.reason and r.metrics.max_abs == 0
    assert s.kind == "identical" and any("all zeros" in n for n in s.notes)


def test_inconsistent_layouts_and_missing_torchrun_are_clear_errors(tmp_path):
    from parity.capturing.session import CaptureSession
    from parity.errors import DumpError

    for rank in range(2):
        session = CaptureSession(tmp_path / "bad", rank=rank, world_size=2, sharding={"**": "replicated"},
                                 layout={"tp_rank": 0, "tp_size": 2, "dp_rank": 0, "dp_size": 1})
        session.next_step({})
        session.record("x", torch.ones(2))
        session.close()
    with pytest.raises(DumpError, match="both claim tp_rank 0"):
        compare(tmp_path / "bad", tmp_path / "bad")
    result = cli("compare", str(tmp_path / "bad"), str(tmp_path / "bad"), "--distributed")
    assert result.returncode == 2 and "runs under torchrun" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_generate_with_decode_steps_aligns_with_one_teacher_forced_pass(fp32_model, tmp_path):
    """transformers generate (prefill, then one decode step per token, KV cache) against the
    whole sequence in one forward pass: every tap with a token axis pairs token by token."""
    import parity

    model, tok = fp32_model.model, fp32_model.tokenizer
    ids = torch.tensor([tok(PROMPT).input_ids])
    with parity.capture(model, tmp_path / "generate"), torch.inference_mode():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    with parity.capture(model, tmp_path / "forced"), torch.inference_mode():
        model(input_ids=out[:, :-1], use_cache=False)  # the last token was never fed to the model
    report = compare(tmp_path / "forced", tmp_path / "generate", align="tokens")
    aligned = [o for o in report.outcomes if o.step == 0 and o.target and o.target.shape[0] == out.shape[1] - 1]
    assert len(aligned) >= 20 and all(o.ok for o in aligned), [o.reason for o in aligned if not o.ok][:2]
    assert f"{out.shape[1] - 1} tokens of 1 request(s)" in report.notes[0]


@pytest.mark.parametrize("tags", [
    {"input_ids": [[1, 2], [3]], "seq_lens": [5, -1]},
    {"input_ids": [1, 2, 3], "positions": ["a", None, 2], "request_ids": [[1], {"x": 1}]},
    {"input_ids": [[1, 2, 3]], "attention_mask": [[1]], "seq_lens": [True, 10**30]},
])
def test_malformed_token_metadata_never_crashes_the_aligner(tmp_path, tags):
    from parity.capturing.session import CaptureSession

    for name in ("a", "b"):
        session = CaptureSession(tmp_path / name)
        session.next_step(tags)
        session.record("layers.0.mlp", torch.ones(3, 4))
        session.close()
    result = cli("compare", str(tmp_path / "a"), str(tmp_path / "b"), "--align", "tokens")
    assert result.returncode in (0, 1, 2) and "internal error" not in result.stderr, result.stderr


def test_a_layout_that_cannot_split_is_one_line_from_parity(tmp_path):
    """4 heads over 3 ranks: rank 0 says why in one line; no rank prints a traceback of parity's code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
               "-m", "parity.parallel.tp_llama", "--out", str(tmp_path / "tp3")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=_env())
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("tp_llama:")]
    assert lines == ["tp_llama: 4 heads / 2 kv heads do not split over 3 ranks"]
    assert "parity/parallel" not in result.stderr  # torchrun's own summary follows; no worker traceback
