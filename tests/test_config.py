"""fishtune.train.config: lora_config.yaml in MLX-LM's schema, precedence, validation."""
from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest

from fishtune.project import read_project_meta
from fishtune.train.config import DEFAULT_CONFIG_PATH, MLX_DEFAULTS, TrainConfig, load_config
from fishtune.errors import UserError
from fishtune.template import DEFAULT_SYSTEM_PROMPT

REPO = Path(__file__).resolve().parent.parent


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


# ---------------------------------------------------------------- shipped file
def test_shipped_lora_config_loads_with_the_seed_values():
    assert DEFAULT_CONFIG_PATH == REPO / "lora_config.yaml"
    cfg = load_config(DEFAULT_CONFIG_PATH)  # what the scripts read when -c is not given
    assert cfg.config == str(DEFAULT_CONFIG_PATH)
    assert cfg.model == "Qwen/Qwen2-1.5B"
    assert cfg.fine_tune_type == "dora"
    assert cfg.lora_parameters == {"rank": 8, "scale": 2.0, "dropout": 0.05}  # alpha 16 / rank 8
    assert cfg.num_layers == -1
    assert cfg.optimizer == "adamw"
    assert cfg.optimizer_config["adamw"] == {"weight_decay": 0.0001, "bias_correction": True}
    assert cfg.weight_decay == 0.0001 and cfg.bias_correction is True
    assert cfg.grad_checkpoint is True
    # the seed command's values, so finetune.py without flags == the seed run
    assert (cfg.batch_size, cfg.iters, cfg.learning_rate, cfg.max_seq_length) == (4, 40, 1e-4, 1024)
    assert (cfg.grad_accumulation_steps, cfg.seed, cfg.save_every) == (2, 42, 100)
    assert (cfg.steps_per_eval, cfg.steps_per_report, cfg.adapter_path, cfg.data) == (50, 10, "lora_qwen2_1.5b", "data")
    assert cfg.schedule_steps() == 20
    sched = cfg.resolved_lr_schedule()
    assert sched == {"name": "cosine_decay", "warmup": 2, "warmup_init": 1e-5, "arguments": [1e-4, 16, 1e-5]}
    assert sched["warmup"] < cfg.schedule_steps()
    # project section
    assert cfg.template == "alpaca" and cfg.mask_prompt is True
    assert cfg.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert cfg.base_model == "Qwen/Qwen2-1.5B"


def test_shipped_yaml_is_safe_for_raw_mlx_lm():
    """mask_prompt must not be on for MLX-LM (text rows); every key is MLX-LM's or `fishtune`."""
    import yaml

    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    assert raw.get("mask_prompt") in (None, False)
    assert set(raw) - {"fishtune"} <= set(MLX_DEFAULTS)
    assert "train" not in raw and "test" not in raw  # a -c with --test alone must not retrain


def test_defaults_mirror_mlx_lm_config_defaults():
    """Keys absent from the YAML mean the same to raw MLX-LM and to fishtune."""
    import fishtune  # noqa: F401  (OpenBLAS before mlx)
    from mlx_lm.lora import CONFIG_DEFAULTS

    project_choices = {"model", "fine_tune_type", "data", "adapter_path"}
    for key, value in CONFIG_DEFAULTS.items():
        if key not in project_choices:
            assert MLX_DEFAULTS[key] == value, key
    assert set(CONFIG_DEFAULTS) <= set(MLX_DEFAULTS)


def test_no_file_gives_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path, ""))
    assert cfg.iters == MLX_DEFAULTS["iters"] and cfg.num_layers == 16
    assert cfg.lora_parameters == {"rank": 8, "dropout": 0.0, "scale": 20.0}
    assert cfg.optimizer == "adam" and cfg.bias_correction is True  # on by default (PyTorch/PEFT)
    assert cfg.resolved_lr_schedule() is None
    assert cfg.template == "alpaca" and cfg.mask_prompt is True


