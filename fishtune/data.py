"""The data stage: raw Q&A records -> validated, deduplicated train/valid/test splits.

Pipeline (``run_pipeline``), in this order so that nothing is written unless
everything checks out:

1. ``read_records``: JSON (array, or object with a ``"data"`` list), JSONL or
   CSV; UTF-8 only (a BOM is fine).
2. ``detect_fields``: question/answer, instruction/output, prompt/completion
   or chat ``messages`` records.
3. ``check_outputs``: refuse to overwrite outputs made from another input or
   with other options unless ``--force``.
4. ``validate_records``: each record becomes a ``Record`` or a ``Rejection``
   with a stable code (``REJECT_CODES``); text is normalised on the way.
5. ``dedup``: exact (same question+answer) and near (same question once
   case, whitespace and punctuation are ignored) duplicates; the first wins.
6. ``split_records``: seeded, stratified by category, deterministic.
7. ``build_report`` + ``write_outputs``: every file written atomically.

Output rows are ``{"id", "text", "question", "answer", "category"[, "tags"][, "history"]}``
(``history``: the earlier messages of a multi-turn chat record).
``text`` is the template's full training text, so the seed's raw
``python -m mlx_lm lora --data data`` trains on exactly what fishtune does.
Rows never hold ``messages`` or ``prompt``+``completion`` keys: MLX-LM picks
its dataset class from the first row's keys and would stop using ``text``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from fishtune.errors import UserError
from fishtune.fileio import atomic_write_json, atomic_write_jsonl
from fishtune.template import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, PromptTemplate, get_template

logger = logging.getLogger(__name__)

REPORT_VERSION = 1

# Stable rejection codes (used in report.json and rejected.jsonl).
REJECT_CODES: dict[str, str] = {
    "not_object": "the record is not a JSON object",
    "missing_field": "a required field is missing",
    "empty_field": "a required field is empty or whitespace only",
    "not_string": "a field is not a string",
    "control_chars": "a field contains control characters (other than newline and tab)",
    "bad_messages": "a chat 'messages' list is malformed",
    "too_long": "the training text is longer than --max-seq-length tokens",
}

# Field pairs tried by auto-detection, in order of preference.
FIELD_PAIRS: tuple[tuple[str, str], ...] = (
    ("question", "answer"),
    ("instruction", "output"),
    ("prompt", "completion"),
)
MESSAGES_FIELD = "messages"
DEFAULT_CATEGORY = "uncategorized"
SPLITS = ("train", "valid", "test")
OUTPUT_FILES = {s: f"{s}.jsonl" for s in SPLITS}
REPORT_FILE = "report.json"
REJECTED_FILE = "rejected.jsonl"
INPUT_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}

# Options that decide what ends up in the splits: outputs made with other
# values come from "another source" and are not overwritten without --force.
FINGERPRINT_KEYS = (
    "question_field", "answer_field", "category_field", "train_ratio", "valid_ratio",
    "test_ratio", "seed", "template", "system_prompt",
)


# --------------------------------------------------------------------------- records
@dataclass
class RawRecord:
    """One record as read from the file, with where it came from."""

    number: int  # 1-based record number
    where: str  # "record 5" / "record 5 (line 7)" for messages
    value: Any


@dataclass
class Record:
    """A valid, normalised record."""

    number: int
    question: str
    answer: str
    category: str
    tags: list[str]
    text: str
    question_key: str  # near-duplicate key (also the id's source)
    exact_key: tuple[str, ...]  # exact-duplicate key
    tokens: int | None = None
    # Earlier messages of a multi-turn record (system/user/assistant), so that
    # split_for_training(history + [q, a], system) gives prompt + completion == text.
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return hashlib.sha256(self.question_key.encode("utf-8")).hexdigest()[:12]

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.id,
            "text": self.text,
            "question": self.question,
            "answer": self.answer,
            "category": self.category,
        }
        if self.tags:
            row["tags"] = self.tags
        if self.history:
            row["history"] = self.history
        return row


@dataclass
class Rejection:
    number: int
    where: str
    code: str
    field: str | None
    message: str
    raw: Any

    def row(self) -> dict[str, Any]:
        return {"record": self.number, "code": self.code, "field": self.field, "reason": self.message, "raw": self.raw}


@dataclass
class Duplicate:
    number: int
    duplicate_of: int
    kind: str  # "exact" | "near"
    question: str


@dataclass
class FieldSpec:
    """Which fields hold the data (``messages`` mode ignores question/answer)."""

    question: str | None
    answer: str | None
    messages: bool = False
    category: str = "category"

    def describe(self) -> str:
        return MESSAGES_FIELD if self.messages else f"{self.question}/{self.answer}"


@dataclass
class DataOptions:
    input: Path = Path("data/fish_care_dataset.json")
    output_dir: Path = Path("data")
    question_field: str | None = None
    answer_field: str | None = None
    category_field: str = "category"
    train_ratio: float = 0.8
    valid_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 42
    template: str = DEFAULT_TEMPLATE
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    tokenizer: str | None = None
    max_seq_length: int = 1024
    skip_invalid: bool = False
    force: bool = False


@dataclass
class SourceData:
    path: Path
    format: str
    sha256: str
    records: list[RawRecord] = field(default_factory=list)


# --------------------------------------------------------------------------- reading
def read_records(path: str | os.PathLike) -> SourceData:
    """Read every raw record of a JSON / JSONL / CSV file (UTF-8)."""
    path = Path(path)
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(
            f"{path}: unknown input format {path.suffix or '(no extension)'!r}; use a .json, .jsonl or .csv file"
        )
    if not path.is_file():
        raise UserError(f"input file {path} not found; pass --input PATH (a .json, .jsonl or .csv Q&A data set)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 BOM is fine
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8, "
            f"e.g. iconv -f GBK -t UTF-8 {path} > fixed{path.suffix}"
        ) from None
    src = SourceData(path=path, format=fmt, sha256=hashlib.sha256(data).hexdigest())
    if fmt == "json":
        src.records = _read_json(path, text)
    elif fmt == "jsonl":
        src.records = _read_jsonl(path, text)
    else:
        src.records = _read_csv(path, text)
    if not src.records:
        raise UserError(f"{path} holds no records; add question/answer records to it")
    logger.debug("read %d records from %s (%s)", len(src.records), path, fmt)
    return src


def _read_json(path: Path, text: str) -> list[RawRecord]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; "
            "fix the syntax there (often a missing comma, quote or bracket)"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise UserError(
            f"{path}: expected a JSON array of records or an object with a \"data\" list, "
            f"got {_json_type(obj)}; wrap the records in [ ... ]"
        )
    return [RawRecord(i, f"record {i}", v) for i, v in enumerate(obj, 1)]


def _read_jsonl(path: Path, text: str) -> list[RawRecord]:
    out: list[RawRecord] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines are harmless
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}: invalid JSON at line {lineno} column {exc.colno}: {exc.msg}; "
                "each line of a .jsonl file must be one complete JSON object"
            ) from None
        n = len(out) + 1
        out.append(RawRecord(n, f"record {n} (line {lineno})", value))
    return out


def _read_csv(path: Path, text: str) -> list[RawRecord]:
    import pandas as pd  # heavy; only for CSV input

    try:
        with warnings.catch_warnings():
            # A row with one extra field silently becomes the index (or is cut with
            # index_col=False + a warning): make it an error instead.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            # dtype=str + keep_default_na=False: empty cells stay "" (never NaN), "NA" stays "NA".
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.ParserWarning:
        raise UserError(
            f"{path}: invalid CSV (a row has more fields than the header); quote cells that contain commas"
        ) from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} holds no records; add a header row and question/answer rows") from None
    except (pd.errors.ParserError, csv.Error) as exc:
        msg = " ".join(str(exc).split())
        raise UserError(f"{path}: invalid CSV ({msg}); check quoting and the number of columns on that line") from None
    rows = df.to_dict(orient="records")
    # Header is line 1; exact only without multi-line cells, hence "row".
    return [RawRecord(i, f"record {i} (CSV row {i + 1})", r) for i, r in enumerate(rows, 1)]


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__
    )


# --------------------------------------------------------------------------- fields
def detect_fields(
    records: Sequence[RawRecord],
    path: Path,
    question_field: str | None = None,
    answer_field: str | None = None,
    category_field: str = "category",
) -> FieldSpec:
    """Pick the question/answer fields: the given ones, else the best-known pair."""
    dicts = [r.value for r in records if isinstance(r.value, dict)]
    if question_field and answer_field:
        return FieldSpec(question_field, answer_field, category=category_field)

    def count(*keys: str) -> int:
        return sum(all(k in d for k in keys) for d in dicts)

    if question_field or answer_field:
        # One given: the other is the partner with the most hits.
        if question_field:
            partners = [a for _, a in FIELD_PAIRS] + ["response"]
            best = max(partners, key=lambda a: count(question_field, a))
            if count(question_field, best) == 0:
                raise UserError(f"{path}: no record has field '{question_field}' with an answer field; pass --answer-field NAME")
            return FieldSpec(question_field, best, category=category_field)
        partners = [q for q, _ in FIELD_PAIRS]
        best = max(partners, key=lambda q: count(q, answer_field))  # type: ignore[arg-type]
        if count(best, answer_field) == 0:  # type: ignore[arg-type]
            raise UserError(f"{path}: no record has field '{answer_field}' with a question field; pass --question-field NAME")
        return FieldSpec(best, answer_field, category=category_field)

    scores = [(count(q, a), i) for i, (q, a) in enumerate(FIELD_PAIRS)]
    best_count, best_i = max(scores, key=lambda s: (s[0], -s[1]))
    n_messages = count(MESSAGES_FIELD)
    if n_messages > best_count:
        return FieldSpec(None, None, messages=True, category=category_field)
    if best_count == 0:
        raise UserError(
            f"{path}: cannot find the question/answer fields (first record's keys: {_keys(dicts[0]) if dicts else 'none'}); "
            "use question/answer, instruction/output, prompt/completion or messages, "
            "or pass --question-field and --answer-field"
        )
    q, a = FIELD_PAIRS[best_i]
    return FieldSpec(q, a, category=category_field)


# --------------------------------------------------------------------------- normalising
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_newlines(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n")


def normalize_text(s: str) -> str:
    """NFC, CRLF -> LF, runs of spaces/tabs -> one space, no space at line ends,
    at most one blank line in a row, stripped. Single newlines are kept."""
    s = unicodedata.normalize("NFC", normalize_newlines(s))
    lines = [_SPACES.sub(" ", line).strip(" ") for line in s.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def question_key(s: str) -> str:
    """Near-duplicate key: NFKC, casefold, no whitespace, no punctuation (incl. ？！，。)."""
    s = unicodedata.normalize("NFKC", s).casefold()
    return "".join(ch for ch in s if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def find_control_char(s: str) -> int:
    """Index of the first control character other than \\n and \\t (CR counts as newline), or -1."""
    for i, ch in enumerate(normalize_newlines(s)):
        if ch not in "\n\t" and unicodedata.category(ch) == "Cc":
            return i
    return -1


def _show(v: Any, limit: int = 40) -> str:
    s = repr(v)  # repr escapes newlines: error messages stay one line
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _keys(d: dict) -> str:
    """A record's keys for an error message: one line, not too long."""
    keys = ", ".join(sorted(" ".join(str(k).split()) for k in d)) or "none"
    return keys if len(keys) <= 80 else keys[:77] + "..."


