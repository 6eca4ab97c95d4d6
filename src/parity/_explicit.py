"""``parity.dump``: explicit taps from inside engine code; costs one check when inactive.

Active inside a ``parity.capture(...)`` context, or process-wide when the environment variable
``PARITY_DUMP_DIR`` is set when parity is imported (records then go to that directory,
``step`` advances with :func:`next_step`, and the dump is closed at interpreter exit).
This module imports nothing heavy; torch is imported on the first recorded tensor.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

#: The session that receives explicit dumps, or None (the common, free case).
_active: Any = None


def dump(name: str, tensor: Any, *, step: int | None = None, **tags: Any) -> None:
    """Record ``tensor`` under ``name`` in the active capture; a no-op when none is active.

    ``step`` defaults to the capture's current forward pass (inside ``parity.capture``) or to the
    process-wide step (see :func:`next_step`). ``tags`` (JSON-serialisable values) are stored
    with the record. Never raises into the caller: errors disable capture and are logged once.
    """
    session = _active
    if session is None:
        return
    session.record_explicit(name, tensor, step, tags)


def next_step() -> int:
    """Advance the active capture to a new step (forward pass); returns the new step, or -1."""
    session = _active
    if session is None:
        return -1
    return session.next_step()


class _ProcessSession:
    """Process-wide capture into ``PARITY_DUMP_DIR``, opened on the first dump."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._session: Any = None

    def _get(self) -> Any:
        if self._session is None:
            from parity.capturing.session import CaptureSession

            self._session = CaptureSession.process_wide(self.path)
            atexit.register(self._session.close)
        return self._session

    def record_explicit(self, name: str, tensor: Any, step: int | None, tags: dict[str, Any]) -> None:
        self._get().record_explicit(name, tensor, step, tags)

    def next_step(self) -> int:
        return self._get().next_step()


def _activate(session: Any) -> Any:
    """Make ``session`` the target of :func:`dump`; returns the previous one."""
    global _active
    previous, _active = _active, session
    return previous


def _restore(previous: Any) -> None:
    global _active
    _active = previous


if os.environ.get("PARITY_DUMP_DIR"):
    _active = _ProcessSession(os.environ["PARITY_DUMP_DIR"])
