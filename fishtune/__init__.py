"""fishtune: fine-tune Qwen2 with DoRA through MLX-LM and ship it everywhere.

Importing the package first makes MLX use OpenBLAS on Linux (see ``blas``);
every stage script imports ``fishtune`` before anything that imports ``mlx``.
"""
from fishtune.blas import ensure_fast_blas

ensure_fast_blas()

__version__ = "0.1.0"
