"""Importing SGLang dumper and msProbe dumps: real fixtures, cross-tool comparison, safety.

The fixtures in tests/fixtures/imported/ were written by the real tools (msProbe 26.2.0, the
dumper of sglang 0.5.23 run from source) on the tiny Llama; ``scripts/make_import_fixtures.py``
regenerates them. These tests need neither tool.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "imported"
PROMPT = json.loads((FIXTURES / "meta.json").read_text())["prompt"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the parity CLI in this process: (exit code, stdout, stderr)."""
    from parity.cli import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def assert_one_error_line(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("parity: error:"), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


# ------------------------------------------------------------------------------ detection, unit
def test_detects_each_format_and_refuses_other_folders(tmp_path):
    from parity.store.importers import detect_format

    assert detect_format(FIXTURES / "msprobe-tensor") == "msprobe"
    assert detect_format(FIXTURES / "msprobe-stats" / "step1") == "msprobe"
    assert detect_format(FIXTURES / "msprobe-stats" / "step1" / "proc0") == "msprobe"
    assert detect_format(FIXTURES / "sglang-llama") == "sglang"
    assert detect_format(FIXTURES) is None
    (tmp_path / "x.pt").write_bytes(b"")
    assert detect_format(tmp_path) is None  # a .pt that is not named like the dumper's


def test_name_and_dims_mapping():
    from parity.store.importers.msprobe import output_names, split_name
    from parity.store.importers.sglang import parse_filename, record_name, shard_of_dims

    assert shard_of_dims("t h[tp] d") == "split:1"
    assert shard_of_dims("t h[tp:partial]") == "sum"
    assert shard_of_dims("t h # dp:=moe_dp") == "replicated"
    assert shard_of_dims("b s[cp:zigzag] h[tp] d") is None  # context parallel: not rebuilt by parity
    tags = parse_filename("step=2___rank=1___dump_index=7___name=attn_out___recompute_status=disabled___layer_id=3")
    assert tags is not None and record_name(tags) == "layers.3.attn_out"
    assert record_name({"name": "non_intrusive__model.layers.0.self_attn.output", "layer_id": "0"}) \
        == "model.layers.0.self_attn"
    assert record_name({"name": "non_intrusive__model.rotary_emb.output.1"}) == "model.rotary_emb.1"
    assert record_name({"name": "x", "expert": "2"}) == "x[expert=2]"
    assert parse_filename("forward_pass_id=0___rank=0___dump_index=1___name=x") is not None  # older releases
    assert parse_filename("step=a___rank=0___dump_index=1___name=x") is None
    assert split_name("Module.model.layers.0.mlp.LlamaMLP.forward.2") == ("model.layers.0.mlp", "LlamaMLP", 2, True)
    assert split_name("Functional.linear.3.forward") == ("Functional.linear.3", None, 0, True)
    tensor = {"type": "torch.Tensor"}
    assert output_names("m", [tensor, None]) == [("m", tensor)]
    assert [n for n, _ in output_names("m", [tensor, tensor])] == ["m.0", "m.1"]
    assert [n for n, _ in output_names("m", [{"last_hidden_state": tensor, "past": None}])] == ["m.last_hidden_state"]


# ------------------------------------------------------------------------------ round trips
def test_msprobe_tensor_dump_reads_as_a_run_with_the_files_values():
    import torch

    from parity.store.reader import load_run

    run = load_run(FIXTURES / "msprobe-tensor")
    names = [r.name for r in run.records]
    assert run.mode == "full" and run.world_size == 1
    assert {"model.embed_tokens", "model.layers.0.self_attn", "model.layers.3", "lm_head",
            "model.rotary_emb.0", "model.last_hidden_state"} <= set(names)
    assert names.index("model.layers.0.self_attn.q_proj") < names.index("model.layers.0.self_attn") < names.index(
        "lm_head")  # execution order
    assert "input_ids" not in run.step_tags(0)  # data_mode ["output"]: msProbe dumped no inputs
    record = next(r for r in run.records if r.name == "model.layers.2.mlp")
    assert record.tags == {"module": "LlamaMLP", "layer": 2}
    data = FIXTURES / "msprobe-tensor/step0/proc0/dump_tensor_data/Module.model.layers.2.mlp.LlamaMLP.forward.0.output.0.pt"
    expected = torch.load(data, weights_only=True).numpy()
    assert (run.array(record) == expected).all()


def test_msprobe_statistics_dump_is_a_statistics_only_run(capsys):
    from parity.store.reader import load_run

    run = load_run(FIXTURES / "msprobe-stats")
    assert run.mode == "stats" and sorted({r.step for r in run.records}) == [0, 1]
    dump = json.loads((FIXTURES / "msprobe-stats/step1/proc0/dump.json").read_text())
    item = dump["data"]["Module.model.layers.1.mlp.LlamaMLP.forward.0"]["output"][0]
    record = next(r for r in run.records if r.name == "model.layers.1.mlp" and r.step == 1)
    assert record.file is None and record.shape == tuple(item["shape"])
    assert (record.stats["max"], record.stats["min"], record.stats["l2"]) == (item["Max"], item["Min"], item["Norm"])
    assert record.stats["abs_max"] == max(abs(item["Max"]), abs(item["Min"]))
    assert any("inputs and parameters of calls not imported" in note for note in run.notes)
    code, out, err = cli(capsys, "compare", str(FIXTURES / "msprobe-stats"), str(FIXTURES / "msprobe-stats"))
    assert code == 0, out + err
    assert "statistics" in out.lower()


def test_statistics_import_against_a_full_capture_finds_an_injected_fault(fp32_model):
    from parity.compare.engine import compare

    clean, faulty = _parity_runs(fp32_model, steps=2, decode=False)  # msProbe ran the prompt twice
    imported = FIXTURES / "msprobe-stats"
    extras = ["re:.*(proj|act_fn|rotary_emb|last_hidden_state).*"]
    assert compare(imported, clean, allow_missing=extras).verdict == "pass"
    first = compare(imported, faulty, allow_missing=extras).first_divergence
    assert first is not None and first.name == "model.layers.2.mlp"


def test_sglang_dump_maps_names_steps_and_token_metadata():
    from parity.store.reader import load_run

    run = load_run(FIXTURES / "sglang-llama")
    assert sorted({r.step for r in run.records}) == [0, 1]
    assert [r.name for r in run.records if r.step == 0][:3] == [
        "model.embed_tokens", "model.layers.0.input_layernorm", "model.layers.0.self_attn"]
    assert {"input_ids", "positions", "rids", "seq_lens"}.isdisjoint(r.name for r in run.records)
    prefill, decode = run.step_tags(0), run.step_tags(1)
    assert prefill["input_ids"] == PROMPT and prefill["positions"] == [0, 1, 2] and prefill["seq_lens"] == [3]
    assert prefill["request_ids"] == ["req-0"]
    # SGLang's seq_lens of the decode step is the whole length (4); parity's counts this step's tokens
    assert decode["positions"] == [len(PROMPT)] and decode["seq_lens"] == [1]


def test_sglang_tensor_parallel_dump_rebuilds_from_dims(capsys):
    from parity.compare.engine import compare
    from parity.store.reader import load_run

    run = load_run(FIXTURES / "sglang-tp2")
    shards = {r.name: r.tags.get("shard") for r in run.records}
    assert shards == {"layers.0.mlp_up": "split:1", "layers.0.mlp_down_partial": "sum",
                      "layers.0.mlp_out": "replicated"}
    report = compare(FIXTURES / "sglang-tp1", FIXTURES / "sglang-tp2")
    assert report.verdict == "pass", [o.kind for o in report.outcomes]
    code, out, err = cli(capsys, "compare", str(FIXTURES / "sglang-tp1"), str(FIXTURES / "sglang-tp2"))
    assert code == 0, out + err


# ------------------------------------------------------------------------------ across tools
def _parity_runs(loaded, *, steps: int, decode: bool = True):
    """Parity captures of the tiny Llama on the fixtures' prompt (a prefill, and with ``steps`` 2
    a decode step, or with ``decode`` False the prefill again), clean and with a fault injected
    after layer 2's MLP."""
    import torch

    import parity

    model = loaded.model

    def run_once():
        ids = torch.tensor([PROMPT])
        with parity.capture(model, None, spec="dtype=float32,attn=eager") as session, torch.no_grad():
            out = model(ids, use_cache=True)
            if steps == 2 and not decode:
                model(ids)
            elif steps == 2:
                next_id = out.logits[:, -1].argmax(-1, keepdim=True)
                model(next_id, past_key_values=out.past_key_values, use_cache=True,
                      position_ids=torch.tensor([[len(PROMPT)]]))
        return session.run

    clean = run_once()
    handle = model.model.layers[2].mlp.register_forward_hook(lambda _m, _i, output: output * 1.01)
    try:
        faulty = run_once()
    finally:
        handle.remove()
    return clean, faulty


def test_imported_and_parity_dumps_name_the_same_first_divergence(fp32_model):
    from parity.compare.engine import compare

    clean, faulty = _parity_runs(fp32_model, steps=2)
    expected = compare(clean, faulty).first_divergence
    assert expected is not None and expected.name == "model.layers.2.mlp"
    sglang = FIXTURES / "sglang-llama"
    assert compare(sglang, clean).verdict == "pass"  # same model, same tokens: SGLang's names meet parity's
    found = compare(sglang, faulty).first_divergence
    assert (found.name, found.step) == (expected.name, expected.step)

    clean1, faulty1 = _parity_runs(fp32_model, steps=1)
    msprobe = FIXTURES / "msprobe-tensor"
    extras = ["re:.*(proj|act_fn|rotary_emb|last_hidden_state).*"]  # msProbe dumps every module
    assert compare(msprobe, clean1, allow_missing=extras).verdict == "pass"
    found = compare(msprobe, faulty1, allow_missing=extras).first_divergence
    assert (found.name, found.step) == ("model.layers.2.mlp", 0)


def test_inspect_and_compare_accept_an_imported_dump_on_either_side(capsys, tmp_path):
    code, out, err = cli(capsys, "inspect", str(FIXTURES / "sglang-llama"))
    assert code == 0, err
    assert "model.layers.3.mlp" in out and "sglang" in out
    converted = tmp_path / "parity-dump"
    code, out, err = cli(capsys, "convert", str(FIXTURES / "msprobe-tensor"), str(converted))
    assert code == 0 and "msprobe" in out, err
    for base, target in ((converted, FIXTURES / "msprobe-tensor"), (FIXTURES / "msprobe-tensor", converted)):
        code, out, err = cli(capsys, "compare", str(base), str(target))
        assert code == 0, out + err


# ------------------------------------------------------------------------------ convert
def test_convert_writes_a_checksummed_parity_dump(capsys, tmp_path):
    from parity.store.reader import load_run

    out_dir = tmp_path / "tp2"
    code, out, err = cli(capsys, "convert", str(FIXTURES / "sglang-tp2"), str(out_dir))
    assert code == 0, err
    assert sorted(p.name for p in out_dir.glob("manifest-rank*.jsonl")) == ["manifest-rank0.jsonl",
                                                                           "manifest-rank1.jsonl"]
    run = load_run(out_dir)
    assert run.world_size == 2 and all(r.checksum for r in run.records)
    assert run.step_tags(1, 1)["positions"] == [4, 5, 6, 7]
    code, out, err = cli(capsys, "inspect", "--verify", str(out_dir))
    assert code == 0, err
    code, _, err = cli(capsys, "convert", str(FIXTURES / "sglang-tp2"), str(out_dir))
    assert_one_error_line(code, err, "holds a dump already")
    code, _, err = cli(capsys, "convert", str(tmp_path), str(tmp_path / "x"))
    assert_one_error_line(code, err, "neither a parity dump nor an SGLang or msProbe dump")


# ------------------------------------------------------------------------------ hostile input
class _Payload:
    """Unpickling this (without weights_only) would create MARKER."""

    marker = ""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_in_place_of_a_tensor_file_runs_nothing(capsys, tmp_path):
    import numpy as np
    import torch

    marker = tmp_path / "PWNED"
    payload = _Payload()
    payload.marker = str(marker)
    sglang = copy_fixture("sglang-tp1", tmp_path)
    victim = sorted(sglang.glob("*name=mlp_up*"))[0]
    torch.save({"value": payload, "meta": {}}, victim)
    for command in (["inspect", str(sglang)], ["compare", str(FIXTURES / "sglang-tp1"), str(sglang)],
                    ["convert", str(sglang), str(tmp_path / "out")]):
        code, _, err = cli(capsys, *command)
        assert_one_error_line(code, err, "holds more than tensor data and was not loaded")
        assert "posix.system" in err or "os.system" in err
    msprobe = copy_fixture("msprobe-tensor", tmp_path)
    data = msprobe / "step0/proc0/dump_tensor_data"
    victim = data / "Module.model.layers.0.mlp.LlamaMLP.forward.0.output.0.pt"
    victim.unlink()
    np.save(data / "evil.npy", np.array([payload], dtype=object), allow_pickle=True)
    dump_json = msprobe / "step0/proc0/dump.json"
    dump_json.write_text(dump_json.read_text().replace(victim.name, "evil.npy"))
    code, _, err = cli(capsys, "inspect", str(msprobe))
    assert_one_error_line(code, err, "object array (a pickle) and was not loaded")
    assert not marker.exists()


def _break(kind: str, tmp_path: Path) -> Path:
    if kind.startswith("sglang"):
        dump = copy_fixture("sglang-tp1", tmp_path)
        victim = sorted(dump.glob("*name=mlp_out*"))[0]
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2] if kind == "sglang-truncated" else b"\x80\x02garbage" * 50)
        return dump
    dump = copy_fixture("msprobe-tensor", tmp_path)
    rank = dump / "step0/proc0"
    if kind == "msprobe-json":
        (rank / "dump.json").write_bytes((rank / "dump.json").read_bytes()[:500])
    elif kind == "msprobe-shape":
        text = (rank / "dump.json").read_text()
        (rank / "dump.json").write_text(text.replace('"shape": [1, 3, 128]', '"shape": [1, 3, 64]', 1))
    elif kind == "msprobe-escape":
        text = (rank / "dump.json").read_text()
        name = "Module.model.embed_tokens.Embedding.forward.0.output.0.pt"
        (rank / "dump.json").write_text(text.replace(f'"{name}"', '"../../../../etc/passwd.pt"'))
    return dump


