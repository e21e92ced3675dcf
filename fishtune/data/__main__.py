import sys

from fishtune.data.cli import main
from fishtune.errors import run_cli

sys.exit(run_cli(main)())
