"""A capture session: copies tensors out of the forward pass, writes them in the background.

Policy (defaults in brackets):

- The hook thread only copies a tensor (``detach`` + contiguous copy to CPU) and queues it.
  Statistics and file writes happen on one background writer thread. A CUDA tensor is not
  waited for: its copy into pinned host memory (full mode) or its statistics on the device
  (stats mode) are started on the current stream with an event, which the writer thread waits
  for (:mod:`parity.capturing.device_copy`: pinned memory bounded by ``max_pending_bytes``;
  synchronous copy as the fallback). Records produced during CUDA graph capture are skipped
  with a note.
- The queue is bounded by bytes [``max_pending_bytes`` = 512 MiB]. When the writer falls
  behind, the hook thread **blocks** until there is room (a single item larger than the bound
  is still accepted when the queue is empty). Memory never grows without bound; nothing is
  dropped silently.
- ``mode="full"`` stores tensors; ``mode="stats"`` stores only statistics, with a sample of
  [``sample`` = :data:`~parity.capturing.stats.SAMPLE_SIZE` = 32] elements per tensor at
  spread-out positions (0: none), which lets a comparison of two such dumps catch what
  statistics cannot see (a permutation, a sign flip at some elements), with the odds of a sample.
- Never hurt the host: nothing raises into the model's forward. A value that cannot be
  recorded (a meta or nested tensor, a record the reader would refuse: a negative step, an
  empty or over-long name, more than 16 dimensions) is skipped with a note, once per message,
  and capture goes on; a sparse tensor is recorded dense, with a note. An error of the dump
  itself (unwritable directory, disk full) is logged once on the ``parity`` logger, recorded as
  a note when still possible, and turns capture off; ``session.error`` holds the reason. What
  was queued before a failure in the host's code is still written; the step in flight when
  capture stopped is named partial in a note.
- Each completed forward pass (step) is flushed to a durable shard at its end, and a new step
  (:meth:`CaptureSession.next_step`: the next forward pass, or ``parity.next_step()`` in the
  ``PARITY_DUMP_DIR`` mode) starts only once the previous one is durable, so a killed process
  loses at most the step in flight.
- ``out_dir=None`` keeps the capture in memory (:mod:`parity.store.memory`): the same records,
  statistics and validation, no files; ``session.run`` is the run to compare.
- Under torch.distributed every rank writes its own manifest (``manifest-rank{r}.jsonl``) and
  shards into the same directory, without cross-rank locking. Rank and world size come from
  torch.distributed when initialised, else ``RANK``/``WORLD_SIZE``; the parallel ``layout``
  [one tensor-parallel group of all ranks] and the ``sharding`` rules [none] (tap pattern ->
  ``split:DIM`` / ``sum`` / ``replicated``, see :mod:`parity.align.shards`) are stored with the
  run: the layout in the header, each record's annotation in ``tags["shard"]``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import threading
from collections import deque
from pathlib import Path
from typing import Any

import torch

from parity.capturing.device_copy import DeviceCopier, Pending, PendingStats, PendingTensor
from parity.capturing.stats import SAMPLE_SIZE, sample_values, tensor_stats
from parity.capturing.taps import layer_of
from parity.errors import DumpError, UsageError
from parity.store.format import DTYPES, FORMAT_VERSION, MAX_SAMPLE, Record, RunHeader, parse_record
from parity.store.memory import MemoryWriter
from parity.store.writer import SHARD_BYTES, DumpWriter

log = logging.getLogger("parity")

#: Default bound of queued, not yet written bytes (512 MiB).
MAX_PENDING_BYTES = 512 * 1024 * 1024


def environment() -> dict[str, Any]:
    """Versions and device facts stored in the run header."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "platform": platform.platform(), "threads": torch.get_num_threads()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception:  # transformers is optional for capture
        pass
    from parity import __version__

    env["parity"] = __version__
    return env


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 65536 else f"<tensor {list(value.shape)}>"
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _queued_bytes(record: Record, value: Any) -> int:
    """What a queued record counts against ``max_pending_bytes``: its data, or, for statistics
    computed on the device, the few bytes it holds (plus the tensor, when it had to be held)."""
    return value.held_bytes if isinstance(value, PendingStats) else record.nbytes


