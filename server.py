#!/usr/bin/env python3
"""server: stage stub until its issue lands."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="server.py", description="server stage (not implemented yet)")


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    sys.stderr.write("error: server.py is not implemented yet\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
