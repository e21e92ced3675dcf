"""fishtune.chat.ChatSession and inference-chat.py through a pipe and a pseudo-terminal."""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from fishtune.infer.chat import ChatSession
from fishtune.errors import UserError
from fishtune.template import get_template
from conftest import train_tiny_adapter

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PROMPT_BLOCK = re.compile(r"--- prompt ---\n(.*?)\n--- end prompt ---", re.S)


# ---- ChatSession ---------------------------------------------------------------------------
def test_session_renders_history_with_the_template():
    tpl = get_template("alpaca")
    s = ChatSession(tpl, "系统", max_context_tokens=10_000)
    assert s.prompt_for("  问一  ") == tpl.question_prompt("问一", "系统")
    s.add_turn("问一", "答一")
    expected = tpl.render_prompt(
        [{"role": "user", "content": "问一"}, {"role": "assistant", "content": "答一"},
         {"role": "user", "content": "问二"}], "系统")
    assert s.prompt_for("问二") == expected
    assert s.messages == [{"role": "system", "content": "系统"}, {"role": "user", "content": "问一"},
                          {"role": "assistant", "content": "答一"}]
    s.clear()
    assert s.messages == [{"role": "system", "content": "系统"}]
    assert s.prompt_for("问三") == tpl.question_prompt("问三", "系统")
    s.set_system("新的系统")
    assert s.prompt_for("问三").startswith("新的系统\n\n")
    s.set_system("")
    assert s.prompt_for("问三") == tpl.question_prompt("问三", None)
    with pytest.raises(UserError, match="the question is empty"):
        s.prompt_for("   ")


def test_oldest_turns_dropped_first_never_the_question():
    tpl = get_template("chatml")
    s = ChatSession(tpl, None, max_context_tokens=300)  # no tokenizer: characters are counted
    for i in range(10):
        s.add_turn(f"问题{i}" * 3, f"回答{i}" * 3)
    p = s.prompt_for("现在的问题")
    assert len(p) <= 300 and "现在的问题" in p
    assert "回答9" in p and "问题0" not in p  # newest kept, oldest gone
    kept = [i for i in range(10) if f"问题{i}" in p]
    assert kept == list(range(kept[0], 10)) and s.last_dropped == 10 - len(kept)
    assert len(s.turns) == len(kept)  # dropped turns are forgotten
    # A question longer than the budget is still asked, alone.
    long_q = "很长的问题" * 50
    p = s.prompt_for(long_q)
    assert long_q in p and "问题9" not in p and s.turns == []


def test_budget_counts_tokens_and_max_turns(smoke_model_dir):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(Path(smoke_model_dir))
    tpl = get_template("alpaca")
    s = ChatSession(tpl, "系统", tokenizer=tok, max_context_tokens=60)
    for i in range(6):
        s.add_turn(f"第{i}个问题是什么", f"第{i}个回答")
    p = s.prompt_for("最后")
    assert len(tok.encode(p)) <= 60 and "第5个回答" in p and "第0个问题" not in p
    s2 = ChatSession(tpl, None, max_turns=2)
    for i in range(5):
        s2.add_turn(f"q{i}", f"a{i}")
    assert [q for q, _ in s2.turns] == ["q3", "q4"]
    with pytest.raises(UserError, match="max_context_tokens=0 must be at least 1"):
        ChatSession(tpl, None, max_context_tokens=0)


# ---- the script ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(smoke_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    return train_tiny_adapter(smoke_model_dir, tiny_data_dir, tmp_path_factory.mktemp("chat") / "dora")


def chat_argv(adapter: Path, *extra: str) -> list[str]:
    return [str(REPO / "inference-chat.py"), "--adapter-path", str(adapter), "--temperature", "0", "--show-prompt",
            *extra]


