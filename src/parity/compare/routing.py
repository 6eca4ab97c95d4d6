"""Expert-selection agreement of MoE routers: do both runs send each token to the same experts?

Mixture-of-experts models route each token to the ``k`` experts with the largest router
logits (``num_experts_per_tok`` of the config, recorded as ``experts_per_token`` in the dump
header). Cross-backend runs of MoE models often diverge first here: a router logit that moves
by one rounding can swap an expert, and the layer's output then differs by far more than the
logits did. :func:`routing_agreement` compares the top-k expert *sets* token by token:

- ``agree``: share of tokens whose baseline and target top-k sets are equal;
- ``near_ties``: tokens whose sets differ but whose baseline k-th and (k+1)-th logits are
  within ``tie`` of each other (default: the pair's tolerance at that logit): a selection the
  precision could flip, counted apart, as near-tie token flips are;
- ``swapped``: tokens whose sets differ without a near tie — a routing change that the
  numbers do not explain.

Pairs of canonical ``layers.{i}.router`` taps (:mod:`parity.align.canonical`) get it in the
report (``Outcome.routing``); the verdict of the pair is still the tolerance rule on the logits.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

#: Names of router taps (canonical).
ROUTER = re.compile(r"(?:^|\.)layers\.\d+\.router$")


def is_router(name: str) -> bool:
    """Whether ``name`` is a router tap."""
    return ROUTER.search(name) is not None


def routing_agreement(baseline: np.ndarray, target: np.ndarray, k: int,
                      tie: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any] | None:
    """Top-``k`` expert-set agreement of two router-logit arrays ``[..., experts]`` (float64);
    ``tie(logits)`` is the allowed difference at each baseline logit. None when ``k`` does not
    fit (not fewer experts than k)."""
    experts = baseline.shape[-1]
    if not 0 < k < experts or baseline.shape != target.shape:
        return None
    b = baseline.reshape(-1, experts)
    t = target.reshape(-1, experts)
    order_b = np.argsort(-b, axis=1, kind="stable")
    order_t = np.argsort(-t, axis=1, kind="stable")
    set_b = np.sort(order_b[:, :k], axis=1)
    set_t = np.sort(order_t[:, :k], axis=1)
    same = np.all(set_b == set_t, axis=1)
    rows = np.arange(b.shape[0])
    kth = b[rows, order_b[:, k - 1]]
    next_ = b[rows, order_b[:, k]]
    near = (~same) & (np.abs(kth - next_) <= 2 * tie(kth))
    tokens = int(b.shape[0])
    return {"k": k, "experts": int(experts), "tokens": tokens, "agree": float(same.mean()) if tokens else 1.0,
            "near_ties": int(near.sum()), "swapped": int((~same & ~near).sum())}
