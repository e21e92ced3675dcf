"""User-facing errors: one clear line, exit code 2, no traceback."""
from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix: bad input, missing file, wrong flag.

    The message is one line that names the file/record/field, the bad value
    and the fix. Stage scripts print it as ``error: <message>`` and exit 2.
    """


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (the last three ``...``): a bad value quoted in a one-line message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cli(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a stage's ``main(argv)`` so UserError becomes one line and exit 2."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return int(main(argv) or 0)
        except UserError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            return 130

    return wrapper


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Configure the root logger for a stage script (``--verbose`` = DEBUG, ``quiet`` = warnings only).

    Only scripts call this; library code never touches the root logger.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
