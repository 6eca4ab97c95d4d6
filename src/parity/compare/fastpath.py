"""A compiled (numba) kernel for :func:`parity.compare.metrics.pair_metrics`, on several threads.

:func:`fast_pair_metrics` returns the same :class:`~parity.compare.metrics.PairMetrics` as
the reference ``pair_metrics``: counts, maxima, indices and flags exactly equal; the five
float64 sums (mean |Δ|, relative L2, cosine, SQNR) equal up to summation order (relative
differences around 1e-13). It reads the storage arrays directly (memory maps included:
nothing is copied or widened up front) and falls back to ``pair_metrics`` whenever numba is
missing or the input is something the kernel does not handle (integer/bool data, non-finite
or negative ``rtol``/``atol``).

Design
    The flat pair is cut into blocks of :data:`BLOCK` elements. One compiled pass per block
    computes, in float64 and without branches (so that LLVM vectorizes it):

    - the five sums (|d|, d², b², t², t·b), reassociated freely;
    - the maxima of |d|, of |d| where |d| > rtol·|b| (``needed_atol``), of |d|/|b| (``max_rel``)
      and of |d|/|b| where |d| > atol (``needed_rtol``). These are non-negative, so each maximum
      is taken over the IEEE bit patterns as int64 (same order, exact, and integer max
      reductions vectorize where float ones, NaN-aware, do not); ``x/0`` is ``inf``, as in
      the reference, and ``0/0`` is left out;
    - the mismatch count ``|d| > max(atol, rtol·|b|)`` and whether each side varies inside the
      block (for the all-zero / constant flags).

    A block whose b², t² or d² sum is not finite holds a NaN or an Inf (or float64 values
    whose squares overflow): its partials are recomputed by :func:`_numpy_block`, a copy of
    the reference chunk body (correctness over speed there). Per-block partials are combined
    in block order, so the result does not depend on the number of threads. Two things need
    one more look at a single block: the flat index of max |d| (the first block holding the
    maximum is rescanned for its first position), and the ``needed_rtol`` ulp fix-up of the
    reference (only elements whose ratio equals the global maximum can need it, and they lie
    in blocks whose maximum equals it: those blocks are rescanned).

    Widening is exact and inlined: float16 through LLVM ``fpext half`` (F16C), bfloat16 as
    ``uint32(bits) << 16`` reinterpreted as float32.

Threads
    ``workers`` threads (default 2) each run the kernel (compiled ``nogil``) over contiguous
    ranges of blocks, from a shared thread pool; pairs under :data:`PARALLEL_MIN` elements
    run on the calling thread.

Compilation
    numba is imported on first use (``import parity.compare.fastpath`` stays cheap). Kernels
    are compiled with ``cache=True``: the first process compiles each dtype combination
    (about a second each), later ones load the machine code from numba's cache (``__pycache__``
    next to this file, or numba's user cache directory when that is not writable).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from parity.compare.metrics import PairMetrics, pair_metrics
from parity.store.safetensors_io import to_float

#: Elements per block of the kernel (the unit of partial results and of the NaN/Inf fallback).
BLOCK = 4096
#: Pairs with fewer elements than this run on the calling thread only.
PARALLEL_MIN = 1 << 18
#: Kernel calls per worker for one pair (smaller pieces balance a noisy machine better).
PIECES_PER_WORKER = 4

# Columns of the per-block partials.
_F_ABS, _F_DD, _F_BB, _F_TT, _F_TB, _F_BVAL, _F_TVAL = range(7)
_NF = 7
(_I_FLAG, _I_COUNTED, _I_MISMATCHED, _I_MAXAD, _I_NATOL, _I_MAXREL, _I_NRTOL, _I_VARY_B, _I_VARY_T,
 _I_NAN_B, _I_INF_B, _I_NAN_T, _I_INF_T, _I_NONFINITE, _I_INDEX, _I_FIXUP, _I_APPROX) = range(17)
_NI = 17

_kernels: Any = None
_load_error: BaseException | None = None
_lock = threading.Lock()
_pools: dict[int, Any] = {}  # workers -> ThreadPoolExecutor
# Helpers of the kernels, set by _build (see there).
_nb_widen: Any = None
_nb_bits: Any = None
_nb_f64_bits: Any = None
_nb_scratch: Any = None
_nb_bits_f64: Any = None
_nb_f32_bits: Any = None
_nb_f32bits_f64: Any = None
_nb_widen32: Any = None
_nb_fma32: Any = None
_nb_tie_scan: Any = None
_nb_exact_tol: Any = None
_nb_approx_tol: Any = None
_nb_first_max: Any = None
_nb_needs_ulp: Any = None
_nb_stage: Any = None


def _build() -> Any:
    """Define and return the numba kernels (imports numba; compiles lazily, per signature).

    The kernels reach their helpers through module globals (``_nb_*``), not closure cells:
    numba's cache key hashes closure contents, which differ from process to process.
    """
    global _nb_widen, _nb_bits, _nb_f64_bits, _nb_bits_f64, _nb_f32_bits, _nb_scratch, _nb_stage
    global _nb_first_max, _nb_needs_ulp, _nb_exact_tol, _nb_approx_tol, _nb_f32bits_f64, _nb_widen32, _nb_fma32
    global _nb_tie_scan
    from types import SimpleNamespace

    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic, overload

    # No nnan/ninf (data may hold NaN/Inf: a block is checked after its first loop) and no arcp
    # (x/y must stay a correctly rounded division): the sums may be reassociated, nothing else.
    # error_model="numpy": x/0 gives inf instead of raising (a raise-check stops vectorization).
    opts = dict(nogil=True, fastmath={"reassoc", "nsz", "contract"}, error_model="numpy", cache=True)

    @intrinsic
    def f64_bits(typingctx, x):  # float64 -> int64, same bits
        if x != types.float64:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(64))
        return types.int64(types.float64), codegen

    @intrinsic
    def bits_f64(typingctx, x):  # int64 -> float64, same bits
        if x != types.int64:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.DoubleType())
        return types.float64(types.int64), codegen

    @intrinsic
    def fma32(typingctx, a, b, c):  # a·b + c with one rounding (llvm.fma.f32)
        if not (a == b == c == types.float32):
            return None

        def codegen(context, builder, sig, args):
            flt = ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma", [flt], ir.FunctionType(flt, [flt, flt, flt]))
            return builder.call(fn, args)
        return types.float32(types.float32, types.float32, types.float32), codegen

    @intrinsic
    def f32bits_f64(typingctx, x):  # float32 bits held in an int64 -> float64 value
        if x != types.int64:
            return None

        def codegen(context, builder, sig, args):
            as_f32 = builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())
            return builder.fpext(as_f32, ir.DoubleType())
        return types.float64(types.int64), codegen

    @intrinsic
    def f32_bits(typingctx, x):  # float32 -> int32, same bits
        if x != types.float32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.int32(types.float32), codegen

    @intrinsic
    def bf16_to_f64(typingctx, x):  # bfloat16 bits (uint16) -> float64, exact
        if x != types.uint16:
            return None

        def codegen(context, builder, sig, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.fpext(builder.bitcast(wide, ir.FloatType()), ir.DoubleType())
        return types.float64(types.uint16), codegen

    @intrinsic
    def f16_to_f64(typingctx, x):  # float16 bits (int16) -> float64, exact
        if x != types.int16:
            return None

        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.DoubleType())
        return types.float64(types.int16), codegen

    @intrinsic
    def bf16_to_f32(typingctx, x):  # bfloat16 bits (uint16) -> float32, exact
        if x != types.uint16:
            return None

        def codegen(context, builder, sig, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())
        return types.float32(types.uint16), codegen

    @intrinsic
    def f16_to_f32(typingctx, x):  # float16 bits (int16) -> float32, exact
        if x != types.int16:
            return None

        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.int16), codegen

    def widen(a, i):  # pragma: no cover - stands for the overload below inside kernels
        raise NotImplementedError

    def widen32(a, i):  # pragma: no cover - stands for the overload below inside kernels
        raise NotImplementedError

    def scratch(a, n):  # pragma: no cover - stands for the overload below inside kernels
        raise NotImplementedError

    def stage(a, buf):  # pragma: no cover - stands for the overload below inside kernels
        raise NotImplementedError

    def bits(a, i):  # pragma: no cover - stands for the overload below inside kernels
        raise NotImplementedError

    @overload(widen, inline="always")
    def _widen(a, i):
        dt = a.dtype
        if dt in (types.float32, types.float64):
            return lambda a, i: np.float64(a[i])
        if dt == types.uint16:
            return lambda a, i: bf16_to_f64(a[i])
        if dt == types.int16:
            return lambda a, i: f16_to_f64(a[i])
        return None

    @overload(bits, inline="always")
    def _bits_ov(a, i):  # the storage bits of element i: equal bits <=> equal values, but for +-0
        dt = a.dtype
        if dt == types.float32:
            return lambda a, i: f32_bits(a[i])
        if dt == types.float64:
            return lambda a, i: f64_bits(a[i])
        if dt in (types.uint16, types.int16):
            return lambda a, i: a[i]
        return None

    @overload(widen32, inline="always")
    def _widen32(a, i):  # element i as float32 (exact for float32 / float16 / bfloat16 storage)
        dt = a.dtype
        if dt == types.float32:
            return lambda a, i: a[i]
        if dt == types.uint16:
            return lambda a, i: bf16_to_f32(a[i])
        if dt == types.int16:
            return lambda a, i: f16_to_f32(a[i])
        if dt == types.float64:  # typed, never run: float64 data never takes the float32 path
            return lambda a, i: np.float32(a[i])
        return None

    @overload(scratch, inline="always")
    def _scratch(a, n):  # float32 staging buffer for 16-bit storage (none for 32/64-bit)
        if a.dtype in (types.uint16, types.int16):
            return lambda a, n: np.empty(n, np.float32)
        return lambda a, n: np.empty(0, np.float32)

    @overload(stage, inline="always")
    def _stage(a, buf):  # a block as the loops read it: 16-bit storage widened once to float32
        if a.dtype == types.uint16:
            def impl(a, buf):
                out = buf[:a.size]
                for i in range(a.size):
                    out[i] = bf16_to_f32(a[i])
                return out
            return impl
        if a.dtype == types.int16:
            def impl(a, buf):
                out = buf[:a.size]
                for i in range(a.size):
                    out[i] = f16_to_f32(a[i])
                return out
            return impl
        return lambda a, buf: a

    _nb_widen, _nb_bits, _nb_f64_bits, _nb_scratch, _nb_stage = widen, bits, f64_bits, scratch, stage
    _nb_bits_f64, _nb_f32_bits, _nb_f32bits_f64 = bits_f64, f32_bits, f32bits_f64
    _nb_widen32, _nb_fma32 = widen32, fma32

    @njit(**opts)
    def exact_tol(bs, ts, rtol, atol):
        """float64 loop 2 over one block: bits of the maxima of |d| where |d| > rtol·|b|, of
        |d|/|b| and of |d|/|b| where |d| > atol, and the mismatch count."""
        n_atol = 0
        max_rel = 0
        n_rtol = 0
        mism = 0
        for i in range(bs.size):
            bv = _nb_widen(bs, i)
            ad = abs(_nb_widen(ts, i) - bv)
            ab = abs(bv)
            ad_bits = _nb_f64_bits(ad)
            thr = ab * rtol
            n_atol = max(n_atol, ad_bits if ad > thr else 0)
            lim = thr if thr > atol else atol
            mism += 1 if ad > lim else 0
            rel = _nb_f64_bits(ad / ab) if ad > 0.0 else 0  # ab = 0 < ad: inf, as the reference
            max_rel = max(max_rel, rel)
            n_rtol = max(n_rtol, rel if ad > atol else 0)
        return n_atol, max_rel, n_rtol, mism

    @njit(**opts)
    def approx_tol(bs, ts, rtol32, atol_hi, atol_lo):
        """float32 loop 2 over one block of float32 values (8 lanes where float64 has 4).

        Returns float32 bits of the three maxima (approximations, relative error < 2^-22),
        the mismatch count and the number of elements whose comparisons float32 cannot
        decide (|d| within a relative 2^-18, or 2^-126, of rtol·|b| or of atol): when that
        is not 0, the caller runs :func:`exact_tol` instead.
        """
        one = np.float32(1.0)
        zero = np.float32(0.0)
        e_hi = np.float32(1.0 + 2.0 ** -18)
        e_lo = np.float32(1.0 - 2.0 ** -18)
        tiny = np.float32(2.0 ** -126)
        n_atol = np.int32(0)
        max_rel = np.int32(0)
        n_rtol = np.int32(0)
        unsure = zero  # counts in float32 (exact below 2^24) keep the loop 8 lanes wide
        mism = zero
        for i in range(bs.size):
            bv = np.float32(bs[i])
            ad = abs(np.float32(ts[i]) - bv)
            ab = abs(bv)
            thr = ab * rtol32
            over_thr = ad > thr * e_hi + tiny  # surely |d| > rtol·|b| in float64
            maybe_thr = ad > max(thr * e_lo - tiny, zero)  # possibly (never where d = 0)
            over_atol = ad > atol_hi
            maybe_atol = ad > atol_lo
            unsure += one if (over_thr != maybe_thr) | (over_atol != maybe_atol) else zero
            mism += one if over_thr & over_atol else zero
            n_atol = max(n_atol, _nb_f32_bits(ad) if maybe_thr else np.int32(0))
            rel = _nb_f32_bits(ad / ab) if ad > zero else np.int32(0)
            max_rel = max(max_rel, rel)
            n_rtol = max(n_rtol, rel if maybe_atol else np.int32(0))
        return n_atol, max_rel, n_rtol, int(mism), int(unsure)

    # No fastmath here: the TwoSum error term below must not be reassociated away.
    @njit(nogil=True, error_model="numpy", cache=True)
    def tie_scan(bs, ts, rtol32, atol_hi, t_natol, t_rel, t_nrtol):
        """Exact maxima of a block that may hold a global maximum, from float32 arithmetic
        where it is provably exact.

        Over the elements at or above the float32 thresholds ``t_*`` (``inf``: not wanted),
        returns the float64 bits of the maxima of |d| where |d| > rtol·|b|, of |d|/|b| and of
        |d|/|b| where |d| > atol, and 1 when some such element's float32 |d| or |d|/|b| is
        not exact (TwoSum error, FMA residual): then the caller uses :func:`exact_tol`.
        Float16/bfloat16 data, whose differences and ratios are often exact in float32, tie
        on their maxima in many blocks: this settles most of those blocks at float32 speed.
        """
        e_hi = np.float32(1.0 + 2.0 ** -18)
        tiny = np.float32(2.0 ** -126)
        zero = np.float32(0.0)
        n_atol = np.int32(0)
        max_rel = np.int32(0)
        n_rtol = np.int32(0)
        unsure = np.int32(0)
        for i in range(bs.size):
            bv = _nb_widen32(bs, i)
            tv = _nb_widen32(ts, i)
            d = tv - bv
            z = d - tv  # TwoSum: err is the exact rounding error of d = tv + (-bv)
            err = (tv - (d - z)) + (-bv - z)
            ad = abs(d)
            ab = abs(bv)
            r = ad / ab
            over_thr = ad > ab * rtol32 * e_hi + tiny
            over_atol = ad > atol_hi
            d_inexact = err != zero
            r_inexact = d_inexact | ((_nb_fma32(r, ab, -ad) != zero) & (ab != zero))
            c1 = over_thr & (ad >= t_natol)
            c2 = (ad > zero) & (r >= t_rel)
            c3 = over_atol & (r >= t_nrtol)
            unsure = max(unsure, np.int32(1) if (c1 & d_inexact) | ((c2 | c3) & r_inexact) else np.int32(0))
            n_atol = max(n_atol, _nb_f32_bits(ad) if c1 else np.int32(0))
            max_rel = max(max_rel, _nb_f32_bits(r) if c2 else np.int32(0))
            n_rtol = max(n_rtol, _nb_f32_bits(r) if c3 else np.int32(0))
        return (_nb_f64_bits(_nb_f32bits_f64(np.int64(n_atol))), _nb_f64_bits(_nb_f32bits_f64(np.int64(max_rel))),
                _nb_f64_bits(_nb_f32bits_f64(np.int64(n_rtol))), unsure)

    _nb_exact_tol, _nb_approx_tol, _nb_tie_scan = exact_tol, approx_tol, tie_scan

    @njit(**opts)
    def blocks(b, t, first, last, n, block, rtol, atol, f32ok, fpart, ipart):
        """Partials of blocks [first, last) into rows of fpart / ipart (see the module doc)."""
        exp_mask = 0x7FF0000000000000
        f32_safe = 0x47D0000000000000  # bits of 2^126: |t - b| cannot overflow float32 below it
        rtol32 = np.float32(rtol)
        atol32 = np.float32(atol)
        atol_hi = atol32 * np.float32(1.0 + 2.0 ** -18) + np.float32(2.0 ** -126)
        atol_lo = max(atol32 * np.float32(1.0 - 2.0 ** -18) - np.float32(2.0 ** -126), np.float32(0.0))
        b_buf = _nb_scratch(b, block)
        t_buf = _nb_scratch(t, block)
        flagged = 0
        for k in range(first, last):
            lo = k * block
            hi = min(lo + block, n)
            m = hi - lo
            b_raw = b[lo:hi]  # 0-based views: no negative-index wraparound in the loops (they vectorize)
            t_raw = t[lo:hi]
            bs = _nb_stage(b_raw, b_buf)
            ts = _nb_stage(t_raw, t_buf)
            # Loop 1 (streams the data in): the sums and max |d|.
            s_abs = 0.0
            s_dd = 0.0
            s_bb = 0.0
            s_tt = 0.0
            s_tb = 0.0
            max_ad = 0
            for i in range(m):
                bv = _nb_widen(bs, i)
                tv = _nb_widen(ts, i)
                d = tv - bv
                ad = abs(d)
                s_abs += ad
                s_dd += d * d
                s_bb += bv * bv
                s_tt += tv * tv
                s_tb += tv * bv
                max_ad = max(max_ad, _nb_f64_bits(ad))
            if (_nb_f64_bits(s_bb + s_tt + s_dd) & exp_mask) == exp_mask:
                ipart[k, 0] = 1  # NaN/Inf in the block (or an overflow): recomputed with numpy
                flagged += 1
                continue
            # Loop 2 (block now in cache): the tolerance-dependent maxima and the mismatch count.
            approx = 0
            if max_ad == 0:  # identical block
                n_atol = 0
                max_rel = 0
                n_rtol = 0
                mism = 0
            elif f32ok and max_ad < f32_safe:
                n_atol, max_rel, n_rtol, mism, unsure = _nb_approx_tol(bs, ts, rtol32, atol_hi, atol_lo)
                approx = 1
                if unsure:
                    n_atol, max_rel, n_rtol, mism = _nb_exact_tol(bs, ts, rtol, atol)
                    approx = 0
            else:
                n_atol, max_rel, n_rtol, mism = _nb_exact_tol(bs, ts, rtol, atol)
            # Loop 3: does a side vary inside the block? (storage bits, integer ops only)
            b0 = _nb_bits(b_raw, 0)
            t0 = _nb_bits(t_raw, 0)
            vary_b = b0 ^ b0
            vary_t = t0 ^ t0
            for i in range(m):
                vary_b |= _nb_bits(b_raw, i) ^ b0
                vary_t |= _nb_bits(t_raw, i) ^ t0
            bv0 = _nb_widen(bs, 0)
            tv0 = _nb_widen(ts, 0)
            vb = vary_b != 0
            vt = vary_t != 0
            if vb and bv0 == 0.0 and s_bb == 0.0:  # -0.0 and 0.0 differ in bits only
                vb = False
                for i in range(m):
                    if _nb_widen(bs, i) != bv0:
                        vb = True
                        break
            if vt and tv0 == 0.0 and s_tt == 0.0:
                vt = False
                for i in range(m):
                    if _nb_widen(ts, i) != tv0:
                        vt = True
                        break
            fpart[k, 0] = s_abs
            fpart[k, 1] = s_dd
            fpart[k, 2] = s_bb
            fpart[k, 3] = s_tt
            fpart[k, 4] = s_tb
            fpart[k, 5] = bv0
            fpart[k, 6] = tv0
            ipart[k, 0] = 0
            ipart[k, 1] = m
            ipart[k, 2] = mism
            ipart[k, 3] = max_ad
            ipart[k, 4] = n_atol
            ipart[k, 5] = max_rel
            ipart[k, 6] = n_rtol
            ipart[k, 7] = 1 if vb else 0
            ipart[k, 8] = 1 if vt else 0
            for j in range(9, 14):
                ipart[k, j] = 0
            ipart[k, 14] = -1
            ipart[k, 15] = -1
            ipart[k, 16] = approx
        return flagged

    @njit(nogil=True, cache=True)
    def first_max(b, t, lo, hi, m):
        """First i in [lo, hi) with |t[i] - b[i]| == m (float64), or -1."""
        bs = b[lo:hi]
        ts = t[lo:hi]
        for i in range(hi - lo):
            if abs(_nb_widen(ts, i) - _nb_widen(bs, i)) == m:
                return lo + i
        return -1

    @njit(nogil=True, cache=True)
    def needs_ulp(b, t, lo, hi, r, atol):
        """Whether some i in [lo, hi) has |d| > atol and r·|b| < |d| (the reference's fix-up)."""
        bs = b[lo:hi]
        ts = t[lo:hi]
        for i in range(hi - lo):
            bv = _nb_widen(bs, i)
            ad = abs(_nb_widen(ts, i) - bv)
            if ad > atol and r * abs(bv) < ad:
                return True
        return False

    _nb_first_max, _nb_needs_ulp = first_max, needs_ulp

    @njit(nogil=True, cache=True)
    def combine(b, t, n, block, fpart, ipart, rtol, atol):
        """Fold the per-block partials in block order; returns the fields of the metrics."""
        # Blocks whose three tolerance maxima are float32 approximations (relative error
        # < 2^-22): only those within 2^-18 of the largest approximation can hold the true
        # maximum; they are recomputed in float64, the others cannot matter.
        g_natol = 0
        g_rel = 0
        g_nrtol = 0
        any_approx = False
        for k in range(fpart.shape[0]):
            if ipart[k, 16] != 0:
                any_approx = True
                g_natol = max(g_natol, ipart[k, 4])
                g_rel = max(g_rel, ipart[k, 5])
                g_nrtol = max(g_nrtol, ipart[k, 6])
        if any_approx:
            f32max = 3.4028234663852886e38
            shrink = 1.0 - 2.0 ** -18
            inf = np.inf
            t_natol = min(_nb_f32bits_f64(g_natol), f32max) * shrink if g_natol > 0 else inf
            t_rel = min(_nb_f32bits_f64(g_rel), f32max) * shrink if g_rel > 0 else inf
            t_nrtol = min(_nb_f32bits_f64(g_nrtol), f32max) * shrink if g_nrtol > 0 else inf
            # float32 thresholds for tie_scan, rounded below the float64 ones
            down = 1.0 - 2.0 ** -20
            t32_natol = np.float32(t_natol * down)
            t32_rel = np.float32(t_rel * down)
            t32_nrtol = np.float32(t_nrtol * down)
            rtol32 = np.float32(rtol)
            atol_hi = np.float32(atol) * np.float32(1.0 + 2.0 ** -18) + np.float32(2.0 ** -126)
            for k in range(fpart.shape[0]):
                if ipart[k, 16] == 0:
                    continue
                c_natol = _nb_f32bits_f64(ipart[k, 4]) >= t_natol
                c_rel = _nb_f32bits_f64(ipart[k, 5]) >= t_rel
                c_nrtol = _nb_f32bits_f64(ipart[k, 6]) >= t_nrtol
                if not (c_natol or c_rel or c_nrtol):
                    continue  # cannot hold a maximum: stays approximate, left out below
                lo = k * block
                hi = min(lo + block, n)
                n_atol, max_rel, n_rtol, unsure = _nb_tie_scan(
                    b[lo:hi], t[lo:hi], rtol32, atol_hi, t32_natol if c_natol else np.float32(inf),
                    t32_rel if c_rel else np.float32(inf), t32_nrtol if c_nrtol else np.float32(inf))
                if unsure:
                    n_atol, max_rel, n_rtol, mism = _nb_exact_tol(b[lo:hi], t[lo:hi], rtol, atol)
                    ipart[k, 2] = mism
                # maxima this block cannot hold are 0: they cannot matter either
                ipart[k, 4] = n_atol if c_natol else 0
                ipart[k, 5] = max_rel if c_rel else 0
                ipart[k, 6] = n_rtol if c_nrtol else 0
                ipart[k, 16] = 0
        s_abs = 0.0
        s_dd = 0.0
        s_bb = 0.0
        s_tt = 0.0
        s_tb = 0.0
        counted = 0
        mism = 0
        nonfinite = 0
        nan_b = 0
        inf_b = 0
        nan_t = 0
        inf_t = 0
        vary_b = False
        vary_t = False
        has_b = False
        has_t = False
        b_val = 0.0
        t_val = 0.0
        top = 0
        top_row = -1
        max_rel = 0
        n_atol = 0
        n_rtol = 0
        for k in range(fpart.shape[0]):
            nonfinite += ipart[k, 13]
            mism += ipart[k, 2]
            nan_b += ipart[k, 9]
            inf_b += ipart[k, 10]
            nan_t += ipart[k, 11]
            inf_t += ipart[k, 12]
            v = fpart[k, 5]
            if ipart[k, 7] != 0:
                vary_b = True
            elif v == v:  # a constant block: does its value differ from the others'?
                if has_b and v != b_val:
                    vary_b = True
                has_b = True
                b_val = v
            v = fpart[k, 6]
            if ipart[k, 8] != 0:
                vary_t = True
            elif v == v:
                if has_t and v != t_val:
                    vary_t = True
                has_t = True
                t_val = v
            c = ipart[k, 1]
            if c > 0:
                counted += c
                s_abs += fpart[k, 0]
                s_dd += fpart[k, 1]
                s_bb += fpart[k, 2]
                s_tt += fpart[k, 3]
                s_tb += fpart[k, 4]
                if top_row < 0 or ipart[k, 3] > top:  # first block holding the maximum
                    top = ipart[k, 3]
                    top_row = k
                if ipart[k, 16] == 0:  # exact (approximate blocks left cannot hold a maximum)
                    max_rel = max(max_rel, ipart[k, 5])
                    n_atol = max(n_atol, ipart[k, 4])
                    n_rtol = max(n_rtol, ipart[k, 6])
        index = -1
        max_abs = -1.0
        needed_rtol = 0.0
        b_at = 0.0
        t_at = 0.0
        if counted > 0:
            max_abs = _nb_bits_f64(top)
            index = ipart[top_row, 14]
            if index < 0:
                lo = top_row * block
                index = _nb_first_max(b, t, lo, min(lo + block, n), max_abs)
            b_at = _nb_widen(b, index)
            t_at = _nb_widen(t, index)
            needed_rtol = _nb_bits_f64(n_rtol)
            if n_rtol < 0x7FF0000000000000 and max_abs > atol:  # finite, and some |d| > atol
                # Only elements whose ratio equals the maximum can need the reference's ulp
                # fix-up, and they lie in blocks whose maximum equals it.
                for k in range(fpart.shape[0]):
                    if ipart[k, 1] > 0 and ipart[k, 16] == 0 and ipart[k, 6] == n_rtol:
                        fix = ipart[k, 15]
                        if fix < 0:
                            lo = k * block
                            fix = 1 if _nb_needs_ulp(b, t, lo, min(lo + block, n), needed_rtol, atol) else 0
                        if fix > 0:
                            needed_rtol = _nb_bits_f64(n_rtol + 1)  # next float64 up
                            break
        return (s_abs, s_dd, s_bb, s_tt, s_tb, counted, mism, nonfinite, max_abs, index, b_at, t_at,
                _nb_bits_f64(max_rel), _nb_bits_f64(n_atol), needed_rtol, nan_b, inf_b, nan_t, inf_t,
                vary_b, vary_t, has_b and b_val == 0.0, has_t and t_val == 0.0)

    return SimpleNamespace(blocks=blocks, combine=combine)


def _load() -> Any:
    global _kernels, _load_error
    if _kernels is None and _load_error is None:
        with _lock:
            if _kernels is None and _load_error is None:
                try:
                    _kernels = _build()
                except Exception as exc:  # numba missing or broken: the numpy path is used
                    _load_error = exc
    return _kernels


def available() -> bool:
    """Whether the compiled path can be used (numba importable). Imports numba on first call."""
    return _load() is not None


def _pool(workers: int) -> Any:
    from concurrent.futures import ThreadPoolExecutor  # lazily: keeps the module import cheap

    with _lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(max_workers=workers,
                                                        thread_name_prefix="parity-fastpath")
        return pool


def _kernel_view(flat: np.ndarray, dtype: str) -> np.ndarray | None:
    """The array the kernel reads (float32/float64 as is, bfloat16 bits as uint16, float16
    bits as int16), or None when the kernel cannot read it."""
    if dtype == "bfloat16":
        if flat.dtype.itemsize != 2 or flat.dtype.kind not in "ui":
            return None
        target = np.dtype(np.uint16)
    elif flat.dtype.kind == "f" and flat.dtype.itemsize in (4, 8):
        target = flat.dtype.newbyteorder("=")
    elif flat.dtype.kind == "f" and flat.dtype.itemsize == 2:
        flat = np.ascontiguousarray(flat, dtype=np.dtype(np.float16).newbyteorder("="))
        return flat.view(np.int16)
    else:
        return None
    if flat.dtype.byteorder not in ("=", "|") and flat.dtype.byteorder != target.byteorder:
        flat = flat.astype(flat.dtype.newbyteorder("="))
    flat = np.ascontiguousarray(flat)
    return flat.view(target) if dtype == "bfloat16" else flat


def _numpy_block(b_raw: np.ndarray, b_dtype: str, t_raw: np.ndarray, t_dtype: str, start: int,
                 rtol: float, atol: float, frow: np.ndarray, irow: np.ndarray) -> None:
    """Partials of one block that holds NaN/Inf, with the reference chunk body (numpy)."""
    with np.errstate(all="ignore"):  # overflow, inf - inf, 0/0: as the reference computes them
        _numpy_block_body(to_float(b_raw, b_dtype), to_float(t_raw, t_dtype), start, rtol, atol, frow, irow)


def _numpy_block_body(b: np.ndarray, t: np.ndarray, start: int, rtol: float, atol: float,
                      frow: np.ndarray, irow: np.ndarray) -> None:
    irow[:] = 0
    frow[:] = 0.0
    irow[_I_FLAG] = 2
    irow[_I_INDEX] = -1
    irow[_I_FIXUP] = 0
    for x, nan_col, inf_col, vary_col, val_col in ((b, _I_NAN_B, _I_INF_B, _I_VARY_B, _F_BVAL),
                                                   (t, _I_NAN_T, _I_INF_T, _I_VARY_T, _F_TVAL)):
        irow[nan_col] = int(np.isnan(x).sum())
        irow[inf_col] = int(np.isinf(x).sum())
        finite = x[np.isfinite(x)]
        if finite.size:
            lo, hi = float(np.min(finite)), float(np.max(finite))
            irow[vary_col] = int(lo != hi)
            frow[val_col] = lo
        else:
            frow[val_col] = math.nan
    both = np.isfinite(b) & np.isfinite(t)
    same_nonfinite = ~both & ((b == t) | (np.isnan(b) & np.isnan(t)))
    irow[_I_NONFINITE] = int((~both & ~same_nonfinite).sum())
    index_map = np.flatnonzero(both)
    b, t = b[both], t[both]
    if b.size == 0:
        return
    irow[_I_COUNTED] = b.size
    d = t - b
    ad = np.abs(d)
    ab = np.abs(b)
    frow[_F_ABS] = float(ad.sum())
    frow[_F_DD] = float(np.dot(d, d))
    frow[_F_BB] = float(np.dot(b, b))
    frow[_F_TT] = float(np.dot(t, t))
    frow[_F_TB] = float(np.dot(t, b))
    i = int(np.argmax(ad))
    irow[_I_MAXAD] = _bits(float(ad[i]))
    irow[_I_INDEX] = start + int(index_map[i])
    thr = ab * rtol
    over_rel = ad > thr
    irow[_I_NATOL] = _bits(float(np.max(ad, where=over_rel, initial=0.0)))
    irow[_I_MISMATCHED] = int(np.count_nonzero(over_rel & (ad > atol)))
    rel = np.divide(ad, ab)
    irow[_I_MAXREL] = _bits(float(np.fmax.reduce(rel, initial=0.0)))
    over_abs = ad > atol
    chunk_rtol = float(np.fmax.reduce(rel, where=over_abs, initial=0.0))
    irow[_I_NRTOL] = _bits(chunk_rtol)
    if chunk_rtol != math.inf and bool(np.any(over_abs & (chunk_rtol * ab < ad))):
        irow[_I_FIXUP] = 1


def _bits(x: float) -> int:
    return int(np.float64(x).view(np.int64))


def fast_pair_metrics(baseline: np.ndarray, baseline_dtype: str, target: np.ndarray, target_dtype: str,
                      *, rtol: float, atol: float, workers: int = 2) -> PairMetrics:
    """:func:`~parity.compare.metrics.pair_metrics` with the compiled kernel on ``workers`` threads.

    Same arguments (storage arrays, bfloat16 as uint16 bits) and the same result; falls back to
    ``pair_metrics`` when numba is unavailable or the input is not float data.
    """
    b_flat = baseline.reshape(-1)
    t_flat = target.reshape(-1)
    n = b_flat.size
    if t_flat.size != n:
        raise ValueError("pair_metrics needs arrays of the same size")
    rtol, atol = float(rtol), float(atol)
    kernels = _load() if n else None
    bk = _kernel_view(b_flat, baseline_dtype) if kernels is not None else None
    tk = _kernel_view(t_flat, target_dtype) if bk is not None else None
    if tk is None or not (0.0 <= rtol < math.inf and 0.0 <= atol < math.inf):
        return pair_metrics(baseline, baseline_dtype, target, target_dtype, rtol=rtol, atol=atol)

    # float32 pre-pass of loop 2: values float32 holds exactly, tolerances float32 holds to 2^-24
    f32ok = (bk.dtype.itemsize <= 4 and tk.dtype.itemsize <= 4
             and all(x == 0.0 or 2.0 ** -120 <= x <= 2.0 ** 120 for x in (rtol, atol)))
    nblocks = -(-n // BLOCK)
    fpart = np.empty((nblocks, _NF), np.float64)
    ipart = np.empty((nblocks, _NI), np.int64)
    workers = max(1, int(workers))
    if workers == 1 or n < PARALLEL_MIN or nblocks < 2:
        flagged = kernels.blocks(bk, tk, 0, nblocks, n, BLOCK, rtol, atol, f32ok, fpart, ipart)
    else:
        pieces = min(nblocks, workers * PIECES_PER_WORKER)
        bounds = [nblocks * p // pieces for p in range(pieces + 1)]
        pool = _pool(workers)
        futures = [pool.submit(kernels.blocks, bk, tk, bounds[p], bounds[p + 1], n, BLOCK, rtol, atol, f32ok,
                               fpart, ipart)
                   for p in range(pieces)]
        flagged = sum(future.result() for future in futures)
    if flagged:
        for k in np.flatnonzero(ipart[:, _I_FLAG] == 1):
            lo, hi = int(k) * BLOCK, min((int(k) + 1) * BLOCK, n)
            _numpy_block(b_flat[lo:hi], baseline_dtype, t_flat[lo:hi], target_dtype, lo, rtol, atol,
                         fpart[k], ipart[k])
    (sum_abs, sum_dd, sum_bb, sum_tt, sum_tb, counted, mismatched, nonfinite_mismatch, max_abs, max_abs_at,
     b_at, t_at, max_rel, needed_atol, needed_rtol, nan_b, inf_b, nan_t, inf_t, varies_b, varies_t,
     zero_b, zero_t) = kernels.combine(bk, tk, n, BLOCK, fpart, ipart, rtol, atol)
    mismatched += nonfinite_mismatch

    # From here on, the reference's own final formulas.
    norm_b, norm_t, norm_d = math.sqrt(sum_bb), math.sqrt(sum_tt), math.sqrt(sum_dd)
    if norm_b > 0:
        rel_l2 = norm_d / norm_b
    else:
        rel_l2 = 0.0 if norm_d == 0 else math.inf
    if sum_dd == 0 and nonfinite_mismatch == 0:
        cosine = 1.0
    elif norm_b > 0 and norm_t > 0:
        cosine = max(-1.0, min(1.0, sum_tb / (norm_b * norm_t)))
    else:
        cosine = 1.0 if norm_b == norm_t == 0 else 0.0
    if sum_dd == 0:
        sqnr = math.inf
    elif sum_bb == 0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(sum_bb / sum_dd)
    found = counted > 0  # the reference: n > 0 and max_abs >= 0
    index = [int(i) for i in np.unravel_index(max_abs_at, baseline.shape)] if found else []
    return PairMetrics(
        numel=n, max_abs=max(max_abs, 0.0), max_abs_index=index,
        baseline_at_max=b_at if found else None, target_at_max=t_at if found else None,
        mean_abs=sum_abs / counted if counted else 0.0, max_rel=max_rel, rel_l2=rel_l2, cosine=cosine,
        sqnr_db=sqnr, mismatched=mismatched, mismatch_fraction=mismatched / n if n else 0.0,
        needed_rtol=needed_rtol, needed_atol=needed_atol,
        nan_baseline=nan_b, nan_target=nan_t, inf_baseline=inf_b, inf_target=inf_t,
        nonfinite_mismatch=nonfinite_mismatch,
        all_zero_baseline=nan_b == 0 and inf_b == 0 and not varies_b and zero_b,
        all_zero_target=nan_t == 0 and inf_t == 0 and not varies_t and zero_t,
        constant_baseline=n > 1 and not varies_b, constant_target=n > 1 and not varies_t,
    )
