"""The compiled path must give the reference's numbers.

``fast_pair_metrics`` (numba kernel, threads) is held to ``pair_metrics`` (the numpy reference)
field by field: counts, maxima, the index of max |t-b| and the values there, the needed
tolerances and every flag exactly equal; the metrics made of float64 sums (mean |t-b|, relative
L2, cosine, SQNR) equal to 1e-9 relative (the kernel sums in another order). Data: random
pairs of mixed magnitudes in every storage dtype combination (float32, float16, float64,
bfloat16 as uint16 bits), sizes around the kernel's block size and its threading threshold,
and the edge cases: NaN/Inf (at block boundaries too), zero baselines, identical, all-zero and
constant tensors (+0 and -0 mixed), ties of the maximum across blocks, float64 values whose
squares overflow, empty and 0-d arrays. Skipped when numba is not installed.
"""

from __future__ import annotations

import math
import mmap
import warnings

import numpy as np
import pytest

from parity.compare import fastpath
from parity.compare.metrics import PairMetrics, pair_metrics

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="numba is not installed")


@pytest.fixture(autouse=True)
def strict(monkeypatch):
    """A kernel error fails the test instead of falling back to the reference silently."""
    monkeypatch.setattr(fastpath, "_strict", True)

RTOL, ATOL = 1e-3, 1e-4
BLOCK = fastpath.BLOCK
#: Fields that come from float64 sums (summation order may differ).
SUMMED = {"mean_abs", "rel_l2", "cosine", "sqnr_db", "rms_baseline"}
DTYPES = ["float32", "float16", "float64", "bfloat16"]


# --------------------------------------------------------------------------- helpers


def storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """What the store hands over: the values in ``dtype``, bfloat16 as uint16 bits (rounded)."""
    if dtype == "bfloat16":
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype(np.uint16).reshape(np.shape(x))
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(dtype)


def same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_same(fast: PairMetrics, ref: PairMetrics) -> None:
    assert type(fast) is PairMetrics
    for key, want in vars(ref).items():
        have = getattr(fast, key)
        if key in SUMMED and isinstance(want, float) and math.isfinite(want):
            assert isinstance(have, float) and math.isclose(have, want, rel_tol=1e-9, abs_tol=1e-300), \
                (key, have, want)
        elif isinstance(want, float) or want is None:
            assert same(have, want), (key, have, want)
            assert type(have) is type(want), (key, have, want)
        else:
            assert have == want and type(have) is type(want), (key, have, want)


def check(b: np.ndarray, b_dtype: str, t: np.ndarray, t_dtype: str, *, rtol: float = RTOL,
          atol: float = ATOL, workers: int = 2) -> PairMetrics:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path itself warns of nothing (overflow, 0/0, ...)
        fast = fastpath.fast_pair_metrics(b, b_dtype, t, t_dtype, rtol=rtol, atol=atol, workers=workers)
    with np.errstate(all="ignore"):
        ref = pair_metrics(b, b_dtype, t, t_dtype, rtol=rtol, atol=atol)
    assert_same(fast, ref)
    return fast


