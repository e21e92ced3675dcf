"""``inference.py``: answer with the base model + the fine-tuned adapter, or evaluate both.

Modes: one question (wrapped in the training template with the adapter's
system prompt), a raw prompt, a batch of JSONL rows, or an evaluation of
base vs fine-tuned on a test split. Also ``python -m fishtune.infer``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fishtune.errors import UserError, setup_logging
from fishtune.fileio import iter_jsonl

if TYPE_CHECKING:  # annotations only: no heavy import at start-up
    from fishtune.infer.generation import SamplingConfig


SEED_QUESTION = "孔雀鱼多久换一次水？"  # the seed guide's inference.py example


def build_parser() -> argparse.ArgumentParser:
    from fishtune.infer.generation import add_sampling_args
    from fishtune.loading import add_model_args

    p = argparse.ArgumentParser(
        prog="inference.py",
        description="Answer fish-care questions with the fine-tuned model (base model + adapter),\n"
        "one at a time or in batch, or evaluate base vs fine-tuned on the test set.",
        epilog="examples:\n"
        "  python inference.py --question \"鱼身上有白点怎么办？\"\n"
        "  python inference.py --input data/test.jsonl --output predictions.jsonl\n"
        "  python inference.py --evaluate data/test.jsonl --report eval_report.json --limit 50\n"
        "  python inference.py --question \"...\" --no-adapter          # the base model alone",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Not required: the seed's bare `python3 inference.py` asks its example question.
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--question", help="a question, wrapped in the training template with the system prompt "
                      f"(default, when no other mode is given: the seed's example {SEED_QUESTION!r})")
    mode.add_argument("--prompt", help="a raw prompt, sent to the model as is (a typed \\n is a newline)")
    mode.add_argument("--input", type=Path, metavar="JSONL", help="batch mode: a JSONL file of rows with \"question\"")
    mode.add_argument("--evaluate", type=Path, metavar="JSONL",
                      help="evaluate base model and fine-tuned model on a test JSONL (rows with question, answer)")
    add_model_args(p)
    p.add_argument("--system", default=None,
                   help="system prompt for --question/--input (default: the one the adapter was trained with)")
    p.add_argument("--output", type=Path, default=None, help="batch mode: predictions JSONL to write")
    p.add_argument("--report", type=Path, default=Path("eval_report.json"),
                   help="--evaluate: JSON report to write (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="--input/--evaluate: only the first N rows")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output/--report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr after the answer")
    add_sampling_args(p, greedy_note="--evaluate defaults to greedy: --temperature 0")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def check_output(path: Path, force: bool, what: str) -> None:
    """Fail before any model work when ``path`` can't be written (finished work needs --force)."""
    from fishtune.fileio import ensure_can_write

    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; pass a file path instead")
    ensure_can_write(path, force, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, no permission, ...
        raise UserError(f"can't create the folder of {what} {path} ({exc.strerror}); pass a writable path") from None


def read_rows(path: Path, limit: int | None, need_answer: bool) -> list[dict]:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"{path} {what}; run process_data.py first or pass an existing JSONL file")
    rows = []
    for n, row in iter_jsonl(path):
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise UserError(f"{path}:{n}: needs a non-empty \"question\" string field")
        if need_answer and (not isinstance(row.get("answer"), str) or not row["answer"].strip()):
            raise UserError(f"{path}:{n}: needs a non-empty \"answer\" string field to evaluate against")
        history = row.get("history")
        if history is not None and not (isinstance(history, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in history)):
            raise UserError(f"{path}:{n}: \"history\" must be a list of {{\"role\", \"content\"}} objects "
                            "(as process_data.py writes it); fix or drop it")
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{path} has no rows")
    return rows


def run_evaluation(args: argparse.Namespace, sampling: SamplingConfig, progress: bool) -> int:
    from fishtune.fileio import atomic_write_json
    from fishtune.infer.evaluation import evaluate_models, format_table

    check_output(args.report, args.force, "--report")
    rows = read_rows(args.evaluate, args.limit, need_answer=True)
    report, scores = evaluate_models(rows, str(args.evaluate), args.model, args.adapter_path, sampling,
                                     system=args.system, base_only=args.no_adapter, progress=progress)
    atomic_write_json(args.report, report)
    print(format_table(scores))
    print(f"{'greedy' if sampling.greedy else 'sampled'} decoding, max {sampling.max_tokens} tokens; "
          f"report written to {args.report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from fishtune.infer.generation import (
        ensure_utf8,
        sampling_from_args,
        stream_generate,
    )
    from fishtune.loading import load_from_args

    if args.question is None and args.prompt is None and args.input is None and args.evaluate is None:
        args.question = SEED_QUESTION
        logging.getLogger("inference").info("no --question given; asking the example question %s", SEED_QUESTION)
    progress = not args.no_progress and sys.stderr.isatty()
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit} must be at least 1")
    if args.question is not None and not args.question.strip():
        raise UserError("--question is empty; give the question text")
    if args.prompt is not None and not args.prompt:
        raise UserError("--prompt is empty; give the prompt text")
    for flag in ("question", "prompt", "system"):
        if getattr(args, flag) is not None:
            ensure_utf8(getattr(args, flag), f"--{flag}")
    if args.input is not None and args.output is None:
        raise UserError("--input needs --output PATH for the predictions JSONL")
    if args.evaluate is not None:
        # Greedy by default: reproducible numbers.
        return run_evaluation(args, sampling_from_args(args, temperature=0.0), progress)
    sampling = sampling_from_args(args)

    if args.input is not None:
        from fishtune.fileio import atomic_write_jsonl
        from fishtune.infer.evaluation import predict_rows

        check_output(args.output, args.force, "--output")
        rows = read_rows(args.input, args.limit, need_answer=False)
        lm = load_from_args(args)
        system = args.system if args.system is not None else lm.system_prompt
        preds = predict_rows(lm, rows, sampling, system, "predict", progress)
        atomic_write_jsonl(args.output, preds)
        stops = sum(p["finish_reason"] == "stop" for p in preds)
        sys.stderr.write(f"wrote {len(preds)} predictions to {args.output} ({stops} ended at the stop string)\n")
        return 0

    lm = load_from_args(args)
    if args.question is not None:
        system = args.system if args.system is not None else lm.system_prompt
        prompt = lm.template.question_prompt(args.question.strip(), system)
    else:
        prompt = args.prompt.replace("\\n", "\n")  # a typed "\n" means a newline
    final = None
    for chunk in stream_generate(lm, prompt, sampling):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.finish_reason is not None:
            final = chunk
    sys.stdout.write("\n")
    if args.stats and final is not None:
        sys.stderr.write(f"[{final.finish_reason}; prompt {final.prompt_tokens} tokens, answer "
                         f"{final.generation_tokens} tokens, {final.generation_tps:.1f} tokens/s]\n")
    return 0
