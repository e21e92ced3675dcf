"""Proof that a GGUF file is the HF model: llama.cpp against transformers.

Checks (each prints its numbers; any failure makes convert_to_gguf.py exit 1):

* ``tokenizer``: llama.cpp tokenizes Chinese, English, special-token and
  template texts exactly like the HF tokenizer.
* ``eos``: llama.cpp's EOS token is the template's end token (what training
  taught the model to emit), so generation ends where training answers end.
* ``logits``: next-token logits at every position of sample prompts.
  F32 files: max |diff| < 1e-4 (F32 KV cache). Other types: top-1 agreement
  with the original model and the max difference are reported.
* ``weights`` (non-F32 files): the quantized file holds exactly the HF
  weights up to rounding. Every GGUF tensor is dequantized with ``gguf``'s
  numpy codecs and loaded back into the transformers model; llama.cpp's
  logits must then match it (min per-position correlation >= 0.99; what is
  left is llama.cpp quantizing activations inside its matmuls). A wrong
  layout, name or permutation cannot pass this, even on a random model whose
  quantized top-1 agreement says little.
* ``stop``: for every stop string that is one token, forcing that token makes
  llama.cpp end the completion there with ``finish_reason == "stop"``; and a
  plain greedy completion is reported with its finish reason (a random smoke
  model may well run to the length limit, and we say so).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fishtune.export.llama_cpp import open_llama, tokenize
from fishtune.template import PromptTemplate

logger = logging.getLogger(__name__)

F32_TOLERANCE = 1e-4
MIN_CORRELATION = 0.99
# 4-bit rounding of Gaussian-like weights costs ~10% relative RMS; a flipped, transposed or
# misplaced tensor costs >100%.
MAX_WEIGHT_ERROR = 0.3

SAMPLE_TEXTS: list[tuple[str, str]] = [
    ("chinese", "孔雀鱼多久换一次水？一般每周换水一次，每次换三分之一左右，新水要提前除氯。"),
    ("english", "How often should I change the water in a 60 L tank? About 25% weekly, at pH 7.2 and 26°C."),
    ("special tokens", "答案结束。<|endoftext|>### Instruction:\n下一个问题<|im_start|>user\n鱼缸<|im_end|>\n"),
    ("whitespace", "  两个空格\t制表符\n\n\n三个换行   trailing  🐟"),
]
SAMPLE_QUESTIONS = ["孔雀鱼多久换一次水？", "鱼身上有白点还蹭缸怎么办？", "How often should I feed my goldfish?"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ProofReport:
    gguf: Path
    checks: list[Check] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        out = [f"proof for {self.gguf} (llama.cpp vs transformers):"]
        out += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        return out


class HFReference:
    """transformers' tokenizer and float32 model for an HF folder, loaded once."""

    def __init__(self, hf_dir: str | os.PathLike):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.hf_dir = Path(hf_dir)
        self.weights_from: Path | None = None  # set once GGUF weights were loaded in
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        self.model.eval()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids])).logits[0].float().numpy()

    def load_gguf_weights(self, gguf_path: str | os.PathLike) -> dict[str, float]:
        """Replace the model's weights by the GGUF's, dequantized (one tensor at a time).

        Returns each tensor's relative RMS error ``||gguf - hf|| / ||hf||``.
        """
        from fishtune.export.architectures import inverse_permute_rope
        from fishtune.export.gguf_file import read_gguf_header, read_tensor
        from fishtune.export.gguf_writer import plan_tensors, read_hf_model

        plans = {p.gguf_name: p for p in plan_tensors(read_hf_model(self.hf_dir), "F32")}
        params = dict(self.model.named_parameters())
        _, infos = read_gguf_header(gguf_path)
        data = np.memmap(gguf_path, dtype=np.uint8, mode="r")
        errors: dict[str, float] = {}
        for ti in infos:
            plan = plans.get(ti.name)
            if plan is None:
                raise ValueError(f"{gguf_path}: unexpected tensor {ti.name}")
            arr = read_tensor(data, ti)
            if plan.rope_heads:
                arr = inverse_permute_rope(arr, plan.rope_heads)
            target = params[plan.hf_name]
            new = self.torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(target.shape)
            with self.torch.no_grad():
                errors[ti.name] = float((new - target).norm() / target.norm().clamp_min(1e-30))
                target.copy_(new)
        self.weights_from = Path(gguf_path)
        return errors


def _row_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


@dataclass
class _Run:
    """What the checks share: the file in llama.cpp, the reference, the prompts, the logits so far."""

    llm: Any
    hf: HFReference
    template: PromptTemplate
    system_prompt: str | None
    report: ProofReport
    prompts: list[str]
    id_lists: list[list[int]] = field(default_factory=list)
    llama_logits: list[np.ndarray] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.report.checks.append(Check(name, ok, detail))


def _check_tokenizer(run: _Run) -> None:
    texts = SAMPLE_TEXTS + [
        ("template prompt", run.prompts[0]),
        ("training text", run.template.training_text(SAMPLE_QUESTIONS[0], "每周换水一次。", run.system_prompt)),
    ]
    bad = []
    for name, text in texts:
        ref, got = run.hf.encode(text), tokenize(run.llm, text)
        if ref != got:
            bad.append(f"{name}: HF {ref[:12]} vs llama.cpp {got[:12]}")
    run.report.numbers["tokenizer_identical"] = len(texts) - len(bad)
    run.add("tokenizer", not bad,
            f"{len(texts) - len(bad)}/{len(texts)} texts tokenize identically ({', '.join(n for n, _ in texts)})"
            + (f"; differences: {'; '.join(bad)}" if bad else ""))


