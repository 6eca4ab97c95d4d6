"""Capture that does not stall the GPU (issue 18): the device path and its CPU fallback.

Real torch and the real tiny model throughout; nothing is mocked. On a machine without CUDA the
pool runs with an ordinary (unpinned) allocator, which exercises the same bookkeeping; the
tests marked ``cuda`` run the pinned, asynchronous path itself and skip elsewhere.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

import parity
from parity.capturing.device_copy import (
    MIN_BUFFER,
    DeviceCopier,
    PendingStats,
    PendingTensor,
    PinnedPool,
    bucket_bytes,
)
from parity.capturing.stats import SUM_CHUNK, sample_values, stats_from_vector, stats_vector, tensor_stats
from parity.store.format import sample_positions

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cpu_buffer(nbytes: int) -> torch.Tensor:
    """An ordinary host buffer: the pool's bookkeeping is the same as with pinned ones."""
    return torch.empty(nbytes, dtype=torch.uint8)


def _same(a: dict, b: dict) -> bool:
    """Equal dictionaries of statistics, NaN equal to NaN, -0.0 told from 0.0 (as the manifest writes them)."""
    return json.dumps(a) == json.dumps(b)


def _reference(t: torch.Tensor, k: int) -> dict:
    """What the writer thread computes for a CPU copy (the path before issue 18)."""
    stats = tensor_stats(t)
    if k:
        stats["sample"] = sample_values(t, k)
    return stats


def _device_stats(t: torch.Tensor, k: int) -> dict:
    index = torch.tensor(sample_positions(t.numel(), k), dtype=torch.int64, device=t.device) if k else None
    vector, layout = stats_vector(t, index)
    return stats_from_vector(vector.tolist(), layout)


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    with_nonfinite = torch.randn(3 * SUM_CHUNK + 11, generator=g)
    with_nonfinite[::997] = float("nan")
    with_nonfinite[5::1231] = float("inf")
    with_nonfinite[7::1409] = -float("inf")
    zeros_signed = torch.tensor([0.0, -0.0, 1.5, -0.0, float("nan"), 0.0])
    return [
        ("float32", torch.randn(4, 64, 128, generator=g)),
        ("float32 multi-chunk", torch.randn(2 * SUM_CHUNK + 5, generator=g) * 1e3),
        ("bfloat16 multi-chunk", torch.randn(SUM_CHUNK + 3, generator=g).to(torch.bfloat16)),
        ("float16", torch.randn(333, generator=g).to(torch.float16)),
        ("float64", torch.randn(1000, generator=g, dtype=torch.float64)),
        ("non-contiguous", torch.randn(64, 48, generator=g).t()),
        ("0-d", torch.tensor(2.5)),
        ("one element", torch.tensor([-7.0])),
        ("NaN and Inf", with_nonfinite),
        ("signed zeros and NaN", zeros_signed),
        ("all NaN", torch.full((10,), float("nan"))),
        ("only infinities", torch.tensor([float("inf"), -float("inf")])),
        ("all zero", torch.zeros(17)),
        ("int64", torch.randint(-1000, 1000, (5000,), generator=g)),
        ("int64 beyond 2^53", torch.tensor([2**60 + 1, -(2**55) - 3, 7])),
        ("int8", torch.randint(-128, 127, (300,), generator=g, dtype=torch.int8)),
        ("uint8", torch.randint(0, 255, (300,), generator=g, dtype=torch.uint8)),
        ("bool", torch.randint(0, 2, (77,), generator=g).bool()),
        ("empty", torch.zeros(0, 4)),
    ]


@pytest.mark.parametrize("k", [0, 32])
@pytest.mark.parametrize("label,t", _tensors(), ids=[label for label, _ in _tensors()])
def test_device_statistics_equal_tensor_stats_bit_for_bit(label, t, k):
    assert _same(_device_stats(t, k), _reference(t, k)), label


