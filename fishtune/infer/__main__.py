import sys

from fishtune.errors import run_cli
from fishtune.infer.cli import main

sys.exit(run_cli(main)())
