"""Comparing the pairs of one comparison in several processes: local workers or torchrun ranks.

The pairs are dealt out by size (largest first, each to the least loaded share), so every
share reads about as many bytes. Each process opens both dumps itself, rebuilds the same pair
list (pairing is deterministic), evaluates its share and sends back only the outcomes — never
tensor data — so memory per process stays that of one pair.

- ``workers > 1`` (``parity compare --workers N``): N processes started with ``spawn`` (no
  fork of a process that may hold threads); about a second of start-up per worker, worth it
  for dumps of many GB.
- ``torchrun`` (``parity compare --distributed``): every rank of the default process group
  (gloo, initialised here from the torchrun environment when needed) takes share ``rank`` of
  ``world_size`` and the outcomes are all-gathered, so every rank holds the full report (only
  rank 0 prints and writes files). Across hosts, every host needs the dump directories at the
  same path (a shared file system).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from parity.compare.pairing import Pair, RenameRule
from parity.compare.result import Outcome
from parity.compare.tolerance import TolerancePolicy


@dataclass
class Job:
    """Everything a process needs to rebuild the pair list and evaluate pairs (picklable)."""

    baseline: str
    target: str
    policy: TolerancePolicy
    renames: Sequence[RenameRule] = ()
    shards: Sequence[str] = ()
    align: str = "steps"
    allow_missing: Sequence[str] = ()
    allow_failed: Sequence[str] = ()
    indices: list[int] = field(default_factory=list)


def deal(pairs: Sequence[Pair], shares: int) -> list[list[int]]:
    """Pair indices per share, balanced by bytes (largest pair first to the lightest share)."""
    def size(pair: Pair) -> int:
        return sum(r.nbytes for r in (pair.baseline, pair.target) if r is not None and r.file is not None)

    order = sorted(range(len(pairs)), key=lambda i: -size(pairs[i]))
    loads = [0] * shares
    out: list[list[int]] = [[] for _ in range(shares)]
    for index in order:
        lightest = loads.index(min(loads))
        out[lightest].append(index)
        loads[lightest] += size(pairs[index]) + 1
    return [sorted(share) for share in out]


def evaluate_job(job: Job) -> list[tuple[int, Outcome]]:
    """Open both dumps, rebuild the pairs and evaluate ``job.indices`` (runs in a worker)."""
    from parity.capturing.taps import compile_tap
    from parity.compare.engine import evaluate_pair, prepare

    base, target, pairs, _ = prepare(job.baseline, job.target, renames=job.renames, shards=job.shards,
                                     align=job.align)
    missing = [compile_tap(p) for p in job.allow_missing]
    failed = [compile_tap(p) for p in job.allow_failed]
    try:
        return [(i, evaluate_pair(pairs[i], base, target, job.policy, allow_missing=missing, allow_failed=failed))
                for i in job.indices]
    finally:
        base.close()
        target.close()


def run_workers(job: Job, pairs: Sequence[Pair], workers: int,
                progress: Callable[[int, int, str], None] | None = None) -> list[Outcome]:
    """Evaluate every pair in ``workers`` spawned processes; outcomes in pair order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from dataclasses import replace

    shares = [s for s in deal(pairs, workers) if s]
    results: dict[int, Outcome] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(shares), mp_context=context) as pool:
        futures = [pool.submit(evaluate_job, replace(job, indices=share)) for share in shares]
        for future in as_completed(futures):
            for index, outcome in future.result():
                results[index] = outcome
            if progress is not None:
                progress(len(results), len(pairs), "")
    return [results[i] for i in range(len(pairs))]


def run_distributed(job: Job, pairs: Sequence[Pair]) -> list[Outcome]:
    """Evaluate this rank's share of the pairs and all-gather every rank's outcomes (pair order).

    An error on any rank is raised on every rank (as a :class:`ParityError` with the first
    failing rank's message), so all ranks stop together and the launcher sees one cause.
    """
    from dataclasses import replace

    from parity.errors import ParityError

    require_torchrun()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        mine: Any = ("ok", evaluate_job(replace(job, indices=deal(pairs, world)[rank])))
    except ParityError as exc:
        mine = ("error", f"rank {rank}: {exc.one_line()}")
    except Exception as exc:  # noqa: BLE001 - sent to every rank, reported once
        mine = ("error", f"rank {rank}: internal error: {type(exc).__name__}: {exc}")
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    for status, payload in gathered:
        if status == "error":
            raise ParityError(payload)
    results = dict(item for _, share in gathered for item in share)
    return [results[i] for i in range(len(pairs))]


def require_torchrun() -> None:
    """Raise :class:`UsageError` unless the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) is there."""
    import os

    from parity.errors import UsageError

    if not all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        raise UsageError("--distributed runs under torchrun (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are "
                         "not set)", hint="torchrun --nproc-per-node N -m parity.cli compare A B --distributed")


def finish_distributed() -> None:
    """Leave the process group run_distributed joined (safe to call when none exists)."""
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - shutting down: nothing left to report
        pass
