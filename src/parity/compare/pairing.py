"""Matching records of two runs into pairs.

Records pair by ``(name, step, rank)``. Rename rules (``REGEX=TEMPLATE``, ``re.sub`` syntax,
applied in order to every **target** name) let runs whose module names differ line up.
Pairs come out in execution order: by step, then the capture order of the baseline record
(of the target record for target-only names), then rank. Records present on one side only
become pairs with ``None`` on the other side: they are never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from parity.errors import UsageError
from parity.store.format import Record


@dataclass(frozen=True)
class RenameRule:
    """``regex`` → ``template`` on target names."""

    regex: re.Pattern[str]
    template: str

    def apply(self, name: str) -> str:
        """The renamed name."""
        return self.regex.sub(self.template, name)


def parse_rename(text: str) -> RenameRule:
    """Parse ``REGEX=TEMPLATE`` (the last ``=`` separates them)."""
    regex, sep, template = text.rpartition("=")
    if not sep or not regex:
        raise UsageError(f"--rename {text!r}: expected REGEX=TEMPLATE")
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        raise UsageError(f"--rename {text!r}: bad regex: {exc}") from None
    try:
        compiled.sub(template, "")
    except (re.error, IndexError) as exc:
        raise UsageError(f"--rename {text!r}: bad template: {exc}") from None
    return RenameRule(compiled, template)


@dataclass(frozen=True)
class Pair:
    """A baseline and a target record denoting the same logical tensor (either may be None)."""

    name: str
    step: int
    rank: int
    baseline: Record | None
    target: Record | None


def pair_records(baseline: Sequence[Record], target: Sequence[Record],
                 renames: Sequence[RenameRule] = ()) -> list[Pair]:
    """Pair records by (name, step, rank) after renaming target names; see module docstring."""
    def rename(name: str) -> str:
        for rule in renames:
            name = rule.apply(name)
        return name

    by_key: dict[tuple[str, int, int], Record] = {}
    for record in target:
        key = (rename(record.name), record.step, record.rank)
        if key in by_key:
            raise UsageError(f"rename rules map two target records onto {key[0]!r} (step {key[1]})")
        by_key[key] = record
    pairs: list[tuple[tuple[int, int, int, int], Pair]] = []
    for record in baseline:
        key = (record.name, record.step, record.rank)
        other = by_key.pop(key, None)
        pairs.append(((record.step, record.order, 0, record.rank),
                      Pair(record.name, record.step, record.rank, record, other)))
    for (name, step, rank), record in by_key.items():
        pairs.append(((step, record.order, 1, rank), Pair(name, step, rank, None, record)))
    pairs.sort(key=lambda item: item[0])
    return [pair for _, pair in pairs]
