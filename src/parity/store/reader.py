"""Loading a dump directory: manifests validated up front, tensor data read lazily (mmap).

:func:`load_run` reads every ``manifest-rank*.jsonl`` of a directory, validates each line
(:mod:`parity.store.format`) and returns a :class:`Run`. Tensor bytes are not touched until
:meth:`Run.array` is called; data files are validated when first opened
(:mod:`parity.store.safetensors_io`). A final manifest line cut short by a crash is ignored and
noted (``Run.notes``); any other malformed line is a :class:`~parity.errors.DumpError`.
"""

from __future__ import annotations

import json
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from parity.errors import CorruptDataError, DumpError
from parity.store.checksum import checksum
from parity.store.format import (CHECKSUMS_SINCE, MANIFEST_GLOB, Record, RunHeader, minor_version, parse_header,
                                 parse_record)
from parity.store.safetensors_io import SafetensorsFile, to_float

#: How many data files a Run keeps open at once (default 8).
OPEN_FILES = 8


@dataclass
class Run:
    """One dump directory: headers per rank, records in execution order, step metadata, notes."""

    path: Path
    headers: dict[int, RunHeader]
    records: list[Record]
    steps: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: manifest lines skipped as invalid by ``load_run(..., salvage=True)`` (why, one each)
    salvaged: list[str] = field(default_factory=list)
    _files: OrderedDict[str, SafetensorsFile] = field(default_factory=OrderedDict, repr=False)
    _verified: set[tuple[str, str]] = field(default_factory=set, repr=False)

    @property
    def header(self) -> RunHeader:
        """The header of the lowest rank (rank 0 for a single-process run)."""
        return self.headers[min(self.headers)]

    @property
    def world_size(self) -> int:
        """World size recorded in the header."""
        return self.header.world_size

    @property
    def on_disk(self) -> bool:
        """True: the run was read from a dump directory (see :class:`parity.store.memory.MemoryRun`)."""
        return True

    @property
    def mode(self) -> str:
        """``full`` (tensor data stored) or ``stats`` (statistics only)."""
        return self.header.mode

    def step_tags(self, step: int, rank: int = 0) -> dict[str, Any]:
        """Per-step metadata (``input_ids``, ``positions``, ``seq_lens``) or ``{}``."""
        return self.steps.get((step, rank), {})

    def group_step_tags(self, step: int) -> list[dict[str, Any]]:
        """Step metadata per data-parallel group: one group here (multi-rank views have more)."""
        return [self.step_tags(step)]

    def findings(self, record: Record) -> list[Any]:
        """Problems with single ranks' shards: none in a run read as it is (see the views)."""
        return []

    def _file(self, rel: str) -> SafetensorsFile:
        handle = self._files.get(rel)
        if handle is None:
            try:
                path = (self.path / rel).resolve()
                inside = self.path.resolve() in path.parents
                regular = path.is_file()
            except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long, a NUL byte
                raise CorruptDataError(f"data file {self.path / rel} named in the manifest cannot be resolved "
                                       "(a symlink loop?)") from None
            if not inside:
                raise CorruptDataError(f"data path {rel!r} escapes the dump directory {self.path}")
            if not regular:
                raise CorruptDataError(f"data file {path} named in the manifest is missing (or not a regular file)")
            handle = SafetensorsFile(path)
            self._files[rel] = handle
            while len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(rel)
        return handle

    def locate(self, record: Record) -> SafetensorsFile:
        """The data file holding ``record``, its header parsed and checked against the record
        (key present, same dtype and shape); reads no tensor bytes. Raises :class:`DumpError`
        for a statistics-only record, :class:`CorruptDataError` for a file that disagrees."""
        if record.file is None or record.key is None:
            raise DumpError(f"record {record.name!r} (step {record.step}) has no tensor data: "
                            f"{self.path} is a statistics-only dump")
        handle = self._file(record.file)
        info = handle.tensors.get(record.key)
        if info is None:
            raise CorruptDataError(f"data file {handle.path} lacks tensor {record.key!r} "
                                   f"of record {record.name!r}")
        if info.shape != record.shape or info.dtype != record.dtype:
            raise CorruptDataError(
                f"record {record.name!r} says {record.dtype}{list(record.shape)} but "
                f"{handle.path} holds {info.dtype}{list(info.shape)}")
        return handle

    def raw(self, record: Record) -> np.ndarray:
        """The record's data as a read-only array of its storage dtype (bfloat16 as uint16 bits).
        The first read of a record with a ``checksum`` verifies it: a mismatch is a
        :class:`CorruptDataError` naming the record, never data."""
        handle = self.locate(record)
        data = handle.raw(record.key)  # type: ignore[arg-type]
        if record.checksum is not None and (record.file, record.key) not in self._verified:
            found = checksum(data)
            if found != record.checksum:
                raise CorruptDataError(
                    f"corrupted data: record {record.name!r} step {record.step} (rank {record.rank}) in "
                    f"{handle.path} does not match its checksum (manifest {record.checksum}, data {found})")
            self._verified.add((record.file, record.key))
        return data

    def release(self, record: Record) -> None:
        """Give back the memory pages of a record's data after use (see ``SafetensorsFile.release``)."""
        if record.file is not None and record.key is not None and record.file in self._files:
            self._files[record.file].release(record.key)

    def array(self, record: Record, dtype: type = np.float64) -> np.ndarray:
        """The record's data widened to ``dtype`` (default float64). Copies; small tensors only."""
        return to_float(self.raw(record), record.dtype, dtype)

    def close(self) -> None:
        """Close every open data file."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def _lines(path: Path, notes: list[str],
           skip: Callable[[DumpError], None]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The manifest's lines as JSON objects; a line that is not one goes to ``skip`` (which
    raises unless salvaging), a final line cut short by a crash is noted and ignored."""
    try:
        if path.parent.resolve() not in path.resolve().parents:
            raise DumpError(f"manifest {path} is a link to a file outside the dump directory")
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or device would block or never end
            raise DumpError(f"manifest {path} is not a regular file")
        text = path.read_bytes()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte in a name
        raise DumpError(f"cannot read manifest {path}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = text.split(b"\n")
    complete = text.endswith(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_last = number == len(lines)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError too), huge numbers, deep nesting
            if is_last and not complete:
                notes.append(f"{path.name}: ignored a final line cut short (the writer was interrupted)")
                return
            skip(DumpError(f"{path}:{number}: manifest line is not valid JSON (corrupted dump)"))
            continue
        if not isinstance(obj, dict):
            skip(DumpError(f"{path}:{number}: manifest line is not a JSON object"))
            continue
        yield number, obj


def load_run(path: str | Path, *, salvage: bool = False) -> Run:
    """Read and validate a dump directory. Raises :class:`DumpError` if it is not a usable dump.

    ``salvage`` (default False): a manifest line that is not valid (malformed JSON in the middle,
    an invalid or duplicated record, a malformed step line, a second header, a record without
    the checksum its format requires) is skipped and listed in ``Run.salvaged`` (and a note)
    instead of refusing the whole dump; what is valid is read. Header problems stay fatal.
    A directory holding an SGLang dumper or msProbe dump instead is imported
    (:func:`parity.store.importers.import_run`, in memory; ``salvage`` skips unreadable tensor files)."""
    root = Path(path)
    if not root.exists():
        raise DumpError(f"dump directory {root} does not exist")
    if not root.is_dir():
        raise DumpError(f"{root} is not a directory (expected a parity dump directory)")
    manifests = sorted(root.glob(MANIFEST_GLOB))
    if not manifests:
        from parity.store.importers import detect_format, import_run

        if detect_format(root) is not None:  # an SGLang or msProbe dump: read into memory
            return import_run(root, salvage=salvage)
        raise DumpError(f"{root} is not a parity dump: no {MANIFEST_GLOB} in it (nor an SGLang or msProbe dump)")
    headers: dict[int, RunHeader] = {}
    records: list[Record] = []
    steps: dict[tuple[int, int], dict[str, Any]] = {}
    notes: list[str] = []
    salvaged: list[str] = []
    seen: set[tuple[str, int, int]] = set()

    def skip(problem: DumpError) -> None:
        if not salvage:
            raise problem
        salvaged.append(str(problem))

    for manifest in manifests:
        header: RunHeader | None = None
        for number, obj in _lines(manifest, notes, skip):
            where = f"{manifest}:{number}"
            kind = obj.get("type")
            if header is None:
                if kind != "header":
                    raise DumpError(f"{where}: first manifest line must be the run header")
                header = parse_header(obj, where)
                if header.rank in headers:
                    raise DumpError(f"{where}: two manifests claim rank {header.rank}")
                headers[header.rank] = header
                continue
            try:
                _read_line(obj, kind, where, header, records, steps, notes, seen)
            except DumpError as problem:
                skip(problem)
        if header is None:
            raise DumpError(f"{manifest} is empty: the capture wrote no header")
    for rank, header in headers.items():
        stored = [r for r in records if r.rank == rank and r.file is not None]
        if header.mode == "stats" and stored:
            raise DumpError(f"{root}: rank {rank}'s header says statistics-only but its records name data files")
        if minor_version(header.format_version) >= CHECKSUMS_SINCE:
            for unchecked in [r for r in stored if r.checksum is None]:
                skip(DumpError(f"{root}: record {unchecked.name!r} step {unchecked.step} (rank {rank}) has no "
                               f"checksum, which format {header.format_version} requires (a corrupted or edited "
                               "manifest)"))
                records.remove(unchecked)
    worlds = {h.world_size for h in headers.values()}
    if len(worlds) > 1:
        raise DumpError(f"{root}: ranks disagree on world_size ({sorted(worlds)})")
    records.sort(key=lambda r: (r.step, r.order, r.rank))
    if salvaged:
        notes.append(f"salvage: {len(salvaged)} manifest line(s) skipped as invalid; the first: {salvaged[0]}")
    return Run(path=root, headers=headers, records=records, steps=steps, notes=notes, salvaged=salvaged)


def _read_line(obj: dict[str, Any], kind: Any, where: str, header: RunHeader, records: list[Record],
               steps: dict[tuple[int, int], dict[str, Any]], notes: list[str], seen: set[tuple[str, int, int]]) -> None:
    """Validate one manifest line after the header and add it to the run being read."""
    if kind == "record":
        record = parse_record(obj, where)
        if record.rank != header.rank:
            raise DumpError(f"{where}: record of rank {record.rank} in the manifest of rank {header.rank}")
        ident = (record.name, record.step, record.rank)
        if ident in seen:
            raise DumpError(f"{where}: record {record.name!r} step {record.step} appears twice")
        seen.add(ident)
        records.append(record)
    elif kind == "step":
        step, tags = obj.get("step"), obj.get("tags")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(tags, dict):
            raise DumpError(f"{where}: malformed step line")
        steps[(step, header.rank)] = tags
    elif kind == "note":
        notes.append(f"rank {header.rank}: {obj.get('message', '')}")
    elif kind == "header":
        raise DumpError(f"{where}: a second header line")
    else:
        raise DumpError(f"{where}: unknown manifest line type {kind!r}")
