"""Fuzz the importers (SGLang dumper, msProbe, ``--map`` files) with hostile mutants of real dumps.

    python scripts/fuzz_imports.py [--cases 1000] [--seed 0] [--keep DIR]

The fixtures in ``tests/fixtures/imported/`` (written by the real tools) are the pristine
dumps; each is also converted once to a parity dump (``parity convert``). Each case copies one
fixture and applies one seeded mutation:

- tensor files (``.pt``, and ``.npy`` put in place of a msProbe ``.pt``): truncated, a flipped
  byte, replaced by garbage, by a valid pickle of something else (a deep list, a dict, a plain
  pickle, a pickle that would run code), by a zip with odd members, by a ``.npy`` whose header
  declares a huge shape or an unusual dtype, by a tensor whose view is far larger than its
  storage;
- ``dump.json`` / ``stack.json`` / ``construct.json``: wrong types, missing keys, deep nesting,
  huge numbers, NaN, shapes that disagree with the data, names with control characters, bidi
  marks and lone surrogates, thousands of entries;
- SGLang file names: odd, empty or duplicated keys, negative or huge step / rank /
  dump_index, names with ``..``, control characters or bytes that are not UTF-8;
- the file system: symlinks out of the folder, FIFOs, directories in place of files;
- ``--map`` files: YAML anchor/alias bombs, deep nesting, wrong types, a FIFO.

Commands per case, in this process (strict UTF-8 streams, an alarm of :data:`CASE_SECONDS`):
``parity compare PRISTINE MUTANT``, ``parity compare CONVERTED MUTANT``, ``parity inspect
MUTANT`` and ``parity convert MUTANT OUT``, and outside quick runs ``parity compare --salvage`` and
``parity convert --salvage`` (``--map`` cases: ``parity compare --map FILE``).

A case is **handled** when every command exits 0 or 1, or exits 2 with one ``error:`` line on
stderr. It **fails** on a traceback, an ``internal error``, another exit code, a hang, a
mutant that must be refused (an unreadable or unsafe tensor file, a shape that disagrees with
its data) but is not (exit 0/1: a silent pass), and on code from a pickle having run.
:func:`run_fuzz` is what ``tests/test_fuzz_imports.py`` calls with a small, fixed budget.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import pickle
import random
import shutil
import struct
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "tests" / "fixtures" / "imported"
#: The pristine dumps (fixture folder names).
BASES = ("sglang-llama", "sglang-tp1", "sglang-tp2", "msprobe-tensor", "msprobe-stats")
#: Seconds one command may take on one mutant before the case counts as a hang (default 30).
CASE_SECONDS = 30
#: Quick runs (the test suite's): "thousands of entries" mutants hold a tenth as many (a
#: ``--map`` file of 20,000 entries is JSON, not YAML).
QUICK = False


def _fuzz_dumps():
    """scripts/fuzz_dumps.py, for its in-process CLI runner (one harness for both fuzzers)."""
    if "fuzz_dumps" in sys.modules:
        return sys.modules["fuzz_dumps"]
    spec = importlib.util.spec_from_file_location("fuzz_dumps", HERE / "fuzz_dumps.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["fuzz_dumps"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@dataclass
class Mutant:
    kind: str
    detail: str
    must_refuse: bool = False      # every command must exit 2 (a file no reader may accept)
    map_file: Path | None = None   # --map cases: the mapping file
    marker: Path | None = None     # a file a pickle payload would create if it ran
    align: bool = False            # also run compare --align tokens


@dataclass
class CaseResult:
    base: str
    mutant: Mutant
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- helpers

CONTROL_NAMES = ["a\nb", "\x1b[31mred\x1b[0m", "\u202eevil", "\ud800", "x" * 3000, "", "..", "../../etc/passwd",
                 "[bold]m[/bold]", "a\x00b", "\x07\x9b", "名前"]
HUGE_NUMBERS = [10**30, -(10**30), 2**63, -1, 1e308, float("nan"), float("inf"), "7", None, True, [], {}]


def _tensor_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix in (".pt", ".npy") and p.is_file())


def _sglang_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.pt"))


def _dump_jsons(path: Path) -> list[Path]:
    return sorted(path.rglob("dump.json"))


def _torch_bytes(obj: object) -> bytes:
    import torch

    buffer = io.BytesIO()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # deep lists are one of the mutants
    try:
        torch.save(obj, buffer)
    finally:
        sys.setrecursionlimit(limit)
    return buffer.getvalue()


class _Payload:
    """A pickle that would create ``marker`` when loaded by an unrestricted unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.marker}",))


