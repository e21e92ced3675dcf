"""Fine-tuning through MLX-LM: LoRA, DoRA or full, resumable, data parallel.

The pieces are MLX-LM's: ``mlx_lm.load``, ``linear_to_lora_layers``,
``build_schedule``, ``TrainingArgs``, ``evaluate``, ``average_gradients``
and the same compiled update step as ``mlx_lm.tuner.trainer.train``. The
loop itself is ours (about 60 lines) because ``train()`` has no per-step
hook: it restarts counting at step 1, cannot restore optimizer state, saves
non-atomically and without optimizer state, and evaluates before rather
than after a step. A test checks that this loop and MLX-LM's ``train()``
produce the same adapter from the same batches.

What the loop adds:

* exact resume: every checkpoint holds the adapter weights, the optimizer
  state (its step drives the learning-rate schedule), any half-accumulated
  gradient and the step. The batch of step ``k`` is a pure function of
  ``(seed, k)`` and the random key is re-seeded from ``(seed, k)`` before
  each step (dropout), so a resumed run repeats the uninterrupted one.
* atomic checkpoints: written into ``checkpoints/.tmp-*`` and renamed to
  ``checkpoints/NNNNNNN``; only complete folders are ever resumed from.
* ``metrics.jsonl`` (all tokens/s and loss tokens/s, it/s, peak memory),
  ``loss_curve.png``, a tqdm bar and a closing summary.
* data parallel training under ``mlx.launch``: each rank computes its share
  of every global batch; the loss is normalised by the global token count so
  the averaged gradient equals the single-process one. Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fishtune.adapter_meta import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_KEY
from fishtune.batching import (
    DataReport,
    TokenDataset,
    batch_token_counts,
    build_examples,
    describe_batching,
    iterate_batches,
    make_batch,
    masked_loss,
    read_jsonl,
)
from fishtune.distributed import all_sum_float, bcast_int, bcast_tree, limit_blas_threads
from fishtune.distributed import world as distributed_world
from fishtune.errors import UserError
from fishtune.fileio import atomic_write_json, atomic_write_text
from fishtune.template import get_template

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
SUMMARY = "summary.json"
CKPT_STATE = "state.json"
CKPT_OPTIMIZER = "optimizer.safetensors"
CKPT_GRAD = "grad_accum.safetensors"
_CKPT_RE = re.compile(r"^\d{7}$")
_NUMBERED_RE = re.compile(r"^\d{7}_adapters\.safetensors$")

# Settings that must match for a checkpoint to be resumed (they change what
# step k computes); the others (iters, save_every, reporting) may change.
_RESUME_STRICT = (
    "model",
    "fine_tune_type",
    "num_layers",
    "lora_parameters",
    "batch_size",
    "seed",
    "grad_accumulation_steps",
    "max_seq_length",
    "mask_prompt",
    "template",
    "system_prompt",
    "train_fingerprint",
)
_RESUME_WARN = ("learning_rate", "lr_schedule", "optimizer", "optimizer_config", "iters")


# ---------------------------------------------------------------------------
# Settings: everything the run needs, flattened from the TrainConfig
# ---------------------------------------------------------------------------
@dataclass
class Settings:
    model: str
    data: str
    adapter_path: str
    fine_tune_type: str = "dora"
    train: bool = True
    test: bool = False
    batch_size: int = 4
    iters: int = 100
    learning_rate: float = 1e-5
    max_seq_length: int = 2048
    grad_accumulation_steps: int = 1
    seed: int = 0
    save_every: int = 100
    steps_per_eval: int = 200
    steps_per_report: int = 10
    val_batches: int = 25
    test_batches: int = -1
    num_layers: int = 16
    lora_parameters: dict[str, Any] = field(default_factory=lambda: {"rank": 8, "dropout": 0.0, "scale": 20.0})
    optimizer: str = "adam"
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    lr_schedule: dict[str, Any] | None = None  # already rescaled to optimizer updates
    grad_checkpoint: bool = False
    clear_cache_threshold: int = 0
    resume: bool = False
    template: str = "alpaca"
    system_prompt: str = ""
    mask_prompt: bool = True
    base_model: str = ""  # what later stages load ("" = model)
    mlx_config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json body


def settings_from_config(cfg: Any) -> Settings:
    """Flatten a ``fishtune.config.TrainConfig`` into ``Settings``."""
    project = getattr(cfg, "project", None)

    def g(name: str, default: Any = None) -> Any:
        val = getattr(cfg, name, None)
        return default if val is None else val

    def p(name: str, default: Any = None) -> Any:
        val = getattr(project, name, None) if project is not None else None
        return default if val is None else val

    from fishtune.template import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE

    sched = cfg.resolved_lr_schedule() if hasattr(cfg, "resolved_lr_schedule") else g("lr_schedule")
    s = Settings(
        model=str(g("model", "Qwen/Qwen2-1.5B")),
        data=str(g("data", "data")),
        adapter_path=str(g("adapter_path", "lora_qwen2_1.5b")),
        fine_tune_type=str(g("fine_tune_type", "dora")),
        train=bool(g("train", False)),
        test=bool(g("test", False)),
        batch_size=int(g("batch_size", 4)),
        iters=int(g("iters", 100)),
        learning_rate=float(g("learning_rate", 1e-5)),
        max_seq_length=int(g("max_seq_length", 2048)),
        grad_accumulation_steps=int(g("grad_accumulation_steps", 1)),
        seed=int(g("seed", 0)),
        save_every=int(g("save_every", 100)),
        steps_per_eval=int(g("steps_per_eval", 200)),
        steps_per_report=int(g("steps_per_report", 10)),
        val_batches=int(g("val_batches", 25)),
        test_batches=int(g("test_batches", -1)),
        num_layers=int(g("num_layers", 16)),
        lora_parameters=dict(g("lora_parameters", {"rank": 8, "dropout": 0.0, "scale": 20.0})),
        optimizer=str(g("optimizer", "adam")).lower(),
        optimizer_config=dict(g("optimizer_config", {}) or {}),
        lr_schedule=dict(sched) if sched else None,
        grad_checkpoint=bool(g("grad_checkpoint", False)),
        clear_cache_threshold=int(g("clear_cache_threshold", 0) or 0),
        resume=bool(g("resume", False)),
        template=str(p("template", DEFAULT_TEMPLATE)),
        system_prompt=str(p("system_prompt", DEFAULT_SYSTEM_PROMPT)),
        mask_prompt=bool(p("mask_prompt", True)),
        base_model=str(p("base_model", "") or ""),
        mlx_config=dict(cfg.to_mlx_dict()) if hasattr(cfg, "to_mlx_dict") else {},
    )
    get_template(s.template)  # unknown names -> UserError
    _validate(s)
    return s


def _validate(s: Settings) -> None:
    if s.fine_tune_type not in ("lora", "dora", "full"):
        raise UserError(f"fine_tune_type must be lora, dora or full, got {s.fine_tune_type!r}")
    for name in ("batch_size", "iters", "max_seq_length", "grad_accumulation_steps", "save_every",
                 "steps_per_eval", "steps_per_report"):
        if getattr(s, name) < 1:
            raise UserError(f"{name} must be at least 1, got {getattr(s, name)}")
    if s.max_seq_length < 2:
        raise UserError(f"max_seq_length must be at least 2, got {s.max_seq_length}")
    if s.fine_tune_type != "full":
        missing = [k for k in ("rank", "scale") if k not in s.lora_parameters]
        if missing:
            raise UserError(
                f"lora_parameters is missing {', '.join(missing)}: set lora_rank/lora_alpha in lora_config.yaml"
            )


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
def _portable_model_name(name: str) -> str:
    """A local model folder is recorded as an absolute path, so inference, the
    server and the exports find it from any working directory; a hub id as is."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def load_base_model(name: str) -> tuple[Any, Any]:
    """``mlx_lm.load`` of a local folder or the hub cache, via the project's one resolver.

    ``fishtune.loading.resolve_model_path`` turns a missing folder or an
    unreachable hub into one actionable line.
    """
    import mlx_lm

    from fishtune.loading import resolve_model_path, use_fast_cpu_dtype

    path = resolve_model_path(name)
    try:
        model, tokenizer = mlx_lm.load(str(path))
    except FileNotFoundError as exc:
        raise UserError(f"model folder {path} is incomplete ({exc})") from None
    use_fast_cpu_dtype(model)
    return model, tokenizer


