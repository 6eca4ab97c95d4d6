"""Does the model explain reloads reproduce the run that was dumped?

``parity explain`` replays the models named in the dump headers. When the dumped run was patched
in memory (a hook, an edited weight) or the files changed since, the replay explains a different
model — typically a healthy one, "no divergence to explain" while ``compare`` fails. So before
explaining, the first dumped step is run again and every dumped tap of it is compared with the
replay's output of the same module: a relative L2 difference above :data:`REPRODUCE_U` (4) unit
roundoffs of the tap's dtype (a rerun on the same machine is bitwise equal or a few roundings
off) means the replay is not the dumped run, and explain refuses with one line naming the side
and the tap. A difference below it (e.g. a 1% change of one bf16 module: 2.6 roundoffs) is not
seen by this check.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from parity.compare.verdict import unit_roundoff
from parity.errors import UsageError
from parity.explain.recorder import primary, record_forward
from parity.store.safetensors_io import to_float

#: A replayed tap further than this many unit roundoffs (relative L2) from its dump is not the dumped run.
REPRODUCE_U = 4.0


def replay_difference(loaded: Any, run: Any, token_ids: Sequence[int], step: int) -> tuple[str, float] | None:
    """(tap, rel L2 in unit roundoffs) of the dumped tap of ``step`` that the replay of ``loaded``
    reproduces worst, or None when no dumped tap could be matched to a module."""
    modules = dict(loaded.model.named_modules())
    records = {}
    for record in run.records:
        if record.step != step or record.rank != 0 or record.file is None:
            continue
        module = record.name if record.name in modules else record.name.rsplit(".", 1)[0]
        if module in modules and module and (record.name == module or record.name == module + ".0"):
            records.setdefault(module, record)
    if not records:
        return None
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=loaded.spec.device)
    recording = record_forward(loaded.model, records, input_ids=ids, use_cache=False)
    worst: tuple[str, float] | None = None
    for module, record in records.items():
        io = recording.modules.get(module)
        out = primary(io.output) if io is not None else None
        if out is None or tuple(out.shape) != tuple(record.shape):
            continue
        replay = out.detach().to(torch.float64).cpu().numpy().reshape(-1)
        dumped = to_float(run.raw(record).reshape(-1), record.dtype)
        run.release(record)
        norm = float(np.linalg.norm(dumped))
        diff = float(np.linalg.norm(replay - dumped))
        rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
        roundoffs = rel / unit_roundoff(record.dtype)
        if worst is None or roundoffs > worst[1]:
            worst = (record.name, roundoffs)
    return worst


def check_reproduces(loaded: Any, run: Any, token_ids: Sequence[int], step: int, side: str) -> None:
    """Raise UsageError when the replay of ``loaded`` does not reproduce ``run`` (see the module docstring)."""
    found = replay_difference(loaded, run, token_ids, step)
    if found is not None and found[1] > REPRODUCE_U:
        tap, roundoffs = found
        raise UsageError(f"cannot explain: the model reloaded from {loaded.path} does not reproduce the dumped "
                         f"{side} run ({tap} at step {step} differs by {roundoffs:.3g} unit roundoffs)",
                         hint="the run was patched in memory or the files changed since; explain replays "
                              "the model on disk — dump again from it, or explain in Python with the patched "
                              "model (parity.explain.rootcause.explain)")