class CaptureSession:
    """Receives tensors from hooks and explicit dumps; owns the background writer."""

    def __init__(self, out_dir: str | os.PathLike[str] | None, *, mode: str = "full",
                 spec: dict[str, Any] | None = None, model_info: dict[str, Any] | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 layout: dict[str, int] | None = None, sharding: dict[str, str] | None = None,
                 sample: int = SAMPLE_SIZE, max_pending_bytes: int = MAX_PENDING_BYTES,
                 shard_bytes: int = SHARD_BYTES) -> None:
        if mode not in ("full", "stats"):
            raise ValueError(f"mode must be 'full' or 'stats', not {mode!r}")
        if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample <= MAX_SAMPLE:
            raise ValueError(f"sample must be an int from 0 to {MAX_SAMPLE}, not {sample!r}")
        self.sample = sample if mode == "stats" else 0
        auto_rank, auto_world = dist_rank_world()
        rank = auto_rank if rank is None else rank
        world_size = auto_world if world_size is None else world_size
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.mode = mode
        self.sharding: list[Any] = []
        if sharding:
            from parity.align.shards import shard_rules

            self.sharding = shard_rules(sharding)
        self._annotations: dict[str, str | None] = {}  # tap name -> its annotation, matched once
        if layout is None and world_size > 1:
            layout = {"tp_rank": rank, "tp_size": world_size, "dp_rank": 0, "dp_size": 1}
        self.header = RunHeader(
            format_version=FORMAT_VERSION, rank=rank, world_size=world_size, mode=mode, layout=dict(layout or {}),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            spec=spec or {}, model=model_info or {}, env=environment())
        self.max_pending_bytes = max_pending_bytes
        self._copier = DeviceCopier(max_pending_bytes)  # CUDA tensors: copies that do not stall the GPU
        self.error: str | None = None
        self._failed_step = -1
        self.skipped: set[str] = set()
        self.step = -1
        self._order = 0
        self._names: dict[tuple[str, int], int] = {}  # (name, step) -> calls, for NAME#k
        self._queue: deque[tuple[str, Any]] = deque()
        self._pending = 0
        self._queued = 0   # items ever queued
        self._handled = 0  # items the writer thread finished with
        self._cond = threading.Condition()
        self._closed = False
        self._writer: DumpWriter | MemoryWriter = (
            MemoryWriter(self.header) if self.out_dir is None
            else DumpWriter(self.out_dir, self.header, shard_bytes=shard_bytes))
        self._result: Any = None
        self._thread: threading.Thread | None = None
        try:
            self._writer.open()
        except Exception as exc:  # never raise into the host
            self.fail(f"cannot open dump directory: {getattr(exc, 'message', exc)}")
            return
        self._thread = threading.Thread(target=self._run, name="parity-writer", daemon=True)
        self._thread.start()

    @classmethod
    def process_wide(cls, path: str) -> "CaptureSession":
        """The session behind ``PARITY_DUMP_DIR``: rank from the environment, subfolder per rank not
        needed; ``PARITY_DUMP_MODE`` = ``full`` (default) or ``stats`` (statistics and the default
        sample only). Raises ValueError for another mode."""
        mode = os.environ.get("PARITY_DUMP_MODE", "").strip().lower() or "full"
        return cls(path, mode=mode, spec={"source": "PARITY_DUMP_DIR"})

    # ----------------------------------------------------------------- called from the host
    @property
    def active(self) -> bool:
        """False once capture turned itself off or was closed."""
        return self.error is None and not self._closed

    @property
    def current_step(self) -> int:
        """The step records go to now (0 before the first forward pass)."""
        return max(self.step, 0)

    def next_step(self, tags: dict[str, Any] | None = None) -> int:
        """Start a new step (forward pass); ``tags`` are stored as its metadata. Returns once
        every earlier step is durable on disk (or capture is off)."""
        if self.active and (self.step >= 0 or self._order > 0):
            self._wait_handled(self._put("flush", None, 0))
        self.step = 0 if self.step < 0 and self._order == 0 else self.current_step + 1
        self._order = 0
        if len(self._names) > 1_000_000:  # bound memory on very long runs; keep recent steps
            self._names = {key: n for key, n in self._names.items() if key[1] >= self.step - 1}
        if tags and self.active:
            self._put("step", (self.step, _jsonable(tags)), 0)
        return self.step

    def end_step(self) -> None:
        """Mark the end of a forward pass: its records are flushed to a durable shard."""
        if self.active:
            self._put("flush", None, 0)

    def record(self, name: str, tensor: torch.Tensor, *, step: int | None = None,
               tags: dict[str, Any] | None = None) -> None:
        """Copy ``tensor`` out and queue it under ``name``. Never raises."""
        if not self.active:
            return
        try:
            step = self.current_step if step is None else int(step)
            count = self._names.get((name, step), 0)
            self._names[(name, step)] = count + 1
            unique = name if count == 0 else f"{name}#{count}"
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                self.note_once(f"{name}: dtype {dtype} is not recorded")
                return
            if tensor.device.type == "meta" or getattr(tensor, "is_nested", False):
                kind = "meta" if tensor.device.type == "meta" else "nested"
                self.note_once(f"{name}: a {kind} tensor has no values to record; skipped")
                return
            if tensor.layout != torch.strided:
                self.note_once(f"{name}: a {str(tensor.layout).removeprefix('torch.')} tensor, recorded dense")
                tensor = tensor.to_dense()
            source = tensor.detach()
            if source.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                self.note_once(f"{name}: produced during CUDA graph capture, which a copy would break; "
                               "not recorded (capture the model without CUDA graphs)")
                return
            layer = layer_of(name)
            all_tags: dict[str, Any] = {} if layer is None else {"layer": layer}
            if tags:
                all_tags.update(_jsonable(tags))
            if self.sharding and "shard" not in all_tags:
                annotation = self._annotation(name)
                if annotation is not None:
                    all_tags["shard"] = annotation
            record = Record(name=unique, step=step, rank=self.header.rank, order=self._order,
                            shape=tuple(source.shape), dtype=dtype, file=None,
                            key=f"{step}/{self._order}/{unique}", stats={}, tags=all_tags)
            try:  # the reader's own validation: what it would refuse is not written
                parse_record(record.to_json(), "capture")
            except DumpError as exc:
                self.note_once(f"not recorded: {str(exc).removeprefix('capture: ')}")
                return
            value = self._copy_out(source)
            self._order += 1
            if not self._put("record", (record, value), _queued_bytes(record, value)) and isinstance(value, Pending):
                value.discard()  # capture stopped meanwhile: hand the pinned buffer back
        except Exception as exc:  # this value only: capture goes on with the others
            self.note_once(f"cannot record {name[:200]!r}: {type(exc).__name__}: {exc}")

    def record_fingerprint(self, name: str, parameter: torch.Tensor, *, tags: dict[str, Any] | None = None) -> None:
        """Queue the fingerprint of ``parameter`` under ``name``: a record with statistics and
        digests but no data (:mod:`parity.capturing.fingerprint`), in the current step. Never raises."""
        if not self.active:
            return
        try:
            from parity.capturing.fingerprint import parameter_fingerprint

            values, stats, fingerprint = parameter_fingerprint(parameter)
            dtype = str(values.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                self.note_once(f"{name}: dtype {dtype} is not recorded")
                return
            layer = layer_of(name)
            all_tags: dict[str, Any] = {**({} if layer is None else {"layer": layer}), **(tags or {}), **fingerprint}
            record = Record(name=name, step=self.current_step, rank=self.header.rank, order=self._order,
                            shape=tuple(values.shape), dtype=dtype, file=None, key=None, stats=stats, tags=all_tags)
            parse_record(record.to_json(), "capture")
            self._order += 1
            self._put("fingerprint", record, 0)
        except Exception as exc:  # this parameter only
            self.note_once(f"cannot fingerprint {name[:200]!r}: {type(exc).__name__}: {exc}")

    def _copy_out(self, source: torch.Tensor) -> torch.Tensor | Pending:
        """What the writer thread gets for ``source``: a contiguous CPU clone of a CPU tensor;
        for a CUDA tensor, a copy (full mode) or its statistics (stats mode) started on the device
        without waiting for it (:mod:`parity.capturing.device_copy`; synchronous copy as fallback)."""
        if source.device.type == "cpu":
            return source.clone(memory_format=torch.contiguous_format).contiguous()
        if self.mode == "stats":
            return self._copier.start_stats(source, self.sample)
        return self._copier.start_copy(source)

    @property
    def device_copies(self) -> dict[str, Any]:
        """How device tensors were copied so far: ``async`` / ``sync`` record counts and the
        pinned pool's figures (bytes held at peak, allocations, reuses, refusals, drops, problem)."""
        pool = self._copier.pool
        return {**self._copier.counts, "pinned_peak_bytes": pool.peak_bytes, "allocations": pool.allocations,
                "reuses": pool.reuses, "refusals": pool.refusals, "dropped": pool.dropped, "problem": pool.problem}

    def _annotation(self, name: str) -> str | None:
        """The sharding annotation of tap ``name`` (rules matched once per name: names repeat every step)."""
        if name not in self._annotations:
            from parity.align.shards import annotation_for

            self._annotations[name] = annotation_for(name, self.sharding)
        return self._annotations[name]

    def record_explicit(self, name: str, tensor: Any, step: int | None, tags: dict[str, Any]) -> None:
        """Entry point of :func:`parity.dump`."""
        if not isinstance(tensor, torch.Tensor):
            try:
                tensor = torch.as_tensor(tensor)
            except Exception:
                self.note_once(f"{name}: parity.dump got a {type(tensor).__name__}, not a tensor")
                return
        self.record(name, tensor, step=step, tags={"explicit": True, **tags})

    def note_once(self, message: str) -> None:
        """Store a note (once per distinct message) and log it."""
        if message in self.skipped or not self.active:
            return
        self.skipped.add(message)
        log.warning("parity capture: %s", message)
        self._put("note", message, 0)

    def fail(self, reason: str, *, drain: bool = True) -> None:
        """Turn capture off for good: log once; the writer thread notes it in the manifest.
        ``drain`` (default True: the failure was in the host's code) lets the writer still
        write what was queued before; False (the dump itself failed) drops it."""
        if self.error is not None:
            return
        self.error = reason
        self._failed_step = self.step
        log.warning("parity capture turned itself off: %s", reason)
        dropped: list[tuple[str, Any]] = []
        with self._cond:
            if not drain:
                dropped = list(self._queue)
                self._handled += len(self._queue)
                self._queue.clear()
                self._pending = 0
            self._cond.notify_all()
        for kind, payload in dropped:  # device copies in flight: wait for them, hand their buffers back
            if kind == "record" and isinstance(payload[1], Pending):
                try:
                    payload[1].discard()
                except Exception:
                    pass

    def close(self) -> None:
        """Write everything queued and close the dump. Safe to call twice."""
        if self._closed:
            return
        if self._thread is not None:
            if self.error is None:
                self._put("close", None, 0)
            self._thread.join()  # also after a failure: only then may this thread touch the writer
        self._closed = True
        try:
            self._writer.close()
        except Exception as exc:
            self.fail(f"cannot close dump: {getattr(exc, 'message', exc)}")
        self._copier.close()

    @property
    def run(self) -> Any:
        """The captured :class:`~parity.store.reader.Run`, ready for :func:`parity.compare`: the
        in-memory run of a capture without a directory, else the dump read back from ``out_dir``
        (read once). Available once the session is closed (the capture block exited)."""
        if not self._closed:
            raise UsageError("the capture is still running: use session.run after the capture block")
        if self._result is None:
            if isinstance(self._writer, MemoryWriter):
                self._result = self._writer.run()
            else:
                from parity.store.reader import load_run

                self._result = load_run(self.out_dir)  # type: ignore[arg-type]
        return self._result

    @property
    def records_written(self) -> int:
        """How many records reached the manifest so far."""
        return self._writer.records_written

    # ----------------------------------------------------------------- writer thread
    def _put(self, kind: str, payload: Any, nbytes: int) -> int:
        """Queue an item for the writer thread; returns its sequence number (0: not queued)."""
        with self._cond:
            while (self._queue and self._pending + nbytes > self.max_pending_bytes
                   and self.error is None):
                self._cond.wait()
            if self.error is not None:
                return 0
            self._queue.append((kind, payload))
            self._pending += nbytes
            self._queued += 1
            self._cond.notify_all()
            return self._queued

    def _wait_handled(self, sequence: int) -> None:
        """Block until the writer thread is done with item ``sequence`` (or capture stopped)."""
        with self._cond:
            while self._handled < sequence and self.error is None and self._thread is not None:
                self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and self.error is None:
                    self._cond.wait()
                if not self._queue:  # capture stopped and what was queued is written
                    break
                kind, payload = self._queue.popleft()
            nbytes = 0
            try:
                if kind == "record":
                    record, value = payload
                    nbytes = _queued_bytes(record, value)
                    if isinstance(value, PendingStats):  # computed on the device; waits for it
                        tensor, stats = None, value.result()
                    else:
                        tensor = value.result() if isinstance(value, PendingTensor) else value
                        stats = tensor_stats(tensor)
                        if self.sample:
                            stats["sample"] = sample_values(tensor, self.sample)
                    record = Record(**{**record.__dict__, "stats": stats})
                    self._writer.add(record, tensor if self.mode == "full" else None)
                elif kind == "fingerprint":  # statistics and digests, no data (already computed)
                    self._writer.add(payload, None)
                elif kind == "step":
                    self._writer.add_step(*payload)
                elif kind == "note":
                    self._writer.add_note(payload)
                elif kind == "flush":
                    self._writer.flush()
                elif kind == "close":
                    self._writer.flush()
                    return
            except Exception as exc:
                self.fail(getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}", drain=False)
            finally:
                with self._cond:
                    self._pending = max(self._pending - nbytes, 0)
                    self._handled += 1
                    self._cond.notify_all()
        try:  # only this thread writes the manifest, so the note goes here
            partial = (f"; step {self._failed_step} was in flight: its records are partial"
                       if self._failed_step >= 0 else "")
            self._writer.add_note(f"capture turned itself off: {self.error}{partial}")
        except Exception:
            pass
