"""msProbe (mindstudio-probe) dumps as parity runs: PyTorch and MindSpore, tensors or statistics.

A ``PrecisionDebugger`` dump is ``DUMP/step{S}/{rank}/`` with ``dump.json`` (+ ``stack.json``,
``construct.json``) and, for ``task="tensor"``, ``dump_tensor_data/*.pt`` (PyTorch) or
``*.npy`` (MindSpore). The rank folder is ``rank{R}`` under torch.distributed, ``rank`` or
``proc{PID}`` in a single process (rank 0). ``dump.json`` holds ``task`` (``tensor`` or
``statistics``), ``level``, ``framework`` and ``data``: per call, in execution order,
``{"input_args", "input_kwargs", "output", "parameters"}`` whose tensors carry ``dtype``,
``shape``, ``Max``, ``Min``, ``Mean``, ``Norm`` and, with tensors, ``data_name`` (the file in
``dump_tensor_data``). ``path`` may be the dump folder, one step folder or one rank folder.

Mapping (defaults in brackets):

- step = the ``step{S}`` folder [0]; rank = ``rank{R}`` [0]; order = order in ``data``.
- name: ``Module.PATH.CLASS.forward.K`` (``Cell.`` and ``construct`` for MindSpore) -> ``PATH``
  (the module's name, as in a parity capture of the same model), ``#K`` appended for a call
  index K > 0 (a module called again in the same step, as parity names repeated calls); API
  calls (level L1) ``Functional.linear.0.forward`` -> ``Functional.linear.0``. The class goes to
  the ``module`` tag.
- only forward **outputs** are imported (parity records module outputs): one tensor ->
  ``NAME``; several -> ``NAME.I`` (tuple index) / ``NAME.KEY`` (dict entry), as parity names
  the parts of an output. Inputs, parameters and backward calls are not imported (noted).
- ``task="statistics"`` -> a statistics-only run (``mode="stats"``): ``min``/``max``/``mean``
  /``l2`` = ``Min``/``Max``/``Mean``/``Norm``, ``abs_max`` = max(|Min|, |Max|), ``numel`` from
  the shape. msProbe stores no NaN/Inf/zero counts: they are left out, and its statistics are
  over all elements (parity's: over the finite ones), so a NaN shows as a NaN statistic.
- the first ``input_ids`` / ``position_ids`` keyword input of a step (tensor dumps) become the
  step metadata ``input_ids`` / ``positions``.
- Tensor files are loaded only with ``torch.load(weights_only=True)`` /
  ``numpy.load(allow_pickle=False)`` (:mod:`.safe_load`); a file whose shape disagrees with
  ``dump.json`` is refused. ``dump.json`` is read once, at most :data:`MAX_JSON_BYTES`.
"""

from __future__ import annotations

import json
import math
import re
import stat
from pathlib import Path
from typing import Any, Iterator

from parity.errors import CorruptDataError, DumpError, UnsafeFileError
from parity.store.format import DTYPES
from parity.store.importers.build import Entry, ImportedDump, finite_or_none
from parity.store.importers.safe_load import load_tensor_file

#: The largest ``dump.json`` read (1 GiB).
MAX_JSON_BYTES = 1 << 30
_MODULE = re.compile(r"^(?:Module|Cell)\.(?P<path>.+)\.(?P<cls>[^.]+)\.(?P<dir>forward|backward|construct)\.(?P<k>\d+)$")
_API = re.compile(r"^(?P<api>.+)\.(?P<dir>forward|backward)$")
_STEP = re.compile(r"step(\d+)")
_RANK = re.compile(r"rank(\d*)|proc\d+")


def _is_rank_dir(path: Path) -> bool:
    return (path / "dump.json").is_file()


def _rank_of(folder: Path) -> int:
    match = _RANK.fullmatch(folder.name)
    return int(match.group(1)) if match and match.group(1) else 0


def _step_of(folder: Path) -> int:
    match = _STEP.fullmatch(folder.name)
    return int(match.group(1)) if match else 0


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def rank_dirs(path: Path) -> list[tuple[int, int, Path]]:
    """(step, rank, folder) of every rank folder under ``path`` (see the module docstring)."""
    if _is_rank_dir(path):
        return [(_step_of(path.parent), _rank_of(path), path)]
    found = []
    subdirs = _subdirs(path)
    step_dirs = [p for p in subdirs if _STEP.fullmatch(p.name)]
    if step_dirs:
        for step_dir in step_dirs:
            found += [(_step_of(step_dir), _rank_of(r), r) for r in _subdirs(step_dir) if _is_rank_dir(r)]
    else:
        found = [(_step_of(path), _rank_of(r), r) for r in subdirs if _is_rank_dir(r)]
    return sorted(found, key=lambda item: (item[0], item[1]))


