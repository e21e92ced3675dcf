"""The Ollama Modelfile renders the training prompt: checked with Go's own text/template and transformers' Jinja."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fishtune.errors import UserError
from fishtune.export.modelfile import (
    REPO_MODELFILE_FROM,
    from_path,
    parse_modelfile,
    render_modelfile,
    repo_modelfile_text,
    write_modelfile,
)
from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

REPO = Path(__file__).resolve().parent.parent
GO_PROGRAM = REPO / "tests" / "go" / "render_template.go"

Q1, A1 = "孔雀鱼多久换一次水？", "一般每周换水一次，每次换三分之一左右。"
Q2, A2 = "水温多少合适？", "24到28度之间，避免骤变。"
Q3 = "那换水时要注意什么？"

CONVERSATIONS = {
    "single": [{"role": "user", "content": Q1}],
    "multi": [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": Q2},
        {"role": "assistant", "content": A2},
        {"role": "user", "content": Q3},
    ],
    "quotes and braces": [{"role": "user", "content": 'He said "{{ .System }}" \\n and ### left'}],
}
SYSTEMS = {"system": DEFAULT_SYSTEM_PROMPT, "no system": None}


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Build tests/go/render_template.go once; returns render(template, system, messages, prompt)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("`go` is not on PATH (Debian: apt-get install golang-go); cannot render with Go's text/template")
    work = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOCACHE": str(work / "cache"), "GOPATH": str(work / "gopath"), "GOFLAGS": "",
           "GOPROXY": "off", "GO111MODULE": "auto", "CGO_ENABLED": "0"}
    exe = work / "render_template"
    proc = subprocess.run([go, "build", "-o", str(exe), str(GO_PROGRAM)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr

    def render(template: str, system: str | None, messages: list[dict], prompt: str = "") -> str:
        payload = {"template": template, "system": system or "", "messages": messages, "prompt": prompt}
        p = subprocess.run([str(exe)], input=json.dumps(payload, ensure_ascii=False).encode("utf-8"),
                           capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr.decode()
        return p.stdout.decode("utf-8")

    return render


@pytest.mark.parametrize("tname", ["alpaca", "chatml"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("sys_name", list(SYSTEMS))
def test_go_text_template_renders_the_training_prompt(go_render, tname, conv, sys_name):
    tpl = get_template(tname)
    system = SYSTEMS[sys_name]
    messages = CONVERSATIONS[conv]
    # Modelfile SYSTEM + the /api/chat messages, as Ollama passes them
    got = go_render(tpl.ollama_template(), system, messages)
    assert got == tpl.render_prompt(messages, system)
    # A full conversation's training text starts with the same bytes the model sees when answering
    if conv == "multi":
        train = tpl.render_conversation(messages + [{"role": "assistant", "content": "答"}], system)
        assert train.startswith(got)


@pytest.mark.parametrize("tname", ["alpaca", "chatml"])
def test_go_request_system_message_overrides_modelfile_system(go_render, tname):
    tpl = get_template(tname)
    messages = [{"role": "system", "content": "你是鱼医生。"}] + CONVERSATIONS["multi"]
    got = go_render(tpl.ollama_template(), DEFAULT_SYSTEM_PROMPT, messages)
    assert got == tpl.render_prompt(messages, DEFAULT_SYSTEM_PROMPT)
    assert DEFAULT_SYSTEM_PROMPT not in got and "你是鱼医生。" in got


@pytest.mark.parametrize("tname", ["alpaca", "chatml"])
def test_go_generate_endpoint_prompt(go_render, tname):
    """/api/generate turns ``prompt`` into a user message: the single-turn training prompt."""
    tpl = get_template(tname)
    assert go_render(tpl.ollama_template(), DEFAULT_SYSTEM_PROMPT, [], prompt=Q1) == tpl.question_prompt(Q1, DEFAULT_SYSTEM_PROMPT)


@pytest.mark.parametrize("tname", ["alpaca", "chatml"])
def test_modelfile_as_ollama_parses_it_then_go_renders_it(go_render, tmp_path, tname):
    """Read TEMPLATE/SYSTEM back from the written Modelfile (Ollama's quoting rules), render with Go."""
    tpl = get_template(tname)
    gguf = tmp_path / "ollama_model" / "qwen2-fish.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    write_modelfile(gguf.parent / "Modelfile", gguf, tpl, DEFAULT_SYSTEM_PROMPT)
    cmds = parse_modelfile((gguf.parent / "Modelfile").read_text(encoding="utf-8"))
    d = dict(cmds)
    assert d["model"] == "./qwen2-fish.gguf"
    assert (d["temperature"], d["top_p"], d["num_ctx"]) == ("0.7", "0.9", "1024")
    assert [v for k, v in cmds if k == "stop"] == list(tpl.stop_strings)
    assert d["template"] == tpl.ollama_template()
    assert d["system"] == DEFAULT_SYSTEM_PROMPT
    msgs = CONVERSATIONS["multi"]
    assert go_render(d["template"], d["system"], msgs) == tpl.render_prompt(msgs, DEFAULT_SYSTEM_PROMPT)


def test_stop_lines_per_template():
    alpaca = render_modelfile("./m.gguf", get_template("alpaca"))
    chatml = render_modelfile("./m.gguf", get_template("chatml"))
    assert 'PARAMETER stop "###"\nPARAMETER stop "<|endoftext|>"\n' in alpaca
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n' in chatml
    assert "### Instruction" not in chatml


def test_repo_modelfile_is_what_the_default_pipeline_writes():
    """The committed top-level Modelfile == the render for the default template, system prompt and path."""
    text = (REPO / "Modelfile").read_text(encoding="utf-8")
    assert text == repo_modelfile_text()
    d = dict(parse_modelfile(text))
    assert d["model"] == REPO_MODELFILE_FROM == "./ollama_model/qwen2-fish.gguf"
    # relative to the repo root, where the Modelfile lives
    assert from_path(REPO / "ollama_model" / "qwen2-fish.gguf", REPO / "Modelfile") == REPO_MODELFILE_FROM


def test_from_path_is_relative_to_the_modelfile(tmp_path):
    g = tmp_path / "ollama_model" / "qwen2-fish.gguf"
    assert from_path(g, tmp_path / "ollama_model" / "Modelfile") == "./qwen2-fish.gguf"
    assert from_path(g, tmp_path / "Modelfile") == "./ollama_model/qwen2-fish.gguf"
    assert from_path(g, tmp_path / "deploy" / "Modelfile") == "../ollama_model/qwen2-fish.gguf"


def test_triple_quotes_in_system_prompt_are_refused():
    with pytest.raises(UserError, match=r'system prompt contains three double quotes'):
        render_modelfile("./m.gguf", get_template(), 'say """hi"""')


def test_no_system_line_without_system_prompt():
    text = render_modelfile("./m.gguf", get_template(), None)
    assert "\nSYSTEM " not in text
    assert "system" not in dict(parse_modelfile(text))


def test_modelfile_cli(tmp_path, capsys):
    from fishtune.errors import run_cli
    from fishtune.export.modelfile_cli import main

    out = tmp_path / "Modelfile"
    gguf = tmp_path / "ollama_model" / "qwen2-fish.gguf"
    argv = ["--gguf", str(gguf), "--output", str(out), "--hf-model-dir", str(tmp_path / "none"), "--template", "chatml"]
    assert run_cli(main)(argv) == 0
    assert dict(parse_modelfile(out.read_text(encoding="utf-8")))["template"] == get_template("chatml").ollama_template()
    assert run_cli(main)(argv) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


# ---- the GGUF's Jinja chat_template, through transformers ---------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(smoke_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smoke_model_dir))


@pytest.mark.parametrize("tname", ["alpaca", "chatml"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("sys_name", list(SYSTEMS))
def test_jinja_chat_template_renders_the_training_prompt(hf_tokenizer, tname, conv, sys_name):
    tpl = get_template(tname)
    system = SYSTEMS[sys_name]
    hf_tokenizer.chat_template = tpl.jinja_chat_template()
    messages = CONVERSATIONS[conv]
    with_sys = ([{"role": "system", "content": system}] if system else []) + messages
    got = hf_tokenizer.apply_chat_template(with_sys, tokenize=False, add_generation_prompt=True)
    assert got == tpl.render_prompt(messages, system)
    full = with_sys + [{"role": "assistant", "content": A1}]
    assert hf_tokenizer.apply_chat_template(full, tokenize=False) == tpl.render_conversation(full)


def test_modelfile_cli_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    from fishtune.errors import run_cli
    from fishtune.export.modelfile_cli import main

    out = tmp_path / "Modelfile"
    argv = ["--gguf", str(tmp_path / "m.gguf"), "--output", str(out), "--hf-model-dir", str(tmp_path / "none"),
            "--dry-run"]
    assert run_cli(main)(argv) == 0
    assert capsys.readouterr().out == render_modelfile("./m.gguf", get_template(), DEFAULT_SYSTEM_PROMPT)
    assert not out.exists()
