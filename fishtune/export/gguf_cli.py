"""``convert_to_gguf.py`` / ``python -m fishtune.export gguf``: the GGUF stage's command line.

Convert the fused Hugging Face model to GGUF, quantize it with llama.cpp,
prove it against transformers and write an Ollama Modelfile. The steps:
:mod:`fishtune.export.gguf_pipeline`.
"""
from __future__ import annotations

import argparse
import logging

from fishtune.export.cli_common import add_common_flags, parse_args
from fishtune.export.gguf_types import DEFAULT_QUANT, OUTTYPES, QUANT_TYPES


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog or "convert_to_gguf.py",
        description="Convert the fused Hugging Face model to GGUF, quantize it with llama.cpp, "
        "prove it against transformers and write an Ollama Modelfile.",
    )
    ap.add_argument("--hf-model-dir", default="huggingface_model", help="HF folder from convert_to_huggingface.py (default: %(default)s)")
    ap.add_argument("--output-file", default="ollama_model/qwen2-fish.gguf", help="GGUF to write (default: %(default)s)")
    ap.add_argument("--quantize", default=DEFAULT_QUANT, metavar="TYPE",
                    help=f"one of {', '.join(QUANT_TYPES)} (default: %(default)s)")
    ap.add_argument("--outtype", default="f16", choices=OUTTYPES,
                    help="type of the unquantized intermediate kept for llama.cpp's quantizer (default: %(default)s)")
    ap.add_argument("--base-model", default=None, help="base model id for general.* metadata (default: from fishtune.json, else Qwen/Qwen2-1.5B)")
    ap.add_argument("--template", default=None, help="prompt template (default: from fishtune.json, else alpaca)")
    ap.add_argument("--system-prompt", default=None, help="system prompt (default: from fishtune.json, else the seed's)")
    ap.add_argument("--modelfile", default=None, help="Modelfile to write (default: Modelfile next to the output GGUF)")
    ap.add_argument("--num-ctx", type=int, default=None, help="PARAMETER num_ctx in the Modelfile (default: 1024)")
    ap.add_argument("--no-verify", action="store_true", help="skip the llama.cpp vs transformers proof")
    add_common_flags(ap, dry_run="print the metadata and tensor table; write nothing",
                     force="overwrite existing outputs", verbose="debug logging, llama.cpp's quantizer log")
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(build_parser, argv, prog)
    if not args.verbose:
        logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file plan at INFO
    # llama.cpp's quantizer logs every tensor through llama-cpp-python's callback; keep it for --verbose.
    # CRITICAL, not ERROR: llama-cpp-python maps ggml's current WARN level to ERROR, so its per-tensor
    # "falling back to q5_0" warnings would print anyway (the pipeline reports fallbacks itself).
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)

    from fishtune.export.gguf_pipeline import (
        dry_run_text,
        plan_gguf_export,
        run_gguf_export,
    )

    job = plan_gguf_export(
        args.hf_model_dir, args.output_file, args.quantize, args.outtype,
        template=args.template, system_prompt=args.system_prompt, base_model=args.base_model,
        modelfile=args.modelfile, num_ctx=args.num_ctx, verify=not args.no_verify,
    )
    if args.dry_run:
        print(dry_run_text(job))
        return 0
    return run_gguf_export(job, force=args.force)
