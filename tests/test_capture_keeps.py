"""Capture keeps everything the host finished, and never writes what a reader would refuse.

Real torch modules and real files throughout; processes are really killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import parity
from parity.store.reader import load_run


def _kill_after(script: str, out: Path, ready: str = "ready") -> None:
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PARITY_DUMP_DIR": str(out)} if "PARITY_DUMP_DIR" in script else None)
    try:
        line = child.stdout.readline().strip()
        assert line == ready, line
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)


def test_env_dump_mode_keeps_every_finished_step_after_a_kill(tmp_path):
    """PARITY_DUMP_DIR mode: when parity.next_step() returns, every earlier step is on disk."""
    out = tmp_path / "dump"
    script = textwrap.dedent("""
        # PARITY_DUMP_DIR is set for this process
        import itertools, time, torch, parity
        for step in itertools.count():
            for i in range(8):
                parity.dump(f"layer.{i}", torch.full((64, 256), float(step * 10 + i)))
            parity.next_step()
            if step == 3:
                print("ready", flush=True)  # steps 0-3 finished; the host goes on
                time.sleep(60)
    """)
    _kill_after(script, out)
    run = load_run(out)
    by_step = {}
    for record in run.records:
        by_step.setdefault(record.step, []).append(record)
    assert sorted(by_step) == [0, 1, 2, 3], sorted(by_step)
    for step, records in by_step.items():
        assert [r.name for r in records] == [f"layer.{i}" for i in range(8)]
        assert all(float(run.array(r)[0, 0]) == step * 10 + i for i, r in enumerate(records))


class Sparse(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to_sparse()


class Nested(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nested.nested_tensor([x[0], x[1, :2]])


class Meta(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x, device="meta")


class Boom(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Plain(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Odd(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sparse, self.nested, self.meta, self.after = Sparse(), Nested(), Meta(), Plain()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sparse(x)
        self.nested(x)
        self.meta(x)
        return self.after(x)


def test_odd_tensors_are_noted_and_every_other_tap_is_still_captured(tmp_path):
    model = Odd()
    x = torch.arange(12.0).reshape(3, 4)
    with torch.no_grad(), parity.capture(model, tmp_path / "d", taps=["*"]) as session:
        for _ in range(2):
            model(x)
    assert session.error is None
    run = load_run(tmp_path / "d")
    names = [(r.name, r.step) for r in run.records]
    assert names == [("sparse", 0), ("after", 0), ("sparse", 1), ("after", 1)]
    sparse = next(r for r in run.records if r.name == "sparse")
    assert (run.array(sparse) == x.numpy()).all()  # recorded dense
    notes = " ".join(run.notes)
    assert "sparse_coo tensor, recorded dense" in notes and "a nested tensor" in notes and "a meta tensor" in notes


def test_a_failing_hook_is_a_note_and_capture_goes_on(tmp_path):
    model = torch.nn.Sequential(Plain(), Plain(), Plain())
    calls = []

    def broken(module, args, output):
        calls.append(1)
        raise RuntimeError("a hook of the host's own that fails")

    with torch.no_grad(), parity.capture(model, tmp_path / "d") as session:
        handle = model[1].register_forward_hook(broken)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                model(torch.ones(2))
        handle.remove()
        model(torch.ones(2))
    run = load_run(tmp_path / "d")  # readable: no record twice, no half-written step
    assert session.error is None and len(calls) == 3
    assert [(r.name, r.step) for r in run.records if r.step == 3] == [("0", 3), ("1", 3), ("2", 3)]


def test_what_a_reader_would_refuse_is_not_written_and_the_rest_is(tmp_path):
    with parity.capture(torch.nn.Identity(), tmp_path / "d") as session:
        parity.dump("ok.before", torch.ones(3))
        parity.dump("negative", torch.ones(3), step=-1)
        parity.dump("", torch.ones(3))
        parity.dump("x" * 5000, torch.ones(3))
        parity.dump("seventeen", torch.ones([1] * 17))
        parity.dump("ok.after", torch.ones(3))
    assert session.error is None
    run = load_run(tmp_path / "d")  # the reader takes every record the writer wrote
    assert [r.name for r in run.records] == ["ok.before", "ok.after"]
    notes = " ".join(run.notes)
    assert "step' must be an integer >= 0" in notes and "'seventeen' has an invalid shape" in notes
    assert "record name must be a non-empty string" in notes  # the empty and the 5,000-character name


def test_a_folder_with_the_leftovers_of_a_dump_is_not_overwritten(tmp_path):
    out = tmp_path / "d"
    with parity.capture(torch.nn.Identity(), out):
        parity.dump("first", torch.ones(3))
    (out / "manifest-rank0.jsonl").unlink()  # a dump that lost its manifest: shards remain
    before = {p: p.read_bytes() for p in out.rglob("*.safetensors")}
    with parity.capture(torch.nn.Identity(), out) as session:
        parity.dump("second", torch.zeros(3))
    assert session.error is not None and "holds parts of a dump" in session.error
    assert {p: p.read_bytes() for p in out.rglob("*.safetensors")} == before


def test_a_compiled_model_captured_after_warm_up_records_its_submodules(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    compiled = torch.compile(model)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
        compiled(x)  # warm-up: compiled without hooks
        with parity.capture(compiled, tmp_path / "compiled") as session:
            got = compiled(x)
        with parity.capture(model, tmp_path / "eager"):
            model(x)
    assert torch.allclose(got, expected, atol=1e-6)
    run = load_run(tmp_path / "compiled")
    assert [r.name for r in run.records] == ["0", "1", "2"]  # the eager names: pairs with an eager dump
    assert any("torch.compile'd" in n for n in run.notes) and session.error is None
    assert parity.compare(tmp_path / "eager", tmp_path / "compiled").verdict == "pass"
