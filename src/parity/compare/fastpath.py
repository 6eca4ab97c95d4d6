"""A compiled (numba) kernel for :func:`parity.compare.metrics.pair_metrics`, on several threads.

:func:`fast_pair_metrics` returns the same :class:`~parity.compare.metrics.PairMetrics` as
the reference ``pair_metrics``: counts, maxima, indices and flags exactly equal; the five
float64 sums (mean |Δ|, relative L2, cosine, SQNR) equal up to summation order (relative
differences around 1e-13). It reads the storage arrays directly (memory maps included:
nothing is copied or widened up front) and falls back to ``pair_metrics`` whenever numba is
missing or the input is something the kernel does not handle (integer/bool data, non-finite
or negative ``rtol``/``atol``).

Design
    The flat pair is cut into blocks of :data:`BLOCK` elements (partial results per block,
    combined in block order, so the result does not depend on the number of threads). Per
    block, branch-free loops that LLVM vectorizes (``fastmath`` limited to reassociation, so
    that every per-element value is the reference's own float64 value):

    1. float64: the five sums (|d|, d², b², t², t·b), over the two halves of the block at once
       (two independent dependency chains per sum). A block whose b², t² or d² sum is not
       finite holds a NaN or an Inf (or float64 values whose squares overflow): its partials are
       recomputed by :func:`_numpy_block`, a copy of the reference's chunk body (correctness
       over speed there). A block whose |d| sum is 0 is identical: loop 2 is skipped.
    2. the tolerance part and max |d|: the mismatch count ``|d| > max(atol, rtol·|b|)`` and the
       maxima of |d|, of |d| where |d| > rtol·|b| (``needed_atol``), of |d|/|b| (``max_rel``;
       ``x/0`` is ``inf`` as in the reference, ``0/0`` is left out) and of |d|/|b| where
       |d| > atol (``needed_rtol``). For data that float32 holds exactly (float32, float16,
       bfloat16) and tolerances it holds to 2^-24, this loop runs in float32 (8 lanes instead of
       4): a comparison is trusted only when it holds with a margin of 2^-18 relative (and
       2^-126 absolute for atol; |d| > rtol·|b| is decided on the quotient |d|/|b|, computed for
       the maxima anyway); a block with an element inside the margin is redone in float64. The
       float32 maxima are approximations (relative error < 2^-22), kept per chunk of
       :data:`CHUNK` elements: a block whose approximation comes within 2^-18 of the largest
       one seen so far is settled in float64 at once (while in cache), over its chunks within
       2^-18 of the block's approximation only; the blocks left approximate provably cannot hold
       a maximum and are left out when combining. This loop is bound by arithmetic, loop 1 by
       memory: while it runs, it prefetches the next block of its range (``llvm.prefetch``, one
       hint per cache line; +6-13% measured on data that does not fit the caches).
    3. whether each side varies inside the block: storage bits compared with the first
       element's, 64 at a time up to the first differing chunk (a block of +0/-0 only is
       rechecked by value).

    Maxima are taken over IEEE bit patterns as integers (the values are non-negative: same
    order, exact, and integer max reductions vectorize where NaN-aware float ones do not).
    Combining needs one more look at a block in two cases: the flat index of max |d| (the first
    block holding the maximum is rescanned for its first position) and the ``needed_rtol`` ulp
    fix-up of the reference (only elements whose ratio equals the global maximum can need it,
    and they lie in the blocks whose maximum equals it: those are checked; a block whose
    ``needed_rtol`` was settled in the kernel has its answer already, found over the settled
    chunks, since with quantized data the largest ratio is often tied across many blocks).

    Widening is exact and inlined: float16 through LLVM ``fpext half`` (F16C), bfloat16 as
    ``uint32(bits) << 16`` reinterpreted as float32; 16-bit blocks are widened once into a
    float32 buffer that loops 1 and 2 share (converting inside loop 1 measured slower).

Threads
    ``workers`` threads (default 2) run the kernel (a C function called through ctypes, which
    releases the GIL) over contiguous ranges of blocks (:data:`PIECES_PER_WORKER` ranges per thread), from a shared thread pool; pairs
    under :data:`PARALLEL_MIN` elements run on the calling thread. Combining is serial.

Compilation
    Per dtype combination (baseline, target), five entry points (per-block partials, settling,
    folding, first index of the maximum, ulp fix-up) are numba ``cfunc`` wrappers (C ABI:
    pointers and scalars) around the kernels of :func:`_build`. The first process that needs a
    combination imports numba, compiles it (a few seconds for the first, about a second for
    each further one) and stores the machine code (native object files for this CPU) in a
    cache file; later processes load that file with llvmlite and call the entry points through
    ctypes, without importing numba (a few ms instead of about 0.4 s of numba import and
    cache loading). The cache file's name holds a hash of this source file, the numba and
    llvmlite installs, the Python version and the CPU (name and features); it lies in
    ``NUMBA_CACHE_DIR`` when set, else in ``__pycache__`` next to this file when writable, else
    in ``$XDG_CACHE_HOME/parity`` (``~/.cache/parity``). ``import parity.compare.fastpath``
    stays cheap: numba and llvmlite are imported on first use.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from parity.compare.metrics import PairMetrics, assemble_metrics, pair_metrics
from parity.store.safetensors_io import to_float

#: Elements per block of the kernel (the unit of partial results and of the NaN/Inf fallback).
BLOCK = 4096
#: Elements per chunk of a block: the float32 maxima are kept per chunk, and a maximum is
#: settled in float64 over the chunks that can hold it only.
CHUNK = 256
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

_kernels: Any = None  # the numba definitions (only in a process that compiles)
_natives: dict[tuple[str, str], Any] = {}  # (baseline kind, target kind) -> _Native
_failed: dict[tuple[str, str], BaseException] = {}
_available: bool | None = None
_lock = threading.Lock()
_pools: dict[int, Any] = {}  # workers -> ThreadPoolExecutor
_warned: list[bool] = []  # the fallback warning is logged once
_strict = False  # tests set it: a failing kernel raises instead of falling back to numpy


def _build() -> Any:
    """Define and return the numba kernels (imports numba; compiled by :func:`_compile`).

    The kernels reach their helpers as closure variables of this function (resolved when they
    compile).
    """
    from types import SimpleNamespace

    import llvmlite.binding as llvm
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic, overload

    # No nnan/ninf (data may hold NaN/Inf: a block is checked after its first loop) and no arcp
    # (x/y must stay a correctly rounded division): the sums may be reassociated, nothing else.
    # error_model="numpy": x/0 gives inf instead of raising (a raise-check stops vectorization).
    opts = {"nogil": True, "fastmath": {"reassoc", "nsz", "contract"}, "error_model": "numpy"}

    def unary(name, src, dst, emit):
        """An intrinsic ``name``: ``src`` -> ``dst``, its LLVM code ``emit(builder, value)``."""
        def typer(typingctx, x):
            if x != src:
                return None

            def codegen(context, builder, sig, args):
                return emit(builder, args[0])
            return dst(src), codegen
        typer.__name__ = typer.__qualname__ = name
        return intrinsic(typer)

    i32, i64, f32, f64, f16 = ir.IntType(32), ir.IntType(64), ir.FloatType(), ir.DoubleType(), ir.HalfType()

    def bf16_as_f32(builder, v):  # bfloat16 bits: uint32(bits) << 16, reinterpreted
        return builder.bitcast(builder.shl(builder.zext(v, i32), ir.Constant(i32, 16)), f32)

    f64_bits = unary("f64_bits", types.float64, types.int64, lambda b, v: b.bitcast(v, i64))
    bits_f64 = unary("bits_f64", types.int64, types.float64, lambda b, v: b.bitcast(v, f64))
    f32_bits = unary("f32_bits", types.float32, types.int32, lambda b, v: b.bitcast(v, i32))
    # float32 bits held in an int64 -> float64 value
    f32bits_f64 = unary("f32bits_f64", types.int64, types.float64,
                        lambda b, v: b.fpext(b.bitcast(b.trunc(v, i32), f32), f64))
    # exact widenings of 16-bit storage: bfloat16 as uint16 bits, float16 as int16 bits
    bf16_to_f32 = unary("bf16_to_f32", types.uint16, types.float32, bf16_as_f32)
    bf16_to_f64 = unary("bf16_to_f64", types.uint16, types.float64, lambda b, v: b.fpext(bf16_as_f32(b, v), f64))
    f16_to_f32 = unary("f16_to_f32", types.int16, types.float32, lambda b, v: b.fpext(b.bitcast(v, f16), f32))
    f16_to_f64 = unary("f16_to_f64", types.int16, types.float64, lambda b, v: b.fpext(b.bitcast(v, f16), f64))

    @intrinsic
    def f32_ubits_or(typingctx, x, flag):  # float32 bits as uint32, all ones where flag
        if x != types.float32 or flag != types.boolean:
            return None

        def codegen(context, builder, sig, args):
            bits = builder.bitcast(args[0], ir.IntType(32))
            return builder.or_(bits, builder.sext(args[1], ir.IntType(32)))
        return types.uint32(types.float32, types.boolean), codegen

    @intrinsic
    def count32(typingctx, acc, flag):  # int32 acc + (1 if flag else 0), without numba's widening to int64
        if acc != types.int32 or flag != types.boolean:
            return None

        def codegen(context, builder, sig, args):
            return builder.add(args[0], builder.zext(args[1], ir.IntType(32)))
        return types.int32(types.int32, types.boolean), codegen

    @intrinsic
    def prefetch(typingctx, a, i):  # a hint: fetch the cache line of a[i] (never faults)
        if not isinstance(a, types.Array) or not isinstance(i, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = builder.gep(ary.data, [args[1]])
            i8p = ir.IntType(8).as_pointer()
            name = "llvm.prefetch.p0" if llvm.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"  # opaque pointers
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                name)
            builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.void(a, i), codegen

    def widen(a, i):  # pragma: no cover - stands for the overload below inside kernels
        raise NotImplementedError

    def stage(a, buf):  # pragma: no cover - stands for the overload below inside kernels
        raise NotImplementedError

    def bits(a, i):  # pragma: no cover - stands for the overload below inside kernels
        raise NotImplementedError

    @overload(widen)
    def _widen(a, i):
        dt = a.dtype
        if dt in (types.float32, types.float64):
            return lambda a, i: np.float64(a[i])
        if dt == types.uint16:
            return lambda a, i: bf16_to_f64(a[i])
        if dt == types.int16:
            return lambda a, i: f16_to_f64(a[i])
        return None

    @overload(bits)
    def _bits_ov(a, i):  # the storage bits of element i: equal bits <=> equal values, but for +-0
        dt = a.dtype
        if dt == types.float32:
            return lambda a, i: f32_bits(a[i])
        if dt == types.float64:
            return lambda a, i: f64_bits(a[i])
        if dt in (types.uint16, types.int16):
            return lambda a, i: a[i]
        return None

    @overload(stage)
    def _stage(a, buf):  # a block as the loops read it: 16-bit storage widened once to float32
        convert = {types.uint16: bf16_to_f32, types.int16: f16_to_f32}.get(a.dtype)
        if convert is None:
            return lambda a, buf: a

        def impl(a, buf):
            out = buf[:a.size]
            for i in range(a.size):
                out[i] = convert(a[i])
            return out
        return impl


    @njit(**opts)
    def exact_tol(bs, ts, rtol, atol):
        """float64 loop 2 over one block: bits of the maxima of |d| where |d| > rtol·|b|, of
        |d|/|b|, of |d|/|b| where |d| > atol and of |d|, and the mismatch count."""
        n_atol = 0
        max_rel = 0
        n_rtol = 0
        max_ad = 0
        mism = 0
        for i in range(bs.size):
            bv = widen(bs, i)
            ad = abs(widen(ts, i) - bv)
            ab = abs(bv)
            ad_bits = f64_bits(ad)
            max_ad = max(max_ad, ad_bits)
            thr = ab * rtol
            n_atol = max(n_atol, ad_bits if ad > thr else 0)
            lim = thr if thr > atol else atol  # noqa: FURB136 - an explicit select vectorizes
            mism += 1 if ad > lim else 0
            rel = f64_bits(ad / ab) if ad > 0.0 else 0  # ab = 0 < ad: inf, as the reference
            max_rel = max(max_rel, rel)
            n_rtol = max(n_rtol, rel if ad > atol else 0)
        return n_atol, max_rel, n_rtol, max_ad, mism

    @njit(**opts)
    def exact_one(bs, ts, which, rtol, atol):
        """One of :func:`exact_tol`'s maxima (``which``: 0 |d| where |d| > rtol·|b|, 1 |d|/|b|,
        2 |d|/|b| where |d| > atol, 3 |d|), at a fraction of its cost."""
        best = 0
        if which == 3:
            for i in range(bs.size):
                best = max(best, f64_bits(abs(widen(ts, i) - widen(bs, i))))
            return best
        ratio = which != 0
        floor = 0.0 if which == 1 else atol
        for i in range(bs.size):
            bv = widen(bs, i)
            ad = abs(widen(ts, i) - bv)
            ab = abs(bv)
            value = ad / ab if ratio else ad
            member = ad > floor if ratio else ad > ab * rtol
            best = max(best, f64_bits(value) if member else 0)
        return best

    @njit(**opts)
    def exact_chunks(bs, ts, which, rtol, atol, cmax, cutoff):
        """:func:`exact_one` over the chunks of a block whose float32 approximation (``cmax``,
        from :func:`approx_tol`) is at least ``cutoff``: the only ones that can hold the maximum."""
        best = 0
        m = bs.size
        for c in range((m + CHUNK - 1) // CHUNK):
            if f32bits_f64(np.int64(cmax[which, c])) >= cutoff:
                lo = c * CHUNK
                hi = min(lo + CHUNK, m)
                best = max(best, exact_one(bs[lo:hi], ts[lo:hi], which, rtol, atol))
        return best

    @njit(**opts)
    def ulp_chunks(bs, ts, cmax, cutoff, r, atol):
        """The reference's ``needed_rtol`` fix-up for a block whose largest ratio (over |d| > atol)
        is ``r``: :func:`needs_ulp` over the chunks that :func:`exact_chunks` settled it on (the
        elements whose ratio is r, the only ones that can need it, lie there)."""
        m = bs.size
        for c in range((m + CHUNK - 1) // CHUNK):
            if f32bits_f64(np.int64(cmax[2, c])) >= cutoff:
                lo = c * CHUNK
                if needs_ulp(bs, ts, lo, min(lo + CHUNK, m), r, atol):
                    return True
        return False

    @njit(**opts)
    def approx_tol(bs, ts, rtol_hi, rtol_lo, atol_hi, atol_lo, cmax, nb, nt):
        """float32 loop 2 over one block of float32 values (8 lanes where float64 has 4).

        Returns float32 bits of the four maxima of :func:`exact_one` (approximations, relative
        error < 2^-22), the mismatch count and the number of chunks holding an element whose
        comparisons float32 cannot decide: |d|/|b| within a relative 2^-18 of rtol
        (``rtol_lo`` < q <= ``rtol_hi``) or |d| within 2^-18 (or 2^-126) of atol (``atol_lo`` <
        |d| <= ``atol_hi``). When that is not 0, the caller runs :func:`exact_tol` instead. The
        maxima of each chunk of :data:`CHUNK` elements go to ``cmax[which, chunk]`` (for
        :func:`exact_chunks`). The undecided flag rides on max |d| (all ones, unsigned max)
        rather than in an accumulator of its own: one more spilled to the stack (-12%).

        |d| > rtol·|b| is decided on the quotient q = |d|/|b| (needed for the maxima anyway):
        for float32 data q never underflows (a nonzero |d| is at least 2^-25·|b|), so the
        float32 q is within 2^-23 of the exact one; ``b = 0`` gives q = inf (over for any
        rtol, as |d| > 0 = rtol·0) or, with ``d = 0``, NaN (over nothing, as 0 > 0 is false).
        """
        zero = np.float32(0.0)
        n_atol = np.int32(0)
        max_rel = np.int32(0)
        n_rtol = np.int32(0)
        max_ad = np.int32(0)
        unsure = 0
        mism = 0
        m = bs.size
        for c in range((m + CHUNK - 1) // CHUNK):
            lo = c * CHUNK
            hi = min(lo + CHUNK, m)
            bc = bs[lo:hi]
            tc = ts[lo:hi]
            # the next block's storage into cache meanwhile (this loop is bound by arithmetic,
            # the next block's loop 1 by memory): one hint per 64-byte line of the same range
            for j in range(lo, min(hi, nb.size), 64 // nb.itemsize):
                prefetch(nb, j)
            for j in range(lo, min(hi, nt.size), 64 // nt.itemsize):
                prefetch(nt, j)
            c_natol = np.int32(0)
            c_rel = np.int32(0)
            c_nrtol = np.int32(0)
            c_ad = np.uint32(0)  # max |d| bits; all ones when some comparison is undecided
            c_mism = np.int32(0)  # an int32 count keeps the loop 8 lanes wide
            for i in range(hi - lo):
                bv = np.float32(bc[i])
                ad = abs(np.float32(tc[i]) - bv)
                q = ad / abs(bv)
                over_thr = q > rtol_hi  # surely |d| > rtol·|b| in float64
                maybe_thr = q > rtol_lo  # possibly (never where d = 0)
                over_atol = ad > atol_hi
                maybe_atol = ad > atol_lo
                c_mism = count32(c_mism, over_thr & over_atol)
                unsure_i = (over_thr != maybe_thr) | (over_atol != maybe_atol)
                c_ad = max(c_ad, f32_ubits_or(ad, unsure_i))  # unsigned: all ones wins
                ad_bits = f32_bits(ad)
                c_natol = max(c_natol, ad_bits if maybe_thr else np.int32(0))
                rel = f32_bits(q) if ad > zero else np.int32(0)
                c_rel = max(c_rel, rel)
                c_nrtol = max(c_nrtol, rel if maybe_atol else np.int32(0))
            cmax[0, c] = c_natol
            cmax[1, c] = c_rel
            cmax[2, c] = c_nrtol
            if c_ad > np.uint32(0x7FFFFFFF):
                unsure += 1
            cmax[3, c] = np.int32(c_ad & np.uint32(0x7FFFFFFF))
            n_atol = max(n_atol, c_natol)
            max_rel = max(max_rel, c_rel)
            n_rtol = max(n_rtol, c_nrtol)
            max_ad = max(max_ad, cmax[3, c])
            mism += c_mism
        return n_atol, max_rel, n_rtol, max_ad, mism, unsure

    @njit(**opts)
    def varies(raw, m):
        """Whether the storage bits of some element of ``raw[:m]`` differ from the first's
        (chunks of 64, stopping at the first that varies: real data rarely reads past it)."""
        first = bits(raw, 0)
        for lo in range(0, m, 64):
            acc = first ^ first
            for i in range(lo, min(lo + 64, m)):
                acc |= bits(raw, i) ^ first
            if acc != 0:
                return True
        return False


    @njit(**opts)
    def blocks(b, t, first, last, n, block, rtol, atol, f32ok, fpart, ipart, running, b_buf, t_buf, cmax):
        """Partials of blocks [first, last) into rows of fpart / ipart (see the module doc);
        ``b_buf`` / ``t_buf``: float32 staging buffers of ``block`` elements (16-bit storage);
        ``cmax``: the per-chunk maxima of :func:`approx_tol`."""
        exp_mask = 0x7FF0000000000000
        f32_safe = 2.0 ** 250  # a block with sum d² below it has |d| < 2^126: no float32 overflow
        rtol_hi = np.float32(rtol * (1.0 + 2.0 ** -18))
        rtol_lo = np.float32(rtol * (1.0 - 2.0 ** -18))
        atol32 = np.float32(atol)
        atol_hi = atol32 * np.float32(1.0 + 2.0 ** -18) + np.float32(2.0 ** -126)
        atol_lo = max(atol32 * np.float32(1.0 - 2.0 ** -18) - np.float32(2.0 ** -126), np.float32(0.0))
        flagged = 0
        shrink = 1.0 - 2.0 ** -18
        f32max = 3.4028234663852886e38
        for k in range(first, last):
            lo = k * block
            hi = min(lo + block, n)
            m = hi - lo
            b_raw = b[lo:hi]  # 0-based views: no negative-index wraparound in the loops (they vectorize)
            t_raw = t[lo:hi]
            bs = stage(b_raw, b_buf)
            ts = stage(t_raw, t_buf)
            # Loop 1 (streams the data in): the sums, over the two halves of the block at once
            # (two independent chains per sum: twice the speed of one).
            s_abs = 0.0
            s_dd = 0.0
            s_bb = 0.0
            s_tt = 0.0
            s_tb = 0.0
            s_abs2 = 0.0
            s_dd2 = 0.0
            s_bb2 = 0.0
            s_tt2 = 0.0
            s_tb2 = 0.0
            h = m // 2
            for i in range(h):
                bv = widen(bs, i)
                tv = widen(ts, i)
                d = tv - bv
                s_abs += abs(d)
                s_dd += d * d
                s_bb += bv * bv
                s_tt += tv * tv
                s_tb += tv * bv
                bv = widen(bs, i + h)
                tv = widen(ts, i + h)
                d = tv - bv
                s_abs2 += abs(d)
                s_dd2 += d * d
                s_bb2 += bv * bv
                s_tt2 += tv * tv
                s_tb2 += tv * bv
            if m & 1:
                bv = widen(bs, m - 1)
                tv = widen(ts, m - 1)
                d = tv - bv
                s_abs2 += abs(d)
                s_dd2 += d * d
                s_bb2 += bv * bv
                s_tt2 += tv * tv
                s_tb2 += tv * bv
            s_abs += s_abs2
            s_dd += s_dd2
            s_bb += s_bb2
            s_tt += s_tt2
            s_tb += s_tb2
            if (f64_bits(s_bb + s_tt + s_dd) & exp_mask) == exp_mask:
                ipart[k, 0] = 1  # NaN/Inf in the block (or an overflow): recomputed with numpy
                flagged += 1
                continue
            # Loop 2 (block now in cache): max |d|, the tolerance-dependent maxima and the
            # mismatch count.
            approx = 0
            fixup = -1  # the ulp fix-up of the block's own largest ratio: -1 unknown (see ulp_fix)
            if s_abs == 0.0:  # identical block
                n_atol = 0
                max_rel = 0
                n_rtol = 0
                max_ad = 0
                mism = 0
            elif f32ok and s_dd < f32_safe:
                nxt = hi if k + 1 < last else n  # the next block of this range (else an empty slice)
                a_natol, a_rel, a_nrtol, a_ad, mism, unsure = approx_tol(bs, ts, rtol_hi, rtol_lo, atol_hi,
                                                                              atol_lo, cmax, b[nxt:min(nxt + block, n)],
                                                                              t[nxt:min(nxt + block, n)])
                if unsure:
                    n_atol, max_rel, n_rtol, max_ad, mism = exact_tol(bs, ts, rtol, atol)
                else:
                    # A maximum whose approximation is within 2^-18 of the largest so far may be
                    # a global one: settle it now in float64, while the block is in cache (only
                    # its chunks within 2^-18 of the block's approximation). Every block within
                    # 2^-18 of the final largest approximation is settled this way; the others
                    # stay approximate (bit 1 << which set in approx; which as in exact_one).
                    # running: the largest approximations seen, shared by the threads of a
                    # pair without synchronization. Only speed depends on it: settle() checks
                    # every block left approximate against the final largest approximation.
                    approx = 15
                    ipart[k, 4] = a_natol
                    ipart[k, 5] = a_rel
                    ipart[k, 6] = a_nrtol
                    ipart[k, 3] = a_ad
                    for which in range(4):
                        col = 3 if which == 3 else 4 + which
                        a = ipart[k, col]
                        run = max(running[which], a)
                        running[which] = run
                        if a == 0:
                            # no element over rtol·|b| (over atol) or no d != 0: exactly 0 (a
                            # nonzero |d| or ratio of float32 data never rounds to 0)
                            approx &= ~(1 << which)
                        elif f32bits_f64(a) >= min(f32bits_f64(run), f32max) * shrink:
                            cutoff = min(f32bits_f64(a), f32max) * shrink
                            ipart[k, col] = exact_chunks(bs, ts, which, rtol, atol, cmax, cutoff)
                            approx &= ~(1 << which)
                            if which == 2:  # the ulp fix-up too, over those chunks while in cache
                                # (else ulp_fix rescans every block tied on the largest ratio)
                                r = bits_f64(ipart[k, col])
                                fixup = 1 if ulp_chunks(bs, ts, cmax, cutoff, r, atol) else 0
                    n_atol = ipart[k, 4]
                    max_rel = ipart[k, 5]
                    n_rtol = ipart[k, 6]
                    max_ad = ipart[k, 3]
            else:
                n_atol, max_rel, n_rtol, max_ad, mism = exact_tol(bs, ts, rtol, atol)
            # Loop 3: does a side vary inside the block? (storage bits; +0/-0 by value)
            bv0 = widen(bs, 0)
            tv0 = widen(ts, 0)
            vb = varies(b_raw, m)
            vt = varies(t_raw, m)
            if vb and bv0 == 0.0 and s_bb == 0.0:  # -0.0 and 0.0 differ in bits only
                vb = False
                for i in range(m):
                    if widen(bs, i) != bv0:
                        vb = True
                        break
            if vt and tv0 == 0.0 and s_tt == 0.0:
                vt = False
                for i in range(m):
                    if widen(ts, i) != tv0:
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
            ipart[k, 15] = fixup
            ipart[k, 16] = approx
        return flagged

    @njit(nogil=True)
    def first_max(b, t, lo, hi, m):
        """First i in [lo, hi) with |t[i] - b[i]| == m (float64), or -1."""
        bs = b[lo:hi]
        ts = t[lo:hi]
        for i in range(hi - lo):
            if abs(widen(ts, i) - widen(bs, i)) == m:
                return lo + i
        return -1

    @njit(nogil=True, error_model="numpy")
    def needs_ulp(b, t, lo, hi, r, atol):
        """Whether some i in [lo, hi) has |d| > atol and r·|b| < |d| (the reference's fix-up).

        Branch-free (vectorized): blocks tied on the largest ratio may all be checked."""
        bs = b[lo:hi]
        ts = t[lo:hi]
        found = 0
        for i in range(hi - lo):
            bv = widen(bs, i)
            ad = abs(widen(ts, i) - bv)
            found = max(found, 1 if (ad > atol) & (r * abs(bv) < ad) else 0)
        return found > 0


    @njit(nogil=True)
    def settle(b, t, n, block, ipart, rtol, atol):
        """Settle in float64 any approximate maximum that could still be a global one.

        A float32 approximation (relative error < 2^-22) can be a true maximum only when within
        2^-18 of the largest approximation and, grown by 2^-21, above the largest exact value.
        :func:`blocks` settles those as it goes (this is a safety net: it finds none)."""
        f32max = 3.4028234663852886e38
        shrink = 1.0 - 2.0 ** -18
        grow = 1.0 + 2.0 ** -21
        settled = 0
        for j in range(4):
            bit = 1 << j
            col = 3 if j == 3 else 4 + j
            g = 0
            e = 0
            for k in range(ipart.shape[0]):
                if ipart[k, 1] > 0:
                    if ipart[k, 16] & bit:
                        g = max(g, ipart[k, col])
                    else:
                        e = max(e, ipart[k, col])
            if g == 0:
                continue
            limit = min(f32bits_f64(g), f32max) * shrink
            exact = bits_f64(e)
            for k in range(ipart.shape[0]):
                if ipart[k, 1] > 0 and ipart[k, 16] & bit:
                    a = f32bits_f64(ipart[k, col])
                    if a >= limit and a * grow > exact:
                        lo = k * block
                        hi = min(lo + block, n)
                        ipart[k, col] = exact_one(b[lo:hi], t[lo:hi], j, rtol, atol)
                        ipart[k, 16] &= ~bit
                        settled += 1
        return settled

    @njit(nogil=True)
    def ulp_fix(b, t, n, block, ipart, r_bits, atol):
        """The reference's ``needed_rtol`` fix-up: does some element with |d| > atol have
        r·|b| < |d|, r the largest ratio? Only elements whose ratio equals r can, and they lie
        in the blocks whose (exact) maximum equals it."""
        r = bits_f64(r_bits)
        for k in range(ipart.shape[0]):
            if ipart[k, 1] > 0 and not ipart[k, 16] & 4 and ipart[k, 6] == r_bits:
                fix = ipart[k, 15]  # known for blocks computed by numpy
                if fix < 0:
                    lo = k * block
                    fix = 1 if needs_ulp(b, t, lo, min(lo + block, n), r, atol) else 0
                if fix > 0:
                    return True
        return False

    @njit(nogil=True)
    def fold(fpart, ipart):
        """Fold the per-block partials in block order (one compiled version for every dtype)."""
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
            elif not np.isnan(v):  # a constant block: does its value differ from the others'?
                if has_b and v != b_val:
                    vary_b = True
                has_b = True
                b_val = v
            v = fpart[k, 6]
            if ipart[k, 8] != 0:
                vary_t = True
            elif not np.isnan(v):
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
                approx = ipart[k, 16]  # approximations left cannot be a maximum: left out
                if not approx & 8 and (top_row < 0 or ipart[k, 3] > top):  # first block holding the maximum
                    top = ipart[k, 3]
                    top_row = k
                if not approx & 1:
                    n_atol = max(n_atol, ipart[k, 4])
                if not approx & 2:
                    max_rel = max(max_rel, ipart[k, 5])
                if not approx & 4:
                    n_rtol = max(n_rtol, ipart[k, 6])
        return (s_abs, s_dd, s_bb, s_tt, s_tb, counted, mism, nonfinite, top, top_row, max_rel, n_atol, n_rtol,
                nan_b, inf_b, nan_t, inf_t, vary_b, vary_t, has_b and b_val == 0.0, has_t and t_val == 0.0)

    return SimpleNamespace(blocks=blocks, settle=settle, fold=fold, first_max=first_max, ulp_fix=ulp_fix)


#: numpy dtype of a kernel view -> the name of its compiled variant
_KINDS = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64", np.dtype(np.uint16): "bf16",
          np.dtype(np.int16): "f16"}
#: The five entry points compiled per dtype combination (C ABI), in object-file order.
_ENTRIES = ("blocks", "settle", "fold", "first_max", "ulp_fix")
#: External symbols of numba's runtime that the entry points reference only on paths they never take
#: (an exception, the release of an array numba allocated): bound to ``abort`` unless numba set them.
_TRAPPED = ("NRT_", "numba_")


def _numba_kernels() -> Any:
    """The numba kernels (:func:`_build`), defined once per process (imports numba)."""
    global _kernels
    if _kernels is None:
        _kernels = _build()
    return _kernels


def _compile(b_kind: str, t_kind: str) -> bytes:
    """Compile the entry points of one dtype combination with numba; returns the cache payload.

    Each entry point is a ``cfunc`` (C ABI: pointers and scalars) around a kernel of
    :func:`_build`; its optimized LLVM module is emitted as a native object file for this CPU.
    Payload: 8-byte length, a JSON header (symbol names, object sizes, external symbols), the
    objects.
    """
    import json
    import struct

    import llvmlite.binding as llvm
    from numba import carray, cfunc, types

    k = _numba_kernels()
    storage = {"f32": types.float32, "f64": types.float64, "bf16": types.uint16, "f16": types.int16}
    i64, f64 = types.int64, types.float64
    bp, tp = types.CPointer(storage[b_kind]), types.CPointer(storage[t_kind])
    pf, pi = types.CPointer(f64), types.CPointer(i64)
    ps, pc = types.CPointer(types.float32), types.CPointer(types.int32)
    nb_blocks, nb_settle, nb_fold, nb_first_max, nb_ulp_fix = k.blocks, k.settle, k.fold, k.first_max, k.ulp_fix
    opts = {"nogil": True, "error_model": "numpy"}

    @cfunc(i64(bp, tp, i64, i64, i64, i64, i64, f64, f64, i64, pf, pi, pi, i64, ps, ps, pc), **opts)
    def c_blocks(b, t, n, block, nblocks, first, last, rtol, atol, f32ok, fp, ip, run, nbuf, bbuf, tbuf, cbuf):
        return nb_blocks(carray(b, (n,)), carray(t, (n,)), first, last, n, block, rtol, atol, f32ok != 0,
                         carray(fp, (nblocks, _NF)), carray(ip, (nblocks, _NI)), carray(run, (4,)),
                         carray(bbuf, (nbuf,)), carray(tbuf, (nbuf,)), carray(cbuf, (4, -(-block // CHUNK))))

    @cfunc(i64(bp, tp, i64, i64, i64, pi, f64, f64), **opts)
    def c_settle(b, t, n, block, nblocks, ip, rtol, atol):
        return nb_settle(carray(b, (n,)), carray(t, (n,)), n, block, carray(ip, (nblocks, _NI)), rtol, atol)

    @cfunc(i64(pf, pi, i64, pf, pi), **opts)
    def c_fold(fp, ip, nblocks, out_f, out_i):
        r = nb_fold(carray(fp, (nblocks, _NF)), carray(ip, (nblocks, _NI)))
        of = carray(out_f, (5,))
        oi = carray(out_i, (16,))
        of[0], of[1], of[2], of[3], of[4] = r[0], r[1], r[2], r[3], r[4]
        oi[0], oi[1], oi[2], oi[3], oi[4], oi[5], oi[6], oi[7] = r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12]
        oi[8], oi[9], oi[10], oi[11] = r[13], r[14], r[15], r[16]
        oi[12], oi[13], oi[14], oi[15] = r[17], r[18], r[19], r[20]
        return 0

    @cfunc(i64(bp, tp, i64, i64, i64, f64), **opts)
    def c_first_max(b, t, n, lo, hi, m):
        return nb_first_max(carray(b, (n,)), carray(t, (n,)), lo, hi, m)

    @cfunc(i64(bp, tp, i64, i64, i64, pi, i64, f64), **opts)
    def c_ulp_fix(b, t, n, block, nblocks, ip, r_bits, atol):
        return 1 if nb_ulp_fix(carray(b, (n,)), carray(t, (n,)), n, block, carray(ip, (nblocks, _NI)),
                               r_bits, atol) else 0

    tm = _target_machine()
    names, objects, externals = [], [], set()
    for entry in (c_blocks, c_settle, c_fold, c_first_max, c_ulp_fix):
        module = llvm.parse_assembly(entry.inspect_llvm())
        module.verify()
        for fn in module.functions:
            if fn.is_declaration and not fn.name.startswith("llvm."):
                externals.add(fn.name)
        for var in module.global_variables:
            if var.is_declaration:
                externals.add(var.name)
        names.append(entry.native_name)
        objects.append(tm.emit_object(module))
    header = json.dumps({"names": names, "sizes": [len(o) for o in objects],
                         "externals": sorted(externals)}).encode()
    return struct.pack("<Q", len(header)) + header + b"".join(objects)


def _target_machine() -> Any:
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3,
        codemodel="jitdefault")


def _cache_dir() -> Path:
    """Where compiled objects are kept: ``$NUMBA_CACHE_DIR`` when set, else ``__pycache__`` next
    to this file when writable, else ``$XDG_CACHE_HOME/parity`` (``~/.cache/parity``)."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent / "__pycache__"
    if os.access(here if here.is_dir() else here.parent, os.W_OK):
        return here
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parity"


def _cache_key(b_kind: str, t_kind: str) -> str:
    """Hash of what the machine code depends on: this file, the numba and llvmlite installs, the CPU."""
    import hashlib
    import importlib.util
    import sys

    import llvmlite
    import llvmlite.binding as llvm

    h = hashlib.sha256(Path(__file__).read_bytes())
    spec = importlib.util.find_spec("numba")  # located, not imported
    numba_init = spec.origin if spec is not None and spec.origin else ""
    stamp = os.stat(numba_init).st_mtime_ns if numba_init else 0
    for part in (b_kind, t_kind, llvmlite.__version__, numba_init, str(stamp), sys.version,
                 llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()):
        h.update(b"\0" + str(part).encode())
    return h.hexdigest()[:24]


class _Native:
    """The entry points of one dtype combination, loaded from object code (ctypes calls: no GIL)."""

    def __init__(self, payload: bytes) -> None:
        import ctypes
        import json
        import struct

        import llvmlite.binding as llvm

        (size,) = struct.unpack_from("<Q", payload)
        header = json.loads(payload[8:8 + size])
        abort = ctypes.cast(ctypes.CDLL(None).abort, ctypes.c_void_p).value
        for name in header["externals"]:
            if name.startswith(_TRAPPED) and not llvm.address_of_symbol(name):
                llvm.add_symbol(name, abort)  # numba's own (when loaded) win: set only when missing
        tm = _target_machine()
        self._engines = []
        offset = 8 + size
        p, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        argtypes = {"blocks": (p, p, i, i, i, i, i, d, d, i, p, p, p, i, p, p, p), "settle": (p, p, i, i, i, p, d, d),
                    "fold": (p, p, i, p, p), "first_max": (p, p, i, i, i, d), "ulp_fix": (p, p, i, i, i, p, i, d)}
        for entry, name, length in zip(_ENTRIES, header["names"], header["sizes"]):
            engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
            engine.add_object_file(llvm.ObjectFileRef.from_data(payload[offset:offset + length]))
            engine.finalize_object()
            offset += length
            address = engine.get_function_address(name)
            if not address:
                raise RuntimeError(f"compiled kernel {entry} lacks its symbol")
            self._engines.append(engine)
            setattr(self, entry, ctypes.CFUNCTYPE(i, *argtypes[entry])(address))


def _load_native(b_kind: str, t_kind: str) -> _Native:
    """The entry points of a dtype combination: from the object cache, else compiled (and cached)."""
    directory = _cache_dir()
    path = directory / f"fastpath-{b_kind}-{t_kind}-{_cache_key(b_kind, t_kind)}.kernels"
    try:
        return _Native(path.read_bytes())
    except (OSError, ValueError, KeyError, RuntimeError):
        pass
    payload = _compile(b_kind, t_kind)
    native = _Native(payload)  # loads before it is cached: a payload that cannot load is not kept
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, path)
        for stale in directory.glob(f"fastpath-{b_kind}-{t_kind}-*.kernels"):  # earlier sources, CPUs
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError:
        pass
    return native


