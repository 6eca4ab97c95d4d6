"""Checking the data files of a dump: every shard header by default, every byte on request.

:func:`check_data` is what ``parity inspect`` runs. Without ``read``: each data file named by a
record is opened and its header parsed and validated (:mod:`parity.store.safetensors_io`),
and each record is checked against it (key present, same dtype and shape) — cheap, no tensor
bytes are read. With ``read=True`` (``parity inspect --verify``) every record's bytes are read
too and checked against the record's checksum (:mod:`parity.store.checksum`). The first
problem raises :class:`~parity.errors.CorruptDataError` naming the file and record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from parity.errors import CorruptDataError
from parity.store.reader import Run


@dataclass(frozen=True)
class DataCheck:
    """What :func:`check_data` looked at."""

    files: int       #: data files whose header was parsed and validated
    records: int     #: records checked against their file's header
    read: int        #: records whose bytes were read (``read=True``)
    unverified: int  #: of those, records without a checksum (written before format 1.3)
    problems: tuple[str, ...] = ()  #: ``salvage=True``: every problem found (else the first raises)

    def summary(self) -> str:
        """One line for the terminal."""
        if not self.records:
            return "data: none stored (statistics-only dump)"
        if self.problems:
            return (f"data: {self.files} files, {self.records - len(self.problems)} of {self.records} records valid; "
                    f"{len(self.problems)} not (listed below)")
        text = f"data: {self.files} files, {self.records} records match their shard headers"
        if self.read:
            verified = self.read - self.unverified
            text += f"; {self.read} records read, {verified} checksums match"
            if self.unverified:
                text += f", {self.unverified} records carry no checksum (written before format 1.3)"
        return text


def check_data(run: Run, *, read: bool = False, salvage: bool = False,
               progress: Callable[[int, int], None] | None = None) -> DataCheck:
    """Validate the data files of ``run`` (see the module docstring); ``progress(done, total)``
    is called after each record (default None). ``salvage`` (default False): check every
    record and list the problems in :attr:`DataCheck.problems` instead of raising the first."""
    stored = [r for r in run.records if r.file is not None]
    unverified = 0
    problems: list[str] = []
    for index, record in enumerate(stored):
        try:
            if read:  # raw() locates the record in its file's header, then checks the bytes
                run.raw(record)
                run.release(record)
                unverified += record.checksum is None
            else:
                run.locate(record)
        except CorruptDataError as exc:
            if not salvage:
                raise
            problems.append(f"record {record.name!r} step {record.step} (rank {record.rank}): {exc}")
        if progress is not None:
            progress(index + 1, len(stored))
    files = len({r.file for r in stored})
    return DataCheck(files=files, records=len(stored), read=len(stored) if read else 0, unverified=unverified,
                     problems=tuple(problems))