def test_statistics_of_nonfinite_tensors_count_and_skip_them():
    t = torch.tensor([1.0, float("nan"), -float("inf"), -3.0, 0.0, float("inf")])
    stats = _device_stats(t, 0)
    assert (stats["nan"], stats["inf"], stats["zero"], stats["numel"]) == (1, 2, 1, 6)
    assert (stats["min"], stats["max"], stats["abs_max"]) == (-3.0, 1.0, 3.0)
    assert stats["mean"] == pytest.approx(-2.0 / 3.0) and stats["l2"] == pytest.approx(10**0.5)
    assert _same(_device_stats(torch.full((4,), float("nan")), 0),
                 {"min": None, "max": None, "mean": None, "abs_max": None, "l2": None, "nan": 4, "inf": 0,
                  "zero": 0, "numel": 4})


def test_stats_vector_never_changes_its_input():
    t = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    before = t.clone()
    stats_vector(t, torch.tensor([0, 3]))
    assert torch.equal(t.isnan(), before.isnan()) and torch.equal(t.nan_to_num(), before.nan_to_num())


# ------------------------------------------------------------------ the pool's bookkeeping
def test_buckets_are_powers_of_two_from_the_minimum():
    assert bucket_bytes(0) == bucket_bytes(1) == bucket_bytes(MIN_BUFFER) == MIN_BUFFER
    assert bucket_bytes(MIN_BUFFER + 1) == 2 * MIN_BUFFER
    assert bucket_bytes(4 << 20) == 4 << 20 and bucket_bytes((4 << 20) + 1) == 8 << 20


def test_pool_reuses_released_buffers_of_the_same_bucket():
    pool = PinnedPool(1 << 20, allocate=_cpu_buffer)
    a = pool.acquire(1000)
    assert a is not None and a.numel() == 1024 and pool.in_use_bytes == pool.held_bytes == 1024
    pool.release(a)
    assert pool.in_use_bytes == 0 and pool.held_bytes == 1024
    b = pool.acquire(700)  # same bucket (1024): the same buffer back
    assert b is a and (pool.allocations, pool.reuses) == (1, 1)
    c = pool.acquire(1000)  # a is in use: a new one
    assert c is not None and c is not a and pool.allocations == 2 and pool.held_bytes == 2048


def test_pool_never_holds_more_than_its_cap_and_refuses_when_full():
    pool = PinnedPool(4096, allocate=_cpu_buffer)
    held = [pool.acquire(1024) for _ in range(4)]
    assert all(b is not None for b in held) and pool.held_bytes == 4096
    assert pool.acquire(1) is None and pool.refusals == 1  # every buffer in use: refused, nothing made
    assert pool.acquire(8192) is None  # larger than the cap: never
    assert pool.held_bytes == pool.peak_bytes == 4096
    pool.release(held.pop())
    assert pool.acquire(1000) is not None and pool.held_bytes == 4096


def test_pool_drops_free_buffers_of_other_sizes_least_recently_used_first():
    pool = PinnedPool(4096, allocate=_cpu_buffer)
    small, medium = pool.acquire(512), pool.acquire(1024)
    pool.release(small)
    pool.release(medium)  # free: 512 (older), 1024 (newer); held 1536
    big = pool.acquire(3000)  # bucket 4096: needs both gone
    assert big is not None and big.numel() == 4096 and pool.dropped == 2 and pool.held_bytes == 4096
    pool.release(big)
    tiny = pool.acquire(100)  # bucket 512: the free 4096 is dropped to make room
    assert tiny is not None and pool.dropped == 3 and pool.held_bytes == 512
    pool.release(tiny)
    pool.clear()
    assert pool.held_bytes == 0 and pool.in_use_bytes == 0