def _deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _npy(shape_text: str, dtype: str, body: bytes, fortran: bool = False) -> bytes:
    header = f"{{'descr': '{dtype}', 'fortran_order': {fortran}, 'shape': {shape_text}, }}"
    header += " " * ((64 - (len(header) + 11) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + body


# --------------------------------------------------------------------------- mutations of tensor files


def _truncate(path: Path, rng: random.Random) -> Mutant:
    file = rng.choice(_tensor_files(path))
    data = file.read_bytes()
    size = rng.randrange(0, len(data))
    file.write_bytes(data[:size])
    return Mutant("tensor file truncated", f"{file.name} to {size}/{len(data)}", must_refuse=True)


def _flip(path: Path, rng: random.Random) -> Mutant:
    file = rng.choice(_tensor_files(path))
    data = bytearray(file.read_bytes())
    where = rng.randrange(len(data))
    data[where] ^= rng.choice([1, 2, 4, 8, 16, 32, 64, 128, 255])
    file.write_bytes(bytes(data))
    return Mutant("tensor file byte flip", f"{file.name}@{where}")


def _garbage(path: Path, rng: random.Random) -> Mutant:
    file = rng.choice(_tensor_files(path))
    choice = rng.choice(["random", "empty", "zeros", "text", "npy magic", "zip magic"])
    body = {"random": bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000))), "empty": b"",
            "zeros": b"\x00" * 4096, "text": b"not a tensor\n", "npy magic": b"\x93NUMPY\x01\x00\xff\xff{",
            "zip magic": b"PK\x03\x04" + b"\x00" * 40}[choice]
    file.write_bytes(body)
    return Mutant("tensor file garbage", f"{file.name}: {choice}", must_refuse=True)


def _pickle(path: Path, rng: random.Random) -> Mutant:
    import torch

    file = rng.choice(_tensor_files(path))
    sglang = "___" in file.name
    choice = rng.choice(["deep list", "dict", "int", "string", "plain pickle", "payload", "value deep",
                         "value huge view", "huge view", "meta odd", "list of tensors", "bool tensor",
                         "complex tensor", "sparse", "17 dims", "empty tensor"])
    marker = path.parent / f"{path.name}-PWNED"
    must_refuse = False
    if choice == "deep list":
        obj: object = _deep_list(rng.choice([50, 900, 5000]))
    elif choice == "dict":
        obj = {"a": 1, "value": None} if rng.random() < 0.5 else {"x": torch.zeros(3)}
    elif choice == "int":
        obj = rng.choice([0, 2**80, -5, 1.5])
    elif choice == "string":
        obj = rng.choice(CONTROL_NAMES[:4])
    elif choice == "plain pickle":
        file.write_bytes(pickle.dumps({"value": [1, 2, 3]}))
        return Mutant("tensor file pickle", f"{file.name}: {choice}", must_refuse=not sglang)
    elif choice == "payload":
        file.write_bytes(pickle.dumps(_Payload(marker)) if rng.random() < 0.5 else _torch_bytes({"value": _Payload(marker)}))
        return Mutant("tensor file pickle", f"{file.name}: {choice}", must_refuse=True, marker=marker)
    elif choice == "value deep":
        obj = {"value": _deep_list(rng.choice([100, 3000])), "meta": {"dims": "t h"}}
    elif choice in ("value huge view", "huge view"):
        view = torch.zeros(1).as_strided((2**20, 2**20, 64), (0, 0, 0))  # 256 TiB of float32, 4 bytes stored
        obj = {"value": view, "meta": {}} if choice == "value huge view" else view
        must_refuse = True
    elif choice == "meta odd":
        obj = {"value": torch.zeros(2, 3), "meta": rng.choice([
            {"world_size": rng.choice(HUGE_NUMBERS)}, {"dims": rng.choice(["[", "t h[tp:partial+x] d[tp]", "]" * 5000, 5])},
            {"sglang_parallel_info": {"tp_size": 2**70, "tp_rank": -1}}, {"tokenizer_path": "\x1b[2J\ud800"}, []])}
    elif choice == "list of tensors":
        obj = [torch.ones(2), torch.ones(3)]
    elif choice == "bool tensor":
        obj = torch.ones(4, dtype=torch.bool)
    elif choice == "complex tensor":
        obj = torch.ones(4, dtype=torch.complex64)
    elif choice == "sparse":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.sparse_coo_tensor(torch.tensor([[0, 2**20]]), torch.tensor([1.0, 2.0]), (2**21,))
    elif choice == "17 dims":
        obj = torch.zeros([1] * 17)
    else:
        obj = torch.zeros(0, 5)
    file.write_bytes(_torch_bytes(obj))
    # a msProbe file must hold a tensor of the shape dump.json says: anything else is refused
    return Mutant("tensor file pickle", f"{file.name}: {choice}", must_refuse=must_refuse or not sglang)