# ---------------------------------------------------------------- precedence
def test_precedence_defaults_yaml_cli(tmp_path):
    p = write_yaml(
        tmp_path,
        """
        batch_size: 2
        iters: 30
        seed: 7
        fishtune:
          template: chatml
        """,
    )
    cfg = load_config(p, {"iters": 12, "seed": None, "batch_size": None, "learning_rate": 3e-4, "template": None})
    assert cfg.batch_size == 2  # YAML over default, CLI None ignored
    assert cfg.iters == 12  # CLI over YAML
    assert cfg.seed == 7  # None = flag not given
    assert cfg.learning_rate == 3e-4  # CLI over default
    assert cfg.steps_per_eval == MLX_DEFAULTS["steps_per_eval"]  # default
    assert cfg.template == "chatml"
    assert load_config(p, {"template": "alpaca", "mask_prompt": False}).project.mask_prompt is False


def test_library_calls_never_read_the_repository_yaml_implicitly():
    # Only the scripts fall back to lora_config.yaml; load_config(None) is the built-in defaults.
    cfg = load_config(None)
    assert cfg.config is None and cfg.iters == MLX_DEFAULTS["iters"] and cfg.lr_schedule is None


def test_override_lora_parameters_merge_into_the_yaml_ones():
    cfg = load_config(DEFAULT_CONFIG_PATH, {"lora_parameters": {"rank": 4}})
    assert cfg.lora_parameters == {"rank": 4, "scale": 2.0, "dropout": 0.05}


def test_cli_learning_rate_becomes_the_schedule_peak(caplog):
    with caplog.at_level(logging.INFO, logger="fishtune.train.config"):
        cfg = load_config(DEFAULT_CONFIG_PATH, {"learning_rate": 2e-4})
    assert cfg.resolved_lr_schedule()["arguments"][0] == 2e-4
    assert cfg.to_mlx_dict()["lr_schedule"]["arguments"][0] == 2e-4
    assert "replaces lr_schedule.arguments[0]" in caplog.text


def test_schedule_peak_sets_learning_rate_when_only_the_schedule_is_given(tmp_path):
    p = write_yaml(tmp_path, "lr_schedule: {name: cosine_decay, arguments: [3.0e-4, 100]}\n")
    assert load_config(p).learning_rate == 3e-4  # what raw MLX-LM would train with


def test_schedule_counts_optimizer_updates():
    cfg = load_config(DEFAULT_CONFIG_PATH, {"iters": 41, "grad_accumulation_steps": 4})
    assert cfg.schedule_steps() == 10  # MLX-LM updates at iterations 4, 8, ..., 40


def test_to_mlx_dict_is_mlx_schema_with_project_section():
    cfg = load_config(DEFAULT_CONFIG_PATH, {"model": "models/x", "adapter_path": "out"})
    d = cfg.to_mlx_dict()
    assert d["mask_prompt"] is False  # MLX-LM's; fishtune masks itself
    assert d["fishtune"] == {
        "template": "alpaca",
        "system_prompt": DEFAULT_SYSTEM_PROMPT,
        "mask_prompt": True,
        "base_model": "models/x",
        "resume": False,
        "lr_schedule_lengths": "derived",
    }
    assert d["model"] == "models/x" and d["adapter_path"] == "out"
    json.dumps(d)  # serialisable for adapter_config.json
    again = TrainConfig(**{k: v for k, v in d.items() if k not in ("fishtune", "mask_prompt")})
    assert again.lora_parameters == cfg.lora_parameters