def _load(b_kind: str, t_kind: str) -> _Native | None:
    """The compiled entry points of a dtype combination, or None when they cannot be had."""
    key = (b_kind, t_kind)
    native = _natives.get(key)
    if native is None and key not in _failed:
        with _lock:
            native = _natives.get(key)
            if native is None and key not in _failed:
                try:
                    native = _natives[key] = _load_native(b_kind, t_kind)
                except Exception as exc:  # noqa: BLE001 - numba missing or broken: the numpy path is used
                    _failed[key] = exc
                    if _strict:
                        raise
                    _warn(exc)
    return native


def _warn(exc: BaseException) -> None:
    if not _warned:
        _warned.append(True)
        logging.getLogger(__name__).warning("compiled comparison failed (%s: %s); using numpy",
                                            type(exc).__name__, exc)


def available() -> bool:
    """Whether the compiled path can be used: numba and llvmlite are installed (neither is imported)."""
    global _available
    if _available is None:
        import importlib.util

        _available = all(importlib.util.find_spec(name) is not None for name in ("numba", "llvmlite"))
    return _available


def _pool(workers: int) -> Any:
    # imported here, lazily: keeps the module import cheap
    from concurrent.futures import ThreadPoolExecutor

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
        return np.ascontiguousarray(flat, dtype=np.dtype(np.float16).newbyteorder("=")).view(np.int16)
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


