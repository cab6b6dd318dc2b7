"""File mechanics every stage shares: atomic whole-file writes, JSONL append and read, locks.

Layer 0: pure Python + pydantic. Whole files (reports, manifests, metrics) are written
atomically: a temp file in the same folder, then `os.replace`, so a reader never sees half a
file. JSONL writers append a line and fsync it, so a crash loses at most the line being
written; the reader names the file and line of anything malformed, and its tolerant mode drops
(and reports) a last line torn by a crash. The record schemas themselves live in `records`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar, overload

from pydantic import BaseModel, ValidationError

from emmoe_dist.errors import EmmoeError, InputError

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)


# ---------------------------------------------------------------------------------------------
# JSON files


def dumps_json(value: Any, level: int = 0) -> str:
    """JSON with one key per line but lists of numbers on one line, so a 128-expert layer (or
    a 48 x 48 cosine matrix) stays one readable row per list instead of one line per number."""
    pad, end = " " * (level + 1), " " * level
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(k))}: {dumps_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{end}}}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        items = [pad + dumps_json(v, level + 1) for v in value]
        return "[\n" + ",\n".join(items) + f"\n{end}]"
    return json.dumps(value)


def read_json_object(path: str | os.PathLike[str], what: str = "JSON") -> dict[str, Any]:
    """A JSON file that must hold an object; errors name the file (and line) and say what
    kind of file was expected (`what`: "profile", "selection", "DeepSpeed config", ...)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} file does not exist", file=file) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", file=file, line=e.lineno) from None
    if not isinstance(data, dict):
        raise InputError(f"a {what} file must hold a JSON object", file=file, line=1)
    return data


def json_field_line(text: str, dotted: str) -> int | None:
    """The 1-based line of a dotted key path (`experts.0`) in a JSON text: each key is looked
    for as `"key":` after the line of its parent. None when a key is not found (a list index,
    or a key that is absent); good enough to point a reader at the right place."""
    lines = text.splitlines()
    line = 0
    for key in dotted.split("."):
        pattern = f'"{key}"'
        for number in range(line, len(lines)):
            at = lines[number].find(pattern)
            if at >= 0 and lines[number][at + len(pattern) :].lstrip().startswith(":"):
                line = number
                break
        else:
            return None
    return line + 1


def validation_error(err: ValidationError, file: str) -> InputError:
    """A pydantic error as an InputError naming the file and the first bad field."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = len(err.errors()) - 1
    return InputError(
        message + (f" (and {more} more errors)" if more else ""), file=file, field=field
    )


# ---------------------------------------------------------------------------------------------
# Atomic whole-file writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `path` for any writer (safetensors, savefig, ...); when the
    block succeeds it is renamed over `path`, so readers never see half a file.

    mkstemp creates files readable by their owner only; the finished file gets the
    permissions a plain `open()` would give it, so collaborators on a shared cluster can read
    the outputs.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def tree_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 over a folder's files (relative names and bytes, in name order): the same
    adapter gives the same digest wherever it lies and however its path is spelled."""
    import hashlib

    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def remove_empty_dirs(folders: Iterable[Path]) -> None:
    """Remove each folder that is empty (innermost first); others, and errors, are left."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary folder into place (the old one goes only afterwards)."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# JSONL: one record per line


def _dump_line(record: BaseModel | Mapping[str, Any]) -> str:
    if isinstance(record, BaseModel):
        return record.model_dump_json() + "\n"
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl_atomic(
    path: str | os.PathLike[str],
    records: Iterable[BaseModel | Mapping[str, Any]],
) -> None:
    write_text_atomic(path, "".join(_dump_line(r) for r in records))


def _repair_torn_tail(path: Path) -> None:
    """Cut a last line that a crash left without its newline, so appends start on a fresh line."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        block = 1 << 16
        pos = size
        while pos > 0:  # scan back for the last newline
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                cut = start + nl + 1
                break
            pos = start
        else:
            cut = 0
        log.warning(
            "%s: dropping a torn last line (%d bytes) left by an interrupted write",
            path,
            size - cut,
        )
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


