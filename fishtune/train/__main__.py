import sys

from fishtune.errors import run_cli
from fishtune.train.cli import main

sys.exit(run_cli(main)())
