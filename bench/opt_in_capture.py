"""Benchmark and check: the opt-in capture records (inputs, parameter fingerprints, call sites).

What it measures
    On SmolLM2-135M-Instruct (``--model``, default ``.models/smollm2-135m``, built by ``make
    real-model``; the built-in tiny model when absent), float32 eager, one teacher-forced forward
    pass over the built-in prompts (4 sequences, batch 1 each), captured into a fresh directory
    with the default taps under five settings, interleaved for ``--repeat`` rounds (default 3):
    ``plain`` (outputs only), ``+call_sites``, ``+parameters``, ``+inputs`` and ``all`` three.
    It prints the median wall time of the whole capture (forward passes plus closing the dump)
    and the bytes written, both as ratios to ``plain`` measured in the same run.

What it checks (the README table)
    A float32 baseline captured with everything, against targets captured the same way:

    - ``sdpa``: float32 with sdpa attention (benign: must pass);
    - ``bf16``: the model loaded in bfloat16 (benign for the weights: every parameter must be the
      float32 one rounded; its activations fail the float32 tolerance without a twin, as
      expected, and the blame must not name the weights);
    - ``weight``: one element of ``layers.12.mlp.down_proj.weight`` changed by 1% of the
      tensor's largest value (a conversion bug): must be found at that parameter;
    - ``kernel``: ``layers.12.mlp``'s output scaled by 1 + 1e-3 (a kernel bug): the MLP must be
      blamed with its inputs and weights agreeing;
    - ``rotary``: the rotary embedding's cosine scaled by 1 + 1e-4 (code between taps): the first
      divergence must be the position embeddings reaching ``layers.0``, "between taps".

    It prints per case the verdict, the first divergence, the blame and whether that is right,
    and exits 1 when a case is not.

Running it
    ``.venv/bin/python bench/opt_in_capture.py [--model DIR] [--repeat 3]`` (~2 minutes on two
    cores with SmolLM2).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"plain": {}, "+call_sites": {"call_sites": True}, "+parameters": {"parameters": True},
            "+inputs": {"inputs": True}, "all": {"inputs": True, "parameters": True, "call_sites": True}}


def _load(path: Path, dtype: str, attn: str = "eager"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn).eval()


def _sequences(path: Path) -> list:
    import torch
    from transformers import AutoTokenizer

    from parity.backends.hf import read_prompts

    tokenizer = AutoTokenizer.from_pretrained(path)
    return [torch.tensor([tokenizer(p)["input_ids"]]) for p in read_prompts(None)]


def _capture(model, sequences, out: Path | None, **options):
    import torch

    import parity

    with torch.inference_mode(), parity.capture(model, out, **options) as session:
        for ids in sequences:
            model(ids)
    return session


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(model, sequences, repeat: int, work: Path) -> None:
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    sizes: dict[str, int] = {}
    for round_ in range(repeat + 1):  # round 0 warms up
        for name, options in SETTINGS.items():
            out = work / f"{name}-{round_}"
            start = time.perf_counter()
            _capture(model, sequences, out, **options)
            if round_:
                times[name].append(time.perf_counter() - start)
            sizes[name] = _bytes(out)
            shutil.rmtree(out)
    plain = statistics.median(times["plain"])
    print(f"capture cost ({len(sequences)} sequences, median of {repeat}; ratios to plain in this run)")
    print(f"  {'setting':<13} {'time s':>8} {'x plain':>8} {'MB':>8} {'x plain':>8}")
    for name in SETTINGS:
        t = statistics.median(times[name])
        print(f"  {name:<13} {t:8.2f} {t / plain:8.2f} {sizes[name] / 1e6:8.1f} {sizes[name] / sizes['plain']:8.2f}")


def check(path: Path, sequences) -> bool:
    import torch

    import parity

    everything = {"inputs": True, "parameters": True, "call_sites": True}
    base = _capture(_load(path, "float32"), sequences, None, **everything)
    layer = min(12, _load(path, "float32").config.num_hidden_layers - 1)

    def weight():
        model = _load(path, "float32")
        w = model.model.layers[layer].mlp.down_proj.weight
        with torch.no_grad():
            w[0, 0] += 0.01 * float(w.abs().max())
        return model

    def kernel():
        model = _load(path, "float32")
        model.model.layers[layer].mlp.register_forward_hook(lambda m, a, out: out * (1 + 1e-3))
        return model

    def rotary():
        model = _load(path, "float32")
        model.model.rotary_emb.register_forward_hook(lambda m, a, out: (out[0] * (1 + 1e-4), out[1]))
        return model

    mlp = f"model.layers.{layer}.mlp"
    cases = {
        "sdpa": (lambda: _load(path, "float32", "sdpa"), lambda r: r.verdict == "pass"),
        "bf16": (lambda: _load(path, "bfloat16"), lambda r: all(
            o.kind == "pass" for o in r.outcomes if o.role == "parameter")
            and (r.attribution or {}).get("verdict") not in ("parameters", "module")),
        "weight": (weight, lambda r: r.first_divergence is not None
                   and r.first_divergence.name == f"{mlp}.parameters.down_proj.weight"
                   and r.attribution["verdict"] == "parameters"),
        "kernel": (kernel, lambda r: r.first_divergence is not None and r.first_divergence.name == mlp
                   and r.attribution["verdict"] == "module"),
        "rotary": (rotary, lambda r: r.first_divergence is not None
                   and r.first_divergence.name.startswith("model.layers.0.")
                   and r.attribution["verdict"] == "between taps"),
    }
    print("\nverdicts (float32 eager baseline; inputs, parameters and call sites captured on both sides)")
    print(f"  {'case':<7} {'verdict':<7} {'right':<5} first divergence -> blame")
    ok = True
    for name, (make, right) in cases.items():
        report = parity.compare(base, _capture(make(), sequences, None, **everything))
        good = bool(right(report))
        ok &= good
        first = report.first_divergence
        blame = f"{report.attribution['verdict']}: {report.attribution['text']}" if report.attribution else "-"
        params = [o for o in report.outcomes if o.role == "parameter"]
        where = (f"{first.name} ({first.kind}) -> {blame}" if first is not None
                 else f"none; {sum(o.ok for o in params)}/{len(params)} parameters "
                      f"{params[0].reason if params else ''}")
        print(f"  {name:<7} {report.verdict:<7} {'yes' if good else 'NO':<5} {where}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".models/smollm2-135m"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from parity.backends.hf import DEFAULT_MODEL

    path = args.model if (args.model / "config.json").exists() else DEFAULT_MODEL
    print(f"model: {path}" + ("" if path == args.model else f" ({args.model} not built: `make real-model`)"))
    sequences = _sequences(path)
    with tempfile.TemporaryDirectory() as tmp:
        measure(_load(path, "float32"), sequences, args.repeat, Path(tmp))
    return 0 if check(path, sequences) else 1


if __name__ == "__main__":
    sys.exit(main())
