"""Verdicts on real trained weights: SmolLM2-135M-Instruct (30 layers, residual values up to ~2e4).

The model is built by ``make real-model`` (``make test`` does it first) into ``.models/smollm2-135m``
(``PARITY_REAL_MODEL`` overrides the folder); where it is absent the tests skip and say how to
build it. Two prompts teacher-forced, so the module runs in well under a minute on two cores.
The full table (more pairs, more faults, explain, the smallest fault per dtype) is
``bench/verdicts_real_model.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from parity.backends.hf import load, run_and_capture
from parity.backends.spec import parse_spec
from parity.compare.engine import compare

pytestmark = pytest.mark.xdist_group("real-model")

REAL_MODEL = Path(os.environ.get("PARITY_REAL_MODEL", Path(__file__).resolve().parent.parent / ".models" / "smollm2-135m"))
PROMPTS = ["The capital of France is", "In the morning the sky was clear and"]


@pytest.fixture(scope="module")
def real_dir() -> Path:
    if not (REAL_MODEL / "model.safetensors").is_file():
        pytest.skip(f"real model not built at {REAL_MODEL}: run `make real-model`")
    return REAL_MODEL


@pytest.fixture(scope="module")
def dumps(real_dir, tmp_path_factory):
    """Captures of the real model: fp32 eager (baseline), bf16 eager (twin) and the sides under test."""
    root = tmp_path_factory.mktemp("real")

    def run(name: str, spec: str, fault=None) -> Path:
        if (root / name).is_dir():  # captured by an earlier test of this module
            return root / name
        side = load(real_dir, parse_spec(spec))
        if fault is not None:
            fault(side.model)
        run_and_capture(side, PROMPTS, root / name)
        return root / name

    return run


def test_benign_fp32_kernel_differences_pass_without_a_failing_tap(dumps):
    base = dumps("base", "dtype=float32,attn=eager")
    report = compare(base, dumps("sdpa", "dtype=float32,attn=sdpa"))
    assert report.verdict == "pass" and not [o for o in report.outcomes if not o.ok]
    assert len(report.outcomes) == 2 * 153
    # the absolute floor alone false-alarms on these weights: the reason for the scale floor
    from parity.compare.tolerance import TolerancePolicy

    assert compare(base, dumps("sdpa2", "dtype=float32,attn=sdpa"), policy=TolerancePolicy(atol=1e-5)).verdict == "fail"


def test_bf16_is_within_precision_noise_of_its_twin(dumps):
    base, twin = dumps("base", "dtype=float32,attn=eager"), dumps("twin", "dtype=bfloat16,attn=eager")
    target = dumps("bf16", "dtype=bfloat16,attn=sdpa")
    assert compare(base, target).verdict == "fail"  # bf16 at depth exceeds any elementwise tolerance
    report = compare(base, target, twin=twin)
    assert report.verdict == "pass", report.headline
    assert sum(o.kind == "noise" for o in report.outcomes) > 100
    assert report.headline.startswith("bfloat16 sdpa is as accurate as bfloat16 eager")


def test_a_small_fp32_fault_is_found_at_its_tap(dumps):
    base = dumps("base", "dtype=float32,attn=eager")

    def shift(model):
        model.model.layers[8].mlp.register_forward_hook(lambda m, a, out: out * (1 + 1e-4))

    report = compare(base, dumps("shift", "dtype=float32,attn=sdpa", shift))
    first = report.first_divergence
    assert report.verdict == "fail" and first.name == "model.layers.8.mlp", first.reason
    assert first.kind == "anomalous"  # within its own tolerance; the error jumps there


def test_a_one_percent_fault_in_a_bf16_target_is_found_at_its_tap(dumps):
    base, twin = dumps("base", "dtype=float32,attn=eager"), dumps("twin", "dtype=bfloat16,attn=eager")

    def zero_row(model):
        import torch

        with torch.no_grad():
            model.model.layers[6].mlp.gate_proj.weight[0].zero_()

    report = compare(base, dumps("gate", "dtype=bfloat16,attn=eager", zero_row), twin=twin)
    first = report.first_divergence
    assert report.verdict == "fail" and (first.name, first.kind) == ("model.layers.6.mlp", "anomalous")
