"""Deduplication and the seeded, category-stratified split."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from fishtune.data.records import Record
from fishtune.errors import UserError
from fishtune.project import DataFiles

SPLITS = DataFiles.SPLITS


@dataclass
class Duplicate:
    number: int
    duplicate_of: int
    kind: str  # "exact" | "near"
    question: str


# --------------------------------------------------------------------------- dedup
def dedup(records: Sequence[Record]) -> tuple[list[Record], list[Duplicate]]:
    """Drop exact (same question+answer) and near (same question key) duplicates; first wins."""
    exact_seen: dict[tuple[str, ...], int] = {}
    key_seen: dict[str, int] = {}
    kept: list[Record] = []
    dups: list[Duplicate] = []
    for r in records:
        if r.exact_key in exact_seen:
            dups.append(Duplicate(r.number, exact_seen[r.exact_key], "exact", r.question))
        elif r.question_key in key_seen:
            dups.append(Duplicate(r.number, key_seen[r.question_key], "near", r.question))
        else:
            exact_seen[r.exact_key] = r.number
            key_seen[r.question_key] = r.number
            kept.append(r)
    return kept, dups


# --------------------------------------------------------------------------- split
def check_ratios(train: float, valid: float, test: float) -> None:
    for name, v in (("--train-ratio", train), ("--valid-ratio", valid), ("--test-ratio", test)):
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise UserError(f"{name} {v} is out of range; use a number between 0 and 1")
    if train <= 0:
        raise UserError("--train-ratio must be greater than 0")
    total = train + valid + test
    if abs(total - 1.0) > 1e-6:
        raise UserError(
            f"--train-ratio/--valid-ratio/--test-ratio add up to {total:g} ({train:g}+{valid:g}+{test:g}); make them add up to 1"
        )


def split_sizes(n: int, valid_ratio: float, test_ratio: float) -> tuple[int, int, int]:
    """(train, valid, test) sizes. Valid/test with a ratio > 0 get at least one
    record once there are 3 or more; train always keeps at least one."""
    if n < 3:
        return n, 0, 0
    n_valid = int(math.floor(n * valid_ratio + 0.5))
    n_test = int(math.floor(n * test_ratio + 0.5))
    if valid_ratio > 0:
        n_valid = max(1, n_valid)
    if test_ratio > 0:
        n_test = max(1, n_test)
    while n_valid + n_test > n - 1:
        if n_valid >= n_test and n_valid > (1 if valid_ratio > 0 else 0):
            n_valid -= 1
        elif n_test > (1 if test_ratio > 0 else 0):
            n_test -= 1
        else:
            n_valid -= 1
    return n - n_valid - n_test, n_valid, n_test


def _apportion(
    sizes: dict[str, int], total: int, ratio: float, capacity: dict[str, int], tiebreak: dict[str, float]
) -> dict[str, int]:
    """Split ``total`` across categories in proportion to their sizes (largest remainder).

    Ties go to the larger category, then to a seeded random order (not the
    alphabet: with many one-record categories the names would pick the split)."""
    ideal = {c: sizes[c] * ratio for c in sizes}
    out = {c: min(int(math.floor(ideal[c])), capacity[c]) for c in sizes}
    order = sorted(sizes, key=lambda c: (-round(ideal[c] - math.floor(ideal[c]), 9), -sizes[c], tiebreak[c], c))
    deficit = total - sum(out.values())
    # First keep one train record per category where possible, then take what is needed.
    for reserve in (1, 0):
        changed = True
        while deficit > 0 and changed:
            changed = False
            for c in order:
                if deficit > 0 and out[c] < capacity[c] - (reserve if sizes[c] > 1 else 0):
                    out[c] += 1
                    deficit -= 1
                    changed = True
    # Too many (split_sizes shrank the total below the floors): give back, smallest remainders first.
    for c in reversed(order):
        while deficit < 0 and out[c] > 0:
            out[c] -= 1
            deficit += 1
    return out


def _final_key(r: Record) -> str:
    """The key of the question a record is trained and evaluated on (its last user turn)."""
    return r.turn_keys[-1] if r.turn_keys else r.question_key


def conversation_groups(records: Sequence[Record]) -> list[list[Record]]:
    """Records linked by a question, in source order: each group goes to one split whole.

    A record is linked to every conversation that asks its (last) question as
    one of its turns: every assistant turn is trained on, so a conversation
    in train would otherwise teach the answer to a test record. Turns that
    are nobody's last question (a shared greeting) link nothing. Most groups
    hold one record.
    """
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, r in enumerate(records):
        owner.setdefault(_final_key(r), i)
    for i, r in enumerate(records):
        for key in r.turn_keys or (r.question_key,):
            j = owner.get(key)
            if j is not None:
                parent[root(i)] = root(j)
    groups: dict[int, list[Record]] = {}
    for i, r in enumerate(records):
        groups.setdefault(root(i), []).append(r)
    return sorted(groups.values(), key=lambda g: g[0].number)


def split_records(
    records: Sequence[Record], train_ratio: float, valid_ratio: float, test_ratio: float, seed: int
) -> dict[str, list[Record]]:
    """Seeded split, stratified by category, of whole conversation groups; each split in source order.

    The sizes count groups (one record each, unless records share a user
    turn), stratified by the category of a group's first record.
    """
    check_ratios(train_ratio, valid_ratio, test_ratio)
    units = conversation_groups(records)
    _, n_valid, n_test = split_sizes(len(units), valid_ratio, test_ratio)
    by_cat: dict[str, list[list[Record]]] = {}
    for g in units:
        by_cat.setdefault(g[0].category, []).append(g)
    cats = sorted(by_cat)
    sizes = {c: len(by_cat[c]) for c in cats}
    rng = random.Random(seed)
    shuffled = {}
    for c in cats:  # sorted order + one RNG: the same seed gives the same split
        g = list(by_cat[c])
        rng.shuffle(g)
        shuffled[c] = g
    tiebreak = {c: rng.random() for c in cats}
    v = _apportion(sizes, n_valid, valid_ratio, dict(sizes), tiebreak)
    t = _apportion(sizes, n_test, test_ratio, {c: sizes[c] - v[c] for c in cats}, tiebreak)
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for c in cats:
        g = shuffled[c]
        for split, part in (("valid", g[: v[c]]), ("test", g[v[c] : v[c] + t[c]]), ("train", g[v[c] + t[c] :])):
            out[split].extend(r for unit in part for r in unit)
    for s in SPLITS:
        out[s].sort(key=lambda r: r.number)
    _assert_no_leak(out)
    return out


def _assert_no_leak(splits: dict[str, list[Record]]) -> None:
    # Dedup already guarantees this; a leak would silently inflate eval scores.
    asked: dict[str, set[str]] = {}
    for s in SPLITS:
        for r in splits[s]:
            for key in r.turn_keys or (r.question_key,):
                asked.setdefault(key, set()).add(s)
    for s in SPLITS:
        for r in splits[s]:
            assert asked[_final_key(r)] == {s}, f"question {r.question!r} is asked in {sorted(asked[_final_key(r)])}"
    ids = [r.id for s in SPLITS for r in splits[s]]
    assert len(ids) == len(set(ids)), "duplicate ids across splits"
