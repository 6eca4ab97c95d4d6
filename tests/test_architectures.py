"""HF <-> vLLM canonical taps beyond Llama: tiny random-weight models of other families.

Built locally from transformers' own configs (hidden 128, head_dim 32: vLLM's CPU attention
needs head_dim >= 32), with the built-in tokenizer. Per family: transformers fp32 against vLLM
fp32 passes on every mapped tap; vLLM on a copy whose layer-1 post-attention norm weight is
scaled by 1.01 is found at ``layers.1.post_attn_norm``; MoE routers are compared as top-k expert
sets (all equal at fp32). Families: qwen3_moe (MoE, q/k norms),
mixtral (vLLM names its MoE block ``block_sparse_moe``),
granite (vLLM's decoder layer returns one tensor; residual and logits multipliers), olmo2
(post-norms: no input norm to map).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOKENIZER = Path(__file__).resolve().parent.parent / "src" / "parity" / "assets" / "tiny-llama"
EXTRA = {"qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "head_dim": 32},
         "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 32},
         "granite": {"head_dim": 32}, "olmo2": {"head_dim": 32}}


def _build(model_type: str, out: Path, scale_norm: float | None = None) -> Path:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=512, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=3,
                                  tie_word_embeddings=False, **EXTRA[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norm weights: a scaled norm changes its output everywhere
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, out / name)
    if scale_norm is not None:
        weights = load_file(out / "model.safetensors")
        key = "model.layers.1.post_attention_layernorm.weight"
        weights[key] = weights[key] * scale_norm
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _parity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "granite", "olmo2"])
def test_hf_vs_vllm_canonical_taps_pass_and_localize_a_fault(tmp_path, model_type):
    from parity.backends.vllm import available

    if reason := available():
        pytest.skip(f"vLLM not available: {reason}")
    good = _build(model_type, tmp_path / "good")
    bad = _build(model_type, tmp_path / "bad", scale_norm=1.01)
    same = _parity("diff", "--model", str(good), "--target", "engine=vllm,dtype=fp32", "--new-tokens", "0",
                   "--out", str(tmp_path / "a"), "--json", str(tmp_path / "a.json"))
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["summary"]["pairs"] >= 12 * 3  # every layer's taps, on every prompt
    routers = [p for p in report["pairs"] if p["name"].endswith(".router")]
    if model_type in ("qwen3_moe", "mixtral"):  # MoE: both engines' router logits, top-2 sets all equal
        assert len({p["name"] for p in routers}) == 3
        assert all(p["routing"]["k"] == 2 and p["routing"]["agree"] == 1.0 for p in routers)
    else:
        assert not routers
    faulty = _parity("diff", "--model", str(bad), "--target", "engine=vllm,dtype=fp32", "--new-tokens", "0",
                     "--out", str(tmp_path / "b"))
    assert faulty.returncode == 0, faulty.stderr[-3000:]  # vLLM agrees with transformers on the bad weights too
    found = _parity("compare", str(tmp_path / "a" / "baseline"), str(tmp_path / "b" / "target"), "--allow-incomparable",
                    "--json", str(tmp_path / "c.json"))
    assert found.returncode == 1, found.stdout[-3000:] + found.stderr[-3000:]
    first = json.loads((tmp_path / "c.json").read_text())["first_divergence"]
    assert (first["name"], first["step"]) == ("layers.1.post_attn_norm", 0), first