# --------------------------------------------------------------------------- validating
class _Invalid(Exception):
    def __init__(self, code: str, field: str | None, message: str):
        super().__init__(message)
        self.code, self.field, self.message = code, field, message


def _text_field(d: dict, name: str, label: str | None = None, required: bool = True) -> str:
    label = label or name
    if name not in d:
        if not required:
            return ""
        raise _Invalid("missing_field", label, f"field '{label}' is missing (record keys: {_keys(d)}); add it")
    v = d[name]
    if v is None:
        if not required:
            return ""
        raise _Invalid("empty_field", label, f"field '{label}' is null; give it text")
    if not isinstance(v, str):
        raise _Invalid("not_string", label, f"field '{label}' must be a string, got {_json_type(v)} {_show(v)}")
    pos = find_control_char(v)
    if pos >= 0:
        ch = normalize_newlines(v)[pos]
        raise _Invalid(
            "control_chars", label,
            f"field '{label}' contains control character U+{ord(ch):04X} at position {pos}; remove it",
        )
    out = normalize_text(v)
    if required and not out:
        raise _Invalid("empty_field", label, f"field '{label}' is empty ({_show(v)}); give it text")
    return out


_TAG_SPLIT = re.compile(r"[\s,;，；、|]+")


def _check_question_has_text(q: str, label: str) -> None:
    # Only punctuation (e.g. "？？") leaves an empty dedup key: every such record would collide.
    if not question_key(q):
        raise _Invalid("empty_field", label, f"field '{label}' has no words, only punctuation ({_show(q)}); give it text")


