"""The `parity` command as a user runs it: exit codes, one-line errors, outputs, start-up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PARITY = [sys.executable, "-m", "parity.cli"]


def run(*args: str, cwd: Path | None = None, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "COLUMNS"}, **env}
    return subprocess.run([*PARITY, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("[parity ")]  # progress
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "error" in lines[0] and needle in lines[0], lines[0]


def test_help_is_fast_to_import_no_torch_numpy_or_transformers():
    code = ("import sys\nfrom parity.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nheavy = [m for m in ('torch', 'numpy', 'transformers', 'safetensors') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert "parity diff" in result.stdout and "Exit codes" in result.stdout


@pytest.mark.parametrize("command", ["diff", "compare", "inspect", "explain", "inject", "calibrate", "matrix",
                                     "scores", "report", "watch"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout and len(result.stdout.splitlines()) > 5


def test_default_diff_runs_the_builtin_model_and_reports(tmp_path):
    default = run("diff", "--out", str(tmp_path / "out"), PARITY_PROGRESS_INTERVAL="0.2")
    assert default.returncode == 0, default.stdout + default.stderr  # bf16 sdpa is as good as bf16 can be
    # stderr is not a terminal: timed plain progress lines there, never in the report on stdout
    progress = [line for line in default.stderr.splitlines() if line.startswith("[parity ")]
    assert progress and any("loading baseline" in line for line in progress), default.stderr
    assert "[parity " not in default.stdout
    assert "bfloat16 sdpa is as accurate as bfloat16 eager" in " ".join(default.stdout.split())
    assert (tmp_path / "out" / "twin" / "manifest-rank0.jsonl").is_file()
    # with the twin off and the bare absolute floor, bf16 rounding exceeds the tolerance: exit 1
    result = run("diff", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"), "--no-twin",
                 "--atol", "0.01")
    assert result.returncode == 1, result.stderr
    assert not (tmp_path / "out" / "twin").exists()
    out = result.stdout
    assert "\x1b[" not in out  # plain text when stdout is not a terminal
    wide = max(len(line) for line in out.splitlines())  # not a terminal, no COLUMNS: nothing is cut
    narrow = run("compare", str(tmp_path / "out" / "baseline"), str(tmp_path / "out" / "target"), "--atol", "0.01",
                 COLUMNS="80")
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80 < wide
    assert "first divergence: model.layers." in out and "default for bfloat16" in out
    assert re.search(r"^FAIL: \d+ of 92 pairs passed", out, re.M)
    for name in ("report.json",):
        assert (tmp_path / "out" / name).is_file()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["verdict"] == "fail" and report["first_divergence"]["outcome"] == "fail"
    assert report["baseline"]["spec"]["dtype"] == "float32" and report["target"]["spec"]["attn"] == "sdpa"
    positions = report["first_divergence"]["positions"]
    assert positions["tokens"][0] == "<s>" and len(positions["tokens"]) == len(positions["max_abs"])
    # the same dumps compared with a tolerance that covers bf16 noise pass, exit 0
    again = run("compare", str(tmp_path / "out" / "baseline"), str(tmp_path / "out" / "target"),
                "--rtol", "0.5", "--atol", "0.1")
    assert again.returncode == 0, again.stdout
    assert "PASS: 92 of 92 pairs passed" in again.stdout
    # a second diff into the same --out replaces the earlier dumps
    assert run("diff", "--out", str(tmp_path / "out"), "--target", "dtype=float32,attn=eager").returncode == 0


def test_inspect_lists_records_with_stats(baseline_dump):
    result = run("inspect", str(baseline_dump), "--step", "0", "--name", "**.layers.1.*")
    assert result.returncode == 0, result.stderr
    assert "records: 92 in 4 steps" in result.stdout
    assert "model.layers.1.mlp" in result.stdout and "f32[1," in result.stdout
    assert "model.layers.2" not in result.stdout
    header = next(line for line in result.stdout.splitlines() if "dtype[shape]" in line)
    assert header.split()[-1] == "nan/inf/0"  # no column is cut when stdout is not a terminal


@pytest.mark.parametrize("args, needle", [
    (["compare", "/nonexistent/a", "/nonexistent/b"], "does not exist"),
    (["compare", "."], "Missing argument"),
    (["diff", "--target", "dtype=bf17"], "valid: bf16"),
    (["diff", "--baseline", "precision=fp32"], "valid keys"),
    (["diff", "--model", "/nonexistent/model"], "does not exist"),
    (["inspect", "/"], "not a parity dump"),
    (["compare", "--tol", "nocolon", ".", "."], "PATTERN:rtol"),
    (["bogus"], "No such command"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(args, needle):
    assert_one_line_error(run(*args), needle)


def test_bad_tolerance_options_and_empty_dump(baseline_dump, tmp_path):
    assert_one_line_error(run("compare", str(baseline_dump), str(baseline_dump), "--rtol", "-1"), "--rtol")
    bad = tmp_path / "tol.toml"
    bad.write_text("[[tolerance]]\npattern = 'x'\nrtl = 1\n")
    assert_one_line_error(run("compare", str(baseline_dump), str(baseline_dump), "--profile", str(bad)),
                          "unknown keys")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest-rank0.jsonl").write_text(
        json.dumps({"type": "header", "format_version": "1.0", "rank": 0, "world_size": 1}) + "\n")
    assert_one_line_error(run("compare", str(baseline_dump), str(empty)), "holds no records")
    future = tmp_path / "future"
    future.mkdir()
    (future / "manifest-rank0.jsonl").write_text(
        json.dumps({"type": "header", "format_version": "7.0", "rank": 0, "world_size": 1}) + "\n")
    assert_one_line_error(run("compare", str(baseline_dump), str(future)), "version 7.0")


def test_tolerance_file_applies_with_provenance(baseline_dump, bf16_dump, tmp_path):
    toml = tmp_path / "tol.toml"
    toml.write_text('[[tolerance]]\npattern = "**"\nrtol = 0.5\natol = 0.1\n'
                    'note = "bf16 noise on the tiny model, measured 2026-11"\n')
    result = run("compare", str(baseline_dump), str(bf16_dump), "--profile", str(toml), "--json",
                 str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stdout
    pair = json.loads((tmp_path / "r.json").read_text())["pairs"][0]
    assert pair["tolerance"] == {"rtol": 0.5, "atol": 0.1, "scale": 0.0, "floor": None,
                                 "source": "tol.toml: ** (bf16 noise on the tiny model, measured 2026-11)"}
