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

Training against the PyTorch stack at both real shapes (``train_comparison``):
random float32 weights with Qwen2-0.5B's and Qwen2-1.5B's configs, batch 1 x
512 tokens, DoRA rank 8 on every linear, gradient checkpointing, the prompt
masked, ``--compare-iters`` steps (the first excluded) for ours and each
PyTorch contender of bench_train.py (PEFT loop, PEFT with the output layer at
the loss positions only, TRL's SFTTrainer): s/step, tokens/s, peak RSS, and
``ratios.ours_vs_fastest_torch`` per shape.

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

COMPARE_PRESETS = ("qwen2-0.5b", "qwen2-1.5b")

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


def compare_one(kind: str, model, data, iters: int) -> dict:
    """One contender's DoRA steps at batch 1 x 512 (each in its own process: its own peak RSS)."""
    from bench_train import TORCH

    if kind == "ours":
        adapter = WORK / "scale-compare-adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        res = stage("train", [model, data, adapter, iters])
        steps = [x["s"] for x in res.get("steps", [])]
        rss, command = res["peak_rss_gib"] * 1024, res["command"]
    else:
        assert kind in TORCH
        script = "trl_sft_train.py" if kind == "trl_sft" else "torch_peft_train.py"
        cmd = [PY, str(ROOT / "bench" / script), "--model", str(model), "--data", str(data), "--batch-size", "1",
               "--iters", str(iters), "--max-seq-length", "512"] + (["--head", "gather"] if kind == "torch_peft_gather" else [])
        log(f"scale: {kind} ...")
        p = run_measured(cmd, env=child_env(), timeout=7200).check()
        steps = json.loads(p.stdout.strip().splitlines()[-1])["step_times"]
        rss, command = p.peak_rss_mb, p.command
        log(f"scale: {kind}: {p.wall_s:.1f} s, peak RSS {rss / 1024:.2f} GiB")
    measured = steps[1:] or steps
    s = sorted(measured)[len(measured) // 2]
    return {"step_s": steps, "s_per_step": s, "best_s_per_step": min(measured), "tokens_per_s": 512 / s,
            "peak_rss_gib": rss / 1024, "command": command}


def train_comparison(preset: str, iters: int) -> dict:
    """Ours vs every PyTorch contender on random float32 weights of ``preset``'s shape."""
    from bench_train import CONTENDERS, TORCH, trl_available

    model = WORK / f"{preset}-random-f32"
    stage("build", [model, "F32", preset])
    data = WORK / "data-512"
    make_data(data, model, 512, n_rows=8)
    (data / "valid.jsonl").unlink(missing_ok=True)
    kinds = [k for k in CONTENDERS if k == "ours" or (k in TORCH and (k != "trl_sft" or trl_available()))]
    runs = {k: compare_one(k, model, data, iters) for k in kinds}
    torch_runs = {k: v for k, v in runs.items() if k in TORCH}
    fastest = min(torch_runs, key=lambda k: torch_runs[k]["s_per_step"])
    ratios = {"ours_vs_fastest_torch": {"median": runs["ours"]["tokens_per_s"] / torch_runs[fastest]["tokens_per_s"],
                                        "best": torch_runs[fastest]["best_s_per_step"] / runs["ours"]["best_s_per_step"],
                                        "fastest": fastest}}
    return {"preset": preset, "batch_size": 1, "max_seq_length": 512, "iters": iters, "summary": runs, "ratios": ratios}


def seed_run_estimate(stages: dict) -> dict:
    """The seed's 40-iteration run on this machine, from the fastest measured 1.5B step, and from published figures."""
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
        "data": lens or "no train split: assumed 512 tokens per row",
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
    return est


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip (the scale bench is full-run only)")
    ap.add_argument("--train-iters", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the ~15 GB of scale files in bench/work/")
    ap.add_argument("--compare-iters", type=int, default=3, help="steps per contender in the training comparison")
    ap.add_argument("--only-compare", action="store_true", help="only the training comparison (0.5B and 1.5B shapes)")
    ap.add_argument("--estimate-only", action="store_true",
                    help="recompute the seed-run estimate of bench/results/scale.json from its measured steps")
    a = ap.parse_args(argv)
    if a.quick:
        log("scale bench skipped under --quick (full run only: python bench/bench_scale.py)")
        return 0

    if a.estimate_only:
        from common import RESULTS

        doc = json.loads((RESULTS / "scale.json").read_text(encoding="utf-8"))
        doc["seed_run_estimate"] = seed_run_estimate(doc["stages"])
        from fishtune.fileio import atomic_write_json

        atomic_write_json(RESULTS / "scale.json", doc)
        log(f"seed-run estimate: {doc['seed_run_estimate']['this_machine_float32_s'] / 60:.1f} min")
        return 0
    load0 = load_average()
    comparison = {p: train_comparison(p, a.compare_iters) for p in COMPARE_PRESETS}
    if not a.keep:
        shutil.rmtree(WORK / "qwen2-0.5b-random-f32", ignore_errors=True)
    if a.only_compare:
        if not a.keep:
            shutil.rmtree(WORK / "qwen2-1.5b-random-f32", ignore_errors=True)
        path = write_result("scale_train", {"comparison": comparison, "load_note": quiet_note(load0, load_average()),
                                            "command": "python bench/bench_scale.py --only-compare"})
        log(f"wrote {path}")
        return 0
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

    est = seed_run_estimate(stages)
    if not a.keep:
        for p in (f32, hf, f16):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    path = write_result("scale", {
        "model": "random weights, Qwen/Qwen2-1.5B config.json (hidden 1536, 28 layers, 12 heads, 2 KV heads, "
                 "MLP 8960, vocab 151936, tied, rope_theta 1e6)",
        "config": QWEN2_15B_CONFIG,
        "matmul_params": matmul_params(QWEN2_15B_CONFIG)["total"],
        "stages": stages,
        "sizes": sizes,
        "seed_run_estimate": est,
        "train_comparison": comparison,
        "notes": ["training step on float32 weights (MLX CPU has no fast bf16 matmul)",
                  "HF export with verify=False", "peak RSS per stage process (os.wait4 ru_maxrss)"],
        "load_note": quiet_note(load0, load_average()),
        "command": "python bench/bench_scale.py",
    })
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
