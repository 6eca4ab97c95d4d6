"""The dump store must give back exactly what capture saw, and refuse anything else loudly.

User-facing behaviour protected here, on real files written by a real capture (no mocks):

- a dump round-trips: names, shapes, dtypes (float32, bfloat16, float16, int64), summary
  statistics and the tensor bytes themselves (bitwise, bfloat16 as its raw bits), records in
  execution order (step, then capture order) and per-step metadata;
- ``load_run`` refuses what is not a usable dump with a :class:`DumpError` that says why
  (missing path, a file, no manifest, no header, unknown major version, a broken manifest
  line, an unsafe data path, a duplicated record), but tolerates the one thing a crash can
  leave behind: a final manifest line cut short (it is skipped and noted);
- a corrupted data shard (truncated, bad header length, header not JSON, offsets outside the
  data or inconsistent with the shape, unknown dtype) is a :class:`CorruptDataError` when the
  data is read, never a numpy/struct/IndexError;
- the CLI turns those errors into one ``parity: error:`` line and exit code 2;
- capturing into a directory that already holds a dump never destroys it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import parity
from parity.errors import CorruptDataError, DumpError
from parity.store.format import FORMAT_VERSION, Record, RunHeader, manifest_name
from parity.store.reader import load_run
from parity.store.writer import DumpWriter

MANIFEST = manifest_name(0)


# --------------------------------------------------------------------------- a tiny model


class Cast(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


class Poke(torch.nn.Module):
    """Puts a NaN, +inf, -inf and two zeros into the (float32) activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        flat = y.view(-1)
        flat[0], flat[1], flat[2], flat[3], flat[4] = math.nan, math.inf, -math.inf, 0.0, 0.0
        return y


class ArgMax(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(x).argmax(dim=-1)  # int64


#: Leaf module name -> dtype of its output.
EXPECTED_DTYPES = {"0": "float32", "1": "float32", "2": "bfloat16", "3": "float16",
                   "4": "float32", "5": "float32", "6": "int64"}
STEP_INPUTS = [torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]), torch.tensor([[11, 12, 13]])]


def make_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(16, 4), torch.nn.Linear(4, 6), Cast(torch.bfloat16),
                               Cast(torch.float16), Cast(torch.float32), Poke(), ArgMax())


