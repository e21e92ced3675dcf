"""Training configuration: ``lora_config.yaml`` in MLX-LM's own schema.

One file serves two readers:

* the seed's raw ``python3 -m mlx_lm lora ... -c lora_config.yaml``: MLX-LM
  fills every flag that was not given from the YAML, then from its
  ``CONFIG_DEFAULTS``, and writes all resulting keys (also unknown ones such
  as our ``fishtune:`` section) into ``adapter_config.json``;
* ``finetune.py`` through :func:`load_config`, with the same precedence:
  built-in defaults < YAML < command-line values (``None`` = flag not given).

Built-in defaults mirror ``mlx_lm.lora.CONFIG_DEFAULTS`` (MLX-LM 0.32.2) so a
key missing from the YAML means the same thing to both readers, except the
seed's paths (``model``, ``data``, ``adapter_path``), ``fine_tune_type: dora``
and ``bias_correction: true`` for Adam/AdamW (MLX defaults to false; PyTorch
and PEFT always correct). The shipped YAML spells all of them out anyway.

Project settings (template, system prompt, prompt masking, base model) live
under the top-level key ``fishtune:``; MLX-LM carries it along unread.

The seed guide's flat names (``lora_rank``, ``lora_alpha``, ``lora_dropout``,
``warmup_steps``, ``weight_decay``, ``gradient_checkpointing``) are accepted
and translated into MLX-LM's keys with one INFO line each (raw MLX-LM would
silently ignore them).

Units: ``iters`` counts batches; with ``grad_accumulation_steps = G`` the
optimizer updates every G iterations and MLX's learning-rate schedule steps
once per update. Lengths inside ``lr_schedule`` are therefore optimizer
updates; the seed's ``warmup_steps`` is read as iterations and divided by G
(see :meth:`TrainConfig.resolved_lr_schedule`).
"""
from __future__ import annotations

import copy
import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from fishtune.errors import UserError
from fishtune.project import DEFAULT_BASE_MODEL, META_KEY
from fishtune.template import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, get_template

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = REPO_ROOT / "lora_config.yaml"
CLI_SOURCE = "command line"
DEFAULT_SOURCE = "defaults"

FINE_TUNE_TYPES = ("lora", "dora", "full")
# mlx_lm.lora's --optimizer choices and the keyword arguments of each class.
OPTIMIZER_KWARGS: dict[str, tuple[str, ...]] = {
    "adam": ("betas", "eps", "bias_correction"),
    "adamw": ("betas", "eps", "weight_decay", "bias_correction"),
    "muon": ("momentum", "weight_decay", "nesterov", "ns_steps"),
    "sgd": ("momentum", "weight_decay", "dampening", "nesterov"),
    "adafactor": (
        "eps", "clip_threshold", "decay_rate", "beta_1", "weight_decay",
        "scale_parameter", "relative_step", "warmup_init",
    ),
}
OPTIMIZERS = tuple(OPTIMIZER_KWARGS)
# mlx.optimizers.schedulers usable as lr_schedule.name: (min, max) number of
# arguments; arguments[0] is always the initial (peak) learning rate.
SCHEDULES: dict[str, tuple[int, int]] = {
    "cosine_decay": (2, 3),  # (init, decay_steps, end=0.0)
    "linear_schedule": (3, 3),  # (init, end, steps)
    "exponential_decay": (2, 2),  # (init, decay_rate)
    "step_decay": (3, 3),  # (init, decay_rate, step_size)
}
LR_SCHEDULE_KEYS = ("name", "arguments", "warmup", "warmup_init")
LORA_PARAMETER_KEYS = ("rank", "scale", "dropout", "keys")
MIN_SEQ_LENGTH = 16

