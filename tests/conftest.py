"""Shared fixtures: the offline smoke model, a tiny data folder, trained adapters.

Everything heavy is built once per test session and cached under
``tests/artifacts/`` (git-ignored); the smoke model under ``models/``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Keep runs deterministic and light on a 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import fishtune  # noqa: E402  (loads OpenBLAS before any mlx import)

ARTIFACTS = REPO / "tests" / "artifacts"

# A few fish-care records for tests (the real data set is data/fish_care_dataset.json).
TINY_QA = [
    ("孔雀鱼多久换一次水？", "一般每周换水一次，每次换三分之一左右，新水要提前除氯并保持水温一致。"),
    ("鱼身上有白点还蹭缸怎么办？", "这是典型的白点病。把水温缓慢升到28到30度，配合千分之三的盐浴，持续一周以上，并隔离病鱼。"),
    ("金鱼翻肚子浮在水面是什么原因？", "多为鳔病或消化不良。先停食两三天，保持水质稳定，可喂去壳煮熟的豌豆帮助消化。"),
    ("新买的鱼需要隔离多久？", "建议单独隔离观察两周左右，期间观察有无白点、烂鳍、拒食等症状，确认健康后再混养。"),
    ("鱼缸水发白浑浊是怎么回事？", "多是细菌爆发或硝化系统未建立。减少喂食，少量多次换水，加强过滤和增氧，不要频繁洗滤材。"),
    ("斗鱼可以和其他鱼混养吗？", "公斗鱼之间会打斗，不能同缸；可与性格温和、不咬鳍的小型鱼混养，缸内多放水草供其躲避。"),
    ("水霉病有什么症状？", "鱼体表或伤口上长出白色棉絮状菌丝，多发生在低温和受伤后。可用盐浴配合亚甲基蓝药浴，并提高水温。"),
    ("亚硝酸盐超标怎么处理？", "立即换水三分之一，暂停喂食，补充硝化细菌并加强增氧，之后每天检测直到降到零。"),
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def tiny_records(n: int) -> list[dict]:
    """``n`` records in the data stage's output format (text + raw fields)."""
    from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

    tpl = get_template()
    rows = []
    for i in range(n):
        q, a = TINY_QA[i % len(TINY_QA)]
        rows.append(
            {
                "text": tpl.training_text(q, a, DEFAULT_SYSTEM_PROMPT),
                "question": q,
                "answer": a,
                "category": "test",
            }
        )
    return rows


@pytest.fixture(scope="session")
def smoke_model_dir() -> Path:
    """The tiny random Qwen2 (real tokenizer), built once under models/."""
    from fishtune.smoke_model import ensure_smoke_model

    return ensure_smoke_model(REPO / "models" / "smoke-tiny", size="tiny")


@pytest.fixture(scope="session")
def smoke_model_k256_dir() -> Path:
    """The variant whose matrix rows are multiples of 256 (llama.cpp K-quants)."""
    from fishtune.smoke_model import ensure_smoke_model

    return ensure_smoke_model(REPO / "models" / "smoke-k256", size="k256")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """train/valid/test.jsonl with a handful of records."""
    d = tmp_path_factory.mktemp("tiny_data")
    write_jsonl(d / "train.jsonl", tiny_records(16))
    write_jsonl(d / "valid.jsonl", tiny_records(4))
    write_jsonl(d / "test.jsonl", tiny_records(4))
    return d
