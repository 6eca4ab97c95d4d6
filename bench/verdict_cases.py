"""The cases of ``bench/verdicts_real_model.py``: benign pairs and injected faults on a real model.

Each case is a target run of the real model (SmolLM2-135M-Instruct by default) captured
teacher-forced on the baseline's sequences (the built-in prompts plus the fp32 eager baseline's
16 greedy tokens), with the tap where a fault is injected. A fault is applied to the loaded
model in memory (weights, attributes or a forward hook); the same patched model is then what
``parity explain`` replays.

Faults (layer indices chosen to vary the depth):

=================  =====  ==================================================================
case               dtype  what is changed
=================  =====  ==================================================================
norm-eps-l0        fp32   RMSNorm eps of layer 0's input norm 1e-5 -> 1e-6
softmax-scale-l10  fp32   attention scaling of layer 10 x1.01
int8-down-l12      fp32   layer 12's mlp.down_proj weight through an int8 round trip (per row)
zero-oproj-l20     fp32   layer 20's self_attn.o_proj returns zeros
rope-theta         fp32   rotary inverse frequencies computed with theta 1e4 instead of 1e5
mlp-shift-l8       fp32   layer 8's MLP output x(1 + 3e-4)
gate-row-l6        bf16   one row of layer 6's mlp.gate_proj zeroed (a 1-3% change of that MLP)
=================  =====  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Case:
    """One target: SPEC, optional fault (applied to the loaded model), the tap it must be found at."""

    name: str
    spec: str
    fault: Callable[[Any], None] | None = None
    expect: str | None = None  # the tap of the first divergence (None: benign, must pass)
    threads: int | None = None  # torch.set_num_threads for this side (None: leave as is)
    canonical: bool = False  # compared with the canonically captured baseline (vLLM sides)
    baseline: str = "baseline"  # the dump compared against: "baseline" (fp32 eager) or "twin-bf16" (bf16 eager)


def _layers(model: Any) -> Any:
    return model.model.layers


def norm_eps(layer: int, eps: float) -> Callable[[Any], None]:
    def apply(model: Any) -> None:
        _layers(model)[layer].input_layernorm.variance_epsilon = eps
    return apply


def softmax_scale(layer: int, factor: float) -> Callable[[Any], None]:
    def apply(model: Any) -> None:
        attn = _layers(model)[layer].self_attn
        attn.scaling = attn.scaling * factor
    return apply


def int8_round_trip(layer: int, proj: str) -> Callable[[Any], None]:
    def apply(model: Any) -> None:
        import torch

        linear = getattr(_layers(model)[layer].mlp, proj)
        with torch.no_grad():
            w = linear.weight
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            w.copy_(torch.round(w / scale).clamp(-127, 127) * scale)
    return apply


def zero_output(layer: int) -> Callable[[Any], None]:
    def apply(model: Any) -> None:
        _layers(model)[layer].self_attn.o_proj.register_forward_hook(lambda m, a, out: out * 0)
    return apply


def rope_theta(theta: float) -> Callable[[Any], None]:
    def apply(model: Any) -> None:
        import torch

        rotary = model.model.rotary_emb
        inv = rotary.inv_freq
        dim = 2 * inv.numel()
        new = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        rotary.inv_freq = new.to(inv.dtype)
        if hasattr(rotary, "original_inv_freq"):
            rotary.original_inv_freq = rotary.inv_freq
    return apply


def scale_mlp(layer: int, factor: float) -> Callable[[Any], None]:
    def apply(model: Any) -> None:
        _layers(model)[layer].mlp.register_forward_hook(lambda m, a, out: out * factor)
    return apply


def zero_gate_row(layer: int, row: int) -> Callable[[Any], None]:
    def apply(model: Any) -> None:
        import torch

        with torch.no_grad():
            _layers(model)[layer].mlp.gate_proj.weight[row].zero_()
    return apply


BENIGN = [
    Case("fp32 eager vs sdpa", "dtype=float32,attn=sdpa"),
    Case("fp32 threads 1 vs 2", "dtype=float32,attn=eager", threads=1),
    Case("fp32 compile=1", "dtype=float32,attn=eager,compile=1"),
    Case("HF vs vLLM fp32", "engine=vllm,dtype=float32", canonical=True),
    Case("fp32 vs bf16 eager (twin)", "dtype=bfloat16,attn=eager"),
    Case("fp32 vs bf16 sdpa (twin)", "dtype=bfloat16,attn=sdpa"),
    Case("bf16 eager vs bf16 sdpa (fp32 twin)", "dtype=bfloat16,attn=sdpa", baseline="twin-bf16"),
]
FAULTS = [
    Case("norm eps L0 1e-5->1e-6", "dtype=float32,attn=eager", norm_eps(0, 1e-6), "model.layers.0.input_layernorm"),
    Case("softmax scale x1.01 L10", "dtype=float32,attn=eager", softmax_scale(10, 1.01), "model.layers.10.self_attn"),
    Case("int8 round trip down_proj L12", "dtype=float32,attn=eager", int8_round_trip(12, "down_proj"),
         "model.layers.12.mlp"),
    Case("o_proj output zero L20", "dtype=float32,attn=eager", zero_output(20), "model.layers.20.self_attn"),
    Case("rope theta 1e5->1e4", "dtype=float32,attn=eager", rope_theta(1e4), "model.layers.0.self_attn"),
    Case("MLP x(1+3e-4) L8", "dtype=float32,attn=eager", scale_mlp(8, 1 + 3e-4), "model.layers.8.mlp"),
    Case("bf16 eager: gate_proj row zero L6", "dtype=bfloat16,attn=eager", zero_gate_row(6, 0), "model.layers.6.mlp"),
    Case("bf16 sdpa: gate_proj row zero L17", "dtype=bfloat16,attn=sdpa", zero_gate_row(17, 0), "model.layers.17.mlp"),
]