_INF_BITS = 0x7FF0000000000000


def _bits(x: float) -> int:
    return int(np.float64(x).view(np.int64))


def _float(bits: int) -> float:
    return float(np.int64(bits).view(np.float64))


def _run_kernels(kernels: Any, baseline: np.ndarray, b_dtype: str, target: np.ndarray, t_dtype: str,
                 bk: np.ndarray, tk: np.ndarray, rtol: float, atol: float, workers: int) -> PairMetrics:
    """Per-block partials (on threads), blocks with NaN/Inf by numpy, then the combined metrics."""
    b_flat, t_flat = baseline.reshape(-1), target.reshape(-1)
    n = b_flat.size
    # float32 pass of loop 2: for values float32 holds exactly, tolerances it holds to 2^-24
    f32ok = (bk.dtype.itemsize <= 4 and tk.dtype.itemsize <= 4
             and all(x == 0.0 or 2.0 ** -120 <= x <= 2.0 ** 120 for x in (rtol, atol)))
    nblocks = -(-n // BLOCK)
    fpart = np.empty((nblocks, _NF), np.float64)
    ipart = np.empty((nblocks, _NI), np.int64)
    running = np.zeros(4, np.int64)
    bp, tp = bk.ctypes.data, tk.ctypes.data
    fp, ip, rp = fpart.ctypes.data, ipart.ctypes.data, running.ctypes.data
    nbuf = BLOCK if min(bk.dtype.itemsize, tk.dtype.itemsize) == 2 else 0  # float32 staging of 16-bit data

    def run(first: int, last: int) -> int:
        bufs = np.empty((2, nbuf), np.float32)
        cmax = np.empty((4, -(-BLOCK // CHUNK)), np.int32)  # per-chunk float32 maxima of a block
        return kernels.blocks(bp, tp, n, BLOCK, nblocks, first, last, rtol, atol, int(f32ok), fp, ip, rp, nbuf,
                              bufs.ctypes.data, bufs.ctypes.data + 4 * nbuf, cmax.ctypes.data)

    workers = max(1, int(workers))
    if workers == 1 or n < PARALLEL_MIN or nblocks < 2:
        flagged = run(0, nblocks)
    else:
        pieces = min(nblocks, workers * PIECES_PER_WORKER)
        bounds = [nblocks * p // pieces for p in range(pieces + 1)]
        pool = _pool(workers)
        futures = [pool.submit(run, bounds[p], bounds[p + 1]) for p in range(pieces)]
        flagged = sum(future.result() for future in futures)
    if flagged:
        for k in np.flatnonzero(ipart[:, _I_FLAG] == 1):
            lo, hi = int(k) * BLOCK, min((int(k) + 1) * BLOCK, n)
            _numpy_block(b_flat[lo:hi], b_dtype, t_flat[lo:hi], t_dtype, lo, rtol, atol, fpart[k], ipart[k])
    kernels.settle(bp, tp, n, BLOCK, nblocks, ip, rtol, atol)
    out_f = np.empty(5, np.float64)
    out_i = np.empty(16, np.int64)
    kernels.fold(fp, ip, nblocks, out_f.ctypes.data, out_i.ctypes.data)
    (counted, mismatched, nonfinite, top, top_row, max_rel, n_atol, n_rtol, nan_b, inf_b, nan_t, inf_t,
     vary_b, vary_t, zero_b, zero_t) = out_i.tolist()
    max_abs, index, needed_rtol = -1.0, -1, 0.0
    if counted:
        max_abs = _float(top)
        index = int(ipart[top_row, _I_INDEX])
        if index < 0:
            lo = top_row * BLOCK
            index = kernels.first_max(bp, tp, n, lo, min(lo + BLOCK, n), max_abs)
        needed_rtol = _float(n_rtol)
        # the reference's ulp fix-up, when the ratio is finite and some |d| > atol
        if n_rtol < _INF_BITS and max_abs > atol and kernels.ulp_fix(bp, tp, n, BLOCK, nblocks, ip, n_rtol, atol):
            needed_rtol = _float(n_rtol + 1)  # the next float64 up
    return assemble_metrics(
        baseline=baseline, baseline_dtype=b_dtype, target=target, target_dtype=t_dtype,
        counted=counted, sums=tuple(out_f.tolist()), max_abs=max_abs, max_abs_at=index, max_rel=_float(max_rel),
        mismatched=mismatched + nonfinite, needed_rtol=needed_rtol, needed_atol=_float(n_atol),
        nan=(nan_b, nan_t), inf=(inf_b, inf_t), nonfinite_mismatch=nonfinite,
        all_zero=(nan_b == 0 and inf_b == 0 and not vary_b and bool(zero_b),
                  nan_t == 0 and inf_t == 0 and not vary_t and bool(zero_t)),
        varies=(bool(vary_b), bool(vary_t)))


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
    usable = n > 0 and available() and 0.0 <= rtol < math.inf and 0.0 <= atol < math.inf
    bk = _kernel_view(b_flat, baseline_dtype) if usable else None
    tk = _kernel_view(t_flat, target_dtype) if bk is not None else None
    kernels = _load(_KINDS[bk.dtype], _KINDS[tk.dtype]) if tk is not None else None
    if kernels is None:
        return pair_metrics(baseline, baseline_dtype, target, target_dtype, rtol=rtol, atol=atol)

    try:
        return _run_kernels(kernels, baseline, baseline_dtype, target, target_dtype, bk, tk, rtol, atol, workers)
    except Exception as exc:  # a kernel that fails must not stop a comparison
        if _strict:
            raise
        _warn(exc)
        return pair_metrics(baseline, baseline_dtype, target, target_dtype, rtol=rtol, atol=atol)
