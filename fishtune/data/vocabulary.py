"""The label vocabulary: the fixed set of categories and tags a data set may use.

``data/vocabulary.yaml`` lists them (``categories:`` and ``tags:``, one entry
per line with a comment saying what it covers). ``process_data.py`` checks
every record against the vocabulary next to its input file (or
``--vocabulary PATH``; ``--vocabulary none`` turns the check off): a record
whose category or a tag is not listed is rejected with the code
``unknown_label``, naming the closest listed label. To add a label, append
it to the file.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fishtune.data.records import Record, Rejection
from fishtune.errors import UserError

VOCABULARY_FILE = "vocabulary.yaml"
NO_VOCABULARY = "none"


@dataclass(frozen=True)
class Vocabulary:
    path: Path
    categories: tuple[str, ...]
    tags: tuple[str, ...]

    def problem(self, record: Record) -> str | None:
        """Why ``record``'s labels are not in the vocabulary, or None."""
        if record.category not in self.categories:
            return self._unknown("category", record.category, self.categories)
        for tag in record.tags:
            if tag not in self.tags:
                return self._unknown("tag", tag, self.tags)
        return None

    def _unknown(self, what: str, value: str, known: Sequence[str]) -> str:
        close = difflib.get_close_matches(value, list(known), n=1, cutoff=0.0)
        hint = f" (closest: {close[0]!r})" if close else ""
        return f"{what} {value!r} is not in {self.path}{hint}; use a listed {what} or add it to that file"


def find_vocabulary(input_path: Path, option: str | None) -> Path | None:
    """The vocabulary to check with: ``--vocabulary``, else ``vocabulary.yaml`` beside the input, else none."""
    if option == NO_VOCABULARY:
        return None
    if option is not None:
        path = Path(option)
        if not path.is_file():
            raise UserError(f"--vocabulary {option}: file not found; pass a YAML file with categories/tags, or none")
        return path
    path = Path(input_path).parent / VOCABULARY_FILE
    return path if path.is_file() else None


def load_vocabulary(path: Path) -> Vocabulary:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid YAML ({' '.join(str(exc).split())[:120]}); fix the file") from None
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("categories", "tags"):
        items = data.get(key) if isinstance(data, dict) else None
        if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
            raise UserError(f"{path}: '{key}' must be a non-empty list of strings")
        lists[key] = tuple(items)
    return Vocabulary(path, lists["categories"], lists["tags"])


def apply_vocabulary(
    records: list[Record], vocab: Vocabulary, wheres: dict[int, str], raws: dict[int, Any]
) -> tuple[list[Record], list[Rejection]]:
    """Keep the records whose labels are all in ``vocab``; the others become ``unknown_label`` rejections."""
    keep: list[Record] = []
    bad: list[Rejection] = []
    for rec in records:
        problem = vocab.problem(rec)
        if problem is None:
            keep.append(rec)
        else:
            field = "category" if problem.startswith("category") else "tags"
            bad.append(Rejection(rec.number, wheres[rec.number], "unknown_label", field, problem, raws[rec.number]))
    return keep, bad


__all__ = ["Vocabulary", "VOCABULARY_FILE", "NO_VOCABULARY", "find_vocabulary", "load_vocabulary", "apply_vocabulary"]
