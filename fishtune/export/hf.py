"""MLX base + adapter -> a fused Hugging Face checkpoint and a PEFT adapter.

Why our own exporter: MLX-LM's ``fuse`` writes MLX-flavoured files and no PEFT
adapter; fusing into a quantized base silently drops the adapter
(mlx-lm#1172). We dequantize, fuse with MLX's own ``fuse()`` math, write a
standard ``Qwen2ForCausalLM`` (or ``LlamaForCausalLM``) folder plus
``peft_adapter/`` (:mod:`fishtune.export.peft_adapter`), and then *prove*
both equal MLX base+adapter: next-token logits and 32 greedy tokens.

Light at import (no numpy, torch or mlx), so ``--help`` stays cheap.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishtune.errors import UserError
from fishtune.export.architectures import Architecture, by_model_type
from fishtune.fileio import (
    atomic_dir,
    atomic_write_json,
    ensure_can_write,
    read_json_object,
)
from fishtune.project import (
    ExportFiles,
    ProjectMeta,
    read_adapter_config,
    read_project_meta,
)

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    ExportFiles.TOKENIZER,
    ExportFiles.TOKENIZER_CONFIG,
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
DTYPES = ("float32", "float16", "bfloat16")
# Max |logit difference| accepted per output dtype. float32 is the real proof;
# half precision rounds every fused weight, so the bound is looser (stated).
TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2.5e-1}
GREEDY_TOKENS = 32

VERIFY_QUESTIONS = (
    "孔雀鱼多久换一次水？",
    "鱼身上有白点还蹭缸怎么办？",
    "How often should I change the water?",
)


@dataclass
class ExportResult:
    output_dir: Path
    peft_dir: Path | None
    dtype: str
    checks: dict[str, Any] = field(default_factory=dict)
    passed: bool = True


def _base_dtype(config: dict[str, Any], weights: dict[str, Any]) -> str:
    name = config.get("torch_dtype") or config.get("dtype")
    if name in DTYPES:
        return name
    for w in weights.values():  # fall back to the stored float dtype
        s = str(w.dtype).replace("mlx.core.", "")
        if s in DTYPES:
            return s
    return "float32"


def _read_base_config(base_path: Path) -> tuple[dict[str, Any], Architecture]:
    """The base's ``config.json`` and its family; another family is refused by name."""
    path = base_path / ExportFiles.CONFIG
    config = read_json_object(path, "point --model-name at a Hugging Face model folder")
    return config, by_model_type(config.get("model_type"), str(path))


def _fuse_in_place(model) -> None:
    """Replace every LoRA/DoRA layer by its fused linear and dequantize the rest."""
    from mlx_lm.utils import dequantize_model

    from fishtune.loading import fuse_adapter_layers

    fuse_adapter_layers(model, dequantize=True)
    dequantize_model(model)


def _flat_weights(model) -> dict[str, Any]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


def _check_finite(weights: dict[str, Any]) -> None:
    import numpy as np

    for name, w in weights.items():
        if not np.isfinite(w).all():
            bad = int((~np.isfinite(w)).sum())
            raise UserError(f"fused weight {name} has {bad} non-finite values; the adapter or base is corrupt")


