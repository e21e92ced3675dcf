"""Evaluation against the test set: metrics that suit Chinese references.

* ROUGE-L F1 on characters (longest common subsequence of characters).
* BLEU-4 on characters: sentence BLEU with add-one smoothing of the 2..4-gram
  precisions (Lin & Och 2004) and the brevity penalty, averaged over rows.
* exact-stop rate: answers that ended at the end token/stop string rather
  than at the token limit.
* mean answer length in characters.
* perplexity of the references: teacher-forced through the model with the
  template prompt, on the answer tokens only (answer + end token).

Whitespace is removed before the character metrics (Chinese has none; it
only adds noise). Generation for evaluation is greedy by default, so the
numbers are reproducible.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from fishtune.tokens import encode_pair

if TYPE_CHECKING:
    from fishtune.infer.generation import SamplingConfig
    from fishtune.loading import LoadedModel

logger = logging.getLogger(__name__)

MAX_PPL_TOKENS = 4096  # longer (prompt + answer) rows are cut from the left of the prompt


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """Character-level ROUGE-L F1 in [0, 1]."""
    p, r = _chars(prediction), _chars(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(prediction: str, reference: str) -> float:
    """Character BLEU-4 in [0, 1]; add-one smoothing for n >= 2, 0 when no character matches."""
    p, r = _chars(prediction), _chars(reference)
    if not p or not r:
        return 0.0
    log_prec = 0.0
    for n in range(1, 5):
        pn, rn = _ngrams(p, n), _ngrams(r, n)
        match = sum(min(c, rn[g]) for g, c in pn.items())
        total = max(len(p) - n + 1, 0)
        if n == 1:
            if match == 0:
                return 0.0
            log_prec += math.log(match / total)
        else:
            log_prec += math.log((match + 1) / (total + 1))
    bp = 1.0 if len(p) > len(r) else math.exp(1 - len(r) / len(p))
    return bp * math.exp(log_prec / 4)


def answer_nll(
    lm: "LoadedModel",
    question: str,
    answer: str,
    system: str | None,
    history: Sequence[dict[str, str]] | None = None,
) -> tuple[float, int]:
    """Summed negative log-likelihood of the reference answer (+ end token) and its token count.

    ``history``: earlier messages of a multi-turn row (process_data's ``history``), in the prompt."""
    import mlx.core as mx
    import mlx.nn as nn

    prompt, completion = lm.template.split_for_training(
        [*(history or []), {"role": "user", "content": question}, {"role": "assistant", "content": answer}], system
    )
    # The answer starts where the joint tokenization stops agreeing with the prompt's (as in training).
    full_ids, n_prompt, _ = encode_pair(lm.tokenizer, prompt, completion)
    n_prompt = max(n_prompt, 1)
    if len(full_ids) > MAX_PPL_TOKENS:
        cut = len(full_ids) - MAX_PPL_TOKENS
        full_ids, n_prompt = full_ids[cut:], max(n_prompt - cut, 1)
    if len(full_ids) <= n_prompt:
        return 0.0, 0
    ids = mx.array([full_ids])
    logits = lm.model(ids[:, :-1]).astype(mx.float32)
    targets = ids[:, 1:]
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")[0, n_prompt - 1:]
    nll = float(ce.sum().item())
    return nll, int(ce.shape[0])


def perplexity(lm: "LoadedModel", rows: Iterable[dict], system: str | None) -> float:
    """Token-weighted perplexity of the reference answers."""
    total, count = 0.0, 0
    for row in rows:
        nll, n = answer_nll(lm, row["question"], row["answer"], system, row.get("history"))
        total += nll
        count += n
    return math.exp(total / count) if count else float("nan")


@dataclass
class ModelScores:
    """Metrics of one model over the evaluated rows."""

    name: str
    model: str
    adapter: str | None
    rouge_l_f1: float
    bleu4: float
    exact_stop_rate: float
    mean_answer_chars: float
    mean_reference_chars: float
    perplexity: float
    tokens_per_s: float
    rows: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def score_predictions(
    name: str,
    model: str,
    adapter: str | None,
    predictions: Sequence[dict],
    ppl: float,
) -> ModelScores:
    """``predictions``: rows with ``answer`` (reference), ``prediction``, ``finish_reason``, ``tokens_per_s``."""
    n = len(predictions)
    if n == 0:
        nan = float("nan")
        return ModelScores(name, model, adapter, nan, nan, nan, nan, nan, ppl, nan, 0)
    mean = lambda xs: sum(xs) / n  # noqa: E731
    return ModelScores(
        name=name,
        model=model,
        adapter=adapter,
        rouge_l_f1=mean([rouge_l_f1(p["prediction"], p["answer"]) for p in predictions]),
        bleu4=mean([bleu4(p["prediction"], p["answer"]) for p in predictions]),
        exact_stop_rate=mean([1.0 if p["finish_reason"] == "stop" else 0.0 for p in predictions]),
        mean_answer_chars=mean([len(_chars(p["prediction"])) for p in predictions]),
        mean_reference_chars=mean([len(_chars(p["answer"])) for p in predictions]),
        perplexity=ppl,
        tokens_per_s=mean([p.get("tokens_per_s", 0.0) for p in predictions]),
        rows=n,
    )


METRICS_TABLE = [
    ("ROUGE-L F1 (chars)", "rouge_l_f1", "{:.4f}"),
    ("BLEU-4 (chars)", "bleu4", "{:.4f}"),
    ("exact-stop rate", "exact_stop_rate", "{:.1%}"),
    ("mean answer length (chars)", "mean_answer_chars", "{:.1f}"),
    ("reference perplexity", "perplexity", "{:.2f}"),
    ("tokens/s", "tokens_per_s", "{:.1f}"),
]


def format_table(scores: Sequence[ModelScores]) -> str:
    """A short side-by-side table of the metrics."""
    width = max(len(label) for label, _, _ in METRICS_TABLE) + 2
    cols = [max(12, len(s.name) + 2) for s in scores]
    lines = ["metric".ljust(width) + "".join(s.name.rjust(c) for s, c in zip(scores, cols))]
    for label, key, fmt in METRICS_TABLE:
        cells = []
        for s, c in zip(scores, cols):
            v = getattr(s, key)
            cells.append(("n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)).rjust(c))
        lines.append(label.ljust(width) + "".join(cells))
    lines.append(f"({scores[0].rows if scores else 0} test questions; mean reference length "
                 f"{scores[0].mean_reference_chars if scores else 0:.1f} chars)")
    return "\n".join(lines)


def predict_rows(lm: "LoadedModel", rows: Sequence[dict], sampling: "SamplingConfig", system: str | None,
                 desc: str, progress: bool) -> list[dict]:
    """Generate an answer for each row (``question``, optional ``history``); rows gain ``prediction`` etc."""
    import sys

    from tqdm import tqdm

    from fishtune.infer.generation import generate

    out = []
    for row in tqdm(rows, desc=desc, unit="q", disable=not progress, file=sys.stderr):
        # Multi-turn rows (process_data's "history") are prompted with their earlier turns.
        msgs = [*(row.get("history") or []), {"role": "user", "content": row["question"].strip()}]
        res = generate(lm, lm.template.render_prompt(msgs, system), sampling)
        out.append({**row, "prediction": res.text, "finish_reason": res.finish_reason,
                    "generation_tokens": res.generation_tokens, "tokens_per_s": round(res.generation_tps, 2)})
    return out


METRICS_NOTES = {
    "rouge_l_f1": "character-level ROUGE-L F1 (whitespace removed), mean over rows",
    "bleu4": "character BLEU-4, add-one smoothing for 2-4-grams, brevity penalty, mean over rows",
    "exact_stop_rate": "share of answers that ended at the end token/stop string, not the token limit",
    "mean_answer_chars": "mean answer length in characters (whitespace removed)",
    "perplexity": "teacher-forced perplexity of the reference answers (answer + end token only)",
}


def evaluate_models(
    rows: Sequence[dict],
    test_file: str,
    model: str | None,
    adapter_path: str,
    sampling: "SamplingConfig",
    *,
    system: str | None = None,
    base_only: bool = False,
    progress: bool = False,
) -> tuple[dict[str, Any], list[ModelScores]]:
    """Score the base model and (unless ``base_only``) base + adapter on ``rows``: ``(report, scores)``.

    Both are prompted the same way (the adapter's template and system
    prompt, or ``system``), one model in memory at a time.
    """
    import gc
    import time

    from fishtune.loading import load_model
    from fishtune.project import meta_for_base, read_project_meta

    if not base_only:
        read_project_meta(adapter_path)  # a missing/corrupt adapter fails now, not after the base model ran
    meta = meta_for_base(adapter_path)
    system = system if system is not None else meta.system_prompt
    variants = [("base", True)] if base_only else [("base", True), ("finetuned", False)]
    logger.info("evaluating on %d questions of %s, %s decoding, max %d tokens", len(rows), test_file,
                "greedy" if sampling.greedy else f"temperature {sampling.temperature}", sampling.max_tokens)
    scores, preds = [], {}
    for name, no_adapter in variants:
        t0 = time.perf_counter()
        lm = load_model(model, adapter_path, no_adapter=no_adapter)
        preds[name] = predict_rows(lm, rows, sampling, system, name, progress)
        s = score_predictions(name, lm.model_path, lm.adapter_path, preds[name], perplexity(lm, rows, system))
        s.extra["seconds"] = round(time.perf_counter() - t0, 2)
        scores.append(s)
        del lm
        gc.collect()
    report = {
        "test_file": test_file,
        "rows": len(rows),
        "template": meta.template,
        "system_prompt": system,
        "sampling": sampling.to_dict(),
        "decoding": "greedy" if sampling.greedy else "sampled",
        "metrics_notes": METRICS_NOTES,
        "models": {s.name: s.to_dict() for s in scores},
        "predictions": [
            {"question": r["question"], "reference": r["answer"],
             **{f"{name}_prediction": preds[name][i]["prediction"] for name, _ in variants},
             **{f"{name}_finish_reason": preds[name][i]["finish_reason"] for name, _ in variants}}
            for i, r in enumerate(rows)
        ],
    }
    return report, scores


__all__ = ["predict_rows", "evaluate_models", "rouge_l_f1", "bleu4", "lcs_length", "answer_nll", "perplexity", "ModelScores", "score_predictions",
           "format_table"]
