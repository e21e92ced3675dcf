"""The PyTorch + PEFT contenders: DoRA on the same model, data, batch and steps, the prompt masked.

A compact training loop (what a user would write with transformers + PEFT):
float32 model, ``LoraConfig(use_dora=True)`` with the project's rank 8,
alpha 16, dropout 0.05 on every linear of every block (MLX-LM's default
target set, num_layers -1), AdamW (lr 1e-4, weight decay 1e-4), gradient
checkpointing on (as lora_config.yaml), batches taken in file order, each
row rendered with the project template, truncated to max_seq_length, and the
loss on the answer tokens only (the prompt's labels are -100), exactly the
tokens fishtune trains on.

``--head full``: transformers' own loss (logits at every position, the masked
ones ignored). ``--head gather``: the hidden states are gathered at the loss
positions first and only those go through the 151936-row output layer (what
fishtune and TRL do). Prints one JSON line with per-step times.

    python bench/torch_peft_train.py --model M --data D --batch-size 4 --iters 6 --max-seq-length 128 [--head gather]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def encode_rows(tok, rows: list[dict], max_len: int) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token) per row, as fishtune builds them (alpaca template)."""
    from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

    tpl = get_template("alpaca")
    out = []
    for r in rows:
        prompt, completion = tpl.split_for_training(
            [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}],
            DEFAULT_SYSTEM_PROMPT)
        ids = tok.encode(prompt + completion)
        out.append((ids[:max_len], len(tok.encode(prompt))))
    return out


def peft_model(path: str, dropout: float, dtype, grad_checkpoint: bool = True):
    """The model with PEFT DoRA on every block linear (and gradient checkpointing, as lora_config.yaml)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, use_dora=True, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    if grad_checkpoint:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it; same behaviour
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def gathered_loss(model, x, mask, labels):
    """Cross-entropy on the loss positions only: hidden states gathered before the output layer."""
    import torch

    base = model.get_base_model()
    hidden = base.model(input_ids=x, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    logits = base.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


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
    ap.add_argument("--head", choices=["full", "gather"], default="full")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()

    t_start = time.perf_counter()
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(a.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = peft_model(a.model, a.lora_dropout, getattr(torch, a.dtype), not a.no_grad_checkpoint)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    rows = [json.loads(x) for x in open(os.path.join(a.data, "train.jsonl"), encoding="utf-8") if x.strip()]
    seqs = encode_rows(tok, rows, a.max_seq_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.learning_rate,
                            weight_decay=1e-4)
    step_times, losses, tokens, loss_tokens = [], [], [], []
    t_load = time.perf_counter() - t_start
    for step in range(a.iters):
        idx = [(step * a.batch_size + i) % len(seqs) for i in range(a.batch_size)]
        width = max(len(seqs[i][0]) for i in idx)
        x = torch.full((a.batch_size, width), pad, dtype=torch.long)
        mask = torch.zeros((a.batch_size, width), dtype=torch.long)
        labels = torch.full((a.batch_size, width), -100, dtype=torch.long)
        for b, i in enumerate(idx):
            ids, start = seqs[i]
            x[b, : len(ids)] = torch.tensor(ids)
            mask[b, : len(ids)] = 1
            labels[b, start : len(ids)] = x[b, start : len(ids)]
        t0 = time.perf_counter()
        if a.head == "gather":
            loss = gathered_loss(model, x, mask, labels)
        else:
            loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        tokens.append(int(mask.sum()))
        loss_tokens.append(int((labels[:, 1:] != -100).sum()))
    import resource

    print(json.dumps({
        "step_times": step_times, "losses": losses, "tokens": tokens, "loss_tokens": loss_tokens,
        "trainable_params": n_train, "load_s": t_load, "threads": torch.get_num_threads(), "head": a.head,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
