"""Make MLX's CPU backend use OpenBLAS instead of the reference BLAS it bundles.

The Linux ``mlx-cpu`` wheel links a slow reference BLAS/LAPACK. If OpenBLAS is
loaded with ``RTLD_GLOBAL`` *before* ``mlx`` is first imported, the dynamic
linker resolves MLX's ``sgemm``/``cblas_sgemm`` calls to OpenBLAS: measured
here, a 1024x1024 float32 matmul goes from ~2.7 to ~55 GFLOP/s (about 20x).

This module only uses ``ctypes``; it must stay free of heavy imports because
``fishtune/__init__.py`` runs it before anything else touches ``mlx``.
Set ``FISHTUNE_NO_OPENBLAS=1`` to turn it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys

logger = logging.getLogger(__name__)

DISABLE_ENV = "FISHTUNE_NO_OPENBLAS"

# Where Debian/Ubuntu and common distributions put the pthread OpenBLAS build.
_CANDIDATE_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so*",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so*",
    "/usr/lib/*/libopenblas.so*",
    "/usr/lib64/libopenblas*.so*",
    "/usr/local/lib/libopenblas*.so*",
)

_state: dict[str, object] = {"path": None, "tried": False, "warned": False}


def find_openblas() -> str | None:
    """Return a path to an OpenBLAS shared library, or None."""
    for pattern in _CANDIDATE_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    name = ctypes.util.find_library("openblas")
    return name


def ensure_fast_blas() -> str | None:
    """Load OpenBLAS globally before mlx is imported. Idempotent.

    Returns the loaded library path, or None (macOS, disabled, not found, or
    mlx already imported - then it is too late to change its BLAS).
    """
    if _state["tried"]:
        return _state["path"]  # type: ignore[return-value]
    _state["tried"] = True
    if sys.platform != "linux":
        return None  # macOS uses Accelerate; nothing to do.
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        logger.debug("OpenBLAS preload disabled by %s", DISABLE_ENV)
        return None
    if "mlx.core" in sys.modules:
        logger.debug("mlx was imported before fishtune; its BLAS cannot be changed now")
        return None
    path = find_openblas()
    if path is None:
        _warn_slow()
        return None
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError as exc:  # a broken or foreign-architecture library
        logger.debug("could not load %s: %s", path, exc)
        _warn_slow()
        return None
    _state["path"] = path
    logger.debug("MLX will use OpenBLAS from %s", path)
    return path


def loaded_blas() -> str | None:
    """The OpenBLAS path that was preloaded, if any."""
    return _state["path"]  # type: ignore[return-value]


def _warn_slow() -> None:
    if not _state["warned"]:
        _state["warned"] = True
        sys.stderr.write(
            "fishtune: OpenBLAS not found; MLX will use its slow bundled BLAS "
            "(install it: sudo apt-get install libopenblas0-pthread)\n"
        )


def measure_gflops(size: int = 1024, reps: int = 5) -> dict[str, float]:
    """float32 ``size``x``size`` matmul speed in GFLOP/s: MLX (this process) and numpy."""
    import time

    import mlx.core as mx
    import numpy as np

    def rate(fn) -> float:
        fn()  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return reps * 2 * size**3 / (time.perf_counter() - t) / 1e9

    a = mx.random.normal((size, size))
    mx.eval(a)
    an = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    return {"mlx": rate(lambda: mx.eval(a @ a)), "numpy": rate(lambda: an @ an)}

