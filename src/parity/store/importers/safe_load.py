"""Loading the tensor files of other tools' dumps without running code from them.

SGLang's dumper and msProbe write ``.pt`` files (``torch.save``: a pickle) and msProbe also
``.npy`` files. A pickle can run any code when loaded, so these are opened only in the two ways
that cannot:

- ``.pt`` / ``.pth``: ``torch.load(path, weights_only=True, map_location="cpu")`` — torch's
  restricted unpickler, which builds tensors, containers and plain values and refuses every
  other global (``os.system``, a class with ``__reduce__``) before calling it;
- ``.npy``: ``numpy.load(path, allow_pickle=False)`` — object arrays (pickles) are refused.

Every other suffix is refused. Before opening, the file must be a regular file inside the dump
directory (a symlink out of it, a FIFO or a device is refused without opening it) and at most
:data:`MAX_FILE_BYTES` (default 64 GiB) long. A refusal is an
:class:`~parity.errors.UnsafeFileError`; a file that is truncated or not what its suffix says is
a :class:`~parity.errors.CorruptDataError`; both name the file, on one line.
"""

from __future__ import annotations

import stat
import warnings
from pathlib import Path
from typing import Any

from parity.errors import CorruptDataError, DumpError, UnsafeFileError

#: Suffixes read with ``torch.load(weights_only=True)``.
TORCH_SUFFIXES = (".pt", ".pth")
#: Suffixes read with ``numpy.load(allow_pickle=False)``.
NUMPY_SUFFIXES = (".npy",)
#: The largest tensor file opened (64 GiB): a bound, not a guess at real sizes.
MAX_FILE_BYTES = 64 << 30
#: How many times its file's size the tensors of one file may hold once made dense and
#: contiguous (default 4): a stored view or sparse tensor can declare a shape far beyond the bytes
#: it stores (stride 0), and copying it would allocate that shape. A tensor saved as itself holds
#: its data in the file, so this keeps an import's memory within a few times the dump's size.
MAX_EXPANSION = 4
#: How deep and how many objects of a loaded file are walked to check its tensors' sizes.
MAX_WALK_DEPTH, MAX_WALK_ITEMS = 64, 1_000_000


def checked_file(path: Path, root: Path) -> Path:
    """``path`` resolved, once it is a regular file inside ``root`` of at most
    :data:`MAX_FILE_BYTES`; raises :class:`UnsafeFileError` / :class:`DumpError` otherwise."""
    try:
        resolved = path.resolve(strict=True)
        inside = resolved == root.resolve() or root.resolve() in resolved.parents
        info = resolved.stat()
    except FileNotFoundError:
        raise DumpError(f"tensor file {path} is missing") from None
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name too long
        raise DumpError(f"cannot open tensor file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not inside:
        raise UnsafeFileError(f"tensor file {path} is a link to a file outside the dump directory {root}")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"tensor file {path} is not a regular file")
    if info.st_size > MAX_FILE_BYTES:
        raise UnsafeFileError(f"tensor file {path} is {info.st_size} bytes, beyond the {MAX_FILE_BYTES} parity opens")
    return resolved


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception message, shortened (torch's are paragraphs)."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            return line.split(". ")[0][:200]
    return type(exc).__name__


#: Words of torch's restricted unpickler when it refuses an object (not the bytes) of a pickle.
_REFUSED = ("GLOBAL", "Unsupported global", "not an allowed global", "Unsupported class", "blocked")


def _refusal(exc: BaseException) -> str | None:
    """What torch's restricted unpickler refused ("unsupported GLOBAL posix.system ..."), or None
    when the error is about the bytes (garbage, a truncated pickle) rather than what they build."""
    for line in str(exc).splitlines():
        if any(word in line for word in _REFUSED):
            return line.strip().rstrip(".")[:200]
    return None


def load_tensor_file(path: Path, root: Path) -> Any:
    """The object stored in a ``.pt``/``.pth`` file (tensors, dicts, lists, plain values: whatever
    ``weights_only`` allows) or the array of a ``.npy`` file. See the module docstring."""
    suffix = path.suffix.lower()
    if suffix not in TORCH_SUFFIXES + NUMPY_SUFFIXES:
        raise UnsafeFileError(f"{path}: parity reads only {', '.join(TORCH_SUFFIXES + NUMPY_SUFFIXES)} tensor files "
                              f"(with torch.load(weights_only=True) / numpy.load(allow_pickle=False)), not {suffix or 'a file without suffix'}")
    resolved = checked_file(path, root)
    if suffix in NUMPY_SUFFIXES:
        return _load_npy(path, resolved)
    size = resolved.stat().st_size
    _check_zip_members(path, resolved, size)
    value = _load_pt(path, resolved)
    _check_tensor_sizes(value, path, size)
    return value


def _check_zip_members(path: Path, resolved: Path, file_bytes: int) -> None:
    """Refuse a torch zip file whose members declare more than :data:`MAX_EXPANSION` times the
    file's size uncompressed (torch writes members stored, not compressed; a deflated member
    would be inflated, to the size it declares, before any tensor is checked). Files that are
    not zips (the legacy format, garbage) are left to ``torch.load``."""
    import zipfile

    try:
        if not zipfile.is_zipfile(resolved):
            return
        with zipfile.ZipFile(resolved) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except Exception:  # a damaged directory: torch.load says what is wrong with it
        return
    if declared > MAX_EXPANSION * file_bytes:
        raise CorruptDataError(f"{path} is a {file_bytes}-byte zip whose members inflate to {declared} bytes: "
                               f"not a torch.save file (parity reads at most {MAX_EXPANSION}x a file's size)")


def _check_tensor_sizes(value: Any, path: Path, file_bytes: int) -> None:
    """Refuse a loaded object whose tensors, made dense, plus the storages they view, would hold
    more than :data:`MAX_EXPANSION` times the file's size, or that nests deeper than :data:`MAX_WALK_DEPTH` / holds more than
    :data:`MAX_WALK_ITEMS` objects (a memory or recursion bomb, not a dump)."""
    import torch

    limit = MAX_EXPANSION * file_bytes
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = dense = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > MAX_WALK_DEPTH or seen > MAX_WALK_ITEMS:
            raise CorruptDataError(f"{path} nests deeper than {MAX_WALK_DEPTH} levels or holds more than "
                                   f"{MAX_WALK_ITEMS} objects: not a tensor dump parity reads")
        if isinstance(item, torch.Tensor):
            dense += item.numel() * item.element_size()
            if item.layout == torch.strided:  # a small view of a huge (declared) storage holds it all
                dense += item.untyped_storage().nbytes()
            if dense > limit:
                raise CorruptDataError(f"{path} holds tensors of {dense} bytes or more (one of shape "
                                       f"{list(item.shape)}) in a {file_bytes}-byte file: a view or sparse tensor "
                                       f"far beyond the data stored (parity reads at most {MAX_EXPANSION}x a file's size)")
        elif isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)


