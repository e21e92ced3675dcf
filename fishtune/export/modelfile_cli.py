"""``python -m fishtune.export modelfile``: write an Ollama Modelfile for a GGUF file.

The template and system prompt come from the HF export's ``fishtune.json``
(``--hf-model-dir``), else the defaults; ``--template`` / ``--system-prompt``
override. Regenerate the repo's top-level Modelfile with
``python -m fishtune.export modelfile --output Modelfile --force``.
"""
from __future__ import annotations

import argparse

from fishtune.export.cli_common import add_common_flags, parse_args
from fishtune.export.modelfile import (
    DEFAULT_GGUF,
    DEFAULT_NUM_CTX,
    from_path,
    render_modelfile,
    write_modelfile,
)
from fishtune.fileio import ensure_can_write
from fishtune.project import ExportFiles, read_export_meta


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog or "python -m fishtune.export modelfile", description="Write an Ollama Modelfile for a GGUF file.")
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="the GGUF file FROM points at (default: %(default)s)")
    ap.add_argument("--output", default=ExportFiles.MODELFILE, help="Modelfile to write (default: %(default)s)")
    ap.add_argument("--hf-model-dir", default=None, help=f"read template/system prompt from its {ExportFiles.META}")
    ap.add_argument("--template", default=None, help=f"prompt template name (default: from {ExportFiles.META} or alpaca)")
    ap.add_argument("--system-prompt", default=None, help=f"system prompt (default: from {ExportFiles.META} or the seed's)")
    ap.add_argument("--num-ctx", type=int, default=DEFAULT_NUM_CTX)
    add_common_flags(ap, dry_run="print the Modelfile; write nothing", force="overwrite an existing Modelfile")
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(build_parser, argv, prog)
    meta = read_export_meta(args.hf_model_dir or "huggingface_model", args.template, args.system_prompt)
    if args.dry_run:
        print(render_modelfile(from_path(args.gguf, args.output), meta.prompt_template, meta.system_prompt,
                               args.num_ctx), end="")
        return 0
    ensure_can_write(args.output, args.force, "Modelfile")
    write_modelfile(args.output, args.gguf, meta.prompt_template, meta.system_prompt, args.num_ctx)
    print(f"wrote {args.output} (FROM {from_path(args.gguf, args.output)})")
    return 0
