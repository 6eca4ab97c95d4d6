"""SGLang dumper dumps (``sglang.srt.debug_utils.dumper``) as parity runs.

The dumper writes one file per tensor into ``DIR/<exp_name>/``, named by its tags joined with
``___``: ``step={S}___rank={R}___dump_index={I}___name={N}___recompute_status=...___<kwargs and
context, e.g. layer_id=3>.pt`` (older releases: ``forward_pass_id=`` or ``curr_step=`` in place
of ``step=``). Each file holds ``torch.save({"value": tensor, "meta": {...}})`` (older
releases: the tensor alone); ``meta`` repeats the tags and adds ``world_rank``, ``world_size``,
``sglang_parallel_info`` (``tp_rank``, ``tp_size``, ...) and, when given, ``dims``
(``"t h[tp] d"``). Files are read only with ``torch.load(weights_only=True)``
(:mod:`.safe_load`).

Mapping (defaults in brackets):

- step = ``step`` (``curr_step``, ``forward_pass_id``); rank = ``rank``; order within a step =
  ``dump_index`` order.
- name: the ``name`` tag; the non-intrusive hooks' ``non_intrusive__MODULE.output`` becomes
  ``MODULE`` (``.output.I`` -> ``MODULE.I``, as parity names tuple outputs) so SGLang's module
  names meet transformers' in a parity dump of the same model; a ``layer_id`` tag not already
  in the name prefixes it as ``layers.{id}.`` (parity's canonical tap names); any other tag
  outside the bookkeeping ones is appended as ``[k=v,...]``.
- the token aligner's aux tensors ``input_ids``, ``positions``, ``seq_lens`` and ``rids``
  become the step metadata ``input_ids``, ``positions``, ``seq_lens``, ``request_ids``
  (``--align tokens`` reads them) instead of records; ``req_pool_indices`` is dropped (noted).
  SGLang's ``seq_lens`` count each sequence's whole length, parity's the tokens it has in the
  step: with ``positions`` they are converted (``seq_lens[i] - positions[first token of i]``),
  else kept only when they add up to the step's tokens (dropped with a note otherwise).
- ``dims`` onto the ``shard`` tag of a multi-rank dump: a dim marked ``[tp]`` at index i ->
  ``split:i``, ``[tp:partial]`` -> ``sum``, no parallel marker -> ``replicated``; markers of other
  axes (cp, sp, ep, dp ...) are not mapped (noted; ``--shard`` at compare time fills the gap).
- the header ``layout`` from ``sglang_parallel_info`` (``tp_rank``, ``tp_size``) when the
  tensor-parallel group spans the world; ``world_size`` from ``meta`` [highest rank + 1].
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from parity.errors import DumpError
from parity.store.importers.build import Entry, ImportedDump
from parity.store.importers.safe_load import load_tensor_file

#: Tag keys that name the step, oldest release last.
STEP_KEYS = ("step", "curr_step", "forward_pass_id")
#: Tags that are bookkeeping, not part of a tensor's identity.
BOOKKEEPING = frozenset({*STEP_KEYS, "rank", "dump_index", "name", "recompute_status",
                         "pp_rank", "tp_rank", "cp_rank", "ep_rank", "etp_rank"})
#: Aux tensors that become step metadata (dumper name -> parity step tag).
STEP_TENSORS = {"input_ids": "input_ids", "positions": "positions", "seq_lens": "seq_lens", "rids": "request_ids"}
#: Aux tensors that are dropped (noted).
DROPPED = frozenset({"req_pool_indices"})
#: How many files are listed at most (a bound on a directory parity is asked to read).
MAX_FILES = 10_000_000
_NON_INTRUSIVE = "non_intrusive__"
_INT = re.compile(r"-?\d+")


def parse_filename(stem: str) -> dict[str, str] | None:
    """The tags of a dumper file name (without ``.pt``), or None when it is not one."""
    tags: dict[str, str] = {}
    for part in stem.split("___"):
        key, sep, value = part.partition("=")
        if not sep or not key:
            return None
        tags[key] = value
    if "rank" not in tags or "name" not in tags or "dump_index" not in tags:
        return None
    if not any(k in tags for k in STEP_KEYS):
        return None
    if not all(_INT.fullmatch(tags[k]) for k in ("rank", "dump_index", _step_key(tags))):
        return None
    return tags


def _step_key(tags: dict[str, str]) -> str:
    return next(k for k in STEP_KEYS if k in tags)


def _dump_files(path: Path, *, first_only: bool = False) -> list[tuple[dict[str, str], Path]]:
    found = []
    try:
        with os.scandir(path) as entries:
            for count, item in enumerate(entries):
                if count >= MAX_FILES:
                    raise DumpError(f"{path} holds more than {MAX_FILES} files: not read as an SGLang dump")
                if not item.name.endswith(".pt"):
                    continue
                tags = parse_filename(item.name[:-3])
                if tags is not None:
                    found.append((tags, path / item.name))
                    if first_only:
                        break
    except OSError:
        return []
    return found


def dump_dir(path: Path) -> Path | None:
    """The folder of ``path`` that holds dumper files: ``path`` itself, or its only subfolder
    (the dumper's ``exp_name`` folder) when ``path`` holds none; None when neither does."""
    if _dump_files(path, first_only=True):
        return path
    try:
        subdirs = [p for p in path.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return None
    if len(subdirs) == 1 and _dump_files(subdirs[0], first_only=True):
        return subdirs[0]
    return None


def detect(path: Path) -> bool:
    """True when ``path`` (or its only subfolder) holds SGLang dumper files."""
    return dump_dir(path) is not None


def record_name(tags: dict[str, Any]) -> str:
    """The parity record name of a dumper tensor (see the module docstring)."""
    name = str(tags["name"])
    if name.startswith(_NON_INTRUSIVE):
        name = name[len(_NON_INTRUSIVE):]
        if name.endswith(".output"):
            name = name[: -len(".output")]
        else:
            name = name.replace(".output.", ".")
    layer = tags.get("layer_id")
    if layer is not None and f"layers.{layer}" not in name:
        name = f"layers.{layer}.{name}"
    extra = sorted((k, v) for k, v in tags.items() if k not in BOOKKEEPING and k != "layer_id")
    if extra:
        name += "[" + ",".join(f"{k}={v}" for k, v in extra) + "]"
    return name


def shard_of_dims(dims: str) -> str | None:
    """The parity sharding annotation of a dumper ``dims`` string, or None when it marks an
    axis parity does not rebuild (see the module docstring). ``"t h[tp] d"`` -> ``split:1``."""
    tokens = dims.split("#", 1)[0].split()
    marked = []
    for index, token in enumerate(tokens):
        match = re.search(r"\[([^\]]+)\]$", token)
        if match:
            for modifier in match.group(1).split(","):
                axis, _, qualifiers = modifier.strip().partition(":")
                marked.append((index, axis.strip(), {q.strip() for q in qualifiers.split("+") if q.strip()}))
    if not marked:
        return "replicated"
    if len(marked) != 1 or marked[0][1] not in ("tp", "attn_tp", "moe_tp"):
        return None
    index, _, qualifiers = marked[0]
    return "sum" if "partial" in qualifiers else f"split:{index}"


def _plain(value: Any) -> Any:
    """A tensor or list turned into JSON-ready values (step metadata); None for a tensor of more
    than 2**20 elements or of a dtype step metadata cannot hold (complex: not JSON numbers)."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() > 1 << 20 or value.is_complex() or value.layout != torch.strided:
            return None
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def read(path: Path) -> ImportedDump:
    """Describe the SGLang dump at ``path`` (its folder, or the folder holding it) as an
    :class:`ImportedDump`; tensors are loaded when the run is written."""
    folder = dump_dir(path)
    if folder is None:
        raise DumpError(f"{path} holds no SGLang dumper files (step=..___rank=..___dump_index=..___name=...pt)")
    files = _dump_files(folder)
    files.sort(key=lambda item: (int(item[0]["rank"]), int(item[0][_step_key(item[0])]), int(item[0]["dump_index"])))
    dump = ImportedDump(source=path, tool="sglang", spec={"engine": "sglang", "imported": "sglang dumper"},
                        env={"tool": "sglang dumper", "source": str(folder)})
    max_rank = 0
    for tags, file in files:
        rank, step = int(tags["rank"]), int(tags[_step_key(tags)])
        max_rank = max(max_rank, rank)
        name = str(tags["name"])
        if name in DROPPED:
            dump.notes.append(f"SGLang aux tensor {name!r} is not imported")
            continue
        if name in STEP_TENSORS:
            value = _value(file, folder)[0]
            # the first one of a step wins: the model runner dumps them before the forward pass
            # (a model's own input_ids keyword, seen again by the non-intrusive hooks, comes later)
            dump.steps.setdefault((step, rank), {}).setdefault(STEP_TENSORS[name], _plain(value))
            continue
        dump.entries.append(Entry(name=record_name(tags), step=step, rank=rank,
                                  load=_loader(file, folder)))
    for (step, rank), tags in dump.steps.items():
        _step_seq_lens(tags, step, rank, dump.notes)
    _read_parallel_facts(dump, files, folder, max_rank)
    return dump


def _flat(value: list[Any]) -> list[Any]:
    """A nested list's leaves in order ([[1, 2], [3]] -> [1, 2, 3])."""
    return [leaf for item in value for leaf in (_flat(item) if isinstance(item, list) else [item])]


def _step_seq_lens(tags: dict[str, Any], step: int, rank: int, notes: list[str]) -> None:
    """SGLang's ``seq_lens`` are whole sequence lengths (cached prefix + this step's tokens);
    parity's are the tokens each sequence has in the step. With ``positions`` (the first token
    of sequence i sits at position ``prefix_i``) each count is ``seq_lens[i] - prefix_i``;
    without them, seq_lens are kept only when they add up to the step's tokens (a prefill)."""
    lens, ids, positions = tags.get("seq_lens"), tags.get("input_ids"), tags.get("positions")
    if not isinstance(lens, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in lens):
        tags.pop("seq_lens", None)
        return
    tokens = len(_flat(ids)) if isinstance(ids, list) else None
    positions = _flat(positions) if isinstance(positions, list) else None
    if isinstance(positions, list) and all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
        counts, start = [], 0
        for total in lens:
            if start >= len(positions):
                break
            count = total - positions[start]
            if count < 1:
                break
            counts.append(count)
            start += count
        if len(counts) == len(lens) and start == len(positions) and tokens in (None, start):
            tags["seq_lens"] = counts
            return
    if tokens is not None and sum(lens) == tokens:
        return
    tags.pop("seq_lens")
    notes.append(f"step {step} rank {rank}: SGLang seq_lens {lens[:8]} do not fit the step's tokens; dropped "
                 "(the token aligner treats the step as one sequence)")


def _value(file: Path, folder: Path) -> tuple[Any, dict[str, Any]]:
    """(value, meta) of one dumper file: ``{"value", "meta"}`` or a bare value (older releases)."""
    obj = load_tensor_file(file, folder)
    if isinstance(obj, dict) and "value" in obj:
        meta = obj.get("meta")
        return obj["value"], meta if isinstance(meta, dict) else {}
    return obj, {}


def _loader(file: Path, folder: Path) -> Any:
    """Loads the file's tensor when the run is written."""
    def load() -> Any:
        return _value(file, folder)[0]
    return load


def _read_parallel_facts(dump: ImportedDump, files: list[tuple[dict[str, str], Path]], folder: Path,
                         max_rank: int) -> None:
    """World size, layouts and shard tags from the files' ``meta`` (one file per rank read for
    the parallel info; every entry's ``dims`` needs its own file only in multi-rank dumps)."""
    world = max_rank + 1
    first_of_rank: dict[int, Path] = {}
    for tags, file in files:
        first_of_rank.setdefault(int(tags["rank"]), file)
    metas = {rank: _value(file, folder)[1] for rank, file in first_of_rank.items()}
    claimed = [m.get("world_size") for m in metas.values() if isinstance(m.get("world_size"), int)]
    if claimed:
        if max(claimed) <= max_rank:
            raise DumpError(f"{folder}: the dumper says world_size {max(claimed)} but files of rank {max_rank} exist")
        world = max(claimed)
    dump.world_size = world
    for rank, meta in metas.items():
        info = meta.get("sglang_parallel_info")
        if isinstance(info, dict) and info.get("tp_size") == world and isinstance(info.get("tp_rank"), int):
            dump.layouts[rank] = {"tp_rank": info["tp_rank"], "tp_size": world, "dp_rank": 0, "dp_size": 1}
        if isinstance(meta.get("tokenizer_path"), str):
            dump.model.setdefault("tokenizer", meta["tokenizer_path"])
    if world == 1:
        return
    by_name = {}
    for tags, file in files:
        by_name.setdefault((record_name(tags), int(tags["rank"])), file)
    annotations: dict[str, str | None] = {}
    for entry in dump.entries:
        if entry.name in annotations:
            shard = annotations[entry.name]
        else:
            dims = _value(by_name[(entry.name, entry.rank)], folder)[1].get("dims")
            shard = shard_of_dims(dims) if isinstance(dims, str) else None
            if isinstance(dims, str) and shard is None:
                dump.notes.append(f"{entry.name}: dims {dims!r} mark an axis parity does not rebuild "
                                  "(only tp); give --shard at compare time")
            annotations[entry.name] = shard
        if shard is not None:
            entry.tags["shard"] = shard
