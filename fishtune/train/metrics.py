"""What a run reports: ``metrics.jsonl``, the loss curve, the closing summary."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishtune.fileio import atomic_path, atomic_write_jsonl

logger = logging.getLogger(__name__)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per report (kind = train | val | test).

    ``keep_until``: a resumed run keeps the train/val rows up to its
    checkpoint's step (it redoes the steps after it). ``path=None``: kept in
    memory only (the ranks other than 0 of a data-parallel run).
    """

    def __init__(self, path: Path | None, keep_until: int | None = None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path is not None and keep_until is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("kind") in ("train", "val") and row.get("step", 0) <= keep_until:
                    self.rows.append(row)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            atomic_write_jsonl(self.path, self.rows)

    def last(self, kind: str, key: str) -> float | None:
        for r in reversed(self.rows):
            if r.get("kind") == kind and key in r:
                return r[key]
        return None


def plot_loss_curve(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Train and validation loss against step (matplotlib, Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["train_loss"]) for r in rows if r.get("kind") == "train"]
    va = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if tr:
        ax.plot(*zip(*tr), marker="o", markersize=3, label="train loss")
    if va:
        ax.plot(*zip(*va), marker="s", markersize=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.ticklabel_format(axis="y", useOffset=False)  # plain values, no "+1.195e1" offset
    ax.set_title(title or "fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


@dataclass
class RunResult:
    adapter_path: Path
    steps: int = 0
    resumed_from: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    test_loss: float | None = None
    test_ppl: float | None = None
    wall_time_s: float = 0.0
    peak_memory_gb: float = 0.0
    truncated: int = 0
    padding_fraction: float | None = None
    files: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["adapter_path"] = str(self.adapter_path)
        return d


def _fmt(x: float | None, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def log_summary(r: RunResult) -> None:
    lines = [
        "──── fine-tuning summary ────",
        f"adapter folder : {r.adapter_path}",
    ]
    for label, path in r.files.items():
        lines.append(f"  {label:<13}: {path}")
    lines += [
        f"steps          : {r.steps}" + (f" (resumed from step {r.resumed_from})" if r.resumed_from else ""),
        f"train loss     : {_fmt(r.train_loss)}",
        f"valid loss     : {_fmt(r.val_loss)}",
    ]
    if r.test_loss is not None:
        lines.append(f"test loss      : {_fmt(r.test_loss)}  (perplexity {_fmt(r.test_ppl, 3)})")
    if r.truncated:
        lines.append(f"truncated      : {r.truncated} training record(s) cut to max_seq_length (end dropped)")
    lines += [
        f"wall time      : {r.wall_time_s:.1f} s",
        f"peak memory    : {r.peak_memory_gb:.3f} GB",
    ]
    for line in lines:
        logger.info(line)


__all__ = ["MetricsLog", "plot_loss_curve", "perplexity", "RunResult", "log_summary"]
