"""Generation: our inference (fishtune.infer.generation) vs `mlx_lm generate` vs llama.cpp (F16, Q4_K_M GGUF).

Same bench model (bench/work/bench-model, float32 MLX weights; the GGUFs are
written from the same folder by fishtune.export.gguf_writer, Q4_K_M by
fishtune.export.llama_cpp.quantize through llama.cpp), same prompt token ids (the project's
alpaca prompt with the system preamble and a fish-care question), greedy.
Each contender runs in its own process (bench/gen_worker.py), alternating,
``--repeats`` times; the tables use the warm call's medians (the cold first
call after loading is kept in the JSON).

    python bench/bench_generate.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import (
    PY,
    ROOT,
    WORK,
    alternate,
    child_env,
    load_average,
    log,
    median,
    quiet_note,
    ratio,
    run_measured,
    write_result,
)
from fixtures import build_model

CONTENDERS = ("ours", "mlx_lm_raw", "llama_cpp_f16", "llama_cpp_q4_k_m")
QUESTION = "我的金鱼身上出现了很多白点，还总在缸壁上蹭身体，水温二十度，应该怎么处理？"


def build_ggufs(model: Path) -> dict[str, Path]:
    """F16 and Q4_K_M GGUFs of the bench model (reused when present)."""
    from fishtune.export.gguf_writer import read_hf_model, write_gguf
    from fishtune.export.llama_cpp import quantize
    from fishtune.project import read_export_meta

    f16, q4 = WORK / "bench-f16.gguf", WORK / "bench-q4_k_m.gguf"
    if not f16.is_file() or f16.stat().st_mtime < (model / "model.safetensors").stat().st_mtime:
        log("writing F16 GGUF")
        write_gguf(read_hf_model(model), read_export_meta(model), f16, "F16", progress=False)
        if q4.exists():
            q4.unlink()
    if not q4.is_file():
        log("quantizing Q4_K_M")
        quantize(f16, q4, "Q4_K_M")
    return {"llama_cpp_f16": f16, "llama_cpp_q4_k_m": q4}


def prompt_ids(model: Path) -> list[int]:
    from transformers import AutoTokenizer

    from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

    tok = AutoTokenizer.from_pretrained(str(model))
    return tok.encode(get_template("alpaca").question_prompt(QUESTION, DEFAULT_SYSTEM_PROMPT))


def run_one(kind: str, target: Path, ids: list[int], max_tokens: int, rep: int) -> dict:
    worker = {"ours": "ours", "mlx_lm_raw": "mlx_raw"}.get(kind, "llama")
    env = child_env(openblas=kind != "mlx_lm_raw")
    if kind == "mlx_lm_raw":
        env["PYTHONPATH"] = ""  # never imports fishtune: MLX's bundled BLAS, as `python -m mlx_lm generate`
    ids_file = WORK / "prompt_ids.json"
    ids_file.parent.mkdir(parents=True, exist_ok=True)
    ids_file.write_text(json.dumps(ids))
    cmd = [PY, str(ROOT / "bench" / "gen_worker.py"), worker, str(target), str(ids_file), str(max_tokens)]
    p = run_measured(cmd, env=env, timeout=1800)
    note = None
    if p.rc == -11 and worker == "llama":
        # llama-cpp-python 0.3.36 segfaults on some Q4_K_M files with its CPU repack buffers; retry without.
        note = "crashed (SIGSEGV) with llama.cpp's default CPU repack buffers; measured with use_extra_bufts=False"
        log(f"{kind}: {note}")
        p = run_measured(cmd + ["--no-extra-bufts"], env=env, timeout=1800)
    p.check()
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if note:
        res["note"] = note
    w = res["warm"]
    log(f"{kind} rep {rep}: TTFT {w['ttft_s'] * 1000:.0f} ms, prompt {w['prompt_tps']:.0f} tok/s, "
        f"gen {w['gen_tps'] or 0:.1f} tok/s ({w['generated_tokens']} tokens), peak RSS {p.peak_rss_mb:.0f} MB")
    return {"kind": kind, "repeat": rep, **res, "peak_rss_mb": p.peak_rss_mb, "wall_s": p.wall_s,
            "command": p.command}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--only", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--model", type=Path, help="another HF Qwen2 folder instead of the bench model (smoke test)")
    a = ap.parse_args(argv)
    max_tokens = a.max_tokens or (32 if a.quick else 128)
    repeats = a.repeats or (1 if a.quick else 3)

    load0 = load_average()
    model = a.model or build_model(WORK / "bench-model", "bench")
    targets: dict[str, Path] = {"ours": model, "mlx_lm_raw": model}
    if any(k.startswith("llama") for k in a.only):
        targets.update(build_ggufs(model))
    ids = prompt_ids(model)

    runs = [run_one(k, targets[k], ids, max_tokens, rep) for rep, k in alternate(a.only, repeats)]
    summary = {}
    for k in a.only:
        rs = [r for r in runs if r["kind"] == k]
        summary[k] = {
            "ttft_ms": 1000 * median(r["warm"]["ttft_s"] for r in rs),
            "prompt_tps": median(r["warm"]["prompt_tps"] for r in rs),
            "gen_tps": median(r["warm"]["gen_tps"] for r in rs),
            "cold_ttft_ms": 1000 * median(r["cold"]["ttft_s"] for r in rs),
            "generated_tokens": median(r["warm"]["generated_tokens"] for r in rs),
            "load_s": median(r["load_s"] for r in rs),
            "peak_rss_mb": median(r["peak_rss_mb"] for r in rs),
            "file_mb": (targets[k].stat().st_size / 2**20) if targets[k].is_file() else
            (targets[k] / "model.safetensors").stat().st_size / 2**20,
            "command": rs[0]["command"],
            "note": rs[0].get("note"),
        }
    o = summary.get("ours", {})
    ratios = {f"ours_vs_{k}": {"gen_tps": ratio(o.get("gen_tps"), v["gen_tps"]),
                               "prompt_tps": ratio(o.get("prompt_tps"), v["prompt_tps"])}
              for k, v in summary.items() if k != "ours"}
    path = write_result("generate", {
        "quick": a.quick,
        "settings": {"prompt_tokens": len(ids), "prompt_ids": ids, "max_tokens": max_tokens, "repeats": repeats, "sampling": "greedy",
                     "question": QUESTION, "template": "alpaca + system prompt"},
        "model": (str(a.model) if a.model else
                  "bench/work/bench-model (hidden 512, 8 layers, vocab 151936, float32); GGUFs from the same folder"),
        "definitions": "TTFT = call -> first streamed token; prompt tok/s = prompt tokens / TTFT; "
                       "generation tok/s = (tokens - 1) / (first -> last token); warm call, median of repeats",
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
        "load_note": quiet_note(load0, load_average()),
        "command": "python bench/bench_generate.py" + (" --quick" if a.quick else ""),
    })
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
