"""Training examples, the masked loss and length-bucketed batches.

Examples
    Each JSONL record becomes token ids plus an *offset*: the index of the
    first token the loss is computed on. Records with ``question``/``answer``
    (the data stage's output) or ``messages`` are rendered with the project
    template; the prompt is masked and the completion (the answer followed by
    the template's end token) carries the loss, so the model learns to answer
    and to stop. Records with only ``text`` (raw MLX-LM data) train on the
    whole text. Records longer than ``max_seq_length`` are truncated at the
    end, as MLX-LM does; they are counted and reported.

Loss
    ``masked_loss`` is MLX-LM's ``default_loss`` with two changes: the mask
    stops at the last real token (MLX-LM 0.32.2 counts one padding position
    per row, training every row to predict token id 0 after its end token),
    and the sum is divided by a denominator the batch carries, so that data
    parallel ranks together compute exactly the single-process mean over the
    global batch.

Batches
    MLX-LM sorts by length before batching, but for its cached datasets the
    "length" is the number of keys in a record, so batches mix lengths and
    pad heavily. Here the records are sorted by real token length, chunked
    into batches, and the *order of the batches* is a seeded permutation per
    epoch: the batch of any step is a pure function of (seed, step), which
    makes resuming exact. ``iterate_batches`` has MLX-LM's signature, so the
    same batches feed ``mlx_lm.tuner.trainer.train``/``evaluate``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from fishtune.errors import UserError
from fishtune.fileio import iter_jsonl
from fishtune.template import PromptTemplate

logger = logging.getLogger(__name__)

PAD_MULTIPLE = 32  # like MLX-LM: fewer distinct shapes -> fewer recompilations


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 token ids (already truncated)
    offset: int  # index of the first token that carries loss

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_loss(self) -> int:
        """Number of loss targets: token positions 1..length-1 at or after offset."""
        return max(0, self.length - max(self.offset, 1))


@dataclass
class DataReport:
    """What happened while turning one file into examples (for logs and summary)."""

    name: str
    records: int = 0
    masked: int = 0  # prompt masked (question/answer or messages rows)
    raw_text: int = 0  # trained on the whole text
    truncated: int = 0
    no_loss_left: int = 0  # prompt alone fills max_seq_length
    boundary_merges: int = 0  # prompt/completion boundary fell inside a token
    total_tokens: int = 0
    loss_tokens: int = 0
    max_length: int = 0
    longest_original: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "notes"}


# ---------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------
def read_jsonl(path: str | Path, required: bool = True) -> list[dict[str, Any]] | None:
    """Read a JSONL file of objects; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise UserError(f"{path} not found; run process_data.py first or point --data at a folder with train.jsonl")
        return None
    return [row for _, row in iter_jsonl(path)]


def record_parts(
    row: dict[str, Any], where: str, template: PromptTemplate, system_prompt: str | None
) -> tuple[str, str] | str:
    """``(prompt, completion)`` for masked training, or the raw text.

    ``where`` is ``file:line`` for error messages.
    """
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        try:
            return template.split_for_training(msgs, system_prompt)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    if "question" in row or "answer" in row:
        for key in ("question", "answer"):
            val = row.get(key)
            if not isinstance(val, str) or not val.strip():
                raise UserError(f"{where}: field {key!r} must be a non-empty string, got {val!r}")
        msgs = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        return template.split_for_training(msgs, system_prompt)
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise UserError(f"{where}: field 'text' must be a non-empty string, got {row['text']!r}")
        return row["text"]
    raise UserError(
        f"{where}: record has none of 'question'+'answer', 'messages' or 'text' (keys: {sorted(row)}); "
        "run process_data.py to produce training records"
    )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], int, bool]:
    """Tokens of ``prompt + completion`` and the index where the completion starts.

    Tokenizing the concatenation keeps the tokens the model sees at inference
    time. If a token straddles the boundary (BPE merged across it), the
    offset is the longest common prefix, so the straddling token counts as
    prompt (masked). Returns ``(tokens, offset, merged_across_boundary)``.
    """
    full = list(tokenizer.encode(prompt + completion))
    ptoks = list(tokenizer.encode(prompt))
    if full[: len(ptoks)] == ptoks:
        return full, len(ptoks), False
    return full, _common_prefix(full, ptoks), True


