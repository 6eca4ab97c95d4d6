"""The GPU check of issue 18, in one script: capture overhead on CUDA and a CUDA-vs-CPU comparison.

What it does (each part says what it measured and on which model)

1. Environment: torch, transformers, the GPU (or that there is none), the model used: the real
   SmolLM2-135M when ``.models/smollm2-135m`` exists (``make real-model``) and CUDA is there,
   else the built-in tiny Llama (``src/parity/assets/tiny-llama``, hidden size 128, 4 layers): the real model
   (538 MB) does not travel to a lent GPU machine, so there the tiny one is used, and said so.
   Python packages: torch, transformers, numpy, safetensors and xxhash are needed; numba and
   llvmlite are used when present (the compare kernel; without them the numpy reference runs);
   click, rich and prometheus-client are not used. What is missing is printed, exit 2.
2. Device copy path (:mod:`parity.capturing.device_copy`): on CUDA, an asynchronous copy and
   device statistics of a few tensors against the CPU's, with ``torch.cuda.set_sync_debug_mode
   ("error")`` around the calls the hook makes (a synchronizing call would raise); the tiny
   model captured on CUDA in full and stats mode: the model's outputs bitwise unchanged, every
   stored tensor equal to the module's output. Without CUDA: the fallback path (synchronous
   copies, the same records).
3. Capture overhead on CUDA (:func:`capture_overhead.measure_overhead`: bare forward, then a
   ``full`` and a ``stats`` capture, one forward each, ``--repeat`` interleaved rounds, medians,
   a ``torch.cuda.synchronize()`` before each clock read), float32 and bfloat16, on the model
   of part 1 (batch 4 x 256) and on the benchmark's synthetic Llama (160M parameters, hidden 1024,
   random weights: no download, the size where the goals mean something). Goals: full <= 1.3x,
   stats <= 1.05x. Without CUDA: the tiny model on the CPU, 3 rounds, to show the path runs.
4. Cross-device comparison (:func:`parity.matrix.run_matrix`, as ``parity matrix`` runs it):
   baseline ``device=cpu,dtype=float32,attn=eager``; targets the model on CUDA in float32 and
   bfloat16 with sdpa and eager attention, graded precision-aware (bfloat16 targets against
   their twin, the CPU run in bfloat16), the built-in prompts, 8 greedy tokens. Without CUDA:
   one CPU bfloat16 target on one prompt, 2 tokens, to show the path runs.
5. The tests of ``tests/test_device_copy.py`` (its CUDA tests run where CUDA is), with pytest
   in a subprocess, when pytest is installed (``--skip-tests`` leaves them out).

Everything printed is also written as JSON to ``OUT/gpu_check.json`` (``--out``, default
``$OUT`` when set, else a temporary folder); dumps go to a temporary folder, removed at the end.

Running it
    ``python bench/gpu_check.py`` from the repository root (parity is imported from ``src/``
    when not installed). ``--repeat N`` (default 20 rounds on CUDA), ``--skip-matrix``,
    ``--skip-synthetic``, ``--skip-tests``. On a lent GPU machine:
    ``PYTHONUNBUFFERED=1 python3 bench/gpu_check.py`` (writes ``$OUT/gpu_check.json``). Sized
    for a few minutes on one H100 with the tiny model (budget: under 8; not yet run on a GPU);
    about a minute on two shared CPU cores without a GPU (part 5 included). The tests alone:
    ``PYTHONPATH=src python -m pytest tests/test_device_copy.py -q``.

Exit status: 0 when every part ran (goals missed are reported, not failed), 1 when a
correctness check failed (outputs changed, a record differs, a hook synchronized), 2 when a
needed package is missing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ("torch", "transformers", "numpy", "safetensors", "xxhash")
OPTIONAL = {"numba": "compiles the compare kernel (else the numpy reference runs)",
            "llvmlite": "loads the compiled compare kernel"}
REAL_MODEL = ROOT / ".models" / "smollm2-135m"
BASELINE = "device=cpu,dtype=float32,attn=eager"
TARGETS = ("device=cuda,dtype=float32,attn=eager", "device=cuda,dtype=float32,attn=sdpa",
           "device=cuda,dtype=bfloat16,attn=eager", "device=cuda,dtype=bfloat16,attn=sdpa")
RESULTS: dict = {}


def say(line: str = "") -> None:
    print(line, flush=True)


def missing_packages() -> list[str]:
    """Needed packages that are not importable (printed with what each is for)."""
    gone = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    for name in gone:
        say(f"MISSING: {name} (needed)")
    for name, why in OPTIONAL.items():
        if importlib.util.find_spec(name) is None:
            say(f"not installed (optional): {name}: {why}")
    return gone


def import_parity():
    """``parity``, from the install or else from ``src/`` beside this script."""
    try:
        import parity
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
        import parity
    return parity


def model_dir(cuda: bool) -> tuple[Path, str]:
    """The model of parts 2-4: the real one on a GPU machine that has it, else the tiny one (always
    on a machine without CUDA: the fallback parts stay quick)."""
    if cuda and (REAL_MODEL / "config.json").exists():
        return REAL_MODEL, "the real SmolLM2-135M (.models/smollm2-135m)"
    from parity.backends.hf import DEFAULT_MODEL

    why = "the real SmolLM2-135M is not on this machine" if cuda else "no GPU: the fallback parts stay quick"
    return Path(DEFAULT_MODEL), f"the built-in tiny Llama (src/parity/assets/tiny-llama; {why})"


# ------------------------------------------------------------------ part 2: the copy path
def check_copy_path(cuda: bool, path: Path, work: Path) -> bool:
    import torch

    from parity.capturing.device_copy import DeviceCopier, PendingStats, PendingTensor
    from parity.capturing.stats import sample_values, tensor_stats

    ok = True
    copier = DeviceCopier(256 << 20)
    g = torch.Generator().manual_seed(0)
    host = [torch.randn(4, 256, 1024, generator=g), torch.randn(3 << 20, generator=g).to(torch.bfloat16),
            torch.tensor([1.0, float("nan"), float("inf"), -2.0, 0.0]), torch.randint(-9, 9, (1000,), generator=g)]
    device = "cuda" if cuda else "cpu"
    values = [t.to(device) for t in host]
    for t in values:  # first use: pool buffers and sample indices exist
        for p in (copier.start_copy(t), copier.start_stats(t, 32)):
            if isinstance(p, (PendingTensor, PendingStats)):
                p.result()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            started = [(copier.start_copy(t), copier.start_stats(t, 32)) for t in values]
        synced = None
    except RuntimeError as exc:
        started, synced = None, str(exc)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    if synced:
        say(f"FAIL: a call the hook makes synchronized with the GPU: {synced}")
        return False
    for (copy, stats), t in zip(started, host):
        got = copy.result() if isinstance(copy, PendingTensor) else copy
        got_stats = stats.result() if isinstance(stats, PendingStats) else None
        want = tensor_stats(t)
        same_bytes = torch.equal(got, t) or (torch.isnan(got).any() and torch.equal(got.nan_to_num(), t.nan_to_num()))
        exact = ("nan", "inf", "zero", "numel", "min", "max")
        same_stats = got_stats is None or (
            all(json.dumps(got_stats[k]) == json.dumps(want[k]) for k in exact)
            and got_stats["sample"] == sample_values(t, 32)
            and all((got_stats[k] is None) == (want[k] is None)
                    and (want[k] is None or abs(got_stats[k] - want[k]) <= 1e-12 * abs(want[k]) + 1e-300)
                    for k in ("mean", "l2")))
        say(f"  {str(t.dtype):<15} {list(t.shape)!s:<16} copy {'exact' if same_bytes else 'DIFFERS'}, "
            f"device statistics {'n/a (fallback: computed on the host)' if got_stats is None else 'match' if same_stats else 'DIFFER'}")
        ok &= bool(same_bytes and same_stats)
    say(f"  copies: {copier.counts['async']} asynchronous, {copier.counts['sync']} synchronous"
        + (f" (pinned memory unavailable: {copier.problem})" if copier.problem else ""))
    RESULTS["copy_path"] = {"device": device, "counts": copier.counts, "ok": ok}
    copier.close()
    ok &= check_model_capture(cuda, path, work)
    return ok


def check_model_capture(cuda: bool, path: Path, work: Path) -> bool:
    """The model captured in both modes on the device: outputs bitwise unchanged, records exact."""
    import torch

    import parity
    from parity.backends.hf import load
    from parity.backends.spec import parse_spec
    from parity.store.reader import load_run

    ok = True
    device = "cuda" if cuda else "cpu"
    loaded = load(path, parse_spec(f"device={device},dtype=float32,attn=eager"))
    model = loaded.model
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids.to(device)
    seen: dict = {}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, out.detach().cpu()))
               for n, m in model.named_modules() if n.endswith(".mlp") or n == "lm_head"]
    with torch.inference_mode():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    with torch.inference_mode():
        plain = model(input_ids=ids).logits.clone()
        again = model(input_ids=ids).logits.clone()
        for mode in ("full", "stats"):
            out = work / f"model-{mode}"
            with parity.capture(model, out, taps=["**.layers.*.mlp", "lm_head"], mode=mode) as session:
                captured = model(input_ids=ids).logits.clone()
            unchanged = torch.equal(plain, captured)
            deterministic = torch.equal(plain, again)
            run = load_run(out)
            bad = []
            for record in run.records:
                want = seen[record.name]
                if mode == "full":
                    if not torch.equal(torch.from_numpy(run.raw(record).copy()).view(want.dtype), want):
                        bad.append(record.name)
                elif record.stats["numel"] != want.numel() or record.stats["max"] != float(want.max()):
                    bad.append(record.name)
            copies = session.device_copies
            say(f"  model capture ({mode}, float32 on {device}): outputs bitwise unchanged: "
                f"{'yes' if unchanged else 'NO' + ('' if deterministic else ' (but two bare forwards differ too)')}; "
                f"{len(run.records)} records, {'all exact' if not bad else 'DIFFERING: ' + ', '.join(bad[:5])}; "
                f"copies {copies['async']} asynchronous, {copies['sync']} synchronous")
            ok &= (unchanged or not deterministic) and not bad and session.error is None
            RESULTS.setdefault("model_capture", {})[mode] = {"unchanged": unchanged, "bad": bad, "copies": copies}
            shutil.rmtree(out, ignore_errors=True)
    del model, loaded
    return ok


# ------------------------------------------------------------------ part 3: overhead
def overhead(cuda: bool, path: Path, label: str, repeat: int, work: Path, synthetic: bool) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from capture_overhead import TAPS, build_model, measure_overhead, print_table

    from parity.backends.hf import load
    from parity.backends.spec import parse_spec

    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else None
    models = [("model", label)] + ([("synthetic", "the benchmark's synthetic Llama, 160M parameters, random weights")]
                                   if synthetic else [])
    for dtype in (("float32", "bfloat16") if cuda else ("float32",)):
        for kind, what in models:
            if kind == "model":
                model = load(path, parse_spec(f"device={device},dtype={dtype},attn=eager")).model
            else:
                model = build_model("eager").to(device, getattr(torch, dtype))
            vocab = model.config.vocab_size
            ids = torch.randint(0, vocab, (4, 256), generator=torch.Generator().manual_seed(1)).to(device)
            say(f"\n--- capture overhead: {what}, {dtype} on {device}, batch 4 x 256, taps {TAPS}, {repeat} rounds")
            m = measure_overhead(model, ids, taps=TAPS, repeat=repeat, root=work, sync=sync, log=lambda line: None)
            lines: list[str] = []
            met = print_table(m, log=lines.append)
            for line in lines:
                say(line)
            import statistics

            base = statistics.median(m["times"]["none"])
            RESULTS.setdefault("overhead", []).append({
                "model": what, "dtype": dtype, "device": device, "rounds": repeat,
                "bare_forward_s": base,
                "full_ratio": statistics.median(m["times"]["full"]) / base,
                "stats_ratio": statistics.median(m["times"]["stats"]) / base,
                "full_close_s": statistics.median(m["close"]["full"]),
                "goals_met": met, "copies": m["copies"]})
            del model
            if cuda:
                torch.cuda.empty_cache()


# ------------------------------------------------------------------ part 4: cross-device comparison
def comparison(cuda: bool, path: Path, label: str, work: Path) -> None:
    from parity.backends.hf import read_prompts
    from parity.backends.spec import parse_spec
    from parity.compare.tolerance import TolerancePolicy
    from parity.matrix import run_matrix

    prompts = read_prompts(None)
    targets, tokens = (TARGETS, 8) if cuda else (("device=cpu,dtype=bfloat16,attn=sdpa",), 2)
    if not cuda:
        prompts = prompts[:1]
    say(f"\n--- cross-device comparison on {label}: baseline {BASELINE}, {len(prompts)} prompts, {tokens} greedy "
        f"tokens, precision-aware grading (twin) for 16-bit targets")
    policy = TolerancePolicy.from_options(rtol=None, atol=None, tol=(), profile=None, backend=None)
    t0 = time.perf_counter()
    rows = run_matrix(path, parse_spec(BASELINE), [parse_spec(t) for t in targets], prompts, work / "matrix",
                      new_tokens=tokens, policy=policy, task=lambda *a, **k: (lambda *a, **k: None))
    say(f"({time.perf_counter() - t0:.0f} s)")
    for row, spec in zip(rows, targets):
        kl = row["logits_kl_mean"]
        say(f"  {spec:<40} {row['verdict']:<5} first divergence {row['first_divergence'] or '-'}; worst rel L2 "
            f"{row['worst_rel_l2']:.3g} ({row['worst_tap']}); logits KL mean {kl if kl is None else f'{kl:.3g}'}; "
            f"greedy tokens {row['token_match_rate']}; taps within precision noise {row['noise_taps']}")
        say(f"      {row['headline']}")
    RESULTS["comparison"] = {"model": label, "baseline": BASELINE,
                             "rows": [{k: v for k, v in row.items() if k != "report"} for row in rows]}


# ------------------------------------------------------------------ part 5: the tests
def run_tests() -> bool:
    """``tests/test_device_copy.py`` under pytest in a subprocess (parity from ``src/``); True when
    it passed or pytest is not installed."""
    import subprocess

    if importlib.util.find_spec("pytest") is None:
        say("\n--- tests: pytest is not installed: tests/test_device_copy.py not run")
        return True
    say("\n--- tests: tests/test_device_copy.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_device_copy.py", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    for line in (lines if done.returncode else lines[-1:]):
        say(f"  {line}")
    say(f"  ({time.perf_counter() - t0:.0f} s, exit {done.returncode})")
    RESULTS["tests"] = {"exit": done.returncode, "summary": lines[-1] if lines else done.stderr[-500:]}
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="rounds of the overhead measurement on CUDA (default 20)")
    parser.add_argument("--out", type=Path, default=None, help="where gpu_check.json goes (default $OUT, else a temp dir)")
    parser.add_argument("--skip-matrix", action="store_true", help="leave out the cross-device comparison")
    parser.add_argument("--skip-synthetic", action="store_true", help="leave out the 160M synthetic model's overhead")
    parser.add_argument("--skip-tests", action="store_true", help="leave out tests/test_device_copy.py")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    say(f"parity GPU check (issue 18), {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}")
    if missing_packages():
        say("cannot run: install the missing packages above (pip install torch transformers numpy safetensors xxhash)")
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    import_parity()
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if cuda else None
    path, label = model_dir(cuda)
    say(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs")
    say(f"GPU: {gpu}" if cuda else "GPU: none present: running the CPU fallback parts only (quick), exit 0")
    say(f"model: {label}")
    RESULTS.update(date=_dt.date.today().isoformat(), gpu=gpu, torch=torch.__version__,
                   transformers=transformers.__version__, model=label)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp(prefix="gpu-check-")))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="parity-gpu-check-"))
    ok = True
    try:
        say(f"\n--- device copy path ({'CUDA: pinned, asynchronous' if cuda else 'no CUDA: the synchronous fallback'})")
        ok &= check_copy_path(cuda, path, work)
        overhead(cuda, path, label, args.repeat if cuda else 3, work, synthetic=cuda and not args.skip_synthetic)
        if not args.skip_matrix:
            comparison(cuda, path, label, work)
        if not args.skip_tests:
            ok &= run_tests()
    except Exception:
        traceback.print_exc()
        ok = False
        RESULTS["error"] = traceback.format_exc()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        RESULTS["ok"] = ok
        RESULTS["seconds"] = time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    say(f"\n{'all checks passed' if ok else 'A CHECK FAILED (see above)'}; {time.perf_counter() - started:.0f} s; "
        f"figures in {out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
