"""The resumable generation run: suites in, one JSONL record per sampled answer out.

Every (suite, question, paraphrase, sample) has a key; records are appended and fsynced as
each batch finishes, so a crash loses at most the batch in flight, and a re-run skips every
key already on disk (each record exactly once). Beside the records, `<out>.run.json` holds the
run's configuration; a re-run whose sampling settings or weights differ stops instead of mixing
two runs in one file. One writer per file (a lock file), as for the judge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from emmoe_dist.config import ExperimentConfig
from emmoe_dist.data.suites import EvalQuestion, EvalSuite, SuiteAbsent, load_suite
from emmoe_dist.errors import EmmoeError
from emmoe_dist.files import (
    JsonlAppender,
    exclusive_writer,
    iter_jsonl,
    tree_digest,
    write_json_atomic,
)
from emmoe_dist.generate.interface import Generator, RawSample, SampleRequest, SamplingOptions
from emmoe_dist.generate.prompts import (
    chat_messages,
    decode_sample,
    effective_system_prompt,
    prompt_ids,
    render_prompt,
    sample_seed,
)
from emmoe_dist.generate.sources import ModelSource
from emmoe_dist.records import GenerationRecord, SamplingParams, record_key

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Settings that change what a sample is: a re-run into the same file must match them.
_PINNED_EVAL = ("temperature", "top_p", "max_new_tokens", "system_prompt", "thinking")


@dataclass(frozen=True, kw_only=True)
class PromptJob:
    """One prompt (a paraphrase of a question) and the samples still to draw for it."""

    suite: EvalSuite
    question: EvalQuestion
    paraphrase_index: int
    system_prompt: str | None
    prompt: str
    prompt_ids: tuple[int, ...]
    samples: tuple[tuple[int, str, int], ...]  # (sample index, key, seed)


@dataclass(frozen=True, kw_only=True)
class GenerationSummary:
    out: Path
    written: int
    already_done: int
    absent_suites: tuple[str, ...]
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


@dataclass
class SuiteSet:
    suites: list[EvalSuite] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)


def load_suites(cfg: ExperimentConfig, names: Sequence[str]) -> SuiteSet:
    """The named suites; `heldout` is built from the experiment's training split. Absent
    built-in suites (e.g. `educational`, fetched on demand) are listed, not fatal."""
    data_dir = cfg.data_dir()
    split = None
    out = SuiteSet()
    for name in names:
        if name == "heldout" and split is None:
            from emmoe_dist.data.training import load_training_split

            split = load_training_split(
                cfg.data.train,
                data_dir,
                heldout=cfg.data.heldout,
                seed=cfg.data.split_seed,
                allow_unverified=cfg.data.allow_unverified,
            )
        try:
            out.suites.append(
                load_suite(
                    name,
                    data_dir,
                    training_split=split,
                    variants=cfg.eval.variants,
                    allow_unverified=cfg.data.allow_unverified,
                )
            )
        except SuiteAbsent as e:
            log.warning("%s", e)
            out.absent.append(name)
    return out


def plan_jobs(
    cfg: ExperimentConfig,
    suites: Sequence[EvalSuite],
    tokenizer: PreTrainedTokenizerBase,
    source: ModelSource,
    done: Collection[str] = frozenset(),
) -> list[PromptJob]:
    """Every prompt with the samples not yet in `done`; each prompt rendered once."""
    jobs = []
    for suite in suites:
        questions = suite.questions[: cfg.eval.limit] if cfg.eval.limit else suite.questions
        for q in questions:
            system = effective_system_prompt(q.system, cfg.eval.system_prompt)
            for p, text in enumerate(q.paraphrases):
                samples = []
                for s in range(cfg.eval.samples_per_question):
                    key = record_key(
                        suite.name,
                        q.id,
                        p,
                        s,
                        model=source.model_label,
                        adapter=source.adapter_label,
                    )
                    if key not in done:
                        samples.append((s, key, sample_seed(cfg.seed, suite.name, q.id, p, s)))
                if not samples:
                    continue
                prompt = render_prompt(
                    tokenizer, chat_messages(text, system), thinking=cfg.eval.thinking
                )
                jobs.append(
                    PromptJob(
                        suite=suite,
                        question=q,
                        paraphrase_index=p,
                        system_prompt=system,
                        prompt=prompt,
                        prompt_ids=prompt_ids(tokenizer, prompt),
                        samples=tuple(samples),
                    )
                )
    return jobs


def _local(path: str | Path | None) -> str | None:
    """A path that exists here, resolved (its identity); None for hub ids and `tiny:`."""
    if path is None or not Path(path).expanduser().exists():
        return None
    return str(Path(path).expanduser().resolve())


def run_meta(
    cfg: ExperimentConfig, source: ModelSource, backend: str, suites: SuiteSet
) -> dict[str, Any]:
    folder = source.adapter_folder
    return {
        "model": source.model_label,
        "adapter": source.adapter_label,
        # what the labels are, whatever their spelling: a re-run compares these
        "model_path": _local(source.base.name_or_path),
        "adapter_path": _local(folder),
        "adapter_digest": tree_digest(folder) if folder is not None else None,
        "selection": source.selection,
        "weights": source.weights,
        "backend": backend,
        "seed": cfg.seed,
        "eval": cfg.eval.model_dump(mode="json"),
        "suites": {
            s.name: {
                "source": str(s.source),
                "source_hash": s.source_hash,
                "expected_hash": s.expected_hash,
                "verified": s.verified,
                "questions": len(s.questions),
            }
            for s in suites.suites
        },
        "absent_suites": suites.absent,
        "config": cfg.model_dump(mode="json"),
    }


def _same_weights(old: dict[str, Any], meta: dict[str, Any], name: str) -> bool:
    """Whether the run's model (or adapter) is the one the records were made with: the same
    label, the same folder however spelled, or (adapters) the same content where it moved."""
    before, now = old.get(name), meta.get(name)
    if before == now:
        return True
    if before is None or now is None:
        return False
    where = old.get(f"{name}_path") or _local(before)  # older files: the label as a path
    if where is not None and where == meta.get(f"{name}_path"):
        return True
    digest = old.get(f"{name}_digest")
    return digest is not None and digest == meta.get(f"{name}_digest")


def _check_same_run(meta_path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The earlier run's metadata, when this run may add to its records; else an error."""
    old: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
    for name in ("model", "adapter"):
        if not _same_weights(old, meta, name):
            raise EmmoeError(
                f"{meta_path}: the records there were generated with {name}="
                f"{old.get(name)!r}, this run has {name}={meta.get(name)!r}; write to a new "
                "--out file instead of mixing runs"
            )
    pinned = [("backend",), ("seed",)] + [("eval", k) for k in _PINNED_EVAL]
    for path in pinned:
        before: Any = old
        now: Any = meta
        for k in path:
            before, now = before.get(k), now.get(k)
        if before != now:
            name = ".".join(path)
            raise EmmoeError(
                f"{meta_path}: the records there were generated with {name}={before!r}, this "
                f"run has {name}={now!r}; write to a new --out file instead of mixing runs"
            )
    return old