def test_pool_buffers_made_under_inference_mode_take_copies_outside_it_later():
    pool = PinnedPool(1 << 20, allocate=_cpu_buffer)
    with torch.inference_mode():
        buffer = pool.acquire(64)
    assert not buffer.is_inference()
    pool.release(buffer)
    again = pool.acquire(64)  # the next session may run without inference_mode
    again[:16].view(torch.float32).copy_(torch.arange(4.0))
    assert again is buffer


def test_pool_forgets_a_buffer_without_reusing_it():
    pool = PinnedPool(4096, allocate=_cpu_buffer)
    buffer = pool.acquire(1024)
    pool.forget(buffer)  # a copy into it may still be in flight
    assert pool.held_bytes == pool.in_use_bytes == 0
    assert pool.acquire(1024) is not buffer


def test_pool_that_cannot_allocate_says_why_and_refuses_from_then_on():
    calls = []

    def failing(nbytes: int) -> torch.Tensor:
        calls.append(nbytes)
        raise RuntimeError("no pinned memory here")

    pool = PinnedPool(1 << 20, allocate=failing)
    assert pool.acquire(100) is None and pool.acquire(100) is None
    assert calls == [512] and "no pinned memory here" in pool.problem
    assert pool.held_bytes == pool.in_use_bytes == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_default_pinned_allocator_is_refused_cleanly_without_cuda():
    pool = PinnedPool(1 << 20)
    assert pool.acquire(4096) is None and pool.problem is not None and pool.held_bytes == 0


