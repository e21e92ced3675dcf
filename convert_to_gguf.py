#!/usr/bin/env python3
"""HF folder -> GGUF (our own writer) -> llama.cpp quantization -> proof -> Ollama Modelfile.

    python3 convert_to_gguf.py --hf-model-dir huggingface_model \\
        --output-file ollama_model/qwen2-fish.gguf --quantize Q4_K_M --base-model Qwen/Qwen2-1.5B

K-quants and Q4_0 are made by llama.cpp from an unquantized intermediate that
is kept next to the output as ``<name>-f16.gguf`` (or ``-f32`` / ``-bf16``
with ``--outtype``). F32/F16/BF16/Q8_0 are written directly. Then llama.cpp
loads the result and is compared with transformers (``--no-verify`` skips
it), and a Modelfile is written next to the GGUF. All logic: ``fishtune/export/``.
"""
import sys

from fishtune.errors import run_cli
from fishtune.export.gguf_cli import build_parser, main  # noqa: F401  (build_parser: the flags, for tools)

if __name__ == "__main__":
    sys.exit(run_cli(main)())
