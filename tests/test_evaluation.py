"""fishtune.infer.evaluation: character ROUGE-L / BLEU-4, scores, perplexity of references."""
from __future__ import annotations

import math

import pytest

from fishtune.infer.evaluation import (
    answer_nll,
    bleu4,
    format_table,
    lcs_length,
    perplexity,
    rouge_l_f1,
    score_predictions,
)

import mlx.core as mx  # noqa: E402  (after fishtune: OpenBLAS first)


def test_lcs_and_rouge_l():
    assert lcs_length("abcbdab", "bdcaba") == 4
    assert rouge_l_f1("换水一周一次", "换水一周一次") == 1.0
    assert rouge_l_f1("白点病", "烂鳍") == 0.0
    assert rouge_l_f1("", "烂鳍") == 0.0
    # LCS 3 of 4 and 4: P = R = 0.75.
    assert rouge_l_f1("盐浴升温", "盐浴加温") == pytest.approx(0.75)
    # Whitespace does not count.
    assert rouge_l_f1("换 水\n一周", "换水一周") == 1.0
    # P = 2/2, R = 2/4 -> F1 = 2/3.
    assert rouge_l_f1("换水", "每周换水") == pytest.approx(2 / 3)


def test_bleu4_on_characters():
    assert bleu4("每周换水三分之一", "每周换水三分之一") == pytest.approx(1.0)
    assert bleu4("完全无关", "每周换水") == 0.0
    assert bleu4("", "每周换水") == 0.0
    partial = bleu4("每周换水一次", "每周换水三分之一")
    assert 0 < partial < 1
    # A shorter candidate pays the brevity penalty.
    assert bleu4("每周换水", "每周换水三分之一") < bleu4("每周换水三分之一", "每周换水三分之一")
    # Hand-computed: p1 = 4/4; p2..p4 smoothed (3+1)/(3+1), (2+1)/(2+1), (1+1)/(1+1) = 1; BP = exp(1 - 8/4).
    assert bleu4("每周换水", "每周换水三分之一") == pytest.approx(math.exp(1 - 2))


def test_score_predictions_and_table():
    preds = [
        {"answer": "每周换水", "prediction": "每周换水", "finish_reason": "stop", "tokens_per_s": 10.0},
        {"answer": "盐浴", "prediction": "升温", "finish_reason": "length", "tokens_per_s": 20.0},
    ]
    s = score_predictions("finetuned", "m", "a", preds, ppl=3.5)
    assert s.rouge_l_f1 == pytest.approx(0.5) and s.exact_stop_rate == 0.5
    assert s.mean_answer_chars == 3.0 and s.mean_reference_chars == 3.0 and s.tokens_per_s == 15.0
    d = s.to_dict()
    assert d["perplexity"] == 3.5 and d["rows"] == 2 and d["adapter"] == "a"
    base = score_predictions("base", "m", None, preds[:1], ppl=float("nan"))
    assert base.to_dict()["perplexity"] is None
    table = format_table([base, s])
    assert "base" in table and "finetuned" in table and "n/a" in table and "50.0%" in table


def test_reference_perplexity_counts_answer_tokens_only(smoke_model_dir):
    import mlx.nn as nn

    from fishtune.loading import load_model

    lm = load_model(str(smoke_model_dir), None)
    q, a, system = "孔雀鱼多久换一次水？", "每周换水一次。", "你是助手。"
    nll, n = answer_nll(lm, q, a, system)
    prompt, completion = lm.template.split_for_training(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}], system)
    assert n == len(lm.tokenizer.encode(completion))  # answer + end token, not the prompt

    # The same number computed by hand from the full sequence's logits.
    ids = lm.tokenizer.encode(prompt + completion)
    logits = lm.model(mx.array([ids[:-1]])).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, mx.array([ids[1:]]), reduction="none")[0]
    assert nll == pytest.approx(float(ce[-n:].sum().item()), rel=1e-5)

    # A different question changes the loss but not the count: only the answer is scored.
    nll2, n2 = answer_nll(lm, "完全不同的问题", a, system)
    assert n2 == n and nll2 != nll
    ppl = perplexity(lm, [{"question": q, "answer": a}, {"question": "鱼病", "answer": "隔离观察两周。"}], system)
    assert math.isfinite(ppl) and ppl > 1

    # A multi-turn row (process_data's "history"): the earlier turns are in the prompt, only the answer is scored.
    history = [{"role": "user", "content": "鱼病"}, {"role": "assistant", "content": "隔离观察两周。"}]
    nll3, n3 = answer_nll(lm, q, a, system, history)
    prompt3, completion3 = lm.template.split_for_training(
        [*history, {"role": "user", "content": q}, {"role": "assistant", "content": a}], system)
    assert "隔离观察两周。" in prompt3 and n3 == len(lm.tokenizer.encode(completion3)) and nll3 != nll
    ids3 = lm.tokenizer.encode(prompt3 + completion3)
    logits3 = lm.model(mx.array([ids3[:-1]])).astype(mx.float32)
    ce3 = nn.losses.cross_entropy(logits3, mx.array([ids3[1:]]), reduction="none")[0]
    assert nll3 == pytest.approx(float(ce3[-n3:].sum().item()), rel=1e-5)
    assert perplexity(lm, [{"question": q, "answer": a, "history": history}], system) == pytest.approx(
        math.exp(nll3 / n3), rel=1e-6)
