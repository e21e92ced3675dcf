"""How a training text becomes token ids: one rule for the data stage, training and evaluation.

MLX-LM's text dataset encodes a row and appends the tokenizer's EOS unless
the text already ends with it; masked training encodes ``prompt +
completion`` as one string (the tokens the model sees at inference time)
and finds where the completion starts. ``process_data.py --tokenizer``
counts tokens with the same rule, so its ``too_long`` check and training's
``max_seq_length`` agree on every record.
"""
from __future__ import annotations

from typing import Any, Sequence


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    """``ids`` ending with EOS, as MLX-LM's TextDataset builds a row (the model learns to stop)."""
    if eos is not None and (not ids or ids[-1] != eos):
        return [*ids, eos]
    return ids


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a raw training text, EOS appended (MLX-LM's rule)."""
    return with_eos(list(tokenizer.encode(text)), getattr(tokenizer, "eos_token_id", None))


def count_tokens(tokenizer: Any, texts: Sequence[str], batch_size: int = 256, progress: bool = True) -> list[int]:
    """Token counts of ``texts`` by :func:`encode_text`'s rule, tokenized in batches."""
    from tqdm import tqdm

    eos = getattr(tokenizer, "eos_token_id", None)
    out: list[int] = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="tokenizing", unit="batch", disable=None if progress else True, leave=False):
        for ids in tokenizer(list(texts[start : start + batch_size]))["input_ids"]:
            out.append(len(with_eos(list(ids), eos)))
    return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], int, bool]:
    """Tokens of ``prompt + completion`` and the index where the completion starts.

    Tokenizing the concatenation keeps the tokens the model sees at inference
    time. If a token straddles the boundary (BPE merged across it), the
    offset is the longest common prefix, so the straddling token counts as
    prompt (masked). Returns ``(tokens, offset, merged_across_boundary)``.
    """
    full = list(tokenizer.encode(prompt + completion))
    ptoks = list(tokenizer.encode(prompt))
    if full[: len(ptoks)] == ptoks:
        return full, len(ptoks), False
    return full, common_prefix(full, ptoks), True


def encode_turns(tokenizer: Any, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[tuple[int, int]], int]:
    """Tokens of a conversation and the token span ``[start, end)`` of every completion.

    ``turns``: ``PromptTemplate.training_turns`` (each ``prefix + completion``
    is a prefix of the full text, the last one is the full text). The whole
    text is encoded once; each span's ends are where the encodings of the
    text up to there stop agreeing with it (a token that straddles a
    boundary counts as prompt, as in :func:`encode_pair`). Returns
    ``(tokens, spans, boundaries merged across)``.
    """
    prefix, completion = turns[-1]
    full = list(tokenizer.encode(prefix + completion))
    spans: list[tuple[int, int]] = []
    merged = 0
    for prefix, completion in turns:
        ptoks = list(tokenizer.encode(prefix))
        ctoks = list(tokenizer.encode(prefix + completion))
        start, end = common_prefix(full, ptoks), common_prefix(full, ctoks)
        merged += int(start != len(ptoks)) + int(end != len(ctoks))
        if end > start:
            spans.append((start, end))
    return full, spans, merged


__all__ = ["encode_turns", "with_eos", "encode_text", "count_tokens", "common_prefix", "encode_pair"]
