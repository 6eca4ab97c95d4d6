"""Errors of parity, carried as data until the CLI turns them into one line.

Every error a user can cause (bad arguments, a file that is not a dump, a corrupted shard)
is a :class:`ParityError`. The CLI prints ``parity: error: <message>`` on stderr and exits
with code 2; library callers catch :class:`ParityError` (or a subclass).
"""

from __future__ import annotations


class ParityError(Exception):
    """Base class of every error parity reports to a user.

    ``hint`` (default ``None``) names the next step, e.g. which option fixes the problem;
    the CLI appends it to the message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint on one line, as the CLI prints it."""
        text = self.message if self.hint is None else f"{self.message} ({self.hint})"
        return " ".join(text.split())


class SpecError(ParityError):
    """A backend SPEC string (``dtype=float32,attn=eager``) is malformed or names unknown values."""


class DumpError(ParityError):
    """A dump directory is missing, not a dump, empty, of an unknown format version or corrupted."""


class CorruptDataError(DumpError):
    """A tensor data file fails validation: truncated, bad header, offsets out of bounds."""


class UnsafeFileError(DumpError):
    """A file of an imported dump (SGLang, msProbe) that parity refuses to load: a pickle holding
    more than plain tensor data (it could run code), an object array, an unknown file type."""


class UsageError(ParityError):
    """Arguments that cannot work together, or an option value that cannot be parsed."""


class BackendError(ParityError):
    """A model could not be loaded or run under the requested backend."""
