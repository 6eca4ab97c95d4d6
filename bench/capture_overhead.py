"""Benchmark: how much slower is a forward pass while ``parity.capture`` records it?

What it measures
    A ``transformers`` ``LlamaForCausalLM`` built from a ``LlamaConfig`` (hidden size 1024,
    intermediate size 2816, 8 layers, 16 attention heads, 8 key/value heads, vocabulary 32000,
    random weights, float32 unless ``--dtype bfloat16``, eager attention unless ``--attn`` says
    otherwise, on the CPU unless ``--device cuda``) runs a batch of 4 x 256 random token ids
    under ``torch.inference_mode()``. For each of ``--repeat`` rounds (default 5 on the CPU,
    20 on CUDA) it times, in this order:

    - ``none``: the forward pass alone;
    - ``full``: the forward pass inside ``parity.capture(model, DIR, taps=TAPS)`` with
      ``TAPS = ["**.layers.*", "**.layers.*.self_attn[0]", "**.layers.*.mlp"]`` (24 tensors of
      4 MiB: 96 MiB per forward, written by the capture's background thread);
    - ``stats``: the same with ``mode="stats"`` (statistics only).

    For the two capture modes the time to leave the ``with`` block (``session.close()``: the
    background writer drains its queue, shards and manifest are written) is measured
    separately, and so is entering it (hook registration). Each capture writes to a fresh
    directory, deleted after the round. It prints the median of each, the ratios of the
    medians to ``none`` (goals: full <= 1.3x, stats <= 1.05x) and whether the goals are met.
    One unmeasured round of the three runs first (allocator and kernel warm-up; on CUDA also
    torch's pinned host buffers). Besides wall times it records the process CPU time (all
    threads, the capture's writer included) of each measured forward, which a busy shared
    machine disturbs less than wall time.

    On CUDA every clock read follows ``torch.cuda.synchronize()``, so a forward's time is the
    device's; the capture copies each tapped tensor asynchronously into pinned memory (full) or
    computes its statistics on the GPU (stats), see :mod:`parity.capturing.device_copy`; the
    line ``device copies`` says how many records went each way and what the pinned pool held.
    ``full`` still writes 96 MiB per forward through the CPU writer thread: ``close`` shows
    how long the host needs for that, which no GPU path removes.

    ``--profile`` also times the capture's work per record outside the model (the clone on the
    calling thread; ``tensor_stats`` and its parts, and shard writing, on the writer thread;
    a leaner statistics pass for comparison) and runs one ``full`` and one ``stats`` forward
    under cProfile (calling thread only), to show where capture time goes.

Running it
    ``.venv/bin/python bench/capture_overhead.py`` (needs torch and transformers). Options:
    ``--device cpu|cuda`` (default cpu), ``--dtype float32|bfloat16``, ``--repeat N``,
    ``--threads N`` (torch intra-op threads; default torch's own choice), ``--attn eager|sdpa``,
    ``--profile``, ``--workdir DIR`` (default: a temporary directory, removed at the end).
    Takes about 1-2 minutes on two cores (the forward pass dominates); seconds on a GPU.

Exit status: 0 when both goals are met, 1 when one is missed. Figures vary with machine load
(on a shared machine, other processes compete for the two cores: the background writer
then competes with them as well); the rounds interleave the three modes so drifts hit all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TAPS = ["**.layers.*", "**.layers.*.self_attn[0]", "**.layers.*.mlp"]
GOALS = {"full": 1.3, "stats": 1.05}


def build_model(attn: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512,
                         torch_dtype="float32")
    config._attn_implementation = attn
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    return model


def _median_ms(fn, repeat: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def lean_stats(t):
    """A leaner way to the statistics of ``parity.capturing.stats.tensor_stats`` (a proposal,
    measured here for comparison; float tensors only): aminmax first, since NaN and Inf show
    in min/max, so that the finite-only passes run only when needed; count_nonzero for zeros."""
    import math

    import torch

    lo, hi = torch.aminmax(t)
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        return None  # the full path of tensor_stats
    zero = t.numel() - int(torch.count_nonzero(t))
    total = float(t.sum(dtype=torch.float64))
    l2 = float(torch.linalg.vector_norm(t, dtype=torch.float64))
    return lo_f, hi_f, zero, total, l2


def profile_writer_side(model, ids, root: Path) -> None:
    """Where the capture's own CPU time goes: the work on the calling thread (hooks) is small
    (cProfile below); the writer thread computes ``tensor_stats`` of every record (both modes)
    and, in full mode, writes the shards. On two cores the forward pass already keeps both busy,
    so that CPU time adds to the forward's wall time."""
    import torch

    from parity.capturing.stats import tensor_stats

    x = torch.randn(4, 256, 1024)
    n = 3 * 8  # records per forward with TAPS
    clone = _median_ms(lambda: x.clone(memory_format=torch.contiguous_format))
    stats = _median_ms(lambda: tensor_stats(x))
    lean = _median_ms(lambda: lean_stats(x))
    parts = {
        "(x == 0).sum()": _median_ms(lambda: int((x == 0).sum())),
        "isfinite(x).all()": _median_ms(lambda: bool(torch.isfinite(x).all())),
        "aminmax(x)": _median_ms(lambda: torch.aminmax(x)),
        "x.sum(float64)": _median_ms(lambda: float(x.sum(dtype=torch.float64))),
        "vector_norm(x, float64)": _median_ms(lambda: float(torch.linalg.vector_norm(x, dtype=torch.float64))),
    }
    print(f"\n--- capture work per record ([4, 256, 1024] float32, {n} records per forward), median ms ---")
    print(f"clone on the calling thread: {clone:.2f} ms ({n * clone:.0f} ms per forward)")
    print(f"tensor_stats on the writer thread: {stats:.2f} ms ({n * stats:.0f} ms of CPU per forward), of which:")
    for label, ms in parts.items():
        print(f"  {label:<26} {ms:.2f} ms")
    print(f"a leaner statistics pass (aminmax first, count_nonzero; proposal, see lean_stats): {lean:.2f} ms "
          f"({n * lean:.0f} ms per forward)")
    out = root / "profile-write"
    from parity.store.format import FORMAT_VERSION, Record, RunHeader
    from parity.store.writer import DumpWriter

    writer = DumpWriter(out, RunHeader(format_version=FORMAT_VERSION), durable=True)
    writer.open()
    t0 = time.perf_counter()
    for i in range(n):
        writer.add(Record(name=f"r{i}", step=0, rank=0, order=i, shape=tuple(x.shape), dtype="float32", file=None,
                          key=f"0/{i}/r{i}", stats={}, tags={}), x.clone())
    writer.close()
    print(f"writing one forward's {n} records as shards (DumpWriter, durable): "
          f"{1e3 * (time.perf_counter() - t0):.0f} ms on the writer thread (full mode only)")
    shutil.rmtree(out, ignore_errors=True)