# MLX-LM's keys with fishtune's built-in defaults (see the module docstring).
MLX_DEFAULTS: dict[str, Any] = {
    "model": DEFAULT_BASE_MODEL,
    "train": False,
    "fine_tune_type": "dora",
    "optimizer": "adam",
    "optimizer_config": {name: {} for name in OPTIMIZERS},
    "data": "data",
    "seed": 0,
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "lora_qwen2_1.5b",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "config": None,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "clear_cache_threshold": 0,
    "lr_schedule": None,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    "mask_prompt": False,
    "report_to": None,
    "project_name": None,
    "trust_remote_code": False,
    # Read by mlx_lm.tuner.datasets via getattr (column names); None = MLX default.
    "prompt_feature": None,
    "completion_feature": None,
    "text_feature": None,
    "chat_feature": None,
}
# Keys of the `fishtune:` section (also accepted at top level in overrides).
PROJECT_KEYS = ("template", "system_prompt", "mask_prompt", "base_model", "resume", "lr_schedule_lengths")
SCHEDULE_LENGTHS = ("explicit", "derived")
# fishtune.lr_schedule_lengths: derived -> the warmup is this share of the run's optimizer updates
# (at least 1), and the decay runs over the rest. 0.1 is the seed run's 2 of 20 updates.
DERIVED_WARMUP_FRACTION = 0.1
# The seed guide's flat lora_config.yaml names -> where they go.
SEED_FLAT_KEYS = {
    "lora_rank": "lora_parameters.rank",
    "lora_alpha": "lora_parameters.scale",
    "lora_dropout": "lora_parameters.dropout",
    "warmup_steps": "lr_schedule.warmup",
    "weight_decay": "optimizer_config.<optimizer>.weight_decay",
    "gradient_checkpointing": "grad_checkpoint",
}


# ---------------------------------------------------------------- validation helpers
def _closest(key: str, known: list[str] | tuple[str, ...]) -> str:
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.0)
    return match[0] if match else ""


