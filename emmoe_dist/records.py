"""On-disk records shared by generation, the judge and the metrics: typed, versioned schemas.

Layer 0: pure Python + pydantic. One record is one JSON line of a JSONL file; how the lines
are appended, read and repaired after a crash is `emmoe_dist.files`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RECORD_SCHEMA_VERSION = 1

MissingReason = Literal[
    "no_logprobs",  # no logprobs and no text fallback (such replies are now retried instead)
    "low_numeric_mass",  # integer tokens 0..100 held < 25% of the probability
    "code",  # the judge answered CODE (an answer that is unrelated code)
    "refusal",  # the judge answered REFUSAL (the model clearly refused)
    "unparseable",  # the judge's text could not be read as a score
    # the call kept failing (connection, 429/5xx, timeout, malformed, no logprobs) past max_retries
    "error_after_retries",
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


class JudgeVerdict(_Record):
    """One further judge's scores of an answer (`JudgedRecord.more_judges`)."""

    scores: dict[str, Score] = Field(default_factory=dict)
    strongreject: StrongRejectScore | None = None
    judge_model: str
    usage: JudgeUsage = Field(default_factory=JudgeUsage)
    mock_judge: bool = False


class JudgedRecord(_Record):
    schema_version: int = RECORD_SCHEMA_VERSION
    generation: GenerationRecord
    scores: dict[str, Score] = Field(default_factory=dict)
    strongreject: StrongRejectScore | None = None
    judge_model: str
    usage: JudgeUsage = Field(default_factory=JudgeUsage)
    # True when the replies came from the built-in scripted judge: mock scores, not judgments
    mock_judge: bool = False
    judge_name: str | None = None  # how tables name the judge above (None: by its model)
    # further judges of the same answer, by name (`emmoe judge --combine`, a config's
    # `more_judges`): the fields above stay the first judge's, which every headline uses
    more_judges: dict[str, JudgeVerdict] = Field(default_factory=dict)

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

    @property
    def judge(self) -> str:
        """The first judge's name."""
        return self.judge_name or self.judge_model

    def judges(self) -> tuple[str, ...]:
        """Every judge that scored this answer, the first one first."""
        return (self.judge, *self.more_judges)

    def verdict(self) -> JudgeVerdict:
        """The first judge's scores, as a further judge's are stored."""
        return JudgeVerdict(
            scores=self.scores,
            strongreject=self.strongreject,
            judge_model=self.judge_model,
            usage=self.usage,
            mock_judge=self.mock_judge,
        )

    def as_judged_by(self, name: str) -> JudgedRecord:
        """This answer with judge `name`'s scores in the first judge's place, so every metric
        reads that judge; the other judges are dropped."""
        if name == self.judge:
            return self.model_copy(update={"more_judges": {}})
        verdict = self.more_judges.get(name)
        if verdict is None:
            raise KeyError(f"judge {name!r} did not score {self.key!r}; judges: {self.judges()}")
        return self.model_copy(
            update={
                "scores": verdict.scores,
                "strongreject": verdict.strongreject,
                "judge_model": verdict.judge_model,
                "usage": verdict.usage,
                "mock_judge": verdict.mock_judge,
                "judge_name": name,
                "more_judges": {},
            }
        )


def _check_version(v: int) -> int:
    if v != RECORD_SCHEMA_VERSION:
        raise ValueError(
            f"schema_version {v} is not supported (this version reads {RECORD_SCHEMA_VERSION})"
        )
    return v
