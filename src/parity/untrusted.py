"""Showing text that comes from files (record names, specs, notes, paths): as written, escaped.

A dump may come from anyone, so nothing read from it may act on the reader's terminal or
documents: :func:`shown` writes control characters (C0 but tab and newline, DEL, C1: ESC
sequences, bells, the 8-bit CSI), lone surrogates (which no UTF-8 stream can encode) and the
bidirectional overrides (which reorder what is displayed) as ``\\xNN`` / ``\\uNNNN`` escapes.
The terminal console (:class:`parity.report.safe.SafeConsole`) applies it to everything it
prints, the CLI to its error lines, and the HTML, Markdown and JUnit writers to what they embed.
Newlines and tabs are kept; one-line contexts collapse whitespace themselves. No dependencies:
the CLI's error path imports it.
"""

from __future__ import annotations

import re
from typing import Any

#: Characters :func:`shown` escapes.
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: Any) -> str:
    """``str(text)`` with control characters, lone surrogates and bidi overrides escaped."""
    value = str(text)
    return UNSAFE.sub(_escape, value) if UNSAFE.search(value) else value