def _unknown_key(where: str, key: Any, known: list[str] | tuple[str, ...], what: str = "key") -> UserError:
    return UserError(
        f"{where}: unknown {what} {key!r}; did you mean {_closest(str(key), known)!r}? "
        f"(known: {', '.join(sorted(known))})"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    return type(v).__name__


class _Checker:
    """Builds one-line messages that name the source, the key and the value."""

    def __init__(self, sources: dict[str, str]):
        self.sources = sources

    def where(self, key: str) -> str:
        top = key.split(".", 1)[0]
        return self.sources.get(key) or self.sources.get(top) or "config"

    def fail(self, key: str, need: str, value: Any) -> UserError:
        return UserError(f"{self.where(key)}: {key} must be {need}, got {value!r}")

    def int_(self, key: str, v: Any, lo: int | None = None, need: str | None = None, extra: tuple[int, ...] = ()) -> int:
        need = need or (f"an integer >= {lo}" if lo is not None else "an integer")
        if not _is_int(v) or (v not in extra and lo is not None and v < lo):
            raise self.fail(key, need, v)
        return v

    def num(self, key: str, v: Any, need: str, ok: Callable[[Any], bool]) -> float:
        if not _is_number(v) or not ok(v):
            raise self.fail(key, need, v)
        return float(v)

    def bool_(self, key: str, v: Any) -> bool:
        if not isinstance(v, bool):
            raise self.fail(key, "true or false", v)
        return v

    def str_(self, key: str, v: Any, optional: bool = False, choices: tuple[str, ...] = ()) -> str | None:
        if v is None and optional:
            return None
        if not isinstance(v, str) or (not choices and not v and not optional):
            raise self.fail(key, "a non-empty string" if not choices else "one of " + ", ".join(choices), v)
        if choices and v not in choices:
            raise self.fail(key, "one of " + ", ".join(choices), v)
        return v


def full_decay_steps(updates: int, warmup: int) -> int:
    """The decay length (in updates) that makes the run's LAST update use the final learning rate.

    MLX's optimizer uses ``schedule(k - 1)`` for update ``k`` (1-based);
    ``build_schedule`` starts the decay at schedule step ``warmup + 1`` (at 0
    without a warmup). So the decay must reach its end at step ``updates - 1``.
    """
    start = warmup + 1 if warmup else 0
    return max(updates - 1 - start, 1)


# ---------------------------------------------------------------- the dataclasses
@dataclass
class ProjectConfig:
    """The ``fishtune:`` section: what finetune.py and every later stage share."""

    template: str = DEFAULT_TEMPLATE
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    mask_prompt: bool = True  # loss on the answer only (finetune.py does the masking)
    base_model: str | None = None  # None = TrainConfig.model
    resume: bool = False  # finetune.py: continue from adapter_path/adapters.safetensors
    # "derived": lr_schedule's warmup and decay lengths are re-sized to this run's optimizer
    # updates (the shipped YAML's numbers are the seed run's); "explicit": used as written.
    lr_schedule_lengths: str = "explicit"

    def validate(self, check: _Checker) -> None:
        check.str_("fishtune.template", self.template)
        try:
            get_template(self.template)
        except UserError as exc:
            raise UserError(f"{check.where('fishtune.template')}: fishtune.template: {exc}") from None
        if not isinstance(self.system_prompt, str):
            raise check.fail("fishtune.system_prompt", 'a string ("" for none)', self.system_prompt)
        check.bool_("fishtune.mask_prompt", self.mask_prompt)
        check.str_("fishtune.base_model", self.base_model, optional=True)
        check.bool_("fishtune.resume", self.resume)
        check.str_("fishtune.lr_schedule_lengths", self.lr_schedule_lengths, choices=SCHEDULE_LENGTHS)


@dataclass
class TrainConfig:
    """Resolved training settings: every MLX-LM ``lora`` key plus ``project``.

    Attribute names are MLX-LM's (``cfg.batch_size``,
    ``cfg.lora_parameters["rank"]``); project settings are on ``cfg.project``
    and mirrored as ``cfg.template``, ``cfg.system_prompt``,
    ``cfg.mask_prompt``, ``cfg.base_model``, ``cfg.resume``. Validated (and
    normalised) on construction; bad values raise UserError.
    """

    model: str = MLX_DEFAULTS["model"]
    train: bool = False
    fine_tune_type: str = MLX_DEFAULTS["fine_tune_type"]
    optimizer: str = MLX_DEFAULTS["optimizer"]
    optimizer_config: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(MLX_DEFAULTS["optimizer_config"]))
    data: str = MLX_DEFAULTS["data"]
    seed: int = MLX_DEFAULTS["seed"]
    num_layers: int = MLX_DEFAULTS["num_layers"]
    batch_size: int = MLX_DEFAULTS["batch_size"]
    iters: int = MLX_DEFAULTS["iters"]
    val_batches: int = MLX_DEFAULTS["val_batches"]
    learning_rate: float = MLX_DEFAULTS["learning_rate"]
    steps_per_report: int = MLX_DEFAULTS["steps_per_report"]
    steps_per_eval: int = MLX_DEFAULTS["steps_per_eval"]
    resume_adapter_file: str | None = None
    adapter_path: str = MLX_DEFAULTS["adapter_path"]
    save_every: int = MLX_DEFAULTS["save_every"]
    test: bool = False
    test_batches: int = MLX_DEFAULTS["test_batches"]
    max_seq_length: int = MLX_DEFAULTS["max_seq_length"]
    config: str | None = None  # the YAML file these settings came from
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = MLX_DEFAULTS["grad_accumulation_steps"]
    clear_cache_threshold: int = 0
    lr_schedule: dict[str, Any] | None = None  # MLX-LM format; lengths in optimizer updates
    lora_parameters: dict[str, Any] = field(default_factory=lambda: dict(MLX_DEFAULTS["lora_parameters"]))
    report_to: str | None = None
    project_name: str | None = None
    trust_remote_code: bool = False
    prompt_feature: str | None = None
    completion_feature: str | None = None
    text_feature: str | None = None
    chat_feature: str | None = None
    project: ProjectConfig = field(default_factory=ProjectConfig)
    # The seed's flat warmup_steps, in ITERATIONS; turned into
    # lr_schedule.warmup (optimizer updates) by resolved_lr_schedule().
    warmup_steps: int | None = None
    # Where each key came from ("lora_config.yaml", "command line", ...), for messages.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.project, dict):
            self.project = ProjectConfig(**self.project)
        c = _Checker(self.sources)
        c.str_("model", self.model)
        c.bool_("train", self.train)
        c.str_("fine_tune_type", self.fine_tune_type, choices=FINE_TUNE_TYPES)
        c.str_("optimizer", self.optimizer, choices=OPTIMIZERS)
        c.str_("data", self.data)
        c.int_("seed", self.seed, 0)
        c.int_("num_layers", self.num_layers, -1, need="-1 (all layers) or an integer >= 1")
        if self.num_layers == 0:
            raise c.fail("num_layers", "-1 (all layers) or an integer >= 1", self.num_layers)
        c.int_("batch_size", self.batch_size, 1)
        c.int_("iters", self.iters, 1)
        c.int_("val_batches", self.val_batches, 1, need="-1 (whole set) or an integer >= 1", extra=(-1,))
        c.num("learning_rate", self.learning_rate, "a number > 0", lambda v: 0 < v < math.inf)
        self.learning_rate = float(self.learning_rate)
        c.int_("steps_per_report", self.steps_per_report, 1)
        c.int_("steps_per_eval", self.steps_per_eval, 1)
        c.str_("resume_adapter_file", self.resume_adapter_file, optional=True)
        c.str_("adapter_path", self.adapter_path)
        c.int_("save_every", self.save_every, 1)
        c.bool_("test", self.test)
        c.int_("test_batches", self.test_batches, 1, need="-1 (whole set) or an integer >= 1", extra=(-1,))
        c.int_("max_seq_length", self.max_seq_length, MIN_SEQ_LENGTH)
        c.str_("config", self.config, optional=True)
        c.bool_("grad_checkpoint", self.grad_checkpoint)
        c.int_("grad_accumulation_steps", self.grad_accumulation_steps, 1)
        if self.iters < self.grad_accumulation_steps:
            raise UserError(
                f"{c.where('iters')}: iters {self.iters} < grad_accumulation_steps "
                f"{self.grad_accumulation_steps}: the optimizer would never update; raise iters"
            )
        c.int_("clear_cache_threshold", self.clear_cache_threshold, 0)
        for key in ("report_to", "project_name", "prompt_feature", "completion_feature", "text_feature", "chat_feature"):
            c.str_(key, getattr(self, key), optional=True)
        c.bool_("trust_remote_code", self.trust_remote_code)
        if self.warmup_steps is not None:
            c.int_("warmup_steps", self.warmup_steps, 0)
        self.lora_parameters = _check_lora_parameters(self.lora_parameters, c)
        self.optimizer_config = _check_optimizer_config(self.optimizer_config, self.optimizer, c)
        if self.lr_schedule is not None:
            self.lr_schedule = _check_lr_schedule(self.lr_schedule, c)
        self.project.validate(c)

    # ---- project mirrors
    @property
    def template(self) -> str:
        return self.project.template

    @property
    def system_prompt(self) -> str:
        return self.project.system_prompt

    @property
    def mask_prompt(self) -> bool:
        """fishtune's prompt masking (MLX-LM's own mask_prompt is always false)."""
        return self.project.mask_prompt

    @property
    def base_model(self) -> str:
        return self.project.base_model or self.model

    @property
    def resume(self) -> bool:
        return self.project.resume

    @property
    def bias_correction(self) -> bool | None:
        """Adam/AdamW bias correction; None for optimizers without it."""
        return self.optimizer_config.get(self.optimizer, {}).get("bias_correction")

    @property
    def weight_decay(self) -> float | None:
        return self.optimizer_config.get(self.optimizer, {}).get("weight_decay")

    # ---- schedule
    def schedule_steps(self) -> int:
        """Optimizer updates in the run: MLX-LM updates when iteration % G == 0."""
        return self.iters // self.grad_accumulation_steps

    def resolved_lr_schedule(self) -> dict[str, Any] | None:
        """The lr_schedule MLX-LM should run, in optimizer updates; None = constant LR.

        * ``arguments[0]`` (the peak) is set to ``learning_rate``, so
          ``--learning-rate`` works even with a schedule (raw MLX-LM would
          take the peak from the YAML's arguments[0]).
        * The seed's ``warmup_steps`` counts iterations; it becomes
          ``warmup = ceil(warmup_steps / grad_accumulation_steps)`` updates.
          Without an explicit lr_schedule it builds linear warmup + cosine
          decay to 0 over the remaining ``schedule_steps() - warmup - 1``
          updates (the cosine part starts one update after the warmup ends).
        * ``fishtune.lr_schedule_lengths: derived`` (the shipped YAML): the
          warmup becomes ``DERIVED_WARMUP_FRACTION`` of this run's updates (at
          least 1, when the schedule has a warmup) and the decay (cosine
          ``decay_steps``, linear ``steps``) runs to the last update, whatever
          ``--iters``, ``--batch-size`` or ``--grad-accumulation-steps`` say.
        * Otherwise an explicit lr_schedule is used as written: its lengths
          are already optimizer updates, exactly as MLX-LM reads them.
        """
        if self.lr_schedule is None and self.warmup_steps is None:
            return None
        derived = self.lr_schedule is not None and self.project.lr_schedule_lengths == "derived"
        auto_decay = self.lr_schedule is None or derived
        sched = (
            {"name": "cosine_decay", "warmup": 0, "warmup_init": 0.0, "arguments": [self.learning_rate, 1, 0.0]}
            if self.lr_schedule is None
            else copy.deepcopy(self.lr_schedule)
        )
        args = list(sched["arguments"])
        args[0] = self.learning_rate
        updates = self.schedule_steps()
        if self.warmup_steps is not None:
            sched["warmup"] = math.ceil(self.warmup_steps / self.grad_accumulation_steps)
        elif derived and sched.get("warmup"):
            sched["warmup"] = min(max(1, round(DERIVED_WARMUP_FRACTION * updates)), max(updates - 2, 0))
        rest = full_decay_steps(updates, int(sched.get("warmup", 0) or 0))
        if auto_decay and sched["name"] == "cosine_decay":
            args[1] = rest  # decay_steps
        elif auto_decay and sched["name"] == "linear_schedule":
            args[2] = rest  # steps
        sched["arguments"] = args
        return sched

    def warn_if_schedule_is_odd(self) -> None:
        """WARNING when the warmup is as long as the run (LR never peaks) or the
        cosine decay ends long before the run does (LR flat at its minimum)."""
        sched = self.resolved_lr_schedule()
        if not sched:
            return
        warmup, steps = int(sched.get("warmup", 0) or 0), self.schedule_steps()
        if warmup >= steps:
            logger.warning(
                "lr_schedule warmup of %d optimizer updates >= the run's %d updates "
                "(iters %d / grad_accumulation_steps %d): the learning rate never reaches its peak %g; "
                "lower the warmup (lr_schedule.warmup counts updates, the seed's warmup_steps iterations)",
                warmup, steps, self.iters, self.grad_accumulation_steps, self.learning_rate,
            )
            return
        args = sched.get("arguments") or []
        ends = (warmup + 1 if warmup else 0) + (args[1] if len(args) > 1 else 0)  # last update above the floor
        if sched.get("name") == "cosine_decay" and len(args) > 1 and ends + 1 < steps:
            # e.g. --iters raised on the command line but explicit decay_steps kept
            logger.warning(
                "lr_schedule: the cosine decay ends after update %d of %d; the last %d updates run at the final "
                "learning rate %g; for a full decay set lr_schedule.arguments[1] to %d (updates - warmup - 2), "
                "or fishtune.lr_schedule_lengths: derived",
                ends, steps, steps - ends, args[2] if len(args) > 2 else 0.0, full_decay_steps(steps, warmup),
            )

    # ---- output
    def project_dict(self) -> dict[str, Any]:
        """The ``fishtune`` section as written into adapter_config.json."""
        p = self.project
        return {
            "template": p.template,
            "system_prompt": p.system_prompt,
            "mask_prompt": p.mask_prompt,
            "base_model": self.base_model,
            "resume": p.resume,
            "lr_schedule_lengths": p.lr_schedule_lengths,
        }

    def to_mlx_dict(self) -> dict[str, Any]:
        """MLX-LM's resolved args (what goes into adapter_config.json).

        Loadable by ``mlx_lm.load(adapter_path=...)`` and usable as
        ``types.SimpleNamespace(**d)`` for ``mlx_lm.lora.run``. MLX-LM's
        ``mask_prompt`` is written as false: our rows are text rows and
        fishtune masks the prompt itself (``fishtune.mask_prompt``).
        """
        d: dict[str, Any] = {}
        for key in MLX_DEFAULTS:
            value = getattr(self, key) if key != "mask_prompt" else False
            if key.endswith("_feature") and value is None:
                continue  # MLX-LM's getattr default applies
            d[key] = copy.deepcopy(value)
        d["lr_schedule"] = self.resolved_lr_schedule()
        if self.fine_tune_type == "full":
            d["lora_parameters"] = None  # as mlx_lm.lora.train_model does
        d[META_KEY] = self.project_dict()
        return d


