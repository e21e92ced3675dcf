"""Length-bucketed batches whose order is a pure function of (seed, step).

MLX-LM sorts by length before batching, but for its cached datasets the
"length" is the number of keys in a record, so batches mix lengths and pad
heavily. Here the records are sorted by real token length, chunked into
batches, and the *order of the batches* is a seeded permutation per epoch:
the batch of any step is a pure function of (seed, step), which makes
resuming exact. ``iterate_batches`` has MLX-LM's signature, so the same
batches feed ``mlx_lm.tuner.trainer.train``/``evaluate``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from fishtune.errors import UserError
from fishtune.fileio import read_jsonl
from fishtune.project import DataFiles
from fishtune.template import get_template
from fishtune.train.examples import DataReport, Example, build_examples

logger = logging.getLogger(__name__)

PAD_MULTIPLE = 32  # like MLX-LM: fewer distinct shapes -> fewer recompilations


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


def loss_slots(n: int) -> int:
    """Room for ``n`` loss positions, rounded up to a few sizes (at most 1/8 wasted).

    The compiled step is traced once per input shape: rounding keeps the
    number of distinct shapes (and so recompilations) small. Slots past
    ``n`` point at position 0 with weight 0.
    """
    step = max(PAD_MULTIPLE, 1 << max(0, n.bit_length() - 4))
    return max(step, -(-n // step) * step)


def make_batch(
    dataset: TokenDataset,
    global_idx: Sequence[int],
    max_seq_length: int,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
):
    """Arrays for one rank's share of a global batch: ``(tokens, positions, weights, denom)``.

    ``tokens``: ``[rows, width]``; row ``j`` of the global batch goes to rank
    ``j % world_size`` (as in MLX-LM); missing rows (the last, short batch of
    an epoch, or a rank with nothing left) are all padding. ``positions``:
    the flat indices into ``tokens[:, 1:]`` of every target that carries loss
    (the answers' tokens and end tokens, every assistant turn), rounded up to
    :func:`loss_slots` with zero ``weights``. The loss gathers the hidden
    states there before the output layer, so prompt and padding positions
    cost nothing in the 151936-wide softmax.

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
    exs = [dataset.examples[i] for i in list(global_idx)[rank::world_size]]
    width = padded_width(max((e.length for e in exs), default=1), max_seq_length)
    arr = np.zeros((rows_per_rank, width), dtype=np.int32)
    where = []
    for j, e in enumerate(exs):
        arr[j, : e.length] = e.tokens
        where.append(e.loss_positions() + j * (width - 1))
    pos = np.concatenate(where) if where else np.zeros(0, dtype=np.int32)
    slots = loss_slots(len(pos))
    positions = np.zeros(slots, dtype=np.int32)
    positions[: len(pos)] = pos
    weights = np.zeros(slots, dtype=np.float32)
    weights[: len(pos)] = 1.0
    if train:
        denom = max(sum(dataset.examples[i].n_loss for i in global_idx), 1) / world_size
    else:
        denom = max(len(pos), 1)
    return mx.array(arr), mx.array(positions), mx.array(weights), mx.array(float(denom), dtype=mx.float32)


def iterate_batches(
    dataset: TokenDataset,
    batch_size: int,
    max_seq_length: int,
    loop: bool = False,
    seed: int | None = None,
    comm_group: Any = None,
    start_step: int = 0,
) -> Iterator[tuple[Any, Any, Any, Any]]:
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


def batch_token_counts(dataset: TokenDataset, global_idx: Sequence[int], rank: int = 0,
                       world_size: int = 1) -> tuple[int, int]:
    """(real tokens, loss tokens) of one rank's share of a batch (host side, for tokens/s)."""
    exs = [dataset.examples[i] for i in list(global_idx)[rank::world_size]]
    return sum(e.length for e in exs), sum(e.n_loss for e in exs)


def describe_batching(ds: TokenDataset) -> str:
    return (
        f"{ds.name}: {len(ds)} records, {ds.n_batches} batch(es) of {ds.batch_size} per epoch, "
        f"padding {100 * ds.padding_fraction():.1f}% of batch tokens "
        f"(random batches would pad {100 * ds.unsorted_padding_fraction():.1f}%)"
    )


# ---------------------------------------------------------------------------
# A data folder's splits
# ---------------------------------------------------------------------------
@dataclass
class Splits:
    """The tokenized splits of a data folder (None: not loaded or absent)."""

    train: Any  # TokenDataset
    valid: Any
    test: Any
    reports: dict[str, DataReport]
    train_fingerprint: str = ""


def load_splits(cfg: Any, tokenizer: Any, need_train: bool, need_test: bool) -> Splits:
    """``train``/``valid``/``test.jsonl`` of ``cfg.data`` as token datasets (``cfg``: a TrainConfig)."""
    import hashlib

    data = Path(cfg.data)
    if not data.is_dir():
        raise UserError(f"data folder {data} not found; run process_data.py or point --data at a folder with train.jsonl")
    tpl = get_template(cfg.template)
    reports: dict[str, DataReport] = {}
    out: dict[str, Any] = {"train": None, "valid": None, "test": None}
    wanted = (["train", "valid"] if need_train else []) + (["test"] if need_test else [])
    for split in wanted:
        path = data / DataFiles.split(split)
        rows = read_jsonl(path, missing=None if split == "valid" else
                          "run process_data.py first or point --data at a folder with train.jsonl")
        if rows is None:
            logger.warning("%s not found: training without validation loss", path)
            continue
        if not rows:
            if split == "valid":
                logger.warning("%s is empty: training without validation loss", path)
                continue
            raise UserError(f"{path} is empty; it needs at least one record (run process_data.py)")
        exs, rep = build_examples(
            rows, tokenizer, tpl, cfg.system_prompt, mask_prompt=cfg.mask_prompt,
            max_seq_length=cfg.max_seq_length, name=str(path),
        )
        for note in rep.notes:
            (logger.warning if "truncated" in note else logger.info)(note)
        reports[split] = rep
        out[split] = TokenDataset(exs, cfg.batch_size, cfg.seed, name=split)
    fp = hashlib.sha256((data / DataFiles.split("train")).read_bytes()).hexdigest()[:16] if need_train else ""
    return Splits(out["train"], out["valid"], out["test"], reports, fp)


__all__ = ["Splits", "load_splits", "TokenDataset", "make_batch", "iterate_batches", "batch_token_counts", "describe_batching", "padded_width"]
