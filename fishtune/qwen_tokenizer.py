"""The real Qwen2 tokenizer, rebuilt offline from ``qwen.tiktoken``.

Qwen2 shares its byte-level BPE with Qwen(1), whose ranks ship as
``dashscope/resources/qwen.tiktoken`` inside the PyPI wheel
``dashscope==2.0.2``. Tests and the smoke model must never touch the Hugging
Face hub, so we turn those ranks into the same Hugging Face ``tokenizers``
files Qwen/Qwen2-1.5B ships (tokenizer.json, tokenizer_config.json,
vocab.json, merges.txt): 151643 BPE tokens plus three special added tokens.

How ranks become merges: tiktoken merges the adjacent pair whose concatenation
has the lowest rank. Re-running that BPE on a token's own bytes, using only
ranks below the token's rank, must end in exactly two parts; those two parts
are the HF merge, and ordering merges by the token's rank reproduces
tiktoken's priorities exactly.

We only *read* the data file from the wheel; dashscope itself is never
imported (it pulls in network clients we don't need).
"""
from __future__ import annotations

import base64
import functools
import importlib.metadata
import json
import logging
import os
from pathlib import Path

from fishtune.errors import UserError
from fishtune.fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenizer regex (tokenizer.json of Qwen/Qwen2-1.5B).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: dict[str, int] = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
NUM_BPE_TOKENS = 151643

# The chat template Qwen/Qwen2-1.5B (base) ships in tokenizer_config.json.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

_INSTALL_HINT = "pip install dashscope==2.0.2 (its wheel ships the Qwen BPE ranks)"


def find_qwen_tiktoken() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed dashscope wheel."""
    try:
        dist = importlib.metadata.distribution("dashscope")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"qwen.tiktoken not found: package dashscope is not installed; {_INSTALL_HINT}") from None
    for f in dist.files or []:
        if f.name == "qwen.tiktoken":
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise UserError(
        f"qwen.tiktoken not found in dashscope {dist.version} ({dist.locate_file('dashscope')}); {_INSTALL_HINT}"
    )


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a ``base64token rank`` file into ``{token_bytes: rank}``."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
            except ValueError:
                raise UserError(
                    f"{path}:{lineno}: expected 'base64token rank', got {line[:60]!r}; reinstall: {_INSTALL_HINT}"
                ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps; reinstall: {_INSTALL_HINT}")
    return ranks


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _split_by_bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on ``token`` using only merges ranked below ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_i = -1
        best_rank = max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_i, best_rank = i, r
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def ranks_to_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """Byte-level vocab (``{token: id}``) and ``"a b"`` merges in priority order."""
    b2u = bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[str] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[enc(token)] = rank
        if len(token) == 1:
            continue
        parts = _split_by_bpe(ranks, token, rank)
        if len(parts) != 2:
            raise UserError(
                f"qwen.tiktoken: token rank {rank} ({token!r}) cannot be built from two lower-ranked tokens; "
                f"the file is corrupt, reinstall: {_INSTALL_HINT}"
            )
        merges.append(f"{enc(parts[0])} {enc(parts[1])}")
    if len(vocab) != len(ranks):
        raise UserError(f"qwen.tiktoken: duplicate tokens after byte-level mapping; reinstall: {_INSTALL_HINT}")
    return vocab, merges


def _added_token(content: str, token_id: int) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def tokenizer_json(vocab: dict[str, int], merges: list[str]) -> dict:
    """tokenizer.json laid out like Qwen/Qwen2-1.5B's."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(t, i) for t, i in SPECIAL_TOKENS.items()],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level,
            ],
        },
        # ByteLevel post-processing only adjusts offsets; it adds no tokens.
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config(chat_template: str | None = None) -> dict:
    """tokenizer_config.json like Qwen/Qwen2-1.5B's."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {k: v for k, v in _added_token(t, i).items() if k != "id"} for t, i in SPECIAL_TOKENS.items()
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": chat_template if chat_template is not None else QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


@functools.lru_cache(maxsize=2)
def _cached_files(tiktoken_path: str) -> tuple[str, str, str]:
    """(tokenizer.json, vocab.json, merges.txt) texts; computed once per process."""
    logger.info("rebuilding the Qwen2 tokenizer from %s", tiktoken_path)
    ranks = load_tiktoken_ranks(tiktoken_path)
    if len(ranks) != NUM_BPE_TOKENS:
        raise UserError(
            f"{tiktoken_path}: expected {NUM_BPE_TOKENS} tokens, found {len(ranks)}; {_INSTALL_HINT}"
        )
    vocab, merges = ranks_to_vocab_and_merges(ranks)
    tok_json = json.dumps(tokenizer_json(vocab, merges), ensure_ascii=False, indent=2) + "\n"
    vocab_json = json.dumps(vocab, ensure_ascii=False) + "\n"
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return tok_json, vocab_json, merges_txt


def build_qwen2_tokenizer(
    out_dir: str | os.PathLike,
    tiktoken_path: str | os.PathLike | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write Qwen2's tokenizer files into ``out_dir`` (created if needed).

    ``tiktoken_path`` defaults to the file in the installed dashscope wheel.
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    src = Path(tiktoken_path) if tiktoken_path is not None else find_qwen_tiktoken()
    if not src.is_file():
        raise UserError(f"qwen.tiktoken not found at {src}; {_INSTALL_HINT}")
    tok_json, vocab_json, merges_txt = _cached_files(str(src.resolve()))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok_json)
    atomic_write_text(out / "vocab.json", vocab_json)
    atomic_write_text(out / "merges.txt", merges_txt)
    atomic_write_json(out / "tokenizer_config.json", tokenizer_config(chat_template))
    return out
