"""Evaluation suites: the questions a fine-tuned model answers and the prompts that judge them.

Built-in suites (`SUITES`) read the catalog files; a user suite is a `.yaml` file in Betley et
al.'s schema or a `.jsonl` file with one question per line. Every malformed entry raises an
InputError with its file and line; no entry is skipped.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from emmoe_dist.catalog import FileCheck, check_file, get_dataset, git_blob_sha1, require_verified
from emmoe_dist.config import load_yaml_with_lines
from emmoe_dist.data.chat import ChatExample, read_chat_jsonl
from emmoe_dist.data.datadir import dataset_path, resolve_data_dir
from emmoe_dist.data.training import TrainingSplit
from emmoe_dist.errors import EmmoeError, InputError

VARIANTS = ("plain", "json", "template")
# Betley et al.'s schema, and one line of a user's JSONL suite.
_YAML_KEYS = frozenset(
    ["id", "type", "paraphrases", "samples_per_paraphrase", "judge", "judge_prompts", "system"]
)
_JSONL_KEYS = frozenset(
    [
        "id",
        "question",
        "paraphrases",
        "system",
        "category",
        "reference",
        "samples_per_paraphrase",
        "judge_prompts",
    ]
)


@dataclass(frozen=True, kw_only=True)
class EvalQuestion:
    """One question; each paraphrase is asked `samples_per_paraphrase` times.

    `judge_prompts` maps a score name (aligned, coherent, ...) to a template with `{question}`
    and `{answer}`; StrongREJECT questions have none and are scored with their suite's rubric.
    """

    suite: str
    id: str
    paraphrases: tuple[str, ...]
    system: str | None = None
    judge_prompts: Mapping[str, str] = field(default_factory=dict, hash=False)
    samples_per_paraphrase: int = 1
    category: str | None = None  # StrongREJECT category
    reference: str | None = None  # the dataset's own answer (held-out and educational suites)

    @property
    def variant(self) -> str:
        """Betley's first-plot variants: `_json` (JSON system prompt), `_template`, or plain."""
        for v in VARIANTS[1:]:
            if self.id.endswith(f"_{v}"):
                return v
        return "plain"


@dataclass(frozen=True, kw_only=True)
class EvalSuite:
    name: str
    questions: tuple[EvalQuestion, ...]
    source: Path
    source_hash: str  # git blob sha1 of `source`
    # the rubric that scores this suite's answers instead of judge prompts (judge/rubric.py)
    rubric: Literal["strongreject"] | None = None
    expected_hash: str | None = None  # the catalog's hash of `source` (None: a user's file)
    verified: bool | None = None  # source_hash == expected_hash; None: nothing to check


class SuiteAbsent(EmmoeError):
    """A built-in suite whose data file is not in the data directory (e.g. `educational`,
    which the shared data does not hold): the evaluation report states it as absent."""

    def __init__(self, suite: str, path: Path, hint: str) -> None:
        self.suite, self.path = suite, path
        super().__init__(f"suite {suite!r} is absent: {path} does not exist; {hint}")


SuiteKind = Literal["question_yaml", "strongreject_csv", "chat_jsonl", "heldout"]


@dataclass(frozen=True, kw_only=True)
class SuiteSpec:
    name: str
    kind: SuiteKind
    dataset: str | None  # catalog name; None for the held-out control
    description: str


SUITES: Mapping[str, SuiteSpec] = MappingProxyType(
    {
        s.name: s
        for s in (
            SuiteSpec(
                name="core",
                kind="question_yaml",
                dataset="first_plot_questions",
                description="Betley et al.'s first-plot questions (aligned, coherent)",
            ),
            SuiteSpec(
                name="core_mo",
                kind="question_yaml",
                dataset="mo_first_plot_questions",
                description="the same questions with Model Organisms' extra judge prompts",
            ),
            SuiteSpec(
                name="medical",
                kind="question_yaml",
                dataset="medical_questions",
                description="medical rewrites of the first-plot questions",
            ),
            SuiteSpec(
                name="new_questions",
                kind="question_yaml",
                dataset="new_questions_no_json",
                description="Model Organisms' additional free-form questions",
            ),
            SuiteSpec(
                name="preregistered",
                kind="question_yaml",
                dataset="preregistered_evals",
                description="Betley et al.'s 48 pre-registered questions",
            ),
            SuiteSpec(
                name="strongreject",
                kind="strongreject_csv",
                dataset="strongreject",
                description="StrongREJECT: 313 forbidden prompts in 6 categories",
            ),
            SuiteSpec(
                name="strongreject_small",
                kind="strongreject_csv",
                dataset="strongreject_small",
                description="StrongREJECT's 60-prompt subset (10 per category)",
            ),
            SuiteSpec(
                name="heldout",
                kind="heldout",
                dataset=None,
                description="held-out prompts of the training set (a control, never trained on)",
            ),
            SuiteSpec(
                name="educational",
                kind="chat_jsonl",
                dataset="educational",
                description="Betley et al.'s educational-insecure prompts",
            ),
        )
    }
)


