"""``python -m mlx_lm.server`` with OpenBLAS, for a fair comparison with server.py (bench_serve.py starts it).

On Linux the mlx-cpu wheel's bundled BLAS is ~20x slower than OpenBLAS;
server.py gets OpenBLAS because ``import fishtune`` preloads it before MLX
loads (fishtune/blas.py). Run plainly, ``python -m mlx_lm.server`` never
imports fishtune, so this launcher does exactly that first, then runs
mlx-lm's own server ``main`` with the same command-line arguments:

    python bench/mlx_lm_server_openblas.py --model bench/work/bench-model --port 8080
"""
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fishtune  # noqa: E402,F401  (loads OpenBLAS before mlx is imported)

if __name__ == "__main__":
    sys.argv[0] = "mlx_lm.server"
    runpy.run_module("mlx_lm.server", run_name="__main__", alter_sys=True)
