"""Fuse the fine-tuned adapter into its base: a Hugging Face folder + a PEFT adapter.

``convert_to_huggingface.py`` / ``python -m fishtune.export huggingface``.
The export and its proof: :mod:`fishtune.export.hf`.
"""
from __future__ import annotations

import argparse
import logging

from fishtune.export.cli_common import add_common_flags, parse_args
from fishtune.export.hf import DTYPES, TOLERANCE

logger = logging.getLogger("convert_to_huggingface")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "convert_to_huggingface.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-name", default=None, help="base model (HF id or local folder); default: the one the adapter was trained on")
    p.add_argument("--adapter-path", default="lora_qwen2_1.5b", help="adapter folder written by finetune.py (default: %(default)s)")
    p.add_argument("--output-dir", default="huggingface_model", help="output folder (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="output dtype (default: the base's; a quantized base gives float32). The proof's max |logit diff| "
                   f"tolerance is {TOLERANCE['float32']:g} for float32, looser for half precision: "
                   f"{TOLERANCE['float16']:g} float16, {TOLERANCE['bfloat16']:g} bfloat16 "
                   "(every fused weight is rounded; greedy tokens may then differ)")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="shard model.safetensors above this many GiB (default: %(default)s)")
    p.add_argument("--verify", dest="verify", action="store_true", default=True, help="prove the export equals MLX base+adapter (default)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the proof")
    add_common_flags(p, dry_run="check the adapter and the base, print what would be written; write nothing",
                     force="overwrite an existing output folder")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(build_parser, argv, prog)
    from fishtune.export.hf import dry_run_text, export_huggingface, format_checks

    options = dict(dtype=args.dtype, force=args.force, verify=args.verify, max_shard_gb=args.max_shard_size)
    if args.dry_run:
        print(dry_run_text(args.model_name, args.adapter_path, args.output_dir, **options))
        return 0
    result = export_huggingface(args.model_name, args.adapter_path, args.output_dir, **options)
    logger.info("Hugging Face model: %s (%s)", result.output_dir, result.dtype)
    if result.peft_dir:
        logger.info("PEFT adapter:       %s", result.peft_dir)
    if result.checks:
        print(format_checks(result.checks))
    if not result.passed:
        logger.error("verification FAILED: the export differs from MLX base+adapter (numbers above)")
        return 1
    return 0
