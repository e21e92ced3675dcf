"""Atomic writes and overwrite protection shared by every stage."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from fishtune.errors import UserError


def _plain_file_mode(path: str | os.PathLike) -> None:
    # mkstemp makes 0600 files; give the file the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    For writers that want a file name (``mx.save_safetensors``, ``GGUFWriter``,
    ``savefig``, llama.cpp's quantizer). On any exception the temporary file is
    removed and ``path`` is untouched, so a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix: some writers pick the format from it (savefig, save_safetensors).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _plain_file_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it becomes ``path``.

    An existing ``path`` is replaced only after the new folder is complete
    (``replace_dir``). On any exception the temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + rename (fsync'd)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` the same file as ``src`` (a hard link; a copy where links fail), atomically.

    fishtune itself only ever replaces files by rename, which gives the name a
    new inode and leaves a linked twin alone. A tool that rewrites a file in
    place (``mx.save_safetensors`` does) changes both names: readers of linked
    files that must not change (checkpoints) record and check a checksum.
    """
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not supported
            shutil.copyfile(src, tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def ensure_can_write(path: str | os.PathLike, force: bool, what: str = "output") -> None:
    """Refuse to overwrite finished work unless ``--force`` was given."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())) and not force:
        raise UserError(f"{what} {path} already exists; pass --force to overwrite it")


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a fully written temp folder into place (old one removed last)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, final_dir)


def read_json_object(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """Read a JSON file that must hold an object; errors name the file and ``fix``."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} must hold a JSON object; {fix}")
    return obj


def iter_jsonl(path: str | os.PathLike) -> Iterable[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a UTF-8 JSONL file.

    Invalid JSON, non-objects and non-UTF-8 bytes are one-line UserErrors naming
    the file and line.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as exc:
                raise UserError(f"{path} is not UTF-8 ({exc.reason} after line {lineno}); re-save it as UTF-8") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | os.PathLike, missing: str | None = None) -> list[dict[str, Any]] | None:
    """All objects of a JSONL file (see :func:`iter_jsonl`).

    ``missing``: the fix to name when the file does not exist (UserError);
    None returns None for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        if missing is None:
            return None
        raise UserError(f"{path} not found; {missing}")
    return [row for _, row in iter_jsonl(path)]
