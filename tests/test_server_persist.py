"""Conversations survive a restart: the SQLite store, in-process and behind a real server that is killed with -9.

The kill test: finished turns (streamed and not) of two users, then an answer
in mid-stream and another in mid-generation when the process gets SIGKILL;
a new server on the same --data-dir shows every finished turn and neither
interrupted one.
"""
from __future__ import annotations

import json
import sqlite3
import stat
import threading

import pytest
import requests
from conftest import (
    LONG_ANSWER,
    ServerProcess,
    health,
    raw_post,
    sse_events,
    start_mlx_server,
    turn_messages,
    wait_for,
)

from fishtune.errors import UserError
from fishtune.serve.store import SCHEMA_VERSION, SqliteSessionStore


def chat(url: str, session_id: str, message: str, stream: bool) -> str:
    r = requests.post(url + "/api/chat", json={"message": message, "session_id": session_id, "stream": stream},
                      stream=stream, timeout=120)
    assert r.status_code == 200, r.text
    return "".join(e.get("delta", "") for e in sse_events(r)) if stream else r.json()["response"]


def history(url: str, session_id: str) -> list[dict]:
    return requests.get(url + "/api/history", params={"session_id": session_id}, timeout=30).json()["messages"]


def test_12_finished_turns_survive_kill_9_and_interrupted_ones_are_absent(smoke_model_dir, tiny_data_dir, tmp_path):
    # greedy: the same conversation, and interrupted answers as long, every run
    args = ["--max-tokens", "6", "--temperature", "0"]
    srv = start_mlx_server(smoke_model_dir, tiny_data_dir, tmp_path, *args)
    a, b = "persist-user-0001", "persist-user-0002"
    qa = [f"第{i}个问题：水温多少合适？" for i in range(3)]
    qb = ["另一个用户的问题"]
    try:
        ans_a = [chat(srv.url, a, q, stream=i % 2 == 1) for i, q in enumerate(qa)]
        ans_b = [chat(srv.url, b, qb[0], stream=False)]
        streamed = raw_post(srv.port, "/api/chat", json.dumps({**LONG_ANSWER, "session_id": a, "stream": True,
                                                                "message": "被打断的问题"}).encode())
        got = b""
        while got.count(b"data:") < 2:  # mid-stream: deltas have arrived
            got += streamed.recv(4096)
        whole = raw_post(srv.port, "/api/chat", json.dumps({**LONG_ANSWER, "session_id": b}).encode())
        wait_for(lambda: health(srv.url)["generating"] == 2)
        srv.proc.kill()  # SIGKILL: no cleanup of any kind
        srv.proc.wait(timeout=30)
        got += streamed.recv(1 << 20)
        assert b'"done": true' not in got  # it really was interrupted
        streamed.close()
        whole.close()
    finally:
        srv.stop()

    db = sqlite3.connect(tmp_path / "data" / "server.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    srv = start_mlx_server(smoke_model_dir, tiny_data_dir, tmp_path, *args)  # the same --data-dir
    try:
        assert history(srv.url, a) == turn_messages(qa, ans_a)
        assert history(srv.url, b) == turn_messages(qb, ans_b)
        page = requests.Session()  # the page's cookie points at the same conversation after the restart
        page.cookies.set("fishtune_session", a)
        assert page.get(srv.url + "/api/history", timeout=30).json()["messages"] == turn_messages(qa, ans_a)
        h = health(srv.url)
        assert h["persisted"] is True and h["sessions"] == 2
        # the conversation goes on where it was
        more = chat(srv.url, a, "接着问", stream=False)
        assert history(srv.url, a)[-2:] == turn_messages(["接着问"], [more])
    finally:
        srv.stop()


def test_no_persist_keeps_conversations_in_memory_only(tmp_path):
    from fake_ollama import FakeOllama

    with FakeOllama() as fake:
        args = ["--ollama", "fish-care-assistant", "--ollama-url", fake.url, "--no-persist"]
        srv = ServerProcess(args, tmp_path / "first.log")
        try:
            chat(srv.url, "memory-user-0001", "你好", stream=False)
            assert len(history(srv.url, "memory-user-0001")) == 2
            assert health(srv.url)["persisted"] is False and health(srv.url)["store"] == "memory"
        finally:
            srv.stop()
        srv = ServerProcess(args, tmp_path / "second.log")
        try:
            assert history(srv.url, "memory-user-0001") == []
        finally:
            srv.stop()


# ---- the store itself (in-process) -----------------------------------------------------------


def test_store_file_reopens_with_its_turns_limits_and_private_mode(tmp_path):
    path = tmp_path / "data" / "server.sqlite3"
    now = [1000.0]
    st = SqliteSessionStore(path, max_sessions=10, ttl_s=60, max_turns=3, clock=lambda: now[0])
    for i in range(5):
        assert st.add_turn(st.load("aaaaaaaa"), f"q{i}", f"a{i}")
    st.add_turn(st.load("bbbbbbbb"), "q", "a")
    st.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    st = SqliteSessionStore(path, max_sessions=10, ttl_s=60, max_turns=3, clock=lambda: now[0])
    assert st.load("aaaaaaaa").turns == (("q2", "a2"), ("q3", "a3"), ("q4", "a4"))
    assert st.stats()["sessions"] == 2 and st.stats()["store"] == "server.sqlite3"
    now[0] += 61  # idle expiry counts across restarts (wall-clock times in the file)
    assert st.load("aaaaaaaa").turns == () and len(st) == 0
    st.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_store_refuses_a_file_it_cannot_use(tmp_path):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="is not a usable conversation store"):
        SqliteSessionStore(junk)
    newer = tmp_path / "newer.sqlite3"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(UserError, match="written by a newer fishtune"):
        SqliteSessionStore(newer)


def test_store_concurrent_writers_keep_every_turn_in_order(tmp_path):
    st = SqliteSessionStore(tmp_path / "s.sqlite3", max_sessions=100, max_turns=50)

    def writer(k: int) -> None:
        sid = f"writer-{k:04d}"
        for i in range(25):
            assert st.add_turn(st.load(sid), f"{k}-{i}", "a")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(8):
        assert [q for q, _ in st.load(f"writer-{k:04d}").turns] == [f"{k}-{i}" for i in range(25)]
    st.close()
