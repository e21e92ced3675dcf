"""``finetune.py``: DoRA (or LoRA / full) fine-tuning through MLX-LM's Python API.

Takes the same flags as ``python3 -m mlx_lm lora`` (the seed's command line
works with ``python3 finetune.py`` in its place). Every flag defaults to
``lora_config.yaml`` (``-c``, else the repository's), then to the built-in
defaults. Also ``python -m fishtune.train``.
"""
from __future__ import annotations

import argparse
from typing import Any

from fishtune.errors import setup_logging

# argparse dest -> config key, for the flags that map one to one.
CONFIG_FLAGS = (
    "model", "train", "data", "fine_tune_type", "optimizer", "num_layers", "batch_size", "iters", "val_batches",
    "learning_rate", "steps_per_report", "steps_per_eval", "grad_accumulation_steps", "adapter_path", "save_every",
    "test", "test_batches", "max_seq_length", "grad_checkpoint", "seed", "resume", "mask_prompt", "template",
    "system_prompt",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune.py",
        description="DoRA/LoRA/full fine-tuning through MLX-LM (flags as in `mlx_lm lora`; defaults from -c YAML).",
    )
    p.add_argument("--model", help="base model: local folder or Hugging Face name (default Qwen/Qwen2-1.5B)")
    p.add_argument("--train", action="store_true", default=None, help="train (the default unless only --test is given)")
    p.add_argument("--data", help="folder with train.jsonl, valid.jsonl, test.jsonl (default ./data)")
    p.add_argument("--fine-tune-type", choices=["lora", "dora", "full"], help="default dora")
    p.add_argument("--optimizer", choices=["adam", "adamw", "muon", "sgd", "adafactor"])
    p.add_argument("--num-layers", type=int, help="train the last N transformer layers (-1: all)")
    p.add_argument("--batch-size", type=int, help="records per step (global, across processes)")
    p.add_argument("--iters", type=int, help="training steps")
    p.add_argument("--val-batches", type=int, help="validation batches per evaluation (-1: all)")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--steps-per-report", type=int, help="steps between train-loss reports")
    p.add_argument("--steps-per-eval", type=int, help="steps between validation losses")
    p.add_argument("--grad-accumulation-steps", type=int, help="steps per optimizer update")
    p.add_argument("--adapter-path", help="output folder (default ./lora_qwen2_1.5b)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--test", action="store_true", default=None,
                   help="report test loss/perplexity after training; without --train: evaluate --adapter-path")
    p.add_argument("--test-batches", type=int, help="test batches (-1: all)")
    p.add_argument("--max-seq-length", type=int, help="longer records are truncated at the end")
    p.add_argument("--grad-checkpoint", action="store_true", default=None, help="gradient checkpointing")
    p.add_argument("--seed", type=int)
    p.add_argument("-c", "--config", help="YAML config (lora_config.yaml); flags override it")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the newest checkpoint in --adapter-path (exact: same result as uninterrupted)")
    mask = p.add_mutually_exclusive_group()
    mask.add_argument("--mask-prompt", dest="mask_prompt", action="store_true", default=None,
                      help="loss on the answer only (default)")
    mask.add_argument("--no-mask-prompt", dest="mask_prompt", action="store_false",
                      help="loss on prompt and answer")
    p.add_argument("--template", help="prompt template: alpaca (the seed's) or chatml")
    p.add_argument("--system-prompt", help='system preamble for every record ("" for none)')
    p.add_argument("--force", action="store_true", help="overwrite a finished or unfinished run in --adapter-path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user gave (None = not given, so the config decides)."""
    return {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k, None) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fishtune.train.config import DEFAULT_CONFIG_PATH, load_config
    from fishtune.train.distributed import limit_blas_threads, world
    from fishtune.train.trainer import run

    group = world()  # under mlx.launch: this process's rank; else rank 0 of 1
    setup_logging(args.verbose, quiet=group.rank() != 0)  # one voice: rank 0 reports
    limit_blas_threads(group.rank(), group.size())
    config = args.config
    if config is None and DEFAULT_CONFIG_PATH.is_file():
        config = DEFAULT_CONFIG_PATH  # the seed's layout: lora_config.yaml next to the scripts
    run(load_config(config, overrides_from_args(args)), force=args.force, progress=not args.no_progress)
    return 0

