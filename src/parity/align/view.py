"""A run seen through a transformation (rebuilt ranks, aligned tokens): what every view passes on."""

from __future__ import annotations

from typing import Any

import numpy as np

from parity.store.safetensors_io import to_float


class RunView:
    """Base of the run views the comparison engine accepts in place of a
    :class:`~parity.store.reader.Run`: header, world size, mode and closing come from the
    underlying ``run``; subclasses provide ``records``, ``raw``, ``release``, ``step_tags`` and
    ``findings``."""

    run: Any

    @property
    def header(self) -> Any:
        """The underlying run's header (its lowest rank's)."""
        return self.run.header

    @property
    def world_size(self) -> int:
        """World size of the underlying run."""
        return self.run.world_size

    @property
    def mode(self) -> str:
        """``full`` or ``stats``."""
        return self.run.mode

    def array(self, record: Any, dtype: type = np.float64) -> np.ndarray:
        """The record's (rebuilt, aligned) data widened to ``dtype`` (default float64)."""
        return to_float(self.raw(record), record.dtype, dtype)

    def close(self) -> None:
        """Close the underlying run's files."""
        self.run.close()
