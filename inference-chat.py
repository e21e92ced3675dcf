#!/usr/bin/env python3
"""inference-chat: an interactive multi-turn chat with the fine-tuned model.

Answers stream as they are generated; earlier turns are kept in the prompt
within the context budget (oldest dropped first, never the current
question). Commands: /clear, /system <text>, /help, /exit.

Ctrl-C stops the current answer and keeps the session; Ctrl-C at the prompt
or end of input (Ctrl-D) exits. From a pipe it reads one question (or
command) per line and prints one answer per question, with no prompts,
banners or terminal codes::

    printf '鱼身上有白点怎么办？\\n要换水吗？\\n' | python inference-chat.py
"""
import sys

from fishtune.errors import run_cli
from fishtune.infer.chat_cli import build_parser, main  # noqa: F401  (build_parser: the flags, for tools)

if __name__ == "__main__":
    sys.exit(run_cli(main)())
