"""Comparison verdicts on real runs of the tiny model: what a user relies on to find a divergence."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import parity
from parity.backends.hf import run_and_capture
from parity.capturing.session import CaptureSession
from parity.compare.engine import compare
from parity.compare.pairing import parse_rename
from parity.compare.tolerance import TolerancePolicy, parse_override
from parity.store.format import FORMAT_VERSION, Record, RunHeader, sample_positions
from parity.store.reader import load_run
from parity.store.writer import DumpWriter


#: The bfloat16 default with the absolute floor alone (an explicit atol has no scale floor).
PLAIN_BF16 = TolerancePolicy(atol=1e-2)


def test_identical_runs_pass_every_pair_with_zero_error(fp32_model, prompts, baseline_dump, tmp_path):
    again = tmp_path / "again"
    run_and_capture(fp32_model, prompts, again)
    report = compare(baseline_dump, again)
    assert report.verdict == "pass" and report.first_divergence is None
    assert len(report.outcomes) == 4 * 23
    for o in report.outcomes:
        assert o.kind == "identical"
        assert o.metrics.max_abs == 0.0 and o.metrics.rel_l2 == 0.0 and o.metrics.cosine == 1.0
        assert o.metrics.sqnr_db == float("inf")
    assert [layer.layer for layer in report.layers] == [0, 1, 2, 3]


def test_fp32_vs_bf16_reports_a_divergence_with_sane_numbers(baseline_dump, bf16_dump):
    report = compare(baseline_dump, bf16_dump, policy=PLAIN_BF16)
    assert report.verdict == "fail"
    first = report.first_divergence
    assert first is not None and first.kind == "fail" and first.step == 0
    assert first.tolerance.source == "--atol 0.01 (rest: default for bfloat16)" and first.tolerance.scale == 0
    assert first.worst_failing["excess"] > 1 and "worst element" in first.reason
    assert "dtypes differ (float32 vs bfloat16)" in first.notes[0]
    for o in report.outcomes:
        m = o.metrics
        # bf16 keeps ~3 significant digits: relative errors of 1e-3..5e-2, cosine close to 1
        assert 1e-4 < m.rel_l2 < 5e-2, (o.name, m.rel_l2)
        assert m.cosine > 0.999
        assert 20 < m.sqnr_db < 70
    # the smallest passing tolerance really passes
    m = first.metrics
    relaxed = TolerancePolicy(rtol=first.tolerance.rtol, atol=m.needed_atol)
    again = compare(baseline_dump, bf16_dump, policy=relaxed)
    same = next(o for o in again.outcomes if (o.name, o.step) == (first.name, first.step))
    assert same.kind == "pass"
    # error grows (weakly) along depth: the report shows it per layer
    assert report.layers[-1].rel_l2 >= report.layers[0].rel_l2


def test_fault_in_layer1_mlp_is_the_first_divergence(fp32_model, prompts, baseline_dump, tmp_path):
    model = fp32_model.model
    handle = model.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: out * 1.01)
    try:
        run_and_capture(fp32_model, prompts, tmp_path / "faulty")
    finally:
        handle.remove()
    report = compare(baseline_dump, tmp_path / "faulty")
    first = report.first_divergence
    assert (first.name, first.step, first.layer, first.kind) == ("model.layers.1.mlp", 0, 1, "fail")
    assert first.metrics.rel_l2 == pytest.approx(0.01, rel=1e-3)
    before = [o for o in report.outcomes if o.step == 0][:report.outcomes.index(first)]
    assert before and all(o.kind == "identical" and o.metrics.max_abs == 0 for o in before)
    # the depth profile shows where the error jumps
    assert report.layers[0].rel_l2 == 0.0 and report.layers[1].rel_l2 > 5e-3
    # and the first divergence comes with its error per token position
    positions = report.first_positions
    assert positions["axis"] == 1 and len(positions["token_ids"]) == first.baseline.shape[1]
    assert all(r == pytest.approx(0.01, rel=1e-3) for r in positions["rel_l2"])


def _drop(src: Path, dst: Path, names: set[str]) -> None:
    """Copy a dump, removing records by name from its manifest (their data stays on disk)."""
    shutil.copytree(src, dst)
    manifest = dst / "manifest-rank0.jsonl"
    lines = [line for line in manifest.read_text().splitlines()
             if not any(f'"name":"{n}"' in line for n in names)]
    manifest.write_text("\n".join(lines) + "\n")


def test_missing_records_on_either_side_fail_unless_allowed(baseline_dump, tmp_path):
    _drop(baseline_dump, tmp_path / "no_head", {"lm_head"})
    report = compare(baseline_dump, tmp_path / "no_head")
    missing = [o for o in report.outcomes if not o.ok]
    assert {o.kind for o in missing} == {"missing_in_target"} and len(missing) == 4
    assert report.verdict == "fail" and report.first_divergence.name == "lm_head"
    reverse = compare(tmp_path / "no_head", baseline_dump)
    assert {o.kind for o in reverse.outcomes if not o.ok} == {"missing_in_baseline"}
    assert reverse.verdict == "fail"
    allowed = compare(baseline_dump, tmp_path / "no_head", allow_missing=["lm_head"])
    assert allowed.verdict == "pass" and allowed.counts()["allowed"] == 4
    assert all(o.allowed for o in allowed.outcomes if o.kind == "missing_in_target")


def test_allow_failed_excuses_known_noisy_taps_only(baseline_dump, bf16_dump):
    report = compare(baseline_dump, bf16_dump, allow_failed=["**.layers.*.*layernorm", "model.norm", "**.layers.*"])
    remaining = [o for o in report.outcomes if not o.ok]
    assert all(not o.name.endswith("layernorm") for o in remaining)
    assert all(o.allowed for o in report.outcomes if o.name == "model.norm" and o.kind != "pass")


def test_tolerance_overrides_say_where_they_came_from(baseline_dump, bf16_dump):
    policy = TolerancePolicy(cli_overrides=[parse_override("**.mlp:rtol=0.5,atol=0.1")], rtol=0.2)
    report = compare(baseline_dump, bf16_dump, policy=policy)
    mlp = next(o for o in report.outcomes if o.name == "model.layers.0.mlp")
    assert (mlp.tolerance.rtol, mlp.tolerance.atol) == (0.5, 0.1)
    assert mlp.tolerance.source == "--tol **.mlp:rtol=0.5,atol=0.1"
    norm = next(o for o in report.outcomes if o.name == "model.norm")
    assert (norm.tolerance.rtol, norm.tolerance.atol) == (0.2, 0.01)
    assert "--rtol 0.2" in norm.tolerance.source and "default for bfloat16" in norm.tolerance.source


def test_rename_rules_pair_runs_whose_module_names_differ(baseline_dump, tmp_path):
    renamed = tmp_path / "renamed"
    shutil.copytree(baseline_dump, renamed)
    manifest = renamed / "manifest-rank0.jsonl"
    manifest.write_text(manifest.read_text().replace('"name":"model.layers.', '"name":"decoder.blocks.'))
    unpaired = compare(baseline_dump, renamed)
    assert unpaired.verdict == "fail"
    paired = compare(baseline_dump, renamed, renames=[parse_rename(r"^decoder\.blocks\.=model.layers.")])
    assert paired.verdict == "pass"


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    writer = DumpWriter(path, RunHeader(format_version=FORMAT_VERSION), durable=False)
    writer.open()
    for order, (name, tensor) in enumerate(tensors.items()):
        writer.add(Record(name=name, step=0, rank=0, order=order, shape=tuple(tensor.shape),
                          dtype=str(tensor.dtype).removeprefix("torch."), file=None, key=name,
                          stats={}, tags={}), tensor.contiguous())
    writer.close()


def test_shape_nonfinite_and_degenerate_outcomes(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    _write(tmp_path / "b", {"squeezable": x, "shape": x, "nan": x, "zeros": x, "const": x, "ok": x})
    nan = x.clone()
    nan[2, 3] = float("nan")
    _write(tmp_path / "t", {"squeezable": x[None], "shape": x[:4], "nan": nan, "zeros": torch.zeros_like(x),
                            "const": torch.full_like(x, 0.5), "ok": x + 1e-7})
    report = compare(tmp_path / "b", tmp_path / "t")
    kinds = {o.name: o.kind for o in report.outcomes}
    assert kinds == {"squeezable": "identical", "shape": "shape_mismatch", "nan": "nonfinite",
                     "zeros": "degenerate", "const": "degenerate", "ok": "pass"}
    by = {o.name: o for o in report.outcomes}
    assert "size-1 dims" in by["squeezable"].notes[0]
    assert "[5, 8]" in by["shape"].reason and "[4, 8]" in by["shape"].reason
    assert "target is all zeros" in by["zeros"].reason
    assert by["nan"].metrics.nan_target == 1 and by["nan"].metrics.nonfinite_mismatch == 1
    assert report.first_divergence.name == "shape"


def test_report_json_is_complete_and_strict(baseline_dump, bf16_dump):
    import json

    data = json.loads(json.dumps(compare(baseline_dump, bf16_dump, policy=PLAIN_BF16).to_json(), allow_nan=False))
    assert data["summary"]["verdict"] == "fail"
    first = data["first_divergence"]
    assert {"name", "step", "rank", "outcome", "metrics", "tolerance", "needed", "layer"} <= set(first)
    assert len(data["pairs"]) == data["summary"]["pairs"] == 92
    assert data["tolerance"]["rule"].startswith("|t - b| <= max(atol, rtol * |b|, scale * rms(b))")
    assert first["worst_failing"]["excess"] > 1 and first["tolerance"]["scale"] == 0
    assert data["layers"][0]["layer"] == 0


def test_statistics_only_dumps_find_the_fault_and_say_so(fp32_model, prompts, tmp_path):
    run_and_capture(fp32_model, prompts, tmp_path / "base", mode="stats")
    run_and_capture(fp32_model, prompts, tmp_path / "same", mode="stats")
    assert not list((tmp_path / "base" / "data" / "rank0").glob("*.safetensors"))  # no tensor data
    same = compare(tmp_path / "base", tmp_path / "same")
    assert same.verdict == "pass" and same.statistics_based
    handle = fp32_model.model.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: out * 1.01)
    try:
        run_and_capture(fp32_model, prompts, tmp_path / "faulty", mode="stats")
    finally:
        handle.remove()
    report = compare(tmp_path / "base", tmp_path / "faulty")
    first = report.first_divergence
    assert (first.name, first.kind, first.statistics_based) == ("model.layers.1.mlp", "fail", True)
    assert "statistics-based" in first.reason and first.stats["l2"]["ok"] is False
    assert report.to_json()["summary"]["statistics_based"] is True
    assert report.layers[1].rel_l2 == pytest.approx(0.01, rel=1e-3)


def test_statistics_only_samples_catch_a_permutation_where_the_statistics_cannot(fp32_model, prompts, tmp_path):
    # Layer 1's MLP output with its hidden channels reversed: the same min/max/mean/l2/zero
    # counts, other values. The statistics only notice it downstream; the sampled elements at it.
    def permuted(sample: int, out: Path) -> None:
        handle = fp32_model.model.model.layers[1].mlp.register_forward_hook(lambda mod, args, o: o.flip(-1))
        try:
            with parity.capture(fp32_model.model, out, mode="stats", sample=sample):
                for text in prompts:
                    fp32_model.model(fp32_model.tokenizer(text, return_tensors="pt").input_ids)
        finally:
            handle.remove()

    def clean(sample: int, out: Path) -> None:
        with parity.capture(fp32_model.model, out, mode="stats", sample=sample):
            for text in prompts:
                fp32_model.model(fp32_model.tokenizer(text, return_tensors="pt").input_ids)

    for sample in (0, 32):
        clean(sample, tmp_path / f"base{sample}")
        permuted(sample, tmp_path / f"perm{sample}")
    sampled = load_run(tmp_path / "base32").records[0]
    assert len(sampled.stats["sample"]) == 32 and "sample" not in load_run(tmp_path / "base0").records[0].stats

    blind = compare(tmp_path / "base0", tmp_path / "perm0")
    mlp = next(o for o in blind.outcomes if o.name == "model.layers.1.mlp")
    assert mlp.kind == "pass" and blind.first_divergence.name != "model.layers.1.mlp"

    seen = compare(tmp_path / "base32", tmp_path / "perm32")
    first = seen.first_divergence
    assert (first.name, first.kind, first.statistics_based) == ("model.layers.1.mlp", "fail", True)
    assert "sampled elements outside tolerance" in first.reason
    assert first.stats["sample"]["size"] == 32 and first.stats["sample"]["mismatched"] > 0
    assert all(first.stats[key]["ok"] for key in ("l2", "mean", "min", "max", "abs_max"))
    same = compare(tmp_path / "base32", tmp_path / "base32")
    assert same.verdict == "pass" and "32 sampled elements are within" in same.outcomes[0].reason


def test_a_full_dump_against_a_statistics_only_one_compares_the_sample_from_the_data(
        fp32_model, prompts, baseline_dump, tmp_path):
    handle = fp32_model.model.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: out.flip(-1))
    try:
        run_and_capture(fp32_model, prompts, tmp_path / "perm", mode="stats")
    finally:
        handle.remove()
    report = compare(baseline_dump, tmp_path / "perm")
    first = report.first_divergence
    assert (first.name, first.kind, first.statistics_based) == ("model.layers.1.mlp", "fail", True)
    assert first.stats["sample"]["mismatched"] > 0
    for direction in ((baseline_dump, tmp_path / "same"), (tmp_path / "same", baseline_dump)):
        if not (tmp_path / "same").exists():
            run_and_capture(fp32_model, prompts, tmp_path / "same", mode="stats")
        same = compare(*direction)
        assert same.verdict == "pass" and all(o.stats["sample"]["ok"] for o in same.outcomes)


def _stats_dump(out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    session = CaptureSession(out, mode="stats")
    session.next_step()
    for name, tensor in tensors.items():
        session.record(name, tensor)
    session.end_step()
    session.close()
    assert session.error is None
    return out


def test_sample_positions_spread_over_the_last_axis_and_catch_swapped_heads(tmp_path):
    # [tokens, hidden] activations: the sample must not sit in one column (as i * numel // k
    # would whenever k divides the number of rows), or reordered heads go unseen.
    for shape in [(1, 256, 4096), (4, 256, 4096), (32, 128, 128), (1, 100, 4096)]:
        positions = sample_positions(int(np.prod(shape)), 32)
        assert len({p % shape[-1] for p in positions}) == 32
        assert positions == sorted(set(positions)) and positions[-1] < int(np.prod(shape))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 4096, generator=g)
    heads = x.view(1, 256, 32, 128)
    swapped = heads[:, :, [0, 2, 1, *range(3, 32)]].reshape(1, 256, 4096)  # heads 1 and 2 swapped
    reversed_heads = heads.flip(2).reshape(1, 256, 4096)
    base = _stats_dump(tmp_path / "base", {"attn": x, "attn2": x})
    target = _stats_dump(tmp_path / "target", {"attn": swapped, "attn2": reversed_heads})
    report = compare(base, target)
    for outcome in report.outcomes:
        assert outcome.kind == "fail" and outcome.statistics_based, outcome.reason
        assert all(outcome.stats[key]["ok"] for key in ("l2", "mean", "min", "max", "abs_max"))
        assert outcome.stats["sample"]["mismatched"] > 0


def test_statistics_report_json_stays_valid_with_overflowing_values(tmp_path):
    import json

    from parity.report.json_report import write_json

    big = torch.tensor([1.7e308, 1.5e308, 0.0, 1.0], dtype=torch.float64)
    base = _stats_dump(tmp_path / "base", {"x": big})
    target = _stats_dump(tmp_path / "target", {"x": -big})
    report = compare(base, target)
    assert report.verdict == "fail" and report.outcomes[0].stats["sample"]["max_abs"] == float("inf")
    write_json(report, tmp_path / "r.json")
    json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))


def test_large_pairs_take_the_compiled_path_with_the_reference_results(tmp_path):
    from parity.compare import engine, fastpath
    from parity.compare.metrics import pair_metrics

    if not fastpath.available():
        pytest.skip("numba is not installed: large pairs use the numpy reference")
    g = torch.Generator().manual_seed(1)
    base = torch.randn(512, 256, generator=g)
    target = base + 1e-4 * torch.randn(512, 256, generator=g)
    assert base.numel() >= engine.FAST_MIN_ELEMENTS
    _write(tmp_path / "b", {"big": base, "big16": base.bfloat16()})
    _write(tmp_path / "t", {"big": target, "big16": target.bfloat16()})
    report = compare(tmp_path / "b", tmp_path / "t")
    for outcome, (b, bd, t, td) in zip(report.outcomes, [
            (base.numpy(), "float32", target.numpy(), "float32"),
            (base.bfloat16().view(torch.int16).numpy().view(np.uint16), "bfloat16",
             target.bfloat16().view(torch.int16).numpy().view(np.uint16), "bfloat16")]):
        ref = pair_metrics(b, bd, t, td, rtol=outcome.tolerance.rtol, atol=outcome.tolerance.effective_atol)
        got = outcome.metrics
        assert (got.mismatched, got.max_abs, got.max_abs_index, got.needed_atol, got.needed_rtol) == (
            ref.mismatched, ref.max_abs, ref.max_abs_index, ref.needed_atol, ref.needed_rtol)
        assert got.rel_l2 == pytest.approx(ref.rel_l2, rel=1e-9)