def test_adapter_config_from_raw_mlx_without_base_model_uses_model(tmp_path):
    """The seed's raw command copies the YAML's fishtune section (no base_model)."""
    (tmp_path / "adapters.safetensors").write_bytes(b"")
    cfg = {"model": "models/smoke-tiny", "fishtune": {"template": "alpaca", "system_prompt": "", "mask_prompt": True}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert read_project_meta(tmp_path).base_model == "models/smoke-tiny"


# ---------------------------------------------------------------- seed's flat names
def test_seed_flat_names_are_translated(tmp_path, caplog):
    p = write_yaml(
        tmp_path,
        """
        lora_rank: 8
        lora_alpha: 16
        lora_dropout: 0.05
        warmup_steps: 4
        weight_decay: 0.0001
        optimizer: adamw
        gradient_checkpointing: true
        """,
    )
    with caplog.at_level(logging.INFO, logger="fishtune.train.config"):
        cfg = load_config(p, {"iters": 40, "grad_accumulation_steps": 2, "learning_rate": 1e-4})
    assert cfg.lora_parameters == {"rank": 8, "scale": 2.0, "dropout": 0.05}
    assert cfg.optimizer_config["adamw"] == {"weight_decay": 0.0001, "bias_correction": True}
    assert cfg.grad_checkpoint is True
    # 4 iterations / 2 per update = 2 warmup updates, cosine to the floor at the last of 20 updates (20 - 2 - 2)
    assert cfg.resolved_lr_schedule() == {
        "name": "cosine_decay", "warmup": 2, "warmup_init": 0.0, "arguments": [1e-4, 16, 0.0],
    }
    for name in ("lora_rank", "lora_alpha", "lora_dropout", "warmup_steps", "weight_decay", "gradient_checkpointing"):
        assert f"seed key {name}" in caplog.text
    assert "(= alpha 16 / rank 8)" in caplog.text
    assert "warmup_steps" not in cfg.to_mlx_dict()


def test_flat_alpha_uses_the_flat_rank(tmp_path):
    p = write_yaml(tmp_path, "lora_rank: 16\nlora_alpha: 32\n")
    assert load_config(p).lora_parameters["scale"] == 2.0


def test_flat_and_nested_disagree(tmp_path):
    p = write_yaml(tmp_path, "lora_parameters: {rank: 8, scale: 2.0, dropout: 0.0}\nlora_rank: 16\n")
    with pytest.raises(UserError, match=r"lora_rank and lora_parameters.rank disagree \(16 vs 8\)"):
        load_config(p)


def test_flat_weight_decay_needs_an_optimizer_with_it(tmp_path):
    p = write_yaml(tmp_path, "optimizer: adam\nweight_decay: 0.01\n")
    with pytest.raises(UserError, match=r"weight_decay: 0.01 needs an optimizer with weight decay.*set optimizer: adamw"):
        load_config(p)


# ---------------------------------------------------------------- warnings
def test_warmup_longer_than_the_run_warns(tmp_path, caplog):
    p = write_yaml(tmp_path, "warmup_steps: 100\n")  # the seed's value
    with caplog.at_level(logging.WARNING, logger="fishtune.train.config"):
        cfg = load_config(p, {"iters": 40, "grad_accumulation_steps": 2})
    assert cfg.resolved_lr_schedule()["warmup"] == 50
    assert "never reaches its peak" in caplog.text
    assert "50 optimizer updates >= the run's 20 updates" in caplog.text


def test_sane_warmup_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="fishtune.train.config"):
        load_config(DEFAULT_CONFIG_PATH)
    assert caplog.records == []


def test_decay_shorter_than_the_run_warns(tmp_path, caplog):
    # Explicit lengths (no fishtune.lr_schedule_lengths: derived): honoured as written, with a warning.
    text = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8").replace("lr_schedule_lengths: derived", "")
    p = write_yaml(tmp_path, text)
    with caplog.at_level(logging.WARNING, logger="fishtune.train.config"):
        load_config(p, {"iters": 400})  # the YAML's decay_steps 16 was written for 20 updates
    assert "the cosine decay ends after update 19 of 200; the last 181 updates run at the final learning rate" in caplog.text
    assert "set lr_schedule.arguments[1] to 196" in caplog.text


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "text, pattern",
    [
        ("batchsize: 4\n", r"cfg.yaml: unknown key 'batchsize'; did you mean 'batch_size'\?"),
        ("fishtune:\n  templte: alpaca\n", r"unknown key 'fishtune.templte'; did you mean 'fishtune.template'\?"),
        ("lora_parameters: {rank: 8, scale: 2.0, dropout: 0.0, rnak: 4}\n",
         r"unknown key 'lora_parameters.rnak'; did you mean 'lora_parameters.rank'\?"),
        ("optimizer: adamw\noptimizer_config: {adamw: {weight_decy: 0.1}}\n",
         r"unknown key 'optimizer_config.adamw.weight_decy'; did you mean 'optimizer_config.adamw.weight_decay'\?"),
        ("optimizer_config: {adamx: {}}\n", r"unknown key 'optimizer_config.adamx'; did you mean 'optimizer_config.adam'\?"),
        ("lr_schedule: {name: cosine_decay, arguments: [1.0e-4, 10], warmpu: 2}\n",
         r"unknown key 'lr_schedule.warmpu'; did you mean 'lr_schedule.warmup'\?"),
    ],
)
def test_unknown_keys_name_the_closest_known_key(tmp_path, text, pattern):
    with pytest.raises(UserError, match=pattern):
        load_config(write_yaml(tmp_path, text))