def is_quantized(model: Any) -> bool:
    import mlx.nn as nn

    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def apply_fine_tune_type(model: Any, s: Settings) -> None:
    """Freeze the base and make the trainable part, as MLX-LM's ``train_model`` does."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_model = len(model.layers)
    if s.num_layers > n_model:
        raise UserError(
            f"Requested to train {s.num_layers} layers but the model only has {n_model}; "
            f"set --num-layers {n_model} (or -1 for all)"
        )
    model.freeze()
    if s.fine_tune_type == "full":
        if is_quantized(model):
            raise UserError("full fine-tuning needs an unquantized base model; use --fine-tune-type lora (QLoRA)")
        for layer in model.layers[-max(s.num_layers, 0):]:
            layer.unfreeze()
        return
    params = {"dropout": 0.0, **s.lora_parameters}
    linear_to_lora_layers(model, s.num_layers, params, use_dora=(s.fine_tune_type == "dora"))


def make_optimizer(s: Settings) -> Any:
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import build_schedule

    classes = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
               "adafactor": optim.Adafactor}
    if s.optimizer not in classes:
        raise UserError(f"optimizer must be one of {', '.join(classes)}, got {s.optimizer!r}")
    lr = build_schedule(s.lr_schedule) if s.lr_schedule else s.learning_rate
    kwargs = dict(s.optimizer_config.get(s.optimizer) or {})
    try:
        return classes[s.optimizer](learning_rate=lr, **kwargs)
    except TypeError as exc:
        raise UserError(f"optimizer_config for {s.optimizer}: {exc}") from None


def step_seed(seed: int, step: int) -> int:
    """Random key for step ``step``: dropout depends only on (seed, step)."""
    return (int(seed) * 1_000_003 + int(step)) % (2**63)


# ---------------------------------------------------------------------------
# The adapter folder: checkpoints, metrics, state
# ---------------------------------------------------------------------------
def list_checkpoints(adapter_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temp folders and half-written ones are skipped)."""
    root = Path(adapter_dir) / CHECKPOINTS
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and _CKPT_RE.match(d.name) and (d / CKPT_STATE).is_file() and (d / ADAPTER_WEIGHTS).is_file():
                out.append((int(d.name), d))
    return sorted(out)


