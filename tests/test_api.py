"""The Python API as the README shows it: ``parity.compare`` stays callable, tolerances from Python."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_parity_compare_is_callable_after_any_subpackage_import(baseline_dump, bf16_dump):
    code = ("import parity, parity.testing, parity.compare.engine\n"
            "from parity import compare\n"
            f"first = parity.compare({str(baseline_dump)!r}, {str(bf16_dump)!r})\n"
            f"again = compare({str(baseline_dump)!r}, {str(bf16_dump)!r}, atol=0.01)\n"
            "print('OK', first.verdict, again.verdict, sorted(dir(parity)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "OK pass fail" in result.stdout  # the scale floor passes bf16 here; the bare atol does not
    assert "['__version__', 'capture', 'compare', 'dump', 'load_run', 'next_step']" in result.stdout


def test_tolerances_from_python_match_the_command_line(baseline_dump, bf16_dump, tmp_path):
    import parity
    from parity.errors import UsageError

    report = parity.compare(baseline_dump, bf16_dump, tol="**.mlp:rtol=0.5,atol=0.1", atol=0.01)
    by_name = {o.name: o for o in report.outcomes if o.step == 0}
    assert by_name["model.layers.0.mlp"].tolerance.source == "--tol **.mlp:rtol=0.5,atol=0.1"
    assert by_name["model.norm"].tolerance.atol == 0.01 and by_name["model.norm"].tolerance.scale == 0
    profile = tmp_path / "p.toml"
    profile.write_text('[[tolerance]]\npattern = "**"\nrtol = 0.5\natol = 0.1\nbackend = "rocm"\n')
    assert parity.compare(baseline_dump, bf16_dump, profile=profile, backend="rocm").outcomes[0].tolerance.rtol == 0.5
    with pytest.raises(UsageError):
        parity.compare(baseline_dump, bf16_dump, rtol=-1)
    with pytest.raises(UsageError):
        from parity.compare.tolerance import TolerancePolicy

        parity.compare(baseline_dump, bf16_dump, policy=TolerancePolicy(), rtol=0.1)


def test_python_api_dumps_with_a_spec_string_and_model_path_can_be_explained(tiny_model_dir, prompts, tmp_path):
    from parity.backends.hf import load
    from parity.backends.spec import parse_spec

    import parity

    for name, spec in (("base", "dtype=float32,attn=eager"), ("target", "dtype=bfloat16,attn=sdpa")):
        loaded = load(tiny_model_dir, parse_spec(spec))
        ids = loaded.tokenizer(prompts[0], return_tensors="pt").input_ids
        with parity.capture(loaded.model, tmp_path / name, spec=spec, model_info={"path": str(tiny_model_dir)}):
            loaded.model(input_ids=ids)
    assert parity.load_run(tmp_path / "target").header.spec["dtype"] == "bfloat16"
    result = subprocess.run([sys.executable, "-m", "parity.cli", "explain", str(tmp_path / "base"),
                             str(tmp_path / "target")], capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stderr  # explained (not refused for a missing spec or model)
    assert "error per module" in result.stdout


def test_in_memory_captures_compare_exactly_like_dumps(tiny_model_dir, prompts, tmp_path):
    """Notebook use: capture into memory, compare two such captures; the report is the one the
    same captures give as dumps on disk (paths and times aside)."""
    from parity.backends.hf import load
    from parity.backends.spec import parse_spec
    from parity.errors import UsageError

    import parity

    memory, disk = {}, {}
    for name, spec in (("base", "dtype=float32,attn=eager"), ("target", "dtype=bfloat16,attn=sdpa")):
        loaded = load(tiny_model_dir, parse_spec(spec))
        ids = loaded.tokenizer(prompts[0], return_tensors="pt").input_ids
        with parity.capture(loaded.model, spec=spec) as memory[name]:
            loaded.model(input_ids=ids)
            with pytest.raises(UsageError, match="still running"):
                memory[name].run
        with parity.capture(loaded.model, tmp_path / name, spec=spec) as disk[name]:
            loaded.model(input_ids=ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "target"]  # in memory: no directory
    in_memory = parity.compare(memory["base"], memory["target"].run, atol=0.01)
    on_disk = parity.compare(tmp_path / "base", tmp_path / "target", atol=0.01)
    assert in_memory.verdict == on_disk.verdict == "fail" and len(in_memory.outcomes) == 23

    def comparable(report):
        data = report.to_json()
        for side in ("baseline", "target"):
            data[side] = {k: v for k, v in data[side].items() if k not in ("path", "created")}
        return data
    assert comparable(in_memory) == comparable(on_disk)
    assert in_memory.to_json()["baseline"]["path"] == "<in memory>"
    # the same records, statistics and step metadata as the dump read back from disk
    disk_run = disk["base"].run
    without_file = [{**r.__dict__, "file": None} for r in memory["base"].run.records]
    assert without_file == [{**r.__dict__, "file": None} for r in disk_run.records]
    assert memory["base"].run.steps == disk_run.steps
    with pytest.raises(UsageError, match="in-memory runs compare in one process"):
        parity.compare(memory["base"], memory["target"], workers=2)
    with pytest.raises(UsageError, match="not int"):
        parity.compare(memory["base"], 3)


def test_error_distributions_for_the_first_divergence_or_for_every_pair(baseline_dump, bf16_dump):
    import parity

    default = parity.compare(baseline_dump, bf16_dump, atol=0.01)
    with_dist = [o for o in default.outcomes if o.distribution]
    assert [o.name for o in with_dist] == [default.first_divergence.name]
    d = with_dist[0].distribution
    assert d["abs"]["p50"] <= d["abs"]["p90"] <= d["abs"]["p99"] <= d["abs"]["max"]
    assert d["downcast"]["dtype"] == "bfloat16" and 0 < d["downcast"]["equal_share"] <= 1
    every = parity.compare(baseline_dump, bf16_dump, atol=0.01, distributions=True)
    assert all(o.distribution for o in every.outcomes if o.metrics is not None)
    assert every.to_json()["pairs"][0]["distribution"]["elements"] > 0


def test_in_memory_runs_report_a_shape_mismatch():
    """Shapes that differ between two in-memory captures are an outcome, not an error about files."""
    import torch

    import parity

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    sessions = []
    for size in (3, 5):
        with parity.capture(model) as session:
            parity.dump("probe", torch.zeros(size))
        sessions.append(session)
    report = parity.compare(*sessions)
    assert [o.kind for o in report.outcomes if o.name == "probe"] == ["shape_mismatch"]