def _check_eos(run: _Run) -> None:
    end_ids = run.hf.encode(run.template.end_token)
    eos = run.llm.token_eos()
    run.report.numbers["eos"] = eos
    run.add("eos", end_ids == [eos],
            f"llama.cpp EOS id {eos} {'==' if end_ids == [eos] else '!='} "
            f"{run.template.end_token} id {end_ids} (template {run.template.name})")


def _check_logits(run: _Run, exact: bool, tolerance: float) -> None:
    if run.hf.weights_from is not None:
        raise ValueError("HFReference already holds GGUF weights; load a fresh one")
    max_diff, agree, total = 0.0, 0, 0
    for p in run.prompts:
        ids = run.hf.encode(p)
        ref = run.hf.logits(ids)
        run.llm.reset()
        run.llm.eval(ids)
        got = np.array(run.llm.scores[: len(ids)], dtype=np.float32)  # a copy: later calls reuse the buffer
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
        run.llama_logits.append(got)
        run.id_lists.append(ids)
    top1 = agree / total
    run.report.numbers.update(max_abs_diff=max_diff, top1_agreement=top1, positions=total)
    n = len(run.prompts)
    if exact:
        run.add("logits", max_diff < tolerance,
                f"max |logit diff| = {max_diff:.3g} (limit {tolerance:g}) over {total} positions of "
                f"{n} prompts; top-1 agreement {top1:.1%}")
    else:
        run.add("logits", True,
                f"vs the original weights: top-1 agreement {top1:.1%} over {total} positions of {n} "
                f"prompts; max |logit diff| {max_diff:.3g} (quantization error, reported)")


def _check_stop(run: _Run) -> None:
    """Forcing each one-token stop string ends the completion there, with finish_reason=stop."""
    stops = list(run.template.stop_strings)
    forced = []
    for s in stops:
        toks = run.hf.encode(s)
        if len(toks) != 1:
            forced.append((s, True, f"{s!r} is {len(toks)} tokens; not forced"))
            continue
        r = run.llm.create_completion(run.prompts[0], max_tokens=8, temperature=0.0, stop=stops,
                                      logit_bias={toks[0]: 100.0})
        ch = r["choices"][0]
        ok = ch["finish_reason"] == "stop" and ch["text"] == ""
        forced.append((s, ok, f"forced {s!r} -> finish_reason={ch['finish_reason']}, text={ch['text']!r}"))
    run.add("stop", all(ok for _, ok, _ in forced), "; ".join(d for _, _, d in forced))


def _report_greedy(run: _Run, max_new_tokens: int) -> None:
    """A plain greedy answer, reported as it is (informational)."""
    r = run.llm.create_completion(run.prompts[0], max_tokens=max_new_tokens, temperature=0.0,
                                  stop=list(run.template.stop_strings))
    ch = r["choices"][0]
    reason = ch["finish_reason"]
    run.report.numbers["greedy_finish_reason"] = reason
    note = ("stopped at a stop string / EOS" if reason == "stop"
            else f"hit the {max_new_tokens}-token limit without a stop string (expected for an untrained model)")
    run.add("greedy", True, f"finish_reason={reason} ({note}); text={ch['text'][:60]!r}")


def _check_weights(run: _Run, gguf_path: str | os.PathLike, min_correlation: float, max_weight_error: float) -> None:
    """llama.cpp vs transformers running the GGUF's own (dequantized) weights."""
    errors = run.hf.load_gguf_weights(gguf_path)
    worst = max(errors, key=errors.get)
    run.report.numbers["max_weight_rel_error"] = errors[worst]
    run.add("weights", errors[worst] <= max_weight_error,
            f"{len(errors)} GGUF tensors dequantized vs the HF tensors: max relative RMS error "
            f"{errors[worst]:.3g} ({worst}; limit {max_weight_error})")
    corrs, diff = [], 0.0
    for ids, got in zip(run.id_lists, run.llama_logits):
        ref = run.hf.logits(ids)
        corrs.append(_row_correlation(ref, got))
        diff = max(diff, float(np.abs(ref - got).max()))
    corr = float(np.concatenate(corrs).min())
    run.report.numbers.update(dequant_min_correlation=corr, dequant_max_abs_diff=diff)
    run.add("llama.cpp reads the weights", corr >= min_correlation,
            f"transformers running the dequantized GGUF weights vs llama.cpp: min logit correlation "
            f"{corr:.5f} (limit {min_correlation}), max |diff| {diff:.3g}")


def prove_gguf(
    gguf_path: str | os.PathLike,
    hf: HFReference,
    template: PromptTemplate,
    system_prompt: str | None,
    exact: bool,
    tolerance: float = F32_TOLERANCE,
    min_correlation: float = MIN_CORRELATION,
    max_weight_error: float = MAX_WEIGHT_ERROR,
    max_new_tokens: int = 24,
) -> ProofReport:
    """Run every check against ``gguf_path``; never raises for a failed check."""
    report = ProofReport(Path(gguf_path))
    prompts = [template.question_prompt(q, system_prompt) for q in SAMPLE_QUESTIONS]
    llm = open_llama(gguf_path, n_ctx=512, logits_all=True, f32_kv=True)
    try:
        run = _Run(llm, hf, template, system_prompt, report, prompts)
        _check_tokenizer(run)
        _check_eos(run)
        _check_logits(run, exact, tolerance)
        _check_stop(run)
        _report_greedy(run, max_new_tokens)
        if not exact:
            _check_weights(run, gguf_path, min_correlation, max_weight_error)
    finally:
        llm.close()
    return report


__all__ = ["HFReference", "ProofReport", "Check", "prove_gguf", "F32_TOLERANCE", "MIN_CORRELATION",
           "MAX_WEIGHT_ERROR"]
