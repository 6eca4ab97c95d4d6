"""Token alignment: compare runs that processed the same tokens in different steps and layouts.

Engines lay tokens out differently: padded ``[batch, seq]`` against packed ``[num_tokens]``,
a prefill in one step against chunked prefill over several, decode batched differently,
padding tokens added by an empty data-parallel rank. With ``--align tokens`` parity does not
pair records step by step; it rebuilds, for each run, which real token every row of every step
holds — from the step metadata the captures store (``input_ids``, ``positions``, ``seq_lens``,
``request_ids``, ``attention_mask``) — and compares each tap over all its steps at once, token
by token.

Reading one step's metadata (:func:`step_tokens`):

- ``input_ids`` ``[T]`` or ``[1, T]``: packed; ``seq_lens`` (default ``[T]``) are consecutive
  sequences and slots past ``sum(seq_lens)`` are padding.
- ``input_ids`` ``[B, S]`` with B > 1: padded rows; ``attention_mask`` marks the real slots,
  else the first ``seq_lens[b]`` slots of row b are real (right padding), else all are.
- ``positions`` (same layout) give each token's position in its sequence; default: its index
  within the sequence.

Requests: a sequence with a ``request_ids`` entry belongs to that request. Without ids, a
sequence whose first position is 0 starts a new request and one that starts at position p > 0
continues the most recent request that ends at p - 1 (chunked prefill, decode).

Matching (:func:`align_runs`): requests pair by request id when both runs have ids, otherwise
by token-id prefix (the first unmatched request of the other run whose tokens agree at every
position both hold). Within a request pair, tokens pair by position when their ids agree.
Nothing is truncated silently: tokens of one side only (and positions whose ids differ) are
listed in the :class:`Alignment` summary and fail the comparison as a ``tokens`` outcome.

A tap takes part when, in every step that holds one of its records, the leading dimensions of
the record multiply to the step's number of slots (``[1, T, H]``, ``[T, H]``, ``[B, S, H]``):
those dimensions become the token axis. Other taps are compared step by step as usual.
:class:`AlignedRun` presents the result as a run with one record per aligned tap (step 0,
shape ``[tokens, *rest]``), gathered one tap at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from parity.errors import DumpError
from parity.store.format import Record


@dataclass
class Token:
    """One real token of one step: where it sits (``step``, ``slot``), its request, position and id."""

    step: int
    slot: int
    position: int
    token_id: int | None


@dataclass
class Request:
    """The tokens of one request across steps, by position."""

    key: str
    request_id: Any = None
    tokens: dict[int, Token] = field(default_factory=dict)

    @property
    def end(self) -> int:
        """Next position after the last one held (0 when empty)."""
        return max(self.tokens) + 1 if self.tokens else 0


@dataclass
class StepLayout:
    """A step's slots: how many, and the real tokens among them (grouped per sequence)."""

    slots: int
    sequences: list[list[Token]]
    request_ids: list[Any] | None
    padding: int


def _flat(value: Any) -> list[Any] | None:
    if not isinstance(value, list):
        return None
    out: list[Any] = []
    for item in value:
        if isinstance(item, list):
            out.extend(item)
        else:
            out.append(item)
    return out


def step_tokens(step: int, tags: dict[str, Any]) -> StepLayout | None:
    """The layout of one step from its metadata (see the module docstring); None without ``input_ids``."""
    ids = tags.get("input_ids")
    flat_ids = _flat(ids)
    if not flat_ids:
        return None
    positions = _flat(tags.get("positions"))
    if positions is not None and len(positions) != len(flat_ids):
        positions = None
    seq_lens = tags.get("seq_lens")
    seq_lens = [int(x) for x in seq_lens] if isinstance(seq_lens, list) and all(
        isinstance(x, (int, float)) for x in seq_lens) else None
    real: list[list[int]] = []
    padded = isinstance(ids, list) and len(ids) > 1 and all(isinstance(r, list) for r in ids)
    if padded:
        width = len(ids[0])
        mask = tags.get("attention_mask")
        for b in range(len(ids)):
            if isinstance(mask, list) and len(mask) == len(ids):
                real.append([b * width + s for s, m in enumerate(mask[b]) if m])
            elif seq_lens is not None and len(seq_lens) == len(ids):
                real.append([b * width + s for s in range(min(seq_lens[b], width))])
            else:
                real.append([b * width + s for s in range(width)])
    else:
        lengths = seq_lens if seq_lens is not None else [len(flat_ids)]
        start = 0
        for length in lengths:
            real.append(list(range(start, min(start + length, len(flat_ids)))))
            start += length
    sequences = []
    for slots in real:
        seq = []
        for index, slot in enumerate(slots):
            pos = positions[slot] if positions is not None else index
            token = flat_ids[slot]
            seq.append(Token(step, slot, int(pos), int(token) if isinstance(token, (int, float)) else None))
        sequences.append(seq)
    request_ids = tags.get("request_ids")
    if not (isinstance(request_ids, list) and len(request_ids) == len(sequences)):
        request_ids = None
    used = sum(len(s) for s in sequences)
    return StepLayout(slots=len(flat_ids), sequences=sequences, request_ids=request_ids,
                      padding=len(flat_ids) - used)


