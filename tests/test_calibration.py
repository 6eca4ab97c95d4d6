"""parity calibrate: tolerances measured from the noise floor pass what is noise and fail what is not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parity.backends.hf import load, run_and_capture
from parity.backends.spec import parse_spec
from parity.calibration import calibrate
from parity.compare.engine import compare
from parity.compare.profile import load_profile
from parity.compare.tolerance import TolerancePolicy


@pytest.fixture(scope="module")
def sdpa_model(tiny_model_dir):
    return load(tiny_model_dir, parse_spec("dtype=float32,attn=sdpa"))


@pytest.fixture(scope="module")
def eager_vs_sdpa_profile(fp32_model, sdpa_model, prompts, tmp_path_factory):
    result = calibrate(fp32_model, sdpa_model, prompts)
    path = tmp_path_factory.mktemp("profile") / "eager-vs-sdpa.toml"
    path.write_text(result.to_toml(backend="cpu-avx512"))
    return result, path


def test_calibration_reports_noise_floor_and_target_error_per_tap(eager_vs_sdpa_profile):
    result, _ = eager_vs_sdpa_profile
    kinds = {t.kind: t for t in result.taps}
    assert "model.layers.{i}.mlp" in kinds and "lm_head" in kinds
    mlp = kinds["model.layers.{i}.mlp"]
    assert len(mlp.noise) == 4 * 4 * 4  # prompts x perturbations x layers
    assert len(mlp.target) == 4 * 5 * 4  # prompts x (unperturbed + perturbations) x layers
    # fp32 kernel noise is small but real, and sdpa stays within it
    assert 0 < max(mlp.noise) < 1e-4 and 0 < max(mlp.target) < 1e-4
    assert all(t.within_noise for t in result.taps)
    assert mlp.atol == pytest.approx(2.0 * mlp.target_q)


def test_profile_passes_a_fresh_eager_vs_sdpa_comparison(eager_vs_sdpa_profile, sdpa_model, prompts,
                                                          baseline_dump, tmp_path):
    _, path = eager_vs_sdpa_profile
    run_and_capture(sdpa_model, prompts, tmp_path / "sdpa")
    policy = TolerancePolicy(file_overrides=load_profile(path), backend="cpu-avx512", profile_path=str(path))
    report = compare(baseline_dump, tmp_path / "sdpa", policy=policy)
    assert report.verdict == "pass"
    assert all(o.tolerance.source.startswith("eager-vs-sdpa.toml:") for o in report.outcomes)


def test_profile_fails_a_target_whose_layer1_mlp_is_scaled(eager_vs_sdpa_profile, sdpa_model, prompts,
                                                           baseline_dump, tmp_path):
    _, path = eager_vs_sdpa_profile
    handle = sdpa_model.model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: out * 1.01)
    try:
        run_and_capture(sdpa_model, prompts, tmp_path / "faulty")
    finally:
        handle.remove()
    policy = TolerancePolicy(file_overrides=load_profile(path), backend="cpu-avx512")
    report = compare(baseline_dump, tmp_path / "faulty", policy=policy)
    assert report.verdict == "fail"
    assert report.first_divergence.name == "model.layers.1.mlp"
    # without the backend the backend-scoped entries do not apply: the fp32 defaults do
    plain = compare(baseline_dump, tmp_path / "faulty",
                    policy=TolerancePolicy(file_overrides=load_profile(path)))
    assert plain.first_divergence.tolerance.source == "default for float32"


def test_calibrate_command_writes_a_profile(tmp_path):
    out, js = tmp_path / "p.toml", tmp_path / "c.json"
    result = subprocess.run([sys.executable, "-m", "parity.cli", "calibrate", "--perturb", "threads",
                             "--out", str(out), "--json", str(js), "--quantile", "1", "--margin", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "noise floor" in result.stdout and f"profile written to {out}" in result.stdout
    entries = load_profile(out)
    assert {e.pattern for e in entries} >= {"model.layers.*.mlp", "lm_head"}
    summary = json.loads(js.read_text())
    assert summary["perturbations"] == ["threads"] and summary["margin"] == 3
    bad = subprocess.run([sys.executable, "-m", "parity.cli", "calibrate", "--margin", "0.5"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--margin must be >= 1" in bad.stderr
