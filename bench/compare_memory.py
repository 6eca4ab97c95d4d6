"""Benchmark: does ``parity compare`` keep its peak memory bounded as dumps grow?

What it measures
    It writes pairs of synthetic dumps (baseline and target) that hold N float32 tensors of the
    same shape each (default ``[512, 1024]``, 2 MiB per tensor; N = 50, 200, 800, so the dumps
    differ 16x in size), the target being the baseline times ``1 + noise * randn`` (relative
    noise 1e-6, well inside the float32 default tolerance, so every compare passes). For each N
    it then runs ``python -m parity.cli compare BASE TARGET --json OUT.json`` in a fresh
    process and reports its wall time (process start and imports included), throughput (bytes
    of tensor data read on both sides per second) and peak resident set size.

    The compare engine reads one pair at a time from memory-mapped shards, in chunks, so its
    peak RSS should not grow with N. The last lines print the ratio of the peak RSS at the
    largest N to the one at the smallest N and ``bounded: yes`` when the largest peak is within
    ``1.25 x smallest + 50 MB``.

How peak memory is measured
    Each compare runs under a tiny Python wrapper process that executes the CLI in-process
    (``runpy``, exactly what ``python -m parity.cli`` does) and, at exit, records its own high-water
    mark of the RSS: ``VmHWM`` from ``/proc/self/status`` on Linux, else
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. (``RUSAGE_CHILDREN`` in this process would be
    the maximum over every child ever waited for, so it cannot tell one compare from the next;
    and Linux carries ``ru_maxrss`` over exec from the forked copy of the parent, so the dumps
    are written by a child process and this process never imports torch.) On Linux the
    wrapper also samples ``/proc/self/status`` every 10 ms to split the peak into anonymous
    memory (heap, numpy temporaries) and file-backed pages (the memory-mapped shards: touched
    pages of a mapping count in RSS until it is unmapped, although they are page cache the
    kernel can reclaim). These two columns are sampled and can miss a spike shorter than 10 ms.

Page cache
    The figures are for dumps in the page cache (the usual case right after a capture). The
    data files are read once after writing, and one unmeasured compare runs first (the smallest
    N), so no measured run pays for disk reads or a cold import.

Running it
    ``.venv/bin/python bench/compare_memory.py`` (or ``make bench``). Options:
    ``--records 50,200,800`` (record counts), ``--shape 512,1024`` (tensor shape),
    ``--noise 1e-6`` (relative noise of the target), ``--target-ranks 1`` (R > 1 writes the
    target as an R-rank tensor-parallel run: every tensor split along its last axis, annotated
    ``split:-1``, so the compare rebuilds each logical tensor from R shards — the multi-rank
    path must stay bounded too), ``--repeat 1`` (measured runs per N: best
    wall time, highest peak RSS), ``--profile`` (also run the middle N's compare once under
    cProfile; prints parity's top 10 functions by cumulative time and the top 10 by own
    time), ``--workdir DIR`` (where the dumps go; default a fresh temporary directory removed
    at the end; a given DIR is kept). With the defaults it writes about 4.4 GB of dumps (needs
    that much free disk, and RAM to keep them cached) and takes about 30 s on a two-core
    machine (about a minute more with ``--profile``).

    Exit status: 0 when bounded, 1 when not, 2 when writing or a compare failed.

Units: MB = 10^6 bytes, GB = 10^9 bytes. Figures vary from run to run, and much more on a
shared machine (other processes compete for CPU, memory bandwidth and page cache); compare
figures taken on the same machine only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import data_bytes, warm_page_cache

MB = 1_000_000
GB = 1_000_000_000
#: First argument of the internal child process that writes the dumps.
WRITE_COMMAND = "_write-pairs"
#: Distinct random tensors drawn per dump pair; records are scaled copies of them.
POOL = 8

#: Run in the measuring subprocess: argv = [result_json, *cli_args]. Runs the CLI as
#: ``python -m parity.cli`` would, then writes exit code, in-process wall time and peak RSS.
WRAPPER = r"""
import json, os, resource, runpy, sys, threading, time

