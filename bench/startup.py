"""Benchmark: how long do short ``parity`` commands take, process start included?

What it measures
    Wall time (median of ``--repeat`` runs, default 5, after one unmeasured run that warms
    the ``.pyc`` files and the page cache) of:

    - ``python -m parity.cli --help`` and the installed entry point ``.venv/bin/parity --help``
      (goal: at most 0.3 s each);
    - ``parity compare BASE TARGET --json OUT`` end to end on a pair of dumps of ``--records``
      (default 100) small float32 records of ``[64, 128]`` (goal: at most 1.5 s; exit code 1,
      a divergence found, counts as a completed compare);
    - for reference (no goal): ``python -c pass`` (the interpreter alone),
      ``import parity.compare.fastpath`` (must stay cheap: numba is imported lazily) and
      ``fastpath.available()`` (whether numba and llvmlite are installed; neither is imported:
      compiled code comes later, loaded from the kernel cache with llvmlite).

    The dumps are written by a child process (torch is imported there only) with
    :class:`parity.store.writer.DumpWriter` (``durable=False``); the target is the baseline
    times ``1 + 1e-3 * randn``.

Running it
    ``.venv/bin/python bench/startup.py``. Options: ``--repeat 5``, ``--records 100``,
    ``--workdir DIR`` (default: a fresh temporary directory, removed at the end). Takes about
    20 s. Exit status 0 when every goal is met, 1 when one is missed, 2 when a command failed.

Figures vary with machine load (on a shared machine, other processes compete for the CPU);
the median damps outliers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRITE_COMMAND = "_write"
SHAPE = (64, 128)


def write_dumps(root: Path, records: int) -> tuple[Path, Path]:
    """Child: write the baseline and target dumps of ``records`` small float32 tensors."""
    import torch

    from parity.store.format import FORMAT_VERSION, Record, RunHeader
    from parity.store.writer import DumpWriter

    dirs = (root / "baseline", root / "target")
    header = RunHeader(format_version=FORMAT_VERSION, mode="full", created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                       spec={"bench": "startup"}, model={"name": "synthetic"}, env={"torch": torch.__version__})
    writers = [DumpWriter(d, header, durable=False) for d in dirs]
    for w in writers:
        w.open()
    gen = torch.Generator().manual_seed(7)
    try:
        for i in range(records):
            base = torch.randn(SHAPE, generator=gen)
            target = base * (1 + 1e-3 * torch.randn(SHAPE, generator=gen))
            for w, tensor in zip(writers, (base, target)):
                record = Record(name=f"model.layers.{i}.mlp", step=0, rank=0, order=i, shape=SHAPE, dtype="float32",
                                file=None, key=f"model.layers.{i}.mlp/step0", stats={}, tags={"layer": i})
                w.add(record, tensor.contiguous())
    finally:
        for w in writers:
            w.close()
    return dirs


def timed(cmd: list[str], repeat: int, ok: tuple[int, ...] = (0,)) -> list[float]:
    """Run ``cmd`` once unmeasured, then ``repeat`` times; returns the wall times."""
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        elapsed = time.perf_counter() - t0
        if proc.returncode not in ok:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        if i:
            times.append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="measured runs per command (default 5)")
    parser.add_argument("--records", type=int, default=100, help="records per dump (default 100)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="directory for the dumps (kept); default a temporary one, removed at the end")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.records < 1:
        parser.error("--repeat and --records must be >= 1")
    own = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="parity-startup-")) if own else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    entry = Path(py).parent / "parity"
    print(f"parity start-up benchmark: median of {args.repeat} runs; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        if (root / "baseline").exists() or (root / "target").exists():
            raise RuntimeError(f"{root} already holds dumps; choose an empty --workdir")
        proc = subprocess.run([py, str(Path(__file__).resolve()), WRITE_COMMAND, str(root), str(args.records)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"writing the dumps failed: {proc.stderr.strip()[-2000:]}")
        base, target = root / "baseline", root / "target"
        report = root / "report.json"
        rows = [
            ("python -c pass (interpreter alone)", [py, "-c", "pass"], None, (0,)),
            ("python -m parity.cli --help", [py, "-m", "parity.cli", "--help"], 0.3, (0,)),
        ]
        if entry.exists():
            rows.append((f"{entry.name} --help (installed entry point)", [str(entry), "--help"], 0.3, (0,)))
        else:
            print(f"note: no installed entry point at {entry}; skipped")
        rows += [
            (f"parity compare, {args.records} records, --json",
             [py, "-m", "parity.cli", "compare", str(base), str(target), "--json", str(report)], 1.5, (0, 1)),
            ("python -c 'import parity.compare.fastpath'", [py, "-c", "import parity.compare.fastpath"], None, (0,)),
            ("python -c 'fastpath.available()'",
             [py, "-c", "from parity.compare import fastpath; assert fastpath.available()"], None, (0,)),
        ]
        print(f"{'command':<52} {'median s':>9} {'min s':>7} {'max s':>7}  goal")
        met = True
        for label, cmd, goal, ok in rows:
            times = timed(cmd, args.repeat, ok)
            median = statistics.median(times)
            verdict = ""
            if goal is not None:
                verdict = f"<= {goal} s: {'met' if median <= goal else 'MISSED'}"
                met &= median <= goal
            print(f"{label:<52} {median:9.3f} {min(times):7.3f} {max(times):7.3f}  {verdict}", flush=True)
        return 0 if met else 1
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == [WRITE_COMMAND]:
        write_dumps(Path(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
