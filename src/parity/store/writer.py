"""Writing a dump: shards of tensors in safetensors files, an append-only JSON Lines manifest.

:class:`DumpWriter` buffers tensors and writes them as one shard when the buffer reaches
``shard_bytes`` (default 64 MiB) or on :meth:`DumpWriter.flush`. A shard is written to
``shard-NNNNNN.safetensors.tmp``, fsynced, renamed and the directory fsynced; only then are its
record lines appended to the manifest (and the manifest fsynced). A process killed at any
point leaves a dump whose manifest names only durable data.

The writer is not thread-safe: one thread (capture's background writer) owns it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from parity.errors import DumpError
from parity.jsonsafe import json_safe
from parity.store.checksum import checksum, storage_array
from parity.store.format import Record, RunHeader, manifest_name

#: Default shard size in bytes before a shard is written (64 MiB).
SHARD_BYTES = 64 * 1024 * 1024


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_line(obj: dict[str, Any]) -> str:
    """One manifest line: compact strict JSON (non-finite floats written as the strings
    ``"inf"``, ``"-inf"``, ``"nan"``), newline-terminated."""
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(json_safe(obj), separators=(",", ":"), allow_nan=False)
    return text + "\n"


class DumpWriter:
    """Writes one rank's part of a dump directory. Raises :class:`DumpError` on I/O problems."""

    def __init__(self, root: str | os.PathLike[str], header: RunHeader, *,
                 shard_bytes: int = SHARD_BYTES, durable: bool = True) -> None:
        self.root = Path(root)
        self.header = header
        self.shard_bytes = shard_bytes
        self.durable = durable
        self.data_dir = self.root / "data" / f"rank{header.rank}"
        self._pending: list[tuple[Record, Any]] = []
        self._pending_bytes = 0
        self._shard_index = 0
        self._manifest = None
        self.records_written = 0

    def open(self) -> None:
        """Create the directory and write the header line. Refuses a directory that holds this
        rank's manifest or shards already (a dump, or the leftovers of one)."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path = self.root / manifest_name(self.header.rank)
            if path.exists():
                raise DumpError(f"{path} already exists: {self.root} holds a dump already",
                                hint="choose an empty output directory")
            leftover = next(self.data_dir.glob("shard-*"), None)
            if leftover is not None:  # parts of a dump whose manifest is gone: never overwrite them
                raise DumpError(f"{leftover} already exists: {self.root} holds parts of a dump (no manifest)",
                                hint="choose an empty output directory, or remove the leftover data")
            self._manifest = open(path, "x", encoding="utf-8")
        except OSError as exc:
            raise DumpError(f"cannot create dump in {self.root}: {exc.strerror or exc}") from None
        self._append([self.header.to_json()])

    def _append(self, objs: list[dict[str, Any]]) -> None:
        assert self._manifest is not None, "DumpWriter.open() was not called"
        try:
            self._manifest.write("".join(json_line(o) for o in objs))
            self._manifest.flush()
            if self.durable:
                os.fsync(self._manifest.fileno())
        except (OSError, ValueError) as exc:
            raise DumpError(f"cannot write manifest in {self.root}: {getattr(exc, 'strerror', None) or exc}") from None

    def add(self, record: Record, tensor: Any | None) -> None:
        """Queue a record; ``tensor`` (a contiguous CPU torch tensor) is None in stats mode.

        Queued records reach the manifest at the next :meth:`flush`."""
        self._pending.append((record, tensor))
        self._pending_bytes += 0 if tensor is None else record.nbytes
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def add_step(self, step: int, tags: dict[str, Any]) -> None:
        """Append per-step metadata (token ids, positions, sequence lengths)."""
        self.flush()
        self._append([{"type": "step", "step": step, "rank": self.header.rank, "tags": tags}])

    def add_note(self, message: str) -> None:
        """Append a note (something skipped, or why capture stopped)."""
        self._append([{"type": "note", "message": message}])

    def flush(self) -> None:
        """Write pending tensors as one durable shard, then their manifest lines."""
        if not self._pending:
            return
        if all(tensor is None for _, tensor in self._pending):  # statistics only
            self._append([r.to_json() for r, _ in self._pending])
            self.records_written += len(self._pending)
            self._pending.clear()
            return
        from safetensors.torch import save_file

        rel = f"data/rank{self.header.rank}/shard-{self._shard_index:06d}.safetensors"
        final = self.root / rel
        tmp = final.with_name(final.name + ".tmp")
        records = []
        tensors = {}
        storages: set[int] = set()
        for record, tensor in self._pending:
            if tensor is not None:
                record = Record(**{**record.__dict__, "file": rel, "checksum": checksum(storage_array(tensor))})
                storage = tensor.untyped_storage().data_ptr()
                if storage in storages:  # safetensors refuses tensors that share memory
                    tensor = tensor.clone()
                storages.add(tensor.untyped_storage().data_ptr())
                tensors[record.key] = tensor
            records.append(record)
        try:
            save_file(tensors, str(tmp))
            if self.durable:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
            if self.durable:
                _fsync_dir(final.parent)
        except Exception as exc:  # safetensors raises its own errors for I/O failures
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise DumpError(f"cannot write data file {final}: {getattr(exc, 'strerror', None) or exc}") from None
        self._shard_index += 1
        self._pending.clear()
        self._pending_bytes = 0
        self._append([r.to_json() for r in records])
        self.records_written += len(records)

    def close(self) -> None:
        """Flush and close the manifest. Safe to call twice."""
        try:
            self.flush()
        finally:
            if self._manifest is not None:
                self._manifest.close()
                self._manifest = None