def requests_of(run: Any) -> tuple[list[Request], dict[int, StepLayout], int]:
    """The requests of a run (one rank's view), the layout per step, and the padding slots dropped."""
    steps = sorted({r.step for r in run.records})
    requests: list[Request] = []
    by_id: dict[Any, Request] = {}
    layouts: dict[int, StepLayout] = {}
    padding = 0
    for step in steps:
        layout = step_tokens(step, run.step_tags(step))
        if layout is None:
            continue
        layouts[step] = layout
        padding += layout.padding
        for k, seq in enumerate(layout.sequences):
            if not seq:
                continue
            rid = layout.request_ids[k] if layout.request_ids is not None else None
            request = None
            if rid is not None:
                request = by_id.get(rid)
            elif seq[0].position > 0:
                request = next((r for r in reversed(requests) if r.request_id is None and r.end == seq[0].position),
                               None)
            if request is None:
                request = Request(key=f"request {len(requests)}", request_id=rid)
                requests.append(request)
                if rid is not None:
                    by_id[rid] = request
                    request.key = f"request {rid}"
            for token in seq:
                request.tokens[token.position] = token
    return requests, layouts, padding


@dataclass
class Alignment:
    """The token pairs of two runs and what did not pair."""

    pairs: list[tuple[Token, Token]]
    baseline_only: list[str]
    target_only: list[str]
    differing: list[str]
    padding: tuple[int, int]
    layouts: tuple[dict[int, StepLayout], dict[int, StepLayout]]
    requests: tuple[int, int]

    def summary(self) -> str:
        """One line for the report."""
        parts = [f"token alignment: {len(self.pairs)} tokens of {self.requests[0]} request(s) compared "
                 f"across steps; padding dropped: {self.padding[0]} baseline, {self.padding[1]} target slot(s)"]
        for label, items in (("baseline only", self.baseline_only), ("target only", self.target_only),
                             ("token ids differ", self.differing)):
            if items:
                parts.append(f"{label}: {'; '.join(items[:4])}{' …' if len(items) > 4 else ''}")
        return "; ".join(parts)


def _ranges(positions: Sequence[int]) -> str:
    out, start = [], None
    ordered = sorted(positions)
    for i, p in enumerate(ordered):
        if start is None:
            start = p
        if i + 1 == len(ordered) or ordered[i + 1] != p + 1:
            out.append(f"{start}" if start == p else f"{start}-{p}")
            start = None
    return ",".join(out)


def _agree(a: Request, b: Request) -> bool:
    common = set(a.tokens) & set(b.tokens)
    return bool(common) and all(a.tokens[p].token_id == b.tokens[p].token_id for p in common)


def align_runs(baseline: Any, target: Any) -> Alignment:
    """Pair the real tokens of two runs (see the module docstring). Raises DumpError without metadata."""
    base_req, base_layouts, base_pad = requests_of(baseline)
    target_req, target_layouts, target_pad = requests_of(target)
    for run, layouts in ((baseline, base_layouts), (target, target_layouts)):
        if not layouts:
            raise DumpError(f"{run.path} stores no token metadata (input_ids) per step: --align tokens cannot "
                            "work on it", hint="capture with parity.capture or the engine integrations")
    by_id = all(r.request_id is not None for r in base_req + target_req)
    unmatched = list(target_req)
    matched: list[tuple[Request, Request]] = []
    baseline_only: list[str] = []
    for request in base_req:
        other = None
        if by_id:
            other = next((t for t in unmatched if t.request_id == request.request_id), None)
        else:
            other = next((t for t in unmatched if _agree(request, t)), None)
        if other is None:
            baseline_only.append(f"{request.key} (positions {_ranges(list(request.tokens))})")
            continue
        unmatched.remove(other)
        matched.append((request, other))
    target_only = [f"{t.key} (positions {_ranges(list(t.tokens))})" for t in unmatched]
    pairs: list[tuple[Token, Token]] = []
    differing: list[str] = []
    for b, t in matched:
        only_b = sorted(set(b.tokens) - set(t.tokens))
        only_t = sorted(set(t.tokens) - set(b.tokens))
        if only_b:
            baseline_only.append(f"{b.key} positions {_ranges(only_b)}")
        if only_t:
            target_only.append(f"{t.key} positions {_ranges(only_t)}")
        bad = []
        for position in sorted(set(b.tokens) & set(t.tokens)):
            tb, tt = b.tokens[position], t.tokens[position]
            if tb.token_id != tt.token_id:
                bad.append(position)
            else:
                pairs.append((tb, tt))
        if bad:
            differing.append(f"{b.key} positions {_ranges(bad)}")
    return Alignment(pairs, baseline_only, target_only, differing, (base_pad, target_pad),
                     (base_layouts, target_layouts), (len(base_req), len(target_req)))


