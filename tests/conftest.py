"""Shared fixtures: the built-in tiny Llama, loaded once per session, and captured dumps.

Every fixture uses the real model and real transformers; nothing is mocked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# commands run here write to pipes: no timed progress lines on their stderr, which several tests
# read as "one error line" (test_cli turns them on to test them)
os.environ.setdefault("PARITY_PROGRESS_INTERVAL", "0")
# pytest imports readline, which exports COLUMNS/LINES of the terminal into the process's C-level
# environment (not os.environ): commands started here would inherit a width of 80. Unset them.
for _name in ("COLUMNS", "LINES"):
    os.environ[_name] = ""
    del os.environ[_name]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from parity.backends.hf import DEFAULT_MODEL

    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    from parity.backends.hf import read_prompts

    return read_prompts(None)


@pytest.fixture(scope="session")
def fp32_model(tiny_model_dir):
    """The tiny model under dtype=float32,attn=eager (shared: tests must not modify it)."""
    from parity.backends.hf import load
    from parity.backends.spec import parse_spec

    return load(tiny_model_dir, parse_spec("dtype=float32,attn=eager"))


@pytest.fixture(scope="session")
def baseline_dump(fp32_model, prompts, tmp_path_factory) -> Path:
    """A dump of the fp32 eager run over the built-in prompts."""
    from parity.backends.hf import run_and_capture

    out = tmp_path_factory.mktemp("dumps") / "baseline"
    run_and_capture(fp32_model, prompts, out)
    return out


@pytest.fixture(scope="session")
def bf16_dump(tiny_model_dir, prompts, tmp_path_factory) -> Path:
    """A dump of the bf16 sdpa run over the built-in prompts."""
    from parity.backends.hf import load, run_and_capture
    from parity.backends.spec import parse_spec

    out = tmp_path_factory.mktemp("dumps") / "bf16"
    run_and_capture(load(tiny_model_dir, parse_spec("dtype=bfloat16,attn=sdpa")), prompts, out)
    return out
