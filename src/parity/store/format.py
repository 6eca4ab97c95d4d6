"""Manifest schema of a dump (format version ``1.3``) and its validation.

Every line of ``manifest-rank{r}.jsonl`` is one JSON object with a ``type``:

``header`` (first line, exactly once)
    ``format_version`` ("MAJOR.MINOR"), ``created`` (ISO time), ``rank``, ``world_size``,
    ``spec`` (backend spec, free-form object), ``model`` (identity: path, class, config hash),
    ``env`` (python / torch / transformers versions, device), ``mode`` ("full" or "stats"),
    ``layout`` (since 1.1, optional: the parallel layout of this rank, ``tp_rank``,
    ``tp_size``, ``dp_rank``, ``dp_size``; absent means one tensor-parallel group of all ranks).
``record``
    ``name``, ``step``, ``rank``, ``order`` (capture order within the step), ``shape``,
    ``dtype`` (torch dtype name without prefix, e.g. ``bfloat16``), ``file`` (path of the
    safetensors shard relative to the dump directory, or null in stats mode), ``key`` (tensor
    key inside the shard), ``stats`` (see :data:`STAT_KEYS`; since 1.2, in stats mode, also
    ``sample``: the values at the flat positions of :func:`sample_positions`, as numbers or
    the strings ``"nan"``, ``"inf"``, ``"-inf"``; at most :data:`MAX_SAMPLE`) and
    ``tags`` (``layer``,
    ``module`` class, ``shard`` — the sharding annotation of a multi-rank run, see
    :mod:`parity.align.shards` — anything the caller passed), and since 1.3 ``checksum``
    (optional, records with data only): ``"xxh3_64:<16 hex digits>"`` of the stored bytes
    (:mod:`parity.store.checksum`), verified by readers before the data is used.
``step``
    ``step``, ``rank``, ``tags``: per forward pass metadata (``input_ids``, ``positions``,
    ``seq_lens`` where known).
``note``
    ``message``: something capture skipped or a reason it turned itself off.

Readers accept any ``1.x`` version and refuse other majors. Nothing is evaluated or unpickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from parity.errors import DumpError
from parity.store.checksum import PATTERN

FORMAT_VERSION = "1.3"
FORMAT_MAJOR = 1
#: Largest ``world_size`` a header may claim (readers bound per-rank work by it).
MAX_WORLD = 65536

#: Summary statistics stored per record. min/max/mean/abs_max/l2 are over the finite
#: elements (null when there are none); nan/inf/zero count elements; numel is the size.
STAT_KEYS = ("min", "max", "mean", "abs_max", "l2", "nan", "inf", "zero", "numel")
#: The largest ``stats.sample`` a record may hold (readers refuse larger ones).
MAX_SAMPLE = 4096
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_FLOAT_MAX = int(1.7976931348623157e308)  # larger ints do not convert to float

#: dtype names (as in torch, without ``torch.``) and their safetensors codes and sizes.
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1),
    "uint8": ("U8", 1), "bool": ("BOOL", 1),
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")

MANIFEST_GLOB = "manifest-rank*.jsonl"

#: Keys of a header's ``layout`` (the rank's place in the parallel groups).
LAYOUT_KEYS = ("tp_rank", "tp_size", "dp_rank", "dp_size")


def manifest_name(rank: int) -> str:
    """File name of the manifest of one rank."""
    return f"manifest-rank{rank}.jsonl"


@dataclass(frozen=True)
class RunHeader:
    """The first line of a rank's manifest: what run this is."""

    format_version: str
    rank: int = 0
    world_size: int = 1
    created: str = ""
    mode: str = "full"
    spec: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The header as a manifest line object."""
        return {"type": "header", "format_version": self.format_version, "created": self.created,
                "rank": self.rank, "world_size": self.world_size, "mode": self.mode,
                "spec": self.spec, "model": self.model, "env": self.env,
                **({"layout": self.layout} if self.layout else {})}


@dataclass(frozen=True)
class Record:
    """One captured tensor value (one manifest ``record`` line)."""

    name: str
    step: int
    rank: int
    order: int
    shape: tuple[int, ...]
    dtype: str
    file: str | None
    key: str | None
    stats: dict[str, Any]
    tags: dict[str, Any]
    checksum: str | None = None

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor data in bytes."""
        return self.numel * DTYPES[self.dtype][1]

    @property
    def layer(self) -> int | None:
        """Layer index from the tags, if known."""
        value = self.tags.get("layer")
        return value if isinstance(value, int) else None

    def to_json(self) -> dict[str, Any]:
        """The record as a manifest line object."""
        return {"type": "record", "name": self.name, "step": self.step, "rank": self.rank,
                "order": self.order, "shape": list(self.shape), "dtype": self.dtype,
                "file": self.file, "key": self.key, "stats": self.stats, "tags": self.tags,
                **({"checksum": self.checksum} if self.checksum is not None else {})}


def check_version(version: Any, where: str) -> None:
    """Refuse a format version whose major this reader does not know."""
    if not isinstance(version, str) or not version.split(".")[0].isdigit():
        raise DumpError(f"{where}: format_version {version!r} is not MAJOR.MINOR")
    major = int(version.split(".")[0])
    if major != FORMAT_MAJOR:
        raise DumpError(f"{where}: dump format version {version} is not supported "
                        f"(this parity reads {FORMAT_MAJOR}.x)",
                        hint="use the parity release that wrote it")


#: The first format version whose records with data must carry a checksum.
CHECKSUMS_SINCE = (1, 3)


