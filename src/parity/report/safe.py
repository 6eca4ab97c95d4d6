"""The terminal's console for text that comes from files: everything printed is escaped.

:class:`SafeConsole` passes the text of every segment it prints through
:func:`parity.untrusted.shown` (rich's own styling and cursor control are untouched); with
``markup=False`` (as :func:`parity.report.terminal.make_console` creates it) ``[bold]`` in a
record name stays those characters.
"""

from __future__ import annotations

from typing import Any, Iterable

from rich.console import Console
from rich.segment import Segment

from parity.untrusted import UNSAFE, shown


class SafeConsole(Console):
    """A rich console whose printed text passes through :func:`shown` (its own styling and
    cursor control are untouched: they are segments rich marks as control or styles it emits)."""

    def render(self, renderable: Any, options: Any = None) -> Iterable[Segment]:  # type: ignore[override]
        for segment in super().render(renderable, options):
            if segment.control or not UNSAFE.search(segment.text):
                yield segment
            else:
                yield Segment(shown(segment.text), segment.style, segment.control)