class JsonlAppender:
    """Append records one line at a time; each `write` is flushed and fsynced before it returns."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _repair_torn_tail(self.path)
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: BaseModel | Mapping[str, Any]) -> None:
        self.write_many((record,))

    def write_many(self, records: Iterable[BaseModel | Mapping[str, Any]]) -> None:
        self._file.write("".join(_dump_line(r) for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def append_jsonl(
    path: str | os.PathLike[str], records: Iterable[BaseModel | Mapping[str, Any]]
) -> None:
    with JsonlAppender(path) as out:
        out.write_many(records)


def _field_of(err: ValidationError) -> str:
    first = err.errors()[0]
    return ".".join(str(p) for p in first["loc"]) or "(record)"


def _message_of(err: ValidationError) -> str:
    first = err.errors()[0]
    return str(first["msg"]).removeprefix("Value error, ")


def _parse_line(file: str, number: int, line: str, model: type[R] | None) -> Any:
    if not line.strip():
        raise InputError("empty line", file=file, line=number)
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(
            f"invalid JSON ({e.msg} at column {e.colno})", file=file, line=number
        ) from None
    if model is None:
        if not isinstance(data, dict):
            raise InputError("expected a JSON object", file=file, line=number)
        return data
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InputError(_message_of(e), file=file, line=number, field=_field_of(e)) from None


@overload
def iter_jsonl(
    path: str | os.PathLike[str], model: type[R], *, tolerate_torn_tail: bool = False
) -> Iterator[R]: ...
@overload
def iter_jsonl(
    path: str | os.PathLike[str], model: None = None, *, tolerate_torn_tail: bool = False
) -> Iterator[dict[str, Any]]: ...
def iter_jsonl(
    path: str | os.PathLike[str],
    model: type[R] | None = None,
    *,
    tolerate_torn_tail: bool = False,
) -> Iterator[Any]:
    """Yield the records of a JSONL file, validated as `model` (plain objects without one).

    A malformed line raises InputError naming the file, line and field; with
    `tolerate_torn_tail`, an unparseable last line with no newline (what a crash mid-write
    leaves) is logged and dropped instead."""
    file = str(path)
    if not Path(path).is_file():
        raise InputError("records file does not exist", file=file)
    with open(path, encoding="utf-8") as f:
        pending: tuple[int, str] | None = None
        for number, line in enumerate(f, start=1):
            if pending is not None:
                yield _parse_line(file, *pending, model)
            pending = (number, line)
        if pending is None:
            return
        number, line = pending
        if tolerate_torn_tail and not line.endswith("\n"):
            try:
                yield _parse_line(file, number, line, model)
            except InputError as e:
                log.warning("%s:%d: dropping a torn last line (%s)", file, number, e.reason)
            return
        yield _parse_line(file, number, line, model)


@overload
def read_jsonl(
    path: str | os.PathLike[str], model: type[R], *, tolerate_torn_tail: bool = False
) -> list[R]: ...
@overload
def read_jsonl(
    path: str | os.PathLike[str], model: None = None, *, tolerate_torn_tail: bool = False
) -> list[dict[str, Any]]: ...
def read_jsonl(
    path: str | os.PathLike[str],
    model: type[R] | None = None,
    *,
    tolerate_torn_tail: bool = False,
) -> list[Any]:
    return list(iter_jsonl(path, model, tolerate_torn_tail=tolerate_torn_tail))


# ---------------------------------------------------------------------------------------------
# Locks


@contextlib.contextmanager
def exclusive_writer(out: str | os.PathLike[str], what: str) -> Iterator[None]:
    """One writer per output file (a lock file beside it): two runs appending to the same
    records would duplicate answers. `what` names the kind of run in the error.

    The lock file is removed when the writer is done (and folders this call made, if they stay
    empty), so a finished or aborted run leaves no stale lock. Removing a lock file races with
    a writer that opened it just before: that writer then holds a lock on a file no longer in
    the folder, so it checks after locking that the path is still its file, and retries."""
    import fcntl

    target = Path(out)
    lock_path = target.with_name(target.name + ".lock")
    created = [p for p in (lock_path.parent, *lock_path.parent.parents) if not p.exists()]
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise EmmoeError(f"another {what} run is writing {target}") from None
        try:
            ours = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            ours = False
        if ours:
            break
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()  # while still locked: a waiting writer sees the path is gone
        handle.close()
        remove_empty_dirs(created)
