"""``report.json`` (counts that reconcile, lengths, rejections, duplicates) and the printed summary."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from fishtune.data.options import DataOptions
from fishtune.data.reading import SourceData
from fishtune.data.records import MESSAGES_FIELD, FieldSpec, Record, Rejection
from fishtune.data.splitting import SPLITS, Duplicate
from fishtune.project import DataFiles

REPORT_VERSION = 1
OUTPUT_FILES = {s: DataFiles.split(s) for s in SPLITS}
REPORT_FILE = DataFiles.REPORT
REJECTED_FILE = DataFiles.REJECTED

# Options that decide what ends up in the splits: outputs made with other
# values come from "another source" and are not overwritten without --force.
FINGERPRINT_KEYS = (
    "question_field", "answer_field", "category_field", "train_ratio", "valid_ratio",
    "test_ratio", "seed", "template", "system_prompt",
)


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


# Answer shapes (characters, every assistant turn): short direct answers, middle, step-by-step protocols.
SHORT_MAX_CHARS = 80
LONG_MIN_CHARS = 300


def answer_shapes(answers: Sequence[str]) -> dict[str, Any]:
    """How many answers are short (<= 80 characters), middle and long (>= 300), plus a 100-character histogram."""
    lens = [len(a) for a in answers]
    hist: dict[str, int] = {}
    for n in sorted(lens):
        lo = n // 100 * 100
        key = f"{lo}-{lo + 99}"
        hist[key] = hist.get(key, 0) + 1
    return {
        "short": sum(n <= SHORT_MAX_CHARS for n in lens),
        "middle": sum(SHORT_MAX_CHARS < n < LONG_MIN_CHARS for n in lens),
        "long": sum(n >= LONG_MIN_CHARS for n in lens),
        "short_max_chars": SHORT_MAX_CHARS,
        "long_min_chars": LONG_MIN_CHARS,
        "histogram_chars": hist,
    }


def _fields(spec: FieldSpec, kept: Sequence[Record]) -> str:
    """The detected fields, plus ``messages`` when a question/answer data set also holds conversations."""
    mixed = not spec.messages and any(r.history for r in kept)
    return spec.describe() + (f" + {MESSAGES_FIELD}" if mixed else "")


def build_report(
    src: SourceData,
    opts: DataOptions,
    spec: FieldSpec,
    splits: dict[str, list[Record]],
    rejected: Sequence[Rejection],
    dups: Sequence[Duplicate],
    vocabulary: Any = None,
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
        "source": {"path": str(src.path), "sha256": src.sha256, "format": src.format, "fields": _fields(spec, kept)},
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
        "conversations": {"multi_turn": sum(bool(r.history) for r in kept),
                          "answers": sum(len(r.answers) for r in kept)},
        "answer_shapes": answer_shapes([a for r in kept for a in r.answers]),
        "labels": {"vocabulary": str(vocabulary.path) if vocabulary is not None else None,
                   "categories": len(categories), "tags": len({t for r in kept for t in r.tags})},
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
    shapes, conv = report.get("answer_shapes"), report.get("conversations")
    if shapes and conv:
        hist = ", ".join(f"{k} {v}" for k, v in shapes["histogram_chars"].items())
        lines.append(
            f"answers: {conv['answers']} ({conv['multi_turn']} multi-turn records); shapes: short <= "
            f"{shapes['short_max_chars']} chars {shapes['short']}, middle {shapes['middle']}, long >= "
            f"{shapes['long_min_chars']} chars {shapes['long']}; chars: {hist}"
        )
    if output_dir is not None:
        files = [str(output_dir / f) for f in report["files"].values() if f] + [str(output_dir / REPORT_FILE)]
        if c["rejected"]:
            files.append(str(output_dir / REJECTED_FILE))
        lines.append("wrote " + ", ".join(files))
    return "\n".join(lines)
