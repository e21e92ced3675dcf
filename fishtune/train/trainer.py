"""Fine-tuning through MLX-LM: LoRA, DoRA or full, resumable, data parallel.

The pieces are MLX-LM's: ``linear_to_lora_layers``, ``build_schedule``,
``evaluate``, ``average_gradients``, ``grad_checkpoint`` and the same compiled
update step as ``mlx_lm.tuner.trainer.train``. The loop itself is ours
because ``train()`` has no per-step hook: it restarts counting at step 1,
cannot restore optimizer state, saves non-atomically and without optimizer
state, and evaluates before rather than after a step. A test checks that
this loop and MLX-LM's ``train()`` produce the same adapter from the same
batches.

What the loop adds:

* exact resume (:mod:`fishtune.train.checkpoints`): the batch of step ``k``
  is a pure function of ``(seed, k)`` and the random key is re-seeded from
  ``(seed, k)`` before each step (dropout), so a resumed run repeats the
  uninterrupted one.
* ``metrics.jsonl``, ``loss_curve.png``, a tqdm bar and a closing summary
  (:mod:`fishtune.train.metrics`).
* data parallel training under ``mlx.launch``: each rank computes its share
  of every global batch; the loss is normalised by the global token count so
  the averaged gradient equals the single-process one. Only rank 0 writes.

Every setting comes from one :class:`fishtune.train.config.TrainConfig`.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from fishtune.errors import UserError
from fishtune.fileio import atomic_write_json
from fishtune.project import AdapterFiles, DataFiles
from fishtune.train import checkpoints as ck
from fishtune.train.batches import (
    Splits,
    batch_token_counts,
    describe_batching,
    iterate_batches,
    load_splits,
    make_batch,
)
from fishtune.train.config import TrainConfig, load_config
from fishtune.train.distributed import all_sum_float, bcast_int, bcast_tree, on_rank0
from fishtune.train.distributed import world as distributed_world
from fishtune.train.dora import use_fast_dora_norm
from fishtune.train.loss import masked_loss
from fishtune.train.metrics import (
    MetricsLog,
    RunResult,
    log_summary,
    perplexity,
    plot_loss_curve,
)

logger = logging.getLogger(__name__)


# ---- the model's trainable part, the optimizer --------------------------------------
def is_quantized(model: Any) -> bool:
    import mlx.nn as nn

    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def apply_fine_tune_type(model: Any, cfg: TrainConfig) -> None:
    """Freeze the base and make the trainable part, as MLX-LM's ``train_model`` does."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_model = len(model.layers)
    if cfg.num_layers > n_model:
        raise UserError(
            f"Requested to train {cfg.num_layers} layers but the model only has {n_model}; "
            f"set --num-layers {n_model} (or -1 for all)"
        )
    model.freeze()
    if cfg.fine_tune_type == "full":
        if is_quantized(model):
            raise UserError("full fine-tuning needs an unquantized base model; use --fine-tune-type lora (QLoRA)")
        for layer in model.layers[-max(cfg.num_layers, 0):]:
            layer.unfreeze()
        return
    linear_to_lora_layers(model, cfg.num_layers, cfg.lora_parameters, use_dora=(cfg.fine_tune_type == "dora"))
    use_fast_dora_norm(model)


def make_optimizer(cfg: TrainConfig) -> Any:
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import build_schedule

    classes = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
               "adafactor": optim.Adafactor}
    sched = cfg.resolved_lr_schedule()
    lr = build_schedule(sched) if sched else cfg.learning_rate
    kwargs = dict(cfg.optimizer_config.get(cfg.optimizer) or {})
    try:
        return classes[cfg.optimizer](learning_rate=lr, **kwargs)
    except TypeError as exc:
        raise UserError(f"optimizer_config for {cfg.optimizer}: {exc}") from None


def step_seed(seed: int, step: int) -> int:
    """Random key for step ``step``: dropout depends only on (seed, step)."""
    return (int(seed) * 1_000_003 + int(step)) % (2**63)