@pytest.mark.parametrize("kind,needle", [
    ("sglang-truncated", "truncated or corrupted"),
    ("sglang-garbage", "parity can load safely"),
    ("msprobe-json", "is not valid JSON"),
    ("msprobe-shape", "dump.json says shape [1, 3, 64]"),
    ("msprobe-escape", "unsafe or missing data_name"),
])
def test_truncated_or_garbage_files_are_one_error_line(capsys, tmp_path, kind, needle):
    dump = _break(kind, tmp_path)
    code, _, err = cli(capsys, "inspect", str(dump))
    assert_one_error_line(code, err, needle)


def test_salvage_skips_an_unreadable_tensor_file(capsys, tmp_path):
    from parity.store.reader import load_run

    dump = _break("sglang-truncated", tmp_path)
    run = load_run(dump, salvage=True)
    assert len(run.salvaged) == 1 and "mlp_out" in run.salvaged[0]
    assert sorted(r.step for r in run.records if r.name == "layers.0.mlp_out") == [1]  # step 0's was broken
    assert any("salvage" in note for note in run.notes)


# ------------------------------------------------------------------------------ name mapping files
def test_a_layer_mapping_file_lines_up_module_trees_of_another_framework(capsys, tmp_path):
    renamed = copy_fixture("msprobe-tensor", tmp_path)
    dump_json = renamed / "step0/proc0/dump.json"
    data = json.loads(dump_json.read_text())
    data["data"] = {k.replace("Module.model.", "Module.network.").replace(".self_attn.", ".attention."): v
                    for k, v in data["data"].items()}
    dump_json.write_text(json.dumps(data))
    mapping = tmp_path / "layer_mapping.yaml"
    mapping.write_text("TopLayer:\n  network: model\nLlamaDecoderLayer:\n  attention: self_attn\n")
    base = str(FIXTURES / "msprobe-tensor")
    code, out, err = cli(capsys, "compare", base, str(renamed))
    assert code == 1 and "missing" in out, out + err
    code, out, err = cli(capsys, "compare", base, str(renamed), "--map", str(mapping))
    assert code == 0, out + err
    prefixes = tmp_path / "prefixes.json"
    prefixes.write_text(json.dumps({"network": "model"}))
    code, out, err = cli(capsys, "compare", base, str(renamed), "--map", str(prefixes),
                         "--rename", r"\.attention(?=\.|$)=.self_attn")
    assert code == 0, out + err


