"""Project metadata that travels inside the adapter folder.

MLX-LM writes ``adapter_config.json`` (the resolved training args) next to
``adapters.safetensors``; ``mlx_lm.load(..., adapter_path=...)`` reads only
``fine_tune_type``, ``num_layers`` and ``lora_parameters`` from it and
ignores other keys. We add one key, ``"fishtune"``, holding what every later
stage must agree on: the template name, the system prompt and the base
model. Inference, the server, the HF export, GGUF and the Modelfile read
these, so they can never disagree with training.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fishtune.errors import UserError
from fishtune.fileio import read_json_object
from fishtune.template import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, PromptTemplate, get_template

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
META_KEY = "fishtune"


@dataclass
class ProjectMeta:
    template: str = DEFAULT_TEMPLATE
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    base_model: str = "Qwen/Qwen2-1.5B"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_template(self.template)  # unknown template -> UserError naming the choices
        if not isinstance(self.system_prompt, str):
            raise UserError(f"system_prompt must be a string, got {self.system_prompt!r}")

    @property
    def prompt_template(self) -> PromptTemplate:
        return get_template(self.template)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProjectMeta":
        known = {"template", "system_prompt", "base_model"}
        return cls(**{k: d[k] for k in known if k in d}, extra={k: v for k, v in d.items() if k not in known})


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``adapter_config.json``; errors name the file and the fix."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder {adapter_dir} does not exist; train one with finetune.py or pass --adapter-path")
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{path} is missing; {adapter_dir} is not an adapter folder written by finetune.py")
    cfg = read_json_object(path, "re-run finetune.py to rewrite it")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{adapter_dir / ADAPTER_WEIGHTS} is missing; the adapter folder is incomplete")
    return cfg


def read_project_meta(adapter_dir: str | Path) -> ProjectMeta:
    """The template/system prompt/base model the adapter was trained with.

    Adapters trained by the seed's raw ``mlx_lm lora`` have no ``fishtune``
    key; they get the defaults (the seed's template) and ``model`` as base.
    """
    cfg = read_adapter_config(adapter_dir)
    meta = cfg.get(META_KEY)
    if meta is None:
        return ProjectMeta(base_model=str(cfg.get("model", ProjectMeta.base_model)))
    if not isinstance(meta, dict):
        raise UserError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: key {META_KEY!r} must be an object")
    if meta.get("base_model") is None:
        # The seed's raw `mlx_lm lora -c lora_config.yaml` copies the YAML's
        # section, which leaves base_model unset: the trained `model` is it.
        meta = {**meta, "base_model": str(cfg.get("model", ProjectMeta.base_model))}
    return ProjectMeta.from_dict(meta)