def test_unknown_override_key():
    with pytest.raises(UserError, match=r"command line: unknown key 'batchsize'; did you mean 'batch_size'\?"):
        load_config(DEFAULT_CONFIG_PATH, {"batchsize": 2})


def test_project_key_at_top_level_of_yaml(tmp_path):
    with pytest.raises(UserError, match=r"'template' is a project setting; put it under 'fishtune:'"):
        load_config(write_yaml(tmp_path, "template: chatml\n"))


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("lora_parameters: {rank: 0, scale: 2.0, dropout: 0.0}\n", r"lora_parameters.rank must be an integer >= 1, got 0"),
        ("lora_parameters: {rank: 8, scale: 2.0, dropout: 1.0}\n",
         r"lora_parameters.dropout must be a number with 0 <= dropout < 1, got 1.0"),
        ("lora_parameters: {rank: 8, scale: 0, dropout: 0.0}\n", r"lora_parameters.scale must be a number > 0, got 0"),
        ("batch_size: 0\n", r"cfg.yaml: batch_size must be an integer >= 1, got 0"),
        ("iters: 0\n", r"iters must be an integer >= 1, got 0"),
        ("iters: abc\n", r"iters must be an integer >= 1, got 'abc'"),
        ("iters: 2.5\n", r"iters must be an integer >= 1, got 2.5"),
        ("learning_rate: 0\n", r"learning_rate must be a number > 0, got 0"),
        ("learning_rate: fast\n", r"learning_rate must be a number > 0, got 'fast'"),
        ("fine_tune_type: qlora\n", r"fine_tune_type must be one of lora, dora, full, got 'qlora'"),
        ("optimizer: rmsprop\n", r"optimizer must be one of adam, adamw, muon, sgd, adafactor, got 'rmsprop'"),
        ("num_layers: 0\n", r"num_layers must be -1 \(all layers\) or an integer >= 1, got 0"),
        ("num_layers: -2\n", r"num_layers must be -1 \(all layers\) or an integer >= 1, got -2"),
        ("max_seq_length: 8\n", r"max_seq_length must be an integer >= 16, got 8"),
        ("grad_accumulation_steps: 0\n", r"grad_accumulation_steps must be an integer >= 1, got 0"),
        ("grad_checkpoint: yes please\n", r"grad_checkpoint must be true or false, got 'yes please'"),
        ("seed: -1\n", r"seed must be an integer >= 0, got -1"),
        ("val_batches: 0\n", r"val_batches must be -1 \(whole set\) or an integer >= 1, got 0"),
        ("iters: 1\ngrad_accumulation_steps: 2\n", r"iters 1 < grad_accumulation_steps 2: the optimizer would never update"),
        ("optimizer: adamw\noptimizer_config: {adamw: {weight_decay: -1}}\n",
         r"optimizer_config.adamw.weight_decay must be a number >= 0, got -1"),
        ("optimizer: adamw\noptimizer_config: {adamw: {bias_correction: 1}}\n",
         r"optimizer_config.adamw.bias_correction must be true or false, got 1"),
        ("lr_schedule: {name: cosine_decay, arguments: [1.0e-4, 0]}\n",
         r"lr_schedule.arguments\[1\] must be an integer >= 1 \(cosine decay_steps, in optimizer updates\), got 0"),
        ("lr_schedule: {name: warmup_cosine, arguments: [1.0e-4, 10]}\n",
         r"lr_schedule.name must be one of cosine_decay, linear_schedule, exponential_decay, step_decay, got 'warmup_cosine'"),
        ("lr_schedule: {name: cosine_decay, arguments: [1.0e-4]}\n",
         r"lr_schedule.arguments must be a list of 2-3 numbers for cosine_decay"),
        ("lr_schedule: {name: cosine_decay, arguments: [1.0e-4, 10], warmup: -1}\n",
         r"lr_schedule.warmup must be an integer >= 0 \(optimizer updates\), got -1"),
        ("warmup_steps: -5\n", r"warmup_steps must be an integer >= 0, got -5"),
        ("lora_rank: 0\n", r"lora_rank must be an integer >= 1, got 0"),
        ("lora_dropout: 1.5\n", r"lora_dropout must be a number with 0 <= dropout < 1, got 1.5"),
        ("gradient_checkpointing: maybe\n", r"gradient_checkpointing must be true or false, got 'maybe'"),
        ("fishtune:\n  template: vicuna\n", r"fishtune.template: unknown template 'vicuna'; choose one of: alpaca, chatml"),
        ("fishtune:\n  mask_prompt: sometimes\n", r"fishtune.mask_prompt must be true or false, got 'sometimes'"),
        ("fishtune:\n  system_prompt: 3\n", r"fishtune.system_prompt must be a string \(\"\" for none\), got 3"),
        ("fishtune: [1, 2]\n", r"fishtune must be a mapping of project settings"),
        ("- a\n- b\n", r"must hold a mapping of key: value lines, got a list"),
    ],
)
def test_bad_values_name_value_and_allowed_range(tmp_path, text, pattern):
    with pytest.raises(UserError, match=pattern):
        load_config(write_yaml(tmp_path, text))


