"""Reading a data set file: JSON (array, or object with a ``"data"`` list), JSONL or CSV; UTF-8 only.

Also field detection: which keys hold the question and answer
(question/answer, instruction/output, prompt/completion or chat ``messages``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fishtune.data.records import (
    FIELD_PAIRS,
    MESSAGES_FIELD,
    FieldSpec,
    RawRecord,
    _json_type,
    _keys,
)
from fishtune.errors import UserError

logger = logging.getLogger(__name__)

INPUT_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


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