def _token_axis(shape: tuple[int, ...], slots: int) -> int | None:
    """How many leading dims multiply to ``slots`` (the token axis), or None."""
    product = 1
    for k, d in enumerate(shape):
        product *= d
        if product == slots:
            return k + 1
        if product > slots:
            return None
    return None


class AlignedRun:
    """One side of an :class:`Alignment` as a run: a record per aligned tap (see the module docstring)."""

    def __init__(self, run: Any, alignment: Alignment, side: int) -> None:
        self.run = run
        self.path = run.path
        self.headers = run.headers
        self.notes = list(run.notes)
        self.tokens = [pair[side] for pair in alignment.pairs]
        layouts = alignment.layouts[side]
        self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        by_step: dict[int, list[tuple[int, int]]] = {}
        for row, token in enumerate(self.tokens):
            by_step.setdefault(token.step, []).append((row, token.slot))
        for step, items in by_step.items():
            self._rows[step] = (np.array([r for r, _ in items], dtype=np.int64),
                                np.array([s for _, s in items], dtype=np.int64))
        self._sources: dict[str, list[Record]] = {}
        self.records: list[Record] = []
        names: dict[str, list[Record]] = {}
        for record in run.records:
            names.setdefault(record.name, []).append(record)
        for name, records in names.items():
            merged = self._merge(name, records, layouts)
            if merged is None:
                self.records.extend(records)
            else:
                self.records.append(merged)
        self.records.sort(key=lambda r: (r.step, r.order))

    def _merge(self, name: str, records: list[Record], layouts: dict[int, StepLayout]) -> Record | None:
        rest: tuple[int, ...] | None = None
        for record in records:
            layout = layouts.get(record.step)
            k = _token_axis(record.shape, layout.slots) if layout else None
            if k is None:
                return None
            if rest is not None and record.shape[k:] != rest:
                return None
            rest = record.shape[k:]
        assert rest is not None
        first = records[0]
        tags = {**first.tags, "aligned_tokens": len(self.tokens)}
        have = {r.step for r in records}
        lacking = sorted(set(self._rows) - have)
        if lacking:
            tags["incomplete"] = f"steps {lacking} hold tokens but no record of it"
        if len({r.dtype for r in records}) > 1:
            tags["incomplete"] = f"its records have different dtypes across steps ({sorted({r.dtype for r in records})})"
        self._sources[name] = records
        return replace(first, step=0, rank=0, order=min(r.order for r in records if r.step == min(have)),
                       shape=(len(self.tokens), *rest), stats={}, tags=tags,
                       file=first.file if all(r.file for r in records) else None)

    # -------------------------------------------------------------- Run interface
    @property
    def header(self):  # noqa: ANN201 - same type as Run.header
        """The underlying run's header."""
        return self.run.header

    @property
    def world_size(self) -> int:
        """World size of the underlying run."""
        return self.run.world_size

    @property
    def mode(self) -> str:
        """``full`` or ``stats``."""
        return self.run.mode

    def step_tags(self, step: int, rank: int = 0) -> dict[str, Any]:
        """Aligned records: the token ids of the aligned rows; other records: their step's metadata."""
        return {"input_ids": [[t.token_id for t in self.tokens]]} if step == 0 else self.run.step_tags(step, rank)

    def findings(self, record: Record) -> list[Any]:
        """Shard findings of the underlying logical run (none for aligned records)."""
        if record.name in self._sources:
            return []
        findings = getattr(self.run, "findings", None)
        return findings(record) if findings is not None else []

    def raw(self, record: Record) -> np.ndarray:
        """The record's data; for an aligned tap, its rows gathered from every step in token order."""
        sources = self._sources.get(record.name)
        if sources is None or record.step != 0 or record.shape[0] != len(self.tokens):
            return self.run.raw(record)
        rest = record.shape[1:]
        width = math.prod(rest)
        out: np.ndarray | None = None
        for source in sources:
            if source.step not in self._rows:
                continue
            data = self.run.raw(source)
            rows, slots = self._rows[source.step]
            flat = data.reshape(-1, width)
            if out is None:
                out = np.empty((len(self.tokens), width), dtype=flat.dtype)
            out[rows] = flat[slots]
            del data, flat
            self.run.release(source)
        if out is None:
            out = np.empty((0, width))
        return out.reshape(len(self.tokens), *rest)

    def release(self, record: Record) -> None:
        """Release pages of the record's sources."""
        for source in self._sources.get(record.name, [record]):
            self.run.release(source)

    def close(self) -> None:
        """Close the underlying run."""
        self.run.close()
