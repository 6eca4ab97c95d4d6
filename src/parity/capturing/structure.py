"""Default taps found from a model's structure, for decoder stacks not named like Llama.

:data:`parity.capturing.taps.DECODER_LM_TAPS` names the transformers Llama layout
(``model.layers.N.self_attn``…). Other families name the same parts differently — GPT-2
(``transformer.h.N.ln_1/attn/ln_2/mlp``, ``transformer.ln_f``), GPT-NeoX
(``gpt_neox.layers.N.attention``, ``final_layer_norm``, ``lm_head``; transformers 4: ``embed_out``), Falcon, Phi, MPT….
:func:`structural_taps` finds them from the module tree instead of a table per family:

- the **layer stack**: the ``ModuleList`` with the most children (at least two), all of one class;
- per layer: the layer's output (element 0 of a tuple) and its direct children whose class name
  says norm (``*Norm*``), attention (``*Attention*``/``*Attn*``: element 0) or MLP
  (``*MLP*``/``*FeedForward*``/``*FFN*``); dropouts, rotary embeddings and the like are skipped;
- the embeddings (``nn.Embedding`` children of the stack's parent), the final norm (a norm
  child of the stack's parent) and the head (a ``Linear`` child of the root whose output is the
  vocabulary, or named ``lm_head``/``embed_out``).

Returns tap patterns (exact names, ``re:``-anchored) or None when the model has no such stack.
"""

from __future__ import annotations

import re
from typing import Any

#: Class-name fragments (lower case) of each part of a decoder layer.
KINDS = {"norm": ("norm",), "attention": ("attention", "attn"), "mlp": ("mlp", "feedforward", "ffn")}


def _kind(module: Any) -> str | None:
    name = type(module).__name__.lower()
    if "dropout" in name or "rotary" in name:
        return None
    for kind, fragments in KINDS.items():
        if any(f in name for f in fragments):
            return kind
    return None


def _exact(name: str, index: int | None = None) -> str:
    return f"re:{re.escape(name)}" + (f"[{index}]" if index is not None else "")


def structural_taps(model: Any) -> list[str] | None:
    """Tap patterns for the decoder stack of ``model`` (see the module docstring), or None."""
    import torch

    modules = dict(model.named_modules())
    stacks = [(name, m) for name, m in modules.items()
              if isinstance(m, torch.nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1]
    if not stacks:
        return None
    stack_name, stack = max(stacks, key=lambda item: len(item[1]))
    parent = stack_name.rsplit(".", 1)[0] if "." in stack_name else ""
    patterns: list[str] = []
    siblings = [(n, m) for n, m in modules.items() if n and (n.rsplit(".", 1)[0] if "." in n else "") == parent
                and n != stack_name]
    patterns += [_exact(n) for n, m in siblings if isinstance(m, torch.nn.Embedding)]
    for i, layer in enumerate(stack):
        prefix = f"{stack_name}.{i}" if stack_name else str(i)
        for child_name, child in layer.named_children():
            kind = _kind(child)
            if kind is not None:
                patterns.append(_exact(f"{prefix}.{child_name}", 0 if kind == "attention" else None))
        patterns.append(_exact(prefix, 0))
    patterns += [_exact(n) for n, m in siblings if _kind(m) == "norm"]
    vocab = next((m.num_embeddings for _, m in siblings if isinstance(m, torch.nn.Embedding)), None)
    for name, child in model.named_children():
        if isinstance(child, torch.nn.Linear) and (name in ("lm_head", "embed_out") or child.out_features == vocab):
            patterns.append(_exact(name))
    return patterns