def build_examples(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    template: PromptTemplate,
    system_prompt: str | None,
    *,
    mask_prompt: bool,
    max_seq_length: int,
    name: str,
) -> tuple[list[Example], DataReport]:
    """Tokenize records into ``Example``s (see module doc for the formats)."""
    report = DataReport(name=name, records=len(rows))
    eos = getattr(tokenizer, "eos_token_id", None)
    examples: list[Example] = []
    for i, row in enumerate(rows):
        parts = record_parts(row, f"{name}:{i + 1}", template, system_prompt)
        if isinstance(parts, tuple):
            prompt, completion = parts
            toks, offset, merged = encode_pair(tokenizer, prompt, completion)
            report.boundary_merges += int(merged)
            report.masked += 1
            if not mask_prompt:
                offset = 0
        else:
            toks = list(tokenizer.encode(parts))
            # Like MLX-LM's TextDataset: end with EOS so the model learns to stop.
            if eos is not None and (not toks or toks[-1] != eos):
                toks.append(eos)
            offset = 0
            report.raw_text += 1
        report.longest_original = max(report.longest_original, len(toks))
        if len(toks) > max_seq_length:
            report.truncated += 1
            toks = toks[:max_seq_length]
        ex = Example(np.asarray(toks, dtype=np.int32), offset)
        if ex.n_loss == 0:
            report.no_loss_left += 1
        report.total_tokens += ex.length
        report.loss_tokens += ex.n_loss
        report.max_length = max(report.max_length, ex.length)
        examples.append(ex)

    if report.raw_text:
        report.notes.append(
            f"{report.raw_text} record(s) of {name} have only 'text': trained on the whole text (no prompt masking)"
        )
    if report.masked and not mask_prompt:
        report.notes.append(f"mask_prompt is off: the loss of {name} covers the prompt too")
    if report.truncated:
        report.notes.append(
            f"{report.truncated} record(s) of {name} are longer than max_seq_length={max_seq_length} tokens "
            f"and were truncated at the end (longest: {report.longest_original} tokens); "
            "raise --max-seq-length to keep them whole"
        )
    if report.no_loss_left:
        report.notes.append(
            f"{report.no_loss_left} record(s) of {name} have no answer tokens left after truncation "
            "and contribute nothing to the loss"
        )
    if report.boundary_merges:
        logger.debug("%s: %d record(s) merged a token across the prompt/answer boundary", name, report.boundary_merges)
    return examples, report


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------
class TokenDataset:
    """Examples plus the batching plan; items look like MLX-LM's ``(tokens, offset)``."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, name: str = "train"):
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if not examples:
            raise UserError(f"{name} has no records")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = int(seed)
        self.name = name
        # Stable sort by real token length; batches are consecutive chunks.
        order = sorted(range(len(examples)), key=lambda i: (examples[i].length, i))
        self.batches: list[list[int]] = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self._order_cache: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> tuple[list[int], int]:
        ex = self.examples[idx]
        return ex.tokens.tolist(), ex.offset

    def itemlen(self, idx: int) -> int:
        return self.examples[idx].length

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The batch order of one epoch: a pure function of (seed, epoch)."""
        if self._order_cache[0] != epoch:
            self._order_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_batches))
        return self._order_cache[1]

    def batch_for_step(self, step: int) -> list[int]:
        """Global example indices of training step ``step`` (1-based)."""
        epoch, pos = divmod(step - 1, self.n_batches)
        return self.batches[int(self.epoch_order(epoch)[pos])]

    def epoch_of_step(self, step: int) -> float:
        return step / self.n_batches

    def eval_order(self) -> np.ndarray:
        # Fixed across evaluations so successive validation losses compare.
        return np.random.default_rng([self.seed, 1_000_003]).permutation(self.n_batches)

    # ---- padding statistics -------------------------------------------------
    def padding_fraction(self, batches: list[list[int]] | None = None) -> float:
        batches = self.batches if batches is None else batches
        real = padded = 0
        for b in batches:
            lens = [self.examples[i].length for i in b]
            width = padded_width(max(lens), 10**9)
            real += sum(lens)
            padded += self.batch_size * width
        return 1.0 - real / padded if padded else 0.0

    def unsorted_padding_fraction(self) -> float:
        """Padding if batches were random chunks (what MLX-LM effectively does)."""
        perm = np.random.default_rng(self.seed).permutation(len(self.examples)).tolist()
        chunks = [perm[i : i + self.batch_size] for i in range(0, len(perm), self.batch_size)]
        return self.padding_fraction(chunks)


