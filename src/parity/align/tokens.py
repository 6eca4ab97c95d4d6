"""Token alignment: compare runs that processed the same tokens in different steps and layouts.

Engines lay tokens out differently: padded ``[batch, seq]`` against packed ``[num_tokens]``,
a prefill in one step against chunked prefill over several, decode batched differently,
padding tokens added by an empty data-parallel rank. With ``--align tokens`` parity does not
pair records step by step; it rebuilds, for each run, which real token every row of every step
holds — from the step metadata the captures store (``input_ids``, ``positions``, ``seq_lens``,
``request_ids``, ``attention_mask``) — and compares each tap over all its steps at once, token
by token.

Reading one step's metadata (:func:`step_tokens`):

- ``attention_mask`` (rows like ``input_ids``; of a decode step, its last ``S`` columns) marks
  the real slots of each row, whatever the padding side.
- else ``input_ids`` ``[T]`` or ``[1, T]``: packed; ``seq_lens`` (default ``[T]``) are
  consecutive sequences and slots past ``sum(seq_lens)`` are padding;
- else ``input_ids`` ``[B, S]`` with B > 1: the first ``seq_lens[b]`` slots of row b are real
  (right padding), or all of them without ``seq_lens``.
- ``positions`` (same layout) give each token's position in its sequence; default: its index
  within the sequence.
- Multi-rank runs with several data-parallel groups: each group's metadata is read on its own
  and its slots follow the previous groups' (the order in which the groups' tensors are joined).

Requests: a sequence with a ``request_ids`` entry belongs to that request (an id seen again
for positions it already holds starts a new request). Without ids, a sequence whose first
position is 0 starts a new request and one that starts at position p > 0 continues the oldest
request that ends at p - 1 and was not continued in the same step (chunked prefill, decode).

Matching (:func:`align_runs`): requests pair by request id when both runs have ids, otherwise
by token-id prefix (the unmatched request of the other run sharing the longest prefix of token
ids, at least one). Within a request pair, tokens pair by position up to the first position
whose token ids differ; later positions have different contexts and are not compared. Nothing
is truncated silently: tokens of one side only and positions from the first differing id on
are listed in the :class:`Alignment` summary and fail the comparison as a ``tokens`` outcome;
so does an alignment in which no token paired at all (that one cannot be allowed away).
Statistics-only dumps cannot be aligned (statistics of a tensor do not split by token).

A tap takes part when, in every step that holds one of its records, its leading dimensions
— as many as ``input_ids`` has, else the longest prefix that fits — multiply to the step's
number of slots (``[1, T, H]``, ``[T, H]``, ``[B, S, H]``): those dimensions become the token
axis. Other taps are compared step by step as usual.
:class:`AlignedRun` presents the result as a run with one record per aligned tap (step 0,
shape ``[tokens, *rest]``), gathered one tap at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from parity.align.view import RunView
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
    dims: int = 1
    notes: list[str] = field(default_factory=list)
    batch: int = 1

    @property
    def padding(self) -> int:
        """Slots that hold no real token."""
        return self.slots - sum(len(s) for s in self.sequences)


def flatten_rows(value: Any) -> list[Any] | None:
    """A metadata list (``[T]`` or rows ``[[...], ...]``) as one flat list; None when not a list."""
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
    flat_ids = flatten_rows(ids)
    if not flat_ids:
        return None
    positions = flatten_rows(tags.get("positions"))
    if positions is not None and (len(positions) != len(flat_ids) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in positions)):
        positions = None  # unusable metadata (from an untrusted manifest): positions by index
    seq_lens = tags.get("seq_lens")
    seq_lens = [int(x) for x in seq_lens] if isinstance(seq_lens, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 2**40 for x in seq_lens) else None
    real: list[list[int]] = []
    notes: list[str] = []
    rows = ids if isinstance(ids, list) and ids and all(isinstance(r, list) for r in ids) else None
    mask = tags.get("attention_mask")
    if rows is not None and isinstance(mask, list) and len(mask) == len(rows) and all(
            isinstance(m, list) and len(m) >= len(r) for m, r in zip(mask, rows)):
        offset = 0
        for row, m in zip(rows, mask):
            real.append([offset + s for s, keep in enumerate(m[len(m) - len(row):]) if keep])
            offset += len(row)
    elif rows is not None and len(rows) > 1:
        offset = 0
        for b, row in enumerate(rows):
            count = min(seq_lens[b], len(row)) if seq_lens is not None and len(seq_lens) == len(rows) else len(row)
            real.append([offset + s for s in range(max(count, 0))])
            offset += len(row)
    else:
        lengths = seq_lens if seq_lens is not None else [len(flat_ids)]
        if sum(lengths) > len(flat_ids):
            notes.append(f"step {step}: seq_lens {lengths} add up to more than its {len(flat_ids)} tokens")
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
    if isinstance(request_ids, list) and len(request_ids) == len(sequences):
        request_ids = [r if isinstance(r, (str, int)) else str(r) for r in request_ids]
    else:
        request_ids = None
    return StepLayout(slots=len(flat_ids), sequences=sequences, request_ids=request_ids,
                      dims=2 if rows is not None else 1, notes=notes, batch=len(rows) if rows is not None else 1)


def _join(step: int, layouts: list[StepLayout]) -> StepLayout:
    """The layouts of several data-parallel groups as one step: slots follow each other."""
    if len(layouts) == 1:
        return layouts[0]
    offset = 0
    sequences: list[list[Token]] = []
    for layout in layouts:
        if layout.batch > 1:
            raise DumpError(f"step {step}: data-parallel groups holding padded [batch, seq] batches cannot be "
                            "aligned token by token (their tensors are joined along the sequence axis)")
        sequences.extend([Token(t.step, t.slot + offset, t.position, t.token_id) for t in seq]
                         for seq in layout.sequences)
        offset += layout.slots
    ids = [layout.request_ids for layout in layouts]
    return StepLayout(slots=offset, sequences=sequences,
                      request_ids=[i for part in ids for i in part] if all(p is not None for p in ids) else None,
                      dims=layouts[0].dims,
                      notes=[n for layout in layouts for n in layout.notes])


def _step_layout(run: Any, step: int) -> StepLayout | None:
    layouts = [step_tokens(step, tags) for tags in run.group_step_tags(step)]
    if not layouts or any(layout is None for layout in layouts):
        return None
    return _join(step, layouts)  # type: ignore[arg-type]


def requests_of(run: Any) -> tuple[list[Request], dict[int, StepLayout], int, list[str]]:
    """The requests of a run (one rank's view), the layout per step, the padding slots dropped
    and notes about the metadata."""
    steps = sorted({r.step for r in run.records})
    requests: list[Request] = []
    by_id: dict[Any, Request] = {}
    layouts: dict[int, StepLayout] = {}
    padding = 0
    notes: list[str] = []
    for step in steps:
        layout = _step_layout(run, step)
        if layout is None:
            continue
        layouts[step] = layout
        padding += layout.padding
        notes.extend(layout.notes)
        continued: set[int] = set()
        for k, seq in enumerate(layout.sequences):
            if not seq:
                continue
            rid = layout.request_ids[k] if layout.request_ids is not None else None
            request = None
            if rid is not None:
                request = by_id.get(rid)
                if request is not None and any(t.position in request.tokens for t in seq):
                    request = None  # the id is reused for a new request
            elif seq[0].position > 0:
                request = next((r for r in requests if r.request_id is None and id(r) not in continued
                                and r.end == seq[0].position), None)
            if request is None:
                request = Request(key=f"request {len(requests)}" if rid is None else f"request {rid!r}",
                                  request_id=rid)
                if rid is not None and rid in by_id:
                    request.key += f" (#{sum(1 for r in requests if r.request_id == rid) + 1})"
                requests.append(request)
                if rid is not None:
                    by_id[rid] = request
            continued.add(id(request))
            for token in seq:
                request.tokens[token.position] = token
    return requests, layouts, padding, notes


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
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the report."""
        parts = [f"token alignment: {len(self.pairs)} tokens of {self.requests[0]} request(s) compared "
                 f"across steps; padding dropped: {self.padding[0]} baseline, {self.padding[1]} target slot(s)"]
        for label, items in (("baseline only", self.baseline_only), ("target only", self.target_only),
                             ("token ids differ", self.differing)):
            if items:
                parts.append(f"{label}: {'; '.join(items[:4])}{' …' if len(items) > 4 else ''}")
        return "; ".join(parts + self.notes)


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


def _prefix(a: Request, b: Request) -> int:
    """How many leading positions (of those both hold) carry the same token ids."""
    count = 0
    for position in sorted(set(a.tokens) & set(b.tokens)):
        if a.tokens[position].token_id != b.tokens[position].token_id:
            break
        count += 1
    return count


def align_runs(baseline: Any, target: Any, decode: Callable[[int], str] | None = None) -> Alignment:
    """Pair the real tokens of two runs (see the module docstring). Raises DumpError without
    metadata. ``decode(token_id)`` (default None) adds the text of the first differing tokens."""
    for run in (baseline, target):
        if run.mode == "stats":
            raise DumpError(f"{run.path} is a statistics-only dump: --align tokens needs tensors "
                            "(statistics do not split by token)")
    base_req, base_layouts, base_pad, base_notes = requests_of(baseline)
    target_req, target_layouts, target_pad, target_notes = requests_of(target)
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
            scored = [(_prefix(request, t), -i, t) for i, t in enumerate(unmatched)]
            best = max(scored, key=lambda item: item[:2], default=None)
            other = best[2] if best is not None and best[0] > 0 else None
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
        common = sorted(set(b.tokens) & set(t.tokens))
        split = next((i for i, p in enumerate(common) if b.tokens[p].token_id != t.tokens[p].token_id), len(common))
        pairs.extend((b.tokens[p], t.tokens[p]) for p in common[:split])
        if split < len(common):
            at = common[split]
            differing.append(f"{b.key} positions {_ranges(common[split:])} (token ids differ from "
                             f"position {at} on: baseline {token_label(b.tokens[at].token_id, decode)}, "
                             f"target {token_label(t.tokens[at].token_id, decode)})")
    return Alignment(pairs, baseline_only, target_only, differing, (base_pad, target_pad),
                     (base_layouts, target_layouts), (len(base_req), len(target_req)),
                     [f"baseline {n}" for n in base_notes] + [f"target {n}" for n in target_notes])


def token_label(token_id: int, decode: Callable[[int], str] | None) -> str:
    """A token id, with its text when ``decode`` can give it."""
    if decode is None:
        return str(token_id)
    try:
        return f"{token_id} {decode(token_id)!r}"
    except Exception:  # a tokenizer that cannot decode an id must not stop the alignment
        return str(token_id)


def _token_axis(shape: tuple[int, ...], slots: int, dims: int) -> int | None:
    """How many leading dims are the token axis: ``dims`` (those of ``input_ids``) when they
    multiply to ``slots``, else the longest prefix that does; None when none does."""
    if len(shape) >= dims and math.prod(shape[:dims]) == slots:
        return dims
    found = None
    for k in range(1, len(shape) + 1):
        if math.prod(shape[:k]) == slots:
            found = k
    return found


class AlignedRun(RunView):
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
        self._found: dict[str, list[Any]] = {}
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
            k = _token_axis(record.shape, layout.slots, layout.dims) if layout else None
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
        if not self.tokens:
            tags["incomplete"] = "no token of the two runs paired (see the tokens outcome)"
        elif lacking:
            tags["incomplete"] = f"steps {lacking} hold tokens but no record of it"
        if len({r.dtype for r in records}) > 1:
            tags["incomplete"] = f"its records have different dtypes across steps ({sorted({r.dtype for r in records})})"
        self._sources[name] = records
        return replace(first, step=0, rank=0, order=min(r.order for r in records if r.step == min(have)),
                       shape=(len(self.tokens), *rest), stats={}, tags=tags,
                       file=first.file if all(r.file for r in records) else None)

    # -------------------------------------------------------------- Run interface (see RunView)

    def step_tags(self, step: int, rank: int = 0) -> dict[str, Any]:
        """Aligned records: the token ids of the aligned rows; other records: their step's metadata."""
        return {"input_ids": [[t.token_id for t in self.tokens]]} if step == 0 else self.run.step_tags(step, rank)

    def findings(self, record: Record) -> list[Any]:
        """Shard findings of the underlying logical run (multi-rank runs): for an aligned tap,
        those of every step gathered by the last :meth:`raw`, each message naming its step."""
        if record.name in self._sources:
            return list(self._found.get(record.name, []))
        return self.run.findings(record)

    def raw(self, record: Record) -> np.ndarray:
        """The record's data; for an aligned tap, its rows gathered from every step in token order."""
        sources = self._sources.get(record.name)
        if sources is None:
            return self.run.raw(record)
        rest = record.shape[1:]
        width = math.prod(rest)
        out: np.ndarray | None = None
        found: list[Any] = []
        for source in sources:
            if source.step not in self._rows:
                continue
            data = self.run.raw(source)
            found.extend(replace(f, message=f"step {source.step}: {f.message}") for f in self.run.findings(source))
            rows, slots = self._rows[source.step]
            flat = data.reshape(-1, width)
            if out is None:
                out = np.empty((len(self.tokens), width), dtype=flat.dtype)
            out[rows] = flat[slots]
            del data, flat
            self.run.release(source)
        self._found[record.name] = found
        if out is None:
            out = np.empty((0, width))
        return out.reshape(len(self.tokens), *rest)

    def release(self, record: Record) -> None:
        """Release pages of the record's sources."""
        for source in self._sources.get(record.name, [record]):
            self.run.release(source)

