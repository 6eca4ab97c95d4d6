"""Oracle mode: with neither side ground truth, both are judged against a float64 run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parity.backends.hf import load, run_and_capture
from parity.backends.spec import parse_spec
from parity.compare.oracle import DEFAULT_EPS, compare_with_oracle


@pytest.fixture(scope="module")
def dumps(tiny_model_dir, prompts, tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    for name, spec in (("oracle", "dtype=float64,attn=eager"), ("sdpa", "dtype=float32,attn=sdpa")):
        run_and_capture(load(tiny_model_dir, parse_spec(spec)), prompts, root / name)
    return root


def test_two_fp32_kernels_are_equally_close_to_the_truth(dumps, baseline_dump):
    report = compare_with_oracle(dumps / "oracle", baseline_dump, dumps / "sdpa")
    assert report.verdict == "pass" and len(report.outcomes) == 92
    for o in report.outcomes:
        assert o.oracle["bound"] == pytest.approx(2.0 * o.oracle["baseline_error"] + DEFAULT_EPS["float32"])
        assert o.oracle["target_error"] < 1e-5
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data["oracle"]["path"].endswith("oracle") and "oracle" in data["pairs"][5]


def test_bf16_target_is_judged_worse_than_the_fp32_baseline(dumps, baseline_dump, bf16_dump):
    report = compare_with_oracle(dumps / "oracle", baseline_dump, bf16_dump)
    assert report.verdict == "fail"
    first = report.first_divergence
    assert first.oracle["target_error"] > 10 * first.oracle["baseline_error"]
    assert "target error" in first.reason and "x" in first.reason


def test_a_fault_is_attributed_where_it_happens(dumps, fp32_model, prompts, baseline_dump, tmp_path):
    handle = fp32_model.model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: out * 1.01)
    try:
        run_and_capture(fp32_model, prompts, tmp_path / "faulty")
    finally:
        handle.remove()
    report = compare_with_oracle(dumps / "oracle", baseline_dump, tmp_path / "faulty")
    assert report.first_divergence.name == "model.layers.1.mlp"
    # the same fault on the baseline side passes the target: the rule is one-sided on purpose
    swapped = compare_with_oracle(dumps / "oracle", tmp_path / "faulty", baseline_dump)
    assert swapped.verdict == "pass"


def test_oracle_cli_shows_both_errors_and_refuses_element_tolerances(dumps, baseline_dump):
    base = [sys.executable, "-m", "parity.cli", "compare", str(baseline_dump), str(dumps / "sdpa"),
            "--oracle", str(dumps / "oracle")]
    result = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error against the float64 oracle" in result.stdout
    assert "baseline err" in result.stdout and "target err" in result.stdout
    bad = subprocess.run(base + ["--rtol", "0.1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "do not apply" in bad.stderr


def test_diff_with_fp64_oracle_runs_three_captures(tmp_path):
    result = subprocess.run([sys.executable, "-m", "parity.cli", "diff", "--oracle", "fp64", "--target",
                             "dtype=float32,attn=sdpa", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    header = json.loads((tmp_path / "out" / "oracle" / "manifest-rank0.jsonl").read_text().splitlines()[0])
    assert header["spec"]["dtype"] == "float64" and header["spec"]["attn"] == "eager"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["verdict"] == "pass" and report["oracle"]["spec"]["dtype"] == "float64"
