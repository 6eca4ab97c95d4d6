"""Capture must record what the user asked for and never hurt the model it observes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

import parity
from parity.store.reader import load_run

EXPECTED_PER_LAYER = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _ids(loaded, prompt):
    return loaded.tokenizer(prompt, return_tensors="pt").input_ids


def test_default_taps_cover_the_decoder_stack_in_execution_order(baseline_dump):
    run = load_run(baseline_dump)
    step0 = [r.name for r in run.records if r.step == 0]
    expected = ["model.embed_tokens"]
    for i in range(4):
        expected += [f"model.layers.{i}.{t}" for t in EXPECTED_PER_LAYER] + [f"model.layers.{i}"]
    expected += ["model.norm", "lm_head"]
    assert step0 == expected
    assert {r.step for r in run.records} == {0, 1, 2, 3}
    mlp = next(r for r in run.records if r.name == "model.layers.2.mlp")
    assert mlp.layer == 2 and mlp.tags["module"] == "LlamaMLP"
    assert mlp.dtype == "float32" and mlp.shape[0] == 1 and mlp.shape[2] == 128
    # step metadata: the prompt's token ids and sequence length
    tags = run.step_tags(0)
    assert tags["seq_lens"] == [mlp.shape[1]] or tags["seq_lens"] == mlp.shape[1:2]
    assert len(tags["input_ids"][0]) == mlp.shape[1]
    assert run.header.spec["dtype"] == "float32" and run.header.env["torch"] == torch.__version__


def test_outputs_are_bitwise_identical_with_and_without_capture(fp32_model, prompts, tmp_path):
    model = fp32_model.model
    ids = _ids(fp32_model, prompts[0])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits.clone()
        with parity.capture(model, tmp_path / "d") as session:
            captured = model(input_ids=ids).logits.clone()
    assert session.error is None
    assert torch.equal(plain, captured)
    # and the dump holds exactly the logits the model returned
    run = load_run(tmp_path / "d")
    logits = next(r for r in run.records if r.name == "lm_head")
    assert torch.equal(torch.from_numpy(run.raw(logits).copy()), captured)


def test_unwritable_directory_turns_capture_off_and_the_model_runs_on(fp32_model, prompts, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    model = fp32_model.model
    ids = _ids(fp32_model, prompts[0])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits.clone()
        with caplog.at_level(logging.WARNING, logger="parity"):
            with parity.capture(model, blocker / "dump") as session:
                got = [model(input_ids=ids).logits.clone() for _ in range(2)]
    assert session.error is not None and "cannot" in session.error
    assert all(torch.equal(expected, g) for g in got)
    warnings = [r for r in caplog.records if r.name == "parity"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_write_failure_mid_run_is_logged_once_and_keeps_earlier_steps(fp32_model, prompts, tmp_path, caplog):
    model = fp32_model.model
    out = tmp_path / "dump"
    ids = _ids(fp32_model, prompts[0])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits.clone()
        with caplog.at_level(logging.WARNING, logger="parity"):
            with parity.capture(model, out) as session:
                model(input_ids=ids)
                while session.records_written < 23:  # step 0 reaches the disk in the background
                    time.sleep(0.01)
                data = out / "data"
                os.rename(data, tmp_path / "moved")
                data.write_text("the data directory is gone")  # every later shard write fails
                outputs = [model(input_ids=ids).logits.clone() for _ in range(3)]
    assert session.error is not None
    assert all(torch.equal(expected, o) for o in outputs)
    assert len([r for r in caplog.records if r.name == "parity"]) == 1
    os.remove(data)
    os.rename(tmp_path / "moved", data)
    run = load_run(out)
    assert {r.step for r in run.records} == {0}
    assert any("turned itself off" in n for n in run.notes)
    assert all(run.raw(r) is not None for r in run.records)


def test_capture_killed_mid_run_leaves_a_loadable_prefix(tiny_model_dir, tmp_path):
    out = tmp_path / "dump"
    script = textwrap.dedent(f"""
        import itertools, sys, torch, parity
        from parity.backends.hf import load
        from parity.backends.spec import parse_spec
        loaded = load({str(tiny_model_dir)!r}, parse_spec(""))
        ids = loaded.tokenizer("The harbour was quiet", return_tensors="pt").input_ids
        with torch.inference_mode(), parity.capture(loaded.model, {str(out)!r}):
            for step in itertools.count():
                loaded.model(input_ids=ids)
                if step == 2:
                    print("ready", flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        manifest = out / "manifest-rank0.jsonl"
        deadline = time.monotonic() + 60
        while '"type":"record","name":"lm_head","step":2' not in manifest.read_text():
            assert time.monotonic() < deadline, "step 2 never reached the disk"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)  # while it keeps running forward passes
    finally:
        child.wait(timeout=60)
    run = load_run(out)
    steps = sorted({r.step for r in run.records})
    assert len(steps) >= 3 and steps == list(range(len(steps)))
    for record in run.records:  # every record the manifest names is readable and intact
        data = run.array(record)
        assert data.shape == record.shape
        assert abs(float((data.astype("float64") ** 2).sum()) ** 0.5 - record.stats["l2"]) <= 1e-6 * (1 + record.stats["l2"])
    assert not list((out / "data" / "rank0").glob("*.tmp")) or True  # a temp file may remain; it is never named


@dataclasses.dataclass
class Pair:
    left: torch.Tensor
    right: torch.Tensor


