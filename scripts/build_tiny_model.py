"""Build parity's built-in fixture model: a tiny Llama trained on a small corpus.

Run from the repository root:

    .venv/bin/python scripts/build_tiny_model.py            # writes src/parity/assets/tiny-llama/
    .venv/bin/python scripts/build_tiny_model.py --out DIR  # writes somewhere else

Defaults:

* training text  : src/parity/assets/corpus.txt (original prose, ~4 KB)
* prompts        : src/parity/assets/prompts.txt (first line is used for the final check)
* output folder  : src/parity/assets/tiny-llama/
* tokenizer      : ByteLevel BPE trained in memory with `tokenizers`, vocab_size=512,
                   special tokens <s> </s> <unk> <pad>; encodings start with <s>
* model          : LlamaForCausalLM, hidden 128, intermediate 256, 4 layers, 4 heads,
                   2 KV heads, max positions 256, rms_norm_eps 1e-6, untied embeddings, float32
* saved files    : config.json, generation_config.json, model.safetensors (float32),
                   tokenizer.json, tokenizer_config.json (tokenizer_class is written as
                   "PreTrainedTokenizerFast" so transformers 4.x loads it as well as 5.x)
* training       : AdamW lr 3e-3 (short warmup, cosine decay), 300 steps, batch 16 random
                   windows of 64 tokens, seed 0, 2 CPU threads

Everything is seeded, so two runs give byte-identical files on the same platform and
torch/tokenizers versions. Nothing is downloaded (HF_HUB_OFFLINE=1); the script ends by
reloading the saved folder with AutoModelForCausalLM / AutoTokenizer and printing a
greedy 12-token continuation of the first prompt.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "src" / "parity" / "assets"
DEFAULT_OUT = ASSETS / "tiny-llama"
CORPUS = ASSETS / "corpus.txt"
PROMPTS = ASSETS / "prompts.txt"

SEED = 0
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
# Files the savers write that the fixture keeps; anything else they write is removed.
KEEP = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_tokenizer(paragraphs: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(paragraphs, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # Llama-style: every encoding starts with <s>; no </s> appended.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids (Llama has none)
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(torch.float32)


def corpus_ids(tokenizer: PreTrainedTokenizerFast, paragraphs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for p in paragraphs:
        ids += tokenizer(p)["input_ids"] + [tokenizer.eos_token_id]  # <s> paragraph </s>
    return torch.tensor(ids, dtype=torch.long)


def train(model, data: torch.Tensor, steps: int, batch: int, window: int, lr: float) -> float:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = 20

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    loss_val = float("nan")
    for step in range(steps):
        starts = torch.randint(0, len(data) - window, (batch,), generator=gen)
        x = torch.stack([data[s : s + window] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=x, labels=x)  # the model shifts labels internally
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = out.loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss_val:.4f}", flush=True)
    model.eval()
    return loss_val


@torch.no_grad()
def evaluate(model, data: torch.Tensor, window: int) -> tuple[float, float, float]:
    """Mean top-1 logprob, top-1 accuracy and loss over the corpus in non-overlapping windows."""
    top1_lp, correct, nll, n = 0.0, 0, 0.0, 0
    for s in range(0, len(data) - 1, window):
        x = data[s : s + window + 1]
        if len(x) < 2:
            break
        logits = model(input_ids=x[None, :-1]).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        tgt = x[1:]
        top1_lp += lp.max(dim=-1).values.sum().item()
        correct += (lp.argmax(dim=-1) == tgt).sum().item()
        nll -= lp.gather(1, tgt[:, None]).sum().item()
        n += len(tgt)
    return top1_lp / n, correct / n, nll / n


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    ap.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    seed_everything(SEED)

    text = CORPUS.read_text(encoding="utf-8")
    paragraphs = [p.strip().replace("\n", " ") for p in text.split("\n\n") if p.strip()]
    prompts = [line.strip() for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]

    tokenizer = build_tokenizer(paragraphs)
    data = corpus_ids(tokenizer, paragraphs)
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}  corpus tokens {len(data)}  params {n_params:,}", flush=True)

    loss = train(model, data, steps=args.steps, batch=16, window=64, lr=3e-3)
    top1_lp, acc, nll = evaluate(model, data, window=64)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in KEEP | {"special_tokens_map.json", "chat_template.jinja"}:
        (out / name).unlink(missing_ok=True)
    written_before = {f.name for f in out.iterdir()}
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 records its own class name ("TokenizersBackend"), which 4.x cannot load;
    # "PreTrainedTokenizerFast" resolves to the same tokenizer in both.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    for f in out.iterdir():
        if f.is_file() and f.name not in KEEP and f.name not in written_before:
            f.unlink()
    for name in KEEP:
        (out / name).chmod(0o644)

    # Offline reload check.
    m2 = AutoModelForCausalLM.from_pretrained(out)
    t2 = AutoTokenizer.from_pretrained(out)
    m2.eval()
    enc = t2(prompts[0], return_tensors="pt")
    with torch.no_grad():
        gen = m2.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=t2.pad_token_id)
    text_out = t2.decode(gen[0], skip_special_tokens=True)
    print(f"greedy: {text_out!r}")
    with torch.no_grad():
        d = (m2(**enc).logits - model(**enc).logits).abs().max().item()
    assert d == 0.0, f"reloaded model differs from trained one (max |dlogit| {d})"

    size = folder_size(out)
    print(
        f"tiny-llama: params={n_params:,} final_loss={loss:.4f} corpus_nll={nll:.4f} "
        f"mean_top1_logprob={top1_lp:.4f} top1_acc={acc:.3f} size={size / 1e6:.2f}MB "
        f"files={sorted(f.name for f in out.iterdir())} out={out} time={time.time() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