@pytest.mark.parametrize("text,needle", [
    ("A:\n  attention: self_attn\nB:\n  attention: attn\n", "parity renames by name, not class"),
    ("a: [1, 2]\n", "values must be all objects"),
    ("a: 'x=y'\n", "is not a dotted module name"),
    ("a: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_a_bad_mapping_file_is_one_error_line(capsys, tmp_path, text, needle):
    mapping = tmp_path / "map.yaml"
    mapping.write_text(text)
    base = str(FIXTURES / "sglang-tp1")
    code, _, err = cli(capsys, "compare", base, base, "--map", str(mapping))
    assert_one_error_line(code, err, needle)


def test_a_dumped_value_that_is_not_a_tensor_is_skipped_with_a_note(tmp_path):
    import torch

    from parity.store.reader import load_run

    torch.save({"value": 3, "meta": {}}, tmp_path / "step=0___rank=0___dump_index=1___name=count.pt")
    torch.save({"value": torch.ones(2), "meta": {}}, tmp_path / "step=0___rank=0___dump_index=2___name=x.pt")
    torch.save(torch.zeros(3), tmp_path / "forward_pass_id=1___rank=0___dump_index=3___name=y.pt")  # older release
    run = load_run(tmp_path)
    assert [(r.name, r.step) for r in run.records] == [("x", 0), ("y", 1)]
    assert any("count: holds a int, not a tensor; skipped" in note for note in run.notes)