def _check_lora_parameters(lp: Any, c: _Checker) -> dict[str, Any]:
    if not isinstance(lp, dict):
        raise c.fail("lora_parameters", "a mapping with rank, scale and dropout", lp)
    for key in lp:
        if key == "alpha":
            rank = lp.get("rank")
            hint = f" = {lp['alpha'] / rank:g}" if _is_number(lp["alpha"]) and _is_int(rank) and rank else ""
            raise UserError(
                f"{c.where('lora_parameters')}: lora_parameters.alpha is not an MLX-LM key; "
                f"use scale = alpha / rank{hint} (or the seed's top-level lora_alpha)"
            )
        if key not in LORA_PARAMETER_KEYS:
            raise _unknown_key(c.where("lora_parameters"), f"lora_parameters.{key}", [f"lora_parameters.{k}" for k in LORA_PARAMETER_KEYS])
    for key in ("rank", "scale", "dropout"):
        if key not in lp:
            raise UserError(
                f"{c.where('lora_parameters')}: lora_parameters is missing {key!r}; "
                "MLX-LM needs rank, scale and dropout together (it replaces the whole mapping)"
            )
    out = dict(lp)
    c.int_("lora_parameters.rank", lp["rank"], 1)
    out["scale"] = c.num("lora_parameters.scale", lp["scale"], "a number > 0", lambda v: 0 < v < math.inf)
    out["dropout"] = c.num("lora_parameters.dropout", lp["dropout"], "a number with 0 <= dropout < 1", lambda v: 0 <= v < 1)
    keys = lp.get("keys")
    if keys is not None and (not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys)):
        raise c.fail("lora_parameters.keys", "a non-empty list of module names such as self_attn.q_proj", keys)
    return out


