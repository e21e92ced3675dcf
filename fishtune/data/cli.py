"""``process_data.py``: the Q&A data set -> data/train.jsonl, valid.jsonl, test.jsonl + report.json.

Also ``python -m fishtune.data``. The steps live in the modules of ``fishtune.data``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fishtune.errors import setup_logging
from fishtune.template import DEFAULT_TEMPLATE, template_names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="process_data.py",
        description="Validate, normalise, deduplicate and split the fish-care Q&A data set for training.",
    )
    p.add_argument("--input", type=Path, default=Path("data/fish_care_dataset.json"),
                   help="Q&A data set: .json (array, or object with a 'data' list), .jsonl or .csv, UTF-8 "
                        "(default: %(default)s)")
    p.add_argument("--output-dir", type=Path, default=Path("data"),
                   help="where train/valid/test.jsonl and report.json go (default: %(default)s)")
    p.add_argument("--question-field", default=None,
                   help="question field (default: auto-detect question/answer, instruction/output, "
                        "prompt/completion or chat 'messages')")
    p.add_argument("--answer-field", default=None, help="answer field (default: auto-detect)")
    p.add_argument("--category-field", default="category",
                   help="category field used to stratify the split; missing = 'uncategorized' (default: %(default)s)")
    p.add_argument("--train-ratio", type=float, default=0.8, help="default: %(default)s")
    p.add_argument("--valid-ratio", type=float, default=0.1, help="default: %(default)s")
    p.add_argument("--test-ratio", type=float, default=0.1, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=42, help="split seed; same input + seed = identical files (default: %(default)s)")
    p.add_argument("-c", "--config", default=None,
                   help="lora_config.yaml whose fishtune.template / fishtune.system_prompt are used (default: the repo's)")
    p.add_argument("--template", default=None, choices=list(template_names()),
                   help=f"prompt template for the 'text' field; training must use the same (default: from the config, else {DEFAULT_TEMPLATE})")
    p.add_argument("--system-prompt", default=None,
                   help="system preamble in the training text; '' for none (default: from the config, else the fish-care assistant prompt)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="local Hugging Face tokenizer/model folder, or 'qwen2' for Qwen2's own tokenizer rebuilt "
                        "offline: measure token lengths and reject too-long records")
    p.add_argument("--max-seq-length", type=int, default=1024,
                   help="max training text length in tokens, enforced only with --tokenizer (default: %(default)s)")
    p.add_argument("--vocabulary", default=None, metavar="PATH",
                   help="label vocabulary (YAML with categories/tags) every record's category and tags must be in "
                        "(default: vocabulary.yaml beside --input, when it exists; 'none': no check)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop invalid records (listed with reasons in <output-dir>/rejected.jsonl) instead of stopping")
    p.add_argument("--force", action="store_true",
                   help="overwrite outputs that were made from another input or with other options")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from fishtune.data import DataOptions, format_summary, run_pipeline

    if args.template is None or args.system_prompt is None:
        # The same template/system prompt finetune.py will use: one source of truth.
        from fishtune.train.config import DEFAULT_CONFIG_PATH, load_config

        config = args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None)
        project = load_config(config).project
        args.template = args.template or project.template
        if args.system_prompt is None:
            args.system_prompt = project.system_prompt

    opts = DataOptions(
        input=args.input,
        output_dir=args.output_dir,
        question_field=args.question_field,
        answer_field=args.answer_field,
        category_field=args.category_field,
        train_ratio=args.train_ratio,
        valid_ratio=args.valid_ratio,
        test_ratio=args.test_ratio,
        seed=args.seed,
        template=args.template,
        system_prompt=args.system_prompt,
        tokenizer=args.tokenizer,
        max_seq_length=args.max_seq_length,
        skip_invalid=args.skip_invalid,
        vocabulary=args.vocabulary,
        force=args.force,
    )
    report = run_pipeline(opts)
    print(format_summary(report, args.output_dir))
    return 0
