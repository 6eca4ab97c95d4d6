"""pytest plugin (entry point ``pytest11: parity``): one test suite, the profile of its platform.

Options:

- ``--parity-backend NAME``: the backend whose profile entries apply (default: the
  ``PARITY_BACKEND`` environment variable, else none: only backend-less entries apply).
- ``--parity-profile FILE``: the tolerance profile (default: the ``[tool.parity]`` table of
  ``pyproject.toml`` in pytest's rootdir, when it has tolerance entries; else none).

Fixture ``parity_tolerance`` gives a :class:`ParityTolerance` whose ``assert_close(actual,
expected, name=...)`` is :func:`parity.testing.assert_close` with that profile and backend.
The test report header says which backend and profile are in use.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class ParityTolerance:
    """Profile and backend of this test session; see the module docstring."""

    backend: str | None
    profile: str | None

    def assert_close(self, actual: Any, expected: Any, *, name: str | None = None, **kwargs: Any) -> None:
        """:func:`parity.testing.assert_close` with this session's profile and backend."""
        from parity.testing import assert_close

        kwargs.setdefault("profile", self.profile)
        kwargs.setdefault("backend", self.backend)
        assert_close(actual, expected, name=name, **kwargs)

    def resolve(self, dtype: str, name: str | None = None):
        """The tolerance that applies to ``name`` at ``dtype`` (with its source)."""
        from parity.testing import resolve_tolerance

        return resolve_tolerance(dtype, name=name, profile=self.profile, backend=self.backend)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "parity tolerance profiles")
    group.addoption("--parity-backend", default=None, metavar="NAME",
                    help="backend whose tolerance-profile entries apply (default: $PARITY_BACKEND)")
    group.addoption("--parity-profile", default=None, metavar="FILE",
                    help="tolerance profile (default: [tool.parity] of the rootdir's pyproject.toml)")


def _default_profile(rootdir: Path) -> str | None:
    pyproject = rootdir / "pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    table = data.get("tool", {}).get("parity", {})
    return str(pyproject) if isinstance(table, dict) and "tolerance" in table else None


def _session_tolerance(config: pytest.Config) -> ParityTolerance:
    backend = config.getoption("--parity-backend") or os.environ.get("PARITY_BACKEND") or None
    profile = config.getoption("--parity-profile") or _default_profile(Path(str(config.rootpath)))
    return ParityTolerance(backend=backend, profile=profile)


def pytest_report_header(config: pytest.Config) -> str | None:
    tol = _session_tolerance(config)
    if tol.backend is None and tol.profile is None:
        return None
    return f"parity: backend={tol.backend or '-'} profile={tol.profile or '-'}"


@pytest.fixture(scope="session")
def parity_tolerance(pytestconfig: pytest.Config) -> ParityTolerance:
    """This session's tolerance profile and backend (see the module docstring)."""
    tol = _session_tolerance(pytestconfig)
    if tol.profile is not None:
        from parity.compare.profile import load_profile

        load_profile(tol.profile)  # a broken profile fails at setup with its own message
    return tol