def _zip(path: Path, rng: random.Random) -> Mutant:
    file = rng.choice(_tensor_files(path))
    buffer = io.BytesIO()
    choice = rng.choice(["traversal", "empty", "no pickle", "huge declared", "duplicate", "nested zip", "deflated",
                         "deflated bomb", "legacy format"])
    if choice in ("deflated", "deflated bomb", "legacy format"):
        import torch

        original = torch.load(file, weights_only=True)
        if choice == "deflated bomb":  # 64 MiB of zeros in a few KiB
            zeros = torch.zeros(2**22 if QUICK else 2**24)
            original = {"value": zeros, "meta": {}} if "___" in file.name else zeros
        if choice == "legacy format":
            legacy = io.BytesIO()
            torch.save(original, legacy, _use_new_zipfile_serialization=False)
            file.write_bytes(legacy.getvalue())
            return Mutant("tensor file zip", f"{file.name}: {choice}")
        source = zipfile.ZipFile(io.BytesIO(_torch_bytes(original)))
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for info in source.infolist():
                archive.writestr(info.filename, source.read(info.filename))
        file.write_bytes(buffer.getvalue())
        # deflated members of a small tensor stay within the bound; a bomb is refused
        return Mutant("tensor file zip", f"{file.name}: {choice}", must_refuse=choice == "deflated bomb")
    with zipfile.ZipFile(buffer, "w") as archive:
        if choice == "traversal":
            archive.writestr("../../outside/data.pkl", pickle.dumps({"value": 1}))
        elif choice == "no pickle":
            archive.writestr("archive/data/0", b"\x00" * 64)
            archive.writestr("archive/version", "3\n")
        elif choice == "huge declared":
            archive.writestr("archive/data.pkl", pickle.dumps(1))
            archive.writestr("archive/data/0", b"\x00" * 16)
        elif choice == "duplicate":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                archive.writestr("archive/data.pkl", pickle.dumps(1))
                archive.writestr("archive/data.pkl", pickle.dumps(2))
        elif choice == "nested zip":
            archive.writestr("archive/data.pkl", file.read_bytes())
    data = bytearray(buffer.getvalue())
    if choice == "huge declared":  # the central directory claims a 4 GiB member
        at = data.rfind(b"PK\x01\x02")
        if at >= 0:
            data[at + 24:at + 28] = struct.pack("<I", 0xFFFFFFF0)
    file.write_bytes(bytes(data))
    return Mutant("tensor file zip", f"{file.name}: {choice}", must_refuse="___" not in file.name or choice != "empty")


def _npy_file(path: Path, rng: random.Random) -> Mutant:
    """msProbe: a tensor entry pointed at a ``.npy`` file (valid, or hostile)."""
    import numpy as np

    dump_json = rng.choice(_dump_jsons(path))
    meta = json.loads(dump_json.read_text())
    items = [(key, item) for key, call in meta["data"].items() for item in _items(call.get("output"))
             if isinstance(item, dict) and "data_name" in item]
    if not items:
        return Mutant("npy file", "no tensor entry (no change)")
    key, item = rng.choice(items)
    shape = item["shape"]
    name = item["data_name"].rsplit(".", 1)[0] + ".npy"
    target = dump_json.parent / "dump_tensor_data" / name
    choice = rng.choice(["valid", "big endian", "fortran", "huge shape", "negative shape", "object", "unicode",
                         "structured", "complex", "truncated", "shape mismatch", "float16", "bad header"])
    count = int(np.prod(shape))
    must_refuse = choice not in ("valid", "big endian", "fortran", "float16")
    if choice == "valid":
        np.save(target, np.zeros(shape, dtype=np.float32))
    elif choice == "big endian":
        np.save(target, np.arange(count, dtype=">f4").reshape(shape))
    elif choice == "fortran":
        np.save(target, np.asfortranarray(np.ones(shape, dtype=np.float32)))
    elif choice == "float16":
        np.save(target, np.ones(shape, dtype=np.float16))
    elif choice == "huge shape":
        target.write_bytes(_npy(rng.choice(["(1099511627776,)", "(4294967296, 4294967296)", "(67108864, 64)"]),
                                "<f4", b"\x00" * 64))
    elif choice == "negative shape":
        target.write_bytes(_npy("(-1,)", "<f4", b"\x00" * 64))
    elif choice == "object":
        np.save(target, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif choice == "unicode":
        np.save(target, np.array(["a", "b"]))
    elif choice == "structured":
        np.save(target, np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]))
    elif choice == "complex":
        np.save(target, np.zeros(shape, dtype=np.complex64))
    elif choice == "truncated":
        np.save(target, np.zeros(shape, dtype=np.float32))
        target.write_bytes(target.read_bytes()[:-7])
    elif choice == "shape mismatch":
        np.save(target, np.zeros(count + 1, dtype=np.float32))
    else:
        target.write_bytes(_npy("__import__('os').getcwd()", "<f4", b""))
    item["data_name"] = name
    dump_json.write_text(json.dumps(meta))
    return Mutant("npy file", f"{key}: {choice}", must_refuse=must_refuse)


def _items(output: object) -> list:
    if isinstance(output, dict) and "type" in output:
        return [output]
    if isinstance(output, list):
        return [leaf for item in output for leaf in _items(item)]
    if isinstance(output, dict):
        return [leaf for item in output.values() for leaf in _items(item)]
    return []


