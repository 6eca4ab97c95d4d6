"""Mistakes a user makes are named before any work, never silently turned into an empty or loose result."""

from __future__ import annotations

import subprocess
import sys

import pytest

import parity
from parity.compare.engine import compare
from parity.errors import UsageError
from parity.store.reader import load_run

PARITY = [sys.executable, "-m", "parity.cli"]


def test_a_single_pattern_string_captures_what_the_list_would(fp32_model, prompts, tmp_path):
    ids = fp32_model.tokenizer(prompts[0], return_tensors="pt").input_ids
    for out, taps in ((tmp_path / "str", "model.layers.*"), (tmp_path / "list", ["model.layers.*"])):
        with parity.capture(fp32_model.model, out, taps=taps) as session:
            fp32_model.model(input_ids=ids)
        assert session.error is None
    names = [sorted(r.name for r in load_run(tmp_path / d).records) for d in ("str", "list")]
    assert names[0] == names[1] == [f"model.layers.{i}" for i in range(4)]


def test_a_tap_pattern_that_matches_nothing_is_named_with_the_closest_modules(fp32_model, tmp_path):
    with pytest.raises(UsageError) as info:
        with parity.capture(fp32_model.model, tmp_path / "typo", taps=["**.layers.*.mpl"]):
            pass
    assert "'**.layers.*.mpl' matched nothing" in info.value.one_line()
    assert "model.layers.*.mlp" in info.value.one_line()
    assert not (tmp_path / "typo").exists()  # nothing was written


def test_diff_stops_on_a_mistyped_tap_before_generating(tmp_path):
    result = subprocess.run([*PARITY, "diff", "--out", str(tmp_path / "out"), "--taps", "**.self_atn"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "matched nothing" in result.stderr and "self_attn" in result.stderr
    assert not (tmp_path / "out" / "target").exists()


def test_allow_and_tol_patterns_that_match_no_pair_are_errors(baseline_dump, bf16_dump):
    with pytest.raises(UsageError, match="--allow-failed pattern '\\*\\*.mpl' matched nothing"):
        compare(baseline_dump, bf16_dump, allow_failed=["**.mpl"])
    with pytest.raises(UsageError, match="--allow-missing pattern"):
        compare(baseline_dump, bf16_dump, allow_missing=["lm_haed"])
    with pytest.raises(UsageError) as info:
        compare(baseline_dump, bf16_dump, tol=["model.layer.*.mlp:rtol=1"])
    assert "closest model.layers.*.mlp" in info.value.one_line()
    assert compare(baseline_dump, bf16_dump, allow_failed=["**.mlp"]).verdict == "pass"


def test_a_profile_for_another_backend_says_it_applied_nothing(baseline_dump, bf16_dump, tmp_path):
    profile = tmp_path / "rocm.toml"
    profile.write_text('[[tolerance]]\npattern = "**"\nbackend = "rocm-*"\nrtol = 0.5\natol = 0.1\n')
    report = compare(baseline_dump, bf16_dump, profile=profile, backend="cuda-h100")
    assert any("none of its 1 entries applies" in n and "cuda-h100" in n for n in report.notes)
    applied = compare(baseline_dump, bf16_dump, profile=profile, backend="rocm-gfx950")
    assert not any("none of its" in n for n in applied.notes)
    assert applied.outcomes[0].tolerance.rtol == 0.5


def test_runs_of_different_inputs_are_refused_with_the_first_differing_token(fp32_model, baseline_dump, tmp_path):
    from parity.backends.hf import run_and_capture

    run_and_capture(fp32_model, ["2 + 2 =", "In the morning"], tmp_path / "a")
    run_and_capture(fp32_model, ["3 + 3 =", "In the morning"], tmp_path / "b")
    with pytest.raises(UsageError) as info:
        compare(tmp_path / "a", tmp_path / "b", decode=lambda i: fp32_model.tokenizer.decode([i]))
    message = info.value.one_line()
    assert "different inputs at step 0" in message and "position" in message and "--allow-incomparable" in message
    allowed = compare(tmp_path / "a", tmp_path / "b", allow_incomparable=True)
    assert any("different inputs at step 0" in n for n in allowed.notes)
    assert allowed.verdict == "fail"  # the embeddings of different tokens differ: reported, as asked
    result = subprocess.run([*PARITY, "compare", str(tmp_path / "a"), str(tmp_path / "b")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_runs_of_different_models_are_refused(baseline_dump, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(baseline_dump, other)
    manifest = other / "manifest-rank0.jsonl"
    lines = manifest.read_text().splitlines()
    header = json.loads(lines[0])
    header["model"] = {**header["model"], "config_sha256": "0123456789abcdef"}
    manifest.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(UsageError, match="different models"):
        compare(baseline_dump, other)
