"""Token counts for the data stage (``--tokenizer``): the ``too_long`` rule.

Counts follow :func:`fishtune.tokens.count_tokens`, the rule training uses,
so a record this stage keeps is never truncated by ``finetune.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fishtune.data.records import Record, Rejection
from fishtune.errors import UserError
from fishtune.tokens import count_tokens

QWEN2_TOKENIZER = "qwen2"  # --tokenizer value: the real Qwen2 tokenizer, rebuilt offline


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer from a local folder (never the hub).

    ``"qwen2"`` (when no folder has that name) is Qwen2's own tokenizer, rebuilt
    offline from the dashscope wheel's qwen.tiktoken: token counts for the
    default base model without downloading it."""
    p = Path(path)
    if path == QWEN2_TOKENIZER and not p.exists():
        import tempfile

        from fishtune.qwen_tokenizer import build_qwen2_tokenizer

        with tempfile.TemporaryDirectory(prefix="fishtune-qwen2-tok-") as tmp:
            return load_tokenizer(str(build_qwen2_tokenizer(tmp)))
    if not p.is_dir():
        raise UserError(f"--tokenizer {path}: folder not found; pass a local model/tokenizer folder such as "
                        "models/smoke-tiny, or qwen2")
    from transformers import AutoTokenizer  # heavy; only with --tokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)  # a folder; never the hub
    except Exception as exc:  # transformers raises many kinds; all mean "not a tokenizer folder"
        msg = " ".join(str(exc).split())[:160]
        raise UserError(
            f"--tokenizer {path}: cannot load a tokenizer ({type(exc).__name__}: {msg}); "
            "pass a folder holding tokenizer.json/tokenizer_config.json"
        ) from None


def apply_token_limit(
    records: list[Record], tokenizer: Any, max_seq_length: int, wheres: dict[int, str], raws: dict[int, Any]
) -> tuple[list[Record], list[Rejection]]:
    counts = count_tokens(tokenizer, [r.text for r in records])
    keep: list[Record] = []
    bad: list[Rejection] = []
    for rec, n in zip(records, counts):
        rec.tokens = n
        if n > max_seq_length:
            bad.append(Rejection(
                rec.number, wheres[rec.number], "too_long", "answer",
                f"training text is {n} tokens, longer than --max-seq-length {max_seq_length}; "
                "shorten the answer or raise --max-seq-length",
                raws[rec.number],
            ))
        else:
            keep.append(rec)
    return keep, bad
