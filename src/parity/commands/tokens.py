"""Token text for reports of dumps: a decoder from a tokenizer folder, found or given.

``parity compare`` labels token positions (the first divergence's worst positions, steps whose
token ids differ) with their text when a tokenizer is known: the folder given with
``--tokenizer``, else the model folder recorded in the baseline dump's header (``model.path``,
written by ``parity diff`` and ``parity.capture(model_info={"path": ...})``) when it holds a
``tokenizer.json``. Only that JSON file is read, with the ``tokenizers`` library (installed with
transformers); nothing is executed. Without one, positions show token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from parity.errors import UsageError

Decoder = Callable[[list[int]], str]


def _load(folder: Path) -> Decoder:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def _recorded_model_path(dump: Path) -> Path | None:
    """The model folder in the first manifest header of ``dump``, or None."""
    for manifest in sorted(dump.glob("manifest-rank*.jsonl"))[:1]:
        try:
            with manifest.open(encoding="utf-8") as fh:
                header = json.loads(fh.readline(1 << 20))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return None
        path = (header.get("model") or {}).get("path") if isinstance(header, dict) else None
        return Path(path) if isinstance(path, str) and "\x00" not in path else None
    return None


def decoder_for(tokenizer: str | None, base_dir: str | Path) -> Decoder | None:
    """A decoder from ``tokenizer`` (a folder with tokenizer.json; a UsageError when it has none or
    cannot be read), else from the baseline dump's recorded model folder (None when there is none)."""
    if tokenizer is not None:
        folder = Path(tokenizer)
        if not (folder / "tokenizer.json").is_file():
            raise UsageError(f"--tokenizer {folder}: no tokenizer.json there")
        try:
            return _load(folder)
        except ImportError:
            raise UsageError("--tokenizer needs the tokenizers package (pip install tokenizers)") from None
        except Exception as exc:
            raise UsageError(f"--tokenizer {folder}: cannot read tokenizer.json ({type(exc).__name__})") from None
    try:
        folder = _recorded_model_path(Path(base_dir))
        return _load(folder) if folder is not None and (folder / "tokenizer.json").is_file() else None
    except Exception:  # a recorded folder that is gone or unreadable: token ids only
        return None