def measure_overhead(model, ids, *, taps, repeat: int, root: Path, sync=None, log=print) -> dict:
    """Time ``repeat`` interleaved rounds of the bare forward, a ``full`` and a ``stats`` capture
    of ``model(ids)`` (one forward per capture, after one unmeasured round of each: allocator,
    kernels, pinned buffers), each capture into a fresh directory under ``root``, deleted after.
    ``sync`` (default None) is called before every clock read (``torch.cuda.synchronize`` on a
    GPU: the forward's time is the device's). Returns ``{"times", "cpu", "enter", "close",
    "written", "copies"}``: per mode lists of seconds, dump bytes, and the capture's device copy
    counts (``session.device_copies`` of the last round). Raises RuntimeError when a capture
    turned itself off."""
    import torch

    import parity

    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {"none": [], "full": [], "stats": []}
    cpu: dict[str, list[float]] = {"none": [], "full": [], "stats": []}
    enter: dict[str, list[float]] = {"full": [], "stats": []}
    close: dict[str, list[float]] = {"full": [], "stats": []}
    written: dict[str, int] = {}
    copies: dict[str, dict] = {}
    with torch.inference_mode():
        for r in range(-1, repeat):  # round -1: warm-up, not measured
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            model(ids)
            sync()
            if r >= 0:
                times["none"].append(time.perf_counter() - t0)
                cpu["none"].append(time.process_time() - c0)
            for mode in ("full", "stats"):
                out = root / f"{mode}-{r + 1}"
                t0 = time.perf_counter()
                cm = parity.capture(model, out, taps=taps, mode=mode)
                session = cm.__enter__()
                sync()
                t1, c1 = time.perf_counter(), time.process_time()
                model(ids)
                sync()
                t2 = time.perf_counter()
                cm.__exit__(None, None, None)
                t3, c3 = time.perf_counter(), time.process_time()
                if session.error:
                    raise RuntimeError(f"capture ({mode}) turned itself off: {session.error}")
                if r >= 0:
                    cpu[mode].append(c3 - c1)  # forward + close: the writer thread's work included
                    enter[mode].append(t1 - t0)
                    times[mode].append(t2 - t1)
                    close[mode].append(t3 - t2)
                written[mode] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                copies[mode] = session.device_copies
                shutil.rmtree(out, ignore_errors=True)
            if r >= 0:
                log(f"  round {r + 1}: none {times['none'][-1]:.4f} s, full {times['full'][-1]:.4f} s "
                    f"(+ close {close['full'][-1]:.3f} s), stats {times['stats'][-1]:.4f} s "
                    f"(+ close {close['stats'][-1]:.3f} s)")
    return {"times": times, "cpu": cpu, "enter": enter, "close": close, "written": written, "copies": copies}


