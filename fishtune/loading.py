"""THE loader: base model + adapter, used by training, evaluation, inference, chat, server, export, bench.

The adapter folder says what the model was trained with (template, system
prompt, base model, see :mod:`fishtune.project`), so every stage builds
prompts exactly as training did. Loading goes through MLX-LM's own code
(``mlx_lm.utils.load_model``/``load_tokenizer``/``load_adapters``), then the
LoRA/DoRA layers are fused into the weights in memory (files untouched):
unfused DoRA recomputes the weight norm for every token and generates 5-6x
slower than the fused model, with the same logits.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fishtune.errors import UserError
from fishtune.project import (
    DEFAULT_BASE_MODEL,
    AdapterFiles,
    ProjectMeta,
    meta_for_base,
    meta_from_adapter_config,
    read_adapter_config,
)
from fishtune.template import PromptTemplate

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A ready-to-generate model with the project metadata it was trained with."""

    model: Any  # mlx.nn.Module
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper
    meta: ProjectMeta
    template: PromptTemplate
    model_path: str
    adapter_path: str | None
    fused: bool
    fine_tune_type: str | None = None

    @property
    def system_prompt(self) -> str:
        return self.meta.system_prompt

    def describe(self) -> str:
        """One line for logs and health endpoints: which model, which adapter."""
        if self.adapter_path is None:
            return f"base model {self.model_path} (no adapter), template {self.template.name}"
        how = "fused in memory" if self.fused else "unfused"
        return (f"base model {self.model_path} + {self.fine_tune_type} adapter {self.adapter_path} ({how}), "
                f"template {self.template.name}")


def _is_hub_error(exc: BaseException) -> bool:
    mod = type(exc).__module__ or ""
    return mod.startswith(("huggingface_hub", "requests", "urllib3", "httpx", "httpcore")) or isinstance(
        exc, (ConnectionError, TimeoutError)
    )


def use_fast_cpu_dtype(model: Any) -> bool:
    """On MLX's CPU backend, compute in float32 instead of bfloat16/float16.

    Measured here (bench/results/train.json): MLX CPU matmuls run at ~355
    GFLOP/s in float32 but ~8 GFLOP/s in bfloat16, and Qwen2-1.5B ships bf16.
    Quantized models and the GPU (macOS) are left alone. Returns True if cast.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if mx.default_device() != mx.cpu or os.environ.get("FISHTUNE_KEEP_DTYPE"):
        return False
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        return False
    halves = {mx.bfloat16, mx.float16}
    if not any(v.dtype in halves for _, v in tree_flatten(model.parameters())):
        return False
    model.set_dtype(mx.float32)
    logger.info("MLX runs on the CPU: computing in float32 (bfloat16 matmuls are ~40x slower there); "
                "FISHTUNE_KEEP_DTYPE=1 keeps the stored dtype")
    return True


def resolve_model_path(name: str) -> Path:
    """A local folder, or the hub cache's copy of ``name``; never a silent download failure."""
    from mlx_lm.utils import _download

    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model folder {local} has no config.json; point --model at a Hugging Face model folder")
        return local
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        # Can't be a hub id ("org/name"): a local folder that is not there.
        raise UserError(f"model folder {name} does not exist; pass --model an existing local model folder "
                        "or a hub id such as Qwen/Qwen2-1.5B")
    try:
        return Path(_download(name))
    except Exception as exc:  # the hub raises many types; only its/network errors are the user's to fix
        if not _is_hub_error(exc):
            raise
        raise UserError(
            f"model {name!r} is not available offline (nor a folder in {Path.cwd()}) and the Hugging Face "
            f"hub can't be reached "
            f"({type(exc).__name__}); download it once (huggingface-cli download {name}) or pass --model "
            "a local model folder, e.g. --model models/smoke-tiny after `make smoke-model`"
        ) from None