def _tags(d: dict) -> list[str]:
    v = d.get("tags")
    if v is None or v == "":
        return []
    if isinstance(v, str):
        items: list[Any] = _TAG_SPLIT.split(v)
    elif isinstance(v, list):
        items = v
    else:
        raise _Invalid("not_string", "tags", f"field 'tags' must be a list of strings or a string, got {_show(v)}")
    out: list[str] = []
    for t in items:
        if not isinstance(t, str):
            raise _Invalid("not_string", "tags", f"field 'tags' must hold strings, got {_show(t)}")
        t = normalize_text(t)
        if t and t not in out:
            out.append(t)
    return out


def _category(d: dict, name: str) -> str:
    return _text_field(d, name, required=False) or DEFAULT_CATEGORY


def _pair_record(raw: RawRecord, spec: FieldSpec, tpl: PromptTemplate, system: str | None) -> Record:
    d = raw.value
    q = _text_field(d, spec.question)  # type: ignore[arg-type]
    _check_question_has_text(q, spec.question)  # type: ignore[arg-type]
    a = _text_field(d, spec.answer)  # type: ignore[arg-type]
    if spec.question == "instruction":
        # Alpaca-style records: a non-empty "input" is context for the instruction.
        extra = _text_field(d, "input", required=False)
        if extra:
            q = f"{q}\n{extra}"
    category = _category(d, spec.category)
    tags = _tags(d)
    return Record(
        number=raw.number, question=q, answer=a, category=category, tags=tags,
        text=tpl.training_text(q, a, system), question_key=question_key(q), exact_key=(q, a),
    )


