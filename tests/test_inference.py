"""inference.py and fishtune.infer.generation: one question, raw prompt, batch, evaluation, stop strings, errors.

Real MLX-LM generation on the tiny smoke model with an adapter trained in the test.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO
from fishtune.errors import UserError, run_cli
from fishtune.infer.generation import SamplingConfig, StopStringFilter
from conftest import train_tiny_adapter


from fishtune.infer import cli as inference  # noqa: E402  (inference.py's main)


def cli(*argv) -> int:
    return run_cli(inference.main)([str(a) for a in argv] + ["--no-progress"])


@pytest.fixture(scope="module")
def adapter(smoke_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    return train_tiny_adapter(smoke_model_dir, tiny_data_dir, tmp_path_factory.mktemp("inference") / "dora")


@pytest.fixture(scope="module")
def lm(adapter):
    from fishtune.loading import load_model

    return load_model(None, str(adapter))


# ---- stop strings (synthetic chunks) -------------------------------------------------
def _run_filter(stops, pieces):
    f = StopStringFilter(stops)
    emitted, stopped = [], False
    for p in pieces:
        out, stopped = f.feed(p)
        emitted.append(out)
        if stopped:
            break
    if not stopped:
        emitted.append(f.flush())
    return emitted, stopped


def test_stop_string_split_over_chunks_is_never_emitted():
    emitted, stopped = _run_filter(("###", "<|endoftext|>"), ["换水", "一周一次。\n", "\n#", "#", "# Instruction"])
    assert stopped and "".join(emitted) == "换水一周一次。"
    assert all("#" not in e for e in emitted)  # a partial "##" never leaves the filter
    assert emitted[:2] == ["换水", "一周一次。"]  # the rest streams at once; the newline waits


def test_false_alarm_prefix_is_released():
    emitted, stopped = _run_filter(("###",), ["水温 #", "1 号缸", "\n"])
    assert not stopped and "".join(emitted) == "水温 #1 号缸"
    assert emitted[0] == "水温"  # " #" held until "1" shows it is no stop


def test_stop_inside_one_chunk_and_multiple_stops():
    emitted, stopped = _run_filter(("###", "<|im_end|>"), ["答案<|im_", "end|>后面"])
    assert stopped and "".join(emitted) == "答案"
    emitted, stopped = _run_filter(("###", "<|endoftext|>"), ["a<|endoftext|>b###c"])
    assert stopped and emitted == ["a"]


def test_last_piece_releases_what_is_held_or_stops():
    f = StopStringFilter(("###",))
    assert f.feed("水温 #") == ("水温", False)
    assert f.feed("1 号缸 ##", last=True) == (" #1 号缸 ##", False)  # the stream ends: nothing is held back
    assert StopStringFilter(("###",)).feed("答案 ###后面", last=True) == ("答案", True)


def test_sampling_config_validation():
    s = SamplingConfig()
    assert (s.temperature, s.top_p, s.max_tokens, s.top_k, s.min_p, s.repetition_penalty) == (0.7, 0.9, 512, 0, 0.0, 1.0)
    with pytest.raises(UserError, match=r"temperature=-1 is out of range; use a value in \[0, 5\]"):
        SamplingConfig(temperature=-1)
    with pytest.raises(UserError, match=r"top_p=0 is out of range; use a value in \(0, 1\]"):
        SamplingConfig(top_p=0)
    with pytest.raises(UserError, match=r"max_tokens=0 is out of range"):
        SamplingConfig(max_tokens=0)
    with pytest.raises(UserError, match=r"top_k must be an integer, got 'x'"):
        SamplingConfig(top_k="x")
    with pytest.raises(UserError, match=r"repetition_penalty=0 is out of range"):
        SamplingConfig(repetition_penalty=0)
    with pytest.raises(UserError, match=r"min_p=1.5 is out of range"):
        SamplingConfig(min_p=1.5)
    assert SamplingConfig(max_tokens=8.0).max_tokens == 8


# ---- generation on the real model -------------------------------------------------------
def test_stop_strings_cut_real_generation(lm):
    from fishtune.infer.generation import generate, stream_generate

    greedy = SamplingConfig(temperature=0, max_tokens=24)
    prompt = lm.template.question_prompt("鱼身上有白点怎么办？", lm.system_prompt)
    free = dataclasses.replace(lm, template=dataclasses.replace(lm.template, stop_strings=()))
    text = generate(free, prompt, greedy).text
    visible = [i for i, c in enumerate(text) if not c.isspace() and c != "\ufffd"]
    assert len(visible) > 8, text
    start = visible[len(visible) // 2]
    stop = text[start:start + 2]
    expected = text[: text.find(stop)].rstrip()

    cut = dataclasses.replace(lm, template=dataclasses.replace(lm.template, stop_strings=(stop,)))
    chunks = list(stream_generate(cut, prompt, greedy))
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].prompt_tokens == len(lm.tokenizer.encode(prompt))


def test_length_and_cancel(lm):
    from fishtune.infer.generation import generate, stream_generate

    prompt = lm.template.question_prompt("金鱼翻肚子怎么办？", lm.system_prompt)
    res = generate(lm, prompt, SamplingConfig(temperature=0, max_tokens=5))
    assert res.finish_reason in ("length", "stop")
    if res.finish_reason == "length":
        assert res.generation_tokens == 5
    # Same seed, same sampled answer.
    s = SamplingConfig(temperature=1.0, top_k=50, min_p=0.05, repetition_penalty=1.2, max_tokens=6, seed=3)
    assert generate(lm, prompt, s).text == generate(lm, prompt, s).text

    cancel = threading.Event()
    cancel.set()
    chunks = list(stream_generate(lm, prompt, SamplingConfig(max_tokens=50), cancel=cancel))
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].generation_tokens == 1

    # Breaking out of the iterator stops generation too (the server's disconnects).
    it = stream_generate(lm, prompt, SamplingConfig(temperature=0, max_tokens=50))
    next(it)
    it.close()


# ---- inference.py -------------------------------------------------------------------------
def test_single_question_streams_an_answer(adapter, capsys):
    assert cli("--question", "鱼身上有白点怎么办？", "--adapter-path", adapter, "--max-tokens", 8,
               "--temperature", 0, "--stats") == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and out.strip()
    assert "prompt " in err and "answer " in err and "tokens/s" in err

    # The base model gets the same prompt; the answer differs (the adapter matters).
    assert cli("--question", "鱼身上有白点怎么办？", "--adapter-path", adapter, "--no-adapter",
               "--max-tokens", 8, "--temperature", 0) == 0
    base_out = capsys.readouterr().out
    assert base_out != out


def test_bare_command_asks_the_seed_question(adapter, capsys, caplog):
    # The seed guide runs `python3 inference.py` with no arguments.
    import logging

    with caplog.at_level(logging.INFO, logger="inference"):
        assert cli("--adapter-path", adapter, "--max-tokens", 4, "--temperature", 0) == 0
    assert capsys.readouterr().out.strip()
    assert any("孔雀鱼多久换一次水？" in r.getMessage() for r in caplog.records)


def test_raw_prompt(adapter, capsys):
    assert cli("--prompt", "### Instruction:\\n孔雀鱼\\n\\n### Response:\\n", "--adapter-path", adapter,
               "--max-tokens", 4, "--temperature", 0) == 0
    assert capsys.readouterr().out.strip()


def test_batch_mode(adapter, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    assert cli("--input", tiny_data_dir / "test.jsonl", "--output", out, "--adapter-path", adapter,
               "--max-tokens", 4, "--seed", 1) == 0
    rows = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    src = [json.loads(l) for l in (tiny_data_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(src)
    for r, s in zip(rows, src):
        assert r["question"] == s["question"] and r["answer"] == s["answer"]
        assert isinstance(r["prediction"], str) and r["finish_reason"] in ("stop", "length")
    assert "wrote 4 predictions" in capsys.readouterr().err
    # Finished work is not overwritten without --force.
    assert cli("--input", tiny_data_dir / "test.jsonl", "--output", out, "--adapter-path", adapter) == 2
    assert "--force" in capsys.readouterr().err


def test_evaluation_report(adapter, tiny_data_dir, tmp_path, capsys):
    report = tmp_path / "eval_report.json"
    assert cli("--evaluate", tiny_data_dir / "test.jsonl", "--adapter-path", adapter, "--limit", 2,
               "--max-tokens", 6, "--report", report) == 0
    out = capsys.readouterr().out
    assert "ROUGE-L F1 (chars)" in out and "base" in out and "finetuned" in out and "greedy decoding" in out
    rep = json.loads(report.read_text(encoding="utf-8"))
    assert rep["rows"] == 2 and rep["decoding"] == "greedy" and rep["sampling"]["temperature"] == 0.0
    assert set(rep["models"]) == {"base", "finetuned"}
    for name, m in rep["models"].items():
        for key in ("rouge_l_f1", "bleu4", "exact_stop_rate", "mean_answer_chars", "perplexity", "tokens_per_s"):
            assert isinstance(m[key], float), (name, key)
        assert 0 <= m["rouge_l_f1"] <= 1 and 0 <= m["bleu4"] <= 1 and 0 <= m["exact_stop_rate"] <= 1
        assert m["perplexity"] > 1 and m["rows"] == 2
    assert rep["models"]["base"]["adapter"] is None and rep["models"]["finetuned"]["adapter"] == str(adapter)
    assert rep["models"]["base"]["perplexity"] != rep["models"]["finetuned"]["perplexity"]
    assert len(rep["predictions"]) == 2
    assert {"question", "reference", "base_prediction", "finetuned_prediction"} <= set(rep["predictions"][0])


# ---- errors: one line, exit 2 --------------------------------------------------------------
def test_empty_question_exits_2_with_one_line(adapter):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(REPO / "inference.py"), "--question", "   ", "--adapter-path", str(adapter)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr == "error: --question is empty; give the question text\n"


def test_error_messages(adapter, tmp_path, capsys):
    import shutil

    def err(*argv) -> str:
        assert cli(*argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error: ")
        return lines[-1]

    assert "missing does not exist" in err("--question", "q", "--adapter-path", tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter, corrupt)
    (corrupt / "adapter_config.json").write_text("{", encoding="utf-8")
    assert "is not valid JSON" in err("--question", "q", "--adapter-path", corrupt)
    tpl = tmp_path / "tpl"
    shutil.copytree(adapter, tpl)
    cfg = json.loads((tpl / "adapter_config.json").read_text(encoding="utf-8"))
    cfg["fishtune"]["template"] = "nope"
    (tpl / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert "unknown template 'nope'" in err("--question", "q", "--adapter-path", tpl)
    assert "out of range" in err("--question", "q", "--adapter-path", adapter, "--top-p", "2")
    assert "needs --output" in err("--input", tmp_path / "x.jsonl", "--adapter-path", adapter)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"answer": "a"}\n', encoding="utf-8")
    assert f"{bad}:2: needs a non-empty \"question\"" in err("--evaluate", bad, "--adapter-path", adapter,
                                                           "--report", tmp_path / "r.json")


def test_other_base_is_refused(adapter, smoke_model_k256_dir, capsys, caplog):
    assert cli("--question", "q", "--adapter-path", adapter, "--model", smoke_model_k256_dir) == 2
    err = capsys.readouterr().err
    assert any("differs from the base model the adapter was trained on" in r.getMessage() for r in caplog.records)
    assert "error: adapter" in err and "trained on another base model" in err


def test_bad_input_and_output_paths_fail_before_loading(tmp_path, capsys):
    # The adapter does not exist: each path error must come first, as one line.
    none = tmp_path / "no-adapter"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"question": "é"}\n'.encode("latin-1"))
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    cases = [
        (("--input", rows, "--output", tmp_path), f"--output {tmp_path} is a folder; pass a file path instead"),
        (("--input", rows, "--output", afile / "p.jsonl"), f"can't create the folder of --output {afile / 'p.jsonl'}"),
        (("--evaluate", rows, "--report", tmp_path), f"--report {tmp_path} is a folder; pass a file path instead"),
        (("--input", tmp_path, "--output", tmp_path / "p.jsonl"), f"{tmp_path} is a folder; run process_data.py first"),
        (("--input", latin, "--output", tmp_path / "p.jsonl"), f"{latin} is not UTF-8 (invalid continuation byte"),
        # argv bytes that are not UTF-8 arrive as lone surrogates
        (("--question", b"\xff".decode("utf-8", "surrogateescape")), "--question is not valid UTF-8 text (byte 0xff)"),
    ]
    for argv, message in cases:
        assert cli(*argv, "--adapter-path", none) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: " + message) and err.count("\n") == 1, err
    assert afile.read_text(encoding="utf-8") == "x"


@pytest.mark.parametrize("script", ["inference.py", "inference-chat.py", "process_data.py"])
def test_help_imports_nothing_heavy(script):
    # -X importtime lists every module imported while printing --help.
    p = subprocess.run([sys.executable, "-X", "importtime", str(REPO / script), "--help"], capture_output=True,
                       text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert p.returncode == 0 and "usage:" in p.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in p.stderr.splitlines() if "|" in line}
    assert not imported & {"mlx", "mlx_lm", "torch", "transformers", "numpy", "pandas", "yaml", "tqdm"}, imported


def test_multi_turn_rows_are_prompted_with_their_history(lm, tmp_path, capsys):
    from fishtune.infer.evaluation import predict_rows
    from fishtune.infer.generation import generate

    history = [{"role": "user", "content": "鱼病"}, {"role": "assistant", "content": "隔离观察两周。"}]
    row = {"question": "要换水吗？", "answer": "要。", "history": history}
    greedy = SamplingConfig(temperature=0, max_tokens=6)
    [pred] = predict_rows(lm, [row], greedy, lm.system_prompt, "t", progress=False)
    full = lm.template.render_prompt([*history, {"role": "user", "content": "要换水吗？"}], lm.system_prompt)
    assert "隔离观察两周。" in full
    assert pred["prediction"] == generate(lm, full, greedy).text

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "history": "鱼病"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert cli("--input", bad, "--output", tmp_path / "p.jsonl", "--adapter-path", tmp_path / "none") == 2
    assert f'{bad}:1: "history" must be a list of {{"role", "content"}} objects' in capsys.readouterr().err
