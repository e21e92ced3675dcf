"""Training throughput: finetune.py vs raw `python -m mlx_lm lora` vs the PyTorch stack (PEFT DoRA, TRL).

Same Qwen2-shaped random model (bench/work/bench-model, float32), same data
(every row longer than max_seq_length, so every batch is exactly
batch_size x max_seq_length tokens), same DoRA shape (rank 8, scale 2 = alpha
16 / rank 8, dropout 0.05, every linear of every block), AdamW, gradient
checkpointing, same batch size, sequence length and steps. Runs alternate
(ours, raw, torch, ours, raw, torch, ...); the first step of every run is
warm-up (MLX compiles, PyTorch allocates) and is left out of the medians.

Raw `mlx_lm lora` runs as the seed runs it - a plain subprocess that never
imports fishtune, so MLX uses the reference BLAS it bundles on Linux. It is
~20x slower per step, so it runs fewer steps (``--raw-iters``).

The PyTorch contenders train on the same tokens as fishtune (the prompt's
labels masked): ``torch_peft`` (transformers' loss over the full logits),
``torch_peft_gather`` (the same loop, the output layer only at the loss
positions) and ``trl_sft`` (TRL's ``SFTTrainer`` with a PEFT DoRA config and
its default loss, which also skips the masked positions; needs
``bench/requirements.txt``). ``ratios.ours_vs_fastest_torch`` compares ours
with whichever of them is fastest in this run.

Achieved model FLOP/s = 6 x N x tokens/s, N = parameters of every matmul a
token goes through (all block linears + the tied lm_head, 151936 x hidden;
attention score products ignored). With a frozen base there are no weight
gradients (-2N) but gradient checkpointing recomputes the forward (+2N), so
6N is also close to the real work. Compared with this CPU's measured float32
matmul peak (bench/common.matmul_peaks).

    python bench/bench_train.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

from common import (PY, ROOT, WORK, alternate, child_env, load_average, log, matmul_peaks, median, quiet_note,
                    ratio, run_measured, write_result)
from fixtures import build_model, make_data, matmul_params

CONTENDERS = ("ours", "mlx_lm_raw", "torch_peft", "torch_peft_gather", "trl_sft")
TORCH = ("torch_peft", "torch_peft_gather", "trl_sft")
# Raw mlx_lm is ~20x slower per step: first round only.
ONCE = ("mlx_lm_raw",)


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def write_config(path: Path) -> Path:
    """lora_config.yaml with the bench's differences: no LR schedule (constant LR,
    like the PyTorch loop), no gradient accumulation. Both MLX runs read it."""
    cfg = yaml.safe_load((ROOT / "lora_config.yaml").read_text(encoding="utf-8"))
    cfg.pop("lr_schedule", None)
    cfg["grad_accumulation_steps"] = 1
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def mlx_cmd(kind: str, model: Path, data: Path, adapter: Path, cfg: Path, b: int, iters: int, L: int) -> list[str]:
    common_flags = [
        "--model", str(model), "--train", "--data", str(data), "--fine-tune-type", "dora",
        "--batch-size", str(b), "--iters", str(iters), "--learning-rate", "1e-4", "--max-seq-length", str(L),
        "--adapter-path", str(adapter), "--steps-per-report", "1", "--steps-per-eval", "100000",
        "--val-batches", "1", "--save-every", "100000", "--seed", "42", "-c", str(cfg),
    ]
    if kind == "ours":
        return [PY, str(ROOT / "finetune.py"), *common_flags, "--force", "--no-progress"]
    # The seed's `python -m mlx_lm lora`, through a launcher that only adds exact per-step logging.
    return [PY, str(ROOT / "bench" / "raw_mlx_lm_lora.py"), *common_flags]


def parse_ours(adapter: Path) -> list[float]:
    rows = [json.loads(x) for x in (adapter / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [1.0 / r["iterations_per_sec"] for r in rows if r.get("kind") == "train"]


def parse_raw(stdout: str) -> list[float]:
    """Seconds per step from the launcher's `BENCH_STEP <iter> <tokens/s> <trained tokens>` lines
    (steps_per_report 1: step tokens = difference of trained tokens)."""
    import re

    out, prev = [], 0
    for m in re.finditer(r"^BENCH_STEP (\d+) (\S+) (\d+)$", stdout, re.M):
        tps, total = float(m.group(2)), int(m.group(3))
        out.append((total - prev) / tps if tps > 0 else float("nan"))
        prev = total
    return out


def run_one(kind: str, model: Path, data: Path, cfg: Path, b: int, iters: int, L: int, rep: int) -> dict:
    adapter = WORK / f"train-{kind}"
    shutil.rmtree(adapter, ignore_errors=True)
    if kind in TORCH:
        script = "trl_sft_train.py" if kind == "trl_sft" else "torch_peft_train.py"
        cmd = [PY, str(ROOT / "bench" / script), "--model", str(model), "--data", str(data),
               "--batch-size", str(b), "--iters", str(iters), "--max-seq-length", str(L)]
        if kind == "torch_peft_gather":
            cmd += ["--head", "gather"]
        p = run_measured(cmd, env=child_env(), timeout=3600).check()
        res = json.loads(p.stdout.strip().splitlines()[-1])
        steps = res["step_times"]
    elif kind == "ours":
        p = run_measured(mlx_cmd(kind, model, data, adapter, cfg, b, iters, L), env=child_env(), timeout=3600).check()
        steps = parse_ours(adapter)
    else:
        # Plain subprocess: no fishtune import, so no OpenBLAS preload (the seed's command).
        env = child_env(openblas=False)
        env["PYTHONPATH"] = ""
        env["NO_COLOR"] = "1"
        p = run_measured(mlx_cmd(kind, model, data, adapter, cfg, b, iters, L), env=env, timeout=7200).check()
        steps = parse_raw(p.stdout)
    if len(steps) != iters:
        raise RuntimeError(f"{kind}: expected {iters} step times, parsed {len(steps)}:\n{p.stdout[-2000:]}")
    measured = steps[1:] if len(steps) > 1 else steps
    s_step = median(measured)
    log(f"{kind} rep {rep}: {s_step:.2f} s/step (steps {', '.join(f'{x:.2f}' for x in steps)}), "
        f"peak RSS {p.peak_rss_mb:.0f} MB, wall {p.wall_s:.1f} s")
    return {"kind": kind, "repeat": rep, "step_s": steps, "s_per_step": s_step, "peak_rss_mb": p.peak_rss_mb,
            "wall_s": p.wall_s, "load_1min_after": load_average()[0], "command": p.command}


def summarize(runs: list[dict], kinds: list[str], tokens_per_step: int, params: dict, peaks: dict) -> tuple[dict, dict]:
    """Per contender: median s/step over runs (each run's median of its measured steps), and the
    best measured step (least disturbed by other load on a shared machine)."""
    flops_per_token = 6 * params["total"]
    summary = {}
    for kind in kinds:
        rs = [r for r in runs if r["kind"] == kind]
        if not rs:
            continue
        s = median(r["s_per_step"] for r in rs)
        best = min(x for r in rs for x in (r["step_s"][1:] or r["step_s"]))
        tps = tokens_per_step / s if s else None
        summary[kind] = {
            "s_per_step": s,
            "best_s_per_step": best,
            "tokens_per_s": tps,
            "best_tokens_per_s": tokens_per_step / best,
            "peak_rss_mb": median(r["peak_rss_mb"] for r in rs),
            "model_gflops": flops_per_token * tps / 1e9 if tps else None,
            "best_model_gflops": flops_per_token * tokens_per_step / best / 1e9,
            "fraction_of_f32_peak": (flops_per_token * tps / 1e9 / peaks["peak_float32"])
            if tps and peaks.get("peak_float32") else None,
            "runs": len(rs),
            "command": rs[0]["command"],
        }
    ours = summary.get("ours", {})
    ratios: dict = {f"ours_vs_{k}": {"median": ratio(ours.get("tokens_per_s"), v["tokens_per_s"]),
                                     "best": ratio(ours.get("best_tokens_per_s"), v["best_tokens_per_s"])}
                    for k, v in summary.items() if k != "ours"}
    torch_runs = {k: v for k, v in summary.items() if k in TORCH}
    if torch_runs:
        fastest = min(torch_runs, key=lambda k: torch_runs[k]["s_per_step"])
        best = min(torch_runs, key=lambda k: torch_runs[k]["best_s_per_step"])
        ratios["ours_vs_fastest_torch"] = {
            "median": ratio(ours.get("tokens_per_s"), torch_runs[fastest]["tokens_per_s"]),
            "best": ratio(ours.get("best_tokens_per_s"), torch_runs[best]["best_tokens_per_s"]),
            "fastest_by_median": fastest, "fastest_by_best": best,
        }
    return summary, ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small settings (~5 min)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-seq-length", type=int)
    ap.add_argument("--iters", type=int, help="steps for ours and PyTorch (first one is warm-up)")
    ap.add_argument("--raw-iters", type=int, help="steps for raw mlx_lm (first one is warm-up)")
    ap.add_argument("--repeats", type=int, help="alternating runs of ours and PyTorch (default 3; --quick 1)")
    ap.add_argument("--raw-repeats", type=int, help="runs of raw mlx_lm (default 1: ~20x slower per step)")
    ap.add_argument("--only", nargs="*", choices=CONTENDERS, help="contenders (default: all)")
    a = ap.parse_args(argv)
    if not a.only:
        a.only = list(CONTENDERS)
    if "trl_sft" in a.only and not trl_available():
        log("trl is not installed (pip install -r bench/requirements.txt): skipping the trl_sft contender")
        a.only = [c for c in a.only if c != "trl_sft"]
    b = a.batch_size or (1 if a.quick else 2)
    L = a.max_seq_length or (64 if a.quick else 128)
    iters = a.iters or (4 if a.quick else 5)
    raw_iters = a.raw_iters or 2
    repeats = a.repeats or (1 if a.quick else 3)
    raw_repeats = min(a.raw_repeats or 1, repeats)

    load0 = load_average()
    model = build_model(WORK / "bench-model", "bench")
    data = WORK / f"data-{L}"
    data_info = make_data(data, model, L)
    cfg = write_config(WORK / "bench_lora_config.yaml")
    log("measuring matmul peaks")
    peaks = matmul_peaks()
    mcfg = json.loads((model / "config.json").read_text())
    params = matmul_params(mcfg)

    runs = []
    for rep, kind in alternate(a.only, repeats):
        if kind in ONCE and rep >= raw_repeats:
            continue
        n = raw_iters if kind == "mlx_lm_raw" else iters
        runs.append(run_one(kind, model, data, cfg, b, n, L, rep))

    tokens_per_step = b * L
    summary, ratios = summarize(runs, a.only, tokens_per_step, params, peaks)
    load1 = load_average()
    path = write_result("train", {
        "quick": a.quick,
        "settings": {"batch_size": b, "max_seq_length": L, "tokens_per_step": tokens_per_step, "iters": iters,
                     "raw_mlx_lm_iters": raw_iters, "repeats": repeats, "raw_mlx_lm_repeats": raw_repeats, "warmup_steps_excluded": 1,
                     "fine_tune_type": "dora", "rank": 8, "alpha": 16, "dropout": 0.05,
                     "targets": "q,k,v,o,gate,up,down of all 8 blocks", "optimizer": "AdamW lr 1e-4 wd 1e-4",
                     "grad_checkpoint": True, "dtype": "float32",
                     "loss": "answer tokens only (the prompt masked), every contender"},
        "model": {"path": "bench/work/bench-model", **{k: mcfg[k] for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")}, "matmul_params": params},
        "data": data_info,
        "flops_formula": "model FLOP/s = 6 * N * tokens/s, N = block linear params + lm_head (vocab x hidden)",
        "matmul_peak_gflops": peaks,
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
        "load_note": quiet_note(load0, load1),
        "command": "python bench/bench_train.py" + (" --quick" if a.quick else ""),
    })
    log(f"wrote {path}")
    for k, v in summary.items():
        log(f"{k:>11}: {v['s_per_step']:.2f} s/step, {v['tokens_per_s']:.1f} tok/s, "
            f"{v['model_gflops']:.1f} GFLOP/s, peak RSS {v['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