def _check_optimizer_config(oc: Any, optimizer: str, c: _Checker) -> dict[str, dict[str, Any]]:
    if not isinstance(oc, dict):
        raise c.fail("optimizer_config", "a mapping of optimizer name -> options", oc)
    out: dict[str, dict[str, Any]] = {}
    for name, opts in oc.items():
        if name not in OPTIMIZER_KWARGS:
            raise _unknown_key(c.where("optimizer_config"), f"optimizer_config.{name}", [f"optimizer_config.{n}" for n in OPTIMIZERS])
        opts = {} if opts is None else opts
        if not isinstance(opts, dict):
            raise c.fail(f"optimizer_config.{name}", "a mapping of keyword arguments", opts)
        allowed = OPTIMIZER_KWARGS[name]
        for key, v in opts.items():
            path = f"optimizer_config.{name}.{key}"
            if key not in allowed:
                raise _unknown_key(c.where("optimizer_config"), path, [f"optimizer_config.{name}.{k}" for k in allowed])
            if key == "weight_decay":
                c.num(path, v, "a number >= 0", lambda x: 0 <= x < math.inf)
            elif key == "bias_correction":
                c.bool_(path, v)
            elif key == "eps" and name != "adafactor":
                c.num(path, v, "a number > 0", lambda x: 0 < x < 1)
            elif key == "betas":
                if not (isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)):
                    raise c.fail(path, "a list of two numbers in [0, 1)", v)
        out[name] = dict(opts)
    # bias correction on by default for Adam/AdamW (PyTorch/PEFT behaviour).
    if optimizer in ("adam", "adamw"):
        out.setdefault(optimizer, {}).setdefault("bias_correction", True)
    return out


