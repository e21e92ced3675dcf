"""The TRL contender: ``trl.SFTTrainer`` with a PEFT DoRA config and its default loss.

What a user of the Hugging Face stack would pick: a prompt/completion data set
(the same rows, rendered with the project template, so TRL trains on the
completion only), ``peft.LoraConfig(use_dora=True)`` rank 8, alpha 16, dropout
0.05 on every block linear, AdamW (lr 1e-4, weight decay 1e-4, constant),
gradient checkpointing, float32 on the CPU, ``max_length`` = max_seq_length,
no packing. TRL's default loss (``loss_type="nll"``; ``chunked_nll`` is its
deprecated alias) asks the model for the log-probabilities at the labelled
positions only (``fused_lm_head``), so the output layer skips the prompt.
Step times come from a ``TrainerCallback`` (``on_step_begin`` ->
``on_step_end``). Prints one JSON line.

Needs ``trl`` (bench-only: ``pip install -r bench/requirements.txt``).

    python bench/trl_sft_train.py --model M --data D --batch-size 2 --iters 5 --max-seq-length 128
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from torch_peft_train import peft_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    a = ap.parse_args()

    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

    torch.set_num_threads(os.cpu_count() or 1)
    tpl = get_template("alpaca")
    rows = [json.loads(x) for x in open(os.path.join(a.data, "train.jsonl"), encoding="utf-8") if x.strip()]
    pairs = [tpl.split_for_training([{"role": "user", "content": r["question"]},
                                     {"role": "assistant", "content": r["answer"]}], DEFAULT_SYSTEM_PROMPT)
             for r in rows]
    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    tok = AutoTokenizer.from_pretrained(a.model)
    model = peft_model(a.model, a.lora_dropout, torch.float32)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            output_dir=out, per_device_train_batch_size=a.batch_size, max_steps=a.iters,
            learning_rate=a.learning_rate, weight_decay=1e-4, lr_scheduler_type="constant", warmup_steps=0,
            gradient_checkpointing=False,  # already on in the PEFT model, as in torch_peft_train.py
            max_length=a.max_seq_length, packing=False, logging_strategy="no", save_strategy="no",
            report_to="none", use_cpu=True, bf16=False, fp16=False, seed=a.seed, dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                             callbacks=[StepTimer()])
        t_load = time.perf_counter() - t_start
        trainer.train()
    import resource

    print(json.dumps({
        "step_times": times, "load_s": t_load, "threads": torch.get_num_threads(),
        "loss_type": cfg.loss_type, "completion_only_loss": cfg.completion_only_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
