"""Progress of long-running work, on stderr.

On a terminal: a rich progress bar (transient). Elsewhere (CI logs, pipes): a plain line
``[parity 35s] capturing target 2/4`` every :data:`INTERVAL` seconds (default 5 s; the
``PARITY_PROGRESS_INTERVAL`` environment variable overrides it, ``0`` turns the lines off)
for the task that is under way, so a log shows where the time goes even while one call (a
model load, a first ``torch.compile``) blocks for a minute. A command that ends within the
interval prints no progress line, so quick commands keep a quiet stderr. Progress lines always start
with ``[parity `` and never carry ``error``.

stdout is never written: reports stay clean when redirected.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

#: Seconds between two plain progress lines (``PARITY_PROGRESS_INTERVAL`` overrides).
INTERVAL = 5.0
#: Prefix of every plain progress line.
PREFIX = "[parity "


@dataclass
class _Task:
    description: str
    total: int | None
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    touched: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total


def interval_from_env() -> float:
    """:data:`INTERVAL`, or ``PARITY_PROGRESS_INTERVAL`` (seconds) when it is a number >= 0."""
    try:
        value = float(os.environ.get("PARITY_PROGRESS_INTERVAL", INTERVAL))
    except ValueError:
        return INTERVAL
    return value if value >= 0 else INTERVAL


class Progress:
    """Progress of a command's tasks on stderr: a bar on a terminal, timed plain lines otherwise.

    Use as a context manager; :meth:`task` starts a task and returns ``update(done, total, *_)``.
    ``interval`` (default None: :func:`interval_from_env`) is the plain-line period in seconds.
    """

    def __init__(self, interval: float | None = None) -> None:
        self.bar = None
        self.interval = interval_from_env() if interval is None else interval
        self._tasks: list[_Task] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._last_line = 0.0
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)

    def __enter__(self) -> "Progress":
        if self.bar is not None:
            self.bar.__enter__()
        elif self.interval > 0:
            self._thread = threading.Thread(target=self._tick, name="parity-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def task(self, description: str, total: int | None = None) -> Callable[..., None]:
        """Start a task; returns ``update(done, total=None, *_)`` (extra arguments are ignored)."""
        state = _Task(description, total)
        with self._lock:
            self._tasks.append(state)
        task_id = self.bar.add_task(description, total=total) if self.bar is not None else None

        def update(done: int, total: int | None = None, *_: Any) -> None:
            with self._lock:
                state.done = done
                state.total = total if total is not None else state.total
                state.touched = time.monotonic()
            if self.bar is not None:
                self.bar.update(task_id, completed=done, total=state.total)
        return update

    def current_line(self, now: float | None = None) -> str | None:
        """The plain line for the task under way (the last one touched that has not finished)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            open_tasks = [t for t in self._tasks if not t.finished]
            if not open_tasks:
                return None
            t = max(open_tasks, key=lambda t: t.touched)
            count = f" {t.done}/{t.total}" if t.total is not None and t.total > 1 else ""
            return f"{PREFIX}{now - self._started:.0f}s] {t.description}{count} ({now - t.started:.0f}s in this step)"

    def _tick(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            now = time.monotonic()
            if now - max(self._last_line, self._started) < self.interval:
                continue
            line = self.current_line(now)
            if line is not None:
                self._last_line = now
                print(line, file=sys.stderr, flush=True)