def _to_numpy(weights: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np

    return {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}


# ---- writing the folder ----------------------------------------------------------


def _save_safetensors(weights: dict[str, Any], out_dir: Path, dtype: str, max_shard_bytes: int) -> list[str]:
    """Write (sharded when large) model.safetensors in ``dtype``; returns file names."""
    import torch
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    itemsize = torch.tensor([], dtype=tdtype).element_size()
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].size * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = torch.from_numpy(weights[name]).to(tdtype).contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / ExportFiles.WEIGHTS), metadata=meta)
        return [ExportFiles.WEIGHTS]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        fname = ExportFiles.shard(i, len(shards))
        save_file(shard, str(out_dir / fname), metadata=meta)
        names.append(fname)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * itemsize
    atomic_write_json(out_dir / ExportFiles.WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def _hf_config(base_config: dict[str, Any], arch: Architecture, dtype: str) -> dict[str, Any]:
    cfg = {k: v for k, v in base_config.items() if k not in ("quantization", "quantization_config")}
    cfg["architectures"] = [arch.hf_class]
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    # transformers 5 writes only rope_parameters.rope_theta and MLX-LM then uses
    # its default; llama.cpp reads the top level. Carry it in both places.
    rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else None
    theta = cfg.get("rope_theta", rope.get("rope_theta") if rope else None)
    if theta is not None:
        cfg["rope_theta"] = theta
        if rope is not None:
            rope["rope_theta"] = theta
    return cfg


def _write_tokenizer(base_path: Path, out_dir: Path, meta: ProjectMeta) -> None:
    for name in TOKENIZER_FILES:
        if (base_path / name).is_file():
            shutil.copyfile(base_path / name, out_dir / name)
    if not (out_dir / ExportFiles.TOKENIZER).is_file() and not (out_dir / "vocab.json").is_file():
        raise UserError(f"base model {base_path} has no tokenizer files (tokenizer.json or vocab.json)")
    jinja = meta.prompt_template.jinja_chat_template()
    tok_cfg_path = out_dir / ExportFiles.TOKENIZER_CONFIG
    tok_cfg = read_json_object(tok_cfg_path, "fix the base model's tokenizer files") if tok_cfg_path.is_file() else {}
    tok_cfg["chat_template"] = jinja  # the template the adapter was trained with
    atomic_write_json(tok_cfg_path, tok_cfg)
    if (out_dir / "chat_template.jinja").is_file():
        (out_dir / "chat_template.jinja").write_text(jinja, encoding="utf-8")


def _end_token_ids(tokenizer, meta: ProjectMeta, base_config: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    eos = base_config.get("eos_token_id")
    for v in eos if isinstance(eos, list) else [eos]:
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    end_id = tokenizer.convert_tokens_to_ids(meta.prompt_template.end_token)
    if isinstance(end_id, int) and end_id not in ids:
        ids.append(end_id)
    return ids


@dataclass
class _Export:
    """Everything the folder is written from."""

    adapter_path: Path
    adapter_config: dict[str, Any]
    meta: ProjectMeta
    base_path: Path
    base_config: dict[str, Any]
    arch: Architecture
    tokenizer: Any
    dtype: str

    @property
    def fine_tune_type(self) -> str:
        return self.adapter_config.get("fine_tune_type", "lora")


def _write_folder(job: _Export, weights: dict[str, Any], out_dir: Path, max_shard_gb: float) -> tuple[list[str], Path | None]:
    """The fused folder and (for LoRA/DoRA) ``peft_adapter/`` in ``out_dir``: the weight files and the PEFT folder."""
    from fishtune.export.peft_adapter import write_peft_adapter

    files = _save_safetensors(weights, out_dir, job.dtype, int(max_shard_gb * 2**30))
    atomic_write_json(out_dir / ExportFiles.CONFIG, _hf_config(job.base_config, job.arch, job.dtype))
    _write_tokenizer(job.base_path, out_dir, job.meta)
    eos = _end_token_ids(job.tokenizer, job.meta, job.base_config)
    gen = {"bos_token_id": job.base_config.get("bos_token_id"), "eos_token_id": eos,
           "pad_token_id": eos[0] if eos else None}
    atomic_write_json(out_dir / ExportFiles.GENERATION_CONFIG, gen)
    atomic_write_json(out_dir / ExportFiles.META, {**job.meta.to_dict(), "adapter_path": str(job.adapter_path),
                                                   "fine_tune_type": job.fine_tune_type})
    if job.fine_tune_type not in ("lora", "dora"):
        logger.info("fine_tune_type=%s: no PEFT adapter (PEFT adapters exist for lora and dora only)", job.fine_tune_type)
        return files, None
    return files, write_peft_adapter(job.adapter_path, job.adapter_config, job.meta, out_dir / ExportFiles.PEFT_DIR)


# ---- verification -------------------------------------------------------------
def _mlx_reference(model, prompts_ids: list[list[int]]) -> tuple[list[Any], list[list[int]]]:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step

    logits, greedy = [], []
    for ids in prompts_ids:
        out = model(mx.array(ids)[None])
        logits.append(np.array(out[0, -1].astype(mx.float32)))
        toks = []
        for tok, _ in generate_step(mx.array(ids), model, max_tokens=GREEDY_TOKENS, sampler=lambda x: mx.argmax(x, axis=-1)):
            toks.append(int(tok))
        greedy.append(toks)
    return logits, greedy


def _torch_reference(model, prompts_ids: list[list[int]]) -> tuple[list[Any], list[list[int]]]:
    import torch

    logits, greedy = [], []
    with torch.no_grad():
        for ids in prompts_ids:
            x = torch.tensor([ids])
            out = model(x, use_cache=True)
            logits.append(out.logits[0, -1].float().numpy())
            past, toks = out.past_key_values, []
            nxt = int(out.logits[0, -1].argmax())
            for _ in range(GREEDY_TOKENS):
                toks.append(nxt)
                out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            greedy.append(toks)
    return logits, greedy


def _compare(name: str, ref: tuple, got: tuple, tol: float, require_greedy: bool) -> dict[str, Any]:
    import numpy as np

    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ref[0], got[0]))
    same = all(a == b for a, b in zip(ref[1], got[1]))
    ok = max_diff <= tol and (same or not require_greedy)
    logger.info(
        "%-28s max |logit diff| %.2e (tolerance %g)  %d greedy tokens %s  -> %s",
        name, max_diff, tol, GREEDY_TOKENS, "identical" if same else "DIFFER", "ok" if ok else "FAILED",
    )
    return {"max_abs_logit_diff": max_diff, "tolerance": tol, "greedy_identical": same, "passed": ok}


