"""The PyTorch + PEFT contender: DoRA on the same model, data, batch and steps.

A compact training loop (what a user would write with transformers + PEFT):
float32 model, ``LoraConfig(use_dora=True)`` with the project's rank 8,
alpha 16, dropout 0.05 on every linear of every block (MLX-LM's default
target set, num_layers -1), AdamW (lr 1e-4, weight decay 1e-4), gradient
checkpointing on (as lora_config.yaml), batches taken in file order, each row
truncated to max_seq_length. Prints one JSON line with per-step times.

    python bench/torch_peft_train.py --model M --data D --batch-size 4 --iters 6 --max-seq-length 128
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-grad-checkpoint", action="store_true")
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()

    t_start = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(a.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, a.dtype)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=a.lora_dropout, use_dora=True, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    if not a.no_grad_checkpoint:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it; same behaviour
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    rows = [json.loads(x) for x in open(os.path.join(a.data, "train.jsonl"), encoding="utf-8") if x.strip()]
    eos = tok.eos_token_id
    seqs = []
    for r in rows:
        ids = tok.encode(r["text"])
        if ids[-1] != eos:
            ids.append(eos)
        seqs.append(ids[: a.max_seq_length])

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.learning_rate,
                            weight_decay=1e-4)
    step_times, losses, tokens = [], [], []
    t_load = time.perf_counter() - t_start
    for step in range(a.iters):
        idx = [(step * a.batch_size + i) % len(seqs) for i in range(a.batch_size)]
        width = max(len(seqs[i]) for i in idx)
        x = torch.full((a.batch_size, width), eos, dtype=torch.long)
        mask = torch.zeros((a.batch_size, width), dtype=torch.long)
        for b, i in enumerate(idx):
            x[b, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[b, : len(seqs[i])] = 1
        labels = x.masked_fill(mask == 0, -100)
        t0 = time.perf_counter()
        out = model(input_ids=x, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
        tokens.append(int(mask.sum()))
    import resource

    print(json.dumps({
        "step_times": step_times, "losses": losses, "tokens": tokens, "trainable_params": n_train,
        "load_s": t_load, "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