def random_pair(shape: tuple[int, ...] | int, seed: int, noise: float = 3e-3,
                zeros: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A baseline of mixed magnitudes (some near zero, some exact zeros unless ``zeros`` is
    False) and a noisy target."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(shape) * np.exp(2 * rng.standard_normal(shape))
    t = b * (1 + noise * rng.standard_normal(shape)) + 0.1 * noise * rng.standard_normal(shape)
    flat = b.reshape(-1)
    if zeros and flat.size > 10:
        flat[rng.integers(0, flat.size, flat.size // 50 + 1)] = 0.0
    return b, t


# --------------------------------------------------------------------------- random data


@pytest.mark.parametrize("n", [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_sizes_around_the_block(n, dtype):
    b, t = random_pair(n, seed=n)
    check(storage(b, dtype), dtype, storage(t, dtype), dtype)


#: Each dtype with itself, and each on one side of a mixed pair (every combination compiles
#: its own kernels: a few seconds each on a cold numba cache).
COMBINATIONS = [(d, d) for d in DTYPES] + [("float32", "bfloat16"), ("float16", "float64")]


@pytest.mark.parametrize("b_dtype,t_dtype", COMBINATIONS)
def test_dtype_combinations(b_dtype, t_dtype):
    b, t = random_pair((3, 2 * BLOCK + 17), seed=DTYPES.index(b_dtype) * 4 + DTYPES.index(t_dtype))
    m = check(storage(b, b_dtype), b_dtype, storage(t, t_dtype), t_dtype)
    assert m.mismatched > 0 and 0 < m.needed_rtol


@pytest.mark.parametrize("shape", [(2, 3, 517), (5, 1, 4099), (64, 128)], ids=str)
@pytest.mark.parametrize("tolerances", [(RTOL, ATOL), (0.0, 0.0), (1e-2, 0.0), (0.0, 1e-2), (0.5, 10.0)],
                         ids=str)
def test_shapes_and_tolerances(shape, tolerances):
    rtol, atol = tolerances
    b, t = random_pair(shape, seed=sum(shape))
    check(storage(b, "float32"), "float32", storage(t, "float32"), "float32", rtol=rtol, atol=atol)
    check(storage(b, "float32"), "float32", storage(t, "bfloat16"), "bfloat16", rtol=rtol, atol=atol)


def test_read_only_memory_mapped_input(tmp_path):
    b, t = random_pair((7, BLOCK + 3), seed=12)
    path = tmp_path / "pair.bin"
    bs, ts = storage(b, "float32"), storage(t, "bfloat16")
    path.write_bytes(bs.tobytes() + ts.tobytes())
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    bm = np.frombuffer(mm, np.float32, count=bs.size).reshape(bs.shape)
    tm = np.frombuffer(mm, np.uint16, count=ts.size, offset=bs.nbytes).reshape(ts.shape)
    assert not bm.flags.writeable
    check(bm, "float32", tm, "bfloat16")
    del bm, tm


def test_threads_do_not_change_the_result():
    n = fastpath.PARALLEL_MIN + 3 * BLOCK + 11  # over the threading threshold, ragged end
    b, t = random_pair(n, seed=5)
    bs, ts = storage(b, "float32"), storage(t, "float32")
    one = check(bs, "float32", ts, "float32", workers=1)
    for workers in (2, 3):
        many = fastpath.fast_pair_metrics(bs, "float32", ts, "float32", rtol=RTOL, atol=ATOL, workers=workers)
        assert many == one  # same blocks, summed in the same order: bit-identical


def test_large_bfloat16_pair_with_nonfinite_values_on_threads():
    n = fastpath.PARALLEL_MIN + 5
    b, t = random_pair(n, seed=6)
    bs, ts = storage(b, "bfloat16"), storage(t, "bfloat16")
    ts[[3, BLOCK, 7 * BLOCK - 1, n - 1]] = 0x7FC0  # NaN
    bs[[11, 9 * BLOCK]] = 0x7F80  # +inf
    ts[9 * BLOCK] = 0x7F80
    m = check(bs, "bfloat16", ts, "bfloat16", workers=2)
    assert m.nonfinite_mismatch == 5 and m.nan_target == 4 and m.inf_baseline == 2


# --------------------------------------------------------------------------- exactness


def test_max_abs_ties_across_blocks_report_the_first():
    b = np.zeros(5 * BLOCK, np.float32)
    t = b.copy()
    for i in (4 * BLOCK + 3, 2 * BLOCK + 7, 2 * BLOCK + 9, BLOCK * 5 - 1):
        t[i] = 2.5
    t[10] = 1.0
    m = check(b.reshape(5, BLOCK), "float32", t.reshape(5, BLOCK), "float32")
    assert m.max_abs_index == [2, 7] and m.max_abs == 2.5


def test_needed_rtol_ulp_fix_up():
    # (a / b) * b < a in float64: the reported rtol is one ulp up so that re-running with it passes
    b = np.array([-2.3250308, 1.0], np.float32)
    t = np.array([-2.3101995, 1.0], np.float32)
    for pad in (0, BLOCK - 1, 3 * BLOCK):
        bb = np.concatenate([np.ones(pad, np.float32), b])
        tt = np.concatenate([np.ones(pad, np.float32), t])
        m = check(bb, "float32", tt, "float32", rtol=0.0, atol=0.0)
        assert pair_metrics(bb, "float32", tt, "float32", rtol=m.needed_rtol, atol=0.0).mismatched == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_copying_needed_tolerances_passes(dtype):
    b, t = random_pair((3, BLOCK + 100), seed=9, zeros=False)
    bs, ts = storage(b, dtype), storage(t, dtype)
    m = check(bs, dtype, ts, dtype)
    assert m.mismatched > 0 and m.needed_rtol < math.inf
    assert fastpath.fast_pair_metrics(bs, dtype, ts, dtype, rtol=m.needed_rtol, atol=ATOL).mismatched == 0
    assert fastpath.fast_pair_metrics(bs, dtype, ts, dtype, rtol=RTOL, atol=m.needed_atol).mismatched == 0
    assert fastpath.fast_pair_metrics(bs, dtype, ts, dtype, rtol=m.needed_rtol * 0.99, atol=ATOL).mismatched > 0


def test_equal_ratios_in_many_blocks():
    # the maximum ratio is reached in several blocks; some of them need the fix-up, some not
    rng = np.random.default_rng(3)
    b = rng.uniform(1, 2, 6 * BLOCK).astype(np.float32)
    t = (b * np.float32(1.001)).astype(np.float32)
    check(b, "float32", t, "float32", rtol=0.0, atol=0.0)
    check(b, "float32", t, "float32", rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- float32 pre-pass
# For float32/float16/bfloat16 data the kernel first compares in float32 and only redoes a
# block in float64 when float32 cannot decide (or when the block may hold a maximum): these
# cases are built to sit exactly where float32 cannot tell.


@pytest.mark.parametrize("which", ["rtol", "atol"])
def test_tolerance_equal_to_an_element_difference(which):
    b, t = random_pair(3 * BLOCK + 7, seed=21, zeros=False)
    bs, ts = storage(b, "float32"), storage(t, "float32")
    ad = np.abs(ts.astype(np.float64) - bs.astype(np.float64))
    ab = np.abs(bs.astype(np.float64))
    for k in (5, BLOCK + 9, 3 * BLOCK + 6):
        if which == "rtol":  # |d| == rtol·|b| up to float64 rounding, at element k
            for rtol in (ad[k] / ab[k], np.nextafter(ad[k] / ab[k], 0), np.nextafter(ad[k] / ab[k], 1)):
                check(bs, "float32", ts, "float32", rtol=float(rtol), atol=0.0)
                check(bs, "float32", ts, "float32", rtol=float(rtol), atol=float(ad[k - 1]))
        else:  # |d| == atol exactly, and one float64 ulp either side
            for atol in (ad[k], np.nextafter(ad[k], 0), np.nextafter(ad[k], 1)):
                check(bs, "float32", ts, "float32", rtol=0.0, atol=float(atol))
                check(bs, "float32", ts, "float32", rtol=RTOL, atol=float(atol))


def test_maxima_that_float32_cannot_separate():
    # ratios and differences equal in float32 but not in float64, in different blocks
    rng = np.random.default_rng(22)
    b = rng.uniform(1, 2, 6 * BLOCK).astype(np.float32)
    t = b.copy()
    base = np.float32(1.25)
    for j, k in enumerate((BLOCK + 3, 3 * BLOCK + 11, 5 * BLOCK + 1, 2 * BLOCK)):
        b[k] = np.nextafter(base, np.float32(2), dtype=np.float32) if j % 2 else base
        t[k] = b[k] + np.float32(0.01) * (1 + j * np.float32(2**-23))
    for rtol, atol in ((0.0, 0.0), (1e-3, 1e-5), (1e-3, 0.0099)):
        check(b, "float32", t, "float32", rtol=rtol, atol=atol)
        check(storage(b, "bfloat16"), "bfloat16", storage(t, "bfloat16"), "bfloat16", rtol=rtol, atol=atol)


def test_ratios_overflowing_float32_and_huge_values():
    b, t = random_pair(4 * BLOCK, seed=23, zeros=False)
    bs, ts = storage(b, "float32"), storage(t, "float32")
    bs[[7, 2 * BLOCK + 1]] = np.float32(1e-40)  # subnormal baseline: |d|/|b| ~ 1e40 > float32 max
    bs[3 * BLOCK] = np.float32(2e-45)
    m = check(bs, "float32", ts, "float32")
    assert math.isfinite(m.max_rel) and m.max_rel > 3.4e38
    bs[BLOCK + 5] = 0.0  # and now a true inf
    assert check(bs, "float32", ts, "float32").max_rel == math.inf
    big = bs.copy()
    big[[3, BLOCK]] = np.float32(3e38)
    tb = ts.copy()
    tb[[3, BLOCK]] = np.float32(-3e38)  # |d| = 6e38: overflows float32, not float64
    check(big, "float32", tb, "float32")


@pytest.mark.parametrize("rtol,atol", [(1e-45, 1e-40), (1e-37, 0.0), (0.0, 1e-38), (2.0**121, 0.0), (1e-4, 1e39)],
                         ids=str)
def test_tolerances_float32_cannot_hold(rtol, atol):
    b, t = random_pair(2 * BLOCK + 3, seed=24)
    check(storage(b, "float32"), "float32", storage(t, "float32"), "float32", rtol=rtol, atol=atol)
    check(storage(b, "bfloat16"), "bfloat16", storage(t, "bfloat16"), "bfloat16", rtol=rtol, atol=atol)


def test_subnormal_differences_with_zero_atol():
    b = np.full(2 * BLOCK, 1e-39, np.float32)  # float32 subnormals
    t = b.copy()
    t[::7] = np.float32(1.0000001e-39)
    t[BLOCK + 1] = np.float32(3e-45)
    for rtol in (0.0, 1e-7, 0.5):
        check(b, "float32", t, "float32", rtol=rtol, atol=0.0)
    h = storage(np.linspace(-1e-5, 1e-5, 3 * BLOCK), "float16")  # float16 subnormals
    check(h, "float16", h[::-1].copy(), "float16", rtol=1e-3, atol=0.0)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_values_at_block_edges(dtype):
    b, t = random_pair(4 * BLOCK + 3, seed=2)
    bs, ts = storage(b, dtype), storage(t, dtype)
    nan = storage(np.array([np.nan]), dtype)[0]
    inf = storage(np.array([np.inf]), dtype)[0]
    ninf = storage(np.array([-np.inf]), dtype)[0]
    ts[[0, BLOCK - 1, BLOCK, 3 * BLOCK + 1, ts.size - 1]] = nan
    bs[[5, 2 * BLOCK]] = inf
    ts[[5, 2 * BLOCK]] = inf  # same non-finite value: not a mismatch
    bs[2 * BLOCK + 1] = inf
    ts[2 * BLOCK + 1] = ninf  # opposite infinities: a mismatch
    bs[[17, 3 * BLOCK + 1]] = nan  # NaN facing NaN: not a mismatch
    m = check(bs, dtype, ts, dtype)
    # NaN facing a number at 5 places (4 in the target, 1 in the baseline) + opposite infinities
    assert m.nonfinite_mismatch == 6 and m.nan_target == 5 and m.inf_baseline == 3


def test_all_nonfinite_and_nan_only():
    b = np.full(BLOCK + 3, np.nan, np.float32)
    check(b, "float32", b.copy(), "float32")
    t = b.copy()
    t[4] = 1.0
    m = check(b, "float32", t, "float32")
    assert m.max_abs_index == [] and m.baseline_at_max is None and m.constant_baseline


def test_zero_baselines():
    b = np.zeros(3 * BLOCK, np.float32)
    b[BLOCK:] = np.linspace(0.5, 2, 2 * BLOCK, dtype=np.float32)
    t = b * np.float32(1.0005)
    t[7] = 1e-6  # below atol where the baseline is 0: max_rel inf, needed_rtol finite
    m = check(b, "float32", t, "float32")
    assert m.max_rel == math.inf and m.needed_rtol < math.inf
    t[BLOCK + 9 : BLOCK + 9] = 0
    t[8] = 1.0  # over atol where the baseline is 0: needed_rtol inf too
    m = check(b, "float32", t, "float32")
    assert m.needed_rtol == math.inf


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_all_zero_and_constant(dtype):
    b, _ = random_pair(2 * BLOCK + 1, seed=4)
    s = storage(b, dtype)
    m = check(s, dtype, s.copy(), dtype, rtol=0.0, atol=0.0)
    assert m.cosine == 1.0 and m.sqnr_db == math.inf and m.mismatched == 0
    zero = storage(np.zeros(2 * BLOCK + 1), dtype)
    check(zero, dtype, zero.copy(), dtype)
    m = check(storage(np.full(3 * BLOCK, 0.5), dtype), dtype, s[: 3 * BLOCK] if s.size >= 3 * BLOCK
              else storage(np.resize(b, 3 * BLOCK), dtype), dtype)
    assert m.constant_baseline and not m.constant_target
    m = check(s, dtype, zero, dtype)
    assert m.all_zero_target and m.cosine == 0.0


def test_plus_and_minus_zero_are_one_constant():
    b = np.zeros(2 * BLOCK, np.float32)
    b[::3] = -0.0
    m = check(b, "float32", b.copy(), "float32")
    assert m.all_zero_baseline and m.constant_baseline
    b64 = np.zeros(BLOCK, np.float64)
    b64[1::2] = -0.0
    b64[5] = 1e-200  # squares underflow to 0: the kernel must still see it varies
    m = check(b64, "float64", b64.copy(), "float64")
    assert not m.constant_baseline and not m.all_zero_baseline


def test_constant_differing_between_blocks_and_constant_with_nan():
    b = np.full(3 * BLOCK, 0.25, np.float32)
    b[2 * BLOCK:] = 0.5  # each block constant, the tensor not
    assert not check(b, "float32", b.copy(), "float32").constant_baseline
    c = np.full(3 * BLOCK, 0.25, np.float32)
    c[BLOCK + 2] = np.nan
    assert check(c, "float32", c.copy(), "float32").constant_baseline


def test_float64_values_whose_squares_overflow():
    b, t = random_pair(2 * BLOCK, seed=8)
    b[BLOCK + 4] = 1e200
    t[BLOCK + 4] = 1.1e200
    t[9] = -1e300
    b[10] = 1e300
    t[10] = -1e300  # |t - b| overflows to inf
    check(b, "float64", t, "float64")


def test_denormals_and_tiny_ratios():
    b = np.full(BLOCK + 5, 1e300)
    t = b.copy()
    t[3] = 1e300 * (1 + 2**-52)
    b[7], t[7] = 1e-310, 3e-310  # subnormal float64
    t[BLOCK] = np.nextafter(1e300, 2e300)
    check(b, "float64", t, "float64", rtol=0.0, atol=0.0)
    check(b, "float64", t, "float64", rtol=1e-300, atol=1e-320)
    h = np.array([6e-8, 1e-7, -6e-5, 0.0, 65504.0], np.float16)  # float16 subnormals and max
    check(h, "float16", h[::-1].copy(), "float16", rtol=0.0, atol=0.0)


def test_empty_zero_d_and_one_element():
    check(np.zeros((0, 4), np.float32), "float32", np.zeros((0, 4), np.float32), "float32")
    m = check(np.array(1.5, np.float32), "float32", np.array(2.0, np.float32), "float32")
    assert m.max_abs_index == [] and m.numel == 1
    m = check(np.array([1.5], np.float32), "float32", np.array([2.0], np.float32), "float32")
    assert m.max_abs_index == [0] and not m.constant_baseline


def test_non_contiguous_big_endian_and_integer_inputs():
    b, t = random_pair((300, 40), seed=11)
    bs, ts = storage(b, "float32"), storage(t, "float32")
    check(bs.T, "float32", ts.T, "float32")
    check(bs.astype(">f4"), "float32", ts, "float32")
    ints = np.arange(2 * BLOCK, dtype=np.int32)
    check(ints, "int32", ints[::-1].copy(), "int32")  # not float: the reference computes it
    check(bs, "float32", ts, "float32", rtol=-1.0, atol=math.nan)  # odd tolerances: reference


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError):
        fastpath.fast_pair_metrics(np.zeros(3, np.float32), "float32", np.zeros(4, np.float32), "float32",
                                   rtol=0, atol=0)
