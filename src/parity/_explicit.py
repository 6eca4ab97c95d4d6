"""``parity.dump``: explicit taps from inside engine code; costs one check when inactive.

Active inside a ``parity.capture(...)`` context, or process-wide when the environment variable
``PARITY_DUMP_DIR`` is set when parity is imported (records then go to that directory,
``step`` advances with :func:`next_step`, and the dump is closed at interpreter exit;
``PARITY_DUMP_MODE=stats`` keeps statistics and a sample only, default ``full``; another value
is logged once on the ``parity`` logger and leaves capture off, without raising).
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

            try:
                self._session = CaptureSession.process_wide(self.path)
            except ValueError as exc:  # a bad PARITY_DUMP_MODE must not break the host program
                import logging

                logging.getLogger("parity").warning("parity capture is off: PARITY_DUMP_MODE: %s", exc)
                self._session = False
                return None
            atexit.register(self._session.close)
        return self._session or None

    def record_explicit(self, name: str, tensor: Any, step: int | None, tags: dict[str, Any]) -> None:
        session = self._get()
        if session is not None:
            session.record_explicit(name, tensor, step, tags)

    def next_step(self) -> int:
        session = self._get()
        return session.next_step() if session is not None else -1


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
