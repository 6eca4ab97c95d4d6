"""Benchmark: how many GB/s of input does comparing two dumps process, and how exact is it?

What it measures
    For each variant (``fp32``, ``bf16``) it writes a baseline and a target dump of about
    ``--gb`` GB each (default 2.0) with :class:`parity.store.writer.DumpWriter` (``durable=False``):
    activation-like ``[2048, 4096]`` tensors (unit normal, a per-row scale, a few outlier
    channels, 32 MiB in float32, 16 MiB in bfloat16) plus 200 small ``[64, 128]`` ones; the
    target is the baseline times ``1 + 1e-3 * randn`` (so pairs fail the default tolerance and
    every metric has work to do). After writing them back to disk (``os.sync``: the kernel's
    flusher threads would otherwise compete with the measurements) and reading every data file
    once (page cache warm-up) it times, in the same run, each in a fresh process:

    (a) ``cli``: ``python -m parity.cli compare BASE TARGET --json OUT`` end to end (process
        start, imports, report writing included): whatever ``engine.py`` does today; it runs
        with the kernel cache that (c) filled (compiling is measured separately, below);
    (b) ``naive``: a naive float64 reference: each pair read whole, widened to float64, the
        metrics computed straightforwardly with numpy (the definitions of ``metrics.py``);
    (c) ``fast``: :func:`parity.compare.fastpath.fast_pair_metrics` over the memory-mapped pairs
        (``load_run`` + ``Run.raw``, which verifies each record's checksum, pages released after each
        pair, as the engine does), with
        ``--workers`` threads (default 2), and (d) ``fast-1t``: the same on one thread.

    (e) ``cli-unverified``: (a) on copies of the two dumps whose manifests carry no checksums
        (format 1.2; the shards are hard links to the same files, so the same page cache): the
        cost of verifying every tensor's checksum on read is (a) against (e).

    (a), (c), (d) and (e) run ``--repeat`` times (default 5) in interleaved rounds (a, c, d, a, c,
    d, ...: a change of the machine's load hits all three); the median is reported, with the
    range from the slowest to the fastest round, and the largest peak RSS of the rounds; the
    kernel set-up times come from the last round; (b) runs once. Throughput is input bytes
    (tensor data of both sides) / wall time of the loop over pairs (for ``cli``: of the whole
    process). It also prints what the page faults of the mapped shards cost per GB
    (:func:`fault_cost`): fresh dumps map fast; with ``--workdir`` reused dumps whose pages
    were evicted and read back may map ~10x slower, and every figure then drops. Peak RSS is the ``VmHWM`` of the measuring process
    (the memory-mapped pages it touched count; they are page cache). ``fast`` also reports
    the time to get the kernels ready in a fresh process: ``fastpath.available()`` plus loading
    their machine code from the kernel cache (numba is not imported then), and (measured once,
    in a process pointed at an empty cache directory, ``NUMBA_CACHE_DIR``) the first-call
    compile time of each dtype combination in use.

    Exactness: (b) and (c) print the metrics of every pair; the bench checks that counts,
    maxima, indices and flags are identical and reports the largest relative difference of
    the summed metrics (mean |Δ|, relative L2, cosine, SQNR) and of ``needed_rtol`` (the
    reference's ulp fix-up is not in the naive code: at most one ulp apart).

Running it
    ``.venv/bin/python bench/compare_throughput.py``. Options: ``--gb 2.0`` (size of each dump),
    ``--variants fp32,bf16``, ``--workers 2``, ``--repeat 5``, ``--skip-cli`` / ``--skip-naive`` (the two slow
    measurements), ``--workdir DIR`` (default: a fresh temporary directory, removed at the end;
    a given DIR is kept). The variants are written and measured one at a time (each one's
    dumps are deleted before the next is written), so it needs 2 x ``--gb`` GB of free disk
    (checked first; 4 GB with the defaults) and as much free RAM to keep them cached (with
    ``--workdir`` the dumps are kept, and reused by a later run with the same DIR); takes
    about 2 minutes on a two-core machine with the defaults.

Units: GB = 10^9 bytes. The machine may be shared: every figure of one run is taken within
minutes of the others, so the ratios are the meaningful part; absolute figures vary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import data_bytes, warm_page_cache

GB = 1_000_000_000
MB = 1_000_000
WRITE_COMMAND = "_write"
MEASURE_COMMAND = "_measure"
BIG = (2048, 4096)
SMALL = (64, 128)
N_SMALL = 200
NOISE = 1e-3
POOL = 6

#: Runs the CLI in-process as ``python -m parity.cli`` does; writes exit code and VmHWM.
WRAPPER = r"""
import json, runpy, sys
result_path, cli_args = sys.argv[1], sys.argv[2:]
sys.argv = ["parity", *cli_args]
code = 0
try:
    runpy.run_module("parity.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
hwm = 0
with open("/proc/self/status") as fh:
    for line in fh:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
with open(result_path, "w") as fh:
    json.dump({"code": code, "hwm_bytes": hwm}, fh)
"""


# --------------------------------------------------------------------------- writing (child)


def write_variant(root: Path, variant: str, gb: float, seed: int) -> tuple[Path, Path]:
    """Write the baseline and target dumps of one variant; returns their directories."""
    import torch

    from parity.capturing.stats import tensor_stats  # as a capture stores them (the scale floor reads l2)
    from parity.store.format import FORMAT_VERSION, Record, RunHeader
    from parity.store.writer import DumpWriter

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[variant]
    name = {"fp32": "float32", "bf16": "bfloat16"}[variant]
    itemsize = 4 if variant == "fp32" else 2
    small_bytes = N_SMALL * math.prod(SMALL) * itemsize
    n_big = max(1, math.ceil((gb * GB - small_bytes) / (math.prod(BIG) * itemsize)))
    gen = torch.Generator().manual_seed(seed)

    def activation(shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.randn(shape, generator=gen)
        x *= torch.rand(shape[:-1] + (1,), generator=gen) * 2 + 0.1
        x[..., : max(1, shape[-1] // 256)] *= 20
        return x

    big = [activation(BIG) for _ in range(POOL)]
    factors = [1 + NOISE * torch.randn(BIG, generator=gen) for _ in range(POOL)]
    dirs = (root / f"{variant}-baseline", root / f"{variant}-target")
    header = RunHeader(format_version=FORMAT_VERSION, mode="full", created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                       spec={"bench": "compare_throughput"}, model={"name": "synthetic"},
                       env={"torch": torch.__version__})
    writers = [DumpWriter(d, header, durable=False) for d in dirs]
    for w in writers:
        w.open()
    try:
        items: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for i in range(n_big):
            base = big[i % POOL] * (0.5 + (i % 7) / 7)
            items.append((f"model.layers.{i}.mlp", base, base * factors[(i + i // POOL) % POOL]))
        for i in range(N_SMALL):
            base = activation(SMALL)
            items.append((f"model.heads.{i}.proj", base, base * (1 + NOISE * torch.randn(SMALL, generator=gen))))
        for order, (label, base, target) in enumerate(items):
            for w, tensor in zip(writers, (base, target)):
                tensor = tensor.to(dtype).contiguous()
                record = Record(name=label, step=0, rank=0, order=order, shape=tuple(tensor.shape), dtype=name,
                                file=None, key=f"{label}/step0", stats=tensor_stats(tensor), tags={})
                w.add(record, tensor)
    finally:
        for w in writers:
            w.close()
    return dirs


def _write_main(argv: list[str]) -> None:
    root, variant, gb = Path(argv[0]), argv[1], float(argv[2])
    base, target = write_variant(root, variant, gb, seed=1234 + len(variant))
    print(base, target, sep="\t", flush=True)


# --------------------------------------------------------------------------- measuring (child)


def naive_metrics(b: np.ndarray, t: np.ndarray, rtol: float, atol: float) -> dict:
    """Straightforward float64 definitions over whole tensors (finite data assumed)."""
    import numpy as np

    d = t - b
    ad, ab = np.abs(d), np.abs(b)
    i = int(np.argmax(ad))
    sum_bb, sum_tt, sum_dd = float(np.dot(b, b)), float(np.dot(t, t)), float(np.dot(d, d))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = ad / ab
    over_abs = ad > atol
    nb, nt, nd = math.sqrt(sum_bb), math.sqrt(sum_tt), math.sqrt(sum_dd)
    return {
        "max_abs": float(ad[i]), "max_abs_index": i, "mean_abs": float(ad.mean()),
        "max_rel": float(np.fmax.reduce(rel, initial=0.0)),
        "rel_l2": nd / nb if nb else (0.0 if nd == 0 else math.inf),
        "cosine": 1.0 if sum_dd == 0 else float(np.dot(t, b)) / (nb * nt) if nb and nt else 0.0,
        "sqnr_db": math.inf if sum_dd == 0 else 10 * math.log10(sum_bb / sum_dd) if sum_bb else -math.inf,
        "mismatched": int(np.count_nonzero(ad > np.maximum(atol, rtol * ab))),
        "needed_atol": float(np.max(ad, where=ad > rtol * ab, initial=0.0)),
        "needed_rtol": float(np.fmax.reduce(rel, where=over_abs, initial=0.0)),
        "all_zero_baseline": not bool(np.any(b)), "constant_baseline": bool(b.size > 1 and b.min() == b.max()),
    }


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _measure_main(argv: list[str]) -> None:
    """Child: ``_measure MODE BASE TARGET WORKERS OUT``; writes timings, VmHWM and metrics as JSON."""
    mode, base_dir, target_dir, workers, out = argv[0], argv[1], argv[2], int(argv[3]), argv[4]
    t_start = time.perf_counter()
    import numpy as np

    from parity.compare.pairing import pair_records
    from parity.compare.tolerance import TolerancePolicy
    from parity.store.reader import load_run
    from parity.store.safetensors_io import to_float

    result: dict = {"mode": mode}
    fast = None
    if mode.startswith("fast"):
        from parity.compare import fastpath

        t0 = time.perf_counter()
        if not fastpath.available():
            raise SystemExit("numba is not available: the fast path cannot be measured")
        result["available_s"] = time.perf_counter() - t0
        fast = fastpath.fast_pair_metrics
    base, target = load_run(base_dir), load_run(target_dir)
    policy = TolerancePolicy()
    pairs = pair_records(base.records, target.records, ())
    tol = {p.name: policy.resolve(p.name, p.baseline.dtype, p.target.dtype) for p in pairs}
    if fast is not None:  # kernels ready (compiled, or loaded from the kernel cache) before the timed loop
        t0 = time.perf_counter()
        seen = set()
        for p in pairs:
            key = (p.baseline.dtype, p.target.dtype)
            if key not in seen:
                seen.add(key)
                fast(base.raw(p.baseline).reshape(-1)[:64], key[0], target.raw(p.target).reshape(-1)[:64], key[1],
                     rtol=0.0, atol=0.0, workers=workers)
        result["kernel_ready_s"] = time.perf_counter() - t0
    metrics = {}
    nbytes = 0
    t0 = time.perf_counter()
    for p in pairs:
        b_rec, t_rec = p.baseline, p.target
        rtol, atol = tol[p.name].rtol, tol[p.name].atol
        b_raw, t_raw = base.raw(b_rec), target.raw(t_rec)
        nbytes += b_raw.nbytes + t_raw.nbytes
        if fast is not None:
            m = fast(b_raw, b_rec.dtype, t_raw, t_rec.dtype, rtol=rtol, atol=atol, workers=workers)
            flat_index = int(np.ravel_multi_index(m.max_abs_index, b_raw.shape)) if m.max_abs_index else 0
            metrics[p.name] = {
                "max_abs": m.max_abs, "max_abs_index": flat_index, "mean_abs": m.mean_abs, "max_rel": m.max_rel,
                "rel_l2": m.rel_l2, "cosine": m.cosine, "sqnr_db": m.sqnr_db, "mismatched": m.mismatched,
                "needed_atol": m.needed_atol, "needed_rtol": m.needed_rtol,
                "all_zero_baseline": m.all_zero_baseline, "constant_baseline": m.constant_baseline}
        else:
            b64 = to_float(b_raw.reshape(-1), b_rec.dtype)
            t64 = to_float(t_raw.reshape(-1), t_rec.dtype)
            metrics[p.name] = naive_metrics(b64, t64, rtol, atol)
            del b64, t64
        del b_raw, t_raw
        base.release(b_rec)
        target.release(t_rec)
    result["loop_s"] = time.perf_counter() - t0
    result["process_s"] = time.perf_counter() - t_start
    result["bytes"] = nbytes
    result["pairs"] = len(pairs)
    result["hwm_bytes"] = _status_bytes("VmHWM")
    result["metrics"] = metrics
    base.close()
    target.close()
    Path(out).write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent


def run_child(args: list[str], env: dict | None = None) -> None:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}): {proc.stderr.strip()[-3000:]}")


def measure(mode: str, base: Path, target: Path, workers: int, out: Path, env: dict | None = None) -> dict:
    run_child([MEASURE_COMMAND, mode, str(base), str(target), str(workers), str(out)], env=env)
    return json.loads(out.read_text())


def measure_cli(base: Path, target: Path, out: Path, env: dict | None = None) -> dict:
    result = out.with_suffix(".hwm.json")
    cmd = [sys.executable, "-c", WRAPPER, str(result), "compare", str(base), str(target), "--json", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False,
                          env=env)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1) or not result.exists():
        raise RuntimeError(f"parity compare failed (exit {proc.returncode}): {proc.stderr.strip()[-3000:]}")
    measured = json.loads(result.read_text())
    if measured["code"] not in (0, 1):
        raise RuntimeError(f"parity compare exited {measured['code']}: {proc.stderr.strip()[-3000:]}")
    report = json.loads(out.read_text())
    return {"wall_s": wall, "hwm_bytes": measured["hwm_bytes"], "pairs": report["summary"]["pairs"]}


def compare_metrics(fast: dict, naive: dict) -> dict:
    """Exact fields identical? Largest relative difference of summed metrics and needed_rtol."""
    exact_fields = ("max_abs", "max_abs_index", "max_rel", "mismatched", "needed_atol",
                    "all_zero_baseline", "constant_baseline")
    worst_sum, worst_rtol, mismatches = 0.0, 0.0, []
    for name, f in fast.items():
        n = naive[name]
        for key in exact_fields:
            if f[key] != n[key]:
                mismatches.append(f"{name}.{key}: fast {f[key]!r} naive {n[key]!r}")
        for key in ("mean_abs", "rel_l2", "cosine", "sqnr_db"):
            a, b = f[key], n[key]
            if a != b:
                worst_sum = max(worst_sum, abs(a - b) / max(abs(b), 1e-300))
        a, b = f["needed_rtol"], n["needed_rtol"]
        if a != b:
            worst_rtol = max(worst_rtol, abs(a - b) / max(abs(b), 1e-300))
    return {"exact_equal": not mismatches, "mismatches": mismatches[:5], "worst_sum_rel": worst_sum,
            "worst_needed_rtol_rel": worst_rtol}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="size of each dump in GB (default 2.0)")
    parser.add_argument("--variants", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--workers", type=int, default=2, help="threads of the fast path (default 2)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed rounds of (a), (c) and (d); the median is reported (default 5)")
    parser.add_argument("--skip-cli", action="store_true", help="do not time `parity compare` end to end")
    parser.add_argument("--skip-naive", action="store_true", help="do not time the naive float64 reference")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="directory for the dumps (kept); default a temporary one, removed at the end")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.repeat < 1:
        parser.error("--repeat takes a positive number")
    if not args.variants or any(v not in ("fp32", "bf16") for v in args.variants):
        parser.error("--variants takes fp32 and/or bf16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="parity-throughput-")) if own else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    need = 2 * args.gb * GB * 1.02
    free = shutil.disk_usage(root).free
    print(f"parity compare throughput benchmark: variants {args.variants}, {args.gb:g} GB per dump, "
          f"fast path on {args.workers} threads")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, workdir {root}, {free / GB:.1f} GB free")
    if free < need * 1.1:
        print(f"error: {root} has {free / GB:.1f} GB free; one variant needs {need / GB:.1f} GB", file=sys.stderr)
        return 2
    rows = []
    try:
        for variant in args.variants:
            t0 = time.perf_counter()
            base, target = root / f"{variant}-baseline", root / f"{variant}-target"
            reused = not own and base.exists() and target.exists()
            if not reused:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), WRITE_COMMAND, str(root),
                                       variant, repr(args.gb)], capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"writing the {variant} dumps failed: {proc.stderr.strip()[-3000:]}")
                os.sync()  # written back now, not by the kernel's flusher threads while we measure
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            cached = warm_page_cache(base, target, pattern="*.safetensors")
            size = data_bytes(base, target)
            print(f"\n[{variant}] {'reused' if reused else 'wrote'} {size / GB:.2f} GB (both dumps) in {write_s:.1f} s; "
                  f"page cache warm-up "
                  f"{cached / GB:.2f} GB in {time.perf_counter() - t0:.1f} s; page faults of the mapped shards "
                  f"{fault_cost(base, target):.3f} s per GB", flush=True)

            # Compile time from scratch: a process whose numba cache directory is empty; the
            # measured processes then load the kernels from that cache.
            cache_dir = root / f"numba-cache-{variant}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
            cold = measure("fast", base, target, args.workers, root / f"{variant}-cold.json", env=env)
            # --repeat rounds, each timing the CLI, the fast path and the fast path on one thread
            # in turn (a drift of the machine's load hits all three); the median of each is reported
            timings: dict[str, list[tuple[float, int]]] = {"cli": [], "fast": [], "fast-1t": [], "cli-unverified": []}
            plain = (unverified_copy(base, root / f"{variant}-baseline-unverified"),
                     unverified_copy(target, root / f"{variant}-target-unverified"))
            warm: dict = {}
            for _ in range(args.repeat):
                if not args.skip_cli:
                    cli = measure_cli(base, target, root / f"{variant}-report.json", env=env)
                    timings["cli"].append((cli["wall_s"], cli["hwm_bytes"]))
                    cli = measure_cli(*plain, root / f"{variant}-report-unverified.json", env=env)
                    timings["cli-unverified"].append((cli["wall_s"], cli["hwm_bytes"]))
                warm = measure("fast", base, target, args.workers, root / f"{variant}-fast.json", env=env)
                timings["fast"].append((warm["loop_s"], warm["hwm_bytes"]))
                one = measure("fast-1t", base, target, 1, root / f"{variant}-fast1.json", env=env)
                timings["fast-1t"].append((one["loop_s"], one["hwm_bytes"]))
            result = {"variant": variant, "bytes": warm["bytes"], "pairs": warm["pairs"],
                      "compile_s": cold["kernel_ready_s"], "ready_s": warm["kernel_ready_s"],
                      "available_s": warm["available_s"], "repeat": args.repeat}
            result.update({key: summarize(runs) for key, runs in timings.items() if runs})
            if not args.skip_naive:
                naive = measure("naive", base, target, 1, root / f"{variant}-naive.json")
                result["naive"] = summarize([(naive["loop_s"], naive["hwm_bytes"])])
                result["check"] = compare_metrics(warm["metrics"], naive["metrics"])
            rows.append(result)
            print_variant(result, args.workers)
            for copy in plain:
                shutil.rmtree(copy, ignore_errors=True)
            if own:  # free the disk (and page cache) before the next variant
                shutil.rmtree(base, ignore_errors=True)
                shutil.rmtree(target, ignore_errors=True)
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def unverified_copy(dump: Path, dest: Path) -> Path:
    """``dump`` as a format-1.2 dump without checksums: manifests rewritten, shards hard-linked."""
    shutil.rmtree(dest, ignore_errors=True)
    for path in dump.rglob("*"):
        target = dest / path.relative_to(dump)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".safetensors":
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            lines = []
            for line in path.read_text().splitlines():
                obj = json.loads(line)
                obj.pop("checksum", None)
                if obj.get("type") == "header":
                    obj["format_version"] = "1.2"
                lines.append(json.dumps(obj))
            target.write_text("\n".join(lines) + "\n")
    return dest


def fault_cost(*dirs: Path) -> float:
    """Seconds per GB to map the shards and touch one byte per page (the page faults alone).

    It depends on how the pages entered the page cache: large folios (files just written, as
    capture leaves them) map ~10x faster than small ones (pages evicted and read back under
    memory pressure), which moves the fp32 figures by up to 0.15 s per 4 GB."""
    import mmap

    seconds, total = 0.0, 0
    for path in sorted(p for d in dirs for p in d.rglob("*.safetensors")):
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        view = np.frombuffer(mapped, dtype=np.uint8)
        t0 = time.perf_counter()
        int(view[::mmap.PAGESIZE].sum())
        seconds += time.perf_counter() - t0
        total += view.size
        del view
        mapped.close()
    return seconds / (total / GB) if total else 0.0


def summarize(runs: list[tuple[float, int]]) -> tuple[float, int, float, float]:
    """(median seconds, largest peak RSS, fastest, slowest) of the runs of one measurement."""
    seconds = [s for s, _ in runs]
    return statistics.median(seconds), max(h for _, h in runs), min(seconds), max(seconds)


def print_variant(r: dict, workers: int) -> None:
    size = r["bytes"]
    ref = r.get("naive", (None,))[0]
    print(f"[{r['variant']}] {r['pairs']} pairs, {size / GB:.2f} GB of tensor data (both sides); "
          f"(a), (c), (d): median of {r['repeat']} rounds, GB/s range from the slowest to the fastest")
    print(f"  {'measurement':<34} {'seconds':>8} {'GB/s':>7} {'GB/s range':>12} {'vs naive':>9} {'peak RSS MB':>12}")
    labels = {"cli": "(a) parity compare CLI, end to end", "naive": "(b) naive float64 reference",
              "fast": f"(c) fast_pair_metrics, {workers} threads", "fast-1t": "(d) fast_pair_metrics, 1 thread",
              "cli-unverified": "(e) (a) without checksums"}
    for key in ("cli", "cli-unverified", "naive", "fast", "fast-1t"):
        if key not in r:
            continue
        seconds, hwm, fastest, slowest = r[key]
        ratio = f"{ref / seconds:8.1f}x" if ref else f"{'-':>9}"
        spread = f"{size / GB / slowest:.2f}-{size / GB / fastest:.2f}" if fastest != slowest else "-"
        print(f"  {labels[key]:<34} {seconds:8.2f} {size / GB / seconds:7.2f} {spread:>12} {ratio} {hwm / MB:12.0f}")
    if "cli" in r and "cli-unverified" in r:
        print(f"  verifying checksums on read costs the CLI x{r['cli'][0] / r['cli-unverified'][0]:.2f} "
              "its time without them ((a) / (e))")
    print(f"  fast path set-up in a fresh process: available() {r['available_s']:.2f} s, kernels from the cache "
          f"{r['ready_s']:.2f} s; compiling them (empty cache) {r['compile_s']:.2f} s")
    if "check" in r:
        c = r["check"]
        print(f"  fast vs naive: counts/maxima/indices/flags identical: {'yes' if c['exact_equal'] else 'NO'}; "
              f"largest relative difference of summed metrics {c['worst_sum_rel']:.1e}, "
              f"of needed_rtol {c['worst_needed_rtol_rel']:.1e} (ulp fix-up)")
        for line in c["mismatches"]:
            print(f"    {line}")


if __name__ == "__main__":
    if sys.argv[1:2] == [WRITE_COMMAND]:
        _write_main(sys.argv[2:])
        sys.exit(0)
    if sys.argv[1:2] == [MEASURE_COMMAND]:
        _measure_main(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