@contextlib.contextmanager
def grad_checkpointing(model: Any, enabled: bool) -> Iterator[None]:
    """MLX-LM's gradient checkpointing for the duration of a run.

    ``mlx_lm.tuner.trainer.grad_checkpoint`` patches the transformer block's
    *class*; the original ``__call__`` is put back afterwards, so later models
    in this process (inference, a second run) are not wrapped again.
    """
    if not enabled:
        yield
        return
    from mlx_lm.tuner.trainer import grad_checkpoint

    layer_cls = type(model.layers[0])
    original = layer_cls.__call__
    grad_checkpoint(model.layers[0])
    try:
        yield
    finally:
        layer_cls.__call__ = original


def resume_key(cfg: TrainConfig, fingerprint: str) -> dict[str, Any]:
    """The settings a checkpoint records and a resume compares (``checkpoints.RESUME_*``)."""
    import json

    d = {k: getattr(cfg, k) for k in ck.RESUME_STRICT if k != "train_fingerprint"}
    d.update({k: getattr(cfg, k) for k in ck.RESUME_WARN})
    d["lr_schedule"] = cfg.resolved_lr_schedule()
    d["train_fingerprint"] = fingerprint
    return json.loads(json.dumps(d))


def evaluate_loss(model: Any, ds: Any, cfg: TrainConfig, num_batches: int) -> float:
    """Mean loss over the answer tokens (MLX-LM's ``evaluate`` with our batches/loss)."""
    from mlx_lm.tuner.trainer import evaluate

    return float(evaluate(
        model=model, dataset=ds, batch_size=cfg.batch_size, num_batches=num_batches,
        max_seq_length=cfg.max_seq_length, loss=masked_loss, iterate_batches=iterate_batches,
        clear_cache_threshold=cfg.clear_cache_threshold,
    ))


# ---- the run ------------------------------------------------------------------------
@dataclass
class _Window:
    """Sums over the steps since the last train report."""

    loss: Any = 0.0  # an mx.array once a step ran
    steps: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    seconds: float = 0.0


