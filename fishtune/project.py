"""What travels between the stages: file names of each output folder and the project metadata.

Every stage reads the previous stage's folder. The names of the files in
those folders are defined here and nowhere else (:class:`AdapterFiles`,
:class:`ExportFiles`), and so is the one piece of metadata every stage must
agree on, :class:`ProjectMeta`: the prompt template, the system prompt and
the base model.

Where the metadata lives:

* adapter folder (``finetune.py``): MLX-LM's ``adapter_config.json`` plus our
  key ``"fishtune"``. ``mlx_lm.load(..., adapter_path=...)`` reads only
  ``fine_tune_type``, ``num_layers`` and ``lora_parameters`` and ignores it.
* Hugging Face export folder (``convert_to_huggingface.py``): ``fishtune.json``.
* GGUF folder: the GGUF's own chat template, the Modelfile and ``fishtune.json``
  (see :func:`fishtune.export.gguf_meta.gguf_project_meta`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fishtune.errors import UserError
from fishtune.fileio import read_json_object
from fishtune.template import (
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TEMPLATE,
    PromptTemplate,
    get_template,
)

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "Qwen/Qwen2-1.5B"
META_KEY = "fishtune"  # our key inside adapter_config.json (and the YAML's section)


class DataFiles:
    """Names inside a data folder written by ``process_data.py`` (and read by ``finetune.py``)."""

    SPLITS = ("train", "valid", "test")
    REPORT = "report.json"
    REJECTED = "rejected.jsonl"  # only with --skip-invalid

    @staticmethod
    def split(name: str) -> str:
        return f"{name}.jsonl"


class AdapterFiles:
    """Names inside an adapter folder written by ``finetune.py``."""

    CONFIG = "adapter_config.json"  # MLX-LM's resolved args + "fishtune"
    WEIGHTS = "adapters.safetensors"  # the newest adapter (what inference loads)
    NUMBERED_SUFFIX = "_adapters.safetensors"  # 0000020_adapters.safetensors, as MLX-LM names them
    NUMBERED_RE = re.compile(r"^\d{7}_adapters\.safetensors$")
    CHECKPOINTS = "checkpoints"  # checkpoints/NNNNNNN/ : resume state
    METRICS = "metrics.jsonl"
    LOSS_CURVE = "loss_curve.png"
    SUMMARY = "summary.json"
    # inside checkpoints/NNNNNNN/ (besides WEIGHTS)
    CKPT_STATE = "state.json"  # written last: its presence marks a complete checkpoint
    CKPT_OPTIMIZER = "optimizer.safetensors"
    CKPT_GRAD = "grad_accum.safetensors"
    CKPT_RE = re.compile(r"^\d{7}$")

    @classmethod
    def numbered(cls, step: int) -> str:
        return f"{step:07d}{cls.NUMBERED_SUFFIX}"

    @classmethod
    def checkpoint_name(cls, step: int) -> str:
        return f"{step:07d}"

    @classmethod
    def written_by_training(cls, name: str) -> bool:
        """Files a training run writes at the top of the folder (``--force`` removes them)."""
        return name in (cls.WEIGHTS, cls.CONFIG, cls.METRICS, cls.LOSS_CURVE, cls.SUMMARY) or bool(
            cls.NUMBERED_RE.match(name))


class ExportFiles:
    """Names inside a Hugging Face export folder and next to a GGUF file."""

    META = "fishtune.json"  # ProjectMeta + adapter path and fine-tune type
    CONFIG = "config.json"
    GENERATION_CONFIG = "generation_config.json"
    WEIGHTS = "model.safetensors"
    WEIGHTS_INDEX = "model.safetensors.index.json"
    TOKENIZER = "tokenizer.json"
    TOKENIZER_CONFIG = "tokenizer_config.json"
    PEFT_DIR = "peft_adapter"
    MODELFILE = "Modelfile"  # next to the GGUF

    @staticmethod
    def shard(i: int, n: int) -> str:
        return f"model-{i:05d}-of-{n:05d}.safetensors"


@dataclass
class ProjectMeta:
    """Template, system prompt and base model: what every stage must agree on."""

    template: str = DEFAULT_TEMPLATE
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    base_model: str = DEFAULT_BASE_MODEL
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

    def with_overrides(self, template: str | None = None, system_prompt: str | None = None,
                       base_model: str | None = None) -> "ProjectMeta":
        """A copy with the given (non-None) values replaced (command-line overrides)."""
        changes = {k: v for k, v in (("template", template), ("system_prompt", system_prompt),
                                     ("base_model", base_model)) if v is not None}
        return replace(self, **changes) if changes else self


# ---- adapter folder ---------------------------------------------------------------
def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``adapter_config.json``; errors name the file and the fix."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder {adapter_dir} does not exist; train one with finetune.py or pass --adapter-path")
    path = adapter_dir / AdapterFiles.CONFIG
    if not path.is_file():
        raise UserError(f"{path} is missing; {adapter_dir} is not an adapter folder written by finetune.py")
    cfg = read_json_object(path, "re-run finetune.py to rewrite it")
    if not (adapter_dir / AdapterFiles.WEIGHTS).is_file():
        raise UserError(f"{adapter_dir / AdapterFiles.WEIGHTS} is missing; the adapter folder is incomplete")
    return cfg


def meta_from_adapter_config(cfg: dict[str, Any], where: Path) -> ProjectMeta:
    """The ProjectMeta inside an adapter config (already read).

    Adapters trained by the seed's raw ``mlx_lm lora`` have no ``fishtune``
    key; they get the defaults (the seed's template) and ``model`` as base.
    """
    meta = cfg.get(META_KEY)
    trained = str(cfg.get("model", DEFAULT_BASE_MODEL))
    if meta is None:
        return ProjectMeta(base_model=trained)
    if not isinstance(meta, dict):
        raise UserError(f"{where}: key {META_KEY!r} must be an object")
    if meta.get("base_model") is None:
        # The seed's raw `mlx_lm lora -c lora_config.yaml` copies the YAML's
        # section, which leaves base_model unset: the trained `model` is it.
        meta = {**meta, "base_model": trained}
    return ProjectMeta.from_dict(meta)


def read_project_meta(adapter_dir: str | Path) -> ProjectMeta:
    """The template/system prompt/base model an adapter was trained with."""
    cfg = read_adapter_config(adapter_dir)
    return meta_from_adapter_config(cfg, Path(adapter_dir) / AdapterFiles.CONFIG)


def meta_for_base(adapter_path: str | Path | None) -> ProjectMeta:
    """How to prompt the base model alone: like the adapter when its folder exists, else the defaults."""
    if adapter_path and Path(adapter_path).is_dir():
        return read_project_meta(adapter_path)
    return ProjectMeta()


# ---- Hugging Face export folder ---------------------------------------------------
def read_export_meta(hf_dir: str | Path, template: str | None = None, system_prompt: str | None = None,
                     base_model: str | None = None) -> ProjectMeta:
    """``fishtune.json`` of an HF export (defaults when absent), with command-line overrides on top."""
    path = Path(hf_dir) / ExportFiles.META
    found = path.is_file()
    meta = ProjectMeta.from_dict(read_json_object(path, "re-run convert_to_huggingface.py")) if found else ProjectMeta()
    meta = meta.with_overrides(template, system_prompt, base_model)
    if found:
        logger.info("project metadata from %s: template %s, base model %s", path, meta.template, meta.base_model)
    else:
        logger.info(
            "%s not found; using template %r, %s system prompt and base model %s (--template/--system-prompt/--base-model override)",
            path, meta.template, "the given" if system_prompt is not None else "the default", meta.base_model,
        )
    return meta


__all__ = ["DataFiles", "AdapterFiles", "ExportFiles", "ProjectMeta", "META_KEY", "DEFAULT_BASE_MODEL", "read_adapter_config",
           "read_project_meta", "meta_from_adapter_config", "meta_for_base", "read_export_meta"]
