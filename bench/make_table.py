"""Regenerate the results section of bench/README.md from bench/results/*.json.

Everything between the ``<!-- results:begin -->`` and ``<!-- results:end -->``
markers is replaced; the rest of the README is left as written.

    python bench/make_table.py
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("FISHTUNE_BENCH_RESULTS") or BENCH / "results")
README = BENCH / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

NAMES = {
    "ours": "fishtune `finetune.py` (MLX + OpenBLAS)",
    "mlx_lm_raw": "raw `python -m mlx_lm lora` (MLX bundled BLAS)",
    "torch_peft": "PyTorch + PEFT (`use_dora=True`), transformers' loss (full logits)",
    "torch_peft_gather": "PyTorch + PEFT, output layer at the loss positions only",
    "trl_sft": "TRL `SFTTrainer` + PEFT DoRA, default loss",
}
GEN_NAMES = {
    "ours": "fishtune (`fishtune.infer.generation`, MLX + OpenBLAS)",
    "mlx_lm_raw": "`mlx_lm generate` code path (MLX bundled BLAS)",
    "llama_cpp_f16": "llama.cpp, F16 GGUF",
    "llama_cpp_q4_k_m": "llama.cpp, Q4_K_M GGUF",
}


def f(x, nd: int = 1, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, float)):
        return f"{x:,.{nd}f}{unit}"
    return str(x)


def load(name: str) -> dict | None:
    p = Path(RESULTS) / f"{name}.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def machine_section(doc: dict) -> list[str]:
    m = doc["machine"]
    v = m["versions"]
    return [
        f"- CPU: {m['cpu']}, {m['cores']} cores ({', '.join(m.get('cpu_flags', []))}), {m.get('memory_gib')} GiB RAM, {m['os']}",
        f"- BLAS: numpy {m['blas']['numpy']}; fishtune's MLX: {m['blas']['mlx_ours']}; raw mlx_lm: {m['blas']['mlx_raw']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]


def train_section(doc: dict) -> list[str]:
    s = doc["settings"]
    mdl = doc["model"]
    out = [f"### Training throughput ({doc['date']}{', --quick' if doc.get('quick') else ''})", "",
           f"`{doc['command']}` - {doc['load_note']}.", "",
           f"Model: Qwen2-shaped, hidden {mdl['hidden_size']}, {mdl['num_hidden_layers']} layers, "
           f"{mdl['num_attention_heads']} heads / {mdl['num_key_value_heads']} KV heads, MLP {mdl['intermediate_size']}, "
           f"vocab {mdl['vocab_size']} (tied), float32, random weights, real Qwen2 tokenizer. "
           f"DoRA rank {s['rank']}, alpha {s['alpha']}, dropout {s['dropout']}, {s['targets']}; {s['optimizer']}; "
           f"gradient checkpointing; batch {s['batch_size']} x {s['max_seq_length']} tokens (every row is longer, "
           f"so no padding); {s['iters']} steps ({s['raw_mlx_lm_iters']} for raw mlx_lm), first step excluded, "
           f"median over {s['repeats']} alternating run(s) ({s.get('raw_mlx_lm_repeats', s['repeats'])} for raw mlx_lm); "
           f"loss: {s.get('loss', 'see the bench')}. Data: {doc['data']['source']}.", "",
           "| Contender | s/step (median) | tokens/s (median) | best step (s) | tokens/s (best step) | "
           "model GFLOP/s (best step) | % of f32 matmul peak (best) | peak RSS (MB) | ours / it (median; best) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ours = doc["summary"].get("ours", {})
    peak = doc["matmul_peak_gflops"].get("peak_float32")
    for k, v in doc["summary"].items():
        best_s = v.get("best_s_per_step", v["s_per_step"])
        best_tps = v.get("best_tokens_per_s", v["tokens_per_s"])
        best_gf = v.get("best_model_gflops", v["model_gflops"])
        if k == "ours":
            rel = "1.00x"
        else:
            r1 = ours.get("tokens_per_s") / v["tokens_per_s"] if ours.get("tokens_per_s") and v["tokens_per_s"] else None
            r2 = (ours.get("best_tokens_per_s", ours.get("tokens_per_s")) / best_tps) if best_tps else None
            rel = f"{f(r1, 2)}x; {f(r2, 2)}x"
        pct = best_gf / peak * 100 if best_gf and peak else None
        out.append(f"| {NAMES.get(k, k)} | {f(v['s_per_step'], 2)} | {f(v['tokens_per_s'])} | {f(best_s, 2)} | "
                   f"{f(best_tps)} | {f(best_gf)} | {f(pct)}% | {f(v['peak_rss_mb'], 0)} | {rel} |")
    fastest = doc["ratios"].get("ours_vs_fastest_torch")
    if fastest:
        out += ["", f"**Ours vs the fastest PyTorch contender** ({NAMES.get(fastest['fastest_by_median'], '')}): "
                    f"{f(fastest['median'], 2)}x by median s/step, {f(fastest['best'], 2)}x by best step "
                    f"(`ratios.ours_vs_fastest_torch`)."]
    pk = doc["matmul_peak_gflops"]
    out += ["", f"FLOP/s: {doc['flops_formula']} = {doc['model']['matmul_params']['total'] / 1e6:.1f} M "
                f"({doc['model']['matmul_params']['lm_head'] / 1e6:.1f} M of it the tied lm_head).",
            "Measured 1024x1024 matmul GFLOP/s on this CPU: " + ", ".join(f"{k} {val}" for k, val in pk.items()) + ".",
            "", "Commands (per run):", ""]
    for k, v in doc["summary"].items():
        out.append(f"- {NAMES.get(k, k)}: `{v['command']}`")
    return out


def gen_section(doc: dict) -> list[str]:
    s = doc["settings"]
    out = [f"### Generation ({doc['date']}{', --quick' if doc.get('quick') else ''})", "",
           f"`{doc['command']}` - {doc['load_note']}.", "",
           f"{doc['model']}. Prompt: {s['prompt_tokens']} tokens ({s['template']}), {s['max_tokens']} new tokens, "
           f"greedy, median of {s['repeats']} run(s). {doc['definitions']}.", "",
           "| Contender | TTFT (ms) | prompt tok/s | generation tok/s | cold TTFT (ms) | peak RSS (MB) | weights (MB) | ours vs it (gen) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in doc["summary"].items():
        r = doc["ratios"].get(f"ours_vs_{k}", {}).get("gen_tps")
        out.append(f"| {GEN_NAMES.get(k, k)} | {f(v['ttft_ms'], 0)} | {f(v['prompt_tps'])} | {f(v['gen_tps'])} | "
                   f"{f(v['cold_ttft_ms'], 0)} | {f(v['peak_rss_mb'], 0)} | {f(v['file_mb'], 0)} | "
                   f"{'1.00x' if k == 'ours' else (f'{r:.2f}x' if r else 'n/a')} |")
    notes = [f"- {GEN_NAMES.get(k, k)}: {v['note']}" for k, v in doc["summary"].items() if v.get("note")]
    if notes:
        out += ["", "Notes:", ""] + notes
    out += ["", "Commands:", ""] + [f"- `{v['command']}`" for v in doc["summary"].values()]
    return out


def serve_section(doc: dict) -> list[str]:
    s = doc["settings"]
    out = [f"### Serving ({doc['date']}{', --quick' if doc.get('quick') else ''})", "",
           f"`{doc['command']}` - {doc['load_note']}.", "",
           f"Server: `{doc['server_command']}` ({s['backend']}); {s['endpoint']}, {s['sampling']}, "
           f"max_tokens {s['max_tokens']}; server peak RSS {f(doc.get('server_peak_rss_mb'), 0)} MB.", ""]
    other = {lv["clients"]: lv for lv in (doc.get("mlx_lm_server") or {}).get("levels", [])}
    out += ["| clients | requests | generated tok/s | TTFT p50 / p95 (s) | latency p50 / p95 (s) | errors | "
            "mlx_lm.server tok/s | mlx_lm.server latency p50 / p95 (s) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in doc["levels"]:
        o = other.get(lv["clients"], {})
        out.append(f"| {lv['clients']} | {lv['completed']}/{lv['requests']} | {f(lv['gen_tokens_per_s'])} | "
                   f"{f(lv.get('ttft_p50_s'), 2)} / {f(lv.get('ttft_p95_s'), 2)} | "
                   f"{f(lv['latency_p50_s'], 2)} / {f(lv['latency_p95_s'], 2)} | {lv['errors']} | "
                   f"{f(o.get('gen_tokens_per_s'))} | {f(o.get('latency_p50_s'), 2)} / {f(o.get('latency_p95_s'), 2)} |")
    r = doc.get("ratios", {})
    out += ["", f"`ratios.clients16_vs_1` = {f(r.get('clients16_vs_1'), 2)}, "
                f"`ratios.ours_vs_mlx_lm_server_16` = {f(r.get('ours_vs_mlx_lm_server_16'), 2)}."]
    if doc.get("mlx_lm_server"):
        out.append(f"mlx_lm.server: `{doc['mlx_lm_server']['command']}`.")
    return out


def train_comparison_section(comparison: dict) -> list[str]:
    out = ["", "Training against the PyTorch stack at the real shapes (random float32 weights, batch 1 x 512 tokens, "
               "DoRA rank 8 on every linear, the prompt masked, first step excluded):", "",
           "| shape | contender | s/step | tokens/s | peak RSS (GiB) | ours / it |", "|---|---|---:|---:|---:|---:|"]
    for preset, c in comparison.items():
        ours = c["summary"]["ours"]
        for k, v in c["summary"].items():
            rel = "1.00x" if k == "ours" else f"{ours['tokens_per_s'] / v['tokens_per_s']:.2f}x"
            out.append(f"| {preset} | {NAMES.get(k, k)} | {f(v['s_per_step'], 1)} | {f(v['tokens_per_s'], 1)} | "
                       f"{f(v['peak_rss_gib'], 2)} | {rel} |")
        r = c["ratios"]["ours_vs_fastest_torch"]
        out.append(f"| {preset} | **ours vs the fastest PyTorch contender ({NAMES.get(r['fastest'], r['fastest'])})** | | | | "
                   f"**{f(r['median'], 2)}x** |")
    return out


def scale_section(doc: dict) -> list[str]:
    st = doc["stages"]
    out = [f"### Qwen2-1.5B scale ({doc['date']})", "", f"`{doc['command']}` - {doc['load_note']}.", "",
           f"{doc['model']}; {doc['matmul_params'] / 1e9:.2f} B matmul parameters. " + "; ".join(doc["notes"]) + ".", "",
           "| Stage | wall (s) | peak RSS (GiB) | detail |", "|---|---:|---:|---|"]
    detail = {
        "build_bf16": f"{doc['sizes']['bf16_safetensors_gb']:.2f} GB bf16 safetensors, streamed",
        "build_f32": "float32 copy for the training step",
        "export": "fishtune.export.hf, bf16 out, verify off",
        "gguf_f16": f"{doc['sizes']['f16_gguf_gb']:.2f} GB",
        "quantize_q4_k_m": f"{doc['sizes']['q4_k_m_gguf_gb']:.2f} GB",
    }
    for k, v in st.items():
        if k == "train":
            steps = ", ".join(f"{x['s']:.1f} s" for x in v.get("steps", []))
            d = f"DoRA, batch 1 x 512 tokens, steps: {steps} (first includes compilation)"
        elif k == "llama_cpp_q4_k_m_generate":
            d = (f"TTFT {f(v['ttft_ms'], 0)} ms, prompt {f(v['prompt_tps'])} tok/s, generation {f(v['gen_tps'])} tok/s"
                 + (f"; {v['note']}" if v.get("note") else ""))
            out.append(f"| {k} | | {f(v['peak_rss_gib'], 2)} | {d} |")
            continue
        else:
            d = detail.get(k, "")
            if k.startswith("build") and v["wall_s"] < 5:
                d += " (already built by an earlier run: reused, so not timed here)"
        out.append(f"| {k} | {f(v['wall_s'])} | {f(v['peak_rss_gib'], 2)} | {d} |")
    e = doc["seed_run_estimate"]
    data = e["data"] if isinstance(e["data"], str) else f"{e['data']['rows']} rows, mean {e['data']['mean_tokens']:.0f} tokens"
    out += ["", f"Seed run estimate ({e['seed_run']}; data: {data}; {e['tokens']:,.0f} tokens):", "",
            f"- this machine, float32 weights: {f(e.get('this_machine_tokens_per_s'), 2)} tok/s -> "
            f"{f((e['this_machine_float32_s'] or 0) / 60)} min ({e['this_machine_note']})"]
    tr = load("train")
    pk = (tr or {}).get("matmul_peak_gflops", {})
    if pk.get("mlx_openblas_float32") and pk.get("mlx_openblas_bfloat16"):
        slow = pk["mlx_openblas_float32"] / pk["mlx_openblas_bfloat16"]
        out.append(f"- this machine, the checkpoint's own bfloat16 weights: MLX's CPU bf16 matmul measured "
                   f"{pk['mlx_openblas_bfloat16']} vs {pk['mlx_openblas_float32']} GFLOP/s float32 (train.json), "
                   f"so ~{slow:.0f}x longer unless the weights are cast to float32 for training")
    for p in e["published"]:
        out.append(f"- {p['machine']}: published {p['tokens_per_s']} tok/s on {p['model']} ({p['source']}) -> "
                   f"~{p['qwen2_1.5b_tokens_per_s_estimate']:.0f} tok/s at 1.5B -> ~{p['seed_run_s_estimate'] / 60:.1f} min")
    out += [f"- ({e['extrapolation']})"]
    if doc.get("train_comparison"):
        out += train_comparison_section(doc["train_comparison"])
    return out


def render() -> str:
    parts: list[str] = []
    docs = {n: load(n) for n in ("train", "generate", "serve", "scale")}
    first = next((d for d in docs.values() if d), None)
    if first is None:
        return "No results yet: run `make bench` (or `python bench/run_all.py --quick`)."
    parts += ["### Machine", ""] + machine_section(first) + [""]
    for name, fn in (("train", train_section), ("generate", gen_section), ("serve", serve_section),
                     ("scale", scale_section)):
        if docs[name]:
            parts += fn(docs[name]) + [""]
        else:
            parts += [f"### {name}", "", f"not measured yet (`python bench/bench_{name if name != 'generate' else 'generate'}.py`)", ""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON (default: bench/results)")
    ap.add_argument("--readme", type=Path, default=None,
                    help="markdown file to update (default: bench/README.md; README.md in --results when that "
                         "is not bench/results)")
    a = ap.parse_args(argv)
    RESULTS = a.results
    default_results = Path(a.results).resolve() == (BENCH / "results").resolve()
    readme = a.readme or (README if default_results else Path(a.results) / "README.md")
    text = readme.read_text(encoding="utf-8") if readme.is_file() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + render() + END + tail, encoding="utf-8")
    print(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