def _check_lr_schedule(s: Any, c: _Checker) -> dict[str, Any]:
    if not isinstance(s, dict):
        raise c.fail("lr_schedule", "a mapping with name, arguments (and optional warmup, warmup_init)", s)
    for key in s:
        if key not in LR_SCHEDULE_KEYS:
            raise _unknown_key(c.where("lr_schedule"), f"lr_schedule.{key}", [f"lr_schedule.{k}" for k in LR_SCHEDULE_KEYS])
    name = s.get("name")
    if name not in SCHEDULES:
        raise c.fail("lr_schedule.name", "one of " + ", ".join(SCHEDULES), name)
    args = s.get("arguments")
    lo, hi = SCHEDULES[name]
    if not isinstance(args, list) or not lo <= len(args) <= hi or not all(_is_number(a) for a in args):
        need = f"a list of {lo}{'-' + str(hi) if hi != lo else ''} numbers for {name} (peak learning rate first)"
        raise c.fail("lr_schedule.arguments", need, args)
    c.num("lr_schedule.arguments[0]", args[0], "a peak learning rate > 0", lambda v: 0 < v < math.inf)
    if name == "cosine_decay":
        c.int_("lr_schedule.arguments[1]", args[1], 1, need="an integer >= 1 (cosine decay_steps, in optimizer updates)")
        if len(args) > 2:
            c.num("lr_schedule.arguments[2]", args[2], "a final learning rate >= 0", lambda v: 0 <= v < math.inf)
    out = dict(s)
    out["arguments"] = list(args)
    if "warmup" in s:
        c.int_("lr_schedule.warmup", s["warmup"], 0, need="an integer >= 0 (optimizer updates)")
    if "warmup_init" in s:
        out["warmup_init"] = c.num("lr_schedule.warmup_init", s["warmup_init"], "a number >= 0", lambda v: 0 <= v < math.inf)
    return out


# ---------------------------------------------------------------- loading
class _YamlLoader(yaml.SafeLoader):
    """SafeLoader + MLX-LM's float resolver, so ``1e-4`` is a float here too."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        """^(?:
     [-+]?(?:[0-9][0-9_]*)\\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\\.[0-9_]*
    |[-+]?\\.(?:inf|Inf|INF)
    |\\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a config file; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass -c/--config with an existing YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}:{line}: YAML syntax error: {exc.problem or exc}; fix the file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: YAML error: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a mapping of key: value lines, got a {_type_name(data)}")
    return data


