"""Turning what an importer read into a parity run, through parity's own writers.

An importer (:mod:`.sglang`, :mod:`.msprobe`) describes a foreign dump as an
:class:`ImportedDump`: run facts, and per captured tensor an :class:`Entry` whose tensor is
loaded only when written. :func:`to_run` replays it into one
:class:`~parity.store.memory.MemoryWriter` per rank and :func:`write_dump` into one
:class:`~parity.store.writer.DumpWriter` per rank, so every header, record and step line goes
through the same validation a dump read from disk does (``parse_header``, ``parse_record``).

Per record: ``key`` is ``r{rank}/{step}/{order}/{name}`` (unique across ranks: a multi-rank
import is one in-memory run), ``order`` is the entry's place among its rank and step, ``stats``
are computed from the tensor exactly as a capture computes them
(:func:`parity.capturing.stats.tensor_stats`) or, for statistics-only imports, given by the
importer. A name seen twice in one step and rank gets ``#1``, ``#2``... as a capture does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from parity.errors import DumpError
from parity.store.format import DTYPES, FORMAT_VERSION, Record, RunHeader, parse_record
from parity.store.memory import MemoryRun, MemoryWriter
from parity.store.writer import json_line

#: Called to load an entry's tensor (a CPU torch tensor) when it is written.
Loader = Callable[[], Any]


@dataclass
class Entry:
    """One tensor of a foreign dump: where it goes in the parity run and how to get it."""

    name: str
    step: int
    rank: int
    tags: dict[str, Any] = field(default_factory=dict)
    load: Loader | None = None              #: full dumps: returns the tensor
    shape: tuple[int, ...] | None = None    #: statistics-only dumps: from the foreign manifest
    dtype: str | None = None                #: statistics-only dumps: a parity dtype name
    stats: dict[str, Any] | None = None     #: statistics-only dumps: parity statistics


@dataclass
class ImportedDump:
    """A foreign dump as parity sees it, before it becomes a run."""

    source: Path
    tool: str                      #: "sglang" or "msprobe"
    mode: str = "full"             #: "full" or "stats"
    world_size: int = 1
    spec: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    layouts: dict[int, dict[str, int]] = field(default_factory=dict)  #: rank -> header layout
    entries: list[Entry] = field(default_factory=list)  #: per rank and step in execution order
    steps: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)  #: (step, rank) -> tags
    notes: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        """Every rank that has entries or step metadata (rank 0 when there are none)."""
        found = {e.rank for e in self.entries} | {rank for _, rank in self.steps}
        return sorted(found) or [0]


class ImportedRun(MemoryRun):
    """A run read from another tool's dump: held in memory, ``path`` is the foreign directory.

    ``locate`` checks that the record's data is held (``parity inspect``); there is no data file
    behind it, so commands that read dumps from disk (``--workers`` > 1, ``--distributed``) need
    ``parity convert`` first."""

    def locate(self, record: Record) -> Any:
        """The record's array (raises like a dump's ``locate`` for a statistics-only record)."""
        if record.file is None or record.key is None:
            return super().locate(record)
        return self.arrays[record.key]


def torch_dtype_name(tensor: Any) -> str:
    """A torch tensor's dtype as parity names it (``torch.float32`` -> ``float32``)."""
    return str(tensor.dtype).removeprefix("torch.")


def _header(dump: ImportedDump, rank: int) -> RunHeader:
    created = str(dump.env.get("created", ""))
    return RunHeader(format_version=FORMAT_VERSION, rank=rank, world_size=dump.world_size, created=created,
                     mode=dump.mode, spec=dump.spec, model=dump.model,
                     env={k: v for k, v in dump.env.items() if k != "created"}, layout=dump.layouts.get(rank, {}))


def _tensor_of(entry: Entry, note: Callable[[str], None]) -> Any | None:
    """The entry's tensor, contiguous on the CPU, or None (noted) when parity cannot store it."""
    import torch

    tensor = entry.load() if entry.load is not None else None
    if not isinstance(tensor, torch.Tensor):  # the SGLang dumper dumps any value (ints, lists, None)
        note(f"{entry.name}: holds a {type(tensor).__name__}, not a tensor; skipped")
        return None
    dtype = torch_dtype_name(tensor)
    if dtype not in DTYPES:
        note(f"{entry.name}: dtype {dtype} is not stored by parity; skipped")
        return None
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.ndim > 16:
        note(f"{entry.name}: {tensor.ndim} dimensions, more than the 16 a dump may hold; skipped")
        return None
    return tensor.detach().to("cpu").contiguous()


