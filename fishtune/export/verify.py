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

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

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


@contextlib.contextmanager
def _plain_cpu_buffers() -> Iterator[None]:
    """Load weights without llama.cpp's "extra" CPU buffer types (AMX, repacked layouts).

    Why: on CPUs that advertise AMX inside a VM that does not enable it,
    llama.cpp's AMX matmul segfaults on the first batch of more than one
    token (seen on this project's CI). The plain CPU kernels are the
    reference ones, which is what a proof wants anyway. llama-cpp-python has
    no flag for ``use_extra_bufts``, so we wrap its default-params factory
    for the duration of the load.
    """
    import llama_cpp.llama_cpp as lib

    orig = lib.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = orig


def open_llama(
    path: str | os.PathLike,
    n_ctx: int = 512,
    logits_all: bool = False,
    f32_kv: bool = False,
    plain_cpu: bool = True,
    n_threads: int | None = None,
    **kwargs: Any,
):
    """``llama_cpp.Llama`` for a GGUF file, quiet, optionally with an F32 KV cache."""
    import llama_cpp

    if f32_kv:
        kwargs.setdefault("type_k", llama_cpp.GGML_TYPE_F32)
        kwargs.setdefault("type_v", llama_cpp.GGML_TYPE_F32)
    ctx = _plain_cpu_buffers() if plain_cpu else contextlib.nullcontext()
    with ctx:
        return llama_cpp.Llama(
            str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
            n_threads=n_threads or os.cpu_count() or 1, seed=0, **kwargs,
        )


