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
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fishtune.errors import UserError, run_cli, setup_logging
from fishtune.fileio import iter_jsonl

if TYPE_CHECKING:  # annotations only: no heavy import at start-up
    from fishtune.generation import SamplingConfig
    from fishtune.loading import LoadedModel


SEED_QUESTION = "孔雀鱼多久换一次水？"  # the seed guide's inference.py example


def build_parser() -> argparse.ArgumentParser:
    from fishtune.generation import add_sampling_args
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


def predict_rows(lm: LoadedModel, rows: list[dict], sampling: SamplingConfig, system: str | None, desc: str, progress: bool) -> list[dict]:
    from tqdm import tqdm

    from fishtune.generation import generate

    out = []
    for row in tqdm(rows, desc=desc, unit="q", disable=not progress, file=sys.stderr):
        # Multi-turn rows (process_data's "history") are prompted with their earlier turns.
        msgs = [*(row.get("history") or []), {"role": "user", "content": row["question"].strip()}]
        res = generate(lm, lm.template.render_prompt(msgs, system), sampling)
        out.append({**row, "prediction": res.text, "finish_reason": res.finish_reason,
                    "generation_tokens": res.generation_tokens, "tokens_per_s": round(res.generation_tps, 2)})
    return out


def run_evaluation(args: argparse.Namespace, sampling: SamplingConfig, progress: bool) -> int:
    import gc

    from fishtune.evaluation import format_table, perplexity, score_predictions
    from fishtune.fileio import atomic_write_json
    from fishtune.loading import load_model, meta_for_base

    log = logging.getLogger("inference")
    from fishtune.adapter_meta import read_project_meta

    check_output(args.report, args.force, "--report")
    rows = read_rows(args.evaluate, args.limit, need_answer=True)
    if not args.no_adapter:
        read_project_meta(args.adapter_path)  # a missing/corrupt adapter fails now, not after the base model ran
    variants = [("base", None)] if args.no_adapter else [("base", None), ("finetuned", args.adapter_path)]
    meta = meta_for_base(args.adapter_path)  # base and fine-tuned get the same prompt
    system = args.system if args.system is not None else meta.system_prompt
    log.info("evaluating on %d questions of %s, %s decoding, max %d tokens", len(rows), args.evaluate,
             "greedy" if sampling.greedy else f"temperature {sampling.temperature}", sampling.max_tokens)
    scores, preds = [], {}
    for name, adapter in variants:
        t0 = time.perf_counter()
        lm = load_model(args.model or meta.base_model, None, meta=meta) if adapter is None \
            else load_model(args.model, adapter)
        preds[name] = predict_rows(lm, rows, sampling, system, name, progress)
        ppl = perplexity(lm, rows, system)
        s = score_predictions(name, lm.model_path, lm.adapter_path, preds[name], ppl)
        s.extra["seconds"] = round(time.perf_counter() - t0, 2)
        scores.append(s)
        del lm
        gc.collect()
    report = {
        "test_file": str(args.evaluate),
        "rows": len(rows),
        "template": meta.template,
        "system_prompt": system,
        "sampling": sampling.to_dict(),
        "decoding": "greedy" if sampling.greedy else "sampled",
        "metrics_notes": {
            "rouge_l_f1": "character-level ROUGE-L F1 (whitespace removed), mean over rows",
            "bleu4": "character BLEU-4, add-one smoothing for 2-4-grams, brevity penalty, mean over rows",
            "exact_stop_rate": "share of answers that ended at the end token/stop string, not the token limit",
            "mean_answer_chars": "mean answer length in characters (whitespace removed)",
            "perplexity": "teacher-forced perplexity of the reference answers (answer + end token only)",
        },
        "models": {s.name: s.to_dict() for s in scores},
        "predictions": [
            {"question": r["question"], "reference": r["answer"],
             **{f"{name}_prediction": preds[name][i]["prediction"] for name, _ in variants},
             **{f"{name}_finish_reason": preds[name][i]["finish_reason"] for name, _ in variants}}
            for i, r in enumerate(rows)
        ],
    }
    atomic_write_json(args.report, report)
    print(format_table(scores))
    print(f"{'greedy' if sampling.greedy else 'sampled'} decoding, max {sampling.max_tokens} tokens; "
          f"report written to {args.report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    import fishtune  # noqa: F401  (OpenBLAS before mlx)
    from fishtune.generation import ensure_utf8, sampling_from_args, stream_generate
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


if __name__ == "__main__":
    sys.exit(run_cli(main)())
