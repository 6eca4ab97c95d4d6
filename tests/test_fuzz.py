"""A seeded, bounded fuzz of the dump readers (scripts/fuzz_dumps.py; longer runs: its --cases).

Every hostile mutant of a real dump — flipped data or header bytes, truncated shards, hostile
manifest values, huge numbers and deep nesting, broken manifest and step lines, symlinks,
directories, FIFOs and devices in place of shards or manifests — is
either refused with one ``parity: error:`` line and exit 2, or read correctly when its tensor
bytes are intact; never a traceback, a hang, a memory blow-up or a silent pass.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_dumps.py"


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_dumps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_dumps"] = module
    spec.loader.exec_module(module)
    return module


def test_seeded_fuzz_of_the_readers_finds_nothing_unhandled(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_PROGRESS_INTERVAL", "0")
    fuzz = _fuzz_module()
    results = fuzz.run_fuzz(cases=240, seed=11, workdir=tmp_path)
    kinds = Counter(r.mutant.kind for r in results)
    assert set(kinds) == {"data byte flip", "shard header byte", "shard header entry", "truncated shard",
                          "record field", "header field", "manifest lines", "filesystem", "raw json",
                          "step line"}, kinds
    failures = [f"{r.mutant.kind} ({r.mutant.detail}): {'; '.join(r.failures)}" for r in results if r.failures]
    assert not failures, "\n".join(failures)
    # the fuzz judges something: corrupted data was among the cases, and it was refused
    assert sum(r.mutant.data_changed for r in results) > 60


def test_the_fuzz_judge_flags_a_silent_pass_and_an_internal_error():
    fuzz = _fuzz_module()
    flipped = fuzz.Mutant("data byte flip", "x", data_changed=True)
    assert fuzz.judge(flipped, "compare", 0, "") is not None
    assert fuzz.judge(flipped, "compare", 2, "parity: error: corrupted data: ...\n") is None
    assert fuzz.judge(fuzz.Mutant("record field", "x"), "inspect", 2,
                      "parity: internal error: MemoryError ...\n") is not None