def test_chat_through_a_pipe(adapter):
    script = "问题甲\n问题乙\n\n/clear\n问题丙\n/system 新系统提示\n问题丁\n/exit\n问题戊\n"
    p = subprocess.run([sys.executable, *chat_argv(adapter, "--max-tokens", "6")], input=script,
                       capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    blocks = PROMPT_BLOCK.findall(p.stderr)
    assert len(blocks) == 4  # /exit stopped before 问题戊; the blank line was skipped
    assert "问题甲" in blocks[1] and "问题乙" in blocks[1]  # history carried
    assert "问题丙" in blocks[2] and "问题甲" not in blocks[2] and "问题乙" not in blocks[2]  # /clear cleared
    assert blocks[3].startswith("新系统提示\n\n") and "问题丙" not in blocks[3]  # /system set + cleared
    # Scriptable: no prompts, banners or terminal codes on stdout.
    assert "> " not in p.stdout and "\x1b" not in p.stdout and "fishtune chat" not in p.stdout
    assert p.stdout.count("\n") >= 4


class Term:
    """A child process on a pseudo-terminal (its controlling tty: Ctrl-C sends SIGINT)."""

    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            os.chdir(REPO)
            os.execve(sys.executable, [sys.executable, *argv], ENV)
        self.buf = ""
        self.pos = 0

    def text(self) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r", "", self.buf)

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        rx = re.compile(pattern, re.S)
        end = time.monotonic() + timeout
        while True:
            m = rx.search(self.text(), self.pos)
            if m:
                self.pos = m.end()
                return m
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got:\n{self.text()[self.pos:]}")
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if r:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"child ended waiting for {pattern!r}; got:\n{self.text()[self.pos:]}")
                self.buf += data.decode("utf-8", errors="replace")

    def send(self, s: str) -> None:
        os.write(self.fd, s.encode("utf-8"))

    def wait(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full pty
                if select.select([self.fd], [], [], 0.2)[0]:
                    os.read(self.fd, 65536)
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise AssertionError("chat did not exit")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_chat_in_a_terminal_clear_really_clears(adapter):
    t = Term(chat_argv(adapter, "--max-tokens", "6"))
    try:
        t.expect(r"type /help.*?> ")
        t.send("问题甲\n")
        t.expect(r"--- end prompt ---.*?\n> ")
        t.send("问题乙\n")
        block = t.expect(r"--- prompt ---\n(.*?)\n--- end prompt ---").group(1)
        assert "问题甲" in block and "问题乙" in block
        t.expect(r"\n> ")
        t.send("/clear\n")
        t.expect(r"\(conversation cleared\)\n> ")
        t.send("问题丙\n")
        block = t.expect(r"--- prompt ---\n(.*?)\n--- end prompt ---").group(1)
        assert "问题丙" in block and "问题甲" not in block and "问题乙" not in block
        t.expect(r"\n> ")
        t.send("/help\n")
        t.expect(r"/clear .*?/exit.*?\n> ")
        t.send("/exit\n")
        assert t.wait() == 0
    finally:
        t.kill()


def test_ctrl_c_stops_the_answer_not_the_session(adapter):
    t = Term(chat_argv(adapter, "--max-tokens", "3000", "--max-context-tokens", "4000"))
    try:
        t.expect(r"type /help.*?> ")
        t.send("问题甲\n")
        t.expect(r"--- end prompt ---\n.{3}")  # the answer is streaming
        t.send("\x03")  # Ctrl-C
        t.expect(r"\[stopped\]\n> ")
        t.send("/system\n")  # the session is alive and answers commands
        t.expect(r"system prompt: 你是一个专业的鱼病护理助手.*?\n> ")
        # Let readline reach its wait for input: a SIGINT landing between the prompt's
        # write and CPython's select() is only seen at the next key (a human is slower).
        time.sleep(0.5)
        t.send("\x03")  # Ctrl-C at the prompt exits
        assert t.wait() == 0
    finally:
        t.kill()


@pytest.mark.parametrize("flags, message", [
    (["--max-turns", "-1"], "error: --max-turns -1 must be 0 or more (0 = no earlier turns in the prompt)"),
    (["--max-context-tokens", "10"], "error: --max-context-tokens 10 leaves -502 tokens for the prompt after "
                                      "--max-tokens 512; raise --max-context-tokens or lower --max-tokens"),
])
def test_bad_flags_exit_2_with_one_line_before_loading(tmp_path, flags, message):
    # A missing adapter would fail too: the flag is checked first, before any model is loaded.
    p = subprocess.run([sys.executable, str(REPO / "inference-chat.py"), "--adapter-path", str(tmp_path / "none"),
                        *flags], input="q\n", capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert p.returncode == 2
    assert p.stderr == message + "\n"


def test_help_lists_the_chat_commands():
    p = subprocess.run([sys.executable, str(REPO / "inference-chat.py"), "--help"], capture_output=True, text=True,
                       cwd=REPO, env=ENV, timeout=120)
    assert p.returncode == 0
    for cmd in ("/clear", "/system <text>", "/help", "/exit", "From a pipe"):
        assert cmd in p.stdout


def test_a_line_that_is_not_utf8_is_skipped_not_fatal(adapter):
    script = "问题甲\n".encode() + b"\xff\xfe\n" + "问题乙\n".encode()
    p = subprocess.run([sys.executable, *chat_argv(adapter, "--max-tokens", "2")], input=script,
                       capture_output=True, cwd=REPO, env=ENV, timeout=120)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0, err
    assert "error: the question is not valid UTF-8 text (byte 0xff) at character 0; send UTF-8 text" in err
    assert "Traceback" not in err
    blocks = PROMPT_BLOCK.findall(err)
    assert len(blocks) == 2 and "问题甲" in blocks[1] and "问题乙" in blocks[1]


def test_ensure_utf8():
    from fishtune.infer.generation import ensure_utf8

    assert ensure_utf8("鱼") == "鱼"
    bad = b"ok\xff".decode("utf-8", "surrogateescape")
    with pytest.raises(UserError, match=r"--question is not valid UTF-8 text \(byte 0xff\) at character 2"):
        ensure_utf8(bad, "--question")
