#!/usr/bin/env python3
"""Fuse the fine-tuned adapter into its base: a Hugging Face folder + a PEFT adapter.

    python3 convert_to_huggingface.py --model-name Qwen/Qwen2-1.5B \
        --adapter-path lora_qwen2_1.5b --output-dir huggingface_model

Writes ``model.safetensors``, ``config.json``, ``generation_config.json``,
tokenizer files (``chat_template`` = the training template), ``fishtune.json``
and ``peft_adapter/``; then proves MLX base+adapter, transformers fused and
transformers+PEFT agree (logits and 32 greedy tokens). Exit 1 if they don't.
"""
from __future__ import annotations

import argparse
import logging
import sys

import fishtune  # noqa: F401  (OpenBLAS before mlx)
from fishtune.errors import run_cli, setup_logging

logger = logging.getLogger("convert_to_huggingface")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_to_huggingface.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-name", default=None, help="base model (HF id or local folder); default: the one the adapter was trained on")
    p.add_argument("--adapter-path", default="lora_qwen2_1.5b", help="adapter folder written by finetune.py (default: %(default)s)")
    p.add_argument("--output-dir", default="huggingface_model", help="output folder (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="output dtype (default: the base's; a quantized base gives float32). The proof's max |logit diff| "
                   "tolerance is 0.0001 for float32, looser for half precision: 0.05 float16, 0.25 bfloat16 "
                   "(every fused weight is rounded; greedy tokens may then differ)")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="shard model.safetensors above this many GiB (default: %(default)s)")
    p.add_argument("--verify", dest="verify", action="store_true", default=True, help="prove the export equals MLX base+adapter (default)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the proof")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from fishtune.export.hf import export_huggingface, format_checks

    result = export_huggingface(
        args.model_name, args.adapter_path, args.output_dir,
        dtype=args.dtype, force=args.force, verify=args.verify, max_shard_gb=args.max_shard_size,
    )
    logger.info("Hugging Face model: %s (%s)", result.output_dir, result.dtype)
    if result.peft_dir:
        logger.info("PEFT adapter:       %s", result.peft_dir)
    if result.checks:
        print(format_checks(result.checks))
    if not result.passed:
        logger.error("verification FAILED: the export differs from MLX base+adapter (numbers above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main)())