def _messages_record(raw: RawRecord, spec: FieldSpec, tpl: PromptTemplate, system: str | None) -> Record:
    d = raw.value
    if MESSAGES_FIELD not in d:
        raise _Invalid("missing_field", MESSAGES_FIELD, f"field 'messages' is missing (record keys: {_keys(d)}); add it")
    msgs = d[MESSAGES_FIELD]
    if not isinstance(msgs, list) or not msgs:
        raise _Invalid("bad_messages", MESSAGES_FIELD, f"field 'messages' must be a non-empty list of {{role, content}} objects, got {_show(msgs)}")
    norm: list[dict[str, str]] = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _Invalid("bad_messages", f"messages[{j}]", f"messages[{j}] must be an object with role and content, got {_show(m)}")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise _Invalid("bad_messages", f"messages[{j}].role", f"messages[{j}].role is {_show(role)}; use user, assistant or system")
        norm.append({"role": role, "content": _text_field(m, "content", f"messages[{j}].content")})
    turns = [m for m in norm if m["role"] != "system"]
    for j, m in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise _Invalid("bad_messages", MESSAGES_FIELD, f"turn {j + 1} of 'messages' is {m['role']}, expected {expected}; turns alternate user/assistant, starting with user")
    if not turns or turns[-1]["role"] != "assistant":
        raise _Invalid("bad_messages", MESSAGES_FIELD, "'messages' must end with an assistant answer")
    q, a = turns[-2]["content"], turns[-1]["content"]
    for j, m in enumerate(norm):
        if m["role"] == "user":
            _check_question_has_text(m["content"], f"messages[{j}].content")
    user_keys = [question_key(m["content"]) for m in turns if m["role"] == "user"]
    return Record(
        number=raw.number, question=q, answer=a, category=_category(d, spec.category), tags=_tags(d),
        text=tpl.render_conversation(norm, system),
        history=_history(norm),
        # "|" cannot survive question_key (punctuation), so the join is unambiguous.
        question_key="|".join(user_keys), exact_key=tuple(m["content"] for m in turns),
    )