def _apply_adapter(model: Any, adapter_dir: Path, trained_on: str = "?", loaded: str = "?") -> None:
    """``mlx_lm``'s ``load_adapters`` with its errors turned into one line each.

    ``trained_on``/``loaded``: the recorded and the actual base model, named in a shape mismatch."""
    from mlx_lm.utils import load_adapters

    try:
        load_adapters(model, str(adapter_dir))
    except ValueError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        if len(lines) > 1 and "incompatible tensors" in lines[0]:
            more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
            raise UserError(
                f"adapter {adapter_dir} was trained on another base model (recorded: {trained_on}; "
                f"loaded: {loaded}): {lines[1]}{more}; "
                "pass the --model it was trained on (see base_model in its adapter_config.json)"
            ) from None
        raise UserError(f"adapter {adapter_dir} does not fit the model: {' '.join(lines)}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(
            f"{adapter_dir / AdapterFiles.CONFIG} is incomplete ({type(exc).__name__}: {exc}); "
            "re-run finetune.py to rewrite it"
        ) from None
    except (RuntimeError, OSError) as exc:
        raise UserError(
            f"{adapter_dir / AdapterFiles.WEIGHTS} can't be read ({exc}); the file is corrupt, re-run finetune.py"
        ) from None


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def fuse_adapter_layers(model: Any, dequantize: bool = False) -> int:
    """Fuse every LoRA/DoRA layer into a plain linear, as ``mlx_lm fuse`` does. Returns the count.

    ``dequantize=True`` also turns a quantized base layer into a float one (the HF export).
    """
    from mlx.utils import tree_unflatten

    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def load_base(name: str, template: PromptTemplate | None = None) -> tuple[Any, Any, Path]:
    """The base model ``name`` (folder or hub cache) as ``(model, tokenizer, path)``.

    Computes in float32 on MLX's CPU backend (:func:`use_fast_cpu_dtype`).
    The tokenizer stops on ``template``'s end token too (e.g. ``<|im_end|>``
    for chatml), whatever the base model's config lists as eos.
    """
    from mlx_lm.utils import load_model as mlx_load_model
    from mlx_lm.utils import load_tokenizer

    model_path = resolve_model_path(name)
    try:
        net, config = mlx_load_model(model_path)
    except FileNotFoundError as exc:
        raise UserError(f"model folder {model_path} is incomplete ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{model_path / 'config.json'} is not valid JSON ({exc})") from None
    use_fast_cpu_dtype(net)
    tokenizer = load_tokenizer(model_path, eos_token_ids=config.get("eos_token_id", None))
    if template is not None:
        end_id = tokenizer.convert_tokens_to_ids(template.end_token)
        if isinstance(end_id, int) and end_id != getattr(tokenizer, "unk_token_id", None):
            tokenizer.eos_token_ids = set(tokenizer.eos_token_ids) | {end_id}
    return net, tokenizer, model_path


def load_model(
    model: str | None,
    adapter_path: str | None,
    *,
    fuse: bool = True,
    no_adapter: bool = False,
) -> LoadedModel:
    """Load ``model`` (default: the adapter's recorded base) plus ``adapter_path``.

    ``no_adapter=True`` loads the base model alone, prompted like the adapter
    (its template, system prompt and base model, when ``adapter_path`` is an
    adapter folder; the defaults otherwise), so base and fine-tuned answers
    compare. ``fuse=False`` keeps the LoRA/DoRA layers (HF export, evaluation
    of the training loss, the fused-vs-unfused test).
    """
    import mlx.core as mx

    adapter_dir: Path | None = None
    fine_tune_type: str | None = None
    if no_adapter or adapter_path is None:
        meta = meta_for_base(adapter_path)
    else:
        adapter_dir = Path(adapter_path)
        cfg = read_adapter_config(adapter_dir)  # missing folder/config/weights, bad JSON -> UserError
        meta = meta_from_adapter_config(cfg, adapter_dir / AdapterFiles.CONFIG)
        fine_tune_type = str(cfg.get("fine_tune_type", "lora"))
        if model is not None and not _same_model(model, meta.base_model):
            logger.warning(
                "--model %s differs from the base model the adapter was trained on (%s); using %s",
                model, meta.base_model, model,
            )
    template = meta.prompt_template
    name = model if model is not None else meta.base_model
    logger.info("loading %s%s", name, f" + adapter {adapter_dir}" if adapter_dir else "")
    net, tokenizer, model_path = load_base(name, template)
    fused = False
    if adapter_dir is not None:
        _apply_adapter(net, adapter_dir, meta.base_model, str(model_path))
        if fuse:
            n = fuse_adapter_layers(net)
            fused = n > 0 or fine_tune_type == "full"
            logger.debug("fused %d adapter layers in memory", n)
    net.eval()
    # Materialise the (lazily) fused weights now: once, not on the first
    # request, and in this thread (MLX streams are per thread; a server thread
    # evaluating them later fails with "There is no Stream(cpu, 0)").
    mx.eval(net.parameters())
    return LoadedModel(
        model=net,
        tokenizer=tokenizer,
        meta=meta,
        template=template,
        model_path=str(model_path),
        adapter_path=str(adapter_dir) if adapter_dir is not None else None,
        fused=fused,
        fine_tune_type=fine_tune_type,
    )


DEFAULT_ADAPTER_PATH = "lora_qwen2_1.5b"  # the seed's fine-tuning output


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --adapter-path / --no-adapter, shared by the inference scripts and the server."""
    p.add_argument("--model", default=None,
                   help="base model (HF name or local folder; default: the base model recorded in the adapter)")
    p.add_argument("--adapter-path", default=DEFAULT_ADAPTER_PATH,
                   help="adapter folder written by finetune.py (default: %(default)s)")
    p.add_argument("--no-adapter", action="store_true",
                   help="answer with the base model alone (same template and system prompt as the adapter's, "
                        "when its folder exists)")


def load_from_args(args: argparse.Namespace, *, fuse: bool = True) -> LoadedModel:
    """``load_model`` for the flags of :func:`add_model_args`."""
    return load_model(args.model, args.adapter_path, fuse=fuse, no_adapter=args.no_adapter)


__all__ = ["LoadedModel", "DEFAULT_ADAPTER_PATH", "DEFAULT_BASE_MODEL", "add_model_args", "load_from_args",
           "load_base", "load_model", "resolve_model_path", "fuse_adapter_layers", "use_fast_cpu_dtype"]
