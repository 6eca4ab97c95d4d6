"""Copies of accelerator tensors to the host that do not stall the device.

A capture hook on a GPU model must not wait for the GPU: a plain ``tensor.to("cpu")`` does,
and so serializes the forward pass. :class:`DeviceCopier` starts the work and returns at once;
the capture's writer thread waits for it (:meth:`Pending.result`) before it hashes and writes.

Policy (defaults in brackets):

- **Full mode** (:meth:`DeviceCopier.start_copy`): a tensor on a CUDA device (ROCm's HIP
  included: torch names it ``cuda``) is copied with ``non_blocking=True`` into a pinned host
  buffer on the current stream, and a CUDA event is recorded on that stream after the copy. The
  copy is ordered after the kernels that produced the value and before any later kernel that
  might overwrite it in place. The source is kept alive for the copy with
  ``tensor.record_stream(stream)`` (the caching allocator does not reuse its memory before the
  copy is done; a no-op when the tensor was allocated on that stream), or, when that is refused,
  by holding a reference until the writer has waited for the event. On the writer thread the
  pinned bytes are copied into ordinary memory (the dump writer keeps tensors until their shard
  is written, the in-memory run for good) and the buffer goes back to the pool.
- **Statistics mode** (:meth:`DeviceCopier.start_stats`): the statistics are computed on the
  device (:func:`~parity.capturing.stats.stats_vector`: one small float64 tensor, no host
  synchronization) and only those few values are copied, the same way. The sample's positions
  are uploaded once per (size, sample, device) [at most :data:`INDEX_CACHE` index tensors kept].
- **Bounded pinned memory**: :class:`PinnedPool` holds at most ``max_pinned_bytes`` [the session's
  ``max_pending_bytes``, 512 MiB] of pinned buffers, sized in powers of two [at least
  :data:`MIN_BUFFER` = 512 bytes, as torch's caching host allocator rounds them], reused for
  records of the same bucket; free buffers of other sizes are dropped, least recently used first,
  when a new size needs room. When the pool cannot provide a buffer the record is copied
  synchronously, as before (counted in :attr:`DeviceCopier.counts`); it never grows past its
  cap. Dropped buffers return to torch's caching host allocator, which keeps them pinned for its
  own reuse (``torch.cuda.empty_cache`` does not free them).
- **Clean fallback**: CPU tensors are not this module's business (the session clones them);
  tensors on other accelerators (MPS, XPU, ...), and every CUDA tensor once pinned memory turns
  out unavailable (:attr:`DeviceCopier.problem` says why, logged once), are copied with
  today's synchronous ``.to("cpu", copy=True)``: the same records, only slower.

Nothing here changes the source tensor: it is only read.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch

from parity.capturing.stats import StatsLayout, stats_from_vector, stats_vector
from parity.store.format import sample_positions

log = logging.getLogger("parity")

#: Smallest pinned buffer the pool hands out, in bytes (a statistics vector needs a few hundred).
MIN_BUFFER = 512
#: Sample index tensors kept on the device, one per (numel, sample size, device); the cache is
#: emptied when full.
INDEX_CACHE = 1024


def bucket_bytes(nbytes: int) -> int:
    """The pool bucket of a request of ``nbytes``: the next power of two, at least :data:`MIN_BUFFER`."""
    return max(MIN_BUFFER, 1 << max(nbytes - 1, 0).bit_length())


def pinned_buffer(nbytes: int) -> torch.Tensor:
    """A pinned host buffer of ``nbytes`` bytes (uint8) from torch's caching host allocator.
    Raises RuntimeError where pinned memory is unavailable (no CUDA, or pinning refused)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class PinnedPool:
    """Host buffers of power-of-two sizes, at most ``cap_bytes`` held (in use or free) at once.

    ``allocate(nbytes)`` makes a buffer (default :func:`pinned_buffer`); an allocation that
    raises marks the pool unusable (:attr:`problem`), and :meth:`acquire` returns None from then
    on. Thread-safe: buffers are acquired on the hook's thread and released on the writer's."""

    def __init__(self, cap_bytes: int, *, allocate: Callable[[int], torch.Tensor] = pinned_buffer) -> None:
        self.cap_bytes = cap_bytes
        self._allocate = allocate
        self._lock = threading.Lock()
        self._free: OrderedDict[int, list[torch.Tensor]] = OrderedDict()  # bucket -> free buffers, LRU first
        self.held_bytes = 0      # in use + free
        self.in_use_bytes = 0
        self.peak_bytes = 0      # the most ever held
        self.allocations = 0     # buffers made
        self.reuses = 0          # requests served by a free buffer
        self.refusals = 0        # requests that found no room
        self.dropped = 0         # free buffers let go to make room
        self.problem: str | None = None

    def acquire(self, nbytes: int) -> torch.Tensor | None:
        """A buffer of at least ``nbytes`` bytes (uint8, 1-D, its length the bucket size), or None
        when the cap leaves no room even after dropping every free buffer, or when the pool is
        unusable. Hand it back with :meth:`release`."""
        size = bucket_bytes(nbytes)
        with self._lock:
            if self.problem is not None:
                return None
            free = self._free.get(size)
            if free:
                buffer = free.pop()
                if not free:
                    del self._free[size]
                self.in_use_bytes += size
                self.reuses += 1
                return buffer
            while self.held_bytes + size > self.cap_bytes and self._free:
                bucket, buffers = next(iter(self._free.items()))
                buffers.pop()
                if not buffers:
                    del self._free[bucket]
                self.held_bytes -= bucket
                self.dropped += 1
            if self.held_bytes + size > self.cap_bytes:
                self.refusals += 1
                return None
            self.held_bytes += size  # reserved before the (slow) allocation, outside the lock
            self.in_use_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        try:
            with torch.inference_mode(False):  # a normal tensor: copied into under any grad mode, later too
                buffer = self._allocate(size)
        except Exception as exc:
            with self._lock:
                self.held_bytes -= size
                self.in_use_bytes -= size
                self.problem = f"{type(exc).__name__}: {exc}"
            return None
        with self._lock:
            self.allocations += 1
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        """Take back a buffer from :meth:`acquire` for reuse (its bucket becomes the most recently used)."""
        size = buffer.numel()
        with self._lock:
            self.in_use_bytes -= size
            self._free.setdefault(size, []).append(buffer)
            self._free.move_to_end(size)

    def forget(self, buffer: torch.Tensor) -> None:
        """Stop counting a buffer from :meth:`acquire` without reusing it (a copy into it may still
        be in flight: torch's caching host allocator then waits for that copy before reusing it)."""
        size = buffer.numel()
        with self._lock:
            self.in_use_bytes -= size
            self.held_bytes -= size

    def clear(self) -> None:
        """Let every free buffer go (buffers in use stay counted until released)."""
        with self._lock:
            for size, buffers in self._free.items():
                self.held_bytes -= size * len(buffers)
            self._free.clear()