class Trainer:
    """One training run of ``cfg`` into ``cfg.adapter_path``: ``Trainer(cfg).run()``."""

    def __init__(self, cfg: TrainConfig, *, force: bool = False, progress: bool = True):
        self.cfg = cfg
        self.force = force
        self.progress = progress
        self.adapter = Path(cfg.adapter_path)
        self.world = distributed_world()
        self.rank, self.nproc = self.world.rank(), self.world.size()
        self.bar: Any = None

    # -- setup
    def _check_inputs(self) -> None:
        cfg = self.cfg
        if cfg.batch_size % self.nproc:
            raise UserError(f"batch_size {cfg.batch_size} is not divisible by the {self.nproc} training processes")
        if cfg.grad_accumulation_steps > 1 and cfg.iters % cfg.grad_accumulation_steps:
            logger.warning(
                "iters %d is not a multiple of grad_accumulation_steps %d: the last %d step(s) are not applied",
                cfg.iters, cfg.grad_accumulation_steps, cfg.iters % cfg.grad_accumulation_steps,
            )
        data = Path(cfg.data)  # before loading the model: fail fast
        train, test = data / DataFiles.split("train"), data / DataFiles.split("test")
        if not train.is_file():
            raise UserError(f"{train} not found; run process_data.py or point --data at a folder with train.jsonl")
        if cfg.test and not test.is_file():
            raise UserError(f"--test: {test} not found; add a test split or drop --test")

    def _load(self) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from fishtune.loading import load_base

        cfg = self.cfg
        logger.info("Loading model %s", cfg.model)
        self.model, tokenizer, _ = load_base(cfg.model)
        logger.info("Loading data from %s (template %s, prompt masked: %s)", cfg.data, cfg.template,
                    "yes" if cfg.mask_prompt else "no")
        self.splits: Splits = load_splits(cfg, tokenizer, need_train=True, need_test=cfg.test)
        logger.info(describe_batching(self.splits.train))
        if self.splits.reports["train"].truncated:
            logger.warning("policy: records over max_seq_length=%d are truncated at the end (as MLX-LM does)",
                           cfg.max_seq_length)
        mx.random.seed(cfg.seed)  # LoRA/DoRA init; identical on every rank
        apply_fine_tune_type(self.model, cfg)
        n_train = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        n_total = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        n_layers = len(self.model.layers)
        logger.info(
            "%s on %s, %s: %.3fM trainable parameters (%.3f%% of %.3fM)%s", cfg.fine_tune_type.upper(), cfg.model,
            f"all {n_layers} layers" if cfg.num_layers < 0 else f"last {cfg.num_layers} of {n_layers} layers",
            n_train / 1e6, 100 * n_train / max(n_total, 1), n_total / 1e6,
            " on a quantized base (QLoRA)" if is_quantized(self.model) else "",
        )
        self.optimizer = make_optimizer(cfg)
        self.optimizer.init(self.model.trainable_parameters())
        self.resume_key = resume_key(cfg, self.splits.train_fingerprint)

    def _restore(self, start: int, ckpt: Path | None) -> Any:
        """Start every rank from rank 0's state (the checkpoint's, or its fresh init); returns the accumulated gradient."""
        import mlx.core as mx
        from mlx.utils import tree_map

        model, optimizer = self.model, self.optimizer
        if start == 0:
            model.update(bcast_tree(model.trainable_parameters(), self.world))
            return None
        templates = {"weights": model.trainable_parameters(), "optimizer": optimizer.state}
        # Rank 0 reads the checkpoint; hosts need not share a disk.
        saved = on_rank0(lambda: ck.read_checkpoint(ckpt, templates, self.resume_key), self.world, "resume")
        has_grad = bcast_int(int(saved is not None and saved["grad"] is not None), self.world)
        trees = saved or {**templates, "grad": tree_map(mx.zeros_like, templates["weights"])}
        if not has_grad:
            trees = {**trees, "grad": None}
        trees = bcast_tree({k: v for k, v in trees.items() if v is not None}, self.world)
        model.update(trees["weights"])
        optimizer.state = trees["optimizer"]
        grad_accum = trees.get("grad")
        mx.eval(model.parameters(), optimizer.state, grad_accum)
        logger.info("Resuming from %s at step %d of %d", ckpt or "rank 0's checkpoint", start, self.cfg.iters)
        return grad_accum

    def _compile_step(self):
        """The update step of ``mlx_lm.tuner.trainer.train``, compiled over the model/optimizer/RNG state."""
        import mlx.core as mx
        import mlx.nn as nn
        from mlx.nn.utils import average_gradients
        from mlx.utils import tree_map

        model, optimizer, accum = self.model, self.optimizer, self.cfg.grad_accumulation_steps
        loss_value_and_grad = nn.value_and_grad(model, masked_loss)
        self.state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def step(batch, prev_grad, do_update):
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

        return step

    # -- reporting
    def say(self, msg: str) -> None:
        """Above the bar when there is one, else a log line (rank 0 only either way)."""
        if self.rank != 0:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg, file=sys.stderr)
        else:
            logger.info(msg)

    def _evaluate(self, step: int) -> None:
        if self.splits.valid is None:
            return
        tic = time.perf_counter()
        val_loss = evaluate_loss(self.model, self.splits.valid, self.cfg, self.cfg.val_batches)
        self.model.train()
        self.metrics.add({"kind": "val", "step": step, "val_loss": val_loss, "val_time_s": time.perf_counter() - tic})
        self.say(f"step {step:>5}  val loss {val_loss:.4f}")

    def _report(self, step: int, w: _Window) -> None:
        import mlx.core as mx

        train_loss = all_sum_float(w.loss, self.world) / (w.steps * self.nproc)
        g_all = int(all_sum_float(float(w.tokens), self.world))
        g_loss = int(all_sum_float(float(w.loss_tokens), self.world))
        self.trained_tokens += g_all
        row = {
            "kind": "train",
            "step": step,
            "epoch": round(self.splits.train.epoch_of_step(step), 4),
            "train_loss": train_loss,
            "learning_rate": float(self.optimizer.learning_rate.item()),
            "iterations_per_sec": w.steps / w.seconds,
            "tokens_per_sec": g_all / w.seconds,
            "loss_tokens_per_sec": g_loss / w.seconds,
            "trained_tokens": self.trained_tokens,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
        self.metrics.add(row)
        self.say(f"step {step:>5}  train loss {train_loss:.4f}  lr {row['learning_rate']:.3g}  "
                 f"{row['iterations_per_sec']:.2f} it/s  {row['tokens_per_sec']:.0f} tok/s  "
                 f"peak {row['peak_memory_gb']:.2f} GB")
        self.bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}", refresh=False)

    def _save(self, step: int, grad_accum: Any) -> None:
        if self.rank != 0:
            return
        trees = {"weights": self.model.trainable_parameters(), "optimizer": self.optimizer.state, "grad": grad_accum}
        state = {"step": step, "iters": self.cfg.iters, "world_size": self.nproc, "resume_key": self.resume_key,
                 "time": time.time()}
        path = ck.save_checkpoint(self.adapter, step, trees, state)
        ck.write_adapter_config(self.cfg, self.adapter, "training", step, {})
        if step != self.cfg.iters:
            self.say(f"step {step:>5}  checkpoint {path}")

    # -- the loop
    def _loop(self, start: int, grad_accum: Any) -> None:
        import mlx.core as mx
        from tqdm import tqdm

        cfg, model, train = self.cfg, self.model, self.splits.train
        step_fn = self._compile_step()
        mx.reset_peak_memory()
        model.train()
        self.trained_tokens = int(self.metrics.last("train", "trained_tokens") or 0)
        self.bar = tqdm(total=cfg.iters, initial=start, desc="train", unit="step",
                        disable=(not self.progress or self.rank != 0), dynamic_ncols=True, leave=True)
        with self.bar:
            if start == 0:
                self._evaluate(0)
            w = _Window()
            for step in range(start + 1, cfg.iters + 1):
                tic = time.perf_counter()
                mx.random.seed(step_seed(cfg.seed, step))
                rows = train.batch_for_step(step)
                batch = make_batch(train, rows, cfg.max_seq_length, self.rank, self.nproc)
                n_all, n_loss = batch_token_counts(train, rows, self.rank, self.nproc)
                lvalue, _, grad_accum = step_fn(batch, grad_accum, step % cfg.grad_accumulation_steps == 0)
                w.loss = w.loss + lvalue
                mx.eval(self.state, w.loss, grad_accum)
                if cfg.clear_cache_threshold and mx.get_cache_memory() > cfg.clear_cache_threshold:
                    mx.clear_cache()
                w.seconds += time.perf_counter() - tic
                w.steps, w.tokens, w.loss_tokens = w.steps + 1, w.tokens + n_all, w.loss_tokens + n_loss
                self.bar.update(1)
                last = step == cfg.iters
                if step % cfg.steps_per_report == 0 or last:
                    self._report(step, w)
                    w = _Window()
                if step % cfg.steps_per_eval == 0 or last:
                    self._evaluate(step)
                if step % cfg.save_every == 0 or last:
                    self._save(step, grad_accum)

    def _finish(self, start: int, wall0: float) -> RunResult:
        import mlx.core as mx

        cfg, adapter, metrics = self.cfg, self.adapter, self.metrics
        result = RunResult(adapter_path=adapter, steps=cfg.iters, resumed_from=start or None)
        result.train_loss = metrics.last("train", "train_loss")
        result.val_loss = metrics.last("val", "val_loss")
        result.truncated = self.splits.reports["train"].truncated
        result.padding_fraction = self.splits.train.padding_fraction()
        if cfg.test and self.splits.test is not None:
            tl = evaluate_loss(self.model, self.splits.test, cfg, cfg.test_batches)
            result.test_loss, result.test_ppl = tl, perplexity(tl)
            metrics.add({"kind": "test", "step": cfg.iters, "test_loss": tl, "test_ppl": result.test_ppl})
        result.peak_memory_gb = mx.get_peak_memory() / 1e9
        result.wall_time_s = time.perf_counter() - wall0
        if self.rank != 0:
            return result
        plot_loss_curve(metrics.rows, adapter / AdapterFiles.LOSS_CURVE,
                        title=f"{cfg.fine_tune_type.upper()} fine-tuning of {cfg.model}")
        result.files = {
            "adapter": str(adapter / AdapterFiles.WEIGHTS),
            "config": str(adapter / AdapterFiles.CONFIG),
            "checkpoints": str(adapter / AdapterFiles.CHECKPOINTS),
            "metrics": str(adapter / AdapterFiles.METRICS),
            "loss curve": str(adapter / AdapterFiles.LOSS_CURVE),
            "summary": str(adapter / AdapterFiles.SUMMARY),
        }
        ck.write_adapter_config(cfg, adapter, "finished", cfg.iters, {
            "train_loss": result.train_loss, "val_loss": result.val_loss, "test_loss": result.test_loss,
            "world_size": self.nproc,
        })
        atomic_write_json(adapter / AdapterFiles.SUMMARY,
                          {**result.as_dict(), "data": {k: r.as_dict() for k, r in self.splits.reports.items()}})
        log_summary(result)
        return result

    def run(self) -> RunResult:
        """Train as ``cfg`` says; returns what was written and the losses."""
        wall0 = time.perf_counter()
        self._check_inputs()
        found = on_rank0(lambda: ck.decide_start(self.adapter, self.cfg.iters, self.cfg.resume, self.force),
                         self.world, "start")
        start, ckpt = found if found is not None else (0, None)
        start = bcast_int(start, self.world)
        self._load()
        grad_accum = self._restore(start, ckpt)
        self.metrics = MetricsLog(self.adapter / AdapterFiles.METRICS if self.rank == 0 else None,
                                  keep_until=start if start else None)
        if self.rank == 0:
            self.adapter.mkdir(parents=True, exist_ok=True)
            ck.write_adapter_config(self.cfg, self.adapter, "training", start, {})
            self.metrics.flush()
        with grad_checkpointing(self.model, self.cfg.grad_checkpoint):
            self._loop(start, grad_accum)
        return self._finish(start, wall0)


