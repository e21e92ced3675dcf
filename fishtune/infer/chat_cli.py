"""``inference-chat.py``: an interactive multi-turn chat with the fine-tuned model.

Answers stream as they are generated; earlier turns are kept in the prompt
within the context budget (oldest dropped first, never the current
question). Commands: /clear, /system <text>, /help, /exit. Ctrl-C stops the
current answer and keeps the session. From a pipe: one question (or
command) per line, one answer per question, no prompts or terminal codes.
Also ``python -m fishtune.infer.chat_cli``.
"""
from __future__ import annotations

import argparse
import sys

from fishtune.errors import UserError, setup_logging

HELP = """commands:
  /clear          forget the conversation so far (the system prompt stays)
  /system <text>  set the system prompt (and clear the conversation); /system alone shows it
  /help           this help
  /exit           quit (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C while an answer is streaming stops that answer."""


def build_parser() -> argparse.ArgumentParser:
    from fishtune.infer.generation import add_sampling_args
    from fishtune.loading import add_model_args

    p = argparse.ArgumentParser(
        prog="inference-chat.py",
        description="Chat with the fine-tuned model (base model + adapter), with multi-turn history.",
        epilog=HELP + "\n\nFrom a pipe: one question (or command) per line, one answer per question,\n"
        "e.g.  printf '鱼身上有白点怎么办？\\n要换水吗？\\n' | python inference-chat.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--system", default=None,
                   help="system prompt (default: the one the adapter was trained with)")
    p.add_argument("--max-context-tokens", type=int, default=2048,
                   help="context budget in tokens for prompt + answer; the oldest turns are dropped to fit "
                        "(default: %(default)s)")
    p.add_argument("--max-turns", type=int, default=None, help="keep at most N earlier turns (default: no cap)")
    p.add_argument("--show-prompt", action="store_true",
                   help="print each rendered prompt to stderr (debugging the template and the history)")
    add_sampling_args(p)
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


class _Cancel:
    """SIGINT while an answer streams sets an Event instead of raising (the session goes on)."""

    def __init__(self) -> None:
        import threading

        self.event = threading.Event()

    def __enter__(self):
        import signal

        self.event.clear()
        self._old = signal.signal(signal.SIGINT, lambda *_: self.event.set())
        return self.event

    def __exit__(self, *exc) -> None:
        import signal

        signal.signal(signal.SIGINT, self._old)


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def read_line(interactive: bool) -> str | None:
    """The next input line, or None at the end of input (Ctrl-D, Ctrl-C at the prompt, end of the pipe)."""
    try:
        line = input("> ") if interactive else sys.stdin.readline()
    except (EOFError, KeyboardInterrupt):
        line = None
    except UnicodeDecodeError as exc:
        raise UserError(f"standard input is not UTF-8 ({exc.reason}); send UTF-8 text") from None
    if line is None or (not interactive and line == ""):
        if interactive:
            sys.stdout.write("\n")
        return None
    return line.strip()


def run_command(line: str, session, interactive: bool) -> bool:
    """A /command; returns False for /exit."""
    cmd, _, rest = line.partition(" ")
    if cmd in ("/exit", "/quit"):
        return False
    if cmd == "/help":
        say(HELP)
    elif cmd == "/clear":
        session.clear()
        if interactive:
            say("(conversation cleared)")
    elif cmd == "/system" and rest.strip():
        session.set_system(rest)
        session.clear()
        if interactive:
            say("(system prompt set; conversation cleared)")
    elif cmd == "/system":
        say(f"system prompt: {session.system_prompt or '(none)'}")
    else:
        say(f"unknown command {cmd}; type /help")
    return True


def answer(lm, session, line: str, sampling, interactive: bool, show_prompt: bool) -> None:
    """Stream the answer to ``line``; a finished answer joins the history, a stopped one does not."""
    from fishtune.infer.generation import stream_generate

    try:
        prompt = session.prompt_for(line)
    except UserError as exc:  # e.g. a line that is not UTF-8: skip it, keep the session
        sys.stderr.write(f"error: {exc}\n")
        sys.stderr.flush()
        return
    if show_prompt:
        sys.stderr.write(f"--- prompt ---\n{prompt}\n--- end prompt ---\n")
        sys.stderr.flush()
    parts: list[str] = []
    finish = None
    with _Cancel() as cancel:
        for chunk in stream_generate(lm, prompt, sampling, cancel=cancel):
            parts.append(chunk.text)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            finish = chunk.finish_reason or finish
    if finish == "cancelled":
        say("\n[stopped]")
        return
    say("")
    if finish == "length" and interactive:
        say(f"[answer cut at --max-tokens {sampling.max_tokens}]")
    session.add_turn(line, "".join(parts))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from fishtune.infer.chat import ChatSession
    from fishtune.infer.generation import sampling_from_args
    from fishtune.loading import load_from_args

    sampling = sampling_from_args(args)
    budget = args.max_context_tokens - sampling.max_tokens
    if budget < 16:
        raise UserError(
            f"--max-context-tokens {args.max_context_tokens} leaves {budget} tokens for the prompt after "
            f"--max-tokens {sampling.max_tokens}; raise --max-context-tokens or lower --max-tokens"
        )
    if args.max_turns is not None and args.max_turns < 0:
        raise UserError(f"--max-turns {args.max_turns} must be 0 or more (0 = no earlier turns in the prompt)")
    interactive = sys.stdin.isatty()
    lm = load_from_args(args)
    system = args.system if args.system is not None else lm.system_prompt
    session = ChatSession(lm.template, system, tokenizer=lm.tokenizer, max_context_tokens=budget,
                          max_turns=args.max_turns)
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        say(f"fishtune chat: {lm.describe()}\ntype /help for commands, /exit to quit")
    while (line := read_line(interactive)) is not None:
        if not line:
            continue
        if line.startswith("/"):
            if not run_command(line, session, interactive):
                break
            continue
        answer(lm, session, line, sampling, interactive, args.show_prompt)
    return 0