def _load_pt(path: Path, resolved: Path) -> Any:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": noise for the user
            warnings.simplefilter("ignore")
            return torch.load(resolved, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        refused = _refusal(exc)
        if refused is not None:
            raise UnsafeFileError(
                f"{path} holds more than tensor data and was not loaded ({refused}); parity loads torch files "
                "only with torch.load(weights_only=True), which runs no code",
                hint="re-save it as plain tensors, or convert it with the tool that wrote it") from None
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line), _first_line(exc))
        raise CorruptDataError(f"{path} is not a torch.save file parity can load safely: corrupted, truncated or "
                               f"a plain pickle ({detail[:200]})") from None
    except Exception as exc:  # truncated zip, garbage bytes, an unknown storage: torch raises many types
        raise CorruptDataError(f"{path} is not a readable torch.save file: truncated or corrupted "
                               f"({type(exc).__name__}: {_first_line(exc)})") from None


def _load_npy(path: Path, resolved: Path) -> Any:
    import numpy as np

    _check_npy_header(path, resolved)
    try:
        array = np.load(resolved, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise UnsafeFileError(f"{path} is an object array (a pickle) and was not loaded; parity loads .npy files "
                                  "only with numpy.load(allow_pickle=False)") from None
        raise CorruptDataError(f"{path} is not a readable .npy file: {_first_line(exc)}") from None
    except Exception as exc:  # truncated, a bad header, an .npz or pickle under the .npy name
        raise CorruptDataError(f"{path} is not a readable .npy file: truncated or corrupted "
                               f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(array, np.ndarray):  # np.load returns an NpzFile for zip data
        getattr(array, "close", lambda: None)()
        raise CorruptDataError(f"{path} is not a .npy array file (numpy read a {type(array).__name__})")
    return array


def _check_npy_header(path: Path, resolved: Path) -> None:
    """Refuse a ``.npy`` file whose header declares more data than the file holds (numpy would
    allocate the declared shape before finding the file short). Other header problems are left
    to ``numpy.load``; files that are not ``.npy`` (an ``.npz``) pass through to it."""
    import numpy as np
    from numpy.lib import format as npy_format

    try:
        with open(resolved, "rb") as handle:
            if handle.read(6) != npy_format.MAGIC_PREFIX:
                return
            handle.seek(0)
            version = npy_format.read_magic(handle)
            reader = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}.get(version)
            if reader is None:
                return
            shape, _, dtype = reader(handle)
            offset = handle.tell()
        size = resolved.stat().st_size
    except Exception:  # a bad header: numpy.load says what is wrong with it
        return
    if dtype.hasobject:
        return  # refused by numpy.load(allow_pickle=False) before any allocation
    if any(int(d) < 0 for d in shape):
        raise CorruptDataError(f"{path} declares a negative shape {list(shape)}: corrupted .npy file")
    declared = int(np.prod([int(d) for d in shape], dtype=object)) * dtype.itemsize
    if declared > size - offset:
        raise CorruptDataError(f"{path} declares shape {list(shape)} ({declared} bytes of {dtype}) but holds "
                               f"{max(size - offset, 0)} bytes of data: truncated or corrupted .npy file")