def _sglang_meta(path: Path, rng: random.Random) -> Mutant:
    """A dumper file's ``meta`` (dims, parallel info, world size) or its value's shape/dtype changed,
    the file still a valid ``{"value", "meta"}`` save."""
    import torch

    file = rng.choice([f for f in _sglang_files(path) if "name=mlp" in f.name] or _sglang_files(path))
    obj = torch.load(file, weights_only=True)
    if not isinstance(obj, dict):
        obj = {"value": obj, "meta": {}}
    meta = dict(obj.get("meta") or {})
    value = obj["value"]
    op = rng.choice(["dims", "parallel info", "world size", "shape", "dtype", "non-finite", "drop meta"])
    if op == "dims":
        meta["dims"] = rng.choice(["a b c d e f[tp]", "t h[tp] d[tp]", "t[tp:partial] h", "t h[cp]", "", "[tp]",
                                   "t h[tp", "t h[tp:partial+sharded]", "t " * 20 + "h[tp]", "t h # [tp]", "t[ep] h[tp]",
                                   "t h[tp]" if rng.random() < 0.5 else "h[tp] t"])
    elif op == "parallel info":
        meta["sglang_parallel_info"] = rng.choice([{"tp_rank": 5, "tp_size": 2}, {"tp_rank": -1, "tp_size": 2},
                                                   {"tp_rank": "0", "tp_size": 2}, {"tp_rank": 0, "tp_size": 2**70},
                                                   {"tp_rank": 1, "tp_size": 1}, [], None])
    elif op == "world size":
        meta["world_size"] = rng.choice([0, 1, 2, 3, 64, 2**31, -1, True, 1.5])
    elif op == "shape" and isinstance(value, torch.Tensor):
        value = rng.choice([value.flatten(), value[..., :1], value.unsqueeze(0), torch.zeros(0), value.reshape(-1, 1)])
    elif op == "dtype" and isinstance(value, torch.Tensor):
        value = value.to(rng.choice([torch.float64, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.bool,
                                     torch.int64, torch.uint16 if hasattr(torch, "uint16") else torch.int16]))
    elif op == "non-finite" and isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        value = value.clone()
        value.view(-1)[rng.randrange(value.numel())] = rng.choice([float("nan"), float("inf"), -float("inf"), 3e38])
    elif op == "drop meta":
        obj = value
    if isinstance(obj, dict):
        obj = {"value": value, "meta": meta}
    file.write_bytes(_torch_bytes(obj))
    return Mutant("sglang meta/value", f"{file.name[:60]}: {op}")


def _sglang_aux(path: Path, rng: random.Random) -> Mutant:
    """The token aligner's aux tensors (input_ids, positions, seq_lens, rids) with hostile values;
    the case also runs ``compare --align tokens``."""
    import torch

    files = [f for f in _sglang_files(path)
             if any(f"name={aux}___" in f.name for aux in ("input_ids", "positions", "seq_lens", "rids"))]
    if not files:
        return Mutant("sglang aux", "no aux file (no change)", align=True)
    file = rng.choice(files)
    value = rng.choice([torch.tensor([2**62, -5, 0]), torch.tensor([[1, 2], [3, 4]]), torch.zeros(0, dtype=torch.long),
                        torch.tensor([1.5, float("nan")]), torch.tensor([0, 0, 0]), torch.tensor([-1]),
                        torch.tensor([10**9]), torch.arange(5000), [["a", ["b"]], None], ["\ud800", "\x1b[2J"],
                        "rid", 3, None, {"k": torch.ones(2)}, torch.ones(3, dtype=torch.bool), [1, 2.5, "x"],
                        torch.tensor(7), [[[[1]]]]])
    file.write_bytes(_torch_bytes({"value": value, "meta": {}}))
    return Mutant("sglang aux", f"{file.name[:50]}: {type(value).__name__}", align=True)


def _sglang_ranks(path: Path, rng: random.Random) -> Mutant:
    """Files of one rank or step removed, a rank or step renumbered."""
    files = _sglang_files(path)
    op = rng.choice(["drop rank file", "drop step of a rank", "rank 7", "step gap", "only aux"])
    if op == "drop rank file":
        rng.choice(files).unlink()
    elif op == "drop step of a rank":
        for file in files:
            if "step=1___rank=0" in file.name:
                file.unlink()
    elif op == "rank 7":
        file = rng.choice(files)
        file.rename(path / file.name.replace("rank=0", "rank=7").replace("rank=1", "rank=7"))
    elif op == "step gap":
        for file in files:
            if file.name.startswith("step=1___"):
                file.rename(path / file.name.replace("step=1___", "step=90___"))
    else:
        for file in files:
            if not any(f"name={aux}___" in file.name for aux in ("input_ids", "positions", "seq_lens", "rids")):
                file.unlink()
    return Mutant("sglang ranks/steps", op)


# --------------------------------------------------------------------------- msProbe json


def parity_dtype_known(item: dict) -> bool:
    """True when parity imports this tensor description's dtype (else it is skipped, not loaded)."""
    from parity.store.importers.msprobe import parity_dtype

    return parity_dtype(item.get("dtype")) is not None


