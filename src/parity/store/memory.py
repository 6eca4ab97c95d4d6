"""Dumps held in memory: a capture without a directory, compared like any dump.

:class:`MemoryWriter` takes the place of :class:`~parity.store.writer.DumpWriter` in a capture
session (same methods, same order of calls). Every header, record, step and note goes through
its manifest-line form and back through the reader's validation
(:func:`~parity.store.format.parse_header`, :func:`~parity.store.format.parse_record`), so a
:class:`MemoryRun` holds exactly what :func:`~parity.store.reader.load_run` would read from the
same capture written to disk; only the tensor bytes stay in memory (as read-only numpy arrays
of the storage dtype, bfloat16 as uint16 bits, like the memory maps of a dump). Everything that
compares, aligns or reports takes a :class:`MemoryRun` where it takes a :class:`Run`; what needs
files (``workers`` > 1, ``distributed``) says so.

Memory: the whole capture stays resident (the tensors' own size, no extra copy), so this is
for models and prompts small enough to hold twice (baseline and target) — notebooks, tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parity.store.checksum import checksum, storage_array
from parity.store.format import Record, RunHeader, parse_header, parse_record
from parity.store.reader import Run

#: What ``Run.path`` shows for a run held in memory.
MEMORY_PATH = Path("<in memory>")
#: ``Record.file`` of a record whose tensor is held in memory (a name no dump writer uses; it
#: passes the reader's data-path rule like any record's file).
MEMORY_FILE = "in-memory.safetensors"


@dataclass
class MemoryRun(Run):
    """A :class:`Run` whose tensor data lives in ``arrays`` (record key -> storage array)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def on_disk(self) -> bool:
        """False: there is no directory behind this run."""
        return False

    def raw(self, record: Record) -> np.ndarray:
        """The record's data as a read-only array of its storage dtype (bfloat16 as uint16 bits)."""
        if record.file is None or record.key is None:
            return super().raw(record)  # the statistics-only error
        return self.arrays[record.key]

    def locate(self, record: Record) -> np.ndarray:
        """The record's array: held in memory, it cannot disagree with a file (raises like a
        dump's ``locate`` for a statistics-only record)."""
        return self.raw(record)

    def release(self, record: Record) -> None:
        """Nothing to give back: the data is the capture's own memory."""

    def close(self) -> None:
        """Nothing to close."""


def _round_trip(obj: dict[str, Any]) -> dict[str, Any]:
    """A manifest line object as a reader sees it (JSON encoded and decoded)."""
    from parity.store.writer import json_line

    return json.loads(json_line(obj))


class MemoryWriter:
    """The in-memory counterpart of :class:`~parity.store.writer.DumpWriter` (same interface)."""

    def __init__(self, header: RunHeader) -> None:
        self.header = parse_header(_round_trip(header.to_json()), "in-memory capture header")
        self.records: list[Record] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.steps: dict[tuple[int, int], dict[str, Any]] = {}
        self.notes: list[str] = []
        self._pending: list[tuple[Record, Any]] = []
        self.records_written = 0

    def open(self) -> None:
        """Nothing to create."""

    def add(self, record: Record, tensor: Any | None) -> None:
        """Queue a record; ``tensor`` (a contiguous CPU torch tensor) is None in stats mode."""
        self._pending.append((record, tensor))

    def add_step(self, step: int, tags: dict[str, Any]) -> None:
        """Keep per-step metadata (token ids, positions, sequence lengths)."""
        self.flush()
        line = _round_trip({"type": "step", "step": step, "rank": self.header.rank, "tags": tags})
        self.steps[(line["step"], self.header.rank)] = line["tags"]

    def add_note(self, message: str) -> None:
        """Keep a note (something skipped, or why capture stopped)."""
        self.notes.append(f"rank {self.header.rank}: {message}")

    def flush(self) -> None:
        """Validate the queued records as a reader would and keep them."""
        for record, tensor in self._pending:
            if tensor is not None:
                record = Record(**{**record.__dict__, "file": MEMORY_FILE, "checksum": checksum(storage_array(tensor))})
            where = f"in-memory record {record.name!r}"
            kept = parse_record(_round_trip(record.to_json()), where)
            if tensor is not None and kept.key is not None:
                self.arrays[kept.key] = storage_array(tensor)
            self.records.append(kept)
            self.records_written += 1
        self._pending.clear()

    def close(self) -> None:
        """Keep what is queued."""
        self.flush()

    def run(self) -> MemoryRun:
        """The captured run, records in execution order (as :func:`~parity.store.reader.load_run` sorts them)."""
        records = sorted(self.records, key=lambda r: (r.step, r.order, r.rank))
        return MemoryRun(path=MEMORY_PATH, headers={self.header.rank: self.header}, records=records,
                         steps=dict(self.steps), notes=list(self.notes), arrays=self.arrays)
