#!/usr/bin/env python3
"""process_data: the Q&A data set -> data/train.jsonl, valid.jsonl, test.jsonl + report.json.

    python3 process_data.py                                   # data/fish_care_dataset.json -> data/
    python3 process_data.py --input qa.csv --tokenizer models/smoke-tiny --skip-invalid

All logic lives in fishtune/data/; see ``--help`` for the flags.
"""
import sys

from fishtune.data.cli import build_parser, main  # noqa: F401  (build_parser: the flags, for tools)
from fishtune.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main)())