class _Merger:
    """Applies layers (YAML, then overrides) over the defaults, MLX-LM style:
    a top-level key replaces the lower layer's value as a whole."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = copy.deepcopy(MLX_DEFAULTS)
        self.project: dict[str, Any] = {}
        self.warmup_steps: int | None = None
        self.sources: dict[str, str] = {}

    def apply(self, layer: dict[str, Any], label: str, cli: bool) -> None:
        flat = {}
        known = list(MLX_DEFAULTS) + list(SEED_FLAT_KEYS) + [META_KEY] + (list(PROJECT_KEYS) if cli else [])
        for key, value in layer.items():
            if not isinstance(key, str):
                raise _unknown_key(label, key, known)
            if key == META_KEY:
                self._apply_project(value, label)
            elif cli and key in PROJECT_KEYS:
                self.project[key] = value
                self.sources[f"{META_KEY}.{key}"] = label
            elif key in SEED_FLAT_KEYS:
                flat[key] = value
            elif key in MLX_DEFAULTS:
                if key == "mask_prompt" and value not in (False, None):
                    raise UserError(
                        f"{label}: mask_prompt: {value!r} must be false at the top level: MLX-LM refuses it for "
                        f"text rows (our data); put it under '{META_KEY}:' (fishtune's own masking, default true)"
                    )
                if key == "lora_parameters" and isinstance(value, dict):
                    if cli:  # Python/CLI callers may give just {"rank": 4}: merge, no raw-MLX parity at stake
                        base = self.values.get("lora_parameters")
                        value = {**(base if isinstance(base, dict) else {}), **value}
                self.values[key] = value
                self.sources[key] = label
            elif key in PROJECT_KEYS:
                raise UserError(f"{label}: {key!r} is a project setting; put it under '{META_KEY}:'")
            else:
                raise _unknown_key(label, key, known)
        self._translate_flat(flat, layer, label)

    def _apply_project(self, section: Any, label: str) -> None:
        if section is None:
            return
        if not isinstance(section, dict):
            raise UserError(f"{label}: {META_KEY} must be a mapping of project settings, got {section!r}")
        for key, value in section.items():
            if key not in PROJECT_KEYS:
                raise _unknown_key(label, f"{META_KEY}.{key}", [f"{META_KEY}.{k}" for k in PROJECT_KEYS])
            self.project[key] = value
            self.sources[f"{META_KEY}.{key}"] = label

    def _translate_flat(self, flat: dict[str, Any], layer: dict[str, Any], label: str) -> None:
        c = _Checker({k: label for k in flat})

        def set_nested(parent: str, child: str, value: Any, flat_key: str, note: str = "") -> None:
            current = self.values.get(parent)
            explicit = layer.get(parent)  # the same layer's nested mapping, if it has one
            if isinstance(explicit, dict) and child in explicit and explicit[child] != value:
                raise UserError(
                    f"{label}: {flat_key} and {parent}.{child} disagree ({value!r} vs {explicit[child]!r}); keep one"
                )
            new = copy.deepcopy(current) if isinstance(current, dict) else {}
            new[child] = value
            self.values[parent] = new
            self.sources[parent] = label
            logger.info("%s: seed key %s: %r -> MLX-LM %s.%s: %r%s", label, flat_key, flat[flat_key], parent, child, value, note)

        if "lora_rank" in flat:
            set_nested("lora_parameters", "rank", c.int_("lora_rank", flat["lora_rank"], 1), "lora_rank")
        if "lora_alpha" in flat:
            alpha = c.num("lora_alpha", flat["lora_alpha"], "a number > 0", lambda v: 0 < v < math.inf)
            lp = self.values.get("lora_parameters")
            rank = c.int_("lora_parameters.rank", lp.get("rank") if isinstance(lp, dict) else lp, 1)
            set_nested("lora_parameters", "scale", alpha / rank, "lora_alpha", f" (= alpha {alpha:g} / rank {rank})")
        if "lora_dropout" in flat:
            drop = c.num("lora_dropout", flat["lora_dropout"], "a number with 0 <= dropout < 1", lambda v: 0 <= v < 1)
            set_nested("lora_parameters", "dropout", drop, "lora_dropout")
        if "weight_decay" in flat:
            wd = c.num("weight_decay", flat["weight_decay"], "a number >= 0", lambda v: 0 <= v < math.inf)
            opt = self.values.get("optimizer")
            if opt not in OPTIMIZER_KWARGS or "weight_decay" not in OPTIMIZER_KWARGS[opt]:
                raise UserError(
                    f"{label}: weight_decay: {flat['weight_decay']!r} needs an optimizer with weight decay "
                    f"(adamw, sgd, muon, adafactor), but optimizer is {opt!r}; set optimizer: adamw"
                )
            oc = copy.deepcopy(self.values.get("optimizer_config") or {})
            if not isinstance(oc, dict):
                raise c.fail("optimizer_config", "a mapping of optimizer name -> options", oc)
            oc.setdefault(opt, {})
            if oc[opt] is None:
                oc[opt] = {}
            oc[opt]["weight_decay"] = wd
            self.values["optimizer_config"] = oc
            self.sources["optimizer_config"] = label
            logger.info("%s: seed key weight_decay: %r -> MLX-LM optimizer_config.%s.weight_decay: %r", label, flat["weight_decay"], opt, wd)
        if "gradient_checkpointing" in flat:
            gc = c.bool_("gradient_checkpointing", flat["gradient_checkpointing"])
            self.values["grad_checkpoint"] = gc
            self.sources["grad_checkpoint"] = label
            logger.info("%s: seed key gradient_checkpointing: %r -> MLX-LM grad_checkpoint: %r", label, gc, gc)
        if "warmup_steps" in flat:
            self.warmup_steps = c.int_("warmup_steps", flat["warmup_steps"], 0)
            self.sources["warmup_steps"] = label
            logger.info(
                "%s: seed key warmup_steps: %r (iterations) -> MLX-LM lr_schedule.warmup: "
                "ceil(%r / grad_accumulation_steps) optimizer updates, cosine decay after it",
                label, self.warmup_steps, self.warmup_steps,
            )

    def values_for_dataclass(self) -> dict[str, Any]:
        vals = {k: v for k, v in self.values.items() if k != "mask_prompt"}
        for key, value in list(vals.items()):
            if value is None and MLX_DEFAULTS[key] is not None:
                vals[key] = copy.deepcopy(MLX_DEFAULTS[key])  # YAML `key:` with no value = default, as in MLX-LM
        return vals

    def sync_learning_rate(self) -> None:
        """Keep learning_rate and lr_schedule.arguments[0] (MLX's real peak) equal."""
        sched = self.values.get("lr_schedule")
        if not isinstance(sched, dict) or not isinstance(sched.get("arguments"), list) or not sched["arguments"]:
            return
        peak, lr = sched["arguments"][0], self.values.get("learning_rate")
        if peak == lr or not _is_number(peak) or not _is_number(lr):
            return
        rank = {DEFAULT_SOURCE: 0, CLI_SOURCE: 2}
        lr_src = self.sources.get("learning_rate", DEFAULT_SOURCE)
        sched_src = self.sources.get("lr_schedule", DEFAULT_SOURCE)
        lr_rank, sched_rank = rank.get(lr_src, 1), rank.get(sched_src, 1)
        if lr_rank > sched_rank:
            sched = copy.deepcopy(sched)
            sched["arguments"][0] = lr
            self.values["lr_schedule"] = sched
            logger.info("learning_rate %g from %s replaces lr_schedule.arguments[0] %g (the schedule's peak)", lr, lr_src, peak)
        elif sched_rank > lr_rank:
            self.values["learning_rate"] = float(peak)
            self.sources["learning_rate"] = sched_src
        else:
            raise UserError(
                f"{lr_src}: learning_rate {lr!r} and lr_schedule.arguments[0] {peak!r} disagree; raw mlx_lm "
                "trains with arguments[0] (the schedule's peak), so make them equal"
            )


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Resolve the training config: defaults < YAML ``path`` < ``overrides``.

    ``path`` None -> the built-in defaults only (the command-line scripts
    pass the repository's ``lora_config.yaml`` when ``-c`` is not given, see
    :data:`DEFAULT_CONFIG_PATH`; library calls never read it implicitly). ``overrides`` are command-line values under MLX-LM's snake_case
    names (plus the project keys template, system_prompt, mask_prompt,
    base_model, resume); None values mean "not given" and are skipped.
    """
    merger = _Merger()
    if path is not None:
        label = str(path)
        merger.apply(read_yaml(path), label, cli=False)
        merger.values["config"] = label
    if overrides:
        given = {k: v for k, v in overrides.items() if v is not None}
        if "config" in given:
            given.pop("config")  # the file is `path`; mlx's --config is not a setting
        merger.apply(given, CLI_SOURCE, cli=True)
    merger.sync_learning_rate()
    cfg = TrainConfig(
        **merger.values_for_dataclass(),
        project=ProjectConfig(**merger.project),
        warmup_steps=merger.warmup_steps,
        sources=merger.sources,
    )
    cfg.warn_if_schedule_is_odd()
    return cfg

