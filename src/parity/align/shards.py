"""Sharding annotations and the reassembly of multi-rank runs into logical tensors.

Under tensor parallelism each rank holds a piece of some activations. An annotation says how
to rebuild the full tensor from the records of the ranks of one tensor-parallel group
(``SPEC`` grammar, as given at capture time or with ``--shard PATTERN=SPEC``):

``split:DIM``
    the ranks hold consecutive slices along ``DIM`` (negative counts from the end):
    concatenated in tp-rank order.
``sum``
    the ranks hold partial sums (a row-parallel linear before its all-reduce): added up in
    float64 and rounded once to the stored dtype.
``replicated``
    every rank holds the full tensor (after an all-reduce): one copy is taken — the lowest
    rank whose copy is not degenerate — and every other rank is checked to agree bitwise.
    Ranks that do not agree are reported (and make the pair fail).

Annotations travel in each record's ``tags["shard"]``; overrides given at compare time win
over them (first matching pattern), so a wrong annotation never forces a re-run. A tap of a
multi-rank run with no annotation is an error that names the tap.

The parallel layout of each rank (``tp_rank``/``tp_size``/``dp_rank``/``dp_size``, header
field ``layout``; default: every rank in one tensor-parallel group) decides the groups. With
several data-parallel groups the tensors each group rebuilt are concatenated along the token
axis (the second-to-last axis; the first for 1-D tensors).

Degenerate shards: a shard (of any annotation) that is all zeros, or holds NaN/Inf, while
another rank's shard of the same tensor is healthy is flagged with its rank — the failure
class of an all-reduce that returned zeros on one rank.

:class:`LogicalRun` presents a multi-rank :class:`~parity.store.reader.Run` as a single-rank
one: one logical record per (name, step), rebuilt on demand by :meth:`LogicalRun.raw` one
tensor at a time (only that tensor is held in memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from parity.align.view import RunView
from parity.capturing.taps import Tap, compile_tap
from parity.errors import DumpError, UsageError
from parity.store.format import FLOAT_DTYPES, Record
from parity.store.reader import Run
from parity.store.safetensors_io import to_float

KINDS = ("split", "sum", "replicated")


@dataclass(frozen=True)
class ShardSpec:
    """How the ranks' records of one tap combine: ``kind`` in :data:`KINDS`, ``dim`` for split."""

    kind: str
    dim: int | None = None

    def __str__(self) -> str:
        return f"split:{self.dim}" if self.kind == "split" else self.kind


def parse_shard_spec(text: str) -> ShardSpec:
    """Parse ``split:DIM``, ``sum`` or ``replicated`` (also ``concat:DIM``, ``partial``)."""
    value = str(text).strip().lower()
    head, _, arg = value.partition(":")
    if head in ("split", "concat"):
        try:
            return ShardSpec("split", int(arg))
        except ValueError:
            raise UsageError(f"sharding {text!r}: split needs an integer dimension, e.g. split:-1") from None
    if head in ("sum", "partial", "reduce-sum") and not arg:
        return ShardSpec("sum")
    if head in ("replicated", "replicate") and not arg:
        return ShardSpec("replicated")
    raise UsageError(f"sharding {text!r} is not split:DIM, sum or replicated")


@dataclass(frozen=True)
class ShardRule:
    """``pattern`` (a tap pattern over record names) → ``spec``."""

    pattern: Tap
    spec: ShardSpec


def parse_shard_rule(text: str) -> ShardRule:
    """Parse ``PATTERN=SPEC`` (``--shard 'layers.*.attn=sum'``); the last ``=`` separates."""
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern:
        raise UsageError(f"--shard {text!r}: expected PATTERN=SPEC (SPEC: split:DIM, sum or replicated)")
    return ShardRule(compile_tap(pattern), parse_shard_spec(spec))


def shard_rules(mapping: dict[str, str] | Sequence[str] | None) -> list[ShardRule]:
    """Rules from ``{pattern: spec}`` or a list of ``PATTERN=SPEC`` strings (None: none)."""
    if not mapping:
        return []
    if isinstance(mapping, dict):
        return [ShardRule(compile_tap(p), parse_shard_spec(s)) for p, s in mapping.items()]
    return [parse_shard_rule(text) for text in mapping]


def _rule_spec(name: str, rules: Sequence[ShardRule]) -> ShardSpec | None:
    """The spec of the first rule matching ``name`` or its base (``NAME#k`` -> ``NAME``); None: no rule."""
    for rule in rules:
        if rule.pattern.matches(name.split("#")[0]) or rule.pattern.matches(name):
            return rule.spec
    return None


