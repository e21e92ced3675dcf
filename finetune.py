#!/usr/bin/env python3
"""Fine-tune Qwen2 with DoRA (or LoRA / full) through MLX-LM's Python API.

Takes the same flags as ``python3 -m mlx_lm lora`` (the seed's command line
works with ``python3 finetune.py`` in its place). Every flag defaults to
``lora_config.yaml`` (``-c``), then to the built-in defaults. The loss covers
the answer only; outputs, exact ``--resume`` and multi-process training under
``mlx.launch`` are described in the README. All logic: ``fishtune/train/``.

    python3 finetune.py --model Qwen/Qwen2-1.5B --train --data ./data \\
        --adapter-path ./lora_qwen2_1.5b --test -c lora_config.yaml
"""
import sys

from fishtune.errors import run_cli
from fishtune.train.cli import build_parser, main  # noqa: F401  (build_parser: the flags, for tools)

if __name__ == "__main__":
    sys.exit(run_cli(main)())