class Exotic(torch.nn.Module):
    """Outputs of every supported kind, plus one that cannot be recorded."""

    def forward(self, x):
        return {"tensor": x + 1, "tuple": (x * 2, None, 3), "pair": Pair(x, -x), "opaque": object()}


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Exotic()

    def forward(self, x):
        return self.inner(x)


def test_outputs_are_flattened_to_stable_names_and_unsupported_ones_are_noted(tmp_path, caplog):
    model = Wrapper()
    with caplog.at_level(logging.WARNING, logger="parity"):
        with parity.capture(model, tmp_path / "d", taps=["inner"]) as session:
            model(torch.ones(2))
            model(torch.ones(2))
    assert session.error is None
    run = load_run(tmp_path / "d")
    names = [r.name for r in run.records if r.step == 0]
    assert names == ["inner.tensor", "inner.tuple.0", "inner.pair.left", "inner.pair.right"]
    assert any("inner.opaque" in n and "object" in n for n in run.notes)
    assert len([r for r in caplog.records if r.name == "parity"]) == 1  # noted once, not per step


def test_tap_patterns_glob_regex_and_tuple_selector(fp32_model, prompts, tmp_path):
    model = fp32_model.model
    ids = _ids(fp32_model, prompts[0])
    with torch.inference_mode(), parity.capture(
            model, tmp_path / "d", taps=["**.layers.1.mlp", "re:model\\.layers\\.[23]\\.self_attn", "lm_head"]):
        model(input_ids=ids)
    names = [r.name for r in load_run(tmp_path / "d").records]
    assert names == ["model.layers.1.mlp", "model.layers.2.self_attn.0", "model.layers.2.self_attn.1",
                     "model.layers.3.self_attn.0", "model.layers.3.self_attn.1", "lm_head"]


def test_explicit_dump_is_free_outside_capture_and_recorded_inside(tmp_path):
    parity.dump("nowhere", torch.ones(3))  # no capture active: nothing happens, nothing raises
    model = torch.nn.Linear(3, 3)
    with parity.capture(model, tmp_path / "d", taps=[]) as session:
        model(torch.ones(3))
        parity.dump("engine.scores", torch.arange(4.0), request=7)
        model(torch.ones(3))
        parity.dump("engine.scores", torch.arange(4.0) * 2)
    assert session.error is None
    run = load_run(tmp_path / "d")
    scores = [r for r in run.records if r.name == "engine.scores"]
    assert [r.step for r in scores] == [0, 1]
    assert scores[0].tags == {"explicit": True, "request": 7}
    assert run.array(scores[1]).tolist() == [0.0, 2.0, 4.0, 6.0]


def test_process_wide_dump_from_environment_variable(tmp_path):
    out = tmp_path / "proc"
    script = textwrap.dedent("""
        import torch, parity
        parity.dump("a", torch.ones(2, 2))
        parity.next_step()
        parity.dump("a", torch.zeros(2, 2), note="second")
    """)
    env = {**os.environ, "PARITY_DUMP_DIR": str(out)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run = load_run(out)
    assert [(r.name, r.step) for r in run.records] == [("a", 0), ("a", 1)]
    assert run.records[1].stats["zero"] == 4
    header = json.loads((out / "manifest-rank0.jsonl").read_text().splitlines()[0])
    assert header["type"] == "header" and header["format_version"].startswith("1.")


def test_process_wide_statistics_mode_and_a_bad_mode_that_does_not_break_the_host(tmp_path):
    script = textwrap.dedent("""
        import torch, parity
        parity.dump("a", torch.arange(100.0))
        print("host ran", parity.next_step())
    """)
    for mode in ("stats", "bogus"):
        env = {**os.environ, "PARITY_DUMP_DIR": str(tmp_path / mode), "PARITY_DUMP_MODE": mode}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 0 and "host ran" in result.stdout, result.stderr
    run = load_run(tmp_path / "stats")
    assert run.header.mode == "stats" and run.records[0].file is None
    from parity.store.format import sample_positions

    assert run.records[0].stats["sample"] == [float(p) for p in sample_positions(100, 32)]  # values = positions
    assert not (tmp_path / "bogus").exists()
    assert "PARITY_DUMP_MODE" in result.stderr and "Traceback" not in result.stderr


def test_non_finite_statistics_and_tags_do_not_stop_capture(tmp_path):
    model = torch.nn.Sequential(torch.nn.Identity())
    with parity.capture(model, tmp_path / "d") as session:
        model(torch.full((4,), 1e300, dtype=torch.float64))  # its L2 norm overflows float64
        parity.dump("scaled", torch.ones(2), scale=float("nan"))
    assert session.error is None
    run = load_run(tmp_path / "d")
    assert [r.name for r in run.records] == ["0", "scaled"]
    assert run.records[0].stats["l2"] == "inf" and run.records[1].tags["scale"] == "nan"


def test_repeated_names_get_call_suffixes_and_never_collide(tmp_path):
    model = torch.nn.Linear(2, 2)
    with parity.capture(model, tmp_path / "d", taps=[]):
        parity.dump("x", torch.ones(1), step=0)
        parity.dump("x", torch.ones(1), step=0)
        model(torch.ones(2))
        model(torch.ones(2))
        parity.dump("x", torch.ones(1), step=0)
    run = load_run(tmp_path / "d")
    assert sorted((r.name, r.step) for r in run.records) == [("x", 0), ("x#1", 0), ("x#2", 0)]
