"""``python -m fishtune.infer [inference.py's flags]``; ``python -m fishtune.infer chat [inference-chat.py's flags]``."""
import sys

from fishtune.errors import run_cli

if sys.argv[1:2] == ["chat"]:
    from fishtune.infer.chat_cli import main

    sys.exit(run_cli(main)(sys.argv[2:]))
from fishtune.infer.cli import main  # noqa: E402

sys.exit(run_cli(main)())
