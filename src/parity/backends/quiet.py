"""Silencing import-time chatter of optional engine dependencies.

With torchao installed, importing transformers or vLLM logs that torchao's CUDA-only kernels
(``_C_mxfp8``, ``_C_cutlass_90a``) cannot load on a CPU machine, and torch's pytree logs
deprecation notices for torchao enums. Harmless, and not what a parity user needs to read:
:func:`quiet_imports` raises those loggers to ERROR (and hides vLLM's FutureWarnings).
"""

from __future__ import annotations

import logging
import warnings


def quiet_imports() -> None:
    """Raise the noisy dependency loggers to ERROR; idempotent."""
    for name in ("torchao", "torch.utils._pytree", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