class Pending:
    """A copy or statistics started on the device; :meth:`result` waits for it (writer thread)."""

    __slots__ = ("_event", "_host", "_buffer", "_pool", "_keep")

    def __init__(self, event: Any, host: torch.Tensor, buffer: torch.Tensor | None, pool: PinnedPool | None,
                 keep: Any) -> None:
        self._event = event    # None: the host values are complete already
        self._host = host      # a view of ``buffer`` (or an ordinary CPU tensor)
        self._buffer = buffer  # the pool's buffer, handed back once read
        self._pool = pool
        self._keep = keep      # device tensors that must outlive the copy (None when record_stream did it)

    def _wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        self._keep = None

    def _release(self) -> None:
        if self._buffer is not None and self._pool is not None:
            self._pool.release(self._buffer)
        self._buffer = self._host = None  # type: ignore[assignment]

    def discard(self) -> None:
        """Wait for the device, then hand the buffer back without reading it."""
        try:
            self._wait()
        finally:
            self._release()


class PendingTensor(Pending):
    """A tensor being copied to pinned memory."""

    __slots__ = ()

    def result(self) -> torch.Tensor:
        """The copied tensor in ordinary (pageable) host memory, contiguous; waits for the device."""
        try:
            self._wait()
            out = torch.empty(self._host.shape, dtype=self._host.dtype)  # pageable, whatever clone would keep
            out.copy_(self._host)
            return out
        finally:
            self._release()


class PendingStats(Pending):
    """Statistics computed on the device, their values being copied to pinned memory."""

    __slots__ = ("_layout", "held_bytes")

    def __init__(self, event: Any, host: torch.Tensor, buffer: torch.Tensor | None, pool: PinnedPool | None,
                 keep: Any, layout: StatsLayout) -> None:
        super().__init__(event, host, buffer, pool, keep)
        self._layout = layout
        #: Memory this holds until resolved: the host values' buffer, and device tensors kept alive.
        self.held_bytes = (0 if buffer is None else buffer.numel()) + sum(
            t.numel() * t.element_size() for t in (keep if isinstance(keep, tuple) else (keep,))
            if isinstance(t, torch.Tensor))

    def result(self) -> dict[str, Any]:
        """The statistics, as :func:`~parity.capturing.stats.tensor_stats` gives them (with
        ``"sample"`` when one was asked for); waits for the device."""
        try:
            self._wait()
            return stats_from_vector(self._host.tolist(), self._layout)
        finally:
            self._release()


