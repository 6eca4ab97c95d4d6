"""The numbers in a comparison report must be right, whatever the chunking and storage dtype.

``pair_metrics`` computes every per-pair metric in one chunked pass. These tests hold it to a
naive whole-array float64 reference written here with numpy: max |t-b| and where it is,
mean |t-b|, max relative error, relative L2, cosine, SQNR, the mismatch count under the rule
``|t-b| <= max(atol, rtol*|b|)`` and the tolerances that would make a pair pass
(``needed_atol`` / ``needed_rtol``, which a user copies into ``--atol`` / ``--rtol``: re-running
with them must pass, with 1% less must not). Data are float32 and bfloat16 (given as raw
uint16 bits, as the store returns them), sizes that are and are not multiples of a small
chunk, and the edge cases a user meets: identical tensors, NaN/Inf, all-zero and constant
tensors, zeros in the baseline.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from parity.compare.metrics import CHUNK_ELEMENTS, pair_metrics

RTOL, ATOL = 1e-3, 1e-4
TIGHT = dict(rtol=1e-9, atol=0.0)


# --------------------------------------------------------------------------- helpers


def storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """What the store hands to pair_metrics: float32 values, or bfloat16 as uint16 bits."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).numpy()


def values(x: torch.Tensor, dtype: str) -> np.ndarray:
    """The float64 values the storage represents."""
    return x.to(getattr(torch, dtype)).double().numpy()


def reference(b: np.ndarray, t: np.ndarray, *, rtol: float, atol: float) -> dict:
    """Naive whole-array float64 definitions (finite elements on both sides only)."""
    both = np.isfinite(b) & np.isfinite(t)
    same_nonfinite = ~both & ((b == t) | (np.isnan(b) & np.isnan(t)))
    nonfinite_mismatch = int(np.count_nonzero(~both & ~same_nonfinite))
    bf, tf = b[both], t[both]
    d = tf - bf
    ad, ab = np.abs(d), np.abs(bf)
    out: dict = {"numel": b.size, "nonfinite_mismatch": nonfinite_mismatch,
                 "nan_baseline": int(np.isnan(b).sum()), "nan_target": int(np.isnan(t).sum()),
                 "inf_baseline": int(np.isinf(b).sum()), "inf_target": int(np.isinf(t).sum())}
    if ad.size:
        flat_pos = np.flatnonzero(both)[int(np.argmax(ad))]
        out["max_abs"] = float(ad.max())
        out["max_abs_index"] = [int(i) for i in np.unravel_index(flat_pos, b.shape)]
        out["baseline_at_max"] = float(b.reshape(-1)[flat_pos])
        out["target_at_max"] = float(t.reshape(-1)[flat_pos])
        out["mean_abs"] = float(ad.mean())
    zero_b = ab == 0
    out["max_rel"] = math.inf if (ad[zero_b] > 0).any() else float((ad[~zero_b] / ab[~zero_b]).max(initial=0.0))
    nb, nt, nd = (float(np.sqrt(np.dot(v, v))) for v in (bf, tf, d))
    out["rel_l2"] = nd / nb if nb else (0.0 if nd == 0 else math.inf)
    out["cosine"] = float(np.dot(tf, bf)) / (nb * nt) if nb and nt else (1.0 if nb == nt == 0 else 0.0)
    out["sqnr_db"] = (math.inf if nd == 0 else -math.inf if nb == 0
                      else 10 * math.log10(float(np.dot(bf, bf)) / float(np.dot(d, d))))
    out["mismatched"] = int(np.count_nonzero(ad > np.maximum(atol, rtol * ab))) + nonfinite_mismatch
    out["mismatch_fraction"] = out["mismatched"] / b.size
    out["needed_atol"] = float(ad[ad > rtol * ab].max(initial=0.0))
    over = ad > atol
    out["needed_rtol"] = (math.inf if (over & zero_b).any()
                          else float((ad[over] / ab[over]).max(initial=0.0)))
    return out


def assert_matches(metrics, expected: dict) -> None:
    got = metrics.to_json()
    for key, want in expected.items():
        have = getattr(metrics, key)
        if isinstance(want, float):
            if math.isinf(want):
                assert have == want, (key, have, want)
            else:
                np.testing.assert_allclose(have, want, rtol=1e-9, atol=1e-300, err_msg=key)
        else:
            assert have == want, (key, have, want)
    assert set(got) >= set(expected)


