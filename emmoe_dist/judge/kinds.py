"""What one judge call scores: a 0-100 prompt (alignment, coherence) or the StrongREJECT rubric.

Each kind builds its request, reads the reply (or the failure) into its score, and puts that
score in its place in the judged record; the runner chooses the kinds a record needs
(`kinds_for`) and never branches on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from emmoe_dist.judge.client import Outcome
from emmoe_dist.judge.rubric import DEFAULT_PROMPTS, StrongRejectRubric, render
from emmoe_dist.judge.scoring import MIN_NUMERIC_MASS, parse_strongreject, score_reply
from emmoe_dist.records import GenerationRecord, MissingReason, Score, StrongRejectScore

TOP_LOGPROBS = 20  # the most OpenAI-compatible endpoints return (vLLM's max_logprobs default)
# The score is read from the first token's logprobs; a few more tokens let the text fallback
# and CODE/REFUSAL detection see a whole word.
SCORE_MAX_TOKENS = 4
RUBRIC_MAX_TOKENS = 1024


class JudgedFields(Protocol):
    """The parts of a judged record the kinds fill in."""

    scores: dict[str, Score]
    strongreject: StrongRejectScore | None


class ScoreKind(Protocol):
    def request(self, model: str, record: GenerationRecord) -> dict[str, Any]: ...
    def record(self, outcome: Outcome, into: JudgedFields) -> None: ...


def _failure(outcome: Outcome) -> MissingReason:
    return "rejected" if outcome.rejected else "error_after_retries"


def score_request(model: str, template: str, record: GenerationRecord) -> dict[str, Any]:
    """The 0-100 request: one user message, temperature 0, top-20 logprobs of the reply."""
    prompt = render(template, question=record.question, answer=record.answer)
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": SCORE_MAX_TOKENS,
        "logprobs": True,
        "top_logprobs": TOP_LOGPROBS,
    }


@dataclass(frozen=True)
class NumericScore:
    """A 0-100 judge prompt (`name`: aligned, coherent, ...), read from one token's logprobs."""

    name: str
    template: str
    text_fallback: bool = False  # read the number from the text when no logprobs come back
    min_mass: float = MIN_NUMERIC_MASS

    def request(self, model: str, record: GenerationRecord) -> dict[str, Any]:
        return score_request(model, self.template, record)

    def record(self, outcome: Outcome, into: JudgedFields) -> None:
        if outcome.reply is None:
            score = Score(missing_reason=_failure(outcome), raw=outcome.error)
        else:
            score = score_reply(
                outcome.reply, text_fallback=self.text_fallback, min_mass=self.min_mass
            )
        into.scores[self.name] = score


@dataclass(frozen=True)
class RubricScore:
    """The StrongREJECT rubric: refused, convincing and specific, read from the reply's text."""

    rubric: StrongRejectRubric

    def request(self, model: str, record: GenerationRecord) -> dict[str, Any]:
        prompt = render(
            self.rubric.template, forbidden_prompt=record.question, response=record.answer
        )
        return {
            "model": model,
            "messages": [
                {"role": "system", "content": self.rubric.system},
                {"role": "user", "content": prompt},
            ],
            "temperature": 0,
            "max_tokens": RUBRIC_MAX_TOKENS,
        }

    def record(self, outcome: Outcome, into: JudgedFields) -> None:
        if outcome.reply is None:
            into.strongreject = StrongRejectScore(
                missing_reason=_failure(outcome), raw=outcome.error
            )
        else:
            into.strongreject = parse_strongreject(outcome.reply.text, self.rubric.answer_patterns)


def templates_for(record: GenerationRecord, names: Sequence[str]) -> dict[str, str] | None:
    """Judge prompts for a record: the suite's own when it carries them, else the project's.
    None for a name that neither has."""
    chosen = {n: record.judge_prompts.get(n) or DEFAULT_PROMPTS.get(n) for n in names}
    if any(t is None for t in chosen.values()):
        return None
    return {n: t for n, t in chosen.items() if t is not None}


def kinds_for(
    record: GenerationRecord,
    names: Sequence[str],
    rubric: StrongRejectRubric | None,
    *,
    text_fallback: bool = False,
    min_mass: float = MIN_NUMERIC_MASS,
) -> list[ScoreKind]:
    """What the judge scores for one record: its rubric, or each named 0-100 prompt."""
    if record.rubric == "strongreject":
        assert rubric is not None, "the StrongREJECT rubric is loaded for rubric records"
        return [RubricScore(rubric)]
    templates = templates_for(record, names) or {}
    return [NumericScore(n, t, text_fallback, min_mass) for n, t in templates.items()]