class DeviceCopier:
    """Starts the host copies (or device statistics) of one capture session; see the module
    docstring. ``max_pinned_bytes`` bounds the pinned pool; ``allocate`` makes its buffers
    (default :func:`pinned_buffer`)."""

    def __init__(self, max_pinned_bytes: int, *, allocate: Callable[[int], torch.Tensor] = pinned_buffer) -> None:
        self.pool = PinnedPool(max_pinned_bytes, allocate=allocate)
        self._indices: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self.counts = {"async": 0, "sync": 0}  # records copied each way (sync: fallback or pool full)
        self._logged = False

    @property
    def problem(self) -> str | None:
        """Why pinned memory is unavailable (every device copy is then synchronous), or None."""
        return self.pool.problem

    def _async_ok(self, tensor: torch.Tensor) -> bool:
        if tensor.device.type != "cuda":
            return False
        if self.pool.problem is not None:
            if not self._logged:
                self._logged = True
                log.warning("parity capture: pinned host memory unavailable (%s): copies from the GPU are "
                            "synchronous", self.pool.problem)
            return False
        return True

    def _fence(self, tensor: torch.Tensor, stream: Any) -> tuple[Any, Any]:
        """The event recorded after the work queued so far on ``stream``, and what must be held
        until it completes (None when ``record_stream`` keeps ``tensor``'s memory)."""
        try:
            tensor.record_stream(stream)
            keep = None
        except Exception:  # e.g. memory not from the caching allocator: hold it instead
            keep = tensor
        event = torch.cuda.Event(blocking=True)  # the writer thread sleeps in synchronize(), no spinning
        event.record(stream)
        return event, keep

    def start_copy(self, tensor: torch.Tensor) -> torch.Tensor | PendingTensor:
        """Start copying ``tensor`` (any device but the CPU) to a contiguous host tensor. Returns
        a :class:`PendingTensor`, or, on the fallback paths, the finished CPU copy."""
        if tensor.numel() == 0:  # nothing to wait for
            return tensor.to("cpu", copy=True).contiguous()
        if not self._async_ok(tensor):
            return self._sync_copy(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        buffer = self.pool.acquire(nbytes)
        if buffer is None:  # the cap is reached, or pinning just turned out unavailable (logged once)
            self._async_ok(tensor)
            return self._sync_copy(tensor)
        host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        event, keep = self._start(host, tensor, tensor, buffer)
        self.counts["async"] += 1
        return PendingTensor(event, host, buffer, self.pool, keep)

    def _start(self, host: torch.Tensor, value: torch.Tensor, source: torch.Tensor,
               buffer: torch.Tensor) -> tuple[Any, Any]:
        """Queue the copy of ``value`` into ``host`` (a view of ``buffer``) on the current stream of
        ``source``'s device and fence it; on an error the buffer goes back to the pool, or, when
        the copy may already be queued, is forgotten (never reused while a copy could land in it)."""
        queued = False
        try:
            stream = torch.cuda.current_stream(source.device)
            queued = True
            host.copy_(value, non_blocking=True)
            return self._fence(source, stream)
        except Exception:
            (self.pool.forget if queued else self.pool.release)(buffer)
            raise

    def _sync_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        self.counts["sync"] += 1
        return tensor.to("cpu", copy=True).contiguous()

    def start_stats(self, tensor: torch.Tensor, sample: int) -> torch.Tensor | PendingStats:
        """Start the statistics of ``tensor`` (with a ``sample`` of that many elements; 0: none)
        on its device. Returns a :class:`PendingStats`, or, on the fallback paths, the finished
        CPU copy (the writer then computes the statistics on the CPU, as before)."""
        if not self._async_ok(tensor):
            return self._sync_copy(tensor)
        index = self._sample_index(tensor, sample) if sample else None
        vector, layout = stats_vector(tensor, index)
        if tensor.numel() == 0:  # no values: nothing was queued on the device
            return PendingStats(None, vector.cpu(), None, None, None, layout)
        nbytes = vector.numel() * vector.element_size()
        buffer = self.pool.acquire(nbytes)
        if buffer is None:  # no room, or pinning just turned out unavailable: a few bytes, copied now
            self._async_ok(tensor)
            self.counts["sync"] += 1
            return PendingStats(None, vector.to("cpu"), None, None, None, layout)
        host = buffer[:nbytes].view(torch.float64)
        event, keep = self._start(host, vector, tensor, buffer)
        self.counts["async"] += 1
        return PendingStats(event, host, buffer, self.pool, (keep, vector), layout)

    def _sample_index(self, tensor: torch.Tensor, sample: int) -> torch.Tensor:
        """The flat sample positions of ``tensor`` as an int64 tensor on its device (uploaded once
        per size: the upload from pinned memory does not wait, a plain one would)."""
        key = (tensor.numel(), sample, tensor.device)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) >= INDEX_CACHE:
                self._indices.clear()
            positions = torch.tensor(sample_positions(tensor.numel(), sample), dtype=torch.int64)
            try:
                positions = positions.pin_memory()
            except Exception:  # unpinned: the upload waits, once per size
                pass
            index = self._indices[key] = positions.to(tensor.device, non_blocking=True)
        return index

    def close(self) -> None:
        """Let the pool's free buffers and the cached indices go."""
        self.pool.clear()
        self._indices.clear()
