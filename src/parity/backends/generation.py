"""What a greedy generation returns, engine-independent (no torch needed to read it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Generation:
    """One prompt's greedy continuation with the top-k logprobs at every generated position.

    ``topk[j]`` maps token id -> logprob for the k most likely tokens at generated position j
    (plus the chosen token when it is not among them).
    """

    prompt: str
    prompt_ids: list[int]
    tokens: list[int]
    topk: list[dict[int, float]] = field(default_factory=list)

    @property
    def sequence(self) -> list[int]:
        """Prompt and continuation: what the other side is teacher-forced on."""
        return [*self.prompt_ids, *self.tokens]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"prompt": self.prompt, "prompt_ids": self.prompt_ids, "tokens": self.tokens,
                "topk": [{str(k): v for k, v in d.items()} for d in self.topk]}