class HFReference:
    """transformers' tokenizer and float32 model for an HF folder, loaded once."""

    def __init__(self, hf_dir: str | os.PathLike):
        import torch

        self.hf_dir = Path(hf_dir)
        self.weights_from: Path | None = None  # set once GGUF weights were loaded in
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
        import gguf

        from fishtune.export.gguf_writer import inverse_permute_rope, plan_tensors, read_gguf_header, read_hf_model

        hf_model = read_hf_model(self.hf_dir)
        plans = {p.gguf_name: p for p in plan_tensors(hf_model, "F32")}
        params = dict(self.model.named_parameters())
        _, infos = read_gguf_header(gguf_path)
        data = np.memmap(gguf_path, dtype=np.uint8, mode="r")
        errors: dict[str, float] = {}
        for ti in infos:
            plan = plans.get(ti.name)
            if plan is None:
                raise ValueError(f"{gguf_path}: unexpected tensor {ti.name}")
            qt = gguf.GGMLQuantizationType[ti.type_name]
            block, type_size = gguf.GGML_QUANT_SIZES[qt]
            n = int(np.prod(ti.shape))
            raw = np.array(data[ti.offset : ti.offset + n // block * type_size])
            arr = gguf.quants.dequantize(raw.reshape(n // ti.shape[0], -1), qt).reshape(tuple(reversed(ti.shape)))
            if plan.transform == "permute_q":
                arr = inverse_permute_rope(arr, hf_model.n_head)
            elif plan.transform == "permute_k":
                arr = inverse_permute_rope(arr, hf_model.n_head_kv)
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
        # -- tokenizer ---------------------------------------------------------
        texts = SAMPLE_TEXTS + [("template prompt", prompts[0]),
                                ("training text", template.training_text(SAMPLE_QUESTIONS[0], "每周换水一次。", system_prompt))]
        bad = []
        for name, text in texts:
            ref = hf.encode(text)
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if ref != got:
                bad.append(f"{name}: HF {ref[:12]} vs llama.cpp {got[:12]}")
        report.numbers["tokenizer_identical"] = len(texts) - len(bad)
        report.checks.append(Check(
            "tokenizer", not bad,
            f"{len(texts) - len(bad)}/{len(texts)} texts tokenize identically ({', '.join(n for n, _ in texts)})"
            + (f"; differences: {'; '.join(bad)}" if bad else ""),
        ))

        # -- eos -----------------------------------------------------------------
        end_ids = hf.encode(template.end_token)
        eos = llm.token_eos()
        report.numbers["eos"] = eos
        report.checks.append(Check(
            "eos", end_ids == [eos],
            f"llama.cpp EOS id {eos} {'==' if end_ids == [eos] else '!='} "
            f"{template.end_token} id {end_ids} (template {template.name})",
        ))

        # -- logits --------------------------------------------------------------
        if hf.weights_from is not None:
            raise ValueError("HFReference already holds GGUF weights; load a fresh one")
        max_diff, agree, total, gots, id_lists = 0.0, 0, 0, [], []
        for p in prompts:
            ids = hf.encode(p)
            ref = hf.logits(ids)
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)], dtype=np.float32)  # a copy: later calls reuse the buffer
            max_diff = max(max_diff, float(np.abs(ref - got).max()))
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            total += len(ids)
            gots.append(got)
            id_lists.append(ids)
        top1 = agree / total
        report.numbers.update(max_abs_diff=max_diff, top1_agreement=top1, positions=total)
        if exact:
            report.checks.append(Check(
                "logits", max_diff < tolerance,
                f"max |logit diff| = {max_diff:.3g} (limit {tolerance:g}) over {total} positions of "
                f"{len(prompts)} prompts; top-1 agreement {top1:.1%}",
            ))
        else:
            report.checks.append(Check(
                "logits", True,
                f"vs the original weights: top-1 agreement {top1:.1%} over {total} positions of {len(prompts)} "
                f"prompts; max |logit diff| {max_diff:.3g} (quantization error, reported)",
            ))

        # -- stop: the stop strings end a completion ------------------------------
        stops = list(template.stop_strings)
        forced = []
        for s in stops:
            toks = hf.encode(s)
            if len(toks) != 1:
                forced.append((s, True, f"{s!r} is {len(toks)} tokens; not forced"))
                continue
            r = llm.create_completion(prompts[0], max_tokens=8, temperature=0.0, stop=stops,
                                      logit_bias={toks[0]: 100.0})
            ch = r["choices"][0]
            ok = ch["finish_reason"] == "stop" and ch["text"] == ""
            forced.append((s, ok, f"forced {s!r} -> finish_reason={ch['finish_reason']}, text={ch['text']!r}"))
        report.checks.append(Check("stop", all(ok for _, ok, _ in forced), "; ".join(d for _, _, d in forced)))

        # -- a plain greedy answer (informational) --------------------------------
        r = llm.create_completion(prompts[0], max_tokens=max_new_tokens, temperature=0.0, stop=stops)
        ch = r["choices"][0]
        reason = ch["finish_reason"]
        report.numbers["greedy_finish_reason"] = reason
        note = ("stopped at a stop string / EOS" if reason == "stop"
                else f"hit the {max_new_tokens}-token limit without a stop string (expected for an untrained model)")
        report.checks.append(Check(
            "greedy", True, f"finish_reason={reason} ({note}); text={ch['text'][:60]!r}",
        ))

        # -- weights: llama.cpp vs transformers running the GGUF's own (dequantized) weights
        if not exact:
            errors = hf.load_gguf_weights(gguf_path)
            worst = max(errors, key=errors.get)
            report.numbers["max_weight_rel_error"] = errors[worst]
            report.checks.append(Check(
                "weights", errors[worst] <= max_weight_error,
                f"{len(errors)} GGUF tensors dequantized vs the HF tensors: max relative RMS error "
                f"{errors[worst]:.3g} ({worst}; limit {max_weight_error})",
            ))
            corrs, diff = [], 0.0
            for ids, got in zip(id_lists, gots):
                ref = hf.logits(ids)
                corrs.append(_row_correlation(ref, got))
                diff = max(diff, float(np.abs(ref - got).max()))
            corr = float(np.concatenate(corrs).min())
            report.numbers.update(dequant_min_correlation=corr, dequant_max_abs_diff=diff)
            report.checks.append(Check(
                "llama.cpp reads the weights", corr >= min_correlation,
                f"transformers running the dequantized GGUF weights vs llama.cpp: min logit correlation "
                f"{corr:.5f} (limit {min_correlation}), max |diff| {diff:.3g}",
            ))
    finally:
        llm.close()
    return report
