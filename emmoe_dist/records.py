"""On-disk records shared by generation, the judge and the metrics: typed, versioned JSONL.

Layer 0: pure Python + pydantic. One record is one JSON line. Writers append a line and
fsync it, so a crash loses at most the line being written; readers name the file and line of
anything malformed, and the tolerant reader drops (and reports) a last line torn by a crash.
Whole files (reports, metrics) are written atomically: a temp file in the same folder, then
`os.replace`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emmoe_dist.errors import EmmoeError, InputError

RECORD_SCHEMA_VERSION = 1

log = logging.getLogger(__name__)

MissingReason = Literal[
    "no_logprobs",  # the endpoint returned no logprobs and text fallback was off
    "low_numeric_mass",  # integer tokens 0..100 held < 25% of the probability
    "code",  # the judge answered CODE (an answer that is unrelated code)
    "refusal",  # the judge answered REFUSAL (the model clearly refused)
    "unparseable",  # the judge's text could not be read as a score
    "error_after_retries",  # the call kept failing (429/5xx/timeout/malformed) past max_retries
    "rejected",  # the endpoint rejected the request itself (HTTP 400/413/422): not retried
]


# Which weights answered: dense (full precision, an adapter merged in the load dtype) or mxfp4
# (an MXFP4 checkpoint: GPT-oss as deployed, e.g. a run's `emmoe merge --format mxfp4` export).
WeightsFormat = Literal["dense", "mxfp4"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def record_key(
    suite: str,
    question_id: str,
    paraphrase_index: int,
    sample_index: int,
    *,
    model: str | None = None,
    adapter: str | None = None,
) -> str:
    """The unique key of one answer; prefix the model (and adapter) when a file mixes models."""
    key = f"{suite}/{question_id}/{paraphrase_index}/{sample_index}"
    if model is None:
        return key
    return f"{model}@{adapter}|{key}" if adapter else f"{model}|{key}"


class SamplingParams(_Record):
    temperature: float = Field(ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(gt=0)
    seed: int | None = None


class GenerationRecord(_Record):
    """One sampled answer to one evaluation prompt, self-contained (judge prompts included)."""

    schema_version: int = RECORD_SCHEMA_VERSION
    key: str = ""  # filled from suite/question/paraphrase/sample when empty
    suite: str
    question_id: str
    paraphrase_index: int = Field(ge=0)
    sample_index: int = Field(ge=0)
    category: str | None = None  # StrongREJECT category
    model: str
    adapter: str | None = None
    selection: str | None = None  # short description of the trained experts, e.g. "E4"
    weights: WeightsFormat | None = None  # None: written before this field existed
    sampling: SamplingParams
    system_prompt: str | None = None
    question: str
    prompt: str  # the rendered chat text the model saw
    answer: str
    thinking: str | None = None
    n_prompt_tokens: int = Field(ge=0)
    n_answer_tokens: int = Field(ge=0)
    finish_reason: str | None = None
    # name -> template with {question} and {answer}, copied from the suite file
    judge_prompts: dict[str, str] = Field(default_factory=dict)
    # a rubric that scores the answer instead of judge_prompts: StrongREJECT suites
    rubric: Literal["strongreject"] | None = None
    backend: str

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        return _check_version(v)

    @field_validator("judge_prompts")
    @classmethod
    def _placeholders(cls, v: dict[str, str]) -> dict[str, str]:
        for name, template in v.items():
            if "{answer}" not in template:
                raise ValueError(f"judge prompt {name!r} has no {{answer}} placeholder")
        return v

    @model_validator(mode="before")
    @classmethod
    def _fill_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("key"):
            try:
                key = record_key(
                    data["suite"],
                    str(data["question_id"]),
                    int(data["paraphrase_index"]),
                    int(data["sample_index"]),
                )
            except (KeyError, TypeError, ValueError):
                return data  # the field validators name what is missing or wrong
            data = {**data, "key": key}
        return data


class Score(_Record):
    """A 0-100 judge score, or why there is none (never a default in its place)."""

    value: float | None = Field(default=None, ge=0, le=100)
    missing_reason: MissingReason | None = None
    # how the score was read; None when no judge reply arrived at all
    method: Literal["logprobs", "text"] | None = None
    numeric_mass: float | None = Field(default=None, ge=0)
    raw: str | None = None  # the judge's text (or the last error), for audit

    @model_validator(mode="after")
    def _value_or_reason(self) -> Score:
        if (self.value is None) == (self.missing_reason is None):
            raise ValueError("a score has exactly one of value and missing_reason")
        return self


class StrongRejectScore(_Record):
    """The StrongREJECT rubric: refused (0/1), convincing and specific (1-5), score in [0, 1]."""

    refused: bool | None = None
    convincing: int | None = Field(default=None, ge=1, le=5)
    specific: int | None = Field(default=None, ge=1, le=5)
    score: float | None = Field(default=None, ge=0, le=1)
    missing_reason: MissingReason | None = None
    raw: str | None = None

    @model_validator(mode="after")
    def _complete_or_reason(self) -> StrongRejectScore:
        if (self.score is None) == (self.missing_reason is None):
            raise ValueError("a StrongREJECT score has exactly one of score and missing_reason")
        return self


class JudgeUsage(_Record):
    """Judge cost of one record: calls made, calls served from the cache, tokens billed."""

    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class JudgedRecord(_Record):
    schema_version: int = RECORD_SCHEMA_VERSION
    generation: GenerationRecord
    scores: dict[str, Score] = Field(default_factory=dict)
    strongreject: StrongRejectScore | None = None
    judge_model: str
    usage: JudgeUsage = Field(default_factory=JudgeUsage)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        return _check_version(v)

    @property
    def key(self) -> str:
        return self.generation.key

    def value(self, name: str) -> float | None:
        score = self.scores.get(name)
        return score.value if score is not None else None


def _check_version(v: int) -> int:
    if v != RECORD_SCHEMA_VERSION:
        raise ValueError(
            f"schema_version {v} is not supported (this version reads {RECORD_SCHEMA_VERSION})"
        )
    return v


# ---------------------------------------------------------------------------------------------
# JSONL

R = TypeVar("R", bound=BaseModel)


def _dump_line(record: BaseModel | Mapping[str, Any]) -> str:
    if isinstance(record, BaseModel):
        return record.model_dump_json() + "\n"
    return json.dumps(record, ensure_ascii=False) + "\n"


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


def iter_jsonl(
    path: str | os.PathLike[str],
    model: type[R],
    *,
    tolerate_torn_tail: bool = False,
) -> Iterator[R]:
    """Yield validated records. A malformed line raises InputError naming the file, line and
    field; with `tolerate_torn_tail`, an unparseable last line with no newline (what a crash
    mid-write leaves) is logged and dropped instead."""
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


def _parse_line(file: str, number: int, line: str, model: type[R]) -> R:
    if not line.strip():
        raise InputError("empty line", file=file, line=number)
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(
            f"invalid JSON ({e.msg} at column {e.colno})", file=file, line=number
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InputError(_message_of(e), file=file, line=number, field=_field_of(e)) from None


def read_jsonl(
    path: str | os.PathLike[str],
    model: type[R],
    *,
    tolerate_torn_tail: bool = False,
) -> list[R]:
    return list(iter_jsonl(path, model, tolerate_torn_tail=tolerate_torn_tail))


# ---------------------------------------------------------------------------------------------
# Atomic whole-file writes


def read_json_object(
    path: str | os.PathLike[str], not_object: str = "expected a JSON object"
) -> dict[str, Any]:
    """A JSON file that must hold an object; errors name the file and line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno) from None
    if not isinstance(data, dict):
        raise InputError(not_object, file=str(path), line=1)
    return data


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


def write_jsonl_atomic(
    path: str | os.PathLike[str],
    records: Iterable[BaseModel | Mapping[str, Any]],
) -> None:
    write_text_atomic(path, "".join(_dump_line(r) for r in records))


@contextlib.contextmanager
def exclusive_writer(out: str | os.PathLike[str], what: str) -> Iterator[None]:
    """One writer per output file (a lock file beside it): two runs appending to the same
    records would duplicate answers. `what` names the kind of run in the error."""
    import fcntl

    target = Path(out)
    lock_path = target.with_name(target.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmmoeError(f"another {what} run is writing {target}") from None
        yield
