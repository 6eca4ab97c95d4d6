"""A tensor-parallel Llama on CPU (torch.distributed, gloo): a real multi-rank run to compare.

Megatron-style sharding of a transformers Llama checkpoint over the ranks of the default
process group: embeddings and norms replicated; q/k/v and gate/up column-parallel (heads and
intermediate channels split across ranks); o_proj and down_proj row-parallel, each followed by
an all-reduce; lm_head column-parallel over the vocabulary. Module names follow transformers
(``model.layers.0.self_attn``...), so the canonical taps of :mod:`parity.align.canonical` apply
unchanged. What each canonical tap holds on a rank, hence its sharding annotation
(:data:`SHARDING`):

- ``layers.{i}.attn``: the rank's partial o_proj output, *before* the all-reduce (``sum``);
- ``layers.{i}.mlp``: the down_proj output *after* the all-reduce (``replicated``);
- ``logits``: the rank's vocabulary slice (``split:-1``); everything else ``replicated``.

Tokens are packed (``[num_tokens]``, as serving engines run them) with ``seq_lens``: each
sequence attends causally to itself only; tokens past ``sum(seq_lens)`` are padding (attend to
themselves only, never seen by real tokens), like the padding an empty data-parallel rank adds.

Run it (one dump directory for all ranks)::

    torchrun --standalone --nproc-per-node 2 -m parity.parallel.tp_llama --out dumps/tp2

Options (defaults in brackets): ``--model DIR`` [the built-in tiny Llama], ``--prompt TEXT``
(repeatable) [``The quick brown fox``], ``--pad N`` [0] padding tokens appended to the step,
``--dtype`` [float32], ``--fault SITE:LAYER:RANK`` [none] — the all-reduce after ``SITE``
(``attn`` or ``mlp``) of layer ``LAYER`` returns zeros on rank ``RANK`` (the failure of
incident 3), ``--stats-only`` statistics instead of tensors, ``--threads`` [1] torch threads per
rank. One forward pass (step) per prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from parity.errors import ParityError

#: Sharding of the canonical taps of this model (see the module docstring).
SHARDING: dict[str, str] = {
    "embeddings": "replicated",
    "layers.*.input_norm": "replicated",
    "layers.*.attn": "sum",
    "layers.*.post_attn_norm": "replicated",
    "layers.*.mlp": "replicated",
    "layers.*": "replicated",
    "final_norm": "replicated",
    "logits": "split:-1",
}


class Fault:
    """Replace one all-reduce's result by zeros on one rank (``site`` attn|mlp, ``layer``, ``rank``)."""

    def __init__(self, site: str, layer: int, rank: int) -> None:
        self.site, self.layer, self.rank = site, layer, rank

    @classmethod
    def parse(cls, text: str) -> "Fault":
        """``SITE:LAYER:RANK``."""
        site, layer, rank = text.split(":")
        if site not in ("attn", "mlp"):
            raise ValueError(f"fault site must be attn or mlp, not {site!r}")
        return cls(site, int(layer), int(rank))


def all_reduce(x: torch.Tensor, *, site: str, layer: int, fault: Fault | None) -> torch.Tensor:
    """Sum ``x`` over the ranks (out of place); zeros instead when ``fault`` hits this call."""
    out = x.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    if fault is not None and (fault.site, fault.layer) == (site, layer) and dist.get_rank() == fault.rank:
        out = torch.zeros_like(out)
    return out


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Column-parallel q/k/v (this rank's heads), row-parallel o_proj; returns (partial, None)."""

    def __init__(self, cfg: dict[str, Any], w: dict[str, torch.Tensor], prefix: str, rank: int, world: int) -> None:
        super().__init__()
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        if heads % world or kv_heads % world:
            raise ValueError(f"{heads} heads / {kv_heads} kv heads do not split over {world} ranks")
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        self.heads, self.kv_heads = heads // world, kv_heads // world
        d = self.head_dim

        def rows(name: str, n: int) -> nn.Linear:
            full = w[f"{prefix}.{name}.weight"]
            return _linear(full[rank * n * d:(rank + 1) * n * d])

        self.q_proj, self.k_proj, self.v_proj = rows("q_proj", self.heads), rows("k_proj", self.kv_heads), rows(
            "v_proj", self.kv_heads)
        o = w[f"{prefix}.o_proj.weight"]
        self.o_proj = _linear(o[:, rank * self.heads * d:(rank + 1) * self.heads * d])
        theta = float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d),
                             persistent=False)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        t, d = hidden.shape[0], self.head_dim
        q = self.q_proj(hidden).view(t, self.heads, d).transpose(0, 1)
        k = self.k_proj(hidden).view(t, self.kv_heads, d).transpose(0, 1)
        v = self.v_proj(hidden).view(t, self.kv_heads, d).transpose(0, 1)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(0, 1).reshape(t, self.heads * d)
        return self.o_proj(out), None