def padded_width(max_len: int, max_seq_length: int) -> int:
    """Batch width: one plus the next multiple of 32 (inputs drop one column), capped."""
    return min(1 + PAD_MULTIPLE * ((max_len + PAD_MULTIPLE - 1) // PAD_MULTIPLE), max(max_seq_length, max_len))


def make_batch(
    dataset: TokenDataset,
    global_idx: Sequence[int],
    max_seq_length: int,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
):
    """Arrays for one rank's share of a global batch: ``(tokens, lengths, denom)``.

    Row ``j`` of the global batch goes to rank ``j % world_size`` (as in
    MLX-LM). Missing rows (the last, short batch of an epoch, or a rank with
    nothing left) are empty rows with ``lengths = (0, 0)``: no loss, no
    gradient. ``lengths`` holds ``(offset, length)`` per row.

    ``denom``: in training, the global batch's loss-token count divided by
    the world size, so that the averaged gradients equal the single-process
    gradient of the mean loss over the global batch; in evaluation the local
    loss-token count (MLX-LM's ``evaluate`` re-weights by token counts).
    """
    import mlx.core as mx

    if dataset.batch_size % world_size:
        raise UserError(
            f"batch_size {dataset.batch_size} is not divisible by the {world_size} training processes; "
            f"use a multiple of {world_size}"
        )
    rows_per_rank = dataset.batch_size // world_size
    local = list(global_idx)[rank::world_size]
    exs = [dataset.examples[i] for i in local]
    width = padded_width(max((e.length for e in exs), default=1), max_seq_length)
    arr = np.zeros((rows_per_rank, width), dtype=np.int32)
    lengths = np.zeros((rows_per_rank, 2), dtype=np.int32)
    for j, e in enumerate(exs):
        n = min(e.length, width)
        arr[j, :n] = e.tokens[:n]
        lengths[j] = (e.offset, n)
    if train:
        global_loss = sum(dataset.examples[i].n_loss for i in global_idx)
        denom = max(global_loss, 1) / world_size
    else:
        denom = max(sum(e.n_loss for e in exs), 1)
    return mx.array(arr), mx.array(lengths), mx.array(float(denom), dtype=mx.float32)


def iterate_batches(
    dataset: TokenDataset,
    batch_size: int,
    max_seq_length: int,
    loop: bool = False,
    seed: int | None = None,
    comm_group: Any = None,
    start_step: int = 0,
) -> Iterator[tuple[Any, Any, Any]]:
    """MLX-LM-compatible batch iterator over a ``TokenDataset``.

    ``loop=True`` (training): yields the batches of steps ``start_step+1,
    start_step+2, ...`` forever, the order being a seeded permutation per
    epoch. ``loop=False`` (evaluation): every batch once, in a fixed order.
    ``seed`` is accepted for MLX-LM compatibility; the dataset's seed rules.
    """
    if batch_size != dataset.batch_size:
        raise ValueError(f"dataset was planned for batch_size {dataset.batch_size}, got {batch_size}")
    rank = comm_group.rank() if comm_group is not None else 0
    world = comm_group.size() if comm_group is not None else 1
    if loop:
        step = start_step
        while True:
            step += 1
            yield make_batch(dataset, dataset.batch_for_step(step), max_seq_length, rank, world, train=True)
    else:
        for b in dataset.eval_order():
            yield make_batch(dataset, dataset.batches[int(b)], max_seq_length, rank, world, train=False)


def masked_loss(model: Any, batch: Any, lengths: Any, denom: Any = None):
    """Cross-entropy over the completion tokens only.

    Target ``k`` is token ``k+1`` of the row; it carries loss iff
    ``offset <= k+1 < length``. Returns ``(sum / denom, n_loss_tokens)``;
    without ``denom`` the plain mean.
    """
    import mlx.core as mx
    import mlx.nn as nn

    inputs = batch[:, :-1]
    targets = batch[:, 1:]
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    if denom is None:
        denom = mx.maximum(ntoks, 1)
    return ce.astype(mx.float32).sum() / denom, ntoks


def batch_token_counts(lengths: Any) -> tuple[int, int]:
    """(real tokens, loss tokens) of a batch's ``lengths`` array (host side)."""
    arr = np.asarray(lengths)
    real = int(arr[:, 1].sum())
    loss = int(np.maximum(arr[:, 1] - np.maximum(arr[:, 0], 1), 0).sum())
    return real, loss


def describe_batching(ds: TokenDataset) -> str:
    return (
        f"{ds.name}: {len(ds)} records, {ds.n_batches} batch(es) of {ds.batch_size} per epoch, "
        f"padding {100 * ds.padding_fraction():.1f}% of batch tokens "
        f"(random batches would pad {100 * ds.unsorted_padding_fraction():.1f}%)"
    )


__all__ = [
    "Example",
    "DataReport",
    "TokenDataset",
    "read_jsonl",
    "build_examples",
    "encode_pair",
    "make_batch",
    "iterate_batches",
    "masked_loss",
    "batch_token_counts",
    "describe_batching",
    "padded_width",
]