def _dump_json(path: Path, rng: random.Random) -> Mutant:
    dump_json = rng.choice(_dump_jsons(path))
    meta = json.loads(dump_json.read_text())
    keys = list(meta["data"])
    key = rng.choice(keys)
    call = meta["data"][key]
    items = _items(call.get("output")) if isinstance(call, dict) else []
    op = rng.choice(["top type", "task", "data type", "call type", "output type", "drop key", "shape", "dtype",
                     "stat", "key name", "data_name", "many entries", "framework", "level", "input_kwargs",
                     "shape disagrees"])
    must_refuse = False
    if op == "top type":
        meta = rng.choice([[], "x", None, 5, {"data": []}])
    elif op == "task":
        meta["task"] = rng.choice(["overflow_check", None, 5, [], "TENSOR", "statistics" if meta.get("task") == "tensor" else "tensor"])
    elif op == "data type":
        meta["data"] = rng.choice([[], "x", None, {"": {}}, {"Module.a.B.forward.0": None}])
    elif op == "call type":
        meta["data"][key] = rng.choice([[], "x", None, 5, {"output": None}, {"output": {}}])
    elif op == "output type":
        call["output"] = rng.choice([{"type": "torch.Tensor"}, [[[[[[[[[[[[{"type": "torch.Tensor", "shape": [1]}]]]]]]]]]]]],
                                     {"type": 5}, "tensor", [None, 1, "x"], {"0": {"type": "torch.Tensor", "shape": "x"}}])
    elif op == "drop key" and items:
        item = rng.choice(items)
        item.pop(rng.choice(list(item)))
    elif op == "shape" and items:
        rng.choice(items)["shape"] = rng.choice([[2**40, 2**40], [2**39] * 16, [2**20] * 3, [-1], "[3]", [1.5], [1] * 17, [10**30], None, [True]])
    elif op == "dtype" and items:
        rng.choice(items)["dtype"] = rng.choice(["torch.complex64", "", None, 5, "torch.float8_e4m3fn", "object",
                                                 "torch.bool", "Float16", "\x1b[2J"])
    elif op == "stat" and items:
        item = rng.choice(items)
        item[rng.choice(["Max", "Min", "Mean", "Norm"])] = rng.choice(HUGE_NUMBERS + ["nan", "inf", 10**400])
    elif op == "key name":
        new = rng.choice([f"Module.{n}.Linear.forward.0" for n in CONTROL_NAMES]
                         + ["Module..Linear.forward.0", "Module.a.B.forward.99999999999999999999",
                            "Functional.x.forward", ".forward", "Module.a.B.backward.0", "Cell.a.B.construct.1",
                            key.replace(".forward.0", ".forward.1")])
        meta["data"] = {(new if k == key else k): v for k, v in meta["data"].items()}
    elif op == "data_name" and items:
        rng.choice(items)["data_name"] = rng.choice(["../dump.json", "/etc/passwd", "..", "", None, 5, "a\x00b",
                                                     "x.pkl", "dump.json", "sub/x.pt", "missing.pt", "\ud800.pt"])
        must_refuse = meta.get("task") == "tensor"
    elif op == "many entries":
        count = rng.choice([2000, 5000]) if meta.get("task") == "statistics" else 300
        count = count // 10 if QUICK else count
        meta["data"].update({f"Module.extra.{i}.Linear.forward.0": call for i in range(count)})
        # a tensor dump's entries naming one file again: refused (memory would be count x the file)
        must_refuse = meta.get("task") == "tensor" and any(
            isinstance(i, dict) and isinstance(i.get("data_name"), str) and parity_dtype_known(i) for i in items)
    elif op == "framework":
        meta["framework"] = rng.choice([None, 5, [], "\x1b[31mmindspore", "x" * 10000])
    elif op == "level":
        meta["level"] = rng.choice([None, {"a": 1}, "\ud800"])
    elif op == "input_kwargs" and isinstance(call, dict):
        call["input_kwargs"] = rng.choice([{"input_ids": {"type": "torch.Tensor", "dtype": "torch.int64",
                                                          "shape": [1, 3], "data_name": "../dump.json"}},
                                           {"input_ids": {"type": "torch.Tensor", "dtype": "torch.int64",
                                                          "shape": [2**20, 2**20], "data_name": "x.pt"}},
                                           {"position_ids": [1, 2]}, "x", [[[]]]])
    elif op == "shape disagrees" and items and meta.get("task") == "tensor":
        item = rng.choice(items)
        if isinstance(item.get("shape"), list) and item.get("data_name"):
            item["shape"] = [*item["shape"], 2] if rng.random() < 0.5 else list(reversed(item["shape"])) + [1]
            must_refuse = True
    text = json.dumps(meta, allow_nan=True)
    if op == "stat" and rng.random() < 0.3:  # numbers a JSON writer would not write
        text = text.replace('"Max": ', '"Max": ' + rng.choice(["9" * 5000 + ", \"x\": ", "1e99999, \"x\": "]), 1)
    dump_json.write_text(text)
    return Mutant("dump.json", f"{dump_json.parent.name} {op}", must_refuse=must_refuse)


def _dump_json_raw(path: Path, rng: random.Random) -> Mutant:
    dump_json = rng.choice(_dump_jsons(path))
    text = dump_json.read_text()
    op = rng.choice(["deep", "cut", "not utf8", "bom", "huge int", "lone surrogate", "duplicate keys", "nul"])
    if op == "deep":
        text = text.replace('"data": {', '"data": {"Module.x.Y.forward.0": {"output": ' + "[" * 100000 + "]" * 100000 + "},", 1)
    elif op == "cut":
        text = text[: rng.randrange(len(text))]
    elif op == "not utf8":
        dump_json.write_bytes(text.encode()[:100] + b"\xff\xfe" + text.encode()[100:])
        return Mutant("dump.json raw", op)
    elif op == "bom":
        dump_json.write_bytes(b"\xef\xbb\xbf" + text.encode())
        return Mutant("dump.json raw", op)
    elif op == "huge int":
        text = text.replace('"shape": [', '"shape": [' + "9" * 6000 + ", ", 1)
    elif op == "lone surrogate":
        text = text.replace('"Module.', '"Module.\\ud800', 3)
    elif op == "duplicate keys":
        text = text.replace('"data": {', '"data": {"data": 1, ', 1).replace('"task":', '"task": "x", "task":', 1)
    else:
        text = text.replace('"Module.', '"Module.\\u0000', 2)
    dump_json.write_text(text, encoding="utf-8", errors="surrogatepass")
    return Mutant("dump.json raw", op)


