"""The adapter folder of a run: what it holds, checkpoints, resume, ``adapter_config.json``.

A checkpoint is ``checkpoints/NNNNNNN/`` with the trainable weights, the
optimizer state (its step drives the learning-rate schedule), any
half-accumulated gradient and ``state.json`` (written last). It is written
into a temporary folder and renamed, so a folder with that name is always
complete. The weights are written once, into the checkpoint; the top-level
``adapters.safetensors`` and MLX-LM's numbered ``NNNNNNN_adapters.safetensors``
are hard links to that file. A tool that rewrites one of those in place
would change the checkpoint too, so ``state.json`` records the weights'
checksum and a changed checkpoint is refused on resume.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from fishtune.errors import UserError
from fishtune.fileio import atomic_dir, atomic_write_json, link_or_copy
from fishtune.project import META_KEY, AdapterFiles

logger = logging.getLogger(__name__)

# Settings that must match for a checkpoint to be resumed (they change what
# step k computes); the others (iters, save_every, reporting) may change.
RESUME_STRICT = (
    "model", "fine_tune_type", "num_layers", "lora_parameters", "batch_size", "seed", "grad_accumulation_steps",
    "max_seq_length", "mask_prompt", "template", "system_prompt", "train_fingerprint",
)
RESUME_WARN = ("learning_rate", "lr_schedule", "optimizer", "optimizer_config", "iters")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- what the folder holds -----------------------------------------------------------
def list_checkpoints(adapter_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temp folders and half-written ones are skipped)."""
    root = Path(adapter_dir) / AdapterFiles.CHECKPOINTS
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if (d.is_dir() and AdapterFiles.CKPT_RE.match(d.name) and (d / AdapterFiles.CKPT_STATE).is_file()
                    and (d / AdapterFiles.WEIGHTS).is_file()):
                out.append((int(d.name), d))
    return sorted(out)


def latest_checkpoint(adapter_dir: str | Path) -> tuple[int, Path] | None:
    cks = list_checkpoints(adapter_dir)
    return cks[-1] if cks else None


def adapter_status(adapter_dir: Path) -> tuple[str, int | None]:
    """``("empty" | "finished" | "unfinished" | "foreign", step)`` of an output folder."""
    if not adapter_dir.exists() or (adapter_dir.is_dir() and not any(adapter_dir.iterdir())):
        return "empty", None
    if not adapter_dir.is_dir():
        return "foreign", None
    ck = latest_checkpoint(adapter_dir)
    meta = {}
    cfg_path = adapter_dir / AdapterFiles.CONFIG
    if cfg_path.is_file():
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8")).get(META_KEY) or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            meta = {}
    if (adapter_dir / AdapterFiles.WEIGHTS).is_file() and (meta.get("status", "finished") == "finished"):
        return "finished", meta.get("trained_steps")
    if ck is not None or meta.get("status") == "training":
        return "unfinished", ck[0] if ck else 0
    return "foreign", None


def clear_outputs(adapter_dir: Path) -> None:
    """Remove what a previous run wrote (--force); unknown files are kept."""
    if not adapter_dir.is_dir():
        return
    for p in adapter_dir.iterdir():
        if AdapterFiles.written_by_training(p.name):
            p.unlink()
        elif p.name == AdapterFiles.CHECKPOINTS and p.is_dir():
            shutil.rmtree(p)


def decide_start(adapter: Path, iters: int, resume: bool, force: bool) -> tuple[int, Path | None]:
    """The step a run starts after, and the checkpoint to resume from; refuses to overwrite finished work."""
    status, step = adapter_status(adapter)
    if status == "foreign" and not force:
        raise UserError(
            f"{adapter} exists and is not an adapter folder written by finetune.py; "
            "choose another --adapter-path or pass --force"
        )
    if resume:
        found = latest_checkpoint(adapter)
        if found is None:
            raise UserError(
                f"--resume: no complete checkpoint in {adapter / AdapterFiles.CHECKPOINTS}; "
                "start a new run without --resume"
            )
        if found[0] >= iters:
            raise UserError(
                f"--resume: {adapter} is already at step {found[0]} of --iters {iters}; "
                "raise --iters to train further or pass --force to start over"
            )
        return found
    if status == "finished" and not force:
        raise UserError(
            f"{adapter} already holds a finished adapter ({step or '?'} steps); pass --force to overwrite it, "
            "--resume with a larger --iters to continue, or choose another --adapter-path"
        )
    if status == "unfinished" and not force:
        if not step:
            raise UserError(f"{adapter} holds a run that stopped before its first checkpoint; pass --force to start over")
        raise UserError(
            f"{adapter} holds an unfinished run (last checkpoint: step {step}); pass --resume to continue it "
            "or --force to start over"
        )
    if force:
        clear_outputs(adapter)
    return 0, None


