"""parity: find where and why two runs of the same model on different backends disagree.

Public API (heavy modules load on first use, so ``import parity`` stays cheap):

- :func:`capture` — context manager recording module outputs of a torch model to a dump
  directory, or into memory without one (``session.run`` after the block).
- :func:`dump` — explicit tap from inside engine code; one check when no capture is active.
- :func:`next_step` — advance the process-wide step of ``PARITY_DUMP_DIR`` captures.
- :func:`load_run` — read and validate a dump directory.
- :func:`compare` — compare two dumps (directories, loaded runs or capture sessions); returns a :class:`parity.compare.result.Report`. It is
  the ``parity.compare`` package itself, callable (so it stays callable after any
  ``parity.compare.*`` import); options as :func:`parity.compare.engine.compare`, tolerances
  included (``rtol``, ``atol``, ``tol``, ``profile``, ``backend``) and ``twin``.
"""

from __future__ import annotations

from typing import Any

from parity._explicit import dump, next_step

__version__ = "0.1.0"
__all__ = ["capture", "dump", "next_step", "load_run", "compare", "__version__"]


def __dir__() -> list[str]:
    """The public API (what ``__all__`` lists), not the module's helpers."""
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    if name == "capture":
        from parity.capturing.hooks import capture

        return capture
    if name == "load_run":
        from parity.store.reader import load_run

        return load_run
    if name == "compare":  # the package, callable as the function (see parity/compare/__init__.py)
        import parity.compare

        return parity.compare
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