def detect(path: Path) -> bool:
    """True when ``path`` is an msProbe dump, step or rank folder (it holds a ``dump.json``)."""
    return bool(rank_dirs(path))


def _read_json(file: Path) -> dict[str, Any]:
    try:
        info = file.stat()
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{file} is not a regular file")
        if info.st_size > MAX_JSON_BYTES:
            raise UnsafeFileError(f"{file} is {info.st_size} bytes, beyond the {MAX_JSON_BYTES} parity reads")
        obj = json.loads(file.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):
        raise CorruptDataError(f"{file} is not valid JSON (truncated or corrupted msProbe dump)") from None
    except OSError as exc:
        raise DumpError(f"cannot read {file}: {exc.strerror or exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), dict):
        raise CorruptDataError(f"{file} is not an msProbe dump.json (no 'data' object)")
    return obj


def parity_dtype(name: Any) -> str | None:
    """``torch.float32`` / ``Float32`` / ``mindspore.bfloat16`` as a parity dtype name, or None."""
    if not isinstance(name, str):
        return None
    short = name.rsplit(".", 1)[-1].lower()
    return short if short in DTYPES else None


def split_name(key: str) -> tuple[str, str | None, int, bool] | None:
    """(parity name, module class, call index, is forward) of a ``data`` key, or None."""
    match = _MODULE.fullmatch(key)
    if match:
        return match["path"], match["cls"], int(match["k"]), match["dir"] != "backward"
    match = _API.fullmatch(key)
    if match:
        return match["api"], None, 0, match["dir"] == "forward"
    return None


def _is_tensor(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("type"), str) and item["type"].endswith("Tensor")


def _leaves(value: Any, path: tuple[str, ...] = (), depth: int = 0) -> Iterator[tuple[tuple[str, ...], dict]]:
    """The tensors of an output description with their path (tuple indices, dict keys)."""
    if _is_tensor(value):
        yield path, value
    elif depth > 8:
        return
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, path + (str(index),), depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, path + (str(key),), depth + 1)


def output_names(base: str, output: Any) -> list[tuple[str, dict]]:
    """(record name, tensor description) of each output tensor (see the module docstring)."""
    if isinstance(output, list) and len(output) == 1:
        output = output[0]  # msProbe wraps every output in a list
    leaves = list(_leaves(output))
    if len(leaves) == 1 and all(part.isdigit() for part in leaves[0][0]):
        return [(base, leaves[0][1])]
    return [(".".join((base, *path)), item) for path, item in leaves]


def _stats(item: dict, shape: tuple[int, ...]) -> dict[str, Any]:
    lo, hi = item.get("Min"), item.get("Max")
    finite = [abs(v) for v in (finite_or_none(lo), finite_or_none(hi)) if v is not None]
    return {"min": _number(lo), "max": _number(hi), "mean": _number(item.get("Mean")),
            "abs_max": max(finite) if finite else None, "l2": _number(item.get("Norm")), "numel": math.prod(shape)}


