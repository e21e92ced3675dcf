"""The GGUF stage: HF folder -> GGUF (our writer) -> llama.cpp quantization -> proof -> Modelfile.

:func:`plan_gguf_export` decides every path and type from the options (and
refuses bad input before anything is written); :func:`run_gguf_export` runs
the steps and prints what it did; :func:`dry_run_text` is ``--dry-run``.
``convert_to_gguf.py`` / ``python -m fishtune.export gguf`` is the command
line (:mod:`fishtune.export.gguf_cli`).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from fishtune.export import gguf_writer
from fishtune.export.gguf_file import fallback_tensors, tensor_type_counts
from fishtune.export.gguf_types import (
    K_QUANT_BLOCK,
    needs_llama_cpp,
    normalize_quant_type,
)
from fishtune.export.modelfile import DEFAULT_NUM_CTX, write_modelfile
from fishtune.fileio import ensure_can_write
from fishtune.project import ExportFiles, ProjectMeta, read_export_meta

logger = logging.getLogger(__name__)


@dataclass
class GGUFExport:
    """One planned run of the GGUF stage."""

    hf_dir: Path
    model: gguf_writer.HFModel
    meta: ProjectMeta
    qtype: str  # the final type (--quantize)
    out: Path
    intermediate: Path | None  # the unquantized file llama.cpp quantizes (kept); None: written directly
    inter_type: str  # the type our writer writes (the intermediate's, or qtype)
    modelfile: Path
    num_ctx: int
    verify: bool = True

    @property
    def via_llama_cpp(self) -> bool:
        return self.intermediate is not None


def plan_gguf_export(
    hf_dir: str | Path, output_file: str | Path, quantize: str, outtype: str = "f16", *,
    template: str | None = None, system_prompt: str | None = None, base_model: str | None = None,
    modelfile: str | Path | None = None, num_ctx: int | None = None, verify: bool = True,
) -> GGUFExport:
    """Validate the options and the HF folder; decide every output path. Writes nothing."""
    qtype = normalize_quant_type(quantize)
    model = gguf_writer.read_hf_model(hf_dir)
    meta = read_export_meta(hf_dir, template, system_prompt, base_model)
    out = Path(output_file)
    if out.suffix != ".gguf":
        logger.info("note: %s does not end in .gguf", out)
    via_llama_cpp = needs_llama_cpp(qtype)
    return GGUFExport(
        hf_dir=Path(hf_dir), model=model, meta=meta, qtype=qtype, out=out,
        intermediate=out.with_name(f"{out.stem}-{outtype}.gguf") if via_llama_cpp else None,
        inter_type=outtype.upper() if via_llama_cpp else qtype,
        modelfile=Path(modelfile) if modelfile else out.with_name(ExportFiles.MODELFILE),
        num_ctx=num_ctx or int(meta.extra.get("num_ctx") or DEFAULT_NUM_CTX),
        verify=verify,
    )


def dry_run_text(job: GGUFExport) -> str:
    """The metadata, the tensor table and the files a run would write."""
    lines = [gguf_writer.describe(job.model, job.meta, job.inter_type)]
    if job.via_llama_cpp:
        lines.append(f"would write: {job.intermediate} ({job.inter_type}), then llama.cpp {job.qtype} -> {job.out}")
    else:
        lines.append(f"would write: {job.out} ({job.qtype})")
    lines.append(f"would write: {job.modelfile} (FROM the GGUF, template {job.meta.template}, num_ctx {job.num_ctx})")
    return "\n".join(lines)


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def _describe_types(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _write(job: GGUFExport) -> None:
    """Step 1: our writer, then (K-quants, Q4_0) llama.cpp's quantizer; print the result and any fallback."""
    if job.via_llama_cpp:
        from fishtune.export.llama_cpp import quantize

        gguf_writer.write_gguf(job.model, job.meta, job.intermediate, job.inter_type)
        quantize(job.intermediate, job.out, job.qtype)
        print(f"kept the unquantized intermediate {job.intermediate} ({job.inter_type}, "
              f"{_size_mb(job.intermediate):.1f} MB)")
    else:
        gguf_writer.write_gguf(job.model, job.meta, job.out, job.qtype)
    counts = tensor_type_counts(job.out)
    print(f"wrote {job.out} ({job.qtype}, {_size_mb(job.out):.1f} MB); tensor types: {_describe_types(counts)}")
    fallback = fallback_tensors(job.out, job.qtype)
    if fallback:
        kinds = sorted({t for _, _, t in fallback})
        name, ne0, _ = fallback[0]
        print(f"note: {len(fallback)} matrices have rows that are not a multiple of {K_QUANT_BLOCK} "
              f"(e.g. {name}: {ne0}); llama.cpp cannot store them as {job.qtype} K-quants and fell back to "
              f"{', '.join(kinds)}")


def _prove(job: GGUFExport) -> bool:
    """Step 2: llama.cpp against transformers; prints the report."""
    from fishtune.export.verify import HFReference, prove_gguf

    report = prove_gguf(job.out, HFReference(job.hf_dir), job.meta.prompt_template, job.meta.system_prompt,
                        exact=(job.qtype == "F32"))
    print("\n".join(report.lines()))
    if not report.ok:
        failed = ", ".join(c.name for c in report.checks if not c.ok)
        sys.stderr.write(f"error: proof failed ({failed}); {job.out} is kept for inspection, no Modelfile written\n")
    return report.ok


def run_gguf_export(job: GGUFExport, force: bool = False) -> int:
    """Write, quantize, prove, write the Modelfile. 0: done; 1: the proof failed (no Modelfile)."""
    for path, what in ((job.out, "output GGUF"), (job.intermediate, "intermediate GGUF"), (job.modelfile, "Modelfile")):
        if path is not None:
            ensure_can_write(path, force, what)
    if job.via_llama_cpp:
        from fishtune.export.llama_cpp import import_llama_cpp

        import_llama_cpp()  # fail before the long write if llama.cpp is missing
    _write(job)
    if job.verify and not _prove(job):
        return 1
    template = job.meta.prompt_template
    write_modelfile(job.modelfile, job.out, template, job.meta.system_prompt, job.num_ctx)
    print(f"wrote {job.modelfile}: template {template.name}, stops {list(template.stop_strings)}, num_ctx {job.num_ctx}")
    print(f"next: ollama create fish-care-assistant -f {job.modelfile} && ollama run fish-care-assistant")
    return 0


__all__ = ["GGUFExport", "plan_gguf_export", "dry_run_text", "run_gguf_export"]
