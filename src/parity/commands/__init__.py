"""The ``parity`` commands, one module per theme; ``parity.cli`` registers them on its group.

- :mod:`.compare_cmds`: ``compare``, ``diff``, ``inspect``
- :mod:`.root_cause_cmds`: ``explain``, ``inject``
- :mod:`.tolerance_cmds`: ``calibrate``
- :mod:`.engine_cmds`: ``matrix``, ``scores``
- :mod:`.report_cmd`: ``report``; :mod:`.watch_cmd`: ``watch``
- :mod:`.common`: shared options, tolerance policy, progress bar, compare-and-report

Command modules import only click (and this package) at module level, so ``parity --help`` stays
free of torch and numpy; everything heavy is imported inside the command functions.
"""

from __future__ import annotations

#: Click context settings shared with ``parity.cli`` (``-h`` for help, 100-column help text).
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