def _history(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Everything before the final user turn, plus any system message after it."""
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    return msgs[:last_user] + [m for m in msgs[last_user:] if m["role"] == "system"]


def validate_record(raw: RawRecord, spec: FieldSpec, template: str, system_prompt: str | None) -> Record | Rejection:
    """One raw record -> a normalised Record, or a Rejection with a stable code."""
    tpl = get_template(template)
    system = system_prompt or None
    if not isinstance(raw.value, dict):
        what = spec.describe()
        return Rejection(
            raw.number, raw.where, "not_object", None,
            f"is {_json_type(raw.value)} {_show(raw.value)}, not an object with {what} fields; make it an object",
            raw.value,
        )
    try:
        if spec.messages:
            return _messages_record(raw, spec, tpl, system)
        return _pair_record(raw, spec, tpl, system)
    except _Invalid as exc:
        return Rejection(raw.number, raw.where, exc.code, exc.field, exc.message, raw.value)


def validate_records(
    raws: Sequence[RawRecord], spec: FieldSpec, template: str, system_prompt: str | None
) -> tuple[list[Record], list[Rejection]]:
    good: list[Record] = []
    bad: list[Rejection] = []
    for raw in raws:
        r = validate_record(raw, spec, template, system_prompt)
        (good if isinstance(r, Record) else bad).append(r)  # type: ignore[arg-type]
    return good, bad


# --------------------------------------------------------------------------- tokens
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer  # heavy; only with --tokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:  # transformers raises many kinds; all mean "not a tokenizer folder"
        msg = " ".join(str(exc).split())[:160]
        raise UserError(
            f"--tokenizer {path}: cannot load a tokenizer ({type(exc).__name__}: {msg}); "
            "pass a folder holding tokenizer.json/tokenizer_config.json"
        ) from None


def count_tokens(tokenizer: Any, texts: Sequence[str], batch_size: int = 256) -> list[int]:
    """Token counts exactly as MLX-LM's text dataset builds them:
    ``tokenizer.encode(text)`` plus the EOS it appends when the text does not end with it."""
    from tqdm import tqdm

    eos = getattr(tokenizer, "eos_token_id", None)
    out: list[int] = []
    for start in tqdm(range(0, len(texts), batch_size), desc="tokenizing", unit="batch", disable=None, leave=False):
        batch = list(texts[start : start + batch_size])
        for ids in tokenizer(batch)["input_ids"]:
            out.append(len(ids) + (1 if eos is not None and (not ids or ids[-1] != eos) else 0))
    return out


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


# --------------------------------------------------------------------------- dedup
def dedup(records: Sequence[Record]) -> tuple[list[Record], list[Duplicate]]:
    """Drop exact (same question+answer) and near (same question key) duplicates; first wins."""
    exact_seen: dict[tuple[str, ...], int] = {}
    key_seen: dict[str, int] = {}
    kept: list[Record] = []
    dups: list[Duplicate] = []
    for r in records:
        if r.exact_key in exact_seen:
            dups.append(Duplicate(r.number, exact_seen[r.exact_key], "exact", r.question))
        elif r.question_key in key_seen:
            dups.append(Duplicate(r.number, key_seen[r.question_key], "near", r.question))
        else:
            exact_seen[r.exact_key] = r.number
            key_seen[r.question_key] = r.number
            kept.append(r)
    return kept, dups


# --------------------------------------------------------------------------- split
def check_ratios(train: float, valid: float, test: float) -> None:
    for name, v in (("--train-ratio", train), ("--valid-ratio", valid), ("--test-ratio", test)):
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise UserError(f"{name} {v} is out of range; use a number between 0 and 1")
    if train <= 0:
        raise UserError("--train-ratio must be greater than 0")
    total = train + valid + test
    if abs(total - 1.0) > 1e-6:
        raise UserError(
            f"--train-ratio/--valid-ratio/--test-ratio add up to {total:g} ({train:g}+{valid:g}+{test:g}); make them add up to 1"
        )


def split_sizes(n: int, valid_ratio: float, test_ratio: float) -> tuple[int, int, int]:
    """(train, valid, test) sizes. Valid/test with a ratio > 0 get at least one
    record once there are 3 or more; train always keeps at least one."""
    if n < 3:
        return n, 0, 0
    n_valid = int(math.floor(n * valid_ratio + 0.5))
    n_test = int(math.floor(n * test_ratio + 0.5))
    if valid_ratio > 0:
        n_valid = max(1, n_valid)
    if test_ratio > 0:
        n_test = max(1, n_test)
    while n_valid + n_test > n - 1:
        if n_valid >= n_test and n_valid > (1 if valid_ratio > 0 else 0):
            n_valid -= 1
        elif n_test > (1 if test_ratio > 0 else 0):
            n_test -= 1
        else:
            n_valid -= 1
    return n - n_valid - n_test, n_valid, n_test


def _apportion(
    sizes: dict[str, int], total: int, ratio: float, capacity: dict[str, int], tiebreak: dict[str, float]
) -> dict[str, int]:
    """Split ``total`` across categories in proportion to their sizes (largest remainder).

    Ties go to the larger category, then to a seeded random order (not the
    alphabet: with many one-record categories the names would pick the split)."""
    ideal = {c: sizes[c] * ratio for c in sizes}
    out = {c: min(int(math.floor(ideal[c])), capacity[c]) for c in sizes}
    order = sorted(sizes, key=lambda c: (-round(ideal[c] - math.floor(ideal[c]), 9), -sizes[c], tiebreak[c], c))
    deficit = total - sum(out.values())
    # First keep one train record per category where possible, then take what is needed.
    for reserve in (1, 0):
        changed = True
        while deficit > 0 and changed:
            changed = False
            for c in order:
                if deficit > 0 and out[c] < capacity[c] - (reserve if sizes[c] > 1 else 0):
                    out[c] += 1
                    deficit -= 1
                    changed = True
    # Too many (split_sizes shrank the total below the floors): give back, smallest remainders first.
    for c in reversed(order):
        while deficit < 0 and out[c] > 0:
            out[c] -= 1
            deficit += 1
    return out


def split_records(
    records: Sequence[Record], train_ratio: float, valid_ratio: float, test_ratio: float, seed: int
) -> dict[str, list[Record]]:
    """Seeded split, stratified by category; each split is returned in source order."""
    check_ratios(train_ratio, valid_ratio, test_ratio)
    _, n_valid, n_test = split_sizes(len(records), valid_ratio, test_ratio)
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.category, []).append(r)
    cats = sorted(groups)
    sizes = {c: len(groups[c]) for c in cats}
    rng = random.Random(seed)
    shuffled = {}
    for c in cats:  # sorted order + one RNG: the same seed gives the same split
        g = list(groups[c])
        rng.shuffle(g)
        shuffled[c] = g
    tiebreak = {c: rng.random() for c in cats}
    v = _apportion(sizes, n_valid, valid_ratio, dict(sizes), tiebreak)
    t = _apportion(sizes, n_test, test_ratio, {c: sizes[c] - v[c] for c in cats}, tiebreak)
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for c in cats:
        g = shuffled[c]
        out["valid"].extend(g[: v[c]])
        out["test"].extend(g[v[c] : v[c] + t[c]])
        out["train"].extend(g[v[c] + t[c] :])
    for s in SPLITS:
        out[s].sort(key=lambda r: r.number)
    _assert_no_leak(out)
    return out


def _assert_no_leak(splits: dict[str, list[Record]]) -> None:
    # Dedup already guarantees this; a leak would silently inflate eval scores.
    seen: dict[str, str] = {}
    for s in SPLITS:
        for r in splits[s]:
            other = seen.setdefault(r.question_key, s)
            assert other == s, f"question {r.question!r} is in both {other} and {s}"
    ids = [r.id for s in SPLITS for r in splits[s]]
    assert len(ids) == len(set(ids)), "duplicate ids across splits"


# --------------------------------------------------------------------------- report
def length_stats(values: Sequence[int]) -> dict[str, float | int] | None:
    if not values:
        return None
    v = sorted(values)

    def pct(p: float) -> int:  # nearest-rank percentile
        return v[max(0, math.ceil(p / 100 * len(v)) - 1)]

    return {"min": v[0], "mean": round(sum(v) / len(v), 1), "p50": pct(50), "p95": pct(95), "max": v[-1]}


def options_fingerprint(opts: DataOptions, spec: FieldSpec) -> dict[str, Any]:
    return {
        "question_field": MESSAGES_FIELD if spec.messages else spec.question,
        "answer_field": MESSAGES_FIELD if spec.messages else spec.answer,
        "category_field": spec.category,
        "train_ratio": opts.train_ratio,
        "valid_ratio": opts.valid_ratio,
        "test_ratio": opts.test_ratio,
        "seed": opts.seed,
        "template": opts.template,
        "system_prompt": opts.system_prompt,
    }


def build_report(
    src: SourceData,
    opts: DataOptions,
    spec: FieldSpec,
    splits: dict[str, list[Record]],
    rejected: Sequence[Rejection],
    dups: Sequence[Duplicate],
) -> dict[str, Any]:
    kept = [r for s in SPLITS for r in splits[s]]
    n_in = len(src.records)
    exact = sum(d.kind == "exact" for d in dups)
    near = sum(d.kind == "near" for d in dups)
    # Every input record is accounted for exactly once.
    assert n_in == len(kept) + len(rejected) + exact + near, (n_in, len(kept), len(rejected), exact, near)
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r.code] = by_reason.get(r.code, 0) + 1
    categories: dict[str, dict[str, int]] = {}
    for c in sorted({r.category for r in kept}):
        row = {s: sum(r.category == c for r in splits[s]) for s in SPLITS}
        categories[c] = {"total": sum(row.values()), **row}
    tokens = [r.tokens for r in kept if r.tokens is not None]
    return {
        "report_version": REPORT_VERSION,
        "source": {"path": str(src.path), "sha256": src.sha256, "format": src.format, "fields": spec.describe()},
        "options": options_fingerprint(opts, spec),
        "template": opts.template,
        "system_prompt": opts.system_prompt,
        "tokenizer": opts.tokenizer,
        "max_seq_length": opts.max_seq_length if opts.tokenizer else None,
        "counts": {
            "records_in": n_in,
            "kept": len(kept),
            "rejected": len(rejected),
            "exact_duplicates": exact,
            "near_duplicates": near,
        },
        "rejected_by_reason": {k: by_reason[k] for k in sorted(by_reason)},
        "splits": {s: len(splits[s]) for s in SPLITS},
        "files": {s: (OUTPUT_FILES[s] if splits[s] else None) for s in SPLITS},
        "categories": categories,
        "lengths": {
            "question_chars": length_stats([len(r.question) for r in kept]),
            "answer_chars": length_stats([len(r.answer) for r in kept]),
            "text_chars": length_stats([len(r.text) for r in kept]),
            "text_tokens": length_stats(tokens) if opts.tokenizer else None,
        },
        "rejections": [
            {"record": r.number, "where": r.where, "code": r.code, "field": r.field, "reason": r.message} for r in rejected
        ],
        "duplicates": [
            {"record": d.number, "duplicate_of": d.duplicate_of, "kind": d.kind, "question": d.question} for d in dups
        ],
    }


def format_summary(report: dict[str, Any], output_dir: Path | None = None) -> str:
    c = report["counts"]
    reasons = ", ".join(f"{k} {v}" for k, v in report["rejected_by_reason"].items())
    lines = [
        f"{report['source']['path']}: {c['records_in']} records in -> {c['kept']} kept, "
        f"{c['rejected']} rejected{f' ({reasons})' if reasons else ''}, "
        f"{c['exact_duplicates']} exact duplicates, {c['near_duplicates']} near duplicates",
        "splits: " + ", ".join(f"{s} {n}" for s, n in report["splits"].items())
        + f" (template {report['template']}, fields {report['source']['fields']})",
        "categories: " + ", ".join(
            f"{cat} {v['total']} ({v['train']}/{v['valid']}/{v['test']})" for cat, v in report["categories"].items()
        ),
    ]
    L = report["lengths"]
    parts = []
    for key, label in (("question_chars", "question chars"), ("answer_chars", "answer chars"), ("text_tokens", "text tokens")):
        st = L.get(key)
        if st:
            parts.append(f"{label} min {st['min']} mean {st['mean']} p50 {st['p50']} p95 {st['p95']} max {st['max']}")
    lines.append("lengths: " + "; ".join(parts))
    if output_dir is not None:
        files = [str(output_dir / f) for f in report["files"].values() if f] + [str(output_dir / REPORT_FILE)]
        if c["rejected"]:
            files.append(str(output_dir / REJECTED_FILE))
        lines.append("wrote " + ", ".join(files))
    return "\n".join(lines)


# --------------------------------------------------------------------------- outputs
def output_paths(output_dir: Path) -> list[Path]:
    return [output_dir / OUTPUT_FILES[s] for s in SPLITS] + [output_dir / REPORT_FILE, output_dir / REJECTED_FILE]


def check_outputs(output_dir: Path, src: SourceData, fingerprint: dict[str, Any], force: bool) -> None:
    """Refuse to overwrite outputs that came from another input or other options."""
    inp = src.path.resolve()
    for p in output_paths(output_dir):
        if p.resolve() == inp:
            raise UserError(f"--input {src.path} is also an output of this stage; pass another --output-dir")
    existing = [p for p in output_paths(output_dir) if p.exists()]
    if force or not existing:
        return
    report_path = output_dir / REPORT_FILE
    try:
        old = json.loads(report_path.read_text(encoding="utf-8"))
        old_src, old_opts = old["source"], old["options"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{existing[0]} already exists and {report_path} does not say where it came from; "
            "pass --force to overwrite it, or choose another --output-dir"
        ) from None
    if old_src.get("sha256") != src.sha256:
        raise UserError(
            f"{output_dir} holds data processed from another input ({old_src.get('path')}, sha256 "
            f"{str(old_src.get('sha256'))[:12]}); pass --force to overwrite it, or choose another --output-dir"
        )
    if old_opts != fingerprint:
        changed = ", ".join(
            f"{k} {_show(old_opts.get(k), 30)} -> {_show(fingerprint.get(k), 30)}"
            for k in FINGERPRINT_KEYS if old_opts.get(k) != fingerprint.get(k)
        ) or "unknown option"
        raise UserError(
            f"{output_dir} holds data processed with other options ({changed}); "
            "pass --force to overwrite it, or choose another --output-dir"
        )


def write_outputs(
    output_dir: Path, splits: dict[str, list[Record]], report: dict[str, Any], rejected: Sequence[Rejection]
) -> None:
    """Write the splits, rejected.jsonl and report.json (last), each atomically."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, no permission, ...
        raise UserError(f"can't create --output-dir {output_dir} ({exc.strerror}); pass a writable folder") from None
    for s in SPLITS:
        path = output_dir / OUTPUT_FILES[s]
        if splits[s]:
            atomic_write_jsonl(path, [r.row() for r in splits[s]])
        elif path.exists():
            # MLX-LM crashes on an empty .jsonl (it reads data[0]) but skips a missing one.
            path.unlink()
    rej_path = output_dir / REJECTED_FILE
    if rejected:
        atomic_write_jsonl(rej_path, [r.row() for r in rejected])
    elif rej_path.exists():
        rej_path.unlink()  # stale from an earlier run
    atomic_write_json(output_dir / REPORT_FILE, report)


# --------------------------------------------------------------------------- pipeline
def _invalid_error(src: SourceData, rejected: Sequence[Rejection]) -> UserError:
    first = rejected[0]
    more = f" ({len(rejected) - 1} more invalid records)" if len(rejected) > 1 else ""
    return UserError(f"{src.path} {first.where}: {first.message}, or pass --skip-invalid to drop such records{more}")


def run_pipeline(opts: DataOptions) -> dict[str, Any]:
    """Read, validate, dedup, split, report and write. Returns the report."""
    get_template(opts.template)  # unknown template -> UserError before any work
    check_ratios(opts.train_ratio, opts.valid_ratio, opts.test_ratio)
    if opts.tokenizer and opts.max_seq_length < 1:
        raise UserError(f"--max-seq-length {opts.max_seq_length} must be at least 1")
    output_dir = Path(opts.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file, not a folder; pass a folder such as data")
    src = read_records(opts.input)
    spec = detect_fields(src.records, src.path, opts.question_field, opts.answer_field, opts.category_field)
    logger.debug("fields: %s, category field: %s", spec.describe(), spec.category)
    check_outputs(output_dir, src, options_fingerprint(opts, spec), opts.force)

    records, rejected = validate_records(src.records, spec, opts.template, opts.system_prompt)
    if opts.tokenizer and records:
        tok = load_tokenizer(opts.tokenizer)
        wheres = {r.number: r.where for r in src.records}
        raws = {r.number: r.value for r in src.records}
        records, too_long = apply_token_limit(records, tok, opts.max_seq_length, wheres, raws)
        rejected = sorted(rejected + too_long, key=lambda r: r.number)
    if rejected and not opts.skip_invalid:
        raise _invalid_error(src, rejected)

    kept, dups = dedup(records)
    if not kept:
        reasons = ", ".join(sorted({r.code for r in rejected})) or "none"
        raise UserError(
            f"{src.path}: no valid records left out of {len(src.records)} "
            f"({len(rejected)} rejected: {reasons}; {len(dups)} duplicates); fix the data set"
        )
    if len(kept) < 3:
        logger.warning("only %d records: all go to train; MLX-LM training also needs valid.jsonl", len(kept))
    splits = split_records(kept, opts.train_ratio, opts.valid_ratio, opts.test_ratio, opts.seed)
    for r in rejected:
        logger.debug("rejected %s: %s", r.where, r.message)
    report = build_report(src, opts, spec, splits, rejected, dups)
    write_outputs(output_dir, splits, report, rejected)
    return report


def read_data_report(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``<data_dir>/report.json`` (None when absent), e.g. for finetune to check that
    ``report["template"]`` / ``report["system_prompt"]`` match its own settings."""
    path = Path(data_dir) / REPORT_FILE
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); rerun process_data.py --force") from None
    if not isinstance(report, dict) or "template" not in report:
        raise UserError(f"{path} was not written by process_data.py; rerun process_data.py --force")
    return report


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read one of the stage's output files (for later stages and tests)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__: Iterable[str] = (
    "DataOptions", "Record", "Rejection", "Duplicate", "FieldSpec", "REJECT_CODES", "read_records",
    "detect_fields", "normalize_text", "question_key", "validate_record", "validate_records", "dedup",
    "split_sizes", "split_records", "build_report", "format_summary", "check_outputs", "write_outputs",
    "run_pipeline", "read_jsonl", "read_data_report", "load_tokenizer", "count_tokens",
)
