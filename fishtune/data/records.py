"""One raw record -> a normalised :class:`Record`, or a :class:`Rejection` with a stable code.

Field detection picks which keys hold the question and answer
(``reading.detect_fields``); here each record is checked field by field
(types, control characters, empty text, the chat ``messages`` rules of
:func:`fishtune.template.check_messages`) and its text normalised.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

from fishtune.errors import UserError, clip
from fishtune.template import PromptTemplate, check_messages, get_template

# Stable rejection codes (used in report.json and rejected.jsonl).
REJECT_CODES: dict[str, str] = {
    "not_object": "the record is not a JSON object",
    "missing_field": "a required field is missing",
    "empty_field": "a required field is empty or whitespace only",
    "not_string": "a field is not a string",
    "control_chars": "a field contains control characters (other than newline and tab)",
    "bad_messages": "a chat 'messages' list is malformed",
    "too_long": "the training text is longer than --max-seq-length tokens",
    "unknown_label": "the category or a tag is not in the label vocabulary (--vocabulary)",
}

FIELD_PAIRS: tuple[tuple[str, str], ...] = (
    ("question", "answer"),
    ("instruction", "output"),
    ("prompt", "completion"),
)
MESSAGES_FIELD = "messages"
DEFAULT_CATEGORY = "uncategorized"


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
    # question_key of every user turn: records sharing one stay in one split.
    turn_keys: tuple[str, ...] = ()

    @property
    def answers(self) -> list[str]:
        """Every assistant turn (all of them are trained on)."""
        return [m["content"] for m in self.history if m["role"] == "assistant"] + [self.answer]

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
class FieldSpec:
    """Which fields hold the data (``messages`` mode ignores question/answer)."""

    question: str | None
    answer: str | None
    messages: bool = False
    category: str = "category"

    def describe(self) -> str:
        return MESSAGES_FIELD if self.messages else f"{self.question}/{self.answer}"


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__
    )


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
    return clip(repr(v), limit)  # repr escapes newlines: error messages stay one line


def _keys(d: dict) -> str:
    """A record's keys for an error message: one line, not too long."""
    return clip(", ".join(sorted(" ".join(str(k).split()) for k in d)) or "none")


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
        turn_keys=(question_key(q),),
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
        norm.append({"role": m.get("role"), "content": _text_field(m, "content", f"messages[{j}].content")})
    try:
        _, turns = check_messages(norm, end="assistant", label=MESSAGES_FIELD)
    except UserError as exc:  # the one set of message rules, reported as this stage's code
        raise _Invalid("bad_messages", MESSAGES_FIELD, str(exc)) from None
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
        turn_keys=tuple(user_keys),
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
        # A data set may mix shapes: a record with `messages` and no question field is a conversation.
        if spec.messages or (MESSAGES_FIELD in raw.value and spec.question not in raw.value):
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