def random_pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A baseline of mixed magnitudes (some near zero) and a target with relative + absolute noise."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    b = b * torch.exp(2 * torch.randn(shape, generator=g, dtype=torch.float64))
    t = b * (1 + 3e-3 * torch.randn(shape, generator=g, dtype=torch.float64))
    t = t + 3e-4 * torch.randn(shape, generator=g, dtype=torch.float64)
    return b.float(), t.float()


SHAPES = [(7,), (2000,), (3, 1001), (2, 3, 517)]
DTYPES = [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")]


# --------------------------------------------------------------------------- random data


@pytest.mark.parametrize("chunk", [1000, 333, CHUNK_ELEMENTS])
@pytest.mark.parametrize("b_dtype,t_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_pairs_match_the_float64_reference(shape, b_dtype, t_dtype, chunk):
    b, t = random_pair(shape, seed=sum(shape))
    m = pair_metrics(storage(b, b_dtype), b_dtype, storage(t, t_dtype), t_dtype, rtol=RTOL, atol=ATOL, chunk=chunk)
    expected = reference(values(b, b_dtype), values(t, t_dtype), rtol=RTOL, atol=ATOL)
    assert_matches(m, expected)
    assert m.nonfinite_mismatch == 0 and not m.all_zero_baseline and not m.constant_target
    assert 0 < m.max_abs and 0 < m.cosine <= 1


@pytest.mark.parametrize("chunk", [1000, CHUNK_ELEMENTS])
def test_max_abs_index_found_in_a_late_chunk(chunk):
    b = np.zeros((3, 1001), np.float32)
    t = b.copy()
    t[2, 999] = 5.0  # flat index 3001: the fourth chunk of 1000
    t[0, 3] = 4.0
    m = pair_metrics(b, "float32", t, "float32", rtol=RTOL, atol=ATOL, chunk=chunk)
    assert m.max_abs == 5.0 and m.max_abs_index == [2, 999]
    assert (m.baseline_at_max, m.target_at_max) == (0.0, 5.0)
    assert m.mismatched == 2 and m.mismatch_fraction == 2 / 3003


@pytest.mark.parametrize("b_dtype,t_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_needed_tolerances_are_the_smallest_that_pass(shape, b_dtype, t_dtype):
    b, t = random_pair(shape, seed=100 + sum(shape))
    bs, ts = storage(b, b_dtype), storage(t, t_dtype)

    def mismatched(rtol: float, atol: float) -> int:
        return pair_metrics(bs, b_dtype, ts, t_dtype, rtol=rtol, atol=atol, chunk=1000).mismatched

    m = pair_metrics(bs, b_dtype, ts, t_dtype, rtol=RTOL, atol=ATOL, chunk=1000)
    assert m.mismatched > 0 and 0 < m.needed_atol and 0 < m.needed_rtol < math.inf
    assert mismatched(RTOL, m.needed_atol) == 0
    assert mismatched(RTOL, m.needed_atol * 0.99) > 0
    assert mismatched(m.needed_rtol, ATOL) == 0
    assert mismatched(m.needed_rtol * 0.99, ATOL) > 0


def test_needed_rtol_passes_even_when_the_ratio_rounds_down():
    # (a / b) * b < a in float64 for these values: the rtol reported as sufficient must still pass.
    b = np.array([-2.3250308, 1.0], np.float32)
    t = np.array([-2.3101995, 1.0], np.float32)  # ad / ab rounds so that ratio * ab < ad
    ab = np.abs(b.astype(np.float64))
    ad = np.abs(t.astype(np.float64) - b.astype(np.float64))
    ratio = ad[0] / ab[0]
    if ratio * ab[0] >= ad[0]:
        pytest.skip("these values do not round down on this platform")
    m = pair_metrics(b, "float32", t, "float32", rtol=0.0, atol=0.0)
    assert m.needed_rtol == pytest.approx(ratio)
    assert pair_metrics(b, "float32", t, "float32", rtol=m.needed_rtol, atol=0.0).mismatched == 0


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_identical_arrays(dtype):
    b, _ = random_pair((3, 1001), seed=1)
    s = storage(b, dtype)
    m = pair_metrics(s, dtype, s.copy(), dtype, rtol=0.0, atol=0.0, chunk=1000)
    assert (m.max_abs, m.mean_abs, m.max_rel, m.rel_l2) == (0.0, 0.0, 0.0, 0.0)
    assert m.sqnr_db == math.inf and m.cosine == 1.0
    assert (m.mismatched, m.needed_atol, m.needed_rtol, m.nonfinite_mismatch) == (0, 0.0, 0.0, 0)
    assert m.to_json()["sqnr_db"] == "inf"


def test_identical_all_zero_arrays():
    z = np.zeros(1500, np.float32)
    m = pair_metrics(z, "float32", z.copy(), "float32", rtol=RTOL, atol=ATOL, chunk=1000)
    assert (m.rel_l2, m.cosine, m.sqnr_db, m.mismatched, m.max_rel) == (0.0, 1.0, math.inf, 0, 0.0)
    assert m.all_zero_baseline and m.all_zero_target and m.constant_baseline and m.constant_target


def test_nan_in_target_where_baseline_is_finite_counts_as_nonfinite_mismatch():
    b, t = random_pair((2, 3, 517), seed=2)
    bn, tn = b.numpy().copy(), t.numpy().copy()
    tn.reshape(-1)[[0, 999, 1000, 3101]] = np.nan  # both sides of a chunk boundary and the end
    tn.reshape(-1)[5] = np.inf
    m = pair_metrics(bn, "float32", tn, "float32", rtol=RTOL, atol=ATOL, chunk=1000)
    expected = reference(bn.astype(np.float64), tn.astype(np.float64), rtol=RTOL, atol=ATOL)
    assert_matches(m, expected)
    assert m.nonfinite_mismatch == 5 and m.nan_target == 4 and m.inf_target == 1
    assert m.nan_baseline == 0 and m.inf_baseline == 0
    assert m.to_json()["nonfinite_mismatch"] == 5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_nonfinite_positions_on_both_sides_are_not_a_mismatch(dtype):
    b, t = random_pair((3, 1001), seed=3)
    for x in (b, t):
        flat = x.view(-1)
        flat[[10, 1000, 2500]] = math.nan
        flat[11] = math.inf
        flat[2999] = -math.inf
    bs, ts = storage(b, dtype), storage(t, dtype)
    m = pair_metrics(bs, dtype, ts, dtype, rtol=RTOL, atol=ATOL, chunk=1000)
    assert_matches(m, reference(values(b, dtype), values(t, dtype), rtol=RTOL, atol=ATOL))
    assert m.nonfinite_mismatch == 0 and (m.nan_baseline, m.nan_target) == (3, 3)
    assert (m.inf_baseline, m.inf_target) == (2, 2)


def test_opposite_infinities_are_a_mismatch():
    b = np.array([1.0, np.inf, -np.inf, np.nan], np.float32)
    t = np.array([1.0, -np.inf, -np.inf, 2.0], np.float32)
    m = pair_metrics(b, "float32", t, "float32", rtol=RTOL, atol=ATOL)
    assert m.nonfinite_mismatch == 2 and m.mismatched == 2
    assert m.max_abs == 0.0 and m.max_abs_index == [0]


def test_all_zero_target_against_non_zero_baseline():
    b, _ = random_pair((2000,), seed=4)
    bs = b.numpy()
    ts = np.zeros_like(bs)
    m = pair_metrics(bs, "float32", ts, "float32", rtol=RTOL, atol=ATOL, chunk=1000)
    assert_matches(m, reference(bs.astype(np.float64), ts.astype(np.float64), rtol=RTOL, atol=ATOL))
    assert m.all_zero_target and not m.all_zero_baseline
    assert m.constant_target and not m.constant_baseline
    assert m.cosine == 0.0 and m.rel_l2 == pytest.approx(1.0) and m.sqnr_db == pytest.approx(0.0, abs=1e-12)


def test_constant_flags():
    n = 2500
    const = np.full(n, 0.5, np.float32)
    varying = const.copy()
    varying[2400] = 0.25  # differs only in the last chunk
    m = pair_metrics(const, "float32", varying, "float32", rtol=RTOL, atol=ATOL, chunk=1000)
    assert m.constant_baseline and not m.constant_target
    assert not m.all_zero_baseline and not m.all_zero_target
    # one element is never "constant"; a constant with NaNs elsewhere is still constant
    one = pair_metrics(const[:1], "float32", const[:1], "float32", rtol=RTOL, atol=ATOL)
    assert not one.constant_baseline and not one.constant_target
    with_nan = const.copy()
    with_nan[1500] = np.nan
    m = pair_metrics(with_nan, "float32", with_nan.copy(), "float32", rtol=RTOL, atol=ATOL, chunk=1000)
    assert m.constant_baseline and m.nonfinite_mismatch == 0


def test_zero_baseline_where_target_differs():
    b = np.array([0.0, 1.0, 2.0, 0.0], np.float32)
    t = np.array([0.5, 1.0, 2.001, 0.0], np.float32)
    m = pair_metrics(b, "float32", t, "float32", rtol=RTOL, atol=ATOL)
    expected = reference(b.astype(np.float64), t.astype(np.float64), rtol=RTOL, atol=ATOL)
    assert_matches(m, expected)
    assert m.max_rel == math.inf and m.needed_rtol == math.inf
    assert m.needed_atol == pytest.approx(0.5) and m.mismatched == 1
    assert m.to_json()["max_rel"] == "inf"


def test_zero_baseline_with_a_difference_below_atol_keeps_needed_rtol_finite():
    b = np.array([0.0, 1.0, 2.0], np.float32)
    t = np.array([1e-6, 1.0, 2.01], np.float32)
    m = pair_metrics(b, "float32", t, "float32", rtol=RTOL, atol=ATOL)
    expected = reference(b.astype(np.float64), t.astype(np.float64), rtol=RTOL, atol=ATOL)
    assert_matches(m, expected)
    assert m.max_rel == math.inf  # some b = 0 has t != 0
    assert 0 < m.needed_rtol < math.inf
    assert pair_metrics(b, "float32", t, "float32", rtol=m.needed_rtol, atol=ATOL).mismatched == 0


def test_bfloat16_storage_is_read_as_bits_not_as_integers():
    x = torch.tensor([1.0, -2.0, 0.5, 3.0])
    s = storage(x, "bfloat16")
    assert s.dtype == np.uint16
    shifted = storage(x * 2, "bfloat16")
    m = pair_metrics(s, "bfloat16", shifted, "bfloat16", rtol=0.0, atol=0.0)
    assert m.max_abs == 3.0 and m.max_abs_index == [3]
    assert (m.baseline_at_max, m.target_at_max) == (3.0, 6.0)
    assert m.max_rel == pytest.approx(1.0) and m.rel_l2 == pytest.approx(1.0)


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError):
        pair_metrics(np.zeros(3, np.float32), "float32", np.zeros(4, np.float32), "float32", rtol=0, atol=0)


def test_rounding_to_bfloat16_matches_torch_and_the_downcast_diff_sees_pure_rounding():
    import torch

    from parity.compare.metrics import error_distribution, round_to

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * np.exp(rng.uniform(-20, 20, 20000))).astype(np.float32)
    x[:4] = [np.inf, -np.inf, 0.0, -0.0]
    ours = round_to(x.astype(np.float64), "bfloat16")
    theirs = torch.from_numpy(x).to(torch.bfloat16).to(torch.float64).numpy()
    assert np.array_equal(ours, theirs)
    # a target that is the baseline rounded to bf16: all of its error is rounding
    bits = torch.from_numpy(x[4:]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    pure = error_distribution(x[4:], "float32", bits, "bfloat16")
    assert pure["downcast"] == {"dtype": "bfloat16", "equal_share": 1.0, "max_abs": 0.0, "rel_l2": 0.0}
    assert pure["rel"]["max"] <= 2.0 ** -8 and pure["abs"]["p50"] <= pure["abs"]["p90"] <= pure["abs"]["p99"]
    # a different computation: a tenth of the elements off by 1%
    other = x[4:].copy()
    other[::10] *= 1.01
    bits = torch.from_numpy(other).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    mixed = error_distribution(x[4:], "float32", bits, "bfloat16")
    assert 0.85 < mixed["downcast"]["equal_share"] < 0.95
