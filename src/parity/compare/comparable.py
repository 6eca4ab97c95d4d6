"""Are two runs comparable at all? Same model, same inputs — checked before any pair is judged.

A comparison of two different prompts reports an embedding "fail", and one of two different
models reports every tap as a shape mismatch: both are true and useless. The dumps record what
decides it, so it is checked first:

- **model**: the ``config_sha256`` of the model folder (recorded by ``parity diff`` and the
  engines' captures; a dump without it is not checked);
- **inputs**: the ``input_ids`` of every step present on both sides (rows flattened; steps or
  dumps without them are not checked). Not checked with ``align="tokens"``, whose job is to
  pair different layouts of the same tokens.

A difference is a :class:`~parity.errors.UsageError` (exit 2) naming the first difference, or,
with ``allow=True`` (``--allow-incomparable``), a note in the report.
"""

from __future__ import annotations

from typing import Any

from parity.align.tokens import token_label
from parity.errors import UsageError

HINT = ("if they are one sequence in other layouts (padding, packing, chunks), --align tokens pairs its tokens; "
        "--allow-incomparable compares them anyway")


def _flat(ids: Any) -> list[int] | None:
    if not isinstance(ids, list):
        return None
    out: list[int] = []
    for row in ids:
        for item in (row if isinstance(row, list) else [row]):
            if not isinstance(item, int) or isinstance(item, bool):
                return None
            out.append(item)
    return out


def _model_difference(base: Any, target: Any) -> str | None:
    a, b = (run.header.model or {} for run in (base, target))
    ha, hb = a.get("config_sha256"), b.get("config_sha256")
    if not ha or not hb or ha == hb:
        return None
    return (f"the runs are of different models: config {ha} ({a.get('path', '?')}) vs {hb} "
            f"({b.get('path', '?')})")


def _input_difference(base: Any, target: Any, decode: Any = None) -> str | None:
    """The first step whose token ids differ, as one sentence (from :func:`input_differences`)."""
    found = input_differences(base, target, decode, steps=1)
    if not found:
        return None
    item = found[0]
    if item["count"]:
        what = (f"first differing token at position {item['positions'][0]}: baseline "
                f"{token_label(item['baseline_ids'][0], decode)}, target {token_label(item['target_ids'][0], decode)}")
    else:
        lengths = item["lengths"]
        what = f"{lengths[0]} vs {lengths[1]} tokens, equal up to position {min(lengths)}"
    return f"the runs had different inputs at step {item['step']} ({what})"


#: Differing positions listed per step by :func:`input_differences` (the count is always given).
MAX_LISTED = 32


def input_differences(base: Any, target: Any, decode: Any = None, *, steps: int | None = None) -> list[dict[str, Any]]:
    """Per step whose ``input_ids`` differ between the runs (the first ``steps`` such steps;
    default all): ``step``, ``lengths`` (baseline, target), ``count`` of differing positions (over
    the common length), ``positions`` (the first :data:`MAX_LISTED`), and the ids there
    (``baseline_ids``, ``target_ids``) with, when ``decode(token_id)`` is given, their text
    (``baseline_tokens``, ``target_tokens``)."""
    found = []
    for step in sorted({r.step for r in base.records} & {r.step for r in target.records}):
        a, b = _flat(base.step_tags(step).get("input_ids")), _flat(target.step_tags(step).get("input_ids"))
        if a is None or b is None or a == b:
            continue
        differing = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        listed = differing[:MAX_LISTED]
        item: dict[str, Any] = {"step": step, "lengths": [len(a), len(b)], "count": len(differing),
                                "positions": listed, "baseline_ids": [a[i] for i in listed],
                                "target_ids": [b[i] for i in listed]}
        if decode is not None:
            try:
                item["baseline_tokens"] = [decode(a[i]) for i in listed]
                item["target_tokens"] = [decode(b[i]) for i in listed]
            except Exception:  # a tokenizer that cannot decode an id must not stop the report
                pass
        found.append(item)
        if steps is not None and len(found) >= steps:
            break
    return found


def check_comparable(base: Any, target: Any, *, align: str = "steps", allow: bool = False,
                     decode: Any = None) -> list[str]:
    """Raise UsageError when the runs are of different models or inputs (see the module docstring);
    with ``allow`` return the findings as notes instead. ``decode(token_id)`` labels tokens."""
    findings = [f for f in (_model_difference(base, target),
                            None if align == "tokens" else _input_difference(base, target, decode)) if f]
    if findings and not allow:
        raise UsageError(findings[0], hint=HINT)
    return [f"{f} (compared anyway: --allow-incomparable)" for f in findings]
