"""``python -m fishtune.blas_check``: MLX matmul speed with and without the OpenBLAS preload.

The number the README quotes comes from here (measured in one run, same machine).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import fishtune  # noqa: F401  (preloads OpenBLAS before mlx)
from fishtune.blas import DISABLE_ENV, loaded_blas, measure_gflops


def main() -> int:
    preloaded = measure_gflops()
    code = "import fishtune, json; from fishtune.blas import measure_gflops; print(json.dumps(measure_gflops()))"
    env = {**os.environ, DISABLE_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    bundled = json.loads(out)
    print(f"BLAS preloaded: {loaded_blas() or 'none'}")
    print(
        f"1024x1024 float32 matmul: MLX + OpenBLAS {preloaded['mlx']:.1f} GFLOP/s, "
        f"MLX + bundled BLAS {bundled['mlx']:.1f} GFLOP/s ({preloaded['mlx'] / bundled['mlx']:.0f}x), "
        f"numpy {preloaded['numpy']:.1f} GFLOP/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
