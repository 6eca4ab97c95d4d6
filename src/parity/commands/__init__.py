"""Click commands that live outside ``parity.cli``: ``report`` (:mod:`.report_cmd`) and ``watch``
(:mod:`.watch_cmd`). ``parity.cli`` registers them with ``cli.add_command``.

Command modules import only click (and this package) at module level, so ``parity --help`` stays
free of torch and numpy; everything heavy is imported inside the command functions.
"""

from __future__ import annotations

#: Click context settings shared with ``parity.cli`` (``-h`` for help, 100-column help text).
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
