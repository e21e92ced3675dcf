"""OpenBLAS is preloaded before mlx, so MLX matmuls run at BLAS speed."""
import subprocess
import sys

import pytest

import fishtune  # noqa: F401
from fishtune.blas import find_openblas, loaded_blas, measure_gflops


@pytest.mark.skipif(sys.platform != "linux", reason="the preload only matters on Linux")
def test_openblas_is_loaded_and_mlx_is_fast():
    assert find_openblas(), "OpenBLAS missing: apt-get install libopenblas0-pthread"
    assert loaded_blas(), "fishtune did not preload OpenBLAS"
    rates = measure_gflops()
    mlx_rate, numpy_rate = rates["mlx"], rates["numpy"]
    # The bundled reference BLAS is ~20x slower than numpy's OpenBLAS; with the
    # preload MLX is on par. A generous ratio, not a wall-clock threshold.
    assert mlx_rate > numpy_rate / 4, f"MLX {mlx_rate:.1f} GFLOP/s vs numpy {numpy_rate:.1f}"


def test_env_var_turns_preload_off():
    code = "import fishtune; from fishtune.blas import loaded_blas; print(loaded_blas())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"FISHTUNE_NO_OPENBLAS": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "None"
