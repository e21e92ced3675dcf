"""``python -m fishtune.serve``: the same as ``server.py``."""
import sys

from fishtune.errors import run_cli
from fishtune.serve.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main)())