def replay(dump: ImportedDump, writers: dict[int, Any], *, salvage: bool = False) -> list[str]:
    """Write ``dump`` through ``writers`` (rank -> an opened MemoryWriter or DumpWriter).

    A tensor file that cannot be read raises its :class:`DumpError`, or with ``salvage`` is
    skipped and its problem returned in the list."""
    from parity.capturing.stats import tensor_stats
    from parity.capturing.taps import layer_of

    skipped: list[str] = []
    seen_notes: set[str] = set()
    orders: dict[tuple[int, int], int] = {}
    names: dict[tuple[str, int, int], int] = {}
    written_steps: set[tuple[int, int]] = set()

    def note(rank: int, message: str) -> None:
        if message not in seen_notes:
            seen_notes.add(message)
            writers[rank].add_note(message)

    for message in dump.notes:
        note(min(writers), message)
    current: dict[int, int] = {}
    for entry in dump.entries:
        writer = writers[entry.rank]
        if current.get(entry.rank) != entry.step:
            writer.flush()  # one shard per step, as a capture writes them
            current[entry.rank] = entry.step
            tags = dump.steps.get((entry.step, entry.rank))
            if tags is not None:
                writer.add_step(entry.step, tags)
                written_steps.add((entry.step, entry.rank))
        count = names.get((entry.name, entry.step, entry.rank), 0)
        names[(entry.name, entry.step, entry.rank)] = count + 1
        name = entry.name if count == 0 else f"{entry.name}#{count}"
        tags = dict(entry.tags)
        layer = layer_of(entry.name)
        if layer is not None and "layer" not in tags:
            tags["layer"] = layer
        order = orders.get((entry.rank, entry.step), 0)
        if dump.mode == "stats":
            tensor = None
            shape, dtype, stats = entry.shape or (), entry.dtype or "float32", dict(entry.stats or {})
        else:
            try:
                tensor = _tensor_of(entry, lambda m, r=entry.rank: note(r, m))
            except DumpError as problem:
                if not salvage:
                    raise
                skipped.append(str(problem))
                continue
            if tensor is None:
                continue
            shape, dtype, stats = tuple(tensor.shape), torch_dtype_name(tensor), tensor_stats(tensor)
        record = Record(name=name, step=entry.step, rank=entry.rank, order=order, shape=shape, dtype=dtype,
                        file=None, key=None if tensor is None else f"r{entry.rank}/{entry.step}/{order}/{name}",
                        stats=stats, tags=tags)
        try:  # the reader's own validation, before anything is written: the problem names the entry
            parse_record(json.loads(json_line(record.to_json())), "record")
        except DumpError as problem:
            raise DumpError(f"{dump.source}: {entry.name} (step {entry.step}, rank {entry.rank}) cannot be "
                            f"imported: {str(problem).removeprefix('record: ')}") from None
        writer.add(record, tensor)
        orders[(entry.rank, entry.step)] = order + 1
    for (step, rank), tags in sorted(dump.steps.items()):
        if (step, rank) not in written_steps and rank in writers:
            writers[rank].add_step(step, tags)
    if skipped:
        note(min(writers), f"salvage: {len(skipped)} tensor file(s) skipped as unreadable; the first: {skipped[0]}")
    return skipped


def to_run(dump: ImportedDump, *, salvage: bool = False) -> ImportedRun:
    """The imported dump as an in-memory run (every rank), validated as a reader validates a dump."""
    writers = {rank: MemoryWriter(_header(dump, rank)) for rank in dump.ranks}
    skipped = replay(dump, writers, salvage=salvage)
    for writer in writers.values():
        writer.close()
    records = sorted((r for w in writers.values() for r in w.records), key=lambda r: (r.step, r.order, r.rank))
    arrays = {k: v for w in writers.values() for k, v in w.arrays.items()}
    steps = {k: v for w in writers.values() for k, v in w.steps.items()}
    notes = [n for w in writers.values() for n in w.notes]
    headers = {rank: w.header for rank, w in writers.items()}
    loaded = sum(1 for r in records if r.file is not None)
    notes.insert(0, f"imported from a {dump.tool} dump: {loaded} tensors loaded with torch.load(weights_only=True) / "
                    "numpy.load(allow_pickle=False) and held in memory" if loaded else
                 f"imported from a {dump.tool} dump (statistics only)")
    return ImportedRun(path=dump.source, headers=headers, records=records, steps=steps, notes=notes,
                       salvaged=skipped, arrays=arrays)


def write_dump(dump: ImportedDump, out_dir: Path, *, salvage: bool = False) -> int:
    """Write the imported dump as a parity dump directory (one manifest and shards per rank);
    tensors are loaded one at a time and written in shards (bounded memory). Returns the number
    of records written."""
    from parity.store.writer import DumpWriter

    writers = {rank: DumpWriter(out_dir, _header(dump, rank)) for rank in dump.ranks}
    try:
        for writer in writers.values():
            writer.open()
        replay(dump, writers, salvage=salvage)
    finally:
        for writer in writers.values():
            writer.close()
    return sum(w.records_written for w in writers.values())


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (for foreign statistics)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range (JSON allows 10**400)
        return None
    return value if math.isfinite(value) else None
