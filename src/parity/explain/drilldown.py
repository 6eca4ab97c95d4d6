"""One level inside the culprit: its children, attention operations, norm eps, weights.

For the named module, on the prompt where its local error was largest:

- **children**: each direct child of the target's module is replayed on the baseline child's
  main input (as in :mod:`parity.explain.rootcause`) — which projection or activation makes the
  error;
- **attention operations** (Llama-style attention with q/k/v/o projections, ``head_dim``,
  ``scaling``): the computation is decomposed — projections, rotary, QKᵀ·scale, + mask,
  softmax, P·V, output projection — and run for the baseline's and the target's module on the
  same (baseline) input; each step's relative L2 error says which step introduces the error.
  The decomposition is checked against the module's own output first and skipped, with a
  note, when it does not reproduce it;
- **automatic findings** (incident 5's checklist): attention scale ≠ 1/√d_k or different
  between the runs; masks containing NaN or +inf, or rows masked entirely (softmax of all −inf
  is NaN); NaN in softmax output; norm ``eps`` (``variance_epsilon`` / ``eps``) that differs
  between the runs; parameters that differ beyond casting the baseline's to the target dtype
  (quantized or different weights).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from parity.compare.tolerance import TolerancePolicy
from parity.explain.recorder import ModuleIO, record_forward, replay
from parity.explain.rootcause import _dtype, rel_l2


def _children_errors(baseline: Any, target: Any, name: str, ids: torch.Tensor,
                     policy: TolerancePolicy) -> tuple[list[dict[str, Any]], ModuleIO, ModuleIO]:
    b_mod = dict(baseline.model.named_modules())[name]
    children = [f"{name}.{c}" for c, _ in b_mod.named_children()]
    rec_b = record_forward(baseline.model, [name, *children], input_ids=ids, use_cache=False)
    rec_t = record_forward(target.model, [name, *children], input_ids=ids, use_cache=False)
    t_modules = dict(target.model.named_modules())
    rows = []
    for child in children:
        b_io, t_io = rec_b.modules.get(child), rec_t.modules.get(child)
        if b_io is None or t_io is None or b_io.input is None or b_io.out is None:
            continue
        local = replay(t_modules[child], t_io, b_io.input)
        rows.append({"name": child, "module": type(t_modules[child]).__name__,
                     "local_rel_l2": rel_l2(b_io.out, local), "inherited_rel_l2": rel_l2(b_io.input, t_io.input),
                     "passed_on_rel_l2": rel_l2(b_io.out, t_io.out)})
    return rows, rec_b.modules[name], rec_t.modules[name]


def _attention_steps(module: torch.nn.Module, io: ModuleIO, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    dtype = module.q_proj.weight.dtype
    x = x.to(dtype)
    batch, seq, _ = x.shape
    hd = module.head_dim
    with torch.inference_mode():
        q = module.q_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
        k = module.k_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
        v = module.v_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
        cos, sin = io.kwargs["position_embeddings"]
        q_r, k_r = apply_rotary_pos_emb(q, k, cos.to(dtype), sin.to(dtype))
        k_r, v_r = repeat_kv(k_r, module.num_key_value_groups), repeat_kv(v, module.num_key_value_groups)
        scores = torch.matmul(q_r, k_r.transpose(2, 3)) * module.scaling
        mask = io.kwargs.get("attention_mask")
        if mask is None:  # the sdpa path passes none: causal
            mask = torch.full((seq, seq), float("-inf"), dtype=scores.dtype).triu(1)[None, None]
        masked = scores + mask[..., :seq].to(scores.dtype)
        probs = torch.softmax(masked, dim=-1, dtype=torch.float32).to(dtype)
        pv = torch.matmul(probs, v_r)
        out = module.o_proj(pv.transpose(1, 2).reshape(batch, seq, -1))
    return {"q_proj": q, "k_proj": k, "v_proj": v, "rotary (q)": q_r, "QK^T * scale": scores,
            "+ mask": masked, "softmax": probs, "P @ V": pv, "o_proj": out}


def _is_attention(module: torch.nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))


def _eps(module: torch.nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _findings(b_mod: torch.nn.Module, t_mod: torch.nn.Module, name: str, t_io: ModuleIO,
              steps: dict[str, Any] | None) -> list[str]:
    found: list[str] = []
    b_eps, t_eps = _eps(b_mod), _eps(t_mod)
    if b_eps is not None and t_eps is not None and b_eps != t_eps:
        found.append(f"{type(t_mod).__name__} eps differs: baseline {b_eps:g}, target {t_eps:g} ({name})")
    if _is_attention(t_mod):
        for label, mod in (("baseline", b_mod), ("target", t_mod)):
            expected = 1 / math.sqrt(mod.head_dim)
            if abs(mod.scaling / expected - 1) > 1e-6:
                found.append(f"{label} attention scale is {mod.scaling:.6g}, not 1/sqrt(d_k) = {expected:.6g} "
                             f"(d_k = {mod.head_dim})")
        if b_mod.scaling != t_mod.scaling:
            found.append(f"attention scale differs: baseline {b_mod.scaling:.6g}, target {t_mod.scaling:.6g}")
        mask = t_io.kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():
            if torch.isnan(mask).any():
                found.append("the attention mask contains NaN")
            if torch.isposinf(mask).any():
                found.append("the attention mask contains +inf: -inf + inf gives NaN in the scores")
            if bool(torch.isneginf(mask).all(dim=-1).any()):
                found.append("some attention rows are masked entirely: softmax of all -inf is NaN")
        if steps is not None and bool(torch.isnan(steps["target"]["softmax"]).any()):
            found.append("the target's softmax output contains NaN")
    b_params = dict(b_mod.named_parameters())
    for pname, t_param in t_mod.named_parameters():
        b_param = b_params.get(pname)
        if b_param is None or b_param.shape != t_param.shape:
            continue
        cast = b_param.detach().to(t_param.dtype)
        if not torch.equal(cast, t_param.detach()):
            diff = (t_param.detach().double() - b_param.detach().double()).abs().max().item()
            found.append(f"parameter {name}.{pname} differs beyond the cast to {_dtype(t_param)}: "
                         f"max |Δ| {diff:.3g} (quantized or different weights)")
    return found


def drill_down(baseline: Any, target: Any, name: str, ids: torch.Tensor, policy: TolerancePolicy) -> dict[str, Any]:
    """Children errors, attention operation errors and findings for module ``name`` (JSON-ready)."""
    children, b_io, t_io = _children_errors(baseline, target, name, ids, policy)
    b_mod = dict(baseline.model.named_modules())[name]
    t_mod = dict(target.model.named_modules())[name]
    result: dict[str, Any] = {"module": name, "children": children, "operations": None, "findings": [],
                              "notes": []}
    steps = None
    if _is_attention(t_mod) and "position_embeddings" in t_io.kwargs and b_io.input is not None:
        try:
            b_steps = _attention_steps(b_mod, b_io, b_io.input)
            t_steps = _attention_steps(t_mod, t_io, b_io.input)
            check = rel_l2(b_io.out, b_steps["o_proj"])
            if check is None or check > 1e-3:
                result["notes"].append(f"the attention decomposition does not reproduce {name}'s output "
                                       f"(rel L2 {check}); operation-level drill-down skipped")
            else:
                steps = {"baseline": b_steps, "target": t_steps}
                ops = []
                for op in b_steps:
                    b_val = b_steps[op].masked_fill(torch.isinf(b_steps[op]), 0) if op == "+ mask" else b_steps[op]
                    t_val = t_steps[op].masked_fill(torch.isinf(t_steps[op]), 0) if op == "+ mask" else t_steps[op]
                    ops.append({"op": op, "rel_l2": rel_l2(b_val, t_val)})
                jumps = [(o["rel_l2"] or 0) / max(p["rel_l2"] or 0, 1e-300) if i else float("inf")
                         for i, (o, p) in enumerate(zip(ops, [ops[0], *ops[:-1]]))]
                worst = max(range(len(ops)), key=lambda i: ((ops[i]["rel_l2"] or 0) > 0,
                                                           jumps[i] if (ops[i]["rel_l2"] or 0) > 0 else 0))
                result["operations"] = ops
                result["introduced_by"] = ops[worst]["op"] if (ops[worst]["rel_l2"] or 0) > 0 else None
        except Exception as exc:  # an attention variant this decomposition does not know
            result["notes"].append(f"operation-level drill-down skipped: {type(exc).__name__}: {exc}")
    result["findings"] = _findings(b_mod, t_mod, name, t_io, steps)
    return result