class MLP(nn.Module):
    """Column-parallel gate/up, row-parallel down followed by the all-reduce (output replicated)."""

    def __init__(self, w: dict[str, torch.Tensor], prefix: str, rank: int, world: int, layer: int,
                 fault: Fault | None) -> None:
        super().__init__()
        inter = w[f"{prefix}.gate_proj.weight"].shape[0]
        if inter % world:
            raise ValueError(f"intermediate size {inter} does not split over {world} ranks")
        n = inter // world
        self.gate_proj = _linear(w[f"{prefix}.gate_proj.weight"][rank * n:(rank + 1) * n])
        self.up_proj = _linear(w[f"{prefix}.up_proj.weight"][rank * n:(rank + 1) * n])
        self.down_proj = _linear(w[f"{prefix}.down_proj.weight"][:, rank * n:(rank + 1) * n])
        self.layer, self.fault = layer, fault

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return all_reduce(partial, site="mlp", layer=self.layer, fault=self.fault)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], w: dict[str, torch.Tensor], i: int, rank: int, world: int,
                 fault: Fault | None) -> None:
        super().__init__()
        prefix = f"model.layers.{i}"
        eps = cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(w[f"{prefix}.input_layernorm.weight"], eps)
        self.self_attn = Attention(cfg, w, f"{prefix}.self_attn", rank, world)
        self.post_attention_layernorm = RMSNorm(w[f"{prefix}.post_attention_layernorm.weight"], eps)
        self.mlp = MLP(w, f"{prefix}.mlp", rank, world, i, fault)
        self.index, self.fault = i, fault

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        partial, _ = self.self_attn(self.input_layernorm(hidden), positions, mask)
        hidden = hidden + all_reduce(partial, site="attn", layer=self.index, fault=self.fault)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Model(nn.Module):
    def __init__(self, cfg: dict[str, Any], w: dict[str, torch.Tensor], rank: int, world: int,
                 fault: Fault | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(w["model.embed_tokens.weight"], freeze=True)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w, i, rank, world, fault)
                                    for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(w["model.norm.weight"], cfg["rms_norm_eps"])


class TPLlamaForCausalLM(nn.Module):
    """The Llama of a transformers checkpoint, sharded over ``world`` ranks; this is rank ``rank``.

    ``forward(input_ids=[T], positions=[T], seq_lens=[n])`` returns this rank's logits slice
    ``[T, vocab / world]``.
    """

    def __init__(self, cfg: dict[str, Any], weights: dict[str, torch.Tensor], rank: int, world: int,
                 fault: Fault | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, weights, rank, world, fault)
        lm = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
        if lm.shape[0] % world:
            raise ValueError(f"vocabulary {lm.shape[0]} does not split over {world} ranks")
        n = lm.shape[0] // world
        self.lm_head = _linear(lm[rank * n:(rank + 1) * n])

    @staticmethod
    def mask(seq_lens: Sequence[int], total: int) -> torch.Tensor:
        """Causal within each sequence; padding tokens (past ``sum(seq_lens)``) see only themselves."""
        segment = torch.empty(total, dtype=torch.long)
        start = 0
        for index, length in enumerate(seq_lens):
            segment[start:start + length] = index
            start += length
        segment[start:] = torch.arange(len(seq_lens), len(seq_lens) + total - start)
        causal = torch.ones(total, total, dtype=torch.bool).tril()
        return causal & (segment[:, None] == segment[None, :])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: Sequence[int]) -> torch.Tensor:
        mask = self.mask(list(seq_lens), input_ids.shape[0])
        hidden = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            hidden = layer(hidden, positions, mask)
        return self.lm_head(self.model.norm(hidden))


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    return layer


def load(model_dir: str | Path, rank: int, world: int, *, dtype: torch.dtype = torch.float32,
         fault: Fault | None = None) -> TPLlamaForCausalLM:
    """This rank's shard of the Llama checkpoint in ``model_dir`` (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    path = Path(model_dir)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{path} is a {cfg.get('model_type')!r} model; the TP model implements llama only")
    weights = {k: v.to(dtype) for k, v in load_file(str(path / "model.safetensors")).items()}
    return TPLlamaForCausalLM(cfg, weights, rank, world, fault).eval()


def packed_step(sequences: Sequence[Sequence[int]], pad: int, pad_id: int) -> dict[str, Any]:
    """Packed inputs of one step: ids and positions of every sequence, then ``pad`` padding tokens."""
    ids = [t for seq in sequences for t in seq] + [pad_id] * pad
    positions = [p for seq in sequences for p in range(len(seq))] + [0] * pad
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "positions": torch.tensor(positions),
            "seq_lens": [len(seq) for seq in sequences]}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``torchrun ... -m parity.parallel.tp_llama`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="parity.parallel.tp_llama", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt", action="append", default=None)
    parser.add_argument("--pad", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--fault", default=None, type=Fault.parse)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stats-only", action="store_true")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from parity.align.canonical import rules_for
    from parity.backends.hf import model_identity, resolve_model_dir
    from parity.capturing.canonical_hooks import capture_canonical

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        path = resolve_model_dir(args.model)
        try:
            model = load(path, rank, world, dtype=getattr(torch, args.dtype), fault=args.fault)
        except (ValueError, ParityError) as exc:  # a layout that cannot split: one line, from rank 0 only
            if rank == 0:
                text = exc.one_line() if isinstance(exc, ParityError) else str(exc)
                print(f"tp_llama: {text}", file=sys.stderr)
            return 2
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompts = args.prompt or ["The quick brown fox"]
        spec = {"engine": "tp_llama", "dtype": args.dtype, "tp": world, "pad": args.pad,
                "fault": None if args.fault is None else f"{args.fault.site}:{args.fault.layer}:{args.fault.rank}"}
        rules = rules_for("hf", "llama")
        assert rules is not None
        pad_id = model.config.get("pad_token_id") or 0
        with capture_canonical(model, args.out, rules, num_layers=model.config["num_hidden_layers"], spec=spec,
                               mode="stats" if args.stats_only else "full",
                               model_info={**model_identity(path), "architecture": "llama"},
                               sharding=SHARDING) as session:  # layout: one tensor-parallel group (the default)
            with torch.inference_mode():
                for prompt in prompts:
                    model(**packed_step([tokenizer(prompt).input_ids], args.pad, pad_id))
        if session.error is not None:
            print(f"tp_llama: capture failed on rank {rank}: {session.error}", file=sys.stderr)
            return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
