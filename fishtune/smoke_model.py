"""A tiny random Qwen2 checkpoint with the real Qwen2 tokenizer, built offline.

Tests and demos can't download Qwen/Qwen2-1.5B, so every stage runs against
this stand-in: a Hugging Face ``Qwen2ForCausalLM`` folder (config.json,
model.safetensors, generation_config.json, tokenizer files) whose layout,
tensor names, vocabulary and special tokens are exactly Qwen2's, but with
few, small layers and deterministic random weights.

Sizes:

* ``tiny``: hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 128 — fast tests.
* ``k256``: hidden 256, MLP 512 — every matrix row length is a multiple of
  256, which llama.cpp's K-quants (Q4_K_M) require.

CLI::

    python -m fishtune.smoke_model --output models/smoke-tiny --size tiny
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from fishtune.errors import UserError, run_cli, setup_logging
from fishtune.fileio import atomic_path, atomic_write_json, replace_dir

logger = logging.getLogger(__name__)

# Bump whenever the produced files change, so ensure_smoke_model rebuilds.
BUILDER_VERSION = 1
STAMP_FILE = "fishtune_smoke.json"

VOCAB_SIZE = 151936  # Qwen2's embedding rows (151646 used tokens + padding)
BOS_EOS_ID = 151643  # <|endoftext|>

# RoPE base: deliberately NOT MLX-LM's qwen2 default (1e6, also Qwen2-1.5B's
# value). If any consumer ignored config.json's rope_theta it would silently
# fall back to 1e6 and its logits would no longer match transformers'; with
# 10000.0 the cross-framework logits test and the args check both catch that.
ROPE_THETA = 10000.0

SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "k256": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}

MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _check_size(size: str) -> dict[str, int]:
    if size not in SIZES:
        raise UserError(f"smoke model size {size!r} is unknown; use one of: {', '.join(SIZES)}")
    return SIZES[size]


def smoke_config(size: str = "tiny") -> dict:
    """config.json of the smoke model (Qwen2-1.5B's keys, small dimensions)."""
    dims = _check_size(size)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_EOS_ID,
        "eos_token_id": BOS_EOS_ID,
        "hidden_act": "silu",
        **dims,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": dims["num_hidden_layers"],
        "model_type": "qwen2",
        "rms_norm_eps": 1e-06,
        # Both spellings: transformers 5 reads rope_parameters, MLX-LM and
        # llama.cpp read the top-level rope_theta (MLX-LM silently defaults
        # to 1e6 without it).
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def generation_config() -> dict:
    """generation_config.json as Qwen/Qwen2-1.5B ships it."""
    return {"bos_token_id": BOS_EOS_ID, "do_sample": False, "eos_token_id": BOS_EOS_ID, "max_new_tokens": 2048}


def smoke_weights(size: str = "tiny", seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic float32 weights named exactly as HF Qwen2 (tied lm_head).

    Linear weights use std 1/sqrt(fan_in) so attention (and thus RoPE) really
    shapes the output; embeddings use std 0.02 as Qwen2's initializer_range.
    Norm weights are 1 + noise and the q/k/v biases are noise, so a consumer
    that drops a bias or a norm weight produces visibly different logits.
    """
    dims = _check_size(size)
    h, inter = dims["hidden_size"], dims["intermediate_size"]
    n_heads, n_kv = dims["num_attention_heads"], dims["num_key_value_heads"]
    head_dim = h // n_heads
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def linear(out_f: int, in_f: int) -> np.ndarray:
        return normal((out_f, in_f), in_f**-0.5)

    def norm(n: int) -> np.ndarray:
        return (1.0 + normal((n,), 0.1)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((VOCAB_SIZE, h), 0.02)}
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = linear(n_heads * head_dim, h)
        w[p + "self_attn.q_proj.bias"] = normal((n_heads * head_dim,), 0.1)
        w[p + "self_attn.k_proj.weight"] = linear(n_kv * head_dim, h)
        w[p + "self_attn.k_proj.bias"] = normal((n_kv * head_dim,), 0.1)
        w[p + "self_attn.v_proj.weight"] = linear(n_kv * head_dim, h)
        w[p + "self_attn.v_proj.bias"] = normal((n_kv * head_dim,), 0.1)
        w[p + "self_attn.o_proj.weight"] = linear(h, n_heads * head_dim)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = linear(inter, h)
        w[p + "mlp.up_proj.weight"] = linear(inter, h)
        w[p + "mlp.down_proj.weight"] = linear(h, inter)
    w["model.norm.weight"] = norm(h)
    return w


def _stamp(size: str, seed: int) -> dict:
    return {"builder_version": BUILDER_VERSION, "size": size, "seed": seed}


def build_smoke_model(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Write the smoke model folder into ``out_dir`` (created; files overwritten)."""
    from safetensors.numpy import save_file

    from fishtune.qwen_tokenizer import build_qwen2_tokenizer

    _check_size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("building smoke model %s (size=%s, seed=%d)", out, size, seed)
    build_qwen2_tokenizer(out)
    weights = smoke_weights(size, seed)
    # safetensors sorts tensors by name, so the bytes depend only on the weights.
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / "config.json", smoke_config(size))
    atomic_write_json(out / "generation_config.json", generation_config())
    atomic_write_json(out / STAMP_FILE, _stamp(size, seed))
    for f in out.iterdir():
        os.chmod(f, 0o644)  # atomic writes create private temp files; models are shared read-only
    return out


def is_current(out_dir: str | os.PathLike, size: str, seed: int = 0) -> bool:
    """True when ``out_dir`` holds a complete smoke model from this builder."""
    out = Path(out_dir)
    try:
        stamp = json.loads((out / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp == _stamp(size, seed) and all((out / f).is_file() for f in MODEL_FILES)


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    # Several test sessions may ask for the same model at once; build once.
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_smoke_model(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Return ``out_dir``, (re)building it only when missing or stale."""
    _check_size(size)
    out = Path(out_dir)
    if not force and is_current(out, size, seed):
        return out
    with _build_lock(out):
        if not force and is_current(out, size, seed):
            return out  # another process built it while we waited
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
        try:
            build_smoke_model(tmp, size, seed)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            replace_dir(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    logger.info("smoke model ready: %s", out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fishtune.smoke_model",
        description="Build a tiny random Qwen2 checkpoint (real Qwen2 tokenizer) for offline tests and demos.",
    )
    p.add_argument("--output", required=True, help="folder to write, e.g. models/smoke-tiny")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny (fast tests) or k256 (GGUF K-quants)")
    p.add_argument("--seed", type=int, default=0, help="weight RNG seed (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date model or other files are there")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    out = Path(args.output)
    if not args.force and is_current(out, args.size, args.seed):
        logger.info("%s is already an up-to-date %s smoke model (seed %d); nothing to do", out, args.size, args.seed)
        return 0
    if not args.force and out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(
            f"output {out} already exists and is not an up-to-date {args.size} smoke model (seed {args.seed}); "
            "pass --force to overwrite it"
        )
    ensure_smoke_model(out, args.size, args.seed, force=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main)())
