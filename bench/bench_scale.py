"""Scale: a random model with Qwen/Qwen2-1.5B's exact config.json, every stage timed.

Full run only (about 10-15 minutes here; ``--quick`` skips it). Stages, each
in its own process (bench/scale_worker.py) so its peak RSS is its own:

1. build: random bfloat16 weights (as Qwen2-1.5B ships), written streaming;
   plus a float32 copy for training (see 2).
2. train: one DoRA step (batch 1, 512 tokens, all 28 blocks, rank 8,
   gradient checkpointing) through fishtune.train.trainer; ``--train-iters`` steps,
   the first includes MLX's compilation. On float32 weights: MLX's CPU
   backend has no fast bfloat16 matmul (measured ~25x slower than float32 on
   OpenBLAS, see train.json's matmul_peak_gflops), so a bf16 step would take
   tens of minutes.
3. export: fishtune.export.hf.export_huggingface on the bf16 base + the
   adapter (verify=False: the verification loads a second, torch copy).
4. gguf: fishtune.export.gguf_writer F16; 5. quant: Q4_K_M through llama.cpp;
6. llama.cpp generation on the Q4_K_M file (bench/gen_worker.py).

Then estimates the seed's 40-iteration run (batch 4, grad accumulation 2,
max_seq_length 1024, the real data's lengths) from the measured step.

    python bench/bench_scale.py
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys

from common import (
    PY,
    ROOT,
    WORK,
    child_env,
    load_average,
    log,
    quiet_note,
    run_measured,
    write_result,
)
from fixtures import QWEN2_15B_CONFIG, data_length_stats, make_data, matmul_params

# Published MLX-LM LoRA training speeds (mlx-examples lora/README.md):
PUBLISHED = [
    {"machine": "Apple M2 Ultra", "model": "Llama 7B (LoRA, 16 layers)", "tokens_per_s": 475,
     "source": "https://github.com/ml-explore/mlx-examples/blob/main/lora/README.md"},
    {"machine": "Apple M1 Max 32 GB", "model": "Mistral 7B (LoRA, batch 1, 4 layers)", "tokens_per_s": 250,
     "source": "https://github.com/ml-explore/mlx-examples/blob/main/lora/README.md"},
]
SEVEN_B_PARAMS = 6.7e9  # Llama/Mistral 7B matmul parameters (approx.)


def stage(name: str, args: list[str], timeout: float = 3600) -> dict:
    cmd = [PY, str(ROOT / "bench" / "scale_worker.py"), name, *map(str, args)]
    log(f"scale: {name} ...")
    p = run_measured(cmd, env=child_env(), timeout=timeout).check()
    res = json.loads(p.stdout.strip().splitlines()[-1])
    log(f"scale: {name}: {p.wall_s:.1f} s, peak RSS {p.peak_rss_mb / 1024:.2f} GiB")
    return {"wall_s": p.wall_s, "peak_rss_gib": p.peak_rss_mb / 1024, "command": p.command, **res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip (the scale bench is full-run only)")
    ap.add_argument("--train-iters", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the ~15 GB of scale files in bench/work/")
    a = ap.parse_args(argv)
    if a.quick:
        log("scale bench skipped under --quick (full run only: python bench/bench_scale.py)")
        return 0

    load0 = load_average()
    bf16, f32 = WORK / "qwen2-1.5b-random", WORK / "qwen2-1.5b-random-f32"
    adapter, hf = WORK / "scale-adapter", WORK / "scale-hf"
    f16, q4 = WORK / "scale-f16.gguf", WORK / "scale-q4_k_m.gguf"
    data = WORK / "data-512"
    stages: dict[str, dict] = {}
    stages["build_bf16"] = stage("build", [bf16, "BF16"])
    stages["build_f32"] = stage("build", [f32, "F32"])
    make_data(data, bf16, 512, n_rows=8)
    (data / "valid.jsonl").unlink()  # no validation passes around the timed step (each costs a forward)
    shutil.rmtree(adapter, ignore_errors=True)
    stages["train"] = stage("train", [f32, data, adapter, a.train_iters])
    stages["export"] = stage("export", [bf16, adapter, hf])
    stages["gguf_f16"] = stage("gguf", [hf, f16])
    stages["quantize_q4_k_m"] = stage("quant", [f16, q4])

    from bench_generate import prompt_ids, run_one

    gen = run_one("llama_cpp_q4_k_m", q4, prompt_ids(bf16), a.gen_tokens, 0)
    stages["llama_cpp_q4_k_m_generate"] = {
        "ttft_ms": gen["warm"]["ttft_s"] * 1000, "prompt_tps": gen["warm"]["prompt_tps"],
        "gen_tps": gen["warm"]["gen_tps"], "peak_rss_gib": gen["peak_rss_mb"] / 1024, "command": gen["command"],
        "note": gen.get("note")}
    sizes = {"bf16_safetensors_gb": (bf16 / "model.safetensors").stat().st_size / 1e9,
             "f16_gguf_gb": f16.stat().st_size / 1e9, "q4_k_m_gguf_gb": q4.stat().st_size / 1e9}

    # ---- the seed run's estimate -------------------------------------------
    steps = stages["train"].get("steps", [])
    # The fastest measured step: the one least disturbed by other load (each is 512 tokens).
    best_s = min((x["s"] for x in steps), default=None)
    tok_s = 512 / best_s if best_s else None
    lens = data_length_stats(1024)
    mean_len = lens["mean_tokens"] if lens else 512.0
    seed_tokens = 40 * 4 * mean_len
    params = matmul_params(QWEN2_15B_CONFIG)["total"]
    est = {
        "seed_run": "40 iterations x batch 4 (grad accumulation 2 = 20 updates), max_seq_length 1024",
        "data": lens or "data/train.jsonl absent: assumed 512 tokens per row",
        "tokens": seed_tokens,
        "this_machine_float32_s": seed_tokens / tok_s if tok_s else None,
        "this_machine_tokens_per_s": tok_s,
        "this_machine_note": "float32 weights, MLX on OpenBLAS, tokens/s of the fastest measured 512-token step; "
                             "padding to the batch's longest row adds more",
        "published": [],
    }
    for p in PUBLISHED:
        # FLOP-proportional extrapolation from the 7B figure to 1.5B (same tokens, ~6.7B/1.54B fewer FLOPs).
        scaled = p["tokens_per_s"] * SEVEN_B_PARAMS / params
        est["published"].append({**p, "qwen2_1.5b_tokens_per_s_estimate": scaled,
                                 "seed_run_s_estimate": seed_tokens / scaled})
    est["extrapolation"] = "published 7B tokens/s x (6.7e9 / 1.54e9 matmul parameters); an estimate, not a measurement"
    if not a.keep:
        for p in (f32, hf, f16):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    path = write_result("scale", {
        "model": "random weights, Qwen/Qwen2-1.5B config.json (hidden 1536, 28 layers, 12 heads, 2 KV heads, "
                 "MLP 8960, vocab 151936, tied, rope_theta 1e6)",
        "config": QWEN2_15B_CONFIG,
        "matmul_params": params,
        "stages": stages,
        "sizes": sizes,
        "seed_run_estimate": est,
        "notes": ["training step on float32 weights (MLX CPU has no fast bf16 matmul)",
                  "HF export with verify=False", "peak RSS per stage process (os.wait4 ru_maxrss)"],
        "load_note": quiet_note(load0, load_average()),
        "command": "python bench/bench_scale.py",
    })
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