def latest_checkpoint(adapter_dir: str | Path) -> tuple[int, Path] | None:
    cks = list_checkpoints(adapter_dir)
    return cks[-1] if cks else None


def _adapter_status(adapter_dir: Path) -> tuple[str, int | None]:
    """("empty"|"finished"|"unfinished"|"foreign", step)."""
    if not adapter_dir.exists() or (adapter_dir.is_dir() and not any(adapter_dir.iterdir())):
        return "empty", None
    if not adapter_dir.is_dir():
        return "foreign", None
    ck = latest_checkpoint(adapter_dir)
    meta = {}
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if cfg_path.is_file():
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8")).get(META_KEY) or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            meta = {}
    if (adapter_dir / ADAPTER_WEIGHTS).is_file() and (meta.get("status", "finished") == "finished"):
        return "finished", meta.get("trained_steps")
    if ck is not None or meta.get("status") == "training":
        return "unfinished", ck[0] if ck else 0
    return "foreign", None


def _clear_outputs(adapter_dir: Path) -> None:
    """Remove what a previous run wrote (--force); unknown files are kept."""
    if not adapter_dir.is_dir():
        return
    for p in adapter_dir.iterdir():
        if p.name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, METRICS, LOSS_CURVE, SUMMARY) or _NUMBERED_RE.match(p.name):
            p.unlink()
        elif p.name == CHECKPOINTS and p.is_dir():
            shutil.rmtree(p)


def _save_safetensors_atomic(path: Path, arrays: dict[str, Any]) -> None:
    import mlx.core as mx

    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.safetensors")
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, path)


def _copy_atomic(src: Path, dst: Path) -> None:
    # A copy, not a hard link: tools that rewrite adapters.safetensors in place
    # (MLX-LM's trainer does) must not be able to alter a checkpoint.
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _fingerprint(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class MetricsLog:
    """``metrics.jsonl``: one JSON object per report (kind = train | val | test)."""

    def __init__(self, path: Path | None, keep_until: int | None = None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path is not None and keep_until is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                # A resumed run redoes the steps after its checkpoint.
                if row.get("kind") in ("train", "val") and row.get("step", 0) <= keep_until:
                    self.rows.append(row)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows))

    def last(self, kind: str, key: str) -> float | None:
        for r in reversed(self.rows):
            if r.get("kind") == kind and key in r:
                return r[key]
        return None


