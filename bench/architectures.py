"""Every supported architecture, transformers fp32 against vLLM fp32, on tiny random-weight models.

    .venv/bin/python bench/architectures.py                  (all families, ~15-30 s each on 2 cores)
    .venv/bin/python bench/architectures.py --only gemma     (families whose name contains "gemma")

Per family a model is built from transformers' own config class (hidden 128, 3 layers, 4 heads of
32: vLLM's CPU attention needs head_dim 32..512; MoE: 4 experts, top-2; DeepSeek: MLA with
kv_lora_rank 512 and rope dim 64, the only shape vLLM's CPU MLA takes), with random weights (norm
weights drawn from [0.5, 1.5]) and the built-in tokenizer. transformers generates 8 greedy tokens
for each of the built-in prompts and captures the teacher-forced pass under canonical taps; vLLM
does the same on the same token ids (each family in its own process: one engine each). Printed,
one row per family: pairs passed, the worst relative L2 error over all pairs, the greedy token
match, the first divergence, the canonical taps the family does not map, seconds.

DeepSeek-V3: transformers' config lacks ``topk_method``/``scoring_func``, which vLLM reads; the
bench adds the original checkpoint's values ("noaux_tc", "sigmoid"), as the test fixture does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "src" / "parity" / "assets" / "tiny-llama"
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 64}
_MLA = {"num_key_value_heads": 4, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32,
        "q_lora_rank": None, "n_routed_experts": 4, "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1,
        "topk_group": 1, **_MOE}
#: config model_type -> what differs from the shared sizes (None: leave the key out).
FAMILIES: dict[str, dict] = {
    "llama": {}, "qwen2": {}, "mistral": {"head_dim": 32}, "qwen3": {"head_dim": 32},
    "qwen3_moe": {"head_dim": 32, "num_experts": 4, **_MOE},
    "qwen2_moe": {"num_experts": 4, "shared_expert_intermediate_size": 64, **_MOE},
    "mixtral": {"head_dim": 32, "num_local_experts": 4, "num_experts_per_tok": 2},
    "phi3": {}, "granite": {"logits_scaling": 4.0}, "glm4": {"head_dim": 32}, "olmo2": {}, "starcoder2": {},
    "gemma": {"head_dim": 32, "tie_word_embeddings": True},
    "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 32, "tie_word_embeddings": True},
    "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64, "tie_word_embeddings": True},
    "cohere": {"tie_word_embeddings": True},
    "gpt2": {"n_positions": 256, "num_key_value_heads": None, "intermediate_size": None, "tie_word_embeddings": True},
    "gpt_neox": {"num_key_value_heads": None},
    "deepseek_v2": _MLA, "deepseek_v3": _MLA,
}
#: Keys added to config.json after saving (what vLLM reads and transformers does not write).
CONFIG_PATCH = {"deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}}


def build(model_type: str, out: Path, *, config_patch: bool = True) -> Path:
    """Save a tiny random-weight model of ``model_type`` with the built-in tokenizer into ``out``;
    ``config_patch`` (default True) adds :data:`CONFIG_PATCH`'s keys to its config.json. Also the
    builder of ``tests/test_architectures.py``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=3,
                 tie_word_embeddings=False)
    merged = {**sizes, **FAMILIES[model_type]}
    config = AutoConfig.for_model(model_type, **{k: v for k, v in merged.items() if v is not None or k == "q_lora_rank"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, out / name)
    if config_patch and model_type in CONFIG_PATCH:
        config_path = out / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **CONFIG_PATCH[model_type]}))
    return out


def measure(model_type: str, work: Path, new_tokens: int) -> dict:
    """One family: build, run both engines, compare; the row as a dict."""
    import parity
    from parity.backends import vllm
    from parity.backends.hf import read_prompts
    from parity.backends.runner import capture_baseline
    from parity.backends.spec import parse_spec

    start = time.perf_counter()
    model = build(model_type, work / "model")
    prompts = read_prompts(None)

    def task(description, total=None):
        return lambda *args: None

    _, hf_gen, sequences = capture_baseline(model, parse_spec(""), prompts, work / "hf", new_tokens=new_tokens,
                                            canonical=True, taps=None, mode="full", task=task)
    side = vllm.load(model, parse_spec("engine=vllm,dtype=fp32"))
    vllm_gen = vllm.generate(side, prompts, new_tokens=new_tokens)
    vllm.capture_sequences(side, sequences, work / "vllm")
    report = parity.compare(work / "hf", work / "vllm")
    same = sum(a == b for g, h in zip(hf_gen, vllm_gen) for a, b in zip(g.tokens, h.tokens))
    total = sum(max(len(g.tokens), len(h.tokens)) for g, h in zip(hf_gen, vllm_gen))
    rel = [o.metrics.rel_l2 for o in report.outcomes if o.metrics is not None]
    first = report.first_divergence
    unmapped = sorted({re.sub(r"layers\.\d+", "layers.*", found.group(1)) for note in report.notes
                       if (found := re.search(r"canonical tap (\S+) is not provided", note))})
    return {"family": model_type, "passed": sum(o.ok for o in report.outcomes), "pairs": len(report.outcomes),
            "worst_rel_l2": max(rel) if rel else None, "token_match": same / total if total else 1.0,
            "first_divergence": first.name if first else None, "unmapped": unmapped,
            "seconds": round(time.perf_counter() - start, 1)}


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['family']} | error: {r['error']} | | | | | |"
    worst = f"{r['worst_rel_l2']:.1e}" if r["worst_rel_l2"] is not None else "-"
    return (f"| {r['family']} | {r['passed']}/{r['pairs']} | {worst} | {100 * r['token_match']:.0f}% | "
            f"{r['first_divergence'] or '-'} | {', '.join(r['unmapped']) or '-'} | {r['seconds']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="Only families whose model_type contains this.")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--json", default=None, help="Also write the rows as JSON here.")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one family
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print("ROW " + json.dumps(measure(args.one, Path(tmp), args.new_tokens)), flush=True)
        return 0
    families = [f for f in FAMILIES if args.only is None or args.only in f]
    rows = []
    print("| family | pairs passed | worst rel L2 | greedy token match | first divergence | unmapped taps | s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", cache),
               "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", cache)}
        for family in families:
            child = subprocess.run([sys.executable, __file__, "--one", family, "--new-tokens", str(args.new_tokens)],
                                   capture_output=True, text=True, env=env, timeout=900)
            found = [line[4:] for line in child.stdout.splitlines() if line.startswith("ROW ")]
            if found:
                row = json.loads(found[0])
            else:
                last = (child.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"family": family, "error": last[:160]}
            rows.append(row)
            print(_row(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
