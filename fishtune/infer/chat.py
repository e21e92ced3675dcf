"""A multi-turn chat session: history kept within a context budget.

Self-contained and thread-agnostic (no globals, no I/O): the chat script
holds one, the server one per user. The prompt for a new question is the
template's rendering of (system prompt, the kept earlier turns, the
question); when it would exceed ``max_context_tokens`` the oldest turns are
dropped first. The current question is never dropped.
"""
from __future__ import annotations

import logging
from typing import Any

from fishtune.errors import UserError
from fishtune.infer.generation import ensure_utf8
from fishtune.template import PromptTemplate

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT_TOKENS = 2048


class ChatSession:
    """History of (question, answer) turns rendered with ``template``.

    ``tokenizer`` counts tokens for the budget (``encode``); without one,
    characters are counted (an upper bound for Qwen2's tokenizer on Chinese).
    ``max_context_tokens`` is the budget of the prompt alone: leave room for
    the answer (``context length - max_tokens``). ``max_turns`` caps the kept
    turns (``None``: no cap).
    """

    def __init__(
        self,
        template: PromptTemplate,
        system_prompt: str | None,
        tokenizer: Any = None,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
        max_turns: int | None = None,
    ):
        if max_context_tokens < 1:
            raise UserError(f"max_context_tokens={max_context_tokens} must be at least 1")
        if max_turns is not None and max_turns < 0:
            raise UserError(f"max_turns={max_turns} must be 0 or more")
        self.template = template
        self.system_prompt = system_prompt or None
        self.tokenizer = tokenizer
        self.max_context_tokens = int(max_context_tokens)
        self.max_turns = max_turns
        self.turns: list[tuple[str, str]] = []
        self.last_dropped = 0  # turns left out of the last prompt_for

    # ---- history -----------------------------------------------------------
    @property
    def messages(self) -> list[dict[str, str]]:
        """The history as chat messages (system first when set)."""
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for q, a in self.turns:
            out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return out

    def add_turn(self, question: str, answer: str) -> None:
        self.turns.append((question, answer))
        if self.max_turns is not None and len(self.turns) > self.max_turns:
            del self.turns[: len(self.turns) - self.max_turns]

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.turns.clear()
        self.last_dropped = 0

    def set_system(self, text: str | None) -> None:
        self.system_prompt = (text or "").strip() or None

    # ---- prompts -----------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text)
        return len(self.tokenizer.encode(text))

    def _render(self, turns: list[tuple[str, str]], question: str) -> str:
        msgs: list[dict[str, str]] = []
        for q, a in turns:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": question})
        return self.template.render_prompt(msgs, self.system_prompt)

    def prompt_for(self, question: str) -> str:
        """The generation prompt for ``question`` with as much recent history as fits."""
        question = question.strip() if isinstance(question, str) else question
        if not question:
            raise UserError("the question is empty; type a question")
        ensure_utf8(question, "the question")
        turns = list(self.turns)
        if self.max_turns is not None:
            turns = turns[-self.max_turns:] if self.max_turns else []  # the newest max_turns (all when fewer)
        dropped = len(self.turns) - len(turns)
        prompt = self._render(turns, question)
        while turns and self.count_tokens(prompt) > self.max_context_tokens:
            turns.pop(0)  # oldest first
            dropped += 1
            prompt = self._render(turns, question)
        if dropped:
            logger.debug("left %d earlier turn(s) out of the prompt (context budget %d tokens)",
                         dropped, self.max_context_tokens)
        if not turns and self.count_tokens(prompt) > self.max_context_tokens:
            logger.warning("the question alone is longer than the context budget (%d tokens)",
                           self.max_context_tokens)
        # Dropped turns are forgotten: they would not fit any later prompt either
        # (which keeps a long-lived server session bounded).
        self.turns = list(self.turns[len(self.turns) - len(turns):]) if turns else []
        self.last_dropped = dropped
        return prompt


__all__ = ["ChatSession", "DEFAULT_MAX_CONTEXT_TOKENS"]
