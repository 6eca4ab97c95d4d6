"""Helpers the benchmarks share (imported as ``_common``: the scripts run as ``python bench/X.py``)."""

from __future__ import annotations

from pathlib import Path


def warm_page_cache(*dirs: Path, pattern: str = "*") -> int:
    """Read every file under ``dirs`` matching ``pattern`` once (into the page cache); the bytes read."""
    total = 0
    for d in dirs:
        for path in sorted(d.rglob(pattern)):
            if path.is_file():
                with open(path, "rb") as fh:
                    while chunk := fh.read(16 << 20):
                        total += len(chunk)
    return total


def data_bytes(*dirs: Path) -> int:
    """Bytes of the shard files (tensor data plus safetensors headers) under ``dirs``."""
    return sum(p.stat().st_size for d in dirs for p in d.rglob("*.safetensors"))