# ---- resume key ----------------------------------------------------------------------
def check_resume_key(saved: dict[str, Any], now: dict[str, Any], ckpt: Path) -> None:
    bad = [k for k in RESUME_STRICT if k in saved and saved.get(k) != now.get(k)]
    if bad:
        k = bad[0]
        what = "the training data changed" if k == "train_fingerprint" else f"{k} was {saved.get(k)!r}, now {now.get(k)!r}"
        raise UserError(f"can't resume from {ckpt}: {what}; resume with the original settings or start over with --force")
    for k in RESUME_WARN:
        if k in saved and saved.get(k) != now.get(k):
            logger.warning("resuming with %s changed (%r -> %r): the run will differ from the original", k,
                           saved.get(k), now.get(k))


# ---- writing and reading -------------------------------------------------------------
def save_checkpoint(adapter: Path, step: int, trees: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write ``checkpoints/NNNNNNN`` atomically, then link the top-level adapter files to its weights.

    ``trees``: ``{"weights": ..., "optimizer": ..., "grad": ... or None}`` (MLX trees).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    final = adapter / AdapterFiles.CHECKPOINTS / AdapterFiles.checkpoint_name(step)
    files = {"weights": AdapterFiles.WEIGHTS, "optimizer": AdapterFiles.CKPT_OPTIMIZER, "grad": AdapterFiles.CKPT_GRAD}
    with atomic_dir(final) as tmp:  # a re-run of the same step after resume replaces it
        for key, name in files.items():
            if trees.get(key) is not None:
                mx.save_safetensors(str(tmp / name), dict(tree_flatten(trees[key])))
        state = {**state, "weights_sha256": sha256_file(tmp / AdapterFiles.WEIGHTS)}
        atomic_write_json(tmp / AdapterFiles.CKPT_STATE, state)  # written last
    link_or_copy(final / AdapterFiles.WEIGHTS, adapter / AdapterFiles.numbered(step))
    link_or_copy(final / AdapterFiles.WEIGHTS, adapter / AdapterFiles.WEIGHTS)
    return final


def _restore_tree(template: Any, flat: dict[str, Any], what: str, where: Path) -> Any:
    from mlx.utils import tree_flatten, tree_map_with_path

    want = {k for k, _ in tree_flatten(template)}
    if want != set(flat):
        missing = sorted(want - set(flat))[:3]
        extra = sorted(set(flat) - want)[:3]
        raise UserError(
            f"checkpoint {where} does not match this model's {what} (missing {missing}, unexpected {extra}); "
            "resume with the original settings or pass --force"
        )
    return tree_map_with_path(lambda path, _x: flat[path], template)


def read_checkpoint(ckpt: Path, templates: dict[str, Any], resume_key: dict[str, Any]) -> dict[str, Any]:
    """The trees of ``save_checkpoint`` back, shaped like ``templates`` (``weights``, ``optimizer``)."""
    import mlx.core as mx

    state = json.loads((ckpt / AdapterFiles.CKPT_STATE).read_text(encoding="utf-8"))
    check_resume_key(state.get("resume_key", {}), resume_key, ckpt)
    weights = ckpt / AdapterFiles.WEIGHTS
    if state.get("weights_sha256") not in (None, sha256_file(weights)):
        raise UserError(
            f"checkpoint {ckpt} was changed after it was written (another tool rewrote {AdapterFiles.WEIGHTS} or a "
            "numbered adapter file in place); start over with --force"
        )
    out = {
        "weights": _restore_tree(templates["weights"], mx.load(str(weights)), "trainable weights", ckpt),
        "optimizer": _restore_tree(templates["optimizer"], mx.load(str(ckpt / AdapterFiles.CKPT_OPTIMIZER)),
                                   "optimizer state", ckpt),
        "grad": None,
    }
    if (ckpt / AdapterFiles.CKPT_GRAD).is_file():
        out["grad"] = _restore_tree(templates["weights"], mx.load(str(ckpt / AdapterFiles.CKPT_GRAD)),
                                    "accumulated gradient", ckpt)
    return out


def portable_model_name(name: str) -> str:
    """A local model folder is recorded as an absolute path, so inference, the
    server and the exports find it from any working directory; a hub id as is."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def write_adapter_config(cfg: Any, adapter: Path, status: str, steps: int, extra: dict[str, Any]) -> None:
    """``adapter_config.json``: MLX-LM's resolved args (``cfg``: a TrainConfig) plus the ``fishtune`` section.

    MLX-LM's own ``mask_prompt`` stays false (we mask ourselves, recorded
    under ``fishtune``); the base model is recorded portably.
    """
    d = cfg.to_mlx_dict()
    d["adapter_path"] = str(adapter)
    d[META_KEY] = {
        **d[META_KEY],
        "base_model": portable_model_name(cfg.base_model),
        "status": status,
        "trained_steps": steps,
        **extra,
    }
    atomic_write_json(adapter / AdapterFiles.CONFIG, dict(sorted(d.items())))


__all__ = ["list_checkpoints", "latest_checkpoint", "adapter_status", "clear_outputs", "decide_start",
           "check_resume_key", "save_checkpoint", "read_checkpoint", "write_adapter_config", "portable_model_name"]
