"""Training examples: JSONL records -> token ids plus the first position that carries loss.

Records with ``question``/``answer`` (the data stage's output) or
``messages`` are rendered with the project template; the prompt is masked
and the completion (the answer followed by the template's end token)
carries the loss, so the model learns to answer and to stop. Records with
only ``text`` (raw MLX-LM data) train on the whole text. Records longer than
``max_seq_length`` are truncated at the end, as MLX-LM does; they are
counted and reported (``process_data.py --tokenizer`` refuses them, by the
same token count, so a prepared data set is never cut).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fishtune.errors import UserError
from fishtune.template import PromptTemplate
from fishtune.tokens import encode_text, encode_turns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One record as token ids and the spans of tokens that carry loss.

    ``spans``: ``[start, end)`` token ranges, one per supervised answer (every
    assistant turn of a conversation); token ``k`` of a span is the target
    predicted from position ``k - 1``, so token 0 never carries loss.
    """

    tokens: np.ndarray  # int32 token ids (already truncated)
    spans: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def offset(self) -> int:
        """The first token that carries loss (the length when none does)."""
        return self.spans[0][0] if self.spans else self.length

    def loss_positions(self) -> np.ndarray:
        """Indices ``k - 1`` of the targets ``k`` that carry loss (into ``tokens[1:]``)."""
        parts = [np.arange(max(s, 1) - 1, e - 1) for s, e in self.spans if e > max(s, 1)]
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)

    @property
    def n_loss(self) -> int:
        return sum(max(0, e - max(s, 1)) for s, e in self.spans)


def _clip(spans: list[tuple[int, int]], n: int) -> tuple[tuple[int, int], ...]:
    return tuple((s, min(e, n)) for s, e in spans if s < n and min(e, n) > s)


@dataclass
class DataReport:
    """What happened while turning one file into examples (for logs and summary)."""

    name: str
    records: int = 0
    masked: int = 0  # prompt masked (question/answer or messages rows)
    answers: int = 0  # supervised answers (every assistant turn of a conversation)
    raw_text: int = 0  # trained on the whole text
    truncated: int = 0
    no_loss_left: int = 0  # prompt alone fills max_seq_length
    boundary_merges: int = 0  # prompt/completion boundary fell inside a token
    total_tokens: int = 0
    loss_tokens: int = 0
    max_length: int = 0
    longest_original: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "notes"}


def record_parts(
    row: dict[str, Any], where: str, template: PromptTemplate, system_prompt: str | None
) -> list[tuple[str, str]] | str:
    """The ``(prefix, completion)`` of every answer to train on, or the raw text.

    ``messages`` records and the data stage's rows (``question``/``answer``
    plus the earlier turns in ``history``) supervise every assistant turn.
    ``where`` is ``file:line`` for error messages.
    """
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    elif "question" in row or "answer" in row:
        for key in ("question", "answer"):
            val = row.get(key)
            if not isinstance(val, str) or not val.strip():
                raise UserError(f"{where}: field {key!r} must be a non-empty string, got {val!r}")
        history = row.get("history") or []
        if not isinstance(history, list) or not all(isinstance(m, dict) for m in history):
            raise UserError(f"{where}: 'history' must be a list of {{role, content}} objects (as process_data.py writes it)")
        msgs = [*history, {"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    elif "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise UserError(f"{where}: field 'text' must be a non-empty string, got {row['text']!r}")
        return row["text"]
    else:
        raise UserError(
            f"{where}: record has none of 'question'+'answer', 'messages' or 'text' (keys: {sorted(row)}); "
            "run process_data.py to produce training records"
        )
    try:
        return template.training_turns(msgs, system_prompt)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def build_examples(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    template: PromptTemplate,
    system_prompt: str | None,
    *,
    mask_prompt: bool,
    max_seq_length: int,
    name: str,
) -> tuple[list[Example], DataReport]:
    """Tokenize records into ``Example``s (see module doc for the formats)."""
    report = DataReport(name=name, records=len(rows))
    examples: list[Example] = []
    for i, row in enumerate(rows):
        parts = record_parts(row, f"{name}:{i + 1}", template, system_prompt)
        if isinstance(parts, list):
            toks, spans, merged = encode_turns(tokenizer, parts)
            report.boundary_merges += merged
            report.masked += 1
            report.answers += len(spans)
            if not mask_prompt:
                spans = [(0, len(toks))]
        else:
            toks = encode_text(tokenizer, parts)
            spans = [(0, len(toks))]
            report.raw_text += 1
        report.longest_original = max(report.longest_original, len(toks))
        if len(toks) > max_seq_length:
            report.truncated += 1
            toks = toks[:max_seq_length]
        ex = Example(np.asarray(toks, dtype=np.int32), _clip(spans, len(toks)))
        if ex.n_loss == 0:
            report.no_loss_left += 1
        report.total_tokens += ex.length
        report.loss_tokens += ex.n_loss
        report.max_length = max(report.max_length, ex.length)
        examples.append(ex)

    if report.raw_text:
        report.notes.append(
            f"{report.raw_text} record(s) of {name} have only 'text': trained on the whole text (no prompt masking)"
        )
    if report.masked and not mask_prompt:
        report.notes.append(f"mask_prompt is off: the loss of {name} covers the prompt too")
    if report.truncated:
        report.notes.append(
            f"{report.truncated} record(s) of {name} are longer than max_seq_length={max_seq_length} tokens "
            f"and were truncated at the end (longest: {report.longest_original} tokens); "
            "raise --max-seq-length to keep them whole"
        )
    if report.no_loss_left:
        report.notes.append(
            f"{report.no_loss_left} record(s) of {name} have no answer tokens left after truncation "
            "and contribute nothing to the loss"
        )
    if report.boundary_merges:
        logger.debug("%s: %d record(s) merged a token across the prompt/answer boundary", name, report.boundary_merges)
    return examples, report


__all__ = ["Example", "DataReport", "record_parts", "build_examples"]