def existing_keys(out: Path) -> set[str]:
    if not out.exists():
        return set()
    return {r.key for r in iter_jsonl(out, GenerationRecord, tolerate_torn_tail=True)}


def run_generation(
    cfg: ExperimentConfig,
    generator: Generator,
    tokenizer: PreTrainedTokenizerBase,
    source: ModelSource,
    suites: SuiteSet,
    out: str | Path,
    *,
    progress: bool = True,
) -> GenerationSummary:
    """Generate every missing record of `suites` into `out` (module docstring)."""
    (summary,) = run_generation_many(
        cfg, generator, tokenizer, [(source, Path(out))], suites, progress=progress
    )
    return summary


@dataclass
class _Target:
    source: ModelSource
    out: Path
    done: set[str]
    written: int = 0


def run_generation_many(
    cfg: ExperimentConfig,
    generator: Generator,
    tokenizer: PreTrainedTokenizerBase,
    targets: Sequence[tuple[ModelSource, Path]],
    suites: SuiteSet,
    *,
    progress: bool = True,
    conditions: Sequence[int] | None = None,
) -> list[GenerationSummary]:
    """Generate for several models (a sweep's adapters on one base) in one pass of the
    generator, each into its own file: a backend with per-request adapters (vLLM) then
    batches the requests of every adapter together instead of one run after another.

    `conditions[i]`, when given, is target i's steering condition in a `per_request_steering`
    generator: the targets are then one model's weights under several steering conditions
    (each labelled apart in its records), all drawn in one pass."""
    if conditions is not None:
        if len(conditions) != len(targets):
            raise EmmoeError(f"{len(conditions)} steering conditions for {len(targets)} targets")
        if not generator.per_request_steering:
            raise EmmoeError(f"the {generator.backend} generator cannot steer per request")
    elif len(targets) > 1 and not generator.per_request_adapters:
        raise EmmoeError(
            f"the {generator.backend} backend holds one model's weights: generate one model "
            "per call"
        )
    seen: dict[tuple[str, str | None], Path] = {}
    for source, out in targets:
        label = (source.model_label, _local(source.adapter_folder) or source.adapter_label)
        if label in seen:  # the same keys twice: each sample would be drawn twice
            raise EmmoeError(
                f"{out}: {source.model_label} with adapter {source.adapter_label} is also "
                f"generated into {seen[label]}; name each model once"
            )
        seen[label] = out
    options = SamplingOptions.from_eval(cfg.eval)
    with contextlib.ExitStack() as stack:
        plans: list[_Target] = []
        # key -> (index of its target, job, sample index, seed)
        by_key: dict[str, tuple[int, PromptJob, int, int]] = {}
        requests = []
        for t, (source, out) in enumerate(targets):
            meta = run_meta(cfg, source, generator.backend, suites)
            meta_path = out.with_name(out.name + ".run.json")
            stack.enter_context(exclusive_writer(out, "generation"))
            if meta_path.is_file() and out.exists():
                old = _check_same_run(meta_path, meta)
                # the same weights under another spelling: keep the names the records have
                source = dataclasses.replace(
                    source, model_label=old["model"], adapter_name=old["adapter"]
                )
                meta = {**meta, "model": old["model"], "adapter": old["adapter"]}
            write_json_atomic(meta_path, meta)
            target = _Target(source=source, out=out, done=existing_keys(out))
            plans.append(target)
            adapter = (
                str(source.adapter) if generator.per_request_adapters and source.adapter else None
            )
            for job in plan_jobs(cfg, suites.suites, tokenizer, source, target.done):
                for index, key, seed in job.samples:
                    by_key[key] = (t, job, index, seed)
                    requests.append(
                        SampleRequest(
                            key=key,
                            prompt_ids=job.prompt_ids,
                            seed=seed,
                            adapter=adapter,
                            condition=conditions[t] if conditions is not None else 0,
                        )
                    )
        sinks = [stack.enter_context(JsonlAppender(target.out)) for target in plans]
        start = time.perf_counter()
        bar = stack.enter_context(
            tqdm(total=len(requests), unit="sample", desc="generate", disable=not progress)
        )
        for batch in generator.generate(requests, options):
            grouped: dict[int, list[GenerationRecord]] = {}
            for raw in batch:
                t, job, index, seed = by_key[raw.key]
                source = plans[t].source
                grouped.setdefault(t, []).append(
                    _record(cfg, generator, tokenizer, source, job, raw, index, seed)
                )
            for t, records in grouped.items():
                sinks[t].write_many(records)  # on disk before the next batch is drawn
                plans[t].written += len(records)
            bar.update(len(batch))
        seconds = time.perf_counter() - start
    return [
        GenerationSummary(
            out=t.out,
            written=t.written,
            already_done=len(t.done),
            absent_suites=tuple(suites.absent),
            seconds=seconds,
        )
        for t in plans
    ]


