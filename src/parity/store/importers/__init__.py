"""Importers: other tools' dumps read as parity runs (SGLang dumper, msProbe).

:func:`detect_format` names the format of a directory (``"sglang"``, ``"msprobe"`` or None);
:func:`import_run` reads it into an in-memory :class:`~.build.ImportedRun` that compares,
aligns and reports like any run; :func:`convert` writes it as a parity dump directory.
:func:`~parity.store.reader.load_run` calls :func:`import_run` for a directory without a parity
manifest that one of the importers recognises, so every command that opens a dump opens these.

Nothing is unpickled beyond ``torch.load(weights_only=True)`` and
``numpy.load(allow_pickle=False)`` (:mod:`.safe_load`). Formats and mappings:
:mod:`.sglang`, :mod:`.msprobe`; how a foreign dump becomes records: :mod:`.build`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from parity.errors import DumpError

#: Format name -> importer module name (checked in this order).
FORMATS = ("msprobe", "sglang")


def _module(fmt: str) -> ModuleType:
    if fmt == "msprobe":
        from parity.store.importers import msprobe

        return msprobe
    from parity.store.importers import sglang

    return sglang


def detect_format(path: str | Path) -> str | None:
    """``"msprobe"`` or ``"sglang"`` when ``path`` is a directory holding such a dump, else None."""
    root = Path(path)
    if not root.is_dir():
        return None
    for fmt in FORMATS:
        if _module(fmt).detect(root):
            return fmt
    return None


def _read(path: str | Path, fmt: str | None) -> tuple[str, object]:
    root = Path(path)
    fmt = fmt or detect_format(root)
    if fmt is None:
        raise DumpError(f"{root} is neither a parity dump nor an SGLang or msProbe dump")
    if fmt not in FORMATS:
        raise DumpError(f"unknown import format {fmt!r} (known: {', '.join(FORMATS)})")
    return fmt, _module(fmt).read(root)


def import_run(path: str | Path, *, fmt: str | None = None, salvage: bool = False):  # -> ImportedRun
    """The dump at ``path`` (format ``fmt``, default: detected) as an in-memory run. Every
    tensor is loaded (memory: the dump's size); ``salvage`` (default False) skips unreadable
    tensor files and lists them in ``run.salvaged`` instead of raising."""
    from parity.store.importers.build import to_run

    _, dump = _read(path, fmt)
    return to_run(dump, salvage=salvage)  # type: ignore[arg-type]


def convert(path: str | Path, out_dir: str | Path, *, fmt: str | None = None, salvage: bool = False) -> tuple[str, int]:
    """Write the dump at ``path`` as a parity dump in ``out_dir`` (which must not hold one),
    one tensor in memory at a time. Returns (format, records written)."""
    from parity.store.importers.build import write_dump

    fmt, dump = _read(path, fmt)
    return fmt, write_dump(dump, Path(out_dir), salvage=salvage)  # type: ignore[arg-type]
