"""Judge a file of generation records into a file of judged records, resumably.

Every answer ends in the output exactly once, scored or unscored with its reason. The output is
appended in small fsynced batches; a re-run skips the keys already there, so after a crash only
the answers in flight are judged again: their calls whose replies were cached are free, the
calls still in flight at the crash are sent again. Answers that ended `error_after_retries` are
the exception: a re-run judges them again (their successful calls are cached; only the failed
ones are repeated).

A failing endpoint fails the run: once more than `judge.max_failed_fraction` of the answers end
unscored for endpoint failures, the run stops, keeps what it wrote, and raises `JudgeFailed`
(the CLI exits non-zero, a sweep trial is marked failed and its next attempt judges them again).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emmoe_dist import run_folder as rf
from emmoe_dist.config import JudgeConfig
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.files import JsonlAppender, exclusive_writer, read_jsonl, write_jsonl_atomic
from emmoe_dist.judge.cache import JudgeCache
from emmoe_dist.judge.client import JudgeClient
from emmoe_dist.judge.kinds import kinds_for, templates_for
from emmoe_dist.judge.rubric import DEFAULT_PROMPTS, StrongRejectRubric, strongreject_rubric
from emmoe_dist.judge.scoring import MIN_NUMERIC_MASS
from emmoe_dist.judge.scripted_server import MOCK_FINGERPRINT
from emmoe_dist.metrics import missing_reasons, score_methods
from emmoe_dist.records import GenerationRecord, JudgedRecord, JudgeUsage, Score, StrongRejectScore

DEFAULT_SCORES = ("aligned", "coherent")


@dataclass(frozen=True)
class JudgeOptions:
    """How one run judges, beyond the endpoint settings in JudgeConfig."""

    score_names: tuple[str, ...] = DEFAULT_SCORES
    min_numeric_mass: float = MIN_NUMERIC_MASS
    data_dir: str | None = None  # for the StrongREJECT rubric; default $EMMOE_DATA_DIR
    allow_unverified_data: bool = False  # a rubric file whose hash is not the catalog's
    cache_dir: str | None = None  # default: JudgeConfig.cache_dir, else <out dir>/judge_cache
    backoff_base_s: float = 0.5
    flush_interval_s: float = 0.5
    progress: bool = True


@dataclass(frozen=True)
class JudgeSummary:
    records: int  # generation records in the input
    judged_now: int
    already_judged: int
    rejudged_errors: int  # earlier error_after_retries answers judged again
    unjudged: int  # input answers missing from the output at the end (0 unless interrupted)
    calls: int
    cache_hits: int
    retries: int
    failed_calls: int
    prompt_tokens: int
    completion_tokens: int
    usd_cost: float
    elapsed_s: float
    missing: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # score -> reason -> n
    methods: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # score -> method -> n
    errors: Mapping[str, int] = field(default_factory=dict)  # failed attempts by kind
    failed: int = 0  # answers in the output unscored for endpoint failures (judged again later)
    allowed_failures: float = 0.0  # judge.max_failed_fraction x records
    stopped_early: bool = False  # the failures passed the threshold before every answer ran

    def format(self) -> str:
        rate = self.judged_now / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"judged {self.judged_now} of {self.records} answers in {self.elapsed_s:.1f} s "
            f"({rate:.1f}/s; {self.already_judged} already judged, {self.rejudged_errors} "
            f"re-judged after errors, {self.unjudged} left)",
            f"calls: {self.calls} made, {self.cache_hits} from cache, {self.retries} retried, "
            f"{self.failed_calls} failed",
            f"tokens: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion; "
            f"estimated cost ${self.usd_cost:.4f} (calls made by this run)",
        ]
        if self.errors:
            kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.errors.items()))
            lines.append(f"failed attempts: {kinds}")
        for name, counts in self.methods.items():
            detail = ", ".join(f"{method} {n}" for method, n in sorted(counts.items()))
            lines.append(f"scored {name}: {sum(counts.values())} (by {detail})")
        for name, reasons in self.missing.items():
            detail = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
            lines.append(f"unscored {name}: {sum(reasons.values())} ({detail})")
        return "\n".join(lines)


class JudgeFailed(EmmoeError):
    """More answers than `judge.max_failed_fraction` allows ended unscored because the endpoint
    failed; what was judged is on disk, and a re-run judges the failed answers again."""

    def __init__(self, summary: JudgeSummary, out: Path) -> None:
        self.summary = summary
        how = "stopped early: " if summary.stopped_early else ""
        super().__init__(
            f"{out}: {how}{summary.failed} of {summary.records} answers are unscored because "
            f"the judge endpoint failed (connection, server or timeouts after every retry; "
            f"judge.max_failed_fraction allows {summary.allowed_failures:g}). The judged answers "
            "are kept; fix the endpoint and run the same command again to judge the rest.\n"
            + summary.format()
        )


def has_transient_error(record: JudgedRecord) -> bool:
    """Whether an answer is unscored because the endpoint failed (a re-run judges it again)."""
    reasons = [s.missing_reason for s in record.scores.values()]
    if record.strongreject is not None:
        reasons.append(record.strongreject.missing_reason)
    return "error_after_retries" in reasons


def _load_inputs(path: Path) -> list[GenerationRecord]:
    records = read_jsonl(path, GenerationRecord, tolerate_torn_tail=True)
    seen: dict[str, int] = {}
    for line, record in enumerate(records, start=1):
        if record.key in seen:
            raise InputError(
                f"duplicate key {record.key!r} (first on line {seen[record.key]}); "
                "add the model and adapter to the key when a file mixes models",
                file=str(path),
                line=line,
                field="key",
            )
        seen[record.key] = line
    return records


def _resume(out: Path) -> tuple[set[str], int]:
    """Keys already judged; rewrites the output without answers that failed transiently."""
    if not out.exists():
        return set(), 0
    kept: dict[str, JudgedRecord] = {}
    dropped = 0
    for record in read_jsonl(out, JudgedRecord, tolerate_torn_tail=True):
        if has_transient_error(record) or record.key in kept:
            dropped += 1
        else:
            kept[record.key] = record
    if dropped:
        write_jsonl_atomic(out, kept.values())
    return set(kept), dropped


@dataclass
class _Scored:
    """The scores of one record as its kinds fill them in."""

    scores: dict[str, Score] = field(default_factory=dict)
    strongreject: StrongRejectScore | None = None


class _Judge:
    """Turns one generation record into one judged record."""

    def __init__(
        self,
        cfg: JudgeConfig,
        client: JudgeClient,
        options: JudgeOptions,
        rubric: StrongRejectRubric | None,
    ) -> None:
        self.cfg, self.client, self.options, self.rubric = cfg, client, options, rubric

    async def __call__(self, record: GenerationRecord) -> JudgedRecord:
        model = self.cfg.model
        kinds = kinds_for(
            record,
            self.options.score_names,
            self.rubric,
            text_fallback=self.cfg.text_fallback,
            min_mass=self.options.min_numeric_mass,
        )
        outcomes = list(
            await asyncio.gather(
                *(self.client.complete(kind.request(model, record)) for kind in kinds)
            )
        )
        scored = _Scored()
        for kind, outcome in zip(kinds, outcomes, strict=True):
            kind.record(outcome, scored)
        replies = [o.reply for o in outcomes if o.reply is not None]
        usage = JudgeUsage(
            calls=len(outcomes),
            cached_calls=sum(o.cached for o in outcomes),
            prompt_tokens=sum(r.prompt_tokens for r in replies),
            completion_tokens=sum(r.completion_tokens for r in replies),
        )
        return JudgedRecord(
            generation=record,
            scores=scored.scores,
            strongreject=scored.strongreject,
            judge_model=model,
            usage=usage,
            mock_judge=any(r.system_fingerprint == MOCK_FINGERPRINT for r in replies),
            judge_name=self.cfg.name,
        )


def _check_prompts(records: Sequence[GenerationRecord], path: Path, names: Sequence[str]) -> None:
    for line, record in enumerate(records, start=1):
        if record.rubric is None and templates_for(record, names) is None:
            missing = next(
                n for n in names if n not in record.judge_prompts and n not in DEFAULT_PROMPTS
            )
            raise InputError(
                "no judge prompt of this name in the record, and the project has no default for it",
                file=str(path),
                line=line,
                field=f"judge_prompts.{missing}",
            )


class _Output:
    """Judged records on their way to disk: buffered, appended and fsynced every
    `interval_s`, so a crash loses at most that much work (and its calls are cached)."""

    def __init__(self, path: Path, interval_s: float) -> None:
        self._appender = JsonlAppender(path)
        self._buffer: list[JudgedRecord] = []
        self._interval_s = interval_s
        self._last = time.monotonic()

    def add(self, record: JudgedRecord) -> bool:
        """Buffer a record; True when this call flushed the buffer to disk."""
        self._buffer.append(record)
        if time.monotonic() - self._last < self._interval_s:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        if self._buffer:
            self._appender.write_many(self._buffer)
            self._buffer.clear()
        self._last = time.monotonic()

    def close(self) -> None:
        self.flush()
        self._appender.close()


class _TooManyFailures(Exception):
    """More answers failed than the run may leave unscored: no later answer can change that."""


@dataclass
class _FailureBudget:
    allowed: float  # answers that may end unscored for endpoint failures
    failed: int = 0

    def count(self, record: JudgedRecord) -> None:
        if has_transient_error(record):
            self.failed += 1
            if self.failed > self.allowed:
                raise _TooManyFailures


async def _run_pool(
    pending: Sequence[GenerationRecord],
    judge: _Judge,
    output: _Output,
    workers: int,
    progress: Callable[[bool], None],
    budget: _FailureBudget,
) -> None:
    """Judge `pending` with `workers` coroutines; the first error (or the failure budget
    running out) cancels the rest. `progress(flushed)` runs after each record."""

    async def worker(queue: Iterator[GenerationRecord]) -> None:
        for record in queue:  # workers share one iterator: each record is taken once
            judged = await judge(record)
            progress(output.add(judged))  # written first: a failed answer is kept, with why
            budget.count(judged)

    queue = iter(pending)
    tasks = [asyncio.ensure_future(worker(queue)) for _ in range(min(workers, len(pending)))]
    if not tasks:
        return
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result


async def judge_file(
    records_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    cfg: JudgeConfig,
    options: JudgeOptions = JudgeOptions(),
) -> JudgeSummary:
    """Judge every answer in `records_path` that `out_path` does not hold yet."""
    from tqdm import tqdm

    started = time.monotonic()
    source, out = Path(records_path), Path(out_path)
    inputs = _load_inputs(source)
    _check_prompts(inputs, source, options.score_names)
    with exclusive_writer(out, "judge"):
        done, rejudged = _resume(out)
        pending = [r for r in inputs if r.key not in done]
        needs_rubric = any(r.rubric == "strongreject" for r in pending)
        rubric = (
            strongreject_rubric(options.data_dir, allow_unverified=options.allow_unverified_data)
            if needs_rubric
            else None
        )
        cache = JudgeCache(options.cache_dir or cfg.cache_dir or out.parent / rf.JUDGE_CACHE_DIR)
        client = JudgeClient(cfg, cache, backoff_base_s=options.backoff_base_s)
        output = _Output(out, options.flush_interval_s)
        bar = tqdm(
            total=len(pending),
            unit="answer",
            desc="judge",
            dynamic_ncols=True,
            disable=not options.progress,
        )

        def progress(flushed: bool) -> None:
            bar.update(1)
            if flushed:  # rates refresh with each flush: often enough, and cheap
                stats, elapsed = client.stats, max(1e-9, time.monotonic() - started)
                bar.set_postfix(
                    {
                        "calls/s": f"{stats.calls / elapsed:.1f}",
                        "cache": stats.cache_hits,
                        "errors": sum(stats.errors.values()),
                    }
                )

        judge = _Judge(cfg, client, options, rubric)
        budget = _FailureBudget(allowed=cfg.max_failed_fraction * len(inputs))
        stopped_early = False
        try:
            await _run_pool(pending, judge, output, cfg.concurrency, progress, budget)
        except _TooManyFailures:
            stopped_early = True
        finally:
            output.close()
            bar.close()
            await client.aclose()
            cache.close()
        final = read_jsonl(out, JudgedRecord)
    counts = Counter(r.key for r in final)
    duplicated = [k for k, n in counts.items() if n > 1]
    if duplicated:
        raise EmmoeError(f"{out}: {len(duplicated)} answers judged twice, e.g. {duplicated[0]!r}")
    stats = client.stats
    cost = (
        stats.prompt_tokens * cfg.usd_per_million_input
        + stats.completion_tokens * cfg.usd_per_million_output
    ) / 1e6
    summary = JudgeSummary(
        records=len(inputs),
        judged_now=sum(1 for r in pending if r.key in counts),
        already_judged=len(done),
        rejudged_errors=rejudged,
        unjudged=sum(1 for r in inputs if r.key not in counts),
        calls=stats.calls,
        cache_hits=stats.cache_hits,
        retries=stats.retries,
        failed_calls=stats.failed,
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        usd_cost=cost,
        elapsed_s=time.monotonic() - started,
        missing=missing_reasons(final),
        methods=score_methods(final),
        errors=dict(stats.errors),
        failed=sum(has_transient_error(r) for r in final),
        allowed_failures=budget.allowed,
        stopped_early=stopped_early,
    )
    if stopped_early or summary.failed > budget.allowed:
        raise JudgeFailed(summary, out)
    return summary


def run_judge(
    records_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    cfg: JudgeConfig,
    options: JudgeOptions = JudgeOptions(),
) -> JudgeSummary:
    return asyncio.run(judge_file(records_path, out_path, cfg, options))
