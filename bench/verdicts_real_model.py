"""Verdicts on a real model: benign pairs must pass, injected faults must be found at their tap.

    .venv/bin/python bench/verdicts_real_model.py --model .models/smollm2-135m   (or: make bench-verdicts)

Defaults: dumps in ``.bench/verdicts`` (kept: a second run only re-evaluates, ``--recapture``
captures again), the built-in prompts, 16 greedy tokens of the fp32 eager baseline, every case
of ``bench/verdict_cases.py`` (``--only SUBSTRING`` selects; ``--no-vllm`` skips the vLLM side),
``parity explain`` on every fault (``--no-explain`` skips it: the models are replayed in memory,
with the fault applied, ~20 s per case).

For every case it prints one row: the verdict (exit code the CLI would give), the number of
non-passing taps, the first divergence and whether it is the faulted tap, the worst grade
evidence, and explain's root cause. Then detection rate, false alarms, and the smallest fault
found per target (``--sweep``: layer 8's MLP output scaled by 1+δ in fp32 eager/sdpa and bf16
eager/sdpa targets, bf16 ones judged with the bf16 eager twin).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from verdict_cases import BENIGN, FAULTS  # noqa: E402

BASELINE = "dtype=float32,attn=eager"


def _done(path: Path) -> bool:
    return path.is_dir() and any(path.glob("manifest-rank*.jsonl"))


def _fresh(path: Path) -> Path:
    import shutil

    if path.exists():
        shutil.rmtree(path)
    return path


def load_side(model: Path, spec_text: str, fault: Any = None) -> Any:
    """Load a side through parity's own loader and apply the fault (in memory)."""
    from parity.backends import hf, vllm
    from parity.backends.spec import parse_spec

    spec = parse_spec(spec_text)
    if spec.engine == "vllm":
        return vllm.load(model, spec)
    side = hf.load(model, spec)
    if fault is not None:
        fault(side.model)
    return side


def capture(side: Any, sequences: list[list[int]], out: Path, *, canonical: bool = False,
            threads: int | None = None) -> None:
    """Teacher-forced capture of ``sequences`` into ``out`` (threads: torch threads meanwhile)."""
    import torch

    from parity.backends import hf, vllm

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if side.spec.engine == "vllm":
            vllm.capture_sequences(side, sequences, _fresh(out))
        else:
            hf.capture_sequences(side, sequences, _fresh(out), canonical=canonical)
    finally:
        torch.set_num_threads(before)


def baseline_sequences(model: Path, out: Path, recapture: bool) -> tuple[list[list[int]], Any]:
    """The fp32 eager baseline: its greedy sequences (cached in ``out/sequences.json``) and dumps."""
    from parity.backends import hf
    from parity.backends.hf import read_prompts

    seq_file = out / "sequences.json"
    base = None
    if recapture or not seq_file.is_file():
        base = load_side(model, BASELINE)
        sequences = [g.sequence for g in hf.generate(base, read_prompts(None), new_tokens=16)]
        out.mkdir(parents=True, exist_ok=True)
        seq_file.write_text(json.dumps(sequences))
    sequences = json.loads(seq_file.read_text())
    for name, canonical in (("baseline", False), ("baseline-canonical", True)):
        if recapture or not _done(out / name):
            base = base or load_side(model, BASELINE)
            capture(base, sequences, out / name, canonical=canonical)
    return sequences, base


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path(".models/smollm2-135m"))
    parser.add_argument("--out", type=Path, default=Path(".bench/verdicts"))
    parser.add_argument("--only", default=None, help="cases whose name contains this")
    parser.add_argument("--recapture", action="store_true")
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--no-explain", action="store_true")
    parser.add_argument("--capture-only", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="smallest detected fault per dtype")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no model there; run `make real-model` first")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str((args.out / "inductor").resolve()))
    start = time.time()
    sequences, _ = baseline_sequences(args.model, args.out, args.recapture)
    cases = [c for c in BENIGN + FAULTS if args.only is None or args.only.lower() in c.name.lower()]
    if args.no_vllm:
        cases = [c for c in cases if "vllm" not in c.spec]
    twin_dir = args.out / "twin-bf16"
    if any("bfloat16" in c.spec for c in cases) and (args.recapture or not _done(twin_dir)):
        capture(load_side(args.model, "dtype=bfloat16,attn=eager"), sequences, twin_dir)
    for case in cases:
        where = args.out / slug(case.name)
        if args.recapture or not _done(where):
            t0 = time.time()
            capture(load_side(args.model, case.spec, case.fault), sequences, where, canonical=case.canonical,
                    threads=case.threads)
            print(f"captured {case.name} in {time.time() - t0:.0f} s", file=sys.stderr)
    if args.capture_only:
        return 0
    from verdict_eval import evaluate_all

    return evaluate_all(args, cases, sequences, start)


if __name__ == "__main__":
    sys.exit(main())
