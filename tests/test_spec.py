"""The SPEC grammar users type on the command line: defaults, aliases, and clear errors."""

import pytest

from parity.backends.spec import Spec, parse_spec
from parity.errors import SpecError


def test_empty_spec_is_all_defaults():
    assert parse_spec("") == Spec(engine="hf", dtype="float32", attn="eager", compile=False, device="cpu",
                                  quant="none")
    assert parse_spec("engine=vllm,dtype=bf16") == Spec(engine="vllm", dtype="bfloat16")


def test_full_spec_with_aliases_and_spaces():
    spec = parse_spec(" dtype = bf16 , attn=sdpa, compile=1 ,device=cuda:1")
    assert (spec.dtype, spec.attn, spec.compile, spec.device) == ("bfloat16", "sdpa", True, "cuda:1")
    assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize("text, needle", [
    ("dtype=bf17", "valid: bf16, bfloat16"),
    ("precision=fp32", "valid keys: engine, dtype, attn, compile, device, quant"),
    ("quant=int4", "valid: none, int8wo, int8dyn"),
    ("engine=vllm,compile=1", "engine=vllm takes dtype, device and tp only"),
    ("attn=flash", "valid: eager, sdpa"),
    ("compile=yes", "valid: 0, 1"),
    ("dtype", "not KEY=VALUE"),
    ("dtype=fp32,dtype=bf16", "given twice"),
    ("dtype=fp32,,attn=eager", "empty item"),
    ("engine=sglang", "valid: hf, vllm"),
    ("device=tpu", "cpu, cuda, cuda:N"),
])
def test_bad_specs_name_the_valid_choices(text, needle):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert needle in str(info.value)
