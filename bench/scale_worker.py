"""One stage of the Qwen2-1.5B-scale bench, in its own process (own peak RSS).

    python bench/scale_worker.py build  OUT_DIR DTYPE            # random Qwen2-1.5B weights, streamed
    python bench/scale_worker.py build  OUT DTYPE [PRESET]         # random weights (qwen2-1.5b, qwen2-0.5b)
    python bench/scale_worker.py train  MODEL DATA ADAPTER ITERS  # DoRA, batch 1, 512 tokens, fishtune.train.trainer
    python bench/scale_worker.py export MODEL ADAPTER OUT         # fishtune.export.hf (verify off)
    python bench/scale_worker.py gguf   HF_DIR OUT.gguf           # fishtune.export.gguf_writer F16
    python bench/scale_worker.py quant  F16.gguf OUT.gguf         # fishtune.export.llama_cpp.quantize Q4_K_M
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (repo on sys.path)

import fishtune  # noqa: E402,F401  (OpenBLAS before mlx)


def main() -> None:
    what, args = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    out: dict = {}
    if what == "build":
        from fixtures import build_model

        build_model(Path(args[0]), args[2] if len(args) > 2 else "qwen2-1.5b", dtype=args[1])
    elif what == "train":
        from fishtune.train.config import DEFAULT_CONFIG_PATH
        from fishtune.train.trainer import train_adapter

        model, data, adapter, iters = args[0], args[1], args[2], int(args[3])
        # The shipped lora_config.yaml (all blocks, rank 8, alpha 16, dropout 0.05, AdamW), as a user runs it.
        train_adapter(model, data, adapter, "dora", iters=iters, config=DEFAULT_CONFIG_PATH, batch_size=1, max_seq_length=512,
                      grad_checkpoint=True, steps_per_report=1, steps_per_eval=10**6, val_batches=1,
                      save_every=10**6, learning_rate=1e-4)
        rows = [json.loads(x) for x in (Path(adapter) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        out["steps"] = [{"s": 1 / r["iterations_per_sec"], "tokens": r["trained_tokens"],
                         "mlx_peak_gb": r["peak_memory_gb"]} for r in rows if r.get("kind") == "train"]
    elif what == "export":
        from fishtune.export.hf import export_huggingface

        r = export_huggingface(args[0], args[1], args[2], force=True, verify=False)
        out["dtype"] = r.dtype
    elif what == "gguf":
        from fishtune.export.gguf_writer import read_hf_model, write_gguf
        from fishtune.project import read_export_meta

        r = write_gguf(read_hf_model(args[0]), read_export_meta(args[0]), args[1], "F16", progress=False)
        out["bytes"] = r.nbytes
    elif what == "quant":
        from fishtune.export.llama_cpp import quantize

        quantize(args[0], args[1], "Q4_K_M")
    else:
        raise SystemExit(f"unknown stage {what}")
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
