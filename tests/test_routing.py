"""Expert-selection agreement of MoE routers (compare/routing.py), on hand-made router logits."""

from __future__ import annotations

import numpy as np

from parity.compare.routing import is_router, routing_agreement


def _tie(x: np.ndarray) -> np.ndarray:
    return np.maximum(1e-3, 1e-3 * np.abs(x))


def test_same_sets_agree_whatever_the_order_within_the_top_k():
    b = np.array([[3.0, 2.0, 0.0, -1.0], [0.0, 1.0, 5.0, 4.0]])
    t = np.array([[2.0, 3.0, 0.5, -1.0], [0.0, 1.0, 4.0, 5.0]])  # the order inside the top-2 changed
    assert routing_agreement(b, t, 2, _tie) == {"k": 2, "experts": 4, "tokens": 2, "agree": 1.0, "near_ties": 0,
                                                "swapped": 0}


def test_a_swap_at_a_near_tie_is_counted_apart_from_a_real_swap():
    b = np.array([[3.0, 2.0, 1.9995, -1.0],   # 2nd and 3rd expert within the tolerance: a near tie
                  [3.0, 2.0, 0.0, -1.0]])     # a clear margin
    t = np.array([[3.0, 1.9995, 2.0, -1.0],   # the tie flipped: expert 2 instead of 1
                  [3.0, 0.0, 2.0, -1.0]])     # expert 2 instead of 1 with no tie: the routing changed
    result = routing_agreement(b[None], t[None], 2, _tie)
    assert result["agree"] == 0.0 and result["near_ties"] == 1 and result["swapped"] == 1


def test_k_that_does_not_fit_and_router_names():
    assert routing_agreement(np.zeros((3, 2)), np.zeros((3, 2)), 2, _tie) is None
    assert is_router("layers.12.router") and not is_router("layers.12.mlp") and not is_router("routers")
