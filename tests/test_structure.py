"""Default taps for decoder stacks not named like Llama: found from the module tree.

Tiny random-weight GPT-2 and GPT-NeoX models built from transformers' own configs (no download):
every part of every layer is tapped, and a fault injected into one layer's MLP is the first
divergence, at that MLP.
"""

from __future__ import annotations

import pytest
import torch

import parity
from parity.capturing.taps import model_taps


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=2, vocab_size=120, bos_token_id=0,
                                      eos_token_id=0)).eval()


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=2,
                                            intermediate_size=128, vocab_size=120, bos_token_id=0,
                                            eos_token_id=0)).eval()


def test_gpt2_and_gpt_neox_default_taps_cover_every_layer_part():
    gpt2 = set(model_taps(_gpt2(), None))
    assert {"transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"} <= gpt2
    assert all({f"transformer.h.{i}", f"transformer.h.{i}.ln_1", f"transformer.h.{i}.attn", f"transformer.h.{i}.ln_2",
                f"transformer.h.{i}.mlp"} <= gpt2 for i in range(3))
    neox = set(model_taps(_neox(), None))
    assert {"gpt_neox.embed_in", "gpt_neox.final_layer_norm"} <= neox
    assert all({f"gpt_neox.layers.{i}.attention", f"gpt_neox.layers.{i}.mlp",
                f"gpt_neox.layers.{i}.input_layernorm"} <= neox for i in range(3))
    assert not any("dropout" in name or "rotary" in name for name in gpt2 | neox)


@pytest.mark.parametrize("build, mlp", [(_gpt2, "transformer.h.1.mlp"), (_neox, "gpt_neox.layers.1.mlp")])
def test_a_fault_in_one_mlp_is_the_first_divergence_there(tmp_path, build, mlp):
    model = build()
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 64]])
    with torch.no_grad(), parity.capture(model, tmp_path / "base"):
        model(ids)
    module = dict(model.named_modules())[mlp]
    handle = module.register_forward_hook(lambda m, a, out: out * 1.01)
    with torch.no_grad(), parity.capture(model, tmp_path / "target"):
        model(ids)
    handle.remove()
    report = parity.compare(tmp_path / "base", tmp_path / "target")
    assert report.verdict == "fail" and report.first_divergence.name == mlp
    passed = {o.name for o in report.outcomes if o.ok}
    assert any(name.endswith(".attn") or name.endswith(".attention") for name in passed)  # earlier taps agree