def test_pool_bookkeeping_holds_under_two_threads():
    pool = PinnedPool(64 * 1024, allocate=_cpu_buffer)
    errors = []

    def churn(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        mine = []
        for _ in range(2000):
            if mine and int(torch.randint(0, 2, (1,), generator=g)):
                pool.release(mine.pop())
            else:
                buffer = pool.acquire(int(torch.randint(1, 16 * 1024, (1,), generator=g)))
                if buffer is not None:
                    mine.append(buffer)
            if pool.held_bytes > pool.cap_bytes:
                errors.append(pool.held_bytes)
        for buffer in mine:
            pool.release(buffer)

    threads = [threading.Thread(target=churn, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and pool.in_use_bytes == 0 and pool.peak_bytes <= pool.cap_bytes
    assert pool.reuses > 0


# ------------------------------------------------------------------ the writer side, on the host
def test_pending_tensor_gives_an_unpinned_copy_and_hands_its_buffer_back():
    pool = PinnedPool(1 << 20, allocate=_cpu_buffer)
    source = torch.randn(3, 5, 7)
    nbytes = source.numel() * source.element_size()
    buffer = pool.acquire(nbytes)
    host = buffer[:nbytes].view(source.dtype).view(source.shape)
    host.copy_(source)
    got = PendingTensor(None, host, buffer, pool, None).result()
    assert torch.equal(got, source) and got.is_contiguous()
    assert got.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()  # not the pool's memory
    assert pool.in_use_bytes == 0 and pool.acquire(nbytes) is buffer


def test_pending_stats_resolve_on_the_host_and_hand_their_buffer_back():
    pool = PinnedPool(1 << 20, allocate=_cpu_buffer)
    t = torch.randn(1000)
    t[3] = float("nan")
    vector, layout = stats_vector(t, torch.tensor(sample_positions(t.numel(), 8)))
    buffer = pool.acquire(vector.numel() * 8)
    host = buffer[:vector.numel() * 8].view(torch.float64)
    host.copy_(vector)
    pending = PendingStats(None, host, buffer, pool, (None, vector), layout)
    assert pending.held_bytes == MIN_BUFFER + vector.numel() * 8  # what it counts against max_pending_bytes
    assert _same(pending.result(), _reference(t, 8))
    assert pool.in_use_bytes == 0
    buffer = pool.acquire(8)
    PendingStats(None, buffer.view(torch.float64)[:0], buffer, pool, None, layout).discard()
    assert pool.in_use_bytes == 0


def test_copier_falls_back_to_a_synchronous_copy_off_cuda():
    copier = DeviceCopier(1 << 20)
    source = torch.randn(16, 8).t()  # non-contiguous
    copy = copier.start_copy(source)
    assert isinstance(copy, torch.Tensor) and torch.equal(copy, source) and copy.is_contiguous()
    assert copy.data_ptr() != source.data_ptr()
    assert isinstance(copier.start_stats(source, 32), torch.Tensor)  # stats then come from that copy
    assert copier.counts == {"async": 0, "sync": 2} and copier.pool.allocations == 0


# ------------------------------------------------------------------ whole captures, on the CPU
def _manifest_stats(dump) -> dict[str, dict]:
    """Each record's ``stats`` as the manifest holds them."""
    lines = [json.loads(line) for line in (dump / "manifest-rank0.jsonl").read_text().splitlines()]
    return {line["name"]: line["stats"] for line in lines if line.get("type") == "record"}


TAPS = ["**.input_layernorm", "**.layers.*.mlp", "model.norm", "lm_head"]


def _expected_outputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each tapped module's output, cloned by a plain forward hook (what a copy must hold)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.detach().clone()))
               for name, module in model.named_modules()
               if name.endswith(("input_layernorm", ".mlp")) or name in ("model.norm", "lm_head")]
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("mode", ["full", "stats"])
def test_capture_of_the_tiny_model_stores_exactly_the_records_of_the_cpu_path(fp32_model, prompts, tmp_path, mode):
    """The records of a CPU capture are what the copy path before issue 18 stored: each output's
    bytes (full mode) and ``tensor_stats`` (+ sample in stats mode) of that output, bit for bit."""
    from parity.store.reader import load_run

    model = fp32_model.model
    ids = fp32_model.tokenizer(prompts[0], return_tensors="pt").input_ids
    expected = _expected_outputs(model, ids)
    with torch.inference_mode():
        plain = model(input_ids=ids).logits.clone()
        with parity.capture(model, tmp_path / mode, taps=TAPS, mode=mode) as session:
            captured = model(input_ids=ids).logits.clone()
    assert session.error is None and torch.equal(plain, captured)
    assert session.device_copies["async"] == session.device_copies["sync"] == 0  # CPU tensors: cloned as before
    run = load_run(tmp_path / mode)
    assert sorted(r.name for r in run.records) == sorted(expected)
    stored_stats = _manifest_stats(tmp_path / mode)
    k = session.sample
    for record in run.records:
        value = expected[record.name]
        assert stored_stats[record.name] == json.loads(json.dumps(_reference(value, k))), record.name
        if mode == "full":
            assert torch.equal(torch.from_numpy(run.raw(record).copy()), value), record.name
        else:
            assert record.file is None


# ------------------------------------------------------------------ on a CUDA device
@cuda
def test_cuda_copy_is_asynchronous_pinned_and_exact():
    copier = DeviceCopier(64 << 20)
    x = torch.randn(256, 1024, device="cuda")
    pending = copier.start_copy(x.t())  # non-contiguous source
    assert isinstance(pending, PendingTensor)
    got = pending.result()
    assert got.device.type == "cpu" and not got.is_pinned() and torch.equal(got, x.t().cpu())
    assert copier.counts["async"] == 1 and copier.pool.in_use_bytes == 0
    again = copier.start_copy(x)
    assert torch.equal(again.result(), x.cpu()) and copier.pool.reuses >= 1


@cuda
def test_cuda_copy_holds_the_value_at_the_hook_even_when_it_is_overwritten_or_freed():
    copier = DeviceCopier(64 << 20)
    x = torch.randn(1 << 20, device="cuda")
    expected = x.cpu()
    pending = copier.start_copy(x)
    x.mul_(2)  # in place on the same stream, after the copy was queued
    del x
    junk = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(4)]  # memory reuse
    assert torch.equal(pending.result(), expected)
    del junk


@cuda
def test_cuda_copies_and_statistics_never_synchronize_the_host():
    copier = DeviceCopier(64 << 20)
    x = torch.randn(64, 1024, device="cuda")
    copier.start_stats(x, 32).result()  # first use: pool buffers and the sample index exist
    copier.start_copy(x).result()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call in the hook's path raises
    try:
        with torch.inference_mode():
            pending = [copier.start_copy(x), copier.start_stats(x, 32), copier.start_stats(x.to(torch.bfloat16), 0)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(isinstance(p, (PendingTensor, PendingStats)) for p in pending)
    assert torch.equal(pending[0].result(), x.cpu()) and pending[1].result()["numel"] == x.numel()
    pending[2].result()


@cuda
def test_cuda_pool_cap_reached_falls_back_to_a_synchronous_copy():
    copier = DeviceCopier(1 << 20)
    x = torch.randn(1 << 18, device="cuda")  # 1 MiB: fills the pool
    first = copier.start_copy(x)
    second = copier.start_copy(x)  # no room while the first is in flight
    assert isinstance(first, PendingTensor) and isinstance(second, torch.Tensor)
    assert torch.equal(first.result(), second) and copier.counts == {"async": 1, "sync": 1}


@cuda
@pytest.mark.parametrize("label,t", _tensors(), ids=[label for label, _ in _tensors()])
def test_cuda_statistics_match_the_cpu_ones(label, t):
    copier = DeviceCopier(64 << 20)
    pending = copier.start_stats(t.to("cuda"), 32)
    got = pending.result() if isinstance(pending, PendingStats) else None
    want = _reference(t, 32)
    assert got is not None
    for key in ("nan", "inf", "zero", "numel", "min", "max", "abs_max", "sample"):
        assert json.dumps(got[key]) == json.dumps(want[key]), (label, key)
    for key in ("mean", "l2"):  # float64 sums in another order: equal to float64 rounding
        assert (got[key] is None) == (want[key] is None), (label, key)
        if want[key] is not None:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-300), (label, key)


@cuda
@pytest.mark.parametrize("mode", ["full", "stats"])
def test_cuda_capture_of_the_tiny_model_leaves_outputs_unchanged_and_records_them(tiny_model_dir, prompts, tmp_path,
                                                                                  mode):
    from parity.backends.hf import load
    from parity.backends.spec import parse_spec
    from parity.store.reader import load_run

    loaded = load(tiny_model_dir, parse_spec("device=cuda,dtype=float32,attn=eager"))
    model = loaded.model
    ids = loaded.tokenizer(prompts[0], return_tensors="pt").input_ids.to("cuda")
    expected = {name: t.cpu() for name, t in _expected_outputs(model, ids).items()}
    with torch.inference_mode():
        plain = model(input_ids=ids).logits.clone()
        with parity.capture(model, tmp_path / mode, taps=TAPS, mode=mode) as session:
            captured = model(input_ids=ids).logits.clone()
    assert session.error is None and torch.equal(plain, captured)
    assert session.device_copies["async"] == len(expected) and session.device_copies["sync"] == 0
    run = load_run(tmp_path / mode)
    stored_stats = _manifest_stats(tmp_path / mode)
    assert sorted(stored_stats) == sorted(expected)
    for record in run.records:
        value, stats = expected[record.name], stored_stats[record.name]
        if mode == "full":  # the bytes, and statistics computed on the host from them
            assert torch.equal(torch.from_numpy(run.raw(record).copy()), value), record.name
            assert stats == json.loads(json.dumps(tensor_stats(value))), record.name
        else:  # statistics computed on the device
            want = _reference(value, session.sample)
            assert [stats[k] for k in ("numel", "nan", "inf", "zero", "min", "max")] == \
                [want[k] for k in ("numel", "nan", "inf", "zero", "min", "max")], record.name
            assert stats["l2"] == pytest.approx(want["l2"], rel=1e-12) and stats["sample"] == want["sample"]