def _side_json(path: Path, rng: random.Random) -> Mutant:
    """stack.json / construct.json: parity does not read them; hostile content must change nothing."""
    files = sorted(path.rglob("construct.json")) + sorted(path.rglob("stack.json"))
    if not files:
        return Mutant("stack/construct.json", "none (no change)")
    file = rng.choice(files)
    file.write_bytes(rng.choice([b"", b"[" * 100000, b"\xff\xfe", b'{"a": NaN}', b"{" + b'"x": 1,' * 100000 + b"}"]))
    return Mutant("stack/construct.json", file.name)


def _folders(path: Path, rng: random.Random) -> Mutant:
    """msProbe step and rank folder names: huge, odd, duplicated; a second rank folder."""
    rank_dir = rng.choice(_dump_jsons(path)).parent
    step_dir = rank_dir.parent
    op = rng.choice(["rank name", "step name", "second rank", "same rank twice", "rank folder only"])
    if op == "rank name":
        rank_dir.rename(step_dir / rng.choice(["rank" + "9" * 30, "rank-1", "rank01", "rank", "proc-5", "rank\u202e1",
                                               "rank\x1b", "rank1 ", "rank4096"]))
    elif op == "step name":
        step_dir.rename(path / rng.choice(["step" + "9" * 30, "step-1", "step01", "step", "stepx", "step4096"]))
    elif op == "second rank":
        shutil.copytree(rank_dir, step_dir / rng.choice(["rank1", "rank3", "rank" + "9" * 20]), symlinks=True)
    elif op == "same rank twice":
        shutil.copytree(rank_dir, step_dir / "rank0", symlinks=True)
        return Mutant("msprobe folders", op, must_refuse=True)
    else:
        for other in sorted(path.iterdir()):
            if other != step_dir:
                shutil.rmtree(other)
    return Mutant("msprobe folders", op)


# --------------------------------------------------------------------------- SGLang file names


def _sglang_name(path: Path, rng: random.Random) -> Mutant:
    files = _sglang_files(path)
    file = rng.choice(files)
    stem = file.name[:-3]
    tags = [part.split("=", 1) for part in stem.split("___")]
    op = rng.choice(["extra key", "empty value", "duplicate key", "step", "rank", "dump_index", "name", "layer_id",
                     "drop key", "copy as", "non utf8"])
    must_refuse = False
    if op == "extra key":
        tags.append(rng.choice([["x", "1"], ["", "v"], ["k", ""], ["\x1b[2J", "v"], ["k", "\u202eevil"],
                                ["world_size", "99"], ["a", "=b=c"]]))
    elif op == "empty value":
        rng.choice(tags)[1] = ""
    elif op == "duplicate key":
        index = rng.randrange(len(tags))
        tags.insert(index, [tags[index][0], rng.choice(["0", "1", "x", "-3", tags[index][1]])])
    elif op in ("step", "rank", "dump_index"):
        for tag in tags:
            if tag[0] == op:
                tag[1] = rng.choice(["-1", "-0", str(10**30), str(2**63), "007", "1e3", "0x10", "٣", "99999"])
    elif op == "name":
        for tag in tags:
            if tag[0] == "name":
                tag[1] = rng.choice(["..", ".", "", "a..b", "\x1b[31mx", "\u202eevil", "layers.x", "non_intrusive__",
                                     "non_intrusive__.output", "input_ids", "seq_lens", "rids", "positions",
                                     "req_pool_indices", "x" * 200, "a\tb", "[bold]x", "名前"])
    elif op == "layer_id":
        tags.append(["layer_id", rng.choice(["-1", str(10**30), "..", "x", "", "\x1b"])])
    elif op == "drop key":
        tags.pop(rng.randrange(len(tags)))
    elif op == "copy as":  # the same file under a second name: a second record (or a duplicate)
        shutil.copy(file, path / (stem.replace("dump_index=", "dump_index=9") + ".pt"))
        return Mutant("sglang file name", op)
    else:
        raw = os.fsencode(file.name).replace(b"name=", b"name=\xff\xfe", 1)
        os.rename(os.fsencode(file), os.path.join(os.fsencode(path), raw))
        return Mutant("sglang file name", op)
    new = "___".join("=".join(tag) if len(tag) == 2 else tag[0] for tag in tags) + ".pt"
    if "/" in new or "\x00" in new or len(os.fsencode(new)) > 255:
        return Mutant("sglang file name", f"{op} (not a possible name, no change)")
    file.rename(path / new)
    return Mutant("sglang file name", f"{op}: {new[:80]!r}", must_refuse=must_refuse)


# --------------------------------------------------------------------------- file system