def _record(
    cfg: ExperimentConfig,
    generator: Generator,
    tokenizer: PreTrainedTokenizerBase,
    source: ModelSource,
    job: PromptJob,
    raw: RawSample,
    index: int,
    seed: int,
) -> GenerationRecord:
    text = decode_sample(tokenizer, raw, thinking=cfg.eval.thinking)
    return GenerationRecord(
        key=raw.key,
        suite=job.suite.name,
        question_id=job.question.id,
        paraphrase_index=job.paraphrase_index,
        sample_index=index,
        category=job.question.category,
        model=source.model_label,
        adapter=source.adapter_label,
        selection=source.selection,
        weights=source.weights,
        sampling=SamplingParams(
            temperature=cfg.eval.temperature,
            top_p=cfg.eval.top_p,
            max_new_tokens=cfg.eval.max_new_tokens,
            seed=seed,
        ),
        system_prompt=job.system_prompt,
        question=job.question.paraphrases[job.paraphrase_index],
        prompt=job.prompt,
        answer=text.answer,
        thinking=text.thinking,
        n_prompt_tokens=len(job.prompt_ids),
        n_answer_tokens=text.n_answer_tokens,
        finish_reason=text.finish_reason,
        judge_prompts=dict(job.question.judge_prompts),
        rubric=job.suite.rubric,
        backend=generator.backend,
    )