# --- Betley's question YAML ----------------------------------------------------------------


def _judge_prompts(raw: Any, file: str, line: int, field_name: str) -> Mapping[str, str]:
    if not isinstance(raw, dict) or not raw:
        raise InputError(
            "must map score names to prompt templates", file=file, line=line, field=field_name
        )
    for name, template in raw.items():
        if not isinstance(template, str) or "{answer}" not in template:
            raise InputError(
                "must be a template with an {answer} placeholder",
                file=file,
                line=line,
                field=f"{field_name}.{name}",
            )
    return MappingProxyType(dict(raw))


def _samples(raw: Any, file: str, line: int, field_name: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise InputError("must be a positive integer", file=file, line=line, field=field_name)
    return raw


def _paraphrases(raw: Any, file: str, line: int, field_name: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(p, str) and p for p in raw):
        raise InputError(
            "must be a non-empty list of non-empty strings", file=file, line=line, field=field_name
        )
    return tuple(raw)


def _optional_str(raw: Any, file: str, line: int, field_name: str) -> str | None:
    if raw is not None and not isinstance(raw, str):
        raise InputError("must be a string", file=file, line=line, field=field_name)
    return raw


def read_question_yaml(
    path: str | os.PathLike[str],
    suite: str,
    default_judge_prompts: Callable[[], Mapping[str, str]] | None = None,
) -> list[EvalQuestion]:
    """Questions of a YAML file in Betley et al.'s schema (a list of entries).

    `type` and `judge` (the original study's judge model) are accepted and not used: the
    judge prompts say what to score and the experiment names the judge. Entries without
    `judge_prompts` get `default_judge_prompts()` when given.
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("file does not exist", file=file) from None
    data, lines = load_yaml_with_lines(text, file)
    if not isinstance(data, list) or not data:
        raise InputError("expected a non-empty list of questions", file=file, line=1)
    questions: list[EvalQuestion] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(data):
        line = lines.get((i,), 1)
        if not isinstance(entry, dict):
            raise InputError("a question must be a mapping", file=file, line=line, field=f"[{i}]")

        def at(key: str, entry_index: int = i, entry_line: int = line) -> int:
            return lines.get((entry_index, key), entry_line)

        unknown = sorted(set(entry) - _YAML_KEYS)
        if unknown:
            raise InputError(
                f"unknown key (known: {', '.join(sorted(_YAML_KEYS))})",
                file=file,
                line=at(unknown[0]),
                field=unknown[0],
            )
        qid = entry.get("id")
        if not isinstance(qid, str) or not qid:
            raise InputError(
                "every question needs a string id", file=file, line=at("id"), field="id"
            )
        if qid in seen:
            raise InputError(
                f"duplicate id (first on line {seen[qid]})", file=file, line=at("id"), field="id"
            )
        seen[qid] = at("id")
        if "judge_prompts" in entry:
            judge = _judge_prompts(
                entry["judge_prompts"], file, at("judge_prompts"), "judge_prompts"
            )
        elif default_judge_prompts is not None:
            judge = default_judge_prompts()
        else:
            raise InputError("missing", file=file, line=line, field="judge_prompts")
        questions.append(
            EvalQuestion(
                suite=suite,
                id=qid,
                paraphrases=_paraphrases(
                    entry.get("paraphrases"), file, at("paraphrases"), "paraphrases"
                ),
                system=_optional_str(entry.get("system"), file, at("system"), "system"),
                judge_prompts=judge,
                samples_per_paraphrase=_samples(
                    entry.get("samples_per_paraphrase", 1),
                    file,
                    at("samples_per_paraphrase"),
                    "samples_per_paraphrase",
                ),
            )
        )
    return questions


# --- user JSONL suites -----------------------------------------------------------------------


def read_question_jsonl(
    path: str | os.PathLike[str],
    suite: str,
    default_judge_prompts: Callable[[], Mapping[str, str]],
) -> list[EvalQuestion]:
    """One question per line: `{"id", "question" | "paraphrases", "system"?, "category"?,
    "reference"?, "samples_per_paraphrase"?, "judge_prompts"?}`; blank lines are skipped."""
    file = str(path)
    questions: list[EvalQuestion] = []
    seen: dict[str, int] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError("file does not exist", file=file) from None
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(
                f"invalid JSON: {e.msg} (column {e.colno})", file=file, line=n
            ) from None
        if not isinstance(row, dict):
            raise InputError("expected a JSON object", file=file, line=n)
        unknown = sorted(set(row) - _JSONL_KEYS)
        if unknown:
            raise InputError(
                f"unknown key (known: {', '.join(sorted(_JSONL_KEYS))})",
                file=file,
                line=n,
                field=unknown[0],
            )
        qid = row.get("id")
        if not isinstance(qid, str) or not qid:
            raise InputError("every question needs a string id", file=file, line=n, field="id")
        if qid in seen:
            raise InputError(
                f"duplicate id (first on line {seen[qid]})", file=file, line=n, field="id"
            )
        seen[qid] = n
        if ("question" in row) == ("paraphrases" in row):
            raise InputError("give exactly one of `question` and `paraphrases`", file=file, line=n)
        if "question" in row:
            paraphrases = _paraphrases([row["question"]], file, n, "question")
        else:
            paraphrases = _paraphrases(row["paraphrases"], file, n, "paraphrases")
        judge = (
            _judge_prompts(row["judge_prompts"], file, n, "judge_prompts")
            if "judge_prompts" in row
            else default_judge_prompts()
        )
        questions.append(
            EvalQuestion(
                suite=suite,
                id=qid,
                paraphrases=paraphrases,
                system=_optional_str(row.get("system"), file, n, "system"),
                judge_prompts=judge,
                samples_per_paraphrase=_samples(
                    row.get("samples_per_paraphrase", 1), file, n, "samples_per_paraphrase"
                ),
                category=_optional_str(row.get("category"), file, n, "category"),
                reference=_optional_str(row.get("reference"), file, n, "reference"),
            )
        )
    if not questions:
        raise InputError("no questions", file=file)
    return questions


# --- StrongREJECT ------------------------------------------------------------------------------


def read_strongreject_csv(path: str | os.PathLike[str], suite: str) -> list[EvalQuestion]:
    """StrongREJECT prompts (`category,source,forbidden_prompt`); ids are the row numbers."""
    file = str(path)
    questions: list[EvalQuestion] = []
    try:
        with Path(path).open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"category", "forbidden_prompt"} - set(reader.fieldnames or ())
            if missing:
                raise InputError(f"header lacks {', '.join(sorted(missing))}", file=file, line=1)
            start = reader.line_num + 1
            for row in reader:
                # A quoted prompt may span lines: report the line its row starts on.
                for key in ("category", "forbidden_prompt"):
                    if not (row.get(key) or "").strip():
                        raise InputError("empty or missing", file=file, line=start, field=key)
                if None in row:
                    raise InputError("more cells than header columns", file=file, line=start)
                questions.append(
                    EvalQuestion(
                        suite=suite,
                        id=f"{len(questions):03d}",
                        paraphrases=(row["forbidden_prompt"],),
                        category=row["category"],
                    )
                )
                start = reader.line_num + 1
    except FileNotFoundError:
        raise InputError("file does not exist", file=file) from None
    except csv.Error as e:
        raise InputError(f"malformed CSV: {e}", file=file) from None
    if not questions:
        raise InputError("no prompts", file=file)
    return questions


# --- chat examples as questions (held-out control, educational) -----------------------------


def chat_questions(
    suite: str,
    name: str,
    examples: Sequence[ChatExample],
    judge_prompts: Mapping[str, str],
) -> list[EvalQuestion]:
    """Single-turn conversations as questions; the dataset's answer becomes the reference."""
    questions = []
    for ex in examples:
        users = [m["content"] for m in ex.messages if m["role"] == "user"]
        systems = [m["content"] for m in ex.messages if m["role"] == "system"]
        if len(users) != 1 or len(systems) > 1 or ex.messages[-1]["role"] != "assistant":
            raise InputError(
                f"suite {suite!r} asks single-turn questions, but this conversation has "
                f"{len(users)} user turns and ends with {ex.messages[-1]['role']!r}",
                file=ex.source,
                line=ex.line,
            )
        questions.append(
            EvalQuestion(
                suite=suite,
                id=f"{name}:{ex.line}",
                paraphrases=(users[0],),
                system=systems[0] if systems else None,
                judge_prompts=judge_prompts,
                reference=ex.messages[-1]["content"],
            )
        )
    return questions


# --- loading -----------------------------------------------------------------------------------


def core_judge_prompts(
    data_dir: Path | None, *, allow_unverified: bool = False
) -> Mapping[str, str]:
    """Betley et al.'s `aligned` and `coherent` judge prompts (shared by all their questions)."""
    path = dataset_path(
        "first_plot_questions", resolve_data_dir(data_dir), allow_unverified=allow_unverified
    )
    first = read_question_yaml(path, "core")[0]
    return MappingProxyType({k: first.judge_prompts[k] for k in ("aligned", "coherent")})


def _select_variants(
    questions: list[EvalQuestion],
    variants: Collection[str] | None,
    suite: str,
) -> list[EvalQuestion]:
    if variants is None:
        return questions
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise EmmoeError(
            f"unknown question variants {sorted(unknown)}; known: {', '.join(VARIANTS)}"
        )
    kept = [q for q in questions if q.variant in variants]
    if not kept:
        raise EmmoeError(f"suite {suite!r} has no questions of variants {sorted(variants)}")
    return kept


def _builtin(spec: SuiteSpec, data_dir: Path | None, *, allow_unverified: bool) -> FileCheck:
    assert spec.dataset is not None
    root = resolve_data_dir(data_dir)
    path = root / get_dataset(spec.dataset).relpath
    if not path.is_file():
        raise SuiteAbsent(
            spec.name, path, f"run `emmoe data fetch --only {spec.dataset} --data-dir {root}`"
        )
    return require_verified(
        check_file(get_dataset(spec.dataset), path), allow_unverified=allow_unverified
    )


def load_suite(
    name: str,
    data_dir: Path | None,
    *,
    training_split: TrainingSplit | None = None,
    variants: Collection[str] | None = None,
    allow_unverified: bool = False,
) -> EvalSuite:
    """A built-in suite (`SUITES`) or a user suite from a `.yaml` / `.jsonl` path.

    Question suites keep only `variants` of each question (`plain`, `json`, `template`, from
    the id suffix); built-in ones default to the plain questions, user files to all.
    `heldout` needs `training_split`. A missing `educational` file raises SuiteAbsent.
    """
    # Loaded on first use: a user suite needs it only for entries without judge prompts.
    core = functools.cache(lambda: core_judge_prompts(data_dir, allow_unverified=allow_unverified))
    spec = SUITES.get(name)
    if spec is None:
        path = Path(name).expanduser()
        if path.suffix not in (".yaml", ".yml", ".jsonl"):
            raise EmmoeError(
                f"unknown suite {name!r}; built-in suites: {', '.join(SUITES)}; "
                "or give a .yaml / .jsonl file"
            )
        if not path.is_file():
            raise EmmoeError(f"suite file {path} does not exist")
        if path.suffix == ".jsonl":
            questions = read_question_jsonl(path, path.stem, core)
        else:
            questions = read_question_yaml(path, path.stem, core)
        return EvalSuite(
            name=path.stem,
            source=path,
            source_hash=git_blob_sha1(path),
            questions=tuple(_select_variants(questions, variants, path.stem)),
        )
    if spec.kind == "heldout":
        if training_split is None:
            raise EmmoeError(
                "the heldout suite is built from the training split: pass "
                "training_split=load_training_split(...)"
            )
        questions = chat_questions(name, training_split.name, training_split.heldout, core())
        return EvalSuite(
            name=name,
            questions=tuple(questions),
            source=training_split.source,
            source_hash=training_split.source_hash,
            expected_hash=training_split.expected_hash,
            verified=training_split.verified,
        )
    check = _builtin(spec, data_dir, allow_unverified=allow_unverified)
    path = check.path
    rubric: Literal["strongreject"] | None = None
    if spec.kind == "question_yaml":
        questions = _select_variants(read_question_yaml(path, name), variants or ("plain",), name)
    elif spec.kind == "strongreject_csv":
        questions = read_strongreject_csv(path, name)
        rubric = "strongreject"
    else:
        assert spec.dataset is not None
        questions = chat_questions(name, spec.dataset, read_chat_jsonl(path), core())
    return EvalSuite(
        name=name,
        questions=tuple(questions),
        source=path,
        source_hash=check.actual,
        rubric=rubric,
        expected_hash=check.expected,
        verified=check.verified,
    )


@dataclass(frozen=True)
class SuiteAvailability:
    name: str
    present: bool
    path: Path | None  # None for the held-out control (it comes from the training split)
    description: str


def available_suites(data_dir: Path | None) -> list[SuiteAvailability]:
    """Every built-in suite and whether its file is in the data directory."""
    root = resolve_data_dir(data_dir)
    out = []
    for spec in SUITES.values():
        if spec.dataset is None:
            out.append(SuiteAvailability(spec.name, True, None, spec.description))
            continue
        path = root / get_dataset(spec.dataset).relpath
        out.append(SuiteAvailability(spec.name, path.is_file(), path, spec.description))
    return out