def test_cli_bad_value_names_the_command_line():
    with pytest.raises(UserError, match=r"^command line: batch_size must be an integer >= 1, got 0$"):
        load_config(DEFAULT_CONFIG_PATH, {"batch_size": 0})


def test_mlx_mask_prompt_true_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"mask_prompt: True must be false at the top level.*put it under 'fishtune:'"):
        load_config(write_yaml(tmp_path, "mask_prompt: true\n"))


def test_lora_alpha_inside_lora_parameters(tmp_path):
    p = write_yaml(tmp_path, "lora_parameters: {rank: 8, alpha: 16, dropout: 0.0}\n")
    with pytest.raises(UserError, match=r"lora_parameters.alpha is not an MLX-LM key; use scale = alpha / rank = 2"):
        load_config(p)


def test_incomplete_lora_parameters(tmp_path):
    p = write_yaml(tmp_path, "lora_parameters: {rank: 16}\n")
    with pytest.raises(UserError, match=r"lora_parameters is missing 'scale'; MLX-LM needs rank, scale and dropout"):
        load_config(p)


def test_learning_rate_and_schedule_peak_disagree_in_one_file(tmp_path):
    p = write_yaml(tmp_path, "learning_rate: 2.0e-4\nlr_schedule: {name: cosine_decay, arguments: [1.0e-4, 10]}\n")
    with pytest.raises(UserError, match=r"learning_rate 0.0002 and lr_schedule.arguments\[0\] 0.0001 disagree"):
        load_config(p)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write_yaml(tmp_path, "iters: 10\nlora_parameters: {rank: 8\nseed: 1\n")
    with pytest.raises(UserError, match=r"cfg.yaml: line 3, column \d+: YAML syntax error"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match=r"config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_scientific_notation_parses_like_mlx_lm(tmp_path):
    # plain PyYAML reads 1e-4 as a string; MLX-LM's loader (and ours) as a float
    assert load_config(write_yaml(tmp_path, "learning_rate: 1e-4\n")).learning_rate == 1e-4
