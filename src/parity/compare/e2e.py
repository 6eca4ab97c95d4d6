"""End-to-end comparison: generated tokens and next-token distributions.

Inputs: the two sides' greedy generations (:class:`parity.backends.generation.Generation`,
top-k logprobs at every generated position) and the two dumps of the teacher-forced pass (both
sides ran the **baseline's** sequence: prompt + the baseline's continuation), whose logits taps
(``logits`` or ``lm_head``) give full next-token distributions at every position.

Per prompt:

- ``token_match_rate``: generated tokens equal position by position (a length difference counts
  as mismatches); ``first_divergent_position`` and the decoded text of both sides around it;
- at the divergence, a logprob-aware verdict: is each side's token in the other side's top-k, and
  is it a **near-tie** — the baseline's logprob gap between its own token and the target's token
  at most ``tie_tolerance`` (default :data:`TIE_TOLERANCE` = 0.1 nats)? ``benign flip`` when both
  tokens are in both top-k lists and the gap is within the tolerance, ``real divergence``
  otherwise;

The counts say what was really compared: ``tokens_compared`` (positions over all prompts, the
longer side's length per prompt), ``ended_at_eos`` (prompts whose generation stopped at an
end-of-sequence token before ``new_tokens``, per side) and ``chat`` (the prompts went through the
tokenizer's chat template).

On every teacher-forced position (all prompts, not stopping at a divergence): the mean and max
KL(baseline ‖ target) of the next-token distributions, the max |Δlogprob| over the baseline's
top-k tokens, and the top-1 agreement rate.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


TIE_TOLERANCE = 0.1
LOGITS_NAMES = ("logits", "lm_head")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _logits(run: Any, step: int) -> np.ndarray | None:
    for record in run.records:
        if record.step == step and record.name in LOGITS_NAMES and record.file is not None:
            arr = run.array(record)
            run.release(record)
            return arr.reshape(-1, arr.shape[-1])
    return None


def distribution_metrics(base: Any, target: Any, *, top_k: int = 5, shards: Sequence[str] = ()) -> dict[str, Any] | None:
    """KL, max |Δlogprob| over the baseline's top-k, top-1 agreement over all teacher-forced positions.

    ``base`` / ``target``: loaded runs; a multi-rank one (vLLM tp=N holds vocabulary slices of the
    logits) is read through its logical view, ``shards`` (``PATTERN=SPEC``, default none)
    overriding its annotations as in the comparison."""
    from parity.align.shards import logical_view, shard_rules

    overrides = shard_rules(list(shards))
    base, target = logical_view(base, overrides), logical_view(target, overrides)
    kls: list[np.ndarray] = []
    deltas: list[float] = []
    agree: list[np.ndarray] = []
    for step in sorted({r.step for r in base.records}):
        lb, lt = _logits(base, step), _logits(target, step)
        if lb is None or lt is None or lb.shape != lt.shape:
            continue
        pb, pt = _log_softmax(lb), _log_softmax(lt)
        prob = np.exp(pb)
        with np.errstate(invalid="ignore"):  # masked -inf logits: p = 0 terms count as 0
            kls.append(np.where(prob > 0, prob * (pb - pt), 0.0).sum(axis=-1))
        top = np.argsort(-pb, axis=-1)[:, :top_k]
        deltas.append(float(np.abs(np.take_along_axis(pb, top, -1) - np.take_along_axis(pt, top, -1)).max()))
        agree.append(pb.argmax(-1) == pt.argmax(-1))
    if not kls:
        return None
    kl = np.concatenate(kls)
    return {"positions": int(kl.size), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "max_abs_delta_logprob_topk": max(deltas), "top_k": top_k,
            "top1_agreement": float(np.concatenate(agree).mean())}


def compare_generations(base: Sequence[Any], target: Sequence[Any], *, decode: Callable[[list[int]], str],
                        tie_tolerance: float = TIE_TOLERANCE, context: int = 6) -> dict[str, Any]:
    """Token-level comparison of two lists of generations (same prompts, same order)."""
    prompts = []
    matches = total = 0
    verdicts = {"identical": 0, "benign flip": 0, "real divergence": 0}
    for b, t in zip(base, target):
        length = max(len(b.tokens), len(t.tokens))
        same = [i < len(b.tokens) and i < len(t.tokens) and b.tokens[i] == t.tokens[i] for i in range(length)]
        matches += sum(same)
        total += length
        first = next((i for i, s in enumerate(same) if not s), None)
        entry: dict[str, Any] = {
            "prompt": b.prompt, "token_match_rate": sum(same) / length if length else 1.0,
            "first_divergent_position": first,
            "baseline_tokens": [decode([i]) for i in b.tokens], "target_tokens": [decode([i]) for i in t.tokens],
            "baseline_text": decode(b.tokens), "target_text": decode(t.tokens)}
        if first is None:
            entry["verdict"] = "identical"
        else:
            bt = b.tokens[first] if first < len(b.tokens) else None
            tt = t.tokens[first] if first < len(t.tokens) else None
            b_top = b.topk[first] if first < len(b.topk) else {}
            t_top = t.topk[first] if first < len(t.topk) else {}
            target_in_base = tt in b_top
            base_in_target = bt in t_top
            gap = (b_top[bt] - b_top[tt]) if (bt in b_top and tt in b_top) else None
            benign = target_in_base and base_in_target and gap is not None and gap <= tie_tolerance
            entry.update({
                "verdict": "benign flip" if benign else "real divergence",
                "context": decode(b.tokens[max(0, first - context):first]),
                "baseline_token": decode([bt]) if bt is not None else None,
                "target_token": decode([tt]) if tt is not None else None,
                "target_token_in_baseline_topk": target_in_base, "baseline_token_in_target_topk": base_in_target,
                "baseline_logprob_gap": gap, "tie_tolerance": tie_tolerance})
        verdicts[entry["verdict"]] += 1
        prompts.append(entry)
    return {"prompts": prompts, "token_match_rate": matches / total if total else 1.0, "verdicts": verdicts,
            "new_tokens": max((len(b.tokens) for b in base), default=0), "tokens_compared": total,
            "ended_at_eos": {"baseline": sum(bool(getattr(g, "ended_at_eos", False)) for g in base),
                             "target": sum(bool(getattr(g, "ended_at_eos", False)) for g in target)},
            "chat": any(getattr(g, "chat", False) for g in base)}


def end_to_end(base_dir: Any, target_dir: Any, base_generations: Sequence[Any], target_generations: Sequence[Any],
               *, decode: Callable[[list[int]], str], shards: Sequence[str] = ()) -> dict[str, Any]:
    """The report's ``end_to_end`` section: the generations compared, plus the next-token
    distributions over every teacher-forced position of the two dumps (``shards`` as in
    :func:`distribution_metrics`)."""
    from parity.store.reader import load_run

    result = compare_generations(base_generations, target_generations, decode=decode)
    result["distributions"] = distribution_metrics(load_run(base_dir), load_run(target_dir), shards=shards)
    return result