result_path, cli_args = sys.argv[1], sys.argv[2:]
peak = {"anon_kb": 0, "file_kb": 0, "hwm_kb": 0}
stop = threading.Event()

def status_kb():
    out = {}
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith((b"RssAnon:", b"RssFile:", b"RssShmem:", b"VmHWM:")):
                key, value = line.split(b":", 1)
                out[key.decode()] = int(value.split()[0])
    return out

def sample():
    while True:
        s = status_kb()
        peak["anon_kb"] = max(peak["anon_kb"], s.get("RssAnon", 0))
        peak["file_kb"] = max(peak["file_kb"], s.get("RssFile", 0) + s.get("RssShmem", 0))
        if stop.wait(0.01):
            return

sampler = None
if os.path.exists("/proc/self/status"):
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
sys.argv = ["parity", *cli_args]
start = time.perf_counter()
code = 0
try:
    runpy.run_module("parity.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
wall = time.perf_counter() - start
if sampler is not None:
    stop.set()
    sampler.join()
    peak["hwm_kb"] = status_kb().get("VmHWM", 0)
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
maxrss_bytes = maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS: bytes, else KiB
with open(result_path, "w") as fh:
    json.dump({"code": code, "inner_wall_s": wall, "maxrss_bytes": maxrss_bytes,
               "hwm_bytes": peak["hwm_kb"] * 1024 if sampler else None,
               "peak_anon_bytes": peak["anon_kb"] * 1024 if sampler else None,
               "peak_file_bytes": peak["file_kb"] * 1024 if sampler else None}, fh)
"""

#: Like WRAPPER but under cProfile; prints the top parity functions by cumulative time and
#: the top functions (numpy's included) by own time, on stderr.
PROFILE_WRAPPER = r"""
import cProfile, pstats, runpy, sys
top, cli_args = int(sys.argv[1]), sys.argv[2:]
sys.argv = ["parity", *cli_args]
profiler = cProfile.Profile()
profiler.enable()
try:
    runpy.run_module("parity.cli", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
profiler.disable()
stats = pstats.Stats(profiler, stream=sys.stderr)
# Unrestricted, the cumulative list is runpy and click frames only: list parity's functions.
print("--- parity functions by cumulative time ---", file=sys.stderr)
stats.sort_stats("cumulative").print_stats("/parity/", top)
print("--- all functions by own time ---", file=sys.stderr)
stats.sort_stats("tottime").print_stats(top)
"""


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=_ints, default=[50, 200, 800],
                        help="record counts per dump, comma-separated (default 50,200,800)")
    parser.add_argument("--shape", type=lambda s: tuple(_ints(s)), default=(512, 1024),
                        help="shape of every tensor, comma-separated (default 512,1024: 2 MiB float32)")
    parser.add_argument("--noise", type=float, default=1e-6,
                        help="relative noise of the target against the baseline (default 1e-6)")
    parser.add_argument("--target-ranks", type=int, default=1,
                        help="write the target as this many tensor-parallel ranks (default 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measured runs per record count (default 1)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="directory for the dumps (kept); default a temporary one, removed at the end")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the middle record count's compare with cProfile (top 10 functions)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def write_pair(root: Path, n: int, shape: tuple[int, ...], noise: float, seed: int,
               ranks: int = 1) -> tuple[Path, Path]:
    """Write baseline and target dumps of ``n`` float32 records of ``shape`` under ``root``
    (the target as ``ranks`` tensor-parallel ranks, split along the last axis)."""
    import torch

    from parity.store.format import FORMAT_VERSION, Record, RunHeader
    from parity.store.writer import DumpWriter

    base_dir, target_dir = root / f"n{n}-baseline", root / f"n{n}-target"
    header = RunHeader(format_version=FORMAT_VERSION, rank=0, world_size=1, mode="full",
                       created=time.strftime("%Y-%m-%dT%H:%M:%S"), spec={"bench": "compare_memory"},
                       model={"name": "synthetic"}, env={"torch": torch.__version__})
    writers = [DumpWriter(base_dir, header, durable=False)]
    for rank in range(ranks):
        writers.append(DumpWriter(target_dir, RunHeader(
            format_version=FORMAT_VERSION, rank=rank, world_size=ranks, mode="full", created=header.created,
            spec=header.spec, model=header.model, env=header.env,
            layout={"tp_rank": rank, "tp_size": ranks, "dp_rank": 0, "dp_size": 1} if ranks > 1 else {}),
            durable=False))
    for w in writers:
        w.open()
    # Random numbers are the slow part of writing, so draw a small pool once and derive each
    # record from it with a per-record scale (the values do not matter to memory or speed).
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(POOL):
        # Activation-like: unit normal, a per-row scale, a few large outlier channels.
        x = torch.randn(shape, generator=gen)
        if len(shape) >= 2:
            x *= torch.rand(shape[:-1] + (1,), generator=gen) * 2 + 0.1
            x[..., : max(1, shape[-1] // 256)] *= 20
        pool.append(x)
    factors = [1 + noise * torch.randn(shape, generator=gen) for _ in range(POOL)]
    try:
        for i in range(n):
            base = pool[i % POOL] * (0.5 + (i % 97) / 97)
            target = base * factors[(i // POOL + i) % POOL]
            pieces = [base] + list(target.chunk(ranks, dim=-1))
            for w, tensor in zip(writers, pieces):
                tags = {"layer": i, **({"shard": "split:-1"} if ranks > 1 else {})}
                record = Record(name=f"model.layers.{i}.mlp", step=0, rank=w.header.rank, order=i,
                                shape=tuple(tensor.shape), dtype="float32", file=None,
                                key=f"model.layers.{i}.mlp/step0", stats={}, tags=tags)
                w.add(record, tensor.contiguous())
    finally:
        for w in writers:
            w.close()
    return base_dir, target_dir


def write_pairs_in_child(root: Path, counts: list[int], shape: tuple[int, ...],
                         noise: float, ranks: int = 1) -> dict[int, tuple[Path, Path]]:
    """:func:`write_pair` for every count, in one child process, so that this process never
    imports torch: a large parent would not change the VmHWM of the measured processes (it
    starts afresh at exec) but would inflate their ``ru_maxrss``, which Linux carries over
    exec from the forked copy of the parent."""
    cmd = [sys.executable, str(Path(__file__).resolve()), WRITE_COMMAND, str(root),
           ",".join(map(str, counts)), ",".join(map(str, shape)), repr(noise), str(ranks)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"writing the dumps failed: {proc.stderr.strip()[-2000:]}")
    pairs = {}
    for line in proc.stdout.splitlines():
        n, base, target = line.split("\t")
        pairs[int(n)] = (Path(base), Path(target))
    return pairs


def _write_main(argv: list[str]) -> None:
    root, counts, shape, noise, ranks = argv
    for index, n in enumerate(_ints(counts)):
        base, target = write_pair(Path(root), n, tuple(_ints(shape)), float(noise), seed=1234 + index,
                                  ranks=int(ranks))
        print(n, base, target, sep="\t", flush=True)


def run_compare(base: Path, target: Path, out: Path) -> dict:
    """Run one compare in a fresh wrapped process; returns its measurements."""
    result = out.with_suffix(".rusage.json")
    cmd = [sys.executable, "-c", WRAPPER, str(result), "compare", str(base), str(target), "--json", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"wrapper failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    measured = json.loads(result.read_text())
    if measured["code"] not in (0, 1):  # 1: a divergence was found, still a full compare
        raise RuntimeError(f"parity compare exited {measured['code']}: {proc.stderr.strip()[-2000:]}")
    report = json.loads(out.read_text())
    measured["wall_s"] = wall
    measured["verdict"] = report["summary"]["verdict"]
    measured["pairs"] = report["summary"]["pairs"]
    return measured


def profile_compare(base: Path, target: Path, out: Path, top: int = 10) -> str:
    cmd = [sys.executable, "-c", PROFILE_WRAPPER, str(top), "compare", str(base), str(target), "--json", str(out)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc.stderr


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = sorted(set(args.records))
    shape = tuple(args.shape)
    own_workdir = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="parity-bench-")) if own_workdir else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    tensor_mib = 4 * math.prod(shape) / (1 << 20)
    print(f"parity compare memory benchmark: float32 {list(shape)} tensors ({tensor_mib:.3g} MiB each), "
          f"records {counts}, relative noise {args.noise:g}, repeat {args.repeat}, "
          f"target ranks {args.target_ranks}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, workdir {root}")
    try:
        t0 = time.perf_counter()
        for n in counts:
            if (root / f"n{n}-baseline").exists() or (root / f"n{n}-target").exists():
                raise RuntimeError(f"{root} already holds dumps for N={n}; choose an empty --workdir")
        pairs = write_pairs_in_child(root, counts, shape, args.noise, args.target_ranks)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = warm_page_cache(*(d for pair in pairs.values() for d in pair))
        print(f"wrote {cached / GB:.2f} GB of dumps in {write_s:.1f} s; read back (page cache warm-up) "
              f"in {time.perf_counter() - t0:.1f} s")
        smallest = counts[0]
        run_compare(*pairs[smallest], root / "warmup.json")  # unmeasured: imports, .pyc, page cache

        rows = []
        print("measuring ...", flush=True)
        for n in counts:
            runs = [run_compare(*pairs[n], root / f"n{n}-report.json") for _ in range(args.repeat)]
            size = data_bytes(*pairs[n])
            best = min(r["wall_s"] for r in runs)
            rows.append({
                "n": n, "gb": size / GB, "wall_s": best, "gbps": size / GB / best,
                "rss_mb": max(r["hwm_bytes"] or r["maxrss_bytes"] for r in runs) / MB,
                "maxrss_mb": max(r["maxrss_bytes"] for r in runs) / MB,
                "anon_mb": (max(r["peak_anon_bytes"] for r in runs) / MB
                            if runs[0]["peak_anon_bytes"] is not None else None),
                "file_mb": (max(r["peak_file_bytes"] for r in runs) / MB
                            if runs[0]["peak_file_bytes"] is not None else None),
                "verdict": runs[-1]["verdict"], "pairs": runs[-1]["pairs"],
            })

        print()
        print(f"{'records':>8} {'input GB':>9} {'wall s':>7} {'GB/s':>6} {'peak RSS MB':>12} "
              f"{'peak anon MB':>13} {'peak file MB':>13}  verdict")
        for r in rows:
            anon = f"{r['anon_mb']:13.0f}" if r["anon_mb"] is not None else f"{'n/a':>13}"
            file_ = f"{r['file_mb']:13.0f}" if r["file_mb"] is not None else f"{'n/a':>13}"
            print(f"{r['n']:>8} {r['gb']:9.2f} {r['wall_s']:7.2f} {r['gbps']:6.2f} {r['rss_mb']:12.0f} "
                  f"{anon} {file_}  {r['verdict']} ({r['pairs']} pairs)")
        for r in rows:
            if r["pairs"] != r["n"]:
                print(f"warning: N={r['n']}: the report has {r['pairs']} pairs, expected {r['n']}")
        lo, hi = rows[0], rows[-1]
        ratio = hi["rss_mb"] / lo["rss_mb"]
        limit = 1.25 * lo["rss_mb"] + 50
        bounded = hi["rss_mb"] <= limit
        print()
        print(f"peak RSS ratio (N={hi['n']} / N={lo['n']}): {ratio:.2f}x for {hi['gb'] / lo['gb']:.0f}x the input "
              f"(limit {limit:.0f} MB = 1.25 x {lo['rss_mb']:.0f} + 50)")
        if lo["anon_mb"] is not None:
            print(f"of which anonymous memory: {lo['anon_mb']:.0f} MB at N={lo['n']}, {hi['anon_mb']:.0f} MB "
                  f"at N={hi['n']}; file-backed (mapped shards): {lo['file_mb']:.0f} -> {hi['file_mb']:.0f} MB")
        print(f"bounded: {'yes' if bounded else 'no'}")

        if args.profile:
            n = counts[len(counts) // 2]
            print(f"\ncProfile of one compare at N={n}:")
            print(profile_compare(*pairs[n], root / "profile.json"))
        return 0 if bounded else 1
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if own_workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == [WRITE_COMMAND]:  # internal: see write_pairs_in_child
        _write_main(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
