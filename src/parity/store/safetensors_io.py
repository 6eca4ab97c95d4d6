"""A validating, memory-mapped reader of safetensors files, with numpy only.

Why not ``safetensors.safe_open``: comparison must not import torch (start-up time), and
numpy's safetensors backend cannot return bfloat16. The format is small and specified
(8-byte little-endian header length, a JSON header, raw little-endian data), so this module
reads it directly and checks every bound before touching data:

- the header length fits in the file and is at most :data:`MAX_HEADER_BYTES` (100 MB);
- the header is a JSON object whose entries have a known dtype, a shape of non-negative
  integers and ``data_offsets`` ``[begin, end]`` inside the data section, with
  ``end - begin == prod(shape) * itemsize``.

Any violation raises :class:`~parity.errors.CorruptDataError` naming the file. Nothing is
evaluated or unpickled. bfloat16 data is returned as its raw ``uint16`` bits; use
:func:`to_float` to widen a (chunk of a) tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parity.errors import CorruptDataError

MAX_HEADER_BYTES = 100 * 1024 * 1024

#: safetensors dtype code -> (parity dtype name, numpy storage dtype)
CODES: dict[str, tuple[str, np.dtype]] = {
    "F64": ("float64", np.dtype("<f8")), "F32": ("float32", np.dtype("<f4")),
    "F16": ("float16", np.dtype("<f2")), "BF16": ("bfloat16", np.dtype("<u2")),
    "I64": ("int64", np.dtype("<i8")), "I32": ("int32", np.dtype("<i4")),
    "I16": ("int16", np.dtype("<i2")), "I8": ("int8", np.dtype("i1")),
    "U8": ("uint8", np.dtype("u1")), "BOOL": ("bool", np.dtype("?")),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies inside a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """An open, validated safetensors file; tensors are zero-copy views of a read-only mmap."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < 8:
                    raise self._corrupt(f"file is {size} bytes, shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise self._corrupt(f"header length {n} does not fit in a file of {size} bytes "
                                        "(truncated or not a safetensors file)")
                raw = fh.read(n)
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
        except OSError as exc:
            raise CorruptDataError(f"cannot read data file {self.path}: {exc.strerror or exc}") from None
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not JSON, 5,000-digit numbers, nesting too deep
            raise self._corrupt("header is not valid JSON (or nests or numbers beyond a reader's limits)") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            self.tensors[key] = self._check_entry(key, entry)

    def _corrupt(self, why: str) -> CorruptDataError:
        return CorruptDataError(f"corrupted data file {self.path}: {why}")

    def _check_entry(self, key: str, entry: object) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._corrupt(f"entry {key!r} is not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if code not in CODES:
            raise self._corrupt(f"entry {key!r} has unknown dtype {code!r}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise self._corrupt(f"entry {key!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise self._corrupt(f"entry {key!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        name, np_dtype = CODES[code]
        expected = math.prod(shape) * np_dtype.itemsize
        if not 0 <= begin <= end <= self.data_size:
            raise self._corrupt(f"entry {key!r} data [{begin}, {end}) lies outside the "
                                f"{self.data_size}-byte data section (truncated file?)")
        if end - begin != expected:
            raise self._corrupt(f"entry {key!r} holds {end - begin} bytes but shape {shape} "
                                f"of {name} needs {expected}")
        return TensorInfo(dtype=name, shape=tuple(shape), begin=begin, end=end)

    def raw(self, key: str) -> np.ndarray:
        """The tensor ``key`` as a read-only array of its storage dtype (bfloat16 as uint16)."""
        info = self.tensors.get(key)
        if info is None:
            raise self._corrupt(f"tensor {key!r} is not in the file")
        np_dtype = CODES[_code(info.dtype)][1]
        count = (info.end - info.begin) // np_dtype.itemsize
        if count == 0 or self._mmap is None:
            return np.zeros(info.shape, dtype=np_dtype)
        arr = np.frombuffer(self._mmap, dtype=np_dtype, count=count, offset=self.data_start + info.begin)
        return arr.reshape(info.shape)

    def release(self, key: str) -> None:
        """Drop the pages of tensor ``key`` from this process's memory (they stay in the page
        cache, and are read again if touched). Keeps resident memory bounded by one pair."""
        info = self.tensors.get(key)
        if info is None or self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        begin = (self.data_start + info.begin) // page * page
        end = self.data_start + info.end
        if end > begin:
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED, begin, end - begin)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        """Release the mapping (views handed out keep it alive until they are dropped)."""
        self._mmap = None


def _code(dtype: str) -> str:
    for code, (name, _) in CODES.items():
        if name == dtype:
            return code
    raise KeyError(dtype)


def to_float(raw: np.ndarray, dtype: str, out_dtype: np.dtype | type = np.float64) -> np.ndarray:
    """Widen storage values (bfloat16 given as uint16 bits) to ``out_dtype`` (default float64)."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(out_dtype, copy=False)
    return raw.astype(out_dtype, copy=False)
