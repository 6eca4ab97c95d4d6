"""Choosing taps: which module outputs to record.

A tap pattern matches qualified module names (``model.layers.2.mlp``):

- a glob, segment-aware: ``*`` matches within one dotted segment, ``**`` matches any number of
  segments (including none), ``?`` one character within a segment. ``**.layers.*.mlp`` matches
  ``model.layers.2.mlp`` but not ``model.layers.2.mlp.down_proj``.
- ``re:REGEX``: a Python regex matched against the whole name (``re.fullmatch``).
- either may end in ``[k]`` to record only element ``k`` of a tuple output, under the module's
  own name (``**.self_attn[0]`` records an attention module's output, not its weights).

:data:`DECODER_LM_TAPS` is the default for decoder-only LMs in transformers naming (Llama,
Qwen2, Mistral and relatives): embeddings, every decoder layer, its two norms, attention and
MLP outputs, the final norm and the logits; decoder stacks named otherwise (GPT-2, GPT-NeoX, …)
get the same parts found from the module tree (:mod:`parity.capturing.structure`).
:data:`ENCODER_TAPS` is the default for BERT-style encoders. When neither matches anything in a model, the default falls back to every leaf
module (:func:`select_taps`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from parity.errors import UsageError

DECODER_LM_TAPS: tuple[str, ...] = (
    "**.embed_tokens",
    "**.layers.*.input_layernorm",
    "**.layers.*.self_attn[0]",
    "**.layers.*.post_attention_layernorm",
    "**.layers.*.mlp",
    "**.layers.*",
    "model.norm",
    "lm_head",
)

#: Default for encoders in transformers' BERT naming (BERT, MiniLM, RoBERTa…): embeddings, every
#: layer's attention, intermediate (FFN up) and output, and the layer itself.
ENCODER_TAPS: tuple[str, ...] = (
    "**.embeddings",
    "**.encoder.layer.*.attention[0]",
    "**.encoder.layer.*.intermediate",
    "**.encoder.layer.*.output",
    "**.encoder.layer.*[0]",
)

_SELECTOR = re.compile(r"^(?P<pattern>.*)\[(?P<index>\d+)\]$")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Tap:
    """A compiled tap pattern: ``regex`` over module names, optional tuple ``index``."""

    text: str
    regex: re.Pattern[str]
    index: int | None = None

    def matches(self, name: str) -> bool:
        """Whether the qualified module name matches this tap."""
        return self.regex.fullmatch(name) is not None


def glob_to_regex(glob: str) -> str:
    """Translate a segment-aware glob (``**.layers.*.mlp``) to a regex string."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        if glob.startswith("**.", i):
            out.append(r"(?:[^.]+\.)*")
            i += 3
        elif glob.startswith(".**", i) and i + 3 == len(glob):
            out.append(r"(?:\.[^.]+)*")
            i += 3
        elif glob.startswith("**", i):
            out.append(r".*")
            i += 2
        elif glob[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif glob[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def compile_tap(text: str) -> Tap:
    """Compile one tap pattern; a bad regex is a :class:`UsageError`."""
    index = None
    found = _SELECTOR.match(text)
    pattern = text
    if found:
        pattern, index = found.group("pattern"), int(found.group("index"))
    if pattern.startswith("re:"):
        source = pattern[3:]
    else:
        source = glob_to_regex(pattern)
    try:
        regex = re.compile(source)
    except re.error as exc:
        raise UsageError(f"tap pattern {text!r} is not a valid regex: {exc}") from None
    return Tap(text=text, regex=regex, index=index)


def closest_names(pattern: str, names: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` names (or their layer-generalized forms, ``model.layers.*.mlp``) closest to
    ``pattern``, for a message about a pattern that matched nothing."""
    import difflib

    general = [re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names]
    tails = ["**." + ".".join(g.split(".")[-k:]) for g in general for k in (1, 2) if g.count(".") >= k]
    pool = list(dict.fromkeys([*names, *general, *tails]))
    return difflib.get_close_matches(pattern.removeprefix("re:"), pool, n=n, cutoff=0.4)


def unmatched_error(kind: str, patterns: Sequence[str], names: Iterable[str]) -> UsageError:
    """The one error for patterns that matched nothing, naming the closest names."""
    names = list(names)
    hints = [f"{p!r}: closest {', '.join(closest_names(p, names)) or '(none)'}" for p in patterns]
    return UsageError(f"{kind} {', '.join(map(repr, patterns))} matched nothing",
                      hint="; ".join(hints))


def select_taps(names: Iterable[str], patterns: Sequence[str] | str | None,
                leaf_names: Iterable[str] = ()) -> dict[str, Tap]:
    """Map each tapped module name to the first tap that matches it.

    ``patterns=None`` means :data:`DECODER_LM_TAPS`, else :data:`ENCODER_TAPS`, or, when neither
    matches anything, every name in ``leaf_names`` (the model's leaf modules). A single string is
    one pattern. A given pattern that matches no module is a UsageError naming the closest
    module names, raised before anything is captured.
    """
    names = list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    if patterns is not None:
        unmatched = [p for p, tap in ((p, compile_tap(p)) for p in patterns)
                     if not any(tap.matches(name) for name in names)]
        if unmatched:
            raise unmatched_error("tap pattern" + ("s" if len(unmatched) > 1 else ""), unmatched, names)
    chosen: dict[str, Tap] = {}
    for tap_set in ([patterns] if patterns is not None else [DECODER_LM_TAPS, ENCODER_TAPS]):
        taps = [compile_tap(p) for p in tap_set]
        for name in names:
            for tap in taps:
                if tap.matches(name):
                    chosen[name] = tap
                    break
        if chosen:
            break
    if not chosen and patterns is None:
        leaf_tap = Tap(text="<leaf modules>", regex=re.compile(".*"))
        chosen = {name: leaf_tap for name in leaf_names}
    return chosen


def model_taps(model: Any, patterns: Sequence[str] | str | None) -> dict[str, Tap]:
    """:func:`select_taps` over the qualified module names of a torch model (root excluded).

    Default taps (``patterns=None``): :data:`DECODER_LM_TAPS` when they cover the model's layer
    stack with its attention; else, when the model has a decoder stack named otherwise (GPT-2,
    GPT-NeoX, …), the taps :func:`parity.capturing.structure.structural_taps` finds; else
    :data:`ENCODER_TAPS`, else every leaf module."""
    named = [(n, m) for n, m in model.named_modules() if n]
    leaves = [n for n, m in named if not any(True for _ in m.children())]
    names = [n for n, _ in named]
    if patterns is None:
        chosen = select_taps(names, None, leaves)
        covered = any(tap.text == "**.layers.*.self_attn[0]" for tap in chosen.values())
        if not covered and not any(tap.text.startswith("**.encoder.layer") for tap in chosen.values()):
            from parity.capturing.structure import structural_taps

            found = structural_taps(model)
            if found:
                return select_taps(names, found, leaves)
        return chosen
    return select_taps(names, patterns, leaves)


def layer_of(name: str) -> int | None:
    """The layer index in a qualified name (``model.layers.3.mlp`` -> 3), or None."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def tap_kind(name: str) -> str:
    """The name with its layer index replaced by ``{i}`` (``model.layers.{i}.mlp``)."""
    return _LAYER.sub(lambda m: m.group(0).replace(m.group(1), "{i}", 1), name, count=1)
