#!/usr/bin/env python3
"""`make demo`: the whole pipeline, offline, on the smoke model.

Every stage runs as a user would run it (the top-level scripts), writing under
models/demo/ so nothing of the user's real runs is touched. The smoke model is
untrained and random: the demo proves the pipeline, not the answers.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SMOKE = "models/smoke-tiny"
SMOKE_K = "models/smoke-k256"
OUT = "models/demo"
ADAPTER = "models/demo-adapter"

STEPS: list[tuple[str, list[str]]] = [
    ("data: validate, deduplicate, split", [PY, "process_data.py", "--output-dir", f"{OUT}/data", "--tokenizer", SMOKE, "--force"]),
    ("fine-tune: DoRA on the smoke model (k256 variant)", [
        PY, "finetune.py", "--model", SMOKE_K, "--train", "--data", f"{OUT}/data", "--iters", "40",
        "--batch-size", "2", "--grad-accumulation-steps", "1", "--learning-rate", "1e-3", "--max-seq-length", "384",
        "--steps-per-eval", "20", "--val-batches", "4", "--test-batches", "4", "--steps-per-report", "10",
        "--save-every", "20", "--adapter-path", ADAPTER, "--test", "--force",
    ]),
    ("inference: one question", [PY, "inference.py", "--adapter-path", ADAPTER, "--question", "孔雀鱼多久换一次水？", "--max-tokens", "32", "--temperature", "0"]),
    ("evaluation: base vs fine-tuned on the test split", [
        PY, "inference.py", "--adapter-path", ADAPTER, "--evaluate", f"{OUT}/data/test.jsonl", "--limit", "8",
        "--max-tokens", "32", "--report", f"{OUT}/eval_report.json", "--force",
    ]),
    ("chat: two questions through a pipe", [PY, "inference-chat.py", "--adapter-path", ADAPTER, "--max-tokens", "16", "--temperature", "0"]),
    ("export: fused Hugging Face model + PEFT adapter, verified", [
        PY, "convert_to_huggingface.py", "--adapter-path", ADAPTER, "--output-dir", f"{OUT}/huggingface_model", "--force",
    ]),
    ("GGUF: F16 + Q4_K_M, verified in llama.cpp, Modelfile", [
        PY, "convert_to_gguf.py", "--hf-model-dir", f"{OUT}/huggingface_model", "--output-file",
        f"{OUT}/ollama_model/qwen2-fish.gguf", "--quantize", "Q4_K_M", "--base-model", "smoke-k256", "--force",
    ]),
]
CHAT_INPUT = "孔雀鱼多久换一次水？\n/clear\n金鱼翻肚子怎么办？\n/exit\n"


def main() -> int:
    os.chdir(REPO)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    for i, (title, cmd) in enumerate(STEPS, 1):
        print(f"\n=== [{i}/{len(STEPS)}] {title}\n$ {shlex.join(cmd[1:] if cmd[0] == PY else cmd)}", flush=True)
        stdin = CHAT_INPUT if "inference-chat.py" in cmd else None
        rc = subprocess.run(cmd, env=env, input=stdin, text=True).returncode
        if rc != 0:
            print(f"\ndemo stopped: step {i} ({title}) exited with {rc}", file=sys.stderr)
            return rc
    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs under {OUT}/ and {ADAPTER}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
