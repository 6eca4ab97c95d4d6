"""What a greedy generation returns, and how prompts become token ids (no torch needed here).

Prompts go through the tokenizer's chat template when asked (``parity diff --chat``) or, by
default, when the tokenizer has one (:func:`uses_chat`): an instruct model answers a user turn,
not raw text. Both engines get the same token ids (:func:`encode_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parity.errors import UsageError


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat(tokenizer: Any, chat: bool | None) -> bool:
    """``chat`` resolved: True (``--chat``), False (``--raw``), None (default): True exactly when the
    tokenizer has a chat template. ``--chat`` without a template is a :class:`UsageError`."""
    if chat is None:
        return has_chat_template(tokenizer)
    if chat and not has_chat_template(tokenizer):
        raise UsageError("--chat: this model's tokenizer has no chat template", hint="use --raw")
    return chat


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool = False) -> list[int]:
    """Token ids of ``prompt``: raw (the tokenizer's own special tokens added), or as one user turn
    of the chat template followed by the assistant's generation prompt (the template writes its own
    special tokens, so none are added again)."""
    if not chat:
        return list(tokenizer(prompt).input_ids)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


@dataclass
class Generation:
    """One prompt's greedy continuation with the top-k logprobs at every generated position.

    ``topk[j]`` maps token id -> logprob for the k most likely tokens at generated position j
    (plus the chosen token when it is not among them). ``ended_at_eos``: the generation stopped
    at an end-of-sequence token before the requested length. ``chat``: the prompt went through the
    chat template.
    """

    prompt: str
    prompt_ids: list[int]
    tokens: list[int]
    topk: list[dict[int, float]] = field(default_factory=list)
    ended_at_eos: bool = False
    chat: bool = False

    @property
    def sequence(self) -> list[int]:
        """Prompt and continuation: what the other side is teacher-forced on."""
        return [*self.prompt_ids, *self.tokens]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"prompt": self.prompt, "prompt_ids": self.prompt_ids, "tokens": self.tokens,
                "topk": [{str(k): v for k, v in d.items()} for d in self.topk], "ended_at_eos": self.ended_at_eos,
                "chat": self.chat}
