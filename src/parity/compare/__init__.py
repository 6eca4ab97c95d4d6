"""Comparing two dumps: metrics, tolerance rules, pairing, outcomes, first divergence.

Nothing here imports torch or an engine: tensors are read with numpy from memory maps.
"""


import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    """``parity.compare`` is this package and the function at once: ``parity.compare(a, b)`` and
    ``from parity import compare; compare(a, b)`` keep working after any ``parity.compare.*``
    import (which binds the package to the attribute ``compare`` of ``parity``)."""

    def __call__(self, baseline, target, **options):  # type: ignore[no-untyped-def]
        """:func:`parity.compare.engine.compare` (see there for the options)."""
        from parity.compare.engine import compare

        return compare(baseline, target, **options)


_sys.modules[__name__].__class__ = _CallableModule
