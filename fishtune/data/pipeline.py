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

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from fishtune.data.options import DataOptions
from fishtune.data.reading import SourceData, detect_fields, read_records
from fishtune.data.records import Record, Rejection, _show, validate_records
from fishtune.data.report import (
    FINGERPRINT_KEYS,
    OUTPUT_FILES,
    REJECTED_FILE,
    REPORT_FILE,
    build_report,
    options_fingerprint,
)
from fishtune.data.splitting import SPLITS, check_ratios, dedup, split_records
from fishtune.data.token_limit import apply_token_limit, load_tokenizer
from fishtune.data.vocabulary import apply_vocabulary, find_vocabulary, load_vocabulary
from fishtune.errors import UserError
from fishtune.fileio import atomic_write_json, atomic_write_jsonl
from fishtune.template import get_template

logger = logging.getLogger(__name__)


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

    vocab_path = find_vocabulary(src.path, opts.vocabulary)
    vocab = load_vocabulary(vocab_path) if vocab_path else None
    records, rejected = validate_records(src.records, spec, opts.template, opts.system_prompt)
    wheres = {r.number: r.where for r in src.records}
    raws = {r.number: r.value for r in src.records}
    if vocab is not None:
        records, unknown = apply_vocabulary(records, vocab, wheres, raws)
        rejected += unknown
    if opts.tokenizer and records:
        tok = load_tokenizer(opts.tokenizer)
        records, too_long = apply_token_limit(records, tok, opts.max_seq_length, wheres, raws)
        rejected += too_long
    rejected.sort(key=lambda r: r.number)
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
    report = build_report(src, opts, spec, splits, rejected, dups, vocab)
    write_outputs(output_dir, splits, report, rejected)
    return report