def minor_version(version: str) -> tuple[int, int]:
    """(major, minor) of a checked ``format_version`` (a missing or odd minor counts as 0)."""
    major, _, rest = version.partition(".")
    minor = rest.split(".")[0]
    return int(major), int(minor) if minor.isdigit() else 0


def _int(obj: dict[str, Any], key: str, where: str, *, minimum: int = 0) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DumpError(f"{where}: field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_header(obj: dict[str, Any], where: str) -> RunHeader:
    """Validate a ``header`` line."""
    check_version(obj.get("format_version"), where)
    rank = _int(obj, "rank", where)
    world = _int(obj, "world_size", where, minimum=1)
    if world > MAX_WORLD:
        raise DumpError(f"{where}: world_size {world} is beyond the {MAX_WORLD} ranks a dump may have")
    if rank >= world:
        raise DumpError(f"{where}: rank {rank} is not below world_size {world}")
    mode = obj.get("mode", "full")
    if mode not in ("full", "stats"):
        raise DumpError(f"{where}: unknown mode {mode!r}")
    dicts = {k: obj.get(k) or {} for k in ("spec", "model", "env")}
    for k, v in dicts.items():
        if not isinstance(v, dict):
            raise DumpError(f"{where}: field {k!r} must be an object")
    layout = obj.get("layout") or {}
    if (not isinstance(layout, dict) or set(layout) - set(LAYOUT_KEYS)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layout.values())):
        raise DumpError(f"{where}: field 'layout' must map {'/'.join(LAYOUT_KEYS)} to integers >= 0")
    if layout.get("tp_size", 1) < 1 or layout.get("dp_size", 1) < 1:
        raise DumpError(f"{where}: layout sizes must be >= 1")
    return RunHeader(format_version=obj["format_version"], rank=rank, world_size=world,
                     created=str(obj.get("created", "")), mode=mode, layout=dict(layout), **dicts)


def parse_record(obj: dict[str, Any], where: str) -> Record:
    """Validate a ``record`` line: types, dtype, shape bounds. Raises :class:`DumpError`."""
    name = obj.get("name")
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise DumpError(f"{where}: record name must be a non-empty string")
    shape = obj.get("shape")
    if (not isinstance(shape, list) or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise DumpError(f"{where}: record {name!r} has an invalid shape {shape!r}")
    dtype = obj.get("dtype")
    if dtype not in DTYPES:
        raise DumpError(f"{where}: record {name!r} has unknown dtype {dtype!r}")
    file, key = obj.get("file"), obj.get("key")
    if file is not None:
        if (not isinstance(file, str) or file.startswith(("/", "\\")) or ".." in file.split("/")
                or not file.endswith(".safetensors") or "\x00" in file or len(file) > 1024):
            raise DumpError(f"{where}: record {name!r} has an unsafe data path {file!r}")
        if not isinstance(key, str):
            raise DumpError(f"{where}: record {name!r} has no tensor key")
    checksum = obj.get("checksum")
    if checksum is not None and (file is None or not isinstance(checksum, str) or not PATTERN.fullmatch(checksum)):
        raise DumpError(f"{where}: record {name!r} has an invalid checksum {checksum!r}"
                        + (" (a record without data has none)" if file is None else ""))
    stats = obj.get("stats") or {}
    tags = obj.get("tags") or {}
    if not isinstance(stats, dict) or not isinstance(tags, dict):
        raise DumpError(f"{where}: record {name!r} stats and tags must be objects")
    if "sample" in stats:
        stats = {**stats, "sample": _sample(stats["sample"], math.prod(shape), f"{where}: record {name!r}")}
    return Record(name=name, step=_int(obj, "step", where), rank=_int(obj, "rank", where),
                  order=_int(obj, "order", where), shape=tuple(shape), dtype=dtype,
                  file=file, key=key, stats=stats, tags=tags, checksum=checksum)


#: Odd multiplier of :func:`sample_positions` (Knuth's multiplicative hash constant).
SAMPLE_HASH = 2654435761


def sample_positions(numel: int, k: int) -> list[int]:
    """The flat positions a ``stats.sample`` of ``k`` elements of a tensor of ``numel`` elements
    holds (every element when ``numel <= k``): one per segment of ``L = numel // k`` elements,
    ``i * L + (i * SAMPLE_HASH) % L`` for ``i < k``. The offset inside the segment varies with
    ``i``, so the sample spreads over the last axis too (plain ``i * L`` would sit in one column
    whenever ``k`` divides the number of rows); it depends on ``numel`` and ``k`` only, so two
    tensors of one size are sampled at the same positions."""
    if numel <= k:
        return list(range(numel))
    segment = numel // k
    return [i * segment + (i * SAMPLE_HASH) % segment for i in range(k)]


def _sample(value: Any, numel: int, where: str) -> list[float]:
    """A record's ``stats.sample`` as floats (NaN/Inf from their strings); :class:`DumpError`
    unless it is a list of at most ``min(numel, MAX_SAMPLE)`` numbers or those strings."""
    if not isinstance(value, list) or len(value) > min(numel, MAX_SAMPLE):
        raise DumpError(f"{where} has an invalid stats.sample (a list of at most min(numel, {MAX_SAMPLE}) values)")
    out = []
    for v in value:
        if (isinstance(v, float) and math.isfinite(v)) or (type(v) is int and abs(v) <= _FLOAT_MAX):
            out.append(float(v))
        elif isinstance(v, str) and v in _NONFINITE:
            out.append(_NONFINITE[v])
        else:
            raise DumpError(f"{where} has an invalid stats.sample value {v!r}")
    return out
