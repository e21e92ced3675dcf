"""Bench models and data, built locally (no download) into bench/work/ (git-ignored).

* ``bench`` model: Qwen2-shaped (hidden 512, 8 layers, 8 heads, 2 KV heads,
  MLP 1536 - every row length a multiple of 256 so Q4_K_M applies to all
  matrices), real Qwen2 tokenizer and vocabulary (151936 rows, tied), random
  float32 weights with the smoke model's initialisation.
* ``qwen2-1.5b`` / ``qwen2-0.5b`` models: Qwen/Qwen2-1.5B's / -0.5B's exact
  config.json, random weights (bfloat16 as shipped, or float32 for training)
  written tensor by tensor, row block by row block (bounded memory).
* Training data: the project's data/train.jsonl when present (else generated
  fish-care rows), each row lengthened with following answers so that every
  row tokenizes to more than ``min_tokens`` tokens; with max_seq_length =
  min_tokens every batch of every framework is exactly batch x max_seq_length
  tokens, no padding, so "same data, same sequence lengths" holds exactly.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from common import ROOT, WORK, log  # noqa: F401  (common puts the repo on sys.path)

# Qwen/Qwen2-1.5B config.json (https://huggingface.co/Qwen/Qwen2-1.5B/blob/main/config.json)
QWEN2_15B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Qwen/Qwen2-0.5B differs from 1.5B in these keys (https://huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json).
QWEN2_05B_CONFIG: dict[str, Any] = {
    **QWEN2_15B_CONFIG,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_window_layers": 24,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
}

BENCH_DIMS = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}

STAMP = "bench_model.json"


def tensor_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, init kind) of every Qwen2 tensor, tied lm_head."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh
    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (cfg["vocab_size"], h), "embed")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (nh * hd, h), "linear"),
            (p + "self_attn.q_proj.bias", (nh * hd,), "bias"),
            (p + "self_attn.k_proj.weight", (nkv * hd, h), "linear"),
            (p + "self_attn.k_proj.bias", (nkv * hd,), "bias"),
            (p + "self_attn.v_proj.weight", (nkv * hd, h), "linear"),
            (p + "self_attn.v_proj.bias", (nkv * hd,), "bias"),
            (p + "self_attn.o_proj.weight", (h, nh * hd), "linear"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (inter, h), "linear"),
            (p + "mlp.up_proj.weight", (inter, h), "linear"),
            (p + "mlp.down_proj.weight", (h, inter), "linear"),
        ]
    out.append(("model.norm.weight", (h,), "norm"))
    return out


def matmul_params(cfg: dict[str, Any]) -> dict[str, int]:
    """Parameters that take part in matmuls per token: all linears + the (tied) lm_head."""
    layers = sum(int(np.prod(s)) for n, s, k in tensor_shapes(cfg) if k == "linear")
    head = cfg["vocab_size"] * cfg["hidden_size"]
    return {"layers": layers, "lm_head": head, "total": layers + head}


def _blocks(name: str, shape: tuple[int, ...], kind: str, rng: np.random.Generator,
            rows_per_block: int = 8192) -> Iterator[np.ndarray]:
    """float32 values of one tensor, in row blocks (same init as fishtune.smoke_model)."""
    if kind == "norm":
        yield (1.0 + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)).astype(np.float32)
        return
    if kind == "bias":
        yield rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
        return
    std = 0.02 if kind == "embed" else shape[1] ** -0.5
    for r0 in range(0, shape[0], rows_per_block):
        rows = min(rows_per_block, shape[0] - r0)
        yield rng.standard_normal((rows, shape[1]), dtype=np.float32) * np.float32(std)


def _to_bf16_bytes(a: np.ndarray) -> bytes:
    u = a.astype(np.float32).view(np.uint32)
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))  # round to nearest even
    return (u >> np.uint32(16)).astype(np.uint16).tobytes()


def write_safetensors_streaming(path: Path, cfg: dict[str, Any], dtype: str, seed: int = 0) -> int:
    """Write random weights for ``cfg`` without holding more than one row block."""
    shapes = tensor_shapes(cfg)
    esize = {"F32": 4, "BF16": 2}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, _ in sorted(shapes):  # safetensors readers expect no particular order; sort for determinism
        n = int(np.prod(shape)) * esize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(seed)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, kind in sorted(shapes):
            for block in _blocks(name, shape, kind, rng):
                f.write(_to_bf16_bytes(block) if dtype == "BF16" else block.astype("<f4").tobytes())
    os.replace(tmp, path)
    return off


def build_model(out: Path, preset: str = "bench", dtype: str | None = None, seed: int = 0) -> Path:
    """A Qwen2 HF folder (config, weights, tokenizer) in ``out``; reused when already built."""
    from fishtune.fileio import atomic_write_json
    from fishtune.qwen_tokenizer import build_qwen2_tokenizer
    from fishtune.smoke_model import generation_config, smoke_config

    if preset == "bench":
        cfg = smoke_config("k256")
        cfg.update(BENCH_DIMS, max_window_layers=BENCH_DIMS["num_hidden_layers"])
        dtype = dtype or "F32"
    elif preset in ("qwen2-1.5b", "qwen2-0.5b"):
        cfg = dict(QWEN2_15B_CONFIG if preset == "qwen2-1.5b" else QWEN2_05B_CONFIG)
        dtype = dtype or "BF16"
    else:
        raise ValueError(preset)
    cfg["torch_dtype"] = {"F32": "float32", "BF16": "bfloat16"}[dtype]
    if "dtype" in cfg:
        cfg["dtype"] = cfg["torch_dtype"]
    stamp = {"preset": preset, "dtype": dtype, "seed": seed, "config": cfg, "version": 1}
    try:
        if json.loads((out / STAMP).read_text()) == stamp and (out / "model.safetensors").is_file():
            return out
    except (OSError, ValueError):
        pass
    out.mkdir(parents=True, exist_ok=True)
    log(f"building {preset} model ({dtype}) in {out}")
    build_qwen2_tokenizer(out)
    write_safetensors_streaming(out / "model.safetensors", cfg, dtype, seed)
    atomic_write_json(out / "config.json", cfg)
    atomic_write_json(out / "generation_config.json", generation_config())
    atomic_write_json(out / STAMP, stamp)
    return out


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
_FISH_Q = ["金鱼身上出现白点怎么办？", "锦鲤烂鳃病如何治疗？", "新鱼缸需要养水多久？", "孔雀鱼尾巴发白是什么原因？",
           "水温多少度适合养热带鱼？", "鱼缸里的水为什么发绿？", "乌龟和鱼可以一起养吗？", "鱼不吃食怎么办？"]
_FISH_A = ["这很可能是白点病（小瓜虫病）。建议将水温缓慢升高到28到30摄氏度，每天换水三分之一，并按说明使用亚甲基蓝或专用药物，持续一周左右。",
           "烂鳃病多由细菌感染引起，应先隔离病鱼，改善水质，使用黄粉或抗菌药物药浴，同时减少投喂，保持充足溶氧。",
           "新缸一般需要养水一到两周，让硝化细菌建立起来，期间可以加入硝化细菌制剂，并用试剂检测氨氮和亚硝酸盐。",
           "可能是水质恶化引起的烂尾病，需要及时换水，检查过滤系统，必要时用抗菌药物治疗，并避免鱼只互相咬尾。"]


def _source_rows() -> list[dict[str, Any]]:
    p = ROOT / "data" / "train.jsonl"
    rows: list[dict[str, Any]] = []
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("question") and r.get("answer"):
                    rows.append(r)
    if rows:
        return rows
    return [{"question": _FISH_Q[i % len(_FISH_Q)], "answer": _FISH_A[i % len(_FISH_A)], "category": "bench"}
            for i in range(64)]


def make_data(out: Path, tokenizer_dir: Path, min_tokens: int, n_rows: int = 64) -> dict[str, Any]:
    """train/valid/test.jsonl whose every row is longer than ``min_tokens`` tokens (template text)."""
    from transformers import AutoTokenizer

    from fishtune.fileio import atomic_write_jsonl
    from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

    tpl = get_template("alpaca")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    src = _source_rows()
    rows = []
    for i in range(n_rows):
        r = src[i % len(src)]
        answer, j = r["answer"], i + 1
        text = tpl.training_text(r["question"], answer, DEFAULT_SYSTEM_PROMPT)
        while len(tok.encode(text)) <= min_tokens + 8:
            answer += src[j % len(src)]["answer"]
            j += 1
            text = tpl.training_text(r["question"], answer, DEFAULT_SYSTEM_PROMPT)
        rows.append({"text": text, "question": r["question"], "answer": answer,
                     "category": r.get("category", "bench"), "id": f"bench-{i}"})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "train.jsonl", rows)
    atomic_write_jsonl(out / "valid.jsonl", rows[:8])
    atomic_write_jsonl(out / "test.jsonl", rows[:8])
    real = (ROOT / "data" / "train.jsonl").is_file()
    return {"source": "data/train.jsonl (answers concatenated to reach the length)" if real
            else "generated fish-care rows (data/train.jsonl absent)", "rows": n_rows, "min_tokens": min_tokens}


def seed_train_split() -> Path:
    """The train split of the project's data set: data/train.jsonl, else process_data.py's split of it in bench/work/."""
    p = ROOT / "data" / "train.jsonl"
    if p.is_file():
        return p
    from fishtune.data import DataOptions, run_pipeline

    out = WORK / "data-seed"
    run_pipeline(DataOptions(input=ROOT / "data" / "fish_care_dataset.json", output_dir=out, force=True))
    return out / "train.jsonl"


def data_length_stats(max_seq_length: int = 1024) -> dict[str, Any] | None:
    """Token lengths of the project's real train split (for the seed-run estimate)."""
    p = seed_train_split()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(WORK / "bench-model"))
    lens = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            t = json.loads(line).get("text", "")
            lens.append(min(len(tok.encode(t)) + 1, max_seq_length))
    if not lens:
        return None
    return {"rows": len(lens), "mean_tokens": float(np.mean(lens)), "max_tokens": int(max(lens)),
            "file": str(p.relative_to(ROOT))}


if __name__ == "__main__":  # python bench/fixtures.py [bench|qwen2-1.5b]
    preset = sys.argv[1] if len(sys.argv) > 1 else "bench"
    print(build_model(WORK / ("bench-model" if preset == "bench" else "qwen2-1.5b-random"), preset))
