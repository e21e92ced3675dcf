"""Helpers for data-parallel runs under ``mlx.launch`` (no-ops in one process).

``mlx.launch -n 2 --backend ring python finetune.py ...`` starts one process
per rank and passes each the ring's addresses in the JSON file named by
``MLX_HOSTFILE`` (a list, per rank, of ``"ip:port"`` strings).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, TypeVar

from fishtune.errors import UserError

T = TypeVar("T")

logger = logging.getLogger(__name__)


def world() -> Any:
    import mlx.core as mx

    return mx.distributed.init()


def bcast_tree(tree: Any, group: Any) -> Any:
    """Rank 0's values on every rank (all_sum with zeros elsewhere)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    if group.size() == 1:
        return tree
    keep = group.rank() == 0
    return tree_map(lambda x: mx.distributed.all_sum(x if keep else mx.zeros_like(x), group=group, stream=mx.cpu), tree)


def bcast_int(value: int, group: Any) -> int:
    import mlx.core as mx

    if group.size() == 1:
        return value
    arr = mx.array([value if group.rank() == 0 else 0], dtype=mx.int64)
    return int(mx.distributed.all_sum(arr, group=group, stream=mx.cpu).item())


def on_rank0(fn: Callable[[], T], group: Any, what: str) -> T | None:
    """Run ``fn`` on rank 0 only; every rank learns whether it failed.

    A UserError on rank 0 is raised on every rank (the others get a pointer
    to rank 0's message), so no rank waits forever for a peer that gave up.
    Returns ``fn()`` on rank 0 and None elsewhere.
    """
    value: T | None = None
    err: UserError | None = None
    if group.rank() == 0:
        try:
            value = fn()
        except UserError as exc:
            err = exc
    if bcast_int(1 if err else 0, group):
        raise err or UserError(f"rank 0 could not {what}; see its error message")
    return value


def all_sum_float(value: Any, group: Any) -> float:
    import mlx.core as mx

    if group.size() == 1:
        return float(value.item() if hasattr(value, "item") else value)
    arr = value if hasattr(value, "dtype") else mx.array(float(value))
    return float(mx.distributed.all_sum(arr, group=group, stream=mx.cpu).item())


def local_rank_count(rank: int, size: int) -> int:
    """How many ranks run on this host (same IP in the ring hostfile); 1 if unknown."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path or size == 1:
        return 1
    try:
        hosts = json.loads(open(path, encoding="utf-8").read() or "[]")
        ip_of = [str(h[0]).rsplit(":", 1)[0] if h else "" for h in hosts]
        return max(1, sum(1 for ip in ip_of if ip and ip == ip_of[rank]))
    except (OSError, ValueError, IndexError, TypeError):
        return 1


def limit_blas_threads(rank: int, size: int) -> int | None:
    """Share the cores among the ranks on this host (unless OPENBLAS_NUM_THREADS is set).

    Two ranks on a 2-core machine would each start 2 OpenBLAS threads and
    oversubscribe the cores. Returns the thread count set, or None.
    """
    if size == 1 or os.environ.get("OPENBLAS_NUM_THREADS"):
        return None
    from fishtune.blas import loaded_blas

    lib = loaded_blas()
    if not lib:
        return None
    local = local_rank_count(rank, size)
    n = max(1, (os.cpu_count() or 1) // local)
    try:
        import ctypes

        ctypes.CDLL(lib).openblas_set_num_threads(n)
    except (OSError, AttributeError):
        return None
    logger.info("OpenBLAS threads per rank: %d (%d rank(s) on this host, %s cores)", n, local, os.cpu_count())
    return n
