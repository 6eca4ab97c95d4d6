"""Name mapping files for whole module trees (``parity compare --map FILE``).

Two dumps of one model from different frameworks name their modules differently
(MindSpore's ``network.layers.0.attention`` against PyTorch's ``model.layers.0.self_attn``).
A mapping file says how **target** names become baseline names; it is turned into ``--rename``
rules (``REGEX=TEMPLATE``, applied to target names before pairing, before any ``--rename``
given on the command line). JSON, or YAML when PyYAML is installed (read with
``yaml.safe_load``: plain data only). Two forms:

- **msProbe layer mapping** (the ``layer_mapping.yaml`` msProbe's compare takes): every value
  is an object, ``{CLASS: {TARGET_CHILD: BASELINE_CHILD}}``. parity records carry no class per
  path segment, so each pair renames that child name wherever it is a whole segment (or run of
  segments) of a name: ``attention: self_attn`` turns ``network.layers.0.attention.dense`` into
  ``network.layers.0.self_attn.dense``. The same child mapped two ways under two classes is
  refused (ambiguous without classes).
- **prefixes** (msProbe's data mapping files are this with full names): every value is a
  string, ``{TARGET_PREFIX: BASELINE_PREFIX}``: a name equal to the prefix or continuing it
  with ``.`` has it replaced: ``network: model`` turns ``network.layers.0`` into
  ``model.layers.0``. Longer prefixes are tried first.

A name is renamed by every rule that matches, in that order (prefixes, then segment rules).
Files over :data:`MAX_BYTES` (1 MiB) or with more than :data:`MAX_RULES` (10,000) entries are
refused; an entry that is not a non-empty dotted name, or a baseline name holding ``=`` (the
rename syntax's separator), is a :class:`~parity.errors.UsageError` naming it.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

from parity.errors import UsageError

MAX_BYTES = 1 << 20
MAX_RULES = 10_000
#: A dotted name: no whitespace, ``=``, backslash, control character or invisible/bidi mark.
_NAME = re.compile(r"[^\s=\\\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]+")


def _read(path: Path) -> Any:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read, a device never end
            raise UsageError(f"--map {path}: not a regular file")
        if info.st_size > MAX_BYTES:
            raise UsageError(f"--map {path}: larger than {MAX_BYTES} bytes")
        with path.open("rb") as handle:  # at most MAX_BYTES + 1, whatever the size said
            raw = handle.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise UsageError(f"--map {path}: larger than {MAX_BYTES} bytes")
        text = raw.decode("utf-8")
    except OSError as exc:
        raise UsageError(f"--map {path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--map {path}: not UTF-8 text") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--map {path}: not valid JSON ({exc})") from None
        except RecursionError:
            raise UsageError(f"--map {path}: not a mapping file (nested too deeply)") from None
    try:
        import yaml
    except ImportError:
        raise UsageError(f"--map {path}: YAML mapping files need PyYAML (pip install pyyaml); "
                         "a .json file needs nothing") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"--map {path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    except RecursionError:
        raise UsageError(f"--map {path}: not a mapping file (nested too deeply)") from None


def _name(value: Any, path: Path, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value.startswith(".") or value.endswith("."):
        raise UsageError(f"--map {path}: {what} {value!r} is not a dotted module name (no spaces, '=', backslashes or control characters)")
    return value


def mapping_renames(path: str | Path) -> list[str]:
    """The ``REGEX=TEMPLATE`` rename rules of a mapping file (see the module docstring)."""
    path = Path(path)
    data = _read(path)
    if not isinstance(data, dict) or not data:
        raise UsageError(f"--map {path}: expected a non-empty mapping of names")
    prefixes: dict[str, str] = {}
    segments: dict[str, str] = {}
    if all(isinstance(v, dict) for v in data.values()):
        for cls, children in data.items():
            for child, baseline in children.items():
                child, baseline = _name(child, path, "name"), _name(baseline, path, "name")
                if segments.get(child, baseline) != baseline:
                    raise UsageError(f"--map {path}: {child!r} maps to {segments[child]!r} and to {baseline!r} "
                                     f"(under {cls!r}); parity renames by name, not class")
                segments[child] = baseline
    elif all(isinstance(v, str) for v in data.values()):
        prefixes = {_name(k, path, "name"): _name(v, path, "name") for k, v in data.items()}
    else:
        raise UsageError(f"--map {path}: values must be all objects (msProbe layer mapping: CLASS: {{child: child}}) "
                         "or all strings (TARGET_PREFIX: BASELINE_PREFIX)")
    if len(prefixes) + len(segments) > MAX_RULES:
        raise UsageError(f"--map {path}: more than {MAX_RULES} entries")
    rules = [f"^{re.escape(k)}(?=\\.|$)={v}" for k, v in sorted(prefixes.items(), key=lambda kv: -len(kv[0]))]
    rules += [f"(?<![^.]){re.escape(k)}(?=\\.|$)={v}" for k, v in segments.items() if k != v]
    return rules
