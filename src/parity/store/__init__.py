"""The dump format: manifest schema, writer, validating lazy reader.

A dump directory holds, per rank ``r``:

- ``manifest-rank{r}.jsonl``: JSON Lines, append-only. Line 1 is the run header; then
  ``record`` lines (one per captured tensor), ``step`` lines (per-step metadata: token ids,
  positions, sequence lengths) and ``note`` lines (things capture skipped or gave up on).
- ``data/rank{r}/shard-NNNNNN.safetensors``: tensor bytes, many records per file.

A record line is appended only after the shard holding its data was written to a temporary
name, fsynced and renamed, so a killed process leaves a readable prefix.
"""

from parity.store.format import FORMAT_VERSION, Record, RunHeader
from parity.store.reader import Run, load_run

__all__ = ["FORMAT_VERSION", "Record", "RunHeader", "Run", "load_run"]
