"""The Ollama Modelfile: the GGUF plus the exact prompt format of training.

Everything prompt-related comes from ``fishtune.template``: ``TEMPLATE`` is
``PromptTemplate.ollama_template()`` (Go text/template over ``.System`` /
``.Messages``, rendering byte for byte what training saw), ``SYSTEM`` is the
system prompt used in training, and there is one ``PARAMETER stop`` line per
stop string. A fine-tuned model that "never stops" in Ollama is almost always
a TEMPLATE or stop mismatch; here they cannot drift apart.

``FROM`` is relative to the Modelfile's own folder, which is how
``ollama create -f PATH`` resolves it (it joins relative paths with the
Modelfile's directory). So ``ollama_model/Modelfile`` says
``FROM ./qwen2-fish.gguf`` and the repo's top-level ``Modelfile`` says
``FROM ./ollama_model/qwen2-fish.gguf``.

Run ``python -m fishtune.export modelfile`` (:mod:`fishtune.export.modelfile_cli`) to (re)write one by hand.
"""
from __future__ import annotations

import os
from pathlib import Path

from fishtune.errors import UserError
from fishtune.template import DEFAULT_SYSTEM_PROMPT, PromptTemplate, get_template

DEFAULT_NUM_CTX = 1024
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
# The seed's default pipeline: GGUF in ollama_model/, repo Modelfile at the root.
DEFAULT_GGUF = "ollama_model/qwen2-fish.gguf"
REPO_MODELFILE_FROM = "./" + DEFAULT_GGUF


def from_path(gguf_path: str | os.PathLike, modelfile_path: str | os.PathLike) -> str:
    """``FROM`` value: the GGUF relative to the Modelfile's folder, POSIX style."""
    gguf_abs = Path(gguf_path).resolve()
    base = Path(modelfile_path).resolve().parent
    rel = Path(os.path.relpath(gguf_abs, base)).as_posix()
    return rel if rel.startswith("../") else "./" + rel


def _triple_quoted(what: str, text: str) -> str:
    # Ollama's parser has no escapes inside """...""": the value ends at the first """.
    if '"""' in text:
        raise UserError(f"the {what} contains three double quotes in a row, which an Ollama Modelfile cannot hold; remove them")
    return '"""' + text + '"""'


def render_modelfile(
    from_value: str,
    template: PromptTemplate,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    num_ctx: int = DEFAULT_NUM_CTX,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
) -> str:
    """The Modelfile text; ``from_value`` is written as given (see ``from_path``)."""
    if "\n" in from_value or not from_value.strip():
        raise UserError(f"bad FROM path {from_value!r}; pass a GGUF file path")
    if num_ctx <= 0:
        raise UserError(f"--num-ctx must be positive, got {num_ctx}")
    lines = [
        f"# Ollama Modelfile for the fish-care assistant (prompt template: {template.name}).",
        "# TEMPLATE, SYSTEM and the stop strings are exactly what fine-tuning used.",
        "# Build and run:  ollama create fish-care-assistant -f Modelfile && ollama run fish-care-assistant",
        f"FROM {from_value}",
        "",
        f"PARAMETER temperature {temperature:g}",
        f"PARAMETER top_p {top_p:g}",
        f"PARAMETER num_ctx {num_ctx}",
        *template.ollama_stop_lines(),
        "",
        f"TEMPLATE {_triple_quoted('template', template.ollama_template())}",
    ]
    if system_prompt:
        lines += ["", f"SYSTEM {_triple_quoted('system prompt', system_prompt)}"]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs, following Ollama's Modelfile parser rules.

    A value runs to the end of the line unless it opens a quote: ``\"\"\"...\"\"\"``
    (may span lines) or ``"..."``; quotes are stripped, nothing is unescaped.
    ``PARAMETER name value`` becomes ``(name, value)``. Used by the tests to
    read back what Ollama would see.
    """
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        # skip blank space and comments
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        j = i
        while j < n and text[j].isalpha():
            j += 1
        cmd = text[i:j].lower()
        if cmd == "parameter":
            j += 1
            k = j
            while k < n and (text[k].isalnum() or text[k] == "_"):
                k += 1
            cmd, j = text[j:k], k
        elif cmd == "from":
            cmd = "model"
        j += 1  # the separating space
        if text.startswith('"""', j):
            end = text.find('"""', j + 3)
            if end < 0:
                raise ValueError(f"unterminated \"\"\" value for {cmd}")
            value, i = text[j + 3 : end], end + 3
        elif text.startswith('"', j):
            end = text.find('"', j + 1)
            value, i = text[j + 1 : end], end + 1
        else:
            end = text.find("\n", j)
            end = n if end < 0 else end
            value, i = text[j:end].strip(), end
        out.append((cmd, value))
    return out


def write_modelfile(
    modelfile_path: str | os.PathLike,
    gguf_path: str | os.PathLike,
    template: PromptTemplate,
    system_prompt: str | None,
    num_ctx: int = DEFAULT_NUM_CTX,
) -> str:
    """Render and write atomically; returns the text."""
    from fishtune.fileio import atomic_write_text

    text = render_modelfile(from_path(gguf_path, modelfile_path), template, system_prompt, num_ctx)
    atomic_write_text(modelfile_path, text)
    return text


def repo_modelfile_text() -> str:
    """What the repo's top-level ``Modelfile`` must contain (kept equal by a test)."""
    return render_modelfile(REPO_MODELFILE_FROM, get_template(), DEFAULT_SYSTEM_PROMPT, DEFAULT_NUM_CTX)


__all__ = ["DEFAULT_NUM_CTX", "DEFAULT_GGUF", "REPO_MODELFILE_FROM", "from_path", "render_modelfile", "parse_modelfile",
           "write_modelfile", "repo_modelfile_text"]

