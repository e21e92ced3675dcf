"""The data stage's options (``process_data.py``'s flags), one dataclass."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fishtune.template import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE


@dataclass
class DataOptions:
    input: Path = Path("data/fish_care_dataset.json")
    output_dir: Path = Path("data")
    question_field: str | None = None
    answer_field: str | None = None
    category_field: str = "category"
    train_ratio: float = 0.8
    valid_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 42
    template: str = DEFAULT_TEMPLATE
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    tokenizer: str | None = None
    max_seq_length: int = 1024
    skip_invalid: bool = False
    force: bool = False
    vocabulary: str | None = None  # label vocabulary: None = vocabulary.yaml beside the input, "none" = no check


__all__ = ["DataOptions"]