def _number(value: Any) -> Any:
    """A statistic as a float (NaN/Inf kept: the manifest writes them as strings) or None when it
    is not a number; an integer beyond float range (JSON allows 10**400) is ±inf, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _shape(item: dict, where: str) -> tuple[int, ...]:
    shape = item.get("shape")
    if (not isinstance(shape, list) or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise CorruptDataError(f"{where}: invalid shape {shape!r}")
    return tuple(shape)


def _data_file(folder: Path, item: dict, where: str) -> Path:
    data_name = item.get("data_name")
    if not isinstance(data_name, str) or not data_name or "/" in data_name or "\\" in data_name \
            or data_name in (".", "..") or "\x00" in data_name:
        raise UnsafeFileError(f"{where}: unsafe or missing data_name {data_name!r}")
    return folder / "dump_tensor_data" / data_name


def _loader(file: Path, root: Path, shape: tuple[int, ...], where: str) -> Any:
    def load() -> Any:
        import numpy as np
        import torch

        value = load_tensor_file(file, root)
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf" or value.dtype.str.lstrip("<>|=") not in (
                    "f8", "f4", "f2", "i8", "i4", "i2", "i1", "u1", "b1"):
                raise CorruptDataError(f"{file}: array dtype {value.dtype} is not one parity stores")
            if not value.dtype.isnative:  # a big-endian .npy: torch takes native byte order only
                value = value.astype(value.dtype.newbyteorder("="))
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise CorruptDataError(f"{file} holds a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise CorruptDataError(f"{where}: dump.json says shape {list(shape)} but {file.name} holds "
                                   f"{list(value.shape)}")
        return value
    return load


def read(path: Path) -> ImportedDump:
    """Describe the msProbe dump at ``path`` as an :class:`ImportedDump` (tensors load lazily)."""
    folders = rank_dirs(path)
    if not folders:
        raise DumpError(f"{path} holds no msProbe dump.json (looked in it, its step*/ and rank folders)")
    seen: dict[tuple[int, int], Path] = {}
    for step, rank, folder in folders:
        if (step, rank) in seen:
            raise DumpError(f"{path}: {seen[(step, rank)].name} and {folder.name} both read as step {step} rank "
                            f"{rank}", hint="point parity at one of them")
        seen[(step, rank)] = folder
    root = path.resolve()
    dump = ImportedDump(source=path, tool="msprobe")
    tasks = set()
    skipped = {"inputs and parameters of calls": 0, "backward calls": 0, "unknown entries": 0, "dtypes parity does not store": 0}
    data_files: set[Path] = set()
    for step, rank, folder in folders:
        where_json = folder / "dump.json"
        meta = _read_json(where_json)
        task = meta.get("task")
        if task not in ("tensor", "statistics"):
            raise DumpError(f"{where_json}: msProbe task {task!r} is not imported (tensor or statistics dumps only)")
        tasks.add(task)
        dump.spec = {"engine": str(meta.get("framework", "pytorch")), "imported": "msprobe",
                     "level": str(meta.get("level", "")), "task": task}
        step_tags: dict[str, Any] = {}
        for key, call in meta["data"].items():
            parsed = split_name(str(key)) if isinstance(call, dict) else None
            if parsed is None:
                skipped["unknown entries"] += 1
                continue
            base, cls, index, forward = parsed
            if not forward:
                skipped["backward calls"] += 1
                continue
            if call.get("input_args") or call.get("input_kwargs") or call.get("parameters"):
                skipped["inputs and parameters of calls"] += 1
            if task == "tensor" and len(step_tags) < 2:
                _step_inputs(call.get("input_kwargs"), folder, root, step_tags, f"{where_json} {key}")
            name = base if index == 0 else f"{base}#{index}"
            for record_name, item in output_names(name, call.get("output")):
                where = f"{where_json} {key}"
                dtype, shape = parity_dtype(item.get("dtype")), _shape(item, where)
                if dtype is None:
                    skipped["dtypes parity does not store"] += 1
                    continue
                tags = {"module": cls} if cls else {}
                if task == "statistics":
                    dump.entries.append(Entry(name=record_name, step=step, rank=rank, tags=tags, shape=shape,
                                              dtype=dtype, stats=_stats(item, shape)))
                else:
                    file = _data_file(folder, item, where)
                    if file in data_files:  # each tensor has its own file: a reuse multiplies memory
                        raise CorruptDataError(f"{where}: data_name {file.name!r} is named by two tensors of "
                                               f"{where_json} (each tensor of an msProbe dump has its own file)")
                    data_files.add(file)
                    dump.entries.append(Entry(name=record_name, step=step, rank=rank, tags=tags,
                                              load=_loader(file, root, shape, where)))
        if step_tags:
            dump.steps[(step, rank)] = step_tags
    if len(tasks) > 1:
        raise DumpError(f"{path}: mixes msProbe tensor and statistics dumps; import one kind at a time")
    dump.mode = "stats" if tasks == {"statistics"} else "full"
    dump.world_size = max(rank for _, rank, _ in folders) + 1
    dump.env = {"tool": "msprobe", "source": str(path)}
    for what, count in skipped.items():
        if count:
            dump.notes.append(f"msProbe {what} not imported: {count} (parity compares forward outputs)")
    return dump


def _step_inputs(kwargs: Any, folder: Path, root: Path, tags: dict[str, Any], where: str) -> None:
    """``input_ids`` / ``position_ids`` keyword inputs of a call as step metadata (tensor dumps)."""
    if not isinstance(kwargs, dict):
        return
    for source, target in (("input_ids", "input_ids"), ("position_ids", "positions")):
        item = kwargs.get(source)
        if target not in tags and _is_tensor(item) and parity_dtype(item.get("dtype")) in ("int64", "int32"):
            shape = _shape(item, where)
            if math.prod(shape) <= 1 << 20:
                tags[target] = _loader(_data_file(folder, item, where), root, shape, where)().tolist()
