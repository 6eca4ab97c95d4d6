"""A pair whose float dtypes differ while both runs declare one dtype is its own outcome,
``dtype_mismatch``; runs declared at two precisions (float32 vs bfloat16) compare across dtypes
as before, with a note."""

from __future__ import annotations

import pytest
import torch

import parity

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _capture(model, spec: str):
    with torch.no_grad(), parity.capture(model, spec=spec) as session:
        model(IDS)
    return session


@pytest.fixture(scope="module")
def bf16_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()


def test_an_upcast_tap_in_one_of_two_bf16_runs_is_a_dtype_mismatch(bf16_model):
    base = _capture(bf16_model, "dtype=bfloat16,attn=eager")
    handle = bf16_model.lm_head.register_forward_hook(lambda m, a, out: out.float())  # logits upcast
    try:
        target = _capture(bf16_model, "dtype=bfloat16,attn=eager")
    finally:
        handle.remove()
    report = parity.compare(base, target)
    mismatched = [o for o in report.outcomes if o.kind == "dtype_mismatch"]
    assert [o.name for o in mismatched] == ["lm_head"]
    assert report.first_divergence.name == "lm_head"
    assert "baseline bfloat16, target float32, while both runs are declared bfloat16" in mismatched[0].reason
    assert "values: identical" in mismatched[0].reason  # the upcast itself is exact: the values still say so
    assert report.to_json()["summary"]["outcomes"]["dtype_mismatch"] == 1
    excused = parity.compare(base, target, allow_failed=["lm_head"])
    assert excused.verdict == "pass"


def test_runs_declared_at_two_precisions_compare_across_dtypes(bf16_model, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    report = parity.compare(_capture(fp32, "dtype=float32,attn=eager"), _capture(bf16_model, "dtype=bfloat16,attn=eager"))
    assert not any(o.kind == "dtype_mismatch" for o in report.outcomes)
    assert any("dtypes differ (float32 vs bfloat16)" in note for o in report.outcomes for note in o.notes)
