"""Capturing activations: forward hooks on nn.Modules, explicit dumps, background writing.

``parity.capture.taps`` is torch-free (comparison uses its patterns); everything else here
imports torch, so ``capture`` is loaded on first use.
"""

from typing import Any

__all__ = ["capture"]


def __getattr__(name: str) -> Any:
    if name == "capture":
        from parity.capture.hooks import capture

        return capture
    raise AttributeError(name)
