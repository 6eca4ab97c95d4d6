"""Real engines against the transformers fp32 reference: vLLM, torchao int8, torch.compile.

vLLM runs in-process, one engine per dtype shared by this module (all its tests run on one
xdist worker: group "engines"). Where vLLM or torchao cannot be imported the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from parity.backends import hf
from parity.backends.generation import Generation
from parity.backends.runner import run_sides, twin_spec
from parity.backends.spec import parse_spec
from parity.compare.e2e import compare_generations, distribution_metrics
from parity.compare.engine import compare
from parity.store.reader import load_run

pytestmark = pytest.mark.xdist_group("engines")


def _vllm_missing() -> str | None:
    from parity.backends.vllm import available

    return available()


def _no_progress(*args, **kwargs):
    return lambda *a: None


@pytest.fixture(scope="module")
def hf_vs_vllm_fp32(tmp_path_factory, prompts):
    if reason := _vllm_missing():
        pytest.skip(f"vLLM not available: {reason}")
    root = tmp_path_factory.mktemp("vllm32")
    run = run_sides(hf.DEFAULT_MODEL, parse_spec(""), parse_spec("engine=vllm,dtype=float32"), prompts,
                    base_dir=root / "b", target_dir=root / "t", new_tokens=12, task=_no_progress)
    return run, root


def test_transformers_fp32_vs_vllm_fp32_every_canonical_tap_passes(hf_vs_vllm_fp32):
    run, root = hf_vs_vllm_fp32
    report = compare(root / "b", root / "t")
    assert report.verdict == "pass", report.first_divergence
    names = {o.name for o in report.outcomes if o.step == 0}
    assert names == {"embeddings", "final_norm", "logits"} | {
        f"layers.{i}{suffix}" for i in range(4)
        for suffix in ("", ".input_norm", ".attn", ".post_attn_norm", ".mlp")}
    assert max(o.metrics.max_abs for o in report.outcomes) < 1e-4
    # same shapes after canonicalisation: vLLM's [tokens, hidden] became [1, tokens, hidden]
    logits = next(o for o in report.outcomes if o.name == "logits")
    assert logits.baseline.shape == logits.target.shape and logits.target.shape[0] == 1
    assert not load_run(root / "t").notes  # every canonical tap was mapped
    e2e = compare_generations(run.baseline_generations, run.target_generations, decode=run.tokenizer.decode)
    assert e2e["token_match_rate"] == 1.0 and e2e["verdicts"]["identical"] == 4
    dist = distribution_metrics(load_run(root / "b"), load_run(root / "t"))
    assert dist["kl_mean"] < 1e-9 and dist["top1_agreement"] == 1.0
    assert dist["positions"] == sum(len(g.sequence) for g in run.baseline_generations)


def test_vllm_bf16_error_is_bf16_sized(tmp_path, prompts):
    if reason := _vllm_missing():
        pytest.skip(f"vLLM not available: {reason}")
    run_sides(hf.DEFAULT_MODEL, parse_spec(""), parse_spec("engine=vllm,dtype=bf16"), prompts[:2],
              base_dir=tmp_path / "b", target_dir=tmp_path / "t", new_tokens=8, task=_no_progress)
    report = compare(tmp_path / "b", tmp_path / "t")
    worst = max(o.metrics.rel_l2 for o in report.outcomes)
    assert 1e-3 < worst < 5e-2
    dist = distribution_metrics(load_run(tmp_path / "b"), load_run(tmp_path / "t"))
    assert 1e-7 < dist["kl_mean"] < 1e-2 and dist["top1_agreement"] > 0.9


@pytest.mark.parametrize("quant, low, high", [("int8wo", 1e-3, 5e-2), ("int8dyn", 3e-3, 1e-1)])
def test_torchao_int8_paths_report_quantization_sized_errors(tmp_path, prompts, quant, low, high):
    pytest.importorskip("torchao", reason="torchao not installed")
    run_sides(hf.DEFAULT_MODEL, parse_spec(""), parse_spec(f"quant={quant}"), prompts[:2],
              base_dir=tmp_path / "b", target_dir=tmp_path / "t", new_tokens=8, task=_no_progress)
    report = compare(tmp_path / "b", tmp_path / "t")
    assert report.verdict == "fail" and report.first_divergence.tolerance.source == "default for float32"
    assert report.outcomes[0].name == "model.embed_tokens" and report.outcomes[0].kind == "identical"  # not quantized
    logits = [o for o in report.outcomes if o.name == "lm_head"]
    assert all(low < o.metrics.max_abs < high * 10 for o in logits)
    assert low < max(o.metrics.rel_l2 for o in report.outcomes) < high
    # precision-aware: against the twin (the baseline's settings with the same quantization) it is
    # exactly what int8 costs
    twin = twin_spec(parse_spec(""), parse_spec(f"quant={quant}"))
    run_sides(hf.DEFAULT_MODEL, twin, twin, prompts[:2], base_dir=tmp_path / "w", target_dir=tmp_path / "w2",
              new_tokens=8, task=_no_progress)
    judged = compare(tmp_path / "b", tmp_path / "t", twin=tmp_path / "w")
    assert judged.verdict == "pass" and "noise" in {o.kind for o in judged.outcomes}, judged.headline


def test_torch_compile_matches_eager_closely(tmp_path, prompts):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    run_sides(hf.DEFAULT_MODEL, parse_spec(""), parse_spec("compile=1"), prompts[:1],
              base_dir=tmp_path / "b", target_dir=tmp_path / "t", new_tokens=4, task=_no_progress)
    report = compare(tmp_path / "b", tmp_path / "t")
    assert report.verdict == "pass"
    assert max(o.metrics.max_abs for o in report.outcomes) < 1e-4


def test_logprob_aware_verdict_tells_a_near_tie_from_a_real_error():
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    base = [Generation("p", [1], [5, 6, 7], [{5: -0.1}, {6: -0.69, 9: -0.72}, {7: -0.1}]),
            Generation("q", [1], [5, 6, 7], [{5: -0.1}, {6: -0.05, 9: -3.2}, {7: -0.1}])]
    target = [Generation("p", [1], [5, 9, 7], [{5: -0.1}, {9: -0.70, 6: -0.71}, {7: -0.1}]),
              Generation("q", [1], [5, 9, 8], [{5: -0.1}, {9: -0.5, 2: -1.0}, {8: -0.1}])]
    e2e = compare_generations(base, target, decode=decode)
    near, real = e2e["prompts"]
    assert near["verdict"] == "benign flip" and near["baseline_logprob_gap"] == pytest.approx(0.03)
    assert real["verdict"] == "real divergence" and real["baseline_token_in_target_topk"] is False
    assert (near["first_divergent_position"], real["first_divergent_position"]) == (1, 1)
    assert e2e["token_match_rate"] == pytest.approx(3 / 6)


def test_diff_and_matrix_commands_with_vllm(tmp_path):
    if reason := _vllm_missing():
        pytest.skip(f"vLLM not available: {reason}")
    result = subprocess.run([sys.executable, "-m", "parity.cli", "matrix", "--out", str(tmp_path / "m"),
                             "--json", str(tmp_path / "m.json"), "--new-tokens", "6",
                             "--target", "engine=vllm,dtype=fp32", "--target", "dtype=bf16,attn=sdpa"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]  # the bf16 target is judged against its bf16 twin
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["verdict"] for r in rows] == ["pass", "pass"]
    assert rows[0]["twin"] is None and rows[1]["twin"].startswith("engine=hf,dtype=bfloat16,attn=eager")
    assert (tmp_path / "m" / "twin-1" / "manifest-rank0.jsonl").is_file()
    assert rows[0]["token_match_rate"] == 1.0 and rows[0]["logits_kl_mean"] < 1e-9
    assert "engine=vllm,dtype=float32" in result.stdout
    assert "MainProcess" not in result.stdout and "WARNING" not in result.stdout  # vLLM's log goes to stderr
    report = json.loads((tmp_path / "m" / "target-1" / "report.json").read_text())
    assert report["end_to_end"]["token_match_rate"] == 1.0


def test_vllm_starts_after_numba_was_imported():
    """vLLM's start-up scan of every module trips over llvmlite's FFI objects; parity shields them."""
    if reason := _vllm_missing():
        pytest.skip(f"vLLM not available: {reason}")
    pytest.importorskip("numba", reason="numba not installed")
    code = ("import numba, numpy as np\n"
            "numba.njit(lambda x: x.sum())(np.ones(3))\n"
            "from parity.backends import hf, vllm\nfrom parity.backends.spec import parse_spec\n"
            "side = vllm.load(hf.DEFAULT_MODEL, parse_spec('engine=vllm'))\n"
            "print('TOKENS', vllm.generate(side, ['The harbour'], new_tokens=3)[0].tokens)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "TOKENS [" in result.stdout, result.stderr[-2000:]