def _check_inputs(adapter_path: Path, output_dir: Path, dtype: str | None, force: bool) -> tuple[dict[str, Any], ProjectMeta]:
    """Refuse a bad --dtype or finished work; the adapter's config and project metadata."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    ensure_can_write(output_dir, force, "output folder")
    return read_adapter_config(adapter_path), read_project_meta(adapter_path)


def _is_quantized(base_config: dict[str, Any]) -> bool:
    return "quantization" in base_config or "quantization_config" in base_config


def dry_run_text(model: str | None, adapter_path: str | Path, output_dir: str | Path, *, dtype: str | None = None,
                 force: bool = False, verify: bool = True, max_shard_gb: float = 5.0) -> str:
    """``--dry-run``: what an export would read and write, from the configs alone (no weights loaded)."""
    from fishtune.loading import resolve_model_path

    adapter_path, output_dir = Path(adapter_path), Path(output_dir)
    adapter_config, meta = _check_inputs(adapter_path, output_dir, dtype, force)
    base_path = resolve_model_path(model or meta.base_model)
    base_config, arch = _read_base_config(base_path)
    quantized = _is_quantized(base_config)
    out_dtype = dtype or ("float32" if quantized else _base_dtype(base_config, {}))
    fine_tune_type = adapter_config.get("fine_tune_type", "lora")
    files = [f"{ExportFiles.WEIGHTS} ({out_dtype}; sharded above {max_shard_gb:g} GiB)", ExportFiles.CONFIG,
             ExportFiles.GENERATION_CONFIG, "tokenizer files", ExportFiles.META]
    if fine_tune_type in ("lora", "dora"):
        files.append(f"{ExportFiles.PEFT_DIR}/")
    proof = (f"MLX base+adapter vs transformers fused and + PEFT, tolerance {TOLERANCE[out_dtype]:g}" if verify
             else "off (--no-verify)")
    return "\n".join([
        f"adapter: {adapter_path} ({fine_tune_type}, template {meta.template}, trained on {meta.base_model})",
        f"base: {base_path} ({arch.hf_class}{', quantized: dequantized before fusing' if quantized else ''})",
        f"would write: {output_dir}/: {', '.join(files)}",
        f"proof: {proof}",
    ])


def export_huggingface(
    model: str | None,
    adapter_path: str | Path,
    output_dir: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    verify: bool = True,
    max_shard_gb: float = 5.0,
) -> ExportResult:
    """Fuse ``adapter_path`` into its base and write an HF folder + ``peft_adapter/``."""
    import mlx.core as mx

    from fishtune.loading import load_model

    adapter_path, output_dir = Path(adapter_path), Path(output_dir)
    adapter_config, meta = _check_inputs(adapter_path, output_dir, dtype, force)

    local_base = Path(model or meta.base_model)
    if (local_base / ExportFiles.CONFIG).is_file():  # refuse before the (slow) load
        _read_base_config(local_base)
    lm = load_model(model, str(adapter_path), fuse=False)
    base_path = Path(lm.model_path)
    base_config, arch = _read_base_config(base_path)
    quantized = _is_quantized(base_config)
    out_dtype = dtype or ("float32" if quantized else _base_dtype(base_config, _flat_weights(lm.model)))
    job = _Export(adapter_path, adapter_config, meta, base_path, base_config, arch, lm.tokenizer, out_dtype)

    prompts = [meta.prompt_template.question_prompt(q, meta.system_prompt) for q in VERIFY_QUESTIONS]
    prompts_ids = [lm.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    if verify:
        lm.model.set_dtype(mx.float32)  # the reference in float32, whatever the storage dtype
        mlx_ref = _mlx_reference(lm.model, prompts_ids)

    _fuse_in_place(lm.model)
    weights = _to_numpy(_flat_weights(lm.model))
    _check_finite(weights)

    with atomic_dir(output_dir) as tmp:
        files, peft_dir = _write_folder(job, weights, tmp, max_shard_gb)
        logger.info("wrote %s (%s, %s)", output_dir, out_dtype, ", ".join(files))
        result = ExportResult(output_dir, output_dir / ExportFiles.PEFT_DIR if peft_dir else None, out_dtype)
        if verify:
            result.checks, result.passed = _verify(tmp, base_path, quantized, mlx_ref, prompts_ids, out_dtype, peft_dir)
    return result


def _verify(out_dir, base_path, quantized, mlx_ref, prompts_ids, out_dtype, peft_dir):
    import torch
    from transformers import AutoModelForCausalLM

    tol = TOLERANCE[out_dtype]
    require_greedy = out_dtype == "float32"
    checks: dict[str, Any] = {}
    fused = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    checks["transformers_fused"] = _compare("transformers fused", mlx_ref, _torch_reference(fused, prompts_ids), tol, require_greedy)
    if peft_dir is not None:
        from peft import PeftModel

        base = _torch_base(out_dir, base_path, quantized, fused.config)
        del fused
        peft_model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
        # PEFT runs on the unrounded adapter in float32: float32 tolerance applies.
        checks["transformers_peft"] = _compare(
            "transformers + PEFT adapter", mlx_ref, _torch_reference(peft_model, prompts_ids),
            TOLERANCE["float32"] if not quantized else tol, True,
        )
    passed = all(c["passed"] for c in checks.values())
    return checks, passed


def _torch_base(out_dir: Path, base_path: Path, quantized: bool, config):
    """The base for the PEFT check: the HF base itself, or the dequantized MLX base."""
    import torch
    from transformers import AutoModelForCausalLM

    if not quantized:
        return AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32).eval()
    # A quantized MLX base cannot be read by transformers: rebuild the base from
    # the same dequantized weights MLX trained against.
    from mlx_lm.utils import dequantize_model

    from fishtune.loading import load_model

    base_lm = load_model(str(base_path), None, fuse=False)
    dequantize_model(base_lm.model)
    weights = _to_numpy(_flat_weights(base_lm.model))
    torch_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise UserError(f"dequantized base does not match {out_dir / ExportFiles.CONFIG}: missing {missing}, unexpected {unexpected}")
    torch_model.tie_weights()
    return torch_model.eval()


def format_checks(checks: dict[str, Any]) -> str:
    lines = []
    for name, c in checks.items():
        lines.append(
            f"{name}: max |logit diff| {c['max_abs_logit_diff']:.2e} (tolerance {c['tolerance']:g}), "
            f"greedy {GREEDY_TOKENS} tokens {'identical' if c['greedy_identical'] else 'differ'}: "
            f"{'PASS' if c['passed'] else 'FAIL'}"
        )
    return "\n".join(lines)


__all__ = ["export_huggingface", "dry_run_text", "format_checks", "ExportResult", "DTYPES", "TOLERANCE"]
