"""``python -m fishtune.export {huggingface,gguf,modelfile} ...``: the export stage's commands.

Each subcommand takes the same flags as its script: ``huggingface`` =
``convert_to_huggingface.py``, ``gguf`` = ``convert_to_gguf.py``,
``modelfile`` = write a Modelfile for an existing GGUF.
"""
import importlib
import sys

from fishtune.errors import run_cli

COMMANDS = {
    "huggingface": ("fishtune.export.hf_cli", "fused Hugging Face folder + PEFT adapter (convert_to_huggingface.py)"),
    "gguf": ("fishtune.export.gguf_cli", "GGUF, llama.cpp quantization, proof, Modelfile (convert_to_gguf.py)"),
    "modelfile": ("fishtune.export.modelfile_cli", "an Ollama Modelfile for a GGUF file"),
}
PROG = "python -m fishtune.export"


def usage() -> str:
    lines = [f"usage: {PROG} {{{','.join(COMMANDS)}}} [flags]  ({PROG} COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<12} {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(usage() + f"{PROG}: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}\n")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"{PROG} {name}")


if __name__ == "__main__":
    sys.exit(run_cli(main)())
