"""The prompt template: defined once, rendered for every consumer.

Two named templates:

* ``alpaca`` (default, the seed's)::

      [{system}\\n\\n]### Instruction:\\n{question}\\n\\n### Response:\\n{answer}<|endoftext|>

  A multi-turn conversation repeats the Instruction/Response block; earlier
  answers end with the end token followed by a blank line.
* ``chatml`` (Qwen2's native)::

      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>

From each single definition we derive: the training text (prompt + answer +
end token), the generation prompt for a list of messages, the stop strings,
a Jinja ``chat_template`` (tokenizer_config.json and GGUF metadata) and the
Ollama ``TEMPLATE`` with its ``PARAMETER stop`` lines. Tests render all of
them and compare byte for byte.

Messages are dicts ``{"role": "system"|"user"|"assistant", "content": str}``.
A ``system`` message in the list overrides the ``system`` argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from fishtune.errors import UserError

Message = Mapping[str, str]

DEFAULT_TEMPLATE = "alpaca"

# The seed's SYSTEM prompt (its Modelfile). Used in training too, so Ollama,
# the server and inference all see exactly the text the model was trained on.
DEFAULT_SYSTEM_PROMPT = (
    "你是一个专业的鱼病护理助手，基于MLX微调，回答关于鱼类养殖、疾病防治等问题，简洁准确、符合专业知识。"
)


@dataclass(frozen=True)
class PromptTemplate:
    """One conversation format.

    ``system_format``, ``user_format`` and ``assistant_format`` hold
    ``{content}``; ``turn_separator`` goes between an assistant answer and the
    next turn. The answer the model must produce is ``assistant_format``
    formatted with the answer, i.e. it includes ``end_token``.
    """

    name: str
    system_format: str
    user_format: str
    assistant_format: str
    turn_separator: str
    end_token: str
    stop_strings: tuple[str, ...]

    # ---- Python renderings -------------------------------------------------
    def _render(self, system: str | None, turns: Sequence[Message]) -> str:
        out = [self.system_format.format(content=system)] if system else []
        for i, m in enumerate(turns):
            if m["role"] == "user":
                out.append(self.user_format.format(content=m["content"]))
            else:
                out.append(self.assistant_format.format(content=m["content"]))
                if i != len(turns) - 1:
                    out.append(self.turn_separator)
        return "".join(out)

    def render_prompt(self, messages: Sequence[Message], system: str | None = None) -> str:
        """The generation prompt: history + the last user message, ready for the answer."""
        own_system, turns = check_messages(messages, end="user")
        return self._render(system if own_system is None else own_system, turns)

    def render_conversation(self, messages: Sequence[Message], system: str | None = None) -> str:
        """A full conversation (ending with an assistant answer) as training text."""
        own_system, turns = check_messages(messages, end="assistant")
        return self._render(system if own_system is None else own_system, turns)

    def split_for_training(self, messages: Sequence[Message], system: str | None = None) -> tuple[str, str]:
        """(prompt, completion): the loss is computed on ``completion`` only.

        ``prompt + completion == render_conversation(messages, system)`` and the
        completion ends with the end token, so the model learns to stop.
        """
        own_system, turns = check_messages(messages, end="assistant")
        system = system if own_system is None else own_system
        prompt = self._render(system, turns[:-1])
        completion = self.assistant_format.format(content=turns[-1]["content"])
        return prompt, completion

    def training_turns(self, messages: Sequence[Message], system: str | None = None) -> list[tuple[str, str]]:
        """``(prefix, completion)`` for EVERY assistant turn of a training conversation.

        ``prefix`` is the whole text before that answer (system prompt, earlier
        turns, the question) and ``prefix + completion`` is a prefix of
        ``render_conversation(messages, system)``; the last pair is
        :meth:`split_for_training`. Training computes the loss on every
        completion, so each answer of a multi-turn conversation is supervised.
        """
        own_system, turns = check_messages(messages, end="assistant")
        system = system if own_system is None else own_system
        return [
            (self._render(system, turns[:i]), self.assistant_format.format(content=m["content"]))
            for i, m in enumerate(turns) if m["role"] == "assistant"
        ]

    def training_text(self, question: str, answer: str, system: str | None = None) -> str:
        """Single-turn shortcut used by the data stage."""
        return self.render_conversation(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], system
        )

    def question_prompt(self, question: str, system: str | None = None) -> str:
        """Single-turn generation prompt."""
        return self.render_prompt([{"role": "user", "content": question}], system)

    def strip_stop(self, text: str) -> tuple[str, bool]:
        """Cut ``text`` at the first stop string. Returns (text, stopped)."""
        cut = find_stop(text, self.stop_strings)
        if cut < 0:
            return text, False
        return text[:cut], True

    # ---- Jinja (transformers' apply_chat_template, GGUF metadata) ----------
    def jinja_chat_template(self) -> str:
        """A Jinja chat template equal to ``render_prompt`` / ``render_conversation``.

        With ``add_generation_prompt`` or not, a conversation ending with a user
        message renders exactly as ``render_prompt``; one ending with an
        assistant message as ``render_conversation``.
        """

        def lit(s: str) -> str:
            return "{{ " + _jinja_str(s) + " }}"

        sys_pre, sys_post = self.system_format.split("{content}")
        user_pre, user_post = self.user_format.split("{content}")
        asst_pre, asst_post = self.assistant_format.split("{content}")
        return (
            "{%- set ns = namespace(system='') -%}"
            "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if ns.system -%}" + lit(sys_pre) + "{{ ns.system }}" + lit(sys_post) + "{%- endif -%}"
            "{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}"
            "{%- for m in turns -%}"
            "{%- if m['role'] == 'user' -%}" + lit(user_pre) + "{{ m['content'] }}" + lit(user_post) +
            "{%- elif m['role'] == 'assistant' -%}" + lit(asst_pre) + "{{ m['content'] }}" + lit(asst_post) +
            "{%- if not loop.last -%}" + lit(self.turn_separator) + "{%- endif -%}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )

    # ---- Ollama (Go text/template over .System / .Messages / .Prompt) ------
    def ollama_template(self) -> str:
        """Ollama ``TEMPLATE`` body rendering the training prompt byte for byte.

        Uses ``.System`` for the preamble and skips system-role entries of
        ``.Messages`` (Ollama passes system messages in both). Falls back to
        ``.Prompt`` for ``/api/generate``.
        """
        sys_pre, sys_post = self.system_format.split("{content}")
        user_pre, user_post = self.user_format.split("{content}")
        asst_pre, asst_post = self.assistant_format.split("{content}")
        def g(text: str) -> str:  # literal text as a Go string action; nothing for ""
            return "{{ " + _go_str(text) + " }}" if text else ""

        return (
            "{{- if .System }}" + g(sys_pre) + "{{ .System }}" + g(sys_post) + "{{ end }}"
            "{{- if .Messages }}"
            "{{- range $i, $m := .Messages }}"
            "{{- if eq $m.Role \"user\" }}" + g(user_pre) + "{{ $m.Content }}" + g(user_post) +
            "{{- else if eq $m.Role \"assistant\" }}" + g(asst_pre) + "{{ $m.Content }}"
            + g(asst_post + self.turn_separator) +
            "{{- end }}"
            "{{- end }}"
            "{{- else }}" + g(user_pre) + "{{ .Prompt }}" + g(user_post) +
            "{{- end }}"
        )

    def ollama_stop_lines(self) -> list[str]:
        return [f"PARAMETER stop {_go_str(s)}" for s in self.stop_strings]


ROLES = ("system", "user", "assistant")


def check_messages(
    messages: Sequence[Message], end: str | None = None, label: str = "messages"
) -> tuple[str | None, list[Message]]:
    """The one set of message rules; returns ``(system, turns)``.

    Every message has a known role and string content; the non-system turns
    alternate user/assistant, starting with user; with ``end`` the last turn
    has that role (``"user"``: a prompt; ``"assistant"``: a training
    conversation). A system message anywhere sets the system prompt (the last
    one wins; ``system`` is None when there is none, "" for an empty one). Used by the template, the data stage and the server, with
    ``label`` naming the field in the message.
    """
    system: str | None = None
    turns: list[Message] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{label}[{i}].role is {role!r}: unknown role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise UserError(f"{label}[{i}]: content must be a string, got {type(content).__name__}")
        if role == "system":
            system = content
        else:
            turns.append(m)
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise UserError(
                f"turn {i + 1} of {label!r}: expected a {expected} turn, got {m['role']}; "
                "conversations alternate user/assistant and start with user"
            )
    if end == "user" and (not turns or turns[-1]["role"] != "user"):
        raise UserError("the last message of a prompt must be a user message")
    if end == "assistant" and (not turns or turns[-1]["role"] != "assistant"):
        raise UserError(f"{label!r} must end with an assistant answer")
    return system, turns


def find_stop(text: str, stops: Iterable[str]) -> int:
    """Index of the first stop string in ``text`` (the earliest of any), or -1."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


def _jinja_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _go_str(s: str) -> str:
    """A Go double-quoted string literal (valid in templates and Modelfiles)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        name="alpaca",
        system_format="{content}\n\n",
        user_format="### Instruction:\n{content}\n\n### Response:\n",
        assistant_format="{content}<|endoftext|>",
        turn_separator="\n\n",
        end_token="<|endoftext|>",
        stop_strings=("###", "<|endoftext|>"),
    ),
    "chatml": PromptTemplate(
        name="chatml",
        system_format="<|im_start|>system\n{content}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant_format="{content}<|im_end|>",
        turn_separator="\n",
        end_token="<|im_end|>",
        stop_strings=("<|im_end|>", "<|endoftext|>"),
    ),
}


def get_template(name: str | None = None) -> PromptTemplate:
    """Look a template up by name; unknown names are refused with the known ones."""
    name = name or DEFAULT_TEMPLATE
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"unknown template {name!r}; choose one of: {', '.join(sorted(TEMPLATES))}") from None


def template_names() -> Iterable[str]:
    return sorted(TEMPLATES)
