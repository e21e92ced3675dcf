"""The data stage (``process_data.py``): raw Q&A records -> validated, deduplicated train/valid/test splits.

``reading`` (files, field detection) -> ``records`` (validation, normalisation)
-> ``token_limit`` (``--tokenizer``) -> ``splitting`` (dedup, stratified split)
-> ``report`` -> ``pipeline`` (``run_pipeline``: the order, the overwrite guard,
the atomic writes) ; ``cli``: the command line.
"""
from fishtune.data.options import DataOptions
from fishtune.data.pipeline import (
    check_outputs,
    run_pipeline,
    write_outputs,
)
from fishtune.data.reading import SourceData, detect_fields, read_records
from fishtune.data.records import (
    REJECT_CODES,
    FieldSpec,
    RawRecord,
    Record,
    Rejection,
    normalize_text,
    question_key,
    validate_record,
    validate_records,
)
from fishtune.data.report import (
    build_report,
    format_summary,
    length_stats,
    options_fingerprint,
)
from fishtune.data.splitting import Duplicate, dedup, split_records, split_sizes
from fishtune.data.token_limit import load_tokenizer

__all__ = [
    "DataOptions", "Record", "Rejection", "Duplicate", "FieldSpec", "RawRecord", "SourceData", "REJECT_CODES",
    "read_records", "detect_fields", "normalize_text", "question_key", "validate_record", "validate_records",
    "dedup", "split_sizes", "split_records", "build_report", "format_summary", "length_stats", "options_fingerprint",
    "check_outputs", "write_outputs", "run_pipeline", "load_tokenizer",
]