# ---- entry points -------------------------------------------------------------------
def evaluate_adapter(cfg: TrainConfig) -> RunResult:
    """``--test`` without training: the test loss of an existing adapter folder, scored as it was trained."""
    import dataclasses

    import mlx.core as mx

    from fishtune.loading import load_model

    tic = time.perf_counter()
    lm = load_model(cfg.model, cfg.adapter_path, fuse=False)
    use_fast_dora_norm(lm.model)
    mask = lm.meta.extra.get("mask_prompt", cfg.mask_prompt)
    project = dataclasses.replace(cfg.project, template=lm.meta.template, system_prompt=lm.meta.system_prompt,
                                  mask_prompt=bool(mask))
    splits = load_splits(dataclasses.replace(cfg, project=project), lm.tokenizer, need_train=False, need_test=True)
    loss = evaluate_loss(lm.model, splits.test, cfg, cfg.test_batches)
    r = RunResult(adapter_path=Path(cfg.adapter_path), test_loss=loss, test_ppl=perplexity(loss))
    r.wall_time_s = time.perf_counter() - tic
    r.peak_memory_gb = mx.get_peak_memory() / 1e9
    logger.info("Test loss %.4f, test perplexity %.3f (%s)", loss, r.test_ppl, Path(cfg.data) / DataFiles.split("test"))
    return r


