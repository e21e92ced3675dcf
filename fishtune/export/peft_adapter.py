"""An MLX LoRA/DoRA adapter rewritten as a PEFT adapter (``PeftModel.from_pretrained`` loads it).

DoRA in both libraries (eval mode, no dropout)::

    y = m / ||W + s·BA||_row · (W + s·BA) x + b          s = scale = alpha / r

MLX stores ``lora_a`` (in, r), ``lora_b`` (r, out), ``m`` (out,); PEFT wants
``lora_A.weight`` (r, in) = lora_a.T, ``lora_B.weight`` (out, r) = lora_b.T and
``lora_magnitude_vector`` (out,) = m. PEFT's scaling ``lora_alpha / r`` equals
MLX's ``scale`` when ``lora_alpha = scale * r``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fishtune.errors import UserError
from fishtune.project import AdapterFiles, ProjectMeta

PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's own file name (its config: adapter_config.json)


def peft_tensors(adapter_weights: dict[str, Any], dora: bool) -> tuple[dict[str, Any], list[str], list[int]]:
    """MLX adapter tensors (numpy) renamed to PEFT's names (A/B transposed); also the target modules and layers."""
    out: dict[str, Any] = {}
    targets: set[str] = set()
    layers: set[int] = set()
    for key, value in adapter_weights.items():
        module, _, leaf = key.rpartition(".")
        prefix = f"base_model.model.{module}"
        if leaf == "lora_a":
            out[f"{prefix}.lora_A.weight"] = value.T.copy()
        elif leaf == "lora_b":
            out[f"{prefix}.lora_B.weight"] = value.T.copy()
        elif leaf == "m" and dora:
            out[f"{prefix}.lora_magnitude_vector"] = value.copy()
        else:
            raise UserError(f"adapter tensor {key} is not a LoRA/DoRA tensor; only lora and dora adapters export to PEFT")
        targets.add(module.rsplit(".", 1)[-1])
        parts = module.split(".")
        if "layers" in parts:
            layers.add(int(parts[parts.index("layers") + 1]))
    return out, sorted(targets), sorted(layers)


def write_peft_adapter(adapter_path: Path, adapter_config: dict[str, Any], meta: ProjectMeta, out_dir: Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by PeftModel."""
    import mlx.core as mx
    import numpy as np
    from peft import LoraConfig
    from safetensors.numpy import save_file

    fine_tune_type = adapter_config.get("fine_tune_type", "lora")
    params = adapter_config.get("lora_parameters", {})
    rank = int(params.get("rank", 8))
    scale = float(params.get("scale", 20.0))
    raw = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(Path(adapter_path) / AdapterFiles.WEIGHTS)).items()}
    tensors, targets, layers = peft_tensors(raw, dora=fine_tune_type == "dora")
    config = LoraConfig(
        r=rank,
        lora_alpha=scale * rank,  # PEFT scaling = lora_alpha / r = MLX scale
        lora_dropout=float(params.get("dropout", 0.0)),
        target_modules=targets,
        layers_to_transform=layers or None,
        layers_pattern="layers" if layers else None,
        use_dora=fine_tune_type == "dora",
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=meta.base_model,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
    return out_dir


__all__ = ["peft_tensors", "write_peft_adapter", "PEFT_WEIGHTS"]