def print_table(m: dict, log=print) -> bool:
    """Print the medians and ratios of :func:`measure_overhead`'s figures; True when both goals are met."""
    times, cpu, enter, close, written = m["times"], m["cpu"], m["enter"], m["close"], m["written"]
    base = statistics.median(times["none"])
    base_min = min(times["none"])
    base_cpu = statistics.median(cpu["none"])
    log("")
    log(f"{'mode':<6} {'forward s':>9} {'ratio':>6} {'min s':>7} {'ratio':>6} {'enter s':>8} {'close s':>8} "
        f"{'fwd+close':>9} {'CPU s':>6} {'ratio':>6} {'dump MB':>8}  goal (median ratio)")
    log(f"{'none':<6} {base:9.4f} {1.0:6.2f} {base_min:7.4f} {1.0:6.2f} {'':>8} {'':>8} {'':>9} "
        f"{base_cpu:6.2f} {1.0:6.2f}")
    met = True
    for mode in ("full", "stats"):
        fwd = statistics.median(times[mode])
        cls = statistics.median(close[mode])
        ratio = fwd / base
        ok = ratio <= GOALS[mode]
        met &= ok
        c = statistics.median(cpu[mode])
        log(f"{mode:<6} {fwd:9.4f} {ratio:6.2f} {min(times[mode]):7.4f} {min(times[mode]) / base_min:6.2f} "
            f"{statistics.median(enter[mode]):8.3f} {cls:8.3f} {(fwd + cls) / base:8.2f}x "
            f"{c:6.2f} {c / base_cpu:6.2f} {written[mode] / 1e6:8.1f}  <= {GOALS[mode]}x: "
            f"{'met' if ok else 'MISSED'}")
    log("(forward: wall time of the forward pass inside the capture, median and min over the rounds, "
        "ratios to the forward alone; fwd+close adds leaving the with block (waiting for the "
        "background writer); CPU s: process CPU time of forward + close, every thread, the writer's "
        "included: on a shared machine the steadier measure)")
    for mode, counts in m["copies"].items():
        if counts["async"] or counts["sync"]:
            log(f"device copies ({mode}, last round): {counts['async']} asynchronous, {counts['sync']} synchronous; "
                f"pinned pool peak {counts['pinned_peak_bytes'] / 2**20:.1f} MiB, {counts['allocations']} buffers made, "
                f"{counts['reuses']} reused, {counts['refusals']} refused"
                + (f"; pinned memory unavailable: {counts['problem']}" if counts["problem"] else ""))
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=None,
                        help="measured rounds (default 5 on the CPU, 20 on CUDA; at least 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--attn", choices=("eager", "sdpa"), default="eager", help="attention implementation")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="model dtype (default float32)")
    parser.add_argument("--profile", action="store_true", help="cProfile one full and one stats forward")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="directory for the dumps; default a temporary one, removed at the end")
    args = parser.parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (20 if args.device == "cuda" else 5)
    if repeat < 3:
        parser.error("--repeat must be >= 3 (the figures are medians)")

    import torch

    import parity

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    own = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="parity-capture-")) if own else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = build_model(args.attn).to(args.device, getattr(torch, args.dtype))
    ids = torch.randint(0, 32000, (4, 256), generator=torch.Generator().manual_seed(1)).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    where = (f"{torch.cuda.get_device_name()}" if args.device == "cuda"
             else f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"parity capture overhead benchmark: LlamaForCausalLM {params / 1e6:.0f}M parameters ({args.dtype}, "
          f"{args.attn} attention) on {args.device}, batch 4 x 256, {repeat} rounds, torch {torch.__version__} on "
          f"{where}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"taps {TAPS}; model built in {time.perf_counter() - t0:.1f} s", flush=True)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    try:
        m = measure_overhead(model, ids, taps=TAPS, repeat=repeat, root=root, sync=sync,
                             log=lambda line: print(line, flush=True))
        met = print_table(m)
        if args.profile:
            import cProfile
            import io
            import pstats

            with torch.inference_mode():
                if args.device == "cpu":
                    profile_writer_side(model, ids, root)
                for mode in ("full", "stats"):
                    out = root / f"profile-{mode}"
                    profiler = cProfile.Profile()
                    with parity.capture(model, out, taps=TAPS, mode=mode):
                        profiler.enable()
                        model(ids)
                        if sync:
                            sync()
                        profiler.disable()
                    shutil.rmtree(out, ignore_errors=True)
                    stream = io.StringIO()
                    stats = pstats.Stats(profiler, stream=stream)
                    stats.sort_stats("tottime").print_stats(15)
                    print(f"\n--- cProfile of one {mode} forward (calling thread only), by own time ---")
                    print("\n".join(stream.getvalue().splitlines()[:40]))
        return 0 if met else 1
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