def capture_dump(out: Path) -> dict[tuple[str, int], torch.Tensor]:
    """Capture two forward passes of the tiny model into ``out``; return what the modules output."""
    model = make_model()
    seen: dict[tuple[str, int], torch.Tensor] = {}
    step = [0]

    def keep(name):
        def hook(module, args, output):
            seen[(name, step[0])] = output.detach().clone()
        return hook

    for name, module in model.named_children():
        module.register_forward_hook(keep(name))
    with torch.no_grad(), parity.capture(model, out) as session:
        for index, ids in enumerate(STEP_INPUTS):
            step[0] = index
            model(ids)
    assert session.error is None
    return seen


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A real two-step dump of the tiny model (shared: tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("store") / "dump"
    return out, capture_dump(out)


@pytest.fixture
def dump(captured, tmp_path) -> Path:
    """A private copy of the captured dump, free to corrupt."""
    copy = tmp_path / "dump"
    shutil.copytree(captured[0], copy)
    return copy


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def manifest_lines(root: Path) -> list[str]:
    return (root / MANIFEST).read_text().splitlines(keepends=True)


def write_manifest(root: Path, lines: list[str]) -> None:
    (root / MANIFEST).write_text("".join(lines))


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw storage of a tensor as numpy (bfloat16 as uint16 bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


# --------------------------------------------------------------------------- round trip


def test_round_trip_keeps_names_shapes_dtypes_and_execution_order(captured):
    root, seen = captured
    run = load_run(root)
    assert run.header.format_version == FORMAT_VERSION and run.mode == "full" and run.world_size == 1
    assert run.notes == []
    names = list(EXPECTED_DTYPES)
    assert [(r.step, r.name) for r in run.records] == [(s, n) for s in (0, 1) for n in names]
    for r in run.records:
        assert r.order == names.index(r.name)
        assert r.dtype == EXPECTED_DTYPES[r.name]
        assert r.shape == tuple(seen[(r.name, r.step)].shape)
        assert r.tags["module"] == type(make_model()[int(r.name)]).__name__
        assert r.file is not None and r.file.startswith("data/rank0/")


def test_round_trip_data_is_bitwise_identical(captured):
    root, seen = captured
    run = load_run(root)
    for r in run.records:
        tensor = seen[(r.name, r.step)]
        raw = run.raw(r)
        expected = bits(tensor)
        assert raw.dtype == expected.dtype, r.name
        assert raw.shape == expected.shape
        # bitwise: compare the bytes (NaN != NaN as values)
        assert raw.tobytes() == expected.tobytes(), (r.name, r.step)
        widened = run.array(r)
        assert widened.dtype == np.float64
        np.testing.assert_array_equal(widened, tensor.double().numpy())
    run.close()


def test_bfloat16_comes_back_as_its_uint16_bits(captured):
    root, seen = captured
    run = load_run(root)
    record = next(r for r in run.records if r.dtype == "bfloat16")
    raw = run.raw(record)
    assert raw.dtype == np.uint16
    tensor = seen[(record.name, record.step)]
    np.testing.assert_array_equal(raw, tensor.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(run.array(record, np.float32), tensor.float().numpy())


def reference_stats(t: torch.Tensor) -> dict:
    x = t.double()
    finite = x[torch.isfinite(x)]
    return {"min": float(finite.min()), "max": float(finite.max()),
            "mean": float(finite.sum()) / finite.numel(), "abs_max": float(finite.abs().max()),
            "l2": math.sqrt(float((finite * finite).sum())),
            "nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum()),
            "zero": int((x == 0).sum()), "numel": t.numel()}


def test_stats_match_torch_computations(captured):
    root, seen = captured
    run = load_run(root)
    for r in run.records:
        expected = reference_stats(seen[(r.name, r.step)])
        assert set(r.stats) == set(expected), r.name
        for key in ("nan", "inf", "zero", "numel"):
            assert r.stats[key] == expected[key], (r.name, r.step, key)
        for key in ("min", "max", "mean", "abs_max", "l2"):
            assert r.stats[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-300), (r.name, key)
    poked = next(r for r in run.records if r.name == "5" and r.step == 0)
    assert (poked.stats["nan"], poked.stats["inf"]) == (1, 2) and poked.stats["zero"] >= 2


def test_step_metadata_holds_token_ids_and_sequence_lengths(captured):
    run = load_run(captured[0])
    assert set(run.steps) == {(0, 0), (1, 0)}
    for step, ids in enumerate(STEP_INPUTS):
        tags = run.step_tags(step)
        assert tags["input_ids"] == ids.tolist()
        assert tags["seq_lens"] == [ids.shape[1]] * ids.shape[0]
    assert run.step_tags(7) == {}


def test_records_are_sorted_by_step_then_order_whatever_the_write_order(tmp_path):
    header = RunHeader(format_version="1.0")
    writer = DumpWriter(tmp_path / "d", header, durable=False)
    writer.open()
    written = [(1, 1, "b"), (1, 0, "a"), (0, 2, "z"), (0, 0, "x"), (0, 1, "y")]
    for step, order, name in written:
        tensor = torch.full((2, 3), float(10 * step + order))
        writer.add(Record(name=name, step=step, rank=0, order=order, shape=(2, 3), dtype="float32",
                          file=None, key=f"{step}/{order}/{name}", stats={}, tags={}), tensor)
        writer.flush()  # one shard per record: order in the manifest is the write order
    writer.add_step(0, {"input_ids": [[1, 2, 3]]})
    writer.close()
    writer.close()  # safe twice
    run = load_run(tmp_path / "d")
    assert [(r.step, r.order, r.name) for r in run.records] == [
        (0, 0, "x"), (0, 1, "y"), (0, 2, "z"), (1, 0, "a"), (1, 1, "b")]
    for r in run.records:
        np.testing.assert_array_equal(run.raw(r), np.full((2, 3), 10 * r.step + r.order, np.float32))
    assert len({r.file for r in run.records}) == 5
    assert run.step_tags(0) == {"input_ids": [[1, 2, 3]]}


def test_statistics_only_dump_keeps_stats_but_refuses_data(tmp_path):
    model = make_model()
    with torch.no_grad(), parity.capture(model, tmp_path / "s", mode="stats") as session:
        model(STEP_INPUTS[0])
    assert session.error is None
    run = load_run(tmp_path / "s")
    assert run.mode == "stats" and len(run.records) == len(EXPECTED_DTYPES)
    assert all(r.file is None and r.stats["numel"] > 0 for r in run.records)
    assert not (tmp_path / "s" / "data" / "rank0").exists() or not any((tmp_path / "s" / "data" / "rank0").iterdir())
    with pytest.raises(DumpError, match="statistics-only"):
        run.raw(run.records[0])


# --------------------------------------------------------------------------- load_run refusals


def test_load_run_missing_directory(tmp_path):
    with pytest.raises(DumpError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_load_run_file_instead_of_directory(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("hello")
    with pytest.raises(DumpError, match="not a directory"):
        load_run(path)


def test_load_run_directory_without_manifest(tmp_path):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(DumpError, match="not a parity dump"):
        load_run(tmp_path)


def test_load_run_first_line_not_a_header(dump):
    lines = manifest_lines(dump)
    write_manifest(dump, lines[1:])  # the header is gone: the first line is a step or record
    with pytest.raises(DumpError, match="first manifest line must be the run header"):
        load_run(dump)


def test_load_run_first_line_not_json(dump):
    lines = manifest_lines(dump)
    write_manifest(dump, ["this is not a manifest\n"] + lines[1:])
    with pytest.raises(DumpError, match=r":1: manifest line is not valid JSON"):
        load_run(dump)


def test_load_run_empty_manifest(dump):
    write_manifest(dump, [])
    with pytest.raises(DumpError, match="no header"):
        load_run(dump)


@pytest.mark.parametrize("version", ["2.0", "0.9", "abc"])
def test_load_run_unknown_major_version(dump, version):
    lines = manifest_lines(dump)
    header = json.loads(lines[0])
    header["format_version"] = version
    write_manifest(dump, [json.dumps(header) + "\n"] + lines[1:])
    with pytest.raises(DumpError, match=f"format_version|{version}") as info:
        load_run(dump)
    assert version in str(info.value)


def test_load_run_accepts_newer_minor_version(dump):
    lines = manifest_lines(dump)
    header = json.loads(lines[0])
    header["format_version"] = "1.7"
    write_manifest(dump, [json.dumps(header) + "\n"] + lines[1:])
    assert len(load_run(dump).records) == 2 * len(EXPECTED_DTYPES)


def test_load_run_middle_line_not_json(dump):
    lines = manifest_lines(dump)
    lines[3] = lines[3][: len(lines[3]) // 2] + "\n"  # cut short, but not the last line
    write_manifest(dump, lines)
    with pytest.raises(DumpError, match=r":4: manifest line is not valid JSON"):
        load_run(dump)


def test_load_run_complete_final_line_that_is_garbage_is_an_error(dump):
    write_manifest(dump, manifest_lines(dump) + ["garbage\n"])
    with pytest.raises(DumpError, match="not valid JSON"):
        load_run(dump)


def first_record_index(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "record")


@pytest.mark.parametrize("bad_path", ["../x.safetensors", "/tmp/x.safetensors",
                                      "data/../../x.safetensors", "data/rank0/shard.bin"])
def test_load_run_unsafe_data_path(dump, bad_path):
    lines = manifest_lines(dump)
    i = first_record_index(lines)
    obj = json.loads(lines[i])
    obj["file"] = bad_path
    lines[i] = json.dumps(obj) + "\n"
    write_manifest(dump, lines)
    with pytest.raises(DumpError, match="unsafe data path") as info:
        load_run(dump)
    assert bad_path in str(info.value)


@pytest.mark.parametrize("sample", ["1.0", {"a": 1}, [1.0, "NaN"], [True], [1e308 * 10], [10 ** 400], [2 ** 1024 - 1],
                                    [0.0] * 5000])
def test_malformed_stats_sample_is_refused_in_one_line(dump, sample):
    lines = manifest_lines(dump)
    i = first_record_index(lines)
    obj = json.loads(lines[i])
    obj["stats"]["sample"] = sample
    lines[i] = json.dumps(obj) + "\n"
    write_manifest(dump, lines)
    with pytest.raises(DumpError, match="stats.sample"):
        load_run(dump)
    result = run_cli("compare", str(dump), str(dump))
    assert result.returncode == 2 and "stats.sample" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_stats_sample_values_read_back_with_their_nonfinite_strings(dump):
    lines = manifest_lines(dump)
    i = first_record_index(lines)
    obj = json.loads(lines[i])
    obj["stats"]["sample"] = [1, -2.5, "nan", "inf", "-inf"]
    lines[i] = json.dumps(obj) + "\n"
    write_manifest(dump, lines)
    got = load_run(dump).records[0].stats["sample"]
    assert got[:2] == [1.0, -2.5] and math.isnan(got[2]) and got[3:] == [math.inf, -math.inf]


def test_data_file_symlinked_outside_the_dump_is_refused(dump, tmp_path):
    run = load_run(dump)
    record = run.records[0]
    shard = dump / record.file
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(CorruptDataError, match="escapes the dump directory"):
        run.raw(record)


def test_load_run_duplicate_record(dump):
    lines = manifest_lines(dump)
    i = first_record_index(lines)
    write_manifest(dump, lines + [lines[i]])
    with pytest.raises(DumpError, match="appears twice"):
        load_run(dump)


def test_final_line_cut_short_is_skipped_and_noted(dump):
    path = dump / MANIFEST
    text = path.read_bytes()
    last_start = text.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(text[: last_start + (len(text) - last_start) // 2])  # crash mid-line
    run = load_run(dump)
    assert len(run.records) == 2 * len(EXPECTED_DTYPES) - 1
    assert (run.records[-1].step, run.records[-1].name) == (1, "5")
    assert len(run.notes) == 1
    assert MANIFEST in run.notes[0] and "cut short" in run.notes[0]
    # the records before the cut are fully usable
    assert run.raw(run.records[-1]).shape == run.records[-1].shape


# --------------------------------------------------------------------------- corrupted shards


def read_shard(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_shard(path: Path, header: dict | bytes, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def float32_record(dump: Path):
    run = load_run(dump)
    record = next(r for r in run.records if r.name == "1" and r.step == 0)
    return run, record, dump / record.file


def assert_corrupt(run, record, shard: Path, match: str) -> None:
    with pytest.raises(CorruptDataError, match=match) as info:
        run.raw(record)
    assert shard.name in str(info.value)
    run.close()
    with pytest.raises(CorruptDataError):
        run.array(record)


@pytest.mark.parametrize("keep", ["half", "all_but_one_byte", "four_bytes", "header_only"])
def test_truncated_shard_is_corrupt_data(dump, keep):
    run, record, shard = float32_record(dump)
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    size = {"half": len(data) // 2, "all_but_one_byte": len(data) - 1, "four_bytes": 4,
            "header_only": 8 + n}[keep]
    shard.write_bytes(data[:size])
    assert_corrupt(run, record, shard, "corrupted data file")


def test_header_length_larger_than_file(dump):
    run, record, shard = float32_record(dump)
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    assert_corrupt(run, record, shard, "header length")


def test_huge_header_length(dump):
    run, record, shard = float32_record(dump)
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2**64 - 1) + data[8:])
    assert_corrupt(run, record, shard, "header length")


@pytest.mark.parametrize("header", [b'{"not json', b"\xff\xfe\x00garbage", b"[1, 2, 3]", b""])
def test_header_not_a_json_object(dump, header):
    run, record, shard = float32_record(dump)
    _, body = read_shard(shard)
    write_shard(shard, header, body)
    assert_corrupt(run, record, shard, "header")


def test_data_offsets_outside_data_section(dump):
    run, record, shard = float32_record(dump)
    header, body = read_shard(shard)
    nbytes = record.nbytes
    header[record.key]["data_offsets"] = [len(body) - nbytes + 8, len(body) + 8]  # right length, past the end
    write_shard(shard, header, body)
    assert_corrupt(run, record, shard, "outside")


def test_negative_or_reversed_data_offsets(dump):
    run, record, shard = float32_record(dump)
    header, body = read_shard(shard)
    begin, end = header[record.key]["data_offsets"]
    header[record.key]["data_offsets"] = [end, begin]
    write_shard(shard, header, body)
    assert_corrupt(run, record, shard, "outside")


def test_data_offsets_inconsistent_with_shape(dump):
    run, record, shard = float32_record(dump)
    header, body = read_shard(shard)
    begin, end = header[record.key]["data_offsets"]
    header[record.key]["data_offsets"] = [begin, end - 4]
    write_shard(shard, header, body)
    assert_corrupt(run, record, shard, "needs")


@pytest.mark.parametrize("entry", [{"dtype": "X99"}, {"dtype": None}, {"shape": [-1, 2]},
                                   {"shape": "2x3"}, {"data_offsets": [0]}, {"data_offsets": [0.0, 4.0]}])
def test_malformed_header_entry(dump, entry):
    run, record, shard = float32_record(dump)
    header, body = read_shard(shard)
    header[record.key].update(entry)
    write_shard(shard, header, body)
    assert_corrupt(run, record, shard, f"entry {record.key!r}")


def test_shard_dtype_disagreeing_with_manifest(dump):
    run, record, shard = float32_record(dump)
    header, body = read_shard(shard)
    header[record.key]["dtype"] = "I32"  # same size, consistent offsets, wrong type
    write_shard(shard, header, body)
    assert_corrupt(run, record, shard, "float32")


def test_tensor_missing_from_shard(dump):
    run, record, shard = float32_record(dump)
    header, body = read_shard(shard)
    del header[record.key]
    write_shard(shard, header, body)
    assert_corrupt(run, record, shard, "lacks tensor")


def test_missing_shard_file(dump):
    run, record, shard = float32_record(dump)
    shard.unlink()
    with pytest.raises(CorruptDataError, match="missing"):
        run.raw(record)


def test_other_shards_stay_readable_when_one_is_corrupt(dump):
    run, record, shard = float32_record(dump)
    shard.write_bytes(shard.read_bytes()[:100])
    other = next(r for r in run.records if r.file != record.file)
    assert run.raw(other).shape == other.shape
    with pytest.raises(CorruptDataError):
        run.raw(record)


# --------------------------------------------------------------------------- the CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("parity: error:"), lines[0]
    return lines[0]


def test_cli_compare_with_truncated_shard_exits_2_with_one_line(captured, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(captured[0], a)
    shutil.copytree(captured[0], b)
    control = run_cli("compare", str(a), str(b))  # intact copies: the command works and passes
    assert control.returncode == 0 and control.stderr == "", control.stderr
    record = load_run(b).records[0]
    shard = b / record.file
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    line = assert_one_line_error(run_cli("compare", str(a), str(b)))
    assert "corrupted data file" in line and shard.name in line


def test_cli_inspect_of_a_non_dump_directory_exits_2_with_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a dump")
    line = assert_one_line_error(run_cli("inspect", str(tmp_path)))
    assert "not a parity dump" in line


# --------------------------------------------------------------------------- never overwrite


def test_dump_writer_refuses_a_directory_holding_a_dump(dump):
    before = snapshot(dump)
    writer = DumpWriter(dump, RunHeader(format_version="1.0"), durable=False)
    with pytest.raises(DumpError, match="already"):
        writer.open()
    writer.close()
    assert snapshot(dump) == before
    assert len(load_run(dump).records) == 2 * len(EXPECTED_DTYPES)


def test_capture_into_existing_dump_turns_itself_off_and_keeps_the_old_dump(dump, caplog):
    before = snapshot(dump)
    model = make_model()
    with torch.no_grad():
        plain = model(STEP_INPUTS[0])
        with parity.capture(model, dump) as session:
            again = model(STEP_INPUTS[0])
            parity.dump("explicit", torch.ones(3))
    assert session.error is not None and "already" in session.error
    assert any("turned itself off" in m for m in caplog.messages)
    assert torch.equal(plain, again)
    assert snapshot(dump) == before
    run = load_run(dump)
    assert len(run.records) == 2 * len(EXPECTED_DTYPES) and run.notes == []


# --------------------------------------------------------------------------- checksums, verifying inspect


def _flip_data_byte(dump: Path, record) -> None:
    shard = dump / record.file
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    info_begin = json.loads(data[8:8 + n])[record.key]["data_offsets"][0]
    data[8 + n + info_begin] ^= 0x01  # the lowest mantissa bit: the value stays within any tolerance
    shard.write_bytes(bytes(data))


def test_every_stored_record_carries_a_checksum_verified_on_read(dump):
    run = load_run(dump)
    stored = [r for r in run.records if r.file is not None]
    assert stored and all(r.checksum and r.checksum.startswith("xxh3_64:") for r in stored)
    record = next(r for r in stored if r.name == "1")
    _flip_data_byte(dump, record)
    run = load_run(dump)
    with pytest.raises(CorruptDataError, match=r"record '1' step 0 .* does not match its checksum"):
        run.raw(record)
    other = next(r for r in stored if r.file == record.file and r.name != "1")
    assert run.raw(other).shape == other.shape  # the rest of the shard is still readable


def test_a_flipped_low_bit_is_an_error_not_a_pass_and_inspect_verify_finds_it(captured, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(captured[0], a)
    shutil.copytree(captured[0], b)
    record = next(r for r in load_run(b).records if r.name == "1" and r.step == 1)
    _flip_data_byte(b, record)
    line = assert_one_line_error(run_cli("compare", str(a), str(b)))
    assert "checksum" in line and "'1' step 1" in line
    shown = run_cli("inspect", str(b))  # headers only: the shard's header is intact
    assert shown.returncode == 0 and "records match their shard headers" in shown.stdout, shown.stderr
    line = assert_one_line_error(run_cli("inspect", "--verify", str(b)))
    assert "checksum" in line
    intact = run_cli("inspect", "--verify", str(a))
    assert intact.returncode == 0 and re.search(r"(\d+) records read, \1 checksums match", intact.stdout)


def test_inspect_validates_shard_headers_by_default(dump):
    record = load_run(dump).records[0]
    shard = dump / record.file
    shard.write_bytes(shard.read_bytes()[:-3])
    line = assert_one_line_error(run_cli("inspect", str(dump)))
    assert "corrupted data file" in line and shard.name in line


def test_dumps_before_checksums_still_read_and_say_they_are_unverified(dump):
    lines = []
    for line in manifest_lines(dump):
        obj = json.loads(line)
        obj.pop("checksum", None)
        if obj["type"] == "header":
            obj["format_version"] = "1.2"
        lines.append(json.dumps(obj) + "\n")
    write_manifest(dump, lines)
    shown = run_cli("inspect", "--verify", str(dump))
    assert shown.returncode == 0, shown.stderr
    assert "carry no checksum (written before format 1.3)" in shown.stdout
    # a current-format record without its checksum is an edited or corrupted manifest
    lines[0] = lines[0].replace('"1.2"', f'"{FORMAT_VERSION}"')
    write_manifest(dump, lines)
    with pytest.raises(DumpError, match="has no checksum"):
        load_run(dump)


def test_a_header_claiming_a_huge_world_is_refused_before_any_work(dump):
    lines = manifest_lines(dump)
    header = json.loads(lines[0])
    header["world_size"] = 2**40
    lines[0] = json.dumps(header) + "\n"
    write_manifest(dump, lines)
    with pytest.raises(DumpError, match="world_size 1099511627776 is beyond"):
        load_run(dump)


# --------------------------------------------------------------------------- hostile names and files


HOSTILE_NAMES = ["\x1b[31mred\x1b[0m", "[bold red]x[/]", "[link=file:///etc/passwd]y[/link]", "[/]", "z\ud800",
                 "</script><script>alert(1)</script>", "bell\x07|`pipe`"]


def test_names_from_a_dump_are_shown_as_written_in_every_output(dump, tmp_path):
    """Markup, escape sequences, lone surrogates and script tags in record names act nowhere."""
    lines = manifest_lines(dump)
    renamed = 0
    for i, line in enumerate(lines):
        obj = json.loads(line)
        if obj["type"] == "record" and obj["step"] == 0 and renamed < len(HOSTILE_NAMES):
            obj["name"] = HOSTILE_NAMES[renamed]
            renamed += 1
            lines[i] = json.dumps(obj) + "\n"
    write_manifest(dump, lines)
    outputs = {k: tmp_path / f"r.{k}" for k in ("html", "md", "xml", "json")}
    result = subprocess.run([sys.executable, "-m", "parity.cli", "compare", str(dump), str(dump), "--all",
                             "--html", str(outputs["html"]), "--markdown", str(outputs["md"]),
                             "--junit", str(outputs["xml"]), "--json", str(outputs["json"])],
                            capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode("utf-8")  # strict: no lone surrogate reached the stream
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[31mred\\x1b[0m" in out and "[bold red]x[/]" in out and "[link=file:///etc/passwd]y[/link]" in out
    assert "z\\ud800" in out
    page = outputs["html"].read_text(encoding="utf-8")
    assert "<script>alert(1)" not in page and "\x1b" not in page
    markdown = outputs["md"].read_text(encoding="utf-8")
    assert "\x1b" not in markdown and "\x07" not in markdown
    import xml.etree.ElementTree as ET
    ET.parse(outputs["xml"])  # well-formed XML despite the control characters
    shown = subprocess.run([sys.executable, "-m", "parity.cli", "inspect", str(dump)], capture_output=True,
                           timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert shown.returncode == 0 and b"\x1b" not in shown.stdout and b"[/]" in shown.stdout, shown.stderr.decode()


@pytest.mark.parametrize("hostile", ["9" * 5000, "[" * 50000 + "]" * 50000])
def test_huge_numbers_and_deep_nesting_in_a_manifest_are_one_error(dump, hostile):
    lines = manifest_lines(dump)
    lines[1] = lines[1].replace('"step":', f'"extra": {hostile}, "step":', 1).replace('"step": ', f'"extra": {hostile}, "step": ', 1)
    write_manifest(dump, lines)
    line = assert_one_line_error(run_cli("inspect", str(dump)))
    assert "not valid JSON" in line


@pytest.mark.parametrize("what", ["outside", "fifo", "device"])
def test_a_manifest_that_is_not_a_regular_file_inside_the_dump_is_refused(dump, tmp_path, what):
    manifest = dump / MANIFEST
    outside = tmp_path / "elsewhere.jsonl"
    shutil.move(manifest, outside)
    if what == "outside":
        manifest.symlink_to(outside)
    elif what == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to("/dev/zero")
    line = assert_one_line_error(run_cli("inspect", str(dump)))
    assert "manifest" in line and ("outside" in line or "regular file" in line)


def test_salvage_reads_what_is_valid_and_lists_what_is_not(captured, tmp_path):
    """One bad manifest line and one corrupted tensor do not hide the good records."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(captured[0], a)
    shutil.copytree(captured[0], b)
    lines = manifest_lines(b)
    bad = next(i for i, line in enumerate(lines) if '"name": "4"' in line or '"name":"4"' in line)
    lines[bad] = lines[bad][: len(lines[bad]) // 2] + "\n"  # a line cut in the middle of the manifest
    write_manifest(b, lines)
    flipped = next(r for r in load_run(b, salvage=True).records if r.name == "1" and r.step == 0)
    _flip_data_byte(b, flipped)
    assert_one_line_error(run_cli("compare", str(a), str(b)))  # without salvage: refused, one line
    result = run_cli("compare", str(a), str(b), "--salvage", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 1, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    by_outcome = {}
    for pair in report["pairs"]:
        by_outcome.setdefault(pair["outcome"], []).append((pair["name"], pair["step"]))
    assert by_outcome["corrupt"] == [("1", 0)]
    assert ("4", 0) in by_outcome["missing_in_target"]  # the skipped line's record
    assert len(by_outcome["identical"]) == 2 * len(EXPECTED_DTYPES) - 2
    assert any("salvage: 1 manifest line(s) skipped" in n for n in report["target"]["notes"])
    shown = run_cli("inspect", "--verify", "--salvage", str(b))
    assert shown.returncode == 1, shown.stderr
    invalid = [line for line in shown.stdout.splitlines() if line.startswith("invalid:")]
    assert len(invalid) == 2 and any("not valid JSON" in line for line in invalid)
    assert any("'1' step 0" in line and "checksum" in line for line in invalid)
