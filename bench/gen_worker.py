"""One generation contender in its own process (so its peak RSS is its own).

    python bench/gen_worker.py ours   MODEL_DIR PROMPT_IDS_JSON MAX_TOKENS
    python bench/gen_worker.py mlx_raw MODEL_DIR PROMPT_IDS_JSON MAX_TOKENS
    python bench/gen_worker.py llama  GGUF_FILE PROMPT_IDS_JSON MAX_TOKENS [--no-extra-bufts]

* ours: ``fishtune.loading.load_model`` + ``fishtune.generation.stream_generate``
  (fishtune imported first: MLX on OpenBLAS).
* mlx_raw: what ``python -m mlx_lm generate`` runs (``mlx_lm.load`` +
  ``mlx_lm.stream_generate``), never importing fishtune: MLX's bundled BLAS.
* llama: ``llama_cpp.Llama`` (llama.cpp) on a GGUF file, all cores.

Every contender gets the same prompt token ids, greedy decoding, and runs
the generation twice: a cold call (first use after loading) and a warm one.
Time to first token (TTFT) = wall time from the call to the first streamed
token; prompt tok/s = prompt tokens / TTFT; generation tok/s = (generated - 1)
/ (time from the first to the last token). Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time


def _timed(stream, on_token=None) -> dict:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for _ in stream:
        now = time.perf_counter()
        first = first or now
        last = now
        n += 1
    return {"t0": t0, "first": first, "last": last, "events": n}


def main() -> None:
    kind, path, ids_json, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    # PROMPT_IDS_JSON: a JSON list, or a file holding one (bench/work/prompt_ids.json)
    ids = json.loads(open(ids_json).read() if not ids_json.lstrip().startswith("[") else ids_json)
    t_load0 = time.perf_counter()
    calls = []
    if kind in ("ours", "mlx_raw"):
        if kind == "ours":
            import fishtune  # noqa: F401  (OpenBLAS before mlx)
            from fishtune.infer.generation import SamplingConfig, stream_generate
            from fishtune.loading import load_model

            lm = load_model(path, None)
            load_s = time.perf_counter() - t_load0

            def gen():
                counts = {}

                def it():
                    for ch in stream_generate(lm, ids, SamplingConfig(temperature=0.0, max_tokens=max_tokens)):
                        if ch.finish_reason is not None:
                            counts.update(n=ch.generation_tokens, gen_tps=ch.generation_tps, prompt_tps=ch.prompt_tps)
                        yield ch
                return it(), counts
        else:
            import mlx.core as mx
            import mlx_lm
            from mlx_lm.sample_utils import make_sampler

            model, tok = mlx_lm.load(path)
            load_s = time.perf_counter() - t_load0

            def gen():
                counts = {}

                def it():
                    for r in mlx_lm.stream_generate(model, tok, mx.array(ids), max_tokens=max_tokens,
                                                    sampler=make_sampler(temp=0.0)):
                        counts.update(n=r.generation_tokens, gen_tps=r.generation_tps, prompt_tps=r.prompt_tps)
                        yield r
                return it(), counts
        for _ in range(2):
            stream, counts = gen()
            t = _timed(stream)
            calls.append({**t, "generated": counts.get("n", t["events"]), "lib_gen_tps": counts.get("gen_tps"),
                          "lib_prompt_tps": counts.get("prompt_tps")})
    elif kind == "llama":
        import llama_cpp

        if "--no-extra-bufts" in sys.argv:
            # llama.cpp's CPU "extra buffer types" (weight repacking for AVX512/AMX kernels)
            # off, like llama-cli --no-repack: this llama-cpp-python build crashes with them
            # on some Q4_K_M files (see bench/README.md).
            import llama_cpp.llama as _ll

            _orig = llama_cpp.llama_model_default_params

            def _params():
                p = _orig()
                p.use_extra_bufts = False
                return p

            _ll.llama_cpp.llama_model_default_params = _params
        threads = os.cpu_count() or 1
        llm = llama_cpp.Llama(model_path=path, n_ctx=max(512, len(ids) + max_tokens + 16), n_threads=threads,
                              n_threads_batch=threads, n_batch=512, verbose=False, seed=0)
        load_s = time.perf_counter() - t_load0
        for _ in range(2):
            llm.reset()
            stream = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1, stream=True)
            t = _timed(stream)
            calls.append({**t, "generated": min(max_tokens, llm.n_tokens - len(ids) + 1)})  # the last token is sampled, not evaluated
    else:
        raise SystemExit(f"unknown contender {kind}")

    out = []
    for c in calls:
        ttft = c["first"] - c["t0"]
        dec = c["last"] - c["first"]
        n = c["generated"]
        out.append({
            "ttft_s": ttft,
            "prompt_tokens": len(ids),
            "prompt_tps": len(ids) / ttft,
            "generated_tokens": n,
            "gen_tps": (n - 1) / dec if n > 1 and dec > 0 else None,
            "lib_gen_tps": c.get("lib_gen_tps"),
            "lib_prompt_tps": c.get("lib_prompt_tps"),
            "total_s": c["last"] - c["t0"],
        })
    print(json.dumps({"load_s": load_s, "cold": out[0], "warm": out[1]}))


if __name__ == "__main__":
    main()