def _filesystem(path: Path, rng: random.Random) -> Mutant:
    candidates = _tensor_files(path) + _dump_jsons(path)
    file = rng.choice(candidates)
    op = rng.choice(["symlink outside", "fifo", "directory", "symlink loop", "dangling symlink", "dev zero",
                     "symlink inside"])
    is_json = file.name == "dump.json"
    outside = path.parent / f"{path.name}-outside{file.suffix}"
    shutil.copy(file, outside)
    file.unlink()
    if op == "symlink outside":
        file.symlink_to(outside)
    elif op == "fifo":
        os.mkfifo(file)
    elif op == "directory":
        file.mkdir()
    elif op == "symlink loop":
        file.symlink_to(file.name)
    elif op == "dangling symlink":
        file.symlink_to(path / "does-not-exist")
    elif op == "dev zero":
        file.symlink_to("/dev/zero")
    else:
        inside = path / f".inside{file.suffix}"
        shutil.copy(outside, inside)
        file.symlink_to(inside)
        return Mutant("filesystem", f"{op} for {file.name}")
    # a dump.json that is not a readable regular file leaves no msProbe dump (or a smaller one)
    return Mutant("filesystem", f"{op} for {file.name}", must_refuse=not is_json)


# --------------------------------------------------------------------------- --map files


def _map_file(path: Path, rng: random.Random) -> Mutant:
    target = path.parent / f"{path.name}-map"
    choice = rng.choice(["billion laughs", "deep yaml", "deep json", "recursive alias", "wrong types", "list",
                         "scalar", "fifo", "huge", "many entries", "non-string keys", "python tag", "control chars",
                         "not utf8", "ambiguous", "valid"])
    suffix = ".json" if choice in ("deep json",) else rng.choice([".yaml", ".yml", ".json"]) if choice == "valid" else ".yaml"
    file = target.with_suffix(suffix)
    if choice == "billion laughs":
        lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
        lines.append("Top: {network: *i}")
        text = "\n".join(lines) + "\n"
    elif choice == "deep yaml":
        text = "a: " + "[" * 5000 + "]" * 5000 + "\n"  # PyYAML recurses per level
    elif choice == "deep json":
        text = '{"a": ' + "[" * 100000 + "]" * 100000 + "}"
    elif choice == "recursive alias":
        text = "a: &a {b: *a}\n" if rng.random() < 0.5 else "a: &a [*a]\n"
    elif choice == "wrong types":
        text = rng.choice(["Top: {network: 5}\n", "Top: {network: [a]}\n", "network: 5\n", "Top: {a: b}\nx: y\n",
                           "Top: {network: null}\n", "Top: {null: model}\n"])
    elif choice == "list":
        text = "- network\n- model\n"
    elif choice == "scalar":
        text = rng.choice(["model\n", "", "~\n", "1e999\n"])
    elif choice == "fifo":
        os.mkfifo(file)
        return Mutant("map file", choice, must_refuse=True, map_file=file)
    elif choice == "huge":
        text = "a: b\n" + "#" * (1 << 20) + "\n"
    elif choice == "many entries" and QUICK:  # PyYAML takes a second for 20,000 lines
        file = target.with_suffix(".json")
        text = json.dumps({f"n{i}": f"m{i}" for i in range(20000)})
    elif choice == "many entries":
        text = "\n".join(f"n{i}: m{i}" for i in range(20000)) + "\n"
    elif choice == "non-string keys":
        text = rng.choice(["1: model\n", "Top: {1: 2}\n", "? [a, b]\n: c\n", "Top: {true: model}\n"])
    elif choice == "python tag":
        text = "!!python/object/apply:os.system ['touch PWNED']\n"
    elif choice == "control chars":
        text = json.dumps({"network\u202e": "model", "a\x1b[2J": "b"}) + "\n"
    elif choice == "not utf8":
        file.write_bytes(b"network: \xff\xfe\n")
        return Mutant("map file", choice, must_refuse=True, map_file=file)
    elif choice == "ambiguous":
        text = "A: {attention: self_attn}\nB: {attention: attn}\n"
    else:
        text = json.dumps({"model": "model"}) if suffix == ".json" else "Top: {model: model}\n"
    file.write_text(text, encoding="utf-8")
    return Mutant("map file", choice, must_refuse=choice not in ("valid", "recursive alias"), map_file=file)


#: (mutation, weight, bases it applies to)
ALL_TENSOR_BASES = ("sglang-llama", "sglang-tp1", "sglang-tp2", "msprobe-tensor")
MSPROBE = ("msprobe-tensor", "msprobe-stats")
SGLANG = ("sglang-llama", "sglang-tp1", "sglang-tp2")
MUTATIONS: list[tuple[Callable[[Path, random.Random], Mutant], float, tuple[str, ...]]] = [
    (_truncate, 1.0, ALL_TENSOR_BASES), (_flip, 1.0, ALL_TENSOR_BASES), (_garbage, 1.0, ALL_TENSOR_BASES),
    (_pickle, 2.0, ALL_TENSOR_BASES), (_zip, 0.7, ALL_TENSOR_BASES), (_npy_file, 1.2, ("msprobe-tensor",)),
    (_dump_json, 2.5, MSPROBE), (_dump_json_raw, 0.8, MSPROBE), (_side_json, 0.3, MSPROBE),
    (_sglang_name, 2.0, SGLANG), (_filesystem, 1.0, (*ALL_TENSOR_BASES, "msprobe-stats")),
    (_map_file, 1.0, ("msprobe-stats",)), (_folders, 0.7, MSPROBE), (_sglang_meta, 1.2, SGLANG),
    (_sglang_ranks, 0.6, SGLANG), (_sglang_aux, 1.0, SGLANG),
]


