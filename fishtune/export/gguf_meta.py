"""Which prompt template and system prompt a GGUF file was made for.

``convert_to_gguf.py`` puts the project template into the GGUF
(``tokenizer.chat_template``, as Jinja) and writes a Modelfile next to it
(``TEMPLATE`` and ``SYSTEM``); the HF export's ``fishtune.json`` may sit
there too. Whoever runs the file (``server.py --gguf``) finds them here.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from fishtune.fileio import read_json_object
from fishtune.project import ExportFiles
from fishtune.template import (
    DEFAULT_SYSTEM_PROMPT,
    PromptTemplate,
    get_template,
    template_names,
)

logger = logging.getLogger(__name__)


def _template_rendering_as(render: Callable[[PromptTemplate], str], text: str | None) -> PromptTemplate | None:
    """The project template whose ``render(template)`` is ``text``, if any."""
    if not text:
        return None
    for name in template_names():
        tpl = get_template(name)
        if render(tpl) == text:
            return tpl
    return None


def template_from_jinja(chat_template: str | None) -> PromptTemplate | None:
    """The project template whose Jinja rendering is ``chat_template`` (GGUF metadata), if any."""
    return _template_rendering_as(PromptTemplate.jinja_chat_template, chat_template)


def _read_modelfile(path: Path) -> dict[str, str]:
    from fishtune.export.modelfile import parse_modelfile

    try:
        return dict(parse_modelfile(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as exc:
        logger.warning("ignoring %s: %s", path, exc)
        return {}


def gguf_project_meta(gguf_path: Path, metadata: dict[str, str]) -> tuple[PromptTemplate, str, str]:
    """(template, system prompt, where they came from) for a GGUF file.

    The template: the GGUF's ``tokenizer.chat_template`` when it is one of
    ours, else the Modelfile's TEMPLATE next to the file, else
    ``fishtune.json`` (HF export) next to it, else the default. The system
    prompt: the Modelfile's SYSTEM, else ``fishtune.json``'s, else the default.
    """
    gguf_path = Path(gguf_path)
    template = template_from_jinja(metadata.get("tokenizer.chat_template"))
    source = ["template from the GGUF metadata"] if template else []
    system: str | None = None
    modelfile = gguf_path.parent / ExportFiles.MODELFILE
    if modelfile.is_file():
        pairs = _read_modelfile(modelfile)
        if template is None:
            template = _template_rendering_as(PromptTemplate.ollama_template, pairs.get("template"))
            if template is not None:
                source.append(f"template from {modelfile}")
        if "system" in pairs:
            system = pairs["system"]
            source.append(f"system prompt from {modelfile}")
    meta_file = gguf_path.parent / ExportFiles.META
    if meta_file.is_file() and (template is None or system is None):
        d = read_json_object(meta_file, "fix or delete it")
        if template is None and d.get("template"):
            template = get_template(d["template"])
            source.append(f"template from {meta_file}")
        if system is None and isinstance(d.get("system_prompt"), str):
            system = d["system_prompt"]
            source.append(f"system prompt from {meta_file}")
    if template is None:
        template = get_template()
        source.append("default template")
    if system is None:
        system = DEFAULT_SYSTEM_PROMPT
        source.append("default system prompt")
    return template, system, "; ".join(source)


__all__ = ["gguf_project_meta", "template_from_jinja"]
