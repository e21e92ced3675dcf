#!/usr/bin/env python3
"""inference: answer with the base model + the fine-tuned adapter, or evaluate both.

One question (wrapped in the training template with the adapter's system prompt)::

    python inference.py --question "鱼身上有白点怎么办？"

A raw prompt (sent as is)::

    python inference.py --prompt "### Instruction:\\n...\\n\\n### Response:\\n"

Batch mode (rows with "question"; output rows add "prediction", "finish_reason")::

    python inference.py --input data/test.jsonl --output predictions.jsonl

Evaluation, base model vs fine-tuned, side by side (greedy by default)::

    python inference.py --evaluate data/test.jsonl --report eval_report.json [--limit 50]
"""
import sys

from fishtune.errors import run_cli
from fishtune.infer.cli import build_parser, main  # noqa: F401  (build_parser: the flags, for tools)

if __name__ == "__main__":
    sys.exit(run_cli(main)())
