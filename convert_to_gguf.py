#!/usr/bin/env python3
"""HF folder -> GGUF (our own writer) -> llama.cpp quantization -> proof -> Ollama Modelfile.

    python3 convert_to_gguf.py --hf-model-dir huggingface_model \\
        --output-file ollama_model/qwen2-fish.gguf --quantize Q4_K_M --base-model Qwen/Qwen2-1.5B

K-quants and Q4_0 are made by llama.cpp from an unquantized intermediate that
is kept next to the output as ``<name>-f16.gguf`` (or ``-f32`` / ``-bf16``
with ``--outtype``). F32/F16/BF16/Q8_0 are written directly. Then llama.cpp
loads the result and is compared with transformers (``--no-verify`` skips
it), and a Modelfile is written next to the GGUF.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fishtune.errors import run_cli, setup_logging

logger = logging.getLogger("convert_to_gguf")


def build_parser() -> argparse.ArgumentParser:
    from fishtune.export.quantize import DEFAULT_QUANT, OUTTYPES, QUANT_TYPES

    ap = argparse.ArgumentParser(
        prog="convert_to_gguf.py",
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
    ap.add_argument("--dry-run", action="store_true", help="print the metadata and tensor table; write nothing")
    ap.add_argument("--force", action="store_true", help="overwrite existing outputs")
    ap.add_argument("--verbose", action="store_true", help="debug logging, llama.cpp's quantizer log")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if not args.verbose:
        logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file plan at INFO

    from fishtune.export import gguf_writer as gx
    from fishtune.export import quantize as qz
    from fishtune.fileio import ensure_can_write
    from fishtune.export.modelfile import DEFAULT_NUM_CTX, write_modelfile

    qtype = qz.normalize_quant_type(args.quantize)
    model = gx.read_hf_model(args.hf_model_dir)
    meta = gx.load_project_meta(args.hf_model_dir, args.template, args.system_prompt, args.base_model)
    template = meta.prompt_template
    out = Path(args.output_file)
    if out.suffix != ".gguf":
        logger.info("note: %s does not end in .gguf", out)
    via_llama_cpp = qz.needs_llama_cpp(qtype)
    inter_type = args.outtype.upper() if via_llama_cpp else qtype
    intermediate = out.with_name(f"{out.stem}-{args.outtype}.gguf") if via_llama_cpp else None
    modelfile = Path(args.modelfile) if args.modelfile else out.with_name("Modelfile")
    num_ctx = args.num_ctx or int(meta.extra.get("num_ctx") or DEFAULT_NUM_CTX)

    if args.dry_run:
        print(gx.describe(model, meta, inter_type))
        print(f"would write: {intermediate} ({inter_type}), then llama.cpp {qtype} -> {out}" if intermediate
              else f"would write: {out} ({qtype})")
        print(f"would write: {modelfile} (FROM the GGUF, template {template.name}, num_ctx {num_ctx})")
        return 0

    for p, what in ((out, "output GGUF"), (intermediate, "intermediate GGUF"), (modelfile, "Modelfile")):
        if p is not None:
            ensure_can_write(p, args.force, what)
    if via_llama_cpp:
        qz._import_llama_cpp()  # fail before the long write if llama.cpp is missing

    # 1. write (and quantize)
    if via_llama_cpp:
        gx.write_gguf(model, meta, intermediate, inter_type)
        qz.quantize_with_llama_cpp(intermediate, out, qtype, verbose=args.verbose)
        print(f"kept the unquantized intermediate {intermediate} ({inter_type}, {qz.size_mb(intermediate):.1f} MB)")
    else:
        gx.write_gguf(model, meta, out, qtype)
    counts = gx.tensor_type_counts(out)
    print(f"wrote {out} ({qtype}, {qz.size_mb(out):.1f} MB); tensor types: {qz.describe_types(counts)}")
    fallback = qz.fallback_tensors(out, qtype)
    if fallback:
        kinds = sorted({t for _, _, t in fallback})
        name, ne0, _ = fallback[0]
        print(f"note: {len(fallback)} matrices have rows that are not a multiple of {qz.K_QUANT_BLOCK} "
              f"(e.g. {name}: {ne0}); llama.cpp cannot store them as {qtype} K-quants and fell back to {', '.join(kinds)}")

    # 2. proof
    if not args.no_verify:
        from fishtune.export.verify import HFReference, prove_gguf

        report = prove_gguf(out, HFReference(args.hf_model_dir), template, meta.system_prompt, exact=(qtype == "F32"))
        print("\n".join(report.lines()))
        if not report.ok:
            failed = ", ".join(c.name for c in report.checks if not c.ok)
            sys.stderr.write(f"error: proof failed ({failed}); {out} is kept for inspection, no Modelfile written\n")
            return 1

    # 3. Modelfile
    write_modelfile(modelfile, out, template, meta.system_prompt, num_ctx)
    print(f"wrote {modelfile}: template {template.name}, stops {list(template.stop_strings)}, num_ctx {num_ctx}")
    print(f"next: ollama create fish-care-assistant -f {modelfile} && ollama run fish-care-assistant")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main)())
