"""``report.json`` (counts that reconcile, lengths, rejections, duplicates) and the printed summary."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fishtune.data.reading import SourceData
from fishtune.data.records import MESSAGES_FIELD, FieldSpec, Record, Rejection
from fishtune.data.splitting import SPLITS, Duplicate

if TYPE_CHECKING:
    from fishtune.data.pipeline import DataOptions

REPORT_VERSION = 1
OUTPUT_FILES = {s: f"{s}.jsonl" for s in SPLITS}
REPORT_FILE = "report.json"
REJECTED_FILE = "rejected.jsonl"

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


def options_fingerprint(opts: "DataOptions", spec: FieldSpec) -> dict[str, Any]:
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
    opts: "DataOptions",
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
