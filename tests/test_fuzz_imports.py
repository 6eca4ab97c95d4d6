"""A seeded, bounded fuzz of the importers (scripts/fuzz_imports.py; longer runs: its --cases).

Hostile mutants of the real SGLang and msProbe fixtures — truncated, flipped, garbage or
unsafe tensor files, pickles of other things, odd zips and ``.npy`` headers, hostile
``dump.json`` values, odd SGLang file names, symlinks and FIFOs, hostile ``--map`` files — are
either refused with one ``error:`` line and exit 2, or read (exit 0/1) when nothing requires a
refusal; never a traceback, a hang, a memory blow-up, a silent pass or code from a pickle.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_imports.py"


def _fuzz_module():
    if "fuzz_imports" in sys.modules:
        return sys.modules["fuzz_imports"]
    spec = importlib.util.spec_from_file_location("fuzz_imports", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_imports"] = module
    spec.loader.exec_module(module)
    return module


def test_seeded_fuzz_of_the_importers_finds_nothing_unhandled(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_PROGRESS_INTERVAL", "0")
    fuzz = _fuzz_module()
    results = fuzz.run_fuzz(cases=100, seed=7, workdir=tmp_path, quick=True)
    kinds = Counter(r.mutant.kind for r in results)
    assert {"tensor file truncated", "tensor file garbage", "tensor file pickle", "npy file", "dump.json",
            "sglang file name", "filesystem", "map file"} <= set(kinds), kinds
    assert {r.base for r in results} == set(fuzz.BASES)
    failures = [f"[{r.base}] {r.mutant.kind} ({r.mutant.detail!r}): {'; '.join(r.failures)}"
                for r in results if r.failures]
    assert not failures, "\n".join(failures)
    # the fuzz judges something: inputs that must be refused were among the cases
    assert sum(r.mutant.must_refuse for r in results) > 25


def test_the_import_fuzz_judge_flags_a_silent_pass_and_an_internal_error():
    fuzz = _fuzz_module()
    garbage = fuzz.Mutant("tensor file garbage", "x", must_refuse=True)
    assert fuzz.judge(garbage, "inspect", 0, "") is not None
    assert fuzz.judge(garbage, "inspect", 2, "parity: error: x.pt is not a readable torch.save file\n") is None
    assert fuzz.judge(fuzz.Mutant("dump.json", "x"), "inspect", 2,
                      "parity: internal error: RecursionError ...\n") is not None
    assert fuzz.judge(fuzz.Mutant("dump.json", "x"), "convert", -1, "") is not None


# ------------------------------------------------------------------ what the fuzz found, pinned
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "imported"


def _run(*args: str) -> tuple[int, str]:
    """``parity ARGS`` in this process with strict UTF-8 streams: (exit code, stderr)."""
    code, _, err = _fuzz_module()._fuzz_dumps().run_cli([str(a) for a in args])
    return code, err


def _one_error_line(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("parity: error:"), err
    assert needle in lines[0], lines[0]


def _copy(name: str, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_a_stored_view_far_larger_than_its_file_is_refused_not_allocated(tmp_path):
    import torch

    dump = _copy("sglang-tp1", tmp_path)
    file = sorted(dump.glob("*name=mlp_out*"))[0]
    view = torch.zeros(1).as_strided((2**20, 2**20, 64), (0, 0, 0))  # 256 TiB as float32, 4 bytes stored
    torch.save({"value": view, "meta": {}}, file)
    for args in (("inspect", dump), ("convert", dump, tmp_path / "out")):
        _one_error_line(*_run(*args), "far beyond the data stored")


def test_a_deflated_zip_that_would_inflate_far_beyond_its_size_is_refused_before_loading(tmp_path):
    import io
    import zipfile

    import torch

    saved = io.BytesIO()
    torch.save({"value": torch.zeros(2**24), "meta": {}}, saved)  # 64 MiB of zeros
    source = zipfile.ZipFile(saved)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info.filename))
    dump = _copy("sglang-tp1", tmp_path)
    sorted(dump.glob("*name=mlp_out*"))[0].write_bytes(bomb.getvalue())  # about 66 KB
    _one_error_line(*_run("inspect", dump), "members inflate to")


def test_msprobe_entries_naming_one_tensor_file_again_are_refused(tmp_path):
    dump = _copy("msprobe-tensor", tmp_path)
    dump_json = dump / "step0" / "proc0" / "dump.json"
    meta = json.loads(dump_json.read_text())
    call = meta["data"]["Module.model.embed_tokens.Embedding.forward.0"]
    meta["data"].update({f"Module.extra.{i}.Linear.forward.0": call for i in range(1000)})
    dump_json.write_text(json.dumps(meta))
    _one_error_line(*_run("inspect", dump), "is named by two tensors")


def test_a_npy_header_declaring_more_than_the_file_holds_is_refused(tmp_path):
    import numpy as np

    dump = _copy("msprobe-tensor", tmp_path)
    dump_json = dump / "step0" / "proc0" / "dump.json"
    meta = json.loads(dump_json.read_text())
    item = meta["data"]["Module.model.embed_tokens.Embedding.forward.0"]["output"][0]
    item["data_name"] = "embed.npy"
    dump_json.write_text(json.dumps(meta))
    np.save(dump / "step0" / "proc0" / "dump_tensor_data" / "embed.npy", np.zeros(item["shape"], np.float32))
    assert _run("inspect", dump)[0] == 0
    (dump / "step0" / "proc0" / "dump_tensor_data" / "embed.npy").write_bytes(
        _fuzz_module()._npy("(1099511627776,)", "<f4", b"\0" * 64))
    _one_error_line(*_run("inspect", dump), "declares shape [1099511627776]")


def test_a_big_endian_npy_reads_as_its_values(tmp_path):
    import numpy as np
    import torch

    dump = _copy("msprobe-tensor", tmp_path)
    folder = dump / "step0" / "proc0"
    meta = json.loads((folder / "dump.json").read_text())
    item = meta["data"]["Module.model.embed_tokens.Embedding.forward.0"]["output"][0]
    values = torch.load(folder / "dump_tensor_data" / item["data_name"], weights_only=True).numpy()
    np.save(folder / "dump_tensor_data" / "embed.npy", values.astype(">f4"))
    item["data_name"] = "embed.npy"
    (folder / "dump.json").write_text(json.dumps(meta))
    assert _run("compare", FIXTURES / "msprobe-tensor", dump)[0] == 0


def test_statistics_beyond_float_range_and_complex_step_tensors_are_read(tmp_path):
    import torch

    dump = _copy("msprobe-stats", tmp_path)
    dump_json = dump / "step0" / "proc0" / "dump.json"
    meta = json.loads(dump_json.read_text())
    item = next(iter(meta["data"].values()))["output"][0]
    item.update({"Max": 10**400, "Min": -(10**400), "Norm": 10**400})
    dump_json.write_text(json.dumps(meta))
    assert _run("inspect", dump)[0] == 0
    assert _run("compare", FIXTURES / "msprobe-stats", dump)[0] == 1  # an infinite statistic fails its pair
    sglang = _copy("sglang-tp1", tmp_path)
    torch.save({"value": torch.ones(3, dtype=torch.complex64), "meta": {}},
               sorted(sglang.glob("step=0___*name=input_ids*"))[0])
    assert _run("convert", sglang, tmp_path / "out")[0] == 0


def test_a_map_file_that_is_a_fifo_nested_too_deeply_or_holds_control_characters_is_one_error_line(tmp_path):
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    deep_json, deep_yaml, bidi = tmp_path / "deep.json", tmp_path / "deep.yaml", tmp_path / "bidi.json"
    deep_json.write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    deep_yaml.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    bidi.write_text(json.dumps({"network\u202e": "model"}))
    stats = FIXTURES / "msprobe-stats"
    for file, needle in ((fifo, "not a regular file"), (deep_json, "nested too deeply"),
                         (deep_yaml, "nested too deeply"), (bidi, "is not a dotted module name")):
        _one_error_line(*_run("compare", "--map", file, stats, stats), needle)