def annotation_for(name: str, rules: Sequence[ShardRule]) -> str | None:
    """The spec text of the first rule matching ``name`` (None: no rule matches)."""
    spec = _rule_spec(name, rules)
    return None if spec is None else str(spec)


@dataclass(frozen=True)
class ShardFinding:
    """Something wrong with one rank's piece of a logical tensor."""

    rank: int
    message: str
    degenerate: bool
    #: True: the pair fails whatever its numbers (a replicated copy that is degenerate or
    #: disagrees). False: a split/sum shard that is all zeros or non-finite — legitimate at
    #: times (an expert rank that got no tokens), so it only explains a pair that fails anyway.
    hard: bool = True


@dataclass
class _Group:
    """The records of one logical tensor: per DP group, the records in tp-rank order."""

    spec: ShardSpec
    parts: list[list[Record]]
    findings: list[ShardFinding] = field(default_factory=list)


def _layout(run: Run, rank: int) -> tuple[int, int, int, int]:
    layout = run.headers[rank].layout or {}
    world = run.world_size
    tp_size = int(layout.get("tp_size", world))
    dp_size = int(layout.get("dp_size", max(world // max(tp_size, 1), 1)))
    tp_rank = int(layout.get("tp_rank", rank % tp_size))
    dp_rank = int(layout.get("dp_rank", rank // tp_size))
    return tp_rank, tp_size, dp_rank, dp_size


#: Elements per chunk when scanning a shard for degeneracy (bounded extra memory).
CHUNK = 1 << 20


def _degenerate(raw: np.ndarray, dtype: str) -> str | None:
    """Why a shard is degenerate (NaN/Inf values, all zeros), or None; scanned in chunks."""
    flat = raw.reshape(-1)
    if flat.size == 0:
        return None
    nonfinite = 0
    nonzero = False
    for start in range(0, flat.size, CHUNK):
        values = to_float(flat[start:start + CHUNK], dtype, np.float32)
        nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
        nonzero = nonzero or bool(np.any(values))
    if nonfinite:
        return f"holds {nonfinite} NaN/Inf values"
    return None if nonzero else "is all zeros"


def _round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded once to ``dtype`` in storage form (bfloat16 as uint16 bits)."""
    if dtype == "bfloat16":
        bits = values.astype(np.float32).view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        nan = np.isnan(values)
        out = (rounded >> np.uint32(16)).astype(np.uint16)
        out[nan] = np.uint16(0x7FC0)
        return out
    return values.astype(np.dtype(dtype))


class LogicalRun(RunView):
    """A multi-rank run seen as one rank: a logical record per (name, step); see the module docstring.

    ``overrides`` (default none) win over the annotations stored at capture. Raises
    :class:`UsageError` naming the tap when a multi-rank tap has no annotation, and
    :class:`DumpError` when the ranks disagree on a tap's shape or annotation.
    """

    def __init__(self, run: Run, overrides: Sequence[ShardRule] = ()) -> None:
        self.run = run
        self.path = run.path
        self.headers = {0: run.header}
        self.notes = list(run.notes)
        #: ranks of the world without a manifest here (a bounded list: world_size is at most MAX_WORLD)
        self._absent = sorted(set(range(run.world_size)) - set(run.headers))
        if self._absent:
            self.notes.append(f"{run.world_size}-rank run without the manifests of ranks "
                              f"{_ranks_text(self._absent, len(self._absent))}")
        self.layouts = _check_layouts(run)
        self._groups: dict[tuple[str, int], _Group] = {}
        self.records = self._build(overrides)

    # -------------------------------------------------------------- Run interface (see RunView)

    def group_step_tags(self, step: int) -> list[dict[str, Any]]:
        """Step metadata per data-parallel group, in the order their tensors are joined (each
        from the group's lowest tensor-parallel rank present)."""
        heads: dict[int, tuple[int, int]] = {}
        for rank, (tp_rank, _, dp_rank, _) in self.layouts.items():
            if dp_rank not in heads or tp_rank < heads[dp_rank][0]:
                heads[dp_rank] = (tp_rank, rank)
        return [self.run.step_tags(step, heads[dp][1]) for dp in sorted(heads)]

    def step_tags(self, step: int, rank: int = 0) -> dict[str, Any]:
        """Step metadata: the lowest rank's; with several data-parallel groups, their token ids
        joined in group order (``input_ids`` only, as a single row)."""
        groups = self.group_step_tags(step)
        if len(groups) == 1:
            return groups[0]
        from parity.align.tokens import flatten_rows

        ids = [flatten_rows(tags.get("input_ids")) for tags in groups]
        return {"input_ids": [[i for part in ids for i in (part or [])]]} if all(ids) else {}


    def release(self, record: Record) -> None:
        """Release the memory pages of every shard of ``record``."""
        group = self._groups.get((record.name, record.step))
        for part in group.parts if group else []:
            for shard in part:
                self.run.release(shard)

    def findings(self, record: Record) -> list[ShardFinding]:
        """Problems found with individual ranks: from the data while rebuilding ``record`` (after
        :meth:`raw`), from the stored statistics for statistics-only dumps."""
        group = self._groups.get((record.name, record.step))
        if group is None:
            return []
        if record.file is None:
            return self._stats_findings(group)
        return list(group.findings)

    @staticmethod
    def _stats_findings(group: _Group) -> list[ShardFinding]:
        out: list[ShardFinding] = []
        for part in group.parts:
            if len(part) < 2 or not all(r.stats for r in part):
                continue
            problems = {r.rank: p for r in part if (p := _stats_problem(r.stats))}
            healthy = [r for r in part if r.rank not in problems]
            if healthy:
                hard = group.spec.kind == "replicated"
                out.extend(ShardFinding(rank, f"rank {rank}'s shard ({group.spec}) {problem} while rank "
                                              f"{healthy[0].rank}'s is not (from statistics)", True, hard)
                           for rank, problem in problems.items())
                if group.spec.kind == "replicated":
                    keep = healthy[0]
                    out.extend(ShardFinding(r.rank, f"rank {r.rank}'s copy of a replicated tensor has other "
                                                    f"statistics than rank {keep.rank}'s", False)
                               for r in healthy[1:] if r.stats != keep.stats)
        return out

    def raw(self, record: Record) -> np.ndarray:
        """The rebuilt tensor in storage form (bfloat16 as uint16 bits); findings are refreshed."""
        group = self._groups[(record.name, record.step)]
        group.findings = []
        pieces = [self._rebuild(group, part) for part in group.parts]
        if len(pieces) == 1:
            return pieces[0]
        axis = max(pieces[0].ndim - 2, 0)
        return np.concatenate(pieces, axis=axis)

    # -------------------------------------------------------------- building
    def _build(self, overrides: Sequence[ShardRule]) -> list[Record]:
        run = self.run
        by_key: dict[tuple[str, int], list[Record]] = {}
        for record in run.records:
            by_key.setdefault((record.name, record.step), []).append(record)
        layouts = self.layouts
        out: list[Record] = []
        for (name, step), records in by_key.items():
            spec = self._spec(name, step, records, overrides)
            groups: dict[int, list[tuple[int, Record]]] = {}
            for record in records:
                tp_rank, _, dp_rank, _ = layouts[record.rank]
                groups.setdefault(dp_rank, []).append((tp_rank, record))
            parts = [[r for _, r in sorted(groups[dp])] for dp in sorted(groups)]
            present = {r.rank for r in records}
            lacking_here = sorted(set(run.headers) - present)
            count = len(lacking_here) + len(self._absent)
            lacking = sorted(lacking_here + self._absent[:SHOWN_RANKS])[:SHOWN_RANKS]
            self._groups[(name, step)] = _Group(spec, parts)
            shape = self._shape(name, step, spec, parts)
            first = min(records, key=lambda r: r.rank)
            tags = {**first.tags, "ranks": sorted(present), "shard": str(spec)}
            if lacking:
                tags["lacking_ranks"] = lacking
                tags["incomplete"] = f"ranks {_ranks_text(lacking, count)} hold no record of it (its shards are incomplete)"
            stats = self._stats(spec, parts)
            if not all(r.file for r in records) and not stats:
                tags["incomplete"] = (f"statistics-only dump: statistics of {spec} shards cannot be combined "
                                      "(capture this tap after its all-reduce, or with tensors)")
            out.append(replace(first, rank=0, order=min(r.order for r in records), shape=shape,
                               stats=stats, tags=tags,
                               file=first.file if all(r.file for r in records) else None))
        out.sort(key=lambda r: (r.step, r.order))
        return out

    def _spec(self, name: str, step: int, records: list[Record], overrides: Sequence[ShardRule]) -> ShardSpec:
        base = name.split("#")[0]
        override = _rule_spec(name, overrides)
        if override is not None:
            return override
        stored = {r.tags.get("shard") for r in records}
        if len(stored) > 1:
            raise DumpError(f"ranks of {self.path} disagree on the sharding of {name!r} step {step}: "
                            f"{sorted(map(str, stored))}")
        text = stored.pop()
        if text is None:
            if len(records) == 1 and self.run.world_size == 1:
                return ShardSpec("replicated")
            raise UsageError(f"tap {name!r} of the {self.run.world_size}-rank run {self.path} has no "
                             "sharding annotation",
                             hint=f"pass --shard '{base}=split:DIM|sum|replicated' or annotate it at capture")
        try:
            return parse_shard_spec(text)
        except UsageError:
            raise DumpError(f"{self.path}: tap {name!r} has an unreadable sharding annotation {text!r}") from None

    def _shape(self, name: str, step: int, spec: ShardSpec, parts: list[list[Record]]) -> tuple[int, ...]:
        shapes = []
        for part in parts:
            first = part[0].shape
            if spec.kind == "split":
                ndim = len(first)
                if not -ndim <= (spec.dim or 0) < ndim:
                    raise UsageError(f"tap {name!r}: split:{spec.dim} is out of range for shape {list(first)}")
                dim = spec.dim % ndim  # type: ignore[operator]
                for r in part:
                    if len(r.shape) != ndim or any(a != b for i, (a, b) in enumerate(zip(r.shape, first)) if i != dim):
                        raise DumpError(f"{self.path}: shards of {name!r} step {step} cannot be joined along "
                                        f"dim {spec.dim}: {[list(x.shape) for x in part]}")
                shapes.append(tuple(sum(r.shape[dim] for r in part) if i == dim else d for i, d in enumerate(first)))
            else:
                if any(r.shape != first for r in part):
                    raise DumpError(f"{self.path}: ranks of {name!r} step {step} ({spec}) have different "
                                    f"shapes: {[list(x.shape) for x in part]}")
                shapes.append(first)
        if len(shapes) == 1:
            return shapes[0]
        axis = max(len(shapes[0]) - 2, 0)
        if any(len(x) != len(shapes[0]) or any(a != b for i, (a, b) in enumerate(zip(x, shapes[0])) if i != axis)
               for x in shapes):
            raise DumpError(f"{self.path}: the data-parallel groups' {name!r} step {step} cannot be joined along "
                            f"the token axis: {[list(x) for x in shapes]}")
        return tuple(sum(s[axis] for s in shapes) if i == axis else d for i, d in enumerate(shapes[0]))

    @staticmethod
    def _stats(spec: ShardSpec, parts: list[list[Record]]) -> dict[str, Any]:
        """Statistics of the logical tensor where they follow from the shards' (empty for sums)."""
        if spec.kind == "sum" or any(not r.stats for part in parts for r in part):
            return {}
        if spec.kind == "replicated":  # one copy per group: the first that is not degenerate
            shards = [next((r for r in part if not _stats_problem(r.stats)), part[0]) for part in parts]
        else:
            shards = [r for part in parts for r in part]
        if len(shards) == 1:
            return dict(shards[0].stats)
        stats = [r.stats for r in shards]
        numel = sum(int(s.get("numel") or 0) for s in stats)
        out: dict[str, Any] = {"numel": numel}
        for key in ("nan", "inf", "zero"):
            out[key] = sum(int(s.get(key) or 0) for s in stats)
        finite = [s for s in stats if s.get("min") is not None]
        if finite:
            out["min"] = min(s["min"] for s in finite)
            out["max"] = max(s["max"] for s in finite)
            out["abs_max"] = max(s["abs_max"] for s in finite)
            out["l2"] = math.sqrt(sum(float(s["l2"]) ** 2 for s in finite))
            counts = [int(s["numel"]) - int(s.get("nan") or 0) - int(s.get("inf") or 0) for s in finite]
            total = sum(counts)
            out["mean"] = sum(float(s["mean"]) * c for s, c in zip(finite, counts)) / total if total else None
        else:
            out.update(min=None, max=None, abs_max=None, l2=None, mean=None)
        return out

    # -------------------------------------------------------------- rebuilding
    def _rebuild(self, group: _Group, part: list[Record]) -> np.ndarray:
        spec = group.spec
        raws = [self.run.raw(r) for r in part]
        dtype = part[0].dtype
        floats = dtype in FLOAT_DTYPES
        problems = {}
        if floats and len(part) > 1:
            for r, raw in zip(part, raws):
                problem = _degenerate(raw, dtype)
                if problem:
                    problems[r.rank] = problem
        healthy = [r.rank for r in part if r.rank not in problems]
        if healthy:  # a degenerate shard is only news when another rank's is healthy
            for rank, problem in problems.items():
                group.findings.append(ShardFinding(rank, f"rank {rank}'s shard ({spec}) {problem} "
                                                   f"while rank {healthy[0]}'s is not", True,
                                                   hard=spec.kind == "replicated"))
        if spec.kind == "split":
            return np.concatenate(raws, axis=spec.dim)  # type: ignore[arg-type]
        if spec.kind == "sum":
            total = np.zeros(part[0].shape, dtype=np.float64)
            for raw in raws:
                total += to_float(raw, dtype, np.float64)
            return _round_to(total, dtype)
        # replicated: the copy most healthy ranks agree on bitwise (the lowest rank's on a tie)
        clusters: list[list[int]] = []
        for i, r in enumerate(part):
            if r.rank in problems:
                continue
            home = next((c for c in clusters if np.array_equal(raws[c[0]], raws[i])), None)
            if home is None:
                clusters.append([i])
            else:
                home.append(i)
        if not clusters:
            return raws[0]
        chosen = max(clusters, key=len)
        tie = sum(1 for c in clusters if len(c) == len(chosen)) > 1
        keep = raws[chosen[0]]
        agree = ", ".join(str(part[i].rank) for i in chosen)
        for cluster in clusters:
            if cluster is chosen:
                continue
            for i in cluster:
                delta = (float(np.max(np.abs(to_float(raws[i], dtype) - to_float(keep, dtype)))) if floats
                         else float("nan"))
                where = f"rank {agree}'s (no majority)" if tie else f"the copy of ranks {agree}"
                group.findings.append(ShardFinding(part[i].rank, f"rank {part[i].rank}'s copy of a replicated "
                                                   f"tensor differs from {where} (max |Δ| {delta:.3g})", False))
        return keep


#: How many rank numbers a tag or message lists before it only counts.
SHOWN_RANKS = 16


def _ranks_text(ranks: list[int], count: int) -> str:
    """``[1, 2, 3]``, or the first :data:`SHOWN_RANKS` and how many there are in all."""
    shown = ranks[:SHOWN_RANKS]
    return str(shown) if count <= len(shown) else f"{str(shown)[:-1]}, ... ({count} ranks)]"


def _stats_problem(stats: dict[str, Any]) -> str | None:
    """Why stored statistics show a degenerate tensor (NaN/Inf, all zeros), or None."""
    if not stats:
        return None
    if int(stats.get("nan") or 0) + int(stats.get("inf") or 0):
        return "holds NaN/Inf values"
    numel = int(stats.get("numel") or 0)
    if numel and int(stats.get("zero") or 0) == numel:
        return "is all zeros"
    return None


def _check_layouts(run: Run) -> dict[int, tuple[int, int, int, int]]:
    """Each rank's (tp_rank, tp_size, dp_rank, dp_size), checked to describe one consistent grid."""
    layouts = {rank: _layout(run, rank) for rank in run.headers}
    sizes = {(tp_size, dp_size) for _, tp_size, _, dp_size in layouts.values()}
    if len(sizes) > 1:
        raise DumpError(f"{run.path}: ranks disagree on the parallel layout sizes (tp_size, dp_size): {sorted(sizes)}")
    (tp_size, dp_size), = sizes
    if tp_size * dp_size != run.world_size:
        raise DumpError(f"{run.path}: layout tp_size {tp_size} x dp_size {dp_size} is not the world size "
                        f"{run.world_size}")
    seen: dict[tuple[int, int], int] = {}
    for rank, (tp_rank, _, dp_rank, _) in sorted(layouts.items()):
        if tp_rank >= tp_size or dp_rank >= dp_size:
            raise DumpError(f"{run.path}: rank {rank} has tp_rank {tp_rank} / dp_rank {dp_rank} outside the "
                            f"layout {tp_size} x {dp_size}")
        if (dp_rank, tp_rank) in seen:
            raise DumpError(f"{run.path}: ranks {seen[(dp_rank, tp_rank)]} and {rank} both claim tp_rank {tp_rank} "
                            f"of dp group {dp_rank}")
        seen[(dp_rank, tp_rank)] = rank
    return layouts


def logical_view(run: Run, overrides: Sequence[ShardRule] = ()) -> Run | LogicalRun:
    """``run`` itself when it has one rank, else its :class:`LogicalRun`."""
    if run.world_size == 1 and len(run.headers) == 1:
        return run
    return LogicalRun(run, overrides)