# --------------------------------------------------------------------------- running and judging


def judge(mutant: Mutant, command: str, code: int, stderr: str) -> str | None:
    """Why this command's result on this mutant is wrong, or None when it is handled."""
    if (why := _fuzz_dumps().harness_failure(code, stderr, CASE_SECONDS)) is not None or code == 2:
        return why
    if mutant.must_refuse and "--salvage" not in command:  # salvage skips unreadable tensor files (noted)
        return f"exit {code} on an input that must be refused (a silent pass)"
    return None


def _commands(base: str, pristine: Path, converted: Path, case: Path, out: Path, mutant: Mutant) -> list[tuple[str, list[str]]]:
    if mutant.map_file is not None:
        return [("compare --map", ["compare", "--map", str(mutant.map_file), str(pristine), str(pristine)])]
    return [("compare imported", ["compare", str(pristine), str(case)]),
            ("compare converted", ["compare", str(converted), str(case)]),
            ("inspect", ["inspect", str(case)]),
            ("convert", ["convert", str(case), str(out)])] + ([] if QUICK else [
            ("compare --salvage", ["compare", "--salvage", str(pristine), str(case)]),
            ("convert --salvage", ["convert", "--salvage", str(case), str(out)])]) + ([
            ("compare --align tokens", ["compare", "--align", "tokens", str(converted), str(case)])] if mutant.align else [])


def converted_dumps(root: Path) -> dict[str, Path]:
    """Each fixture converted once to a parity dump (``parity convert``) under ``root``."""
    run_cli = _fuzz_dumps().run_cli
    done = {}
    for base in BASES:
        out = root / f"converted-{base}"
        if not (out / "manifest-rank0.jsonl").exists():
            code, _, err = run_cli(["convert", str(FIXTURES / base), str(out)])
            if code != 0:
                raise RuntimeError(f"converting the fixture {base} failed: {err}")
        done[base] = out
    return done


def run_fuzz(cases: int, seed: int = 0, workdir: Path | None = None,
             progress: Callable[[int], None] | None = None, quick: bool = False) -> list[CaseResult]:
    """Run ``cases`` seeded mutants (default seed 0); returns one result per case. ``quick``
    (default False) makes the "thousands of entries" mutants ten times smaller."""
    global QUICK
    QUICK = quick
    fuzz_dumps = _fuzz_dumps()
    fuzz_dumps.CASE_SECONDS = CASE_SECONDS
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="parity-fuzz-imports-")) if own else Path(workdir)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    try:
        converted = converted_dumps(root)
        rng = random.Random(seed)
        weights = [w for _, w, _ in MUTATIONS]
        results = []
        for index in range(cases):
            mutate, _, bases = rng.choices(MUTATIONS, weights=weights)[0]
            base = rng.choice(bases)
            case = root / f"case-{index}" / base
            case.parent.mkdir()
            shutil.copytree(FIXTURES / base, case, symlinks=True)
            try:
                mutant = mutate(case, rng)
            except Exception as exc:  # a bug of the fuzzer, not of parity: reported, not hidden
                results.append(CaseResult(base, Mutant(mutate.__name__, "mutation failed"),
                                          [f"fuzzer: {type(exc).__name__}: {exc}"]))
                _remove(case.parent)
                continue
            result = CaseResult(base, mutant)
            started = time.perf_counter()
            for command, args in _commands(base, FIXTURES / base, converted[base], case, case.parent / "out", mutant):
                code, _, stderr = fuzz_dumps.run_cli(args)
                why = judge(mutant, command, code, stderr)
                if why is not None:
                    result.failures.append(f"{command}: {why}")
                shutil.rmtree(case.parent / "out", ignore_errors=True)
            result.seconds = time.perf_counter() - started
            if mutant.marker is not None and mutant.marker.exists():
                result.failures.append(f"a pickle payload ran: {mutant.marker} was created")
            results.append(result)
            _remove(case.parent)
            if progress is not None:
                progress(index + 1)
        return results
    finally:
        if own:
            _remove(root)


def _remove(path: Path) -> None:
    """:func:`fuzz_dumps.remove_tree`, and the links or files a mutant left beside ``path``."""
    for sibling in path.parent.glob(f"{path.name}-*"):
        if sibling.is_symlink() or not sibling.is_dir():
            sibling.unlink()
    _fuzz_dumps().remove_tree(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="work in this directory (kept)")
    args = parser.parse_args()
    os.environ.setdefault("PARITY_PROGRESS_INTERVAL", "0")

    def tick(done: int) -> None:
        if done % 50 == 0:
            print(f"  {done}/{args.cases} cases", file=sys.stderr, flush=True)

    results = run_fuzz(args.cases, args.seed, args.keep, tick)
    failures = _fuzz_dumps().print_summary(results, args.seed, width=24)
    for result in failures:
        print(f"- [{result.base}] {result.mutant.kind} ({result.mutant.detail!r}): " + "; ".join(result.failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