def run(cfg: TrainConfig, force: bool = False, progress: bool = True) -> RunResult:
    """Train (and test) or only test, the way ``mlx_lm lora`` decides."""
    if cfg.test and not cfg.train:
        return evaluate_adapter(cfg)
    return Trainer(cfg, force=force, progress=progress).run()


def train_adapter(
    model: str,
    data_dir: str | Path,
    adapter_path: str | Path,
    fine_tune_type: str = "dora",
    iters: int = 10,
    *,
    config: str | Path | None = None,
    force: bool = True,
    progress: bool = False,
    **overrides: Any,
) -> Path:
    """Train a small adapter from Python (tests, demos). Returns the adapter folder.

    ``config``: a YAML file (default: none, the built-in defaults).
    ``overrides`` are config keys (``batch_size=2``, ``max_seq_length=128``,
    ``lora_parameters={...}``, ``template="chatml"`` ...), applied on top
    like command-line flags.
    """
    ov: dict[str, Any] = {
        "model": str(model), "data": str(data_dir), "adapter_path": str(adapter_path),
        "fine_tune_type": fine_tune_type, "iters": iters, "train": True,
        "batch_size": 2, "max_seq_length": 128, "steps_per_eval": max(iters, 1), "steps_per_report": 1,
        "save_every": max(iters, 1), "val_batches": 2,
    }
    ov.update(overrides)
    run(load_config(config, ov), force=force, progress=progress)
    return Path(adapter_path)


__all__ = ["Trainer", "RunResult", "apply_fine_tune_type", "make_optimizer", "evaluate_adapter", "evaluate_loss",
           "run", "train_adapter", "grad_checkpointing", "step_seed"]
