#!/usr/bin/env python3
"""Fuse the fine-tuned adapter into its base: a Hugging Face folder + a PEFT adapter.

    python3 convert_to_huggingface.py --model-name Qwen/Qwen2-1.5B \
        --adapter-path lora_qwen2_1.5b --output-dir huggingface_model

Writes ``model.safetensors``, ``config.json``, ``generation_config.json``,
tokenizer files (``chat_template`` = the training template), ``fishtune.json``
and ``peft_adapter/``; then proves MLX base+adapter, transformers fused and
transformers+PEFT agree (logits and 32 greedy tokens). Exit 1 if they don't.
All logic: ``fishtune/export/``.
"""
import sys

from fishtune.errors import run_cli
from fishtune.export.hf_cli import build_parser, main  # noqa: F401  (build_parser: the flags, for tools)

if __name__ == "__main__":
    sys.exit(run_cli(main)())