def plot_loss_curve(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Train and validation loss against step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["train_loss"]) for r in rows if r.get("kind") == "train"]
    va = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if tr:
        ax.plot(*zip(*tr), marker="o", markersize=3, label="train loss")
    if va:
        ax.plot(*zip(*va), marker="s", markersize=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.ticklabel_format(axis="y", useOffset=False)  # plain values, no "+1.195e1" offset
    ax.set_title(title or "fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
@dataclass
class Datasets:
    train: TokenDataset | None
    valid: TokenDataset | None
    test: TokenDataset | None
    reports: dict[str, DataReport]
    train_fingerprint: str = ""


def load_datasets(s: Settings, tokenizer: Any, need_train: bool, need_test: bool) -> Datasets:
    data = Path(s.data)
    if not data.is_dir():
        raise UserError(f"data folder {data} not found; run process_data.py or point --data at a folder with train.jsonl")
    tpl = get_template(s.template)
    reports: dict[str, DataReport] = {}
    out: dict[str, TokenDataset | None] = {"train": None, "valid": None, "test": None}
    wanted = (["train", "valid"] if need_train else []) + (["test"] if need_test else [])
    for split in wanted:
        path = data / f"{split}.jsonl"
        rows = read_jsonl(path, required=(split != "valid"))
        if rows is None:
            logger.warning("%s not found: training without validation loss", path)
            continue
        if not rows:
            if split == "valid":
                logger.warning("%s is empty: training without validation loss", path)
                continue
            raise UserError(f"{path} is empty; it needs at least one record (run process_data.py)")
        exs, rep = build_examples(
            rows, tokenizer, tpl, s.system_prompt, mask_prompt=s.mask_prompt,
            max_seq_length=s.max_seq_length, name=str(path),
        )
        for note in rep.notes:
            (logger.warning if "truncated" in note else logger.info)(note)
        reports[split] = rep
        out[split] = TokenDataset(exs, s.batch_size, s.seed, name=split)
    fp = _fingerprint(data / "train.jsonl") if need_train else ""
    return Datasets(out["train"], out["valid"], out["test"], reports, fp)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------
@dataclass
class RunResult:
    adapter_path: Path
    steps: int = 0
    resumed_from: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    test_loss: float | None = None
    test_ppl: float | None = None
    wall_time_s: float = 0.0
    peak_memory_gb: float = 0.0
    truncated: int = 0
    padding_fraction: float | None = None
    files: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["adapter_path"] = str(self.adapter_path)
        return d


def _fmt(x: float | None, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def log_summary(r: RunResult) -> None:
    lines = [
        "──── fine-tuning summary ────",
        f"adapter folder : {r.adapter_path}",
    ]
    for label, path in r.files.items():
        lines.append(f"  {label:<13}: {path}")
    lines += [
        f"steps          : {r.steps}" + (f" (resumed from step {r.resumed_from})" if r.resumed_from else ""),
        f"train loss     : {_fmt(r.train_loss)}",
        f"valid loss     : {_fmt(r.val_loss)}",
    ]
    if r.test_loss is not None:
        lines.append(f"test loss      : {_fmt(r.test_loss)}  (perplexity {_fmt(r.test_ppl, 3)})")
    if r.truncated:
        lines.append(f"truncated      : {r.truncated} training record(s) cut to max_seq_length (end dropped)")
    lines += [
        f"wall time      : {r.wall_time_s:.1f} s",
        f"peak memory    : {r.peak_memory_gb:.3f} GB",
    ]
    for line in lines:
        logger.info(line)


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------
def evaluate_loss(model: Any, ds: TokenDataset, s: Settings, num_batches: int) -> float:
    """Mean loss over the answer tokens (MLX-LM's ``evaluate`` with our batches/loss)."""
    from mlx_lm.tuner.trainer import evaluate

    return float(
        evaluate(
            model=model,
            dataset=ds,
            batch_size=s.batch_size,
            num_batches=num_batches,
            max_seq_length=s.max_seq_length,
            loss=masked_loss,
            iterate_batches=iterate_batches,
            clear_cache_threshold=s.clear_cache_threshold,
        )
    )


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def evaluate_adapter(s: Settings) -> RunResult:
    """``--test`` without training: the test loss of an existing adapter folder."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters

    from fishtune.adapter_meta import read_project_meta

    tic = time.perf_counter()
    adapter = Path(s.adapter_path)
    if s.adapter_path:
        meta = read_project_meta(adapter)  # validates the folder
        # Score the test set exactly as the adapter was trained.
        s.template, s.system_prompt = meta.template, meta.system_prompt
        s.mask_prompt = bool(meta.extra.get("mask_prompt", s.mask_prompt))
    model, tokenizer = load_base_model(s.model)
    if s.adapter_path:
        try:
            load_adapters(model, str(adapter))
        except ValueError as exc:
            raise UserError(f"adapter {adapter} does not fit model {s.model}: {str(exc).splitlines()[0]}") from None
    ds = load_datasets(s, tokenizer, need_train=False, need_test=True)
    loss = evaluate_loss(model, ds.test, s, s.test_batches)
    r = RunResult(adapter_path=adapter, test_loss=loss, test_ppl=_ppl(loss))
    r.wall_time_s = time.perf_counter() - tic
    r.peak_memory_gb = mx.get_peak_memory() / 1e9
    logger.info("Test loss %.4f, test perplexity %.3f (%s)", loss, r.test_ppl, Path(s.data) / "test.jsonl")
    return r


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def _resume_key(s: Settings, fingerprint: str) -> dict[str, Any]:
    d = {k: getattr(s, k) for k in _RESUME_STRICT if hasattr(s, k)}
    d.update({k: getattr(s, k) for k in _RESUME_WARN})
    d["train_fingerprint"] = fingerprint
    return json.loads(json.dumps(d))


def _check_resume_key(saved: dict[str, Any], now: dict[str, Any], ckpt: Path) -> None:
    bad = [k for k in _RESUME_STRICT if k in saved and saved.get(k) != now.get(k)]
    if bad:
        k = bad[0]
        what = "the training data changed" if k == "train_fingerprint" else f"{k} was {saved.get(k)!r}, now {now.get(k)!r}"
        raise UserError(
            f"can't resume from {ckpt}: {what}; resume with the original settings or start over with --force"
        )
    for k in _RESUME_WARN:
        if k in saved and saved.get(k) != now.get(k):
            logger.warning("resuming with %s changed (%r -> %r): the run will differ from the original", k,
                           saved.get(k), now.get(k))


def _prepare_adapter_dir(s: Settings, force: bool, world: Any) -> tuple[int, Path | None]:
    """Decide start step (rank 0 looks at the folder; the others follow). -> (step, checkpoint)."""
    adapter = Path(s.adapter_path)
    err: UserError | None = None
    start, ckpt = 0, None
    if world.rank() == 0:
        try:
            status, step = _adapter_status(adapter)
            if status == "foreign" and not force:
                raise UserError(
                    f"{adapter} exists and is not an adapter folder written by finetune.py; "
                    "choose another --adapter-path or pass --force"
                )
            if s.resume:
                found = latest_checkpoint(adapter)
                if found is None:
                    raise UserError(
                        f"--resume: no complete checkpoint in {adapter / CHECKPOINTS}; start a new run without --resume"
                    )
                start, ckpt = found
                if start >= s.iters:
                    raise UserError(
                        f"--resume: {adapter} is already at step {start} of --iters {s.iters}; "
                        "raise --iters to train further or pass --force to start over"
                    )
            elif status == "finished" and not force:
                raise UserError(
                    f"{adapter} already holds a finished adapter ({step or '?'} steps); pass --force to overwrite it, "
                    "--resume with a larger --iters to continue, or choose another --adapter-path"
                )
            elif status == "unfinished" and not force and not step:
                raise UserError(
                    f"{adapter} holds a run that stopped before its first checkpoint; pass --force to start over"
                )
            elif status == "unfinished" and not force:
                raise UserError(
                    f"{adapter} holds an unfinished run (last checkpoint: step {step}); pass --resume to continue it "
                    "or --force to start over"
                )
            elif force:
                _clear_outputs(adapter)
        except UserError as exc:
            err = exc
    failed = bcast_int(1 if err else 0, world)
    if err is not None:
        raise err
    if failed:
        raise UserError("rank 0 refused to start; see its error message")
    start = bcast_int(start, world)
    return start, ckpt


def _write_adapter_config(s: Settings, adapter: Path, status: str, steps: int, extra: dict[str, Any]) -> None:
    # MLX-LM's resolved args (its own mask_prompt stays false: we mask ourselves,
    # recorded under "fishtune"), with the values this run really used.
    cfg = dict(s.mlx_config) if s.mlx_config else {}
    cfg.update(
        {
            "model": s.model,
            "data": s.data,
            "adapter_path": str(adapter),
            "fine_tune_type": s.fine_tune_type,
            "num_layers": s.num_layers,
            "lora_parameters": None if s.fine_tune_type == "full" else {"dropout": 0.0, **s.lora_parameters},
            "batch_size": s.batch_size,
            "iters": s.iters,
            "learning_rate": s.learning_rate,
            "max_seq_length": s.max_seq_length,
            "grad_accumulation_steps": s.grad_accumulation_steps,
            "seed": s.seed,
        }
    )
    meta = dict(cfg.get(META_KEY) or {})
    meta.update(
        {
            "template": s.template,
            "system_prompt": s.system_prompt,
            "base_model": _portable_model_name(s.base_model or s.model),
            "mask_prompt": s.mask_prompt,
            "status": status,
            "trained_steps": steps,
            **extra,
        }
    )
    cfg[META_KEY] = meta
    atomic_write_json(adapter / ADAPTER_CONFIG, dict(sorted(cfg.items())))


def _save_checkpoint(adapter: Path, step: int, model: Any, optimizer: Any, grad_accum: Any,
                     state: dict[str, Any]) -> Path:
    """Write checkpoints/NNNNNNN atomically, then the top-level adapter files."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    root = adapter / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"{step:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), weights)
    mx.save_safetensors(str(tmp / CKPT_OPTIMIZER), dict(tree_flatten(optimizer.state)))
    if grad_accum is not None:
        mx.save_safetensors(str(tmp / CKPT_GRAD), dict(tree_flatten(grad_accum)))
    atomic_write_json(tmp / CKPT_STATE, state)  # written last
    final = root / name
    if final.exists():  # a re-run of the same step after resume
        shutil.rmtree(final)
    os.replace(tmp, final)  # the commit point: a folder named NNNNNNN is complete
    _copy_atomic(final / ADAPTER_WEIGHTS, adapter / f"{name}_{ADAPTER_WEIGHTS}")
    _copy_atomic(final / ADAPTER_WEIGHTS, adapter / ADAPTER_WEIGHTS)
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


def train_run(s: Settings, force: bool = False, progress: bool = True) -> RunResult:
    """Train an adapter as ``s`` says; returns what was written and the losses."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.tuner.trainer import TrainingArgs, grad_checkpoint

    wall0 = time.perf_counter()
    world = distributed_world()
    rank, nproc = world.rank(), world.size()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one voice: rank 0 reports
    limit_blas_threads(rank, nproc)
    if s.batch_size % nproc:
        raise UserError(f"batch_size {s.batch_size} is not divisible by the {nproc} training processes")
    if s.grad_accumulation_steps > 1 and s.iters % s.grad_accumulation_steps:
        logger.warning(
            "iters %d is not a multiple of grad_accumulation_steps %d: the last %d step(s) are not applied",
            s.iters, s.grad_accumulation_steps, s.iters % s.grad_accumulation_steps,
        )
    adapter = Path(s.adapter_path)

    # Check the data folder before loading the model (fast failure).
    data = Path(s.data)
    if not (data / "train.jsonl").is_file():
        raise UserError(f"{data / 'train.jsonl'} not found; run process_data.py or point --data at a folder with train.jsonl")
    if s.test and not (data / "test.jsonl").is_file():
        raise UserError(f"--test: {data / 'test.jsonl'} not found; add a test split or drop --test")

    start, ckpt = _prepare_adapter_dir(s, force, world)

    logger.info("Loading model %s", s.model)
    model, tokenizer = load_base_model(s.model)
    logger.info("Loading data from %s (template %s, prompt masked: %s)", data, s.template,
                "yes" if s.mask_prompt else "no")
    ds = load_datasets(s, tokenizer, need_train=True, need_test=s.test)
    assert ds.train is not None
    logger.info(describe_batching(ds.train))
    if ds.reports["train"].truncated:
        logger.warning("policy: records over max_seq_length=%d are truncated at the end (as MLX-LM does)",
                       s.max_seq_length)

    mx.random.seed(s.seed)  # LoRA/DoRA init; identical on every rank
    apply_fine_tune_type(model, s)
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    logger.info(
        "%s on %s, %s: %.3fM trainable parameters (%.3f%% of %.3fM)%s",
        s.fine_tune_type.upper(), s.model,
        f"all {len(model.layers)} layers" if s.num_layers < 0 else f"last {s.num_layers} of {len(model.layers)} layers",
        n_train / 1e6,
        100 * n_train / max(n_total, 1), n_total / 1e6, " on a quantized base (QLoRA)" if is_quantized(model) else "",
    )
    # MLX-LM's trainer settings; the loop below runs on exactly these fields.
    args = TrainingArgs(
        batch_size=s.batch_size, iters=s.iters, val_batches=s.val_batches, steps_per_report=s.steps_per_report,
        steps_per_eval=s.steps_per_eval, steps_per_save=s.save_every, max_seq_length=s.max_seq_length,
        adapter_file=str(adapter / ADAPTER_WEIGHTS), grad_checkpoint=s.grad_checkpoint,
        grad_accumulation_steps=s.grad_accumulation_steps, clear_cache_threshold=s.clear_cache_threshold,
    )
    optimizer = make_optimizer(s)
    optimizer.init(model.trainable_parameters())
    grad_accum = None
    resume_key = _resume_key(s, ds.train_fingerprint)

    if start > 0:
        # Rank 0 read the checkpoint; every rank gets its values (hosts need not share a disk).
        params_t = model.trainable_parameters()
        params, opt_state, grads = params_t, optimizer.state, None
        err: UserError | None = None
        if rank == 0:
            assert ckpt is not None
            try:
                saved = json.loads((ckpt / CKPT_STATE).read_text(encoding="utf-8"))
                _check_resume_key(saved.get("resume_key", {}), resume_key, ckpt)
                params = _restore_tree(params_t, mx.load(str(ckpt / ADAPTER_WEIGHTS)), "trainable weights", ckpt)
                opt_state = _restore_tree(optimizer.state, mx.load(str(ckpt / CKPT_OPTIMIZER)), "optimizer state", ckpt)
                if (ckpt / CKPT_GRAD).is_file():
                    grads = _restore_tree(params_t, mx.load(str(ckpt / CKPT_GRAD)), "accumulated gradient", ckpt)
            except UserError as exc:
                err = exc
        # Every rank must hear of a refusal, or the others would wait forever.
        if bcast_int(1 if err else 0, world):
            raise err or UserError("rank 0 could not resume; see its error message")
        model.update(bcast_tree(params, world))
        optimizer.state = bcast_tree(opt_state, world)
        if bcast_int(int(grads is not None), world):
            grad_accum = bcast_tree(grads if grads is not None else tree_map(mx.zeros_like, params_t), world)
        mx.eval(model.parameters(), optimizer.state, grad_accum)
        logger.info("Resuming from %s at step %d of %d", ckpt or "rank 0's checkpoint", start, s.iters)
    else:
        model.update(bcast_tree(model.trainable_parameters(), world))

    metrics = MetricsLog(adapter / METRICS if rank == 0 else None, keep_until=start if start else None)
    if rank == 0:
        adapter.mkdir(parents=True, exist_ok=True)
        _write_adapter_config(s, adapter, "training", start, {})
        metrics.flush()

    # mlx_lm's grad_checkpoint patches the layer *class*; undo it after the run so
    # later models in this process (inference, a second run) are not wrapped again.
    layer_cls = type(model.layers[0])
    orig_call = layer_cls.__call__
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    run = _Run(s, args, model, optimizer, ds, metrics, adapter, world, resume_key, wall0, progress)
    try:
        return run.loop(start, grad_accum)
    finally:
        layer_cls.__call__ = orig_call


@dataclass
class _Run:
    s: Settings
    args: Any  # mlx_lm TrainingArgs: the loop's schedule
    model: Any
    optimizer: Any
    ds: Datasets
    metrics: MetricsLog
    adapter: Path
    world: Any
    resume_key: dict[str, Any]
    wall0: float
    progress: bool

    def loop(self, start: int, grad_accum: Any) -> RunResult:
        import mlx.core as mx
        import mlx.nn as nn
        from mlx.nn.utils import average_gradients
        from mlx.utils import tree_map
        from tqdm import tqdm

        s, args, model, optimizer, ds, metrics, world = (
            self.s, self.args, self.model, self.optimizer, self.ds, self.metrics, self.world)
        rank, nproc = world.rank(), world.size()
        accum = args.grad_accumulation_steps
        loss_value_and_grad = nn.value_and_grad(model, masked_loss)
        state = [model.state, optimizer.state, mx.random.state]

        # Same update as mlx_lm.tuner.trainer.train's compiled step.
        @partial(mx.compile, inputs=state, outputs=state)
        def step_fn(batch, prev_grad, do_update):
            (lvalue, toks), grad = loss_value_and_grad(model, *batch)
            if prev_grad is not None:
                grad = tree_map(lambda x, y: x + y, grad, prev_grad)
            if do_update:
                grad = average_gradients(grad)
                if accum > 1:
                    grad = tree_map(lambda x: x / accum, grad)
                optimizer.update(model, grad)
                grad = None
            return lvalue, toks, grad

        def run_eval(step: int) -> None:
            if ds.valid is None:
                return
            tic = time.perf_counter()
            val_loss = evaluate_loss(model, ds.valid, s, args.val_batches)
            model.train()
            metrics.add({"kind": "val", "step": step, "val_loss": val_loss, "val_time_s": time.perf_counter() - tic})
            say(f"step {step:>5}  val loss {val_loss:.4f}")

        def say(msg: str) -> None:
            # Above the bar when there is one, else a log line (rank 0 only either way).
            if rank != 0:
                return
            if self.progress:
                bar.write(msg, file=sys.stderr)
            else:
                logger.info(msg)

        mx.reset_peak_memory()
        model.train()
        bar = tqdm(total=args.iters, initial=start, desc="train", unit="step",
                   disable=(not self.progress or rank != 0), dynamic_ncols=True, leave=True)
        if start == 0:
            run_eval(0)
        losses = mx.array(0.0)
        n_steps = n_all = n_loss = 0
        trained_tokens = int(metrics.last("train", "trained_tokens") or 0)
        t_report = 0.0
        ckpt_dir = None
        with bar:
            for step in range(start + 1, args.iters + 1):
                tic = time.perf_counter()
                mx.random.seed(step_seed(s.seed, step))
                batch = make_batch(ds.train, ds.train.batch_for_step(step), args.max_seq_length, rank, nproc, train=True)
                all_t, loss_t = batch_token_counts(batch[1])
                lvalue, _toks, grad_accum = step_fn(batch, grad_accum, step % accum == 0)
                losses = losses + lvalue
                mx.eval(state, losses, grad_accum)
                if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
                    mx.clear_cache()
                t_report += time.perf_counter() - tic
                n_steps += 1
                n_all += all_t
                n_loss += loss_t
                bar.update(1)

                if step % args.steps_per_report == 0 or step == args.iters:
                    train_loss = all_sum_float(losses, world) / (n_steps * nproc)
                    g_all = int(all_sum_float(float(n_all), world))
                    g_loss = int(all_sum_float(float(n_loss), world))
                    trained_tokens += g_all
                    row = {
                        "kind": "train",
                        "step": step,
                        "epoch": round(ds.train.epoch_of_step(step), 4),
                        "train_loss": train_loss,
                        "learning_rate": float(optimizer.learning_rate.item()),
                        "iterations_per_sec": n_steps / t_report,
                        "tokens_per_sec": g_all / t_report,
                        "loss_tokens_per_sec": g_loss / t_report,
                        "trained_tokens": trained_tokens,
                        "peak_memory_gb": mx.get_peak_memory() / 1e9,
                    }
                    metrics.add(row)
                    say(f"step {step:>5}  train loss {train_loss:.4f}  lr {row['learning_rate']:.3g}  "
                        f"{row['iterations_per_sec']:.2f} it/s  {row['tokens_per_sec']:.0f} tok/s  "
                        f"peak {row['peak_memory_gb']:.2f} GB")
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}", refresh=False)
                    losses = mx.array(0.0)
                    n_steps = n_all = n_loss = 0
                    t_report = 0.0

                if step % args.steps_per_eval == 0 or step == args.iters:
                    run_eval(step)

                if (step % args.steps_per_save == 0 or step == args.iters) and rank == 0:
                    ckpt_dir = _save_checkpoint(
                        self.adapter, step, model, optimizer, grad_accum,
                        {"step": step, "iters": args.iters, "world_size": nproc, "resume_key": self.resume_key,
                         "time": time.time()},
                    )
                    _write_adapter_config(s, self.adapter, "training", step, {})
                    if step != args.iters:
                        say(f"step {step:>5}  checkpoint {ckpt_dir}")

        adapter = self.adapter
        result = RunResult(adapter_path=adapter, steps=args.iters, resumed_from=start or None)
        result.train_loss = metrics.last("train", "train_loss")
        result.val_loss = metrics.last("val", "val_loss")
        result.truncated = ds.reports["train"].truncated
        result.padding_fraction = ds.train.padding_fraction()
        if s.test and ds.test is not None:
            tl = evaluate_loss(model, ds.test, s, s.test_batches)
            result.test_loss, result.test_ppl = tl, _ppl(tl)
            metrics.add({"kind": "test", "step": s.iters, "test_loss": tl, "test_ppl": result.test_ppl})
        result.peak_memory_gb = mx.get_peak_memory() / 1e9
        result.wall_time_s = time.perf_counter() - self.wall0
        if rank == 0:
            plot_loss_curve(metrics.rows, adapter / LOSS_CURVE, title=f"{s.fine_tune_type.upper()} fine-tuning of {s.model}")
            result.files = {
                "adapter": str(adapter / ADAPTER_WEIGHTS),
                "config": str(adapter / ADAPTER_CONFIG),
                "checkpoints": str(adapter / CHECKPOINTS),
                "metrics": str(adapter / METRICS),
                "loss curve": str(adapter / LOSS_CURVE),
                "summary": str(adapter / SUMMARY),
            }
            _write_adapter_config(
                s, adapter, "finished", s.iters,
                {"train_loss": result.train_loss, "val_loss": result.val_loss, "test_loss": result.test_loss,
                 "world_size": nproc},
            )
            atomic_write_json(adapter / SUMMARY, {**result.as_dict(), "data": {k: r.as_dict() for k, r in ds.reports.items()}})
            log_summary(result)
        return result


def run(s: Settings, force: bool = False, progress: bool = True) -> RunResult:
    """Train (and test) or only test, the way ``mlx_lm lora`` decides."""
    if s.test and not s.train:
        return evaluate_adapter(s)
    return train_run(s, force=force, progress=progress)


def train_adapter(
    model: str,
    data_dir: str | os.PathLike,
    adapter_path: str | os.PathLike,
    fine_tune_type: str = "dora",
    iters: int = 10,
    *,
    force: bool = True,
    progress: bool = False,
    **overrides: Any,
) -> Path:
    """Train a small adapter from Python (tests, demos). Returns the adapter folder.

    ``overrides`` are config keys (``batch_size=2``, ``max_seq_length=128``,
    ``lora_parameters={...}``, ``template="chatml"`` ...), applied on top of
    the defaults like command-line flags.
    """
    from fishtune.config import load_config

    ov: dict[str, Any] = {
        "model": str(model),
        "data": str(data_dir),
        "adapter_path": str(adapter_path),
        "fine_tune_type": fine_tune_type,
        "iters": iters,
        "train": True,
    }
    defaults = {"batch_size": 2, "max_seq_length": 128, "steps_per_eval": max(iters, 1), "steps_per_report": 1,
                "save_every": max(iters, 1), "val_batches": 2}
    for k, v in defaults.items():
        ov.setdefault(k, v)
    ov.update(overrides)
    cfg = load_config(None, ov)
    run(settings_from_config(cfg), force=force, progress=progress)
    return Path(adapter_path)


__all__ = [
    "Settings",
    "RunResult",
    "settings_from_config",
    "load_base_model",
    "apply_fine_tune_type",
    "make_optimizer",
    "train_run",
    "evaluate_adapter",
    "run",
    "train_adapter",
    "list_checkpoints",
    "latest_checkpoint",
    "plot_loss_curve",
]
