"""The verdict on real runs of the tiny model: scale floor, grades, the precision-aware twin rule."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from parity.backends.hf import load, run_and_capture
from parity.backends.runner import twin_spec
from parity.backends.spec import parse_spec
from parity.compare.engine import compare
from parity.compare.metrics import worst_failing_element
from parity.compare.tolerance import TolerancePolicy, parse_override
from parity.compare.verdict import TwinEvidence, grade_with_twin
from parity.store.format import FORMAT_VERSION, Record, RunHeader
from parity.store.writer import DumpWriter
from parity.testing import assert_close

PLAIN_BF16 = TolerancePolicy(atol=1e-2)  # the bf16 default without its scale floor


@pytest.fixture(scope="module")
def bf16_eager_model(tiny_model_dir):
    return load(tiny_model_dir, parse_spec("dtype=bfloat16,attn=eager"))


@pytest.fixture(scope="module")
def twin_dump(bf16_eager_model, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("twin") / "twin"
    run_and_capture(bf16_eager_model, prompts, out)
    return out


def _write(path, tensors):
    writer = DumpWriter(path, RunHeader(format_version=FORMAT_VERSION), durable=False)
    writer.open()
    for order, (name, tensor) in enumerate(tensors.items()):
        writer.add(Record(name=name, step=0, rank=0, order=order, shape=tuple(tensor.shape),
                          dtype=str(tensor.dtype).removeprefix("torch."), file=None, key=name, stats={}, tags={}),
                   tensor.contiguous())
    writer.close()


def test_scale_floor_passes_rounding_noise_near_zero_but_not_a_relative_fault(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 576, generator=g)
    base[:, 7] *= 1e4  # a massive-activation channel: the tensor's scale is far above most elements
    noise = base + 2e-5 * base.pow(2).mean().sqrt() * torch.randn(64, 576, generator=g)  # matmul-like noise
    fault = base.clone()
    fault[:, 100:110] *= 1 + 1e-3  # a 0.1% change of a few ordinary channels
    _write(tmp_path / "b", {"x": base})
    _write(tmp_path / "noise", {"x": noise})
    _write(tmp_path / "fault", {"x": base.clone()})
    _write(tmp_path / "fault2", {"x": fault})
    ok = compare(tmp_path / "b", tmp_path / "noise")
    assert ok.verdict == "pass" and ok.outcomes[0].kind == "pass"
    plain = compare(tmp_path / "b", tmp_path / "noise", policy=TolerancePolicy(atol=1e-5))
    assert plain.verdict == "fail"  # an explicit atol means exactly that: no scale floor
    assert compare(tmp_path / "b", tmp_path / "fault").outcomes[0].kind == "identical"
    # the floor is relative to the whole tensor: a 0.1% change of ordinary channels passes only
    # because the massive channel sets the scale; the same fault in a tensor without it fails
    calm = base.clone()
    calm[:, 7] /= 1e4
    calm_fault = calm.clone()
    calm_fault[:, 100:110] *= 1 + 1e-3
    _write(tmp_path / "cb", {"x": calm})
    _write(tmp_path / "cf", {"x": calm_fault})
    failed = compare(tmp_path / "cb", tmp_path / "cf").outcomes[0]
    assert failed.kind == "fail" and failed.tolerance.floor is not None
    assert all(100 <= failed.worst_failing["index"][1] < 110 for _ in [0])


def test_worst_failing_element_is_not_the_largest_difference():
    b = np.array([1000.0, 0.01, 5.0], dtype=np.float32)
    t = np.array([1000.5, 0.02, 5.0], dtype=np.float32)  # |Δ| 0.5 passes at rtol 1e-3; 0.01 fails
    worst = worst_failing_element(b, "float32", t, "float32", rtol=1e-3, atol=1e-3)
    assert worst["index"] == [1] and worst["excess"] == pytest.approx(10, rel=1e-3)
    assert worst_failing_element(b, "float32", b, "float32", rtol=0, atol=0) is None


def test_twin_rule_grades():
    evidence = TwinEvidence(distance=0.01, noise=0.008, bound=0.018, m=2, eps=0.002, target_error=0.012,
                            twin_error=0.008, low_dtype="bfloat16")
    assert grade_with_twin(evidence, within_tolerance=False, identical=False, earlier_all_equal=False)[0] == "noise"
    assert grade_with_twin(evidence, within_tolerance=True, identical=False, earlier_all_equal=False)[0] == "pass"
    assert grade_with_twin(evidence, within_tolerance=True, identical=True, earlier_all_equal=True)[0] == "identical"
    first = grade_with_twin(evidence, within_tolerance=True, identical=False, earlier_all_equal=True)
    assert first[0] == "anomalous" and "first departure" in first[1]  # 0.01 = 2.6 bf16 unit roundoffs
    far = TwinEvidence(distance=0.05, noise=0.008, bound=0.018, m=2, eps=0.002, target_error=0.05,
                       twin_error=0.008, low_dtype="bfloat16")
    assert grade_with_twin(far, within_tolerance=False, identical=False, earlier_all_equal=False)[0] == "fail"
    assert grade_with_twin(far, within_tolerance=True, identical=False, earlier_all_equal=False)[0] == "anomalous"


def test_twin_spec_is_the_baselines_settings_at_the_other_precision():
    fp32, bf16_sdpa = parse_spec("dtype=float32,attn=eager"), parse_spec("dtype=bfloat16,attn=sdpa")
    assert twin_spec(fp32, bf16_sdpa) == parse_spec("dtype=bfloat16,attn=eager")
    assert twin_spec(parse_spec("dtype=bfloat16"), bf16_sdpa) == parse_spec("dtype=float32")
    assert twin_spec(fp32, parse_spec("quant=int8wo")) == parse_spec("quant=int8wo")
    assert twin_spec(fp32, parse_spec("attn=sdpa")) is None
    assert twin_spec(bf16_sdpa, fp32) is None


def test_bf16_target_within_precision_noise_of_its_twin_passes(baseline_dump, bf16_dump, twin_dump):
    plain = compare(baseline_dump, bf16_dump, policy=PLAIN_BF16)
    assert plain.verdict == "fail"
    report = compare(baseline_dump, bf16_dump, policy=PLAIN_BF16, twin=twin_dump)
    assert report.verdict == "pass" and report.first_divergence is None
    kinds = {o.kind for o in report.outcomes}
    assert "noise" in kinds and kinds <= {"identical", "pass", "noise"}
    noisy = next(o for o in report.outcomes if o.kind == "noise")
    assert noisy.twin.distance <= noisy.twin.bound and "within precision noise" in noisy.reason
    assert report.headline.startswith("bfloat16 sdpa is as accurate as bfloat16 eager")
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data["summary"]["noise"] > 0 and data["twin"]["spec"]["dtype"] == "bfloat16"
    assert "distance" in next(p for p in data["pairs"] if p["outcome"] == "noise")["twin"]


def test_fault_in_a_bf16_target_is_its_first_departure_from_the_twin(baseline_dump, twin_dump, tiny_model_dir,
                                                                    prompts, tmp_path):
    faulty = load(tiny_model_dir, parse_spec("dtype=bfloat16,attn=eager"))
    faulty.model.model.layers[2].mlp.register_forward_hook(lambda m, a, out: out * 1.015)
    run_and_capture(faulty, prompts, tmp_path / "faulty")
    report = compare(baseline_dump, tmp_path / "faulty", twin=twin_dump)
    first = report.first_divergence
    assert report.verdict == "fail" and (first.name, first.kind) == ("model.layers.2.mlp", "anomalous")
    assert first.twin.first_departure and first.twin.roundoffs > 2
    # without the twin, the bf16 default tolerance does not localize it (bf16 noise comes first or nothing fails)
    plain = compare(baseline_dump, tmp_path / "faulty").first_divergence
    assert plain is None or plain.name != "model.layers.2.mlp"


def test_compare_and_diff_commands_take_the_twin(baseline_dump, bf16_dump, twin_dump, tmp_path):
    run = [sys.executable, "-m", "parity.cli"]
    result = subprocess.run([*run, "compare", str(baseline_dump), str(bf16_dump), "--atol", "0.01", "--twin",
                             str(twin_dump)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "within precision noise" in result.stdout and "twin:" in result.stdout
    bad = subprocess.run([*run, "compare", str(baseline_dump), str(bf16_dump), "--twin", str(twin_dump),
                          "--twin-m", "0.5"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_assert_close_with_a_twin_accepts_precision_noise_only():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(256, 128, generator=g) / 16
    expected = x @ w  # fp32 reference
    ours = (x.bfloat16() @ w.bfloat16())  # the kernel under test, bf16
    trusted = (x.bfloat16().float() @ w.bfloat16().float()).bfloat16()  # another bf16 backend
    with pytest.raises(AssertionError, match="Worst failing element"):
        assert_close(ours, expected, rtol=1e-3, atol=1e-3)
    assert_close(ours, expected, rtol=1e-3, atol=1e-3, twin=trusted)
    with pytest.raises(AssertionError, match="Twin rule"):
        assert_close(ours * 1.05, expected, rtol=1e-3, atol=1e-3, twin=trusted)


def test_first_divergence_is_where_the_error_jumps_not_where_it_first_fails(baseline_dump, tiny_model_dir,
                                                                          prompts, tmp_path):
    """A change too small to fail at its own tap, amplified into a failure downstream, is found at its tap."""
    from parity.compare.verdict import locate_jump

    faulty = load(tiny_model_dir, parse_spec("dtype=float32,attn=eager"))
    faulty.model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, a, out: out * (1 + 5e-5))
    run_and_capture(faulty, prompts, tmp_path / "faulty")
    # with a tolerance looser at the faulted tap than after it, the error first fails downstream
    policy = TolerancePolicy(cli_overrides=[parse_override("model.layers.1.self_attn:rtol=1e-3,atol=1e-3")],
                             rtol=1e-5, atol=1e-7)
    report = compare(baseline_dump, tmp_path / "faulty", policy=policy)
    first = report.first_divergence
    assert (first.name, first.kind) == ("model.layers.1.self_attn", "anomalous")
    assert "the error jumps here" in first.reason and "grows into the failure at" in first.reason
    assert first.metrics.mismatched == 0  # within its own tolerance: only the jump names it
    failing = next(o for o in report.outcomes if o.kind == "fail")
    assert report.outcomes.index(failing) > report.outcomes.index(first)
    # a passing run is never changed: identical runs have no jump to find
    assert locate_jump(compare(baseline_dump, baseline_dump).outcomes, 0) is None


def test_a_doctored_stored_norm_cannot_loosen_the_scale_floor(baseline_dump, tiny_model_dir, prompts, tmp_path):
    """The floor's RMS is read from the stored l2 only when the data confirms it."""
    import shutil

    faulty = load(tiny_model_dir, parse_spec("dtype=float32,attn=eager"))
    faulty.model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: out * 1.01)
    run_and_capture(faulty, prompts, tmp_path / "faulty")
    doctored = tmp_path / "doctored"
    shutil.copytree(baseline_dump, doctored)
    manifest = doctored / "manifest-rank0.jsonl"
    lines = []
    for line in manifest.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("type") == "record" and isinstance(entry.get("stats", {}).get("l2"), float):
            entry["stats"]["l2"] *= 1e6  # a floor a million times looser would pass everything
        lines.append(json.dumps(entry))
    manifest.write_text("\n".join(lines) + "\n")
    honest = compare(baseline_dump, tmp_path / "faulty").first_divergence
    report = compare(doctored, tmp_path / "faulty")
    first = report.first_divergence
    assert first is not None and (first.name, first.kind) == (honest.name, honest.kind) == ("model.layers.1.mlp", "fail")
    assert first.tolerance.floor == pytest.approx(honest.tolerance.floor, rel=1e-9)  # from the data, not the file
