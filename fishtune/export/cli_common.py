"""What the export commands share on the command line: ``--dry-run``, ``--force``, ``--verbose``."""
from __future__ import annotations

import argparse
from typing import Callable

from fishtune.errors import setup_logging


def add_common_flags(p: argparse.ArgumentParser, *, dry_run: str, force: str, verbose: str = "debug logging") -> None:
    """The three flags every export command takes, with its own wording of what they do."""
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    p.add_argument("--force", action="store_true", help=force)
    p.add_argument("--verbose", action="store_true", help=verbose)


def parse_args(build_parser: Callable[[str | None], argparse.ArgumentParser], argv: list[str] | None,
               prog: str | None) -> argparse.Namespace:
    """Parse ``argv`` with the command's parser (``prog``: its name under ``python -m fishtune.export``); set up logging."""
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose)
    return args
