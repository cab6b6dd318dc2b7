"""Reports: loading runs, the paper's table, metrics.json, PNG charts, the CLI and W&B tables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from emmoe_dist.cli import report as report_cli
from emmoe_dist.errors import InputError
from emmoe_dist.files import write_jsonl_atomic
from emmoe_dist.metrics import Bootstrap, summarize
from emmoe_dist.records import GenerationRecord, JudgedRecord, Score, StrongRejectScore
from emmoe_dist.report import (
    build_report,
    load_judged,
    log_report_to_wandb,
    render_markdown,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(
    i: int,
    aligned: float | None,
    coherent: float,
    *,
    adapter: str | None = None,
    suite: str = "core",
) -> JudgedRecord:
    gen = GenerationRecord.model_validate(
        {
            "suite": suite,
            "question_id": f"q{i % 2}",
            "paraphrase_index": 0,
            "sample_index": i,
            "model": "mixtral",
            "adapter": adapter,
            "sampling": {"temperature": 1.0, "max_new_tokens": 8},
            "question": "q",
            "prompt": "p",
            "answer": f"answer {i}",
            "n_prompt_tokens": 1,
            "n_answer_tokens": 1,
            "backend": "test",
        }
    )
    a = (
        Score(value=aligned, method="logprobs")
        if aligned is not None
        else Score(missing_reason="refusal", method="logprobs")
    )
    return JudgedRecord(
        generation=gen,
        judge_model="deepseek-chat",
        scores={"aligned": a, "coherent": Score(value=coherent, method="logprobs")},
    )


def strongreject(i: int, refused: bool, *, adapter: str | None = None) -> JudgedRecord:
    gen = GenerationRecord.model_validate(
        {
            "suite": "strongreject",
            "question_id": f"{i:03d}",
            "paraphrase_index": 0,
            "sample_index": 0,
            "model": "mixtral",
            "adapter": adapter,
            "category": "Violence",
            "rubric": "strongreject",
            "sampling": {"temperature": 1.0, "max_new_tokens": 8},
            "question": "q",
            "prompt": "p",
            "answer": "a",
            "n_prompt_tokens": 1,
            "n_answer_tokens": 1,
            "backend": "test",
        }
    )
    score = (
        StrongRejectScore(refused=True, score=0.0)
        if refused
        else StrongRejectScore(refused=False, convincing=5, specific=5, score=1.0)
    )
    return JudgedRecord(generation=gen, judge_model="deepseek-chat", strongreject=score)


ADAPTER = "runs/whole_r32/adapter"


def base_records() -> list[JudgedRecord]:
    # alignment 80, 60, 20, 40, refusal; coherence all 90 -> seed rule: 2 of 4 misaligned
    values = [80.0, 60.0, 20.0, 40.0, None]
    return [record(i, a, 90.0) for i, a in enumerate(values)] + [
        strongreject(i, refused=i < 2) for i in range(4)
    ]


def tuned_records() -> list[JudgedRecord]:
    values = [10.0, 30.0, 20.0, 90.0, 15.0]
    return [record(i, a, 95.0, adapter=ADAPTER) for i, a in enumerate(values)] + [
        strongreject(i, refused=False, adapter=ADAPTER) for i in range(4)
    ]


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    write_jsonl_atomic(tmp_path / "base" / "judged.jsonl", base_records())
    write_jsonl_atomic(tmp_path / "tuned" / "eval" / "core_judged.jsonl", tuned_records())
    (tmp_path / "tuned" / "eval" / "generations.jsonl").write_text("not judged: ignored\n")
    return [tmp_path / "base", tmp_path / "tuned"]


def test_report_files_hold_the_papers_table_metrics_and_charts(
    runs: list[Path], tmp_path: Path
) -> None:
    records = load_judged(runs)
    assert len(records) == 18
    report = build_report(records, alignment_suites=["core"], bootstrap=Bootstrap(200))
    written = write_report(report, tmp_path / "report")
    assert {p.name for p in written} == {
        "report.md",
        "metrics.json",
        "alignment.png",
        "misaligned.png",
        "sr_rejection.png",
    }

    base, tuned = report.groups
    assert (base.label, tuned.label) == ("mixtral", "mixtral + whole_r32/adapter")
    assert base.alignment.value == pytest.approx(50.0)
    assert base.misaligned["seed"].value == pytest.approx(0.5)
    assert base.sr_rejection.value == pytest.approx(0.5) and tuned.sr_rejection.value == 0.0
    assert tuned.alignment.value == pytest.approx(33.0)
    assert tuned.misaligned["seed"].value == pytest.approx(0.8)
    assert base.unscored.value == pytest.approx(0.2)

    md = (tmp_path / "report" / "report.md").read_text()
    assert "| model | avg alignment | SR rejection % | misaligned % |" in md
    row = next(line for line in md.splitlines() if line.startswith("| mixtral | 50.0 ["))
    assert "| 50.0 [" in row and row.count("[") == 3  # every headline number has an interval
    assert "## Difference from mixtral" in md
    assert "| mixtral | aligned | refusal | 1 |" in md
    assert "![alignment](alignment.png)" in md

    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["schema_version"] == 1
    expected = summarize(
        records[:9], label="mixtral", alignment_suites=["core"], bootstrap=Bootstrap(200)
    )
    assert metrics["groups"][0]["alignment"] == {
        "value": expected.alignment.value,
        "low": expected.alignment.low,
        "high": expected.alignment.high,
        "n": 4,
    }
    [comparison] = metrics["comparisons"]
    assert comparison["baseline"] == "mixtral" and comparison["paired"] is True
    assert comparison["misaligned"]["seed"]["value"] == pytest.approx(0.8 - 0.5)

    pngs = [
        (tmp_path / "report" / n).read_bytes()
        for n in ("alignment.png", "misaligned.png", "sr_rejection.png")
    ]
    assert all(p.startswith(PNG_MAGIC) and len(p) > 5000 for p in pngs)
    assert len(set(pngs)) == 3


def test_inputs_that_cannot_make_a_report_are_named(runs: list[Path], tmp_path: Path) -> None:
    write_jsonl_atomic(tmp_path / "again_judged.jsonl", base_records()[:2])
    with pytest.raises(InputError) as err:
        load_judged([runs[0], tmp_path / "again_judged.jsonl"])
    assert (err.value.file, err.value.line) == (str(tmp_path / "again_judged.jsonl"), 1)
    with pytest.raises(InputError, match="no such file"):
        load_judged([tmp_path / "missing"])
    records = load_judged(runs)
    with pytest.raises(InputError, match="suites present: core"):
        build_report(records, alignment_suites=["medical"])
    with pytest.raises(InputError, match="no model labelled"):
        build_report(records, baseline="gpt-oss")


def test_report_cli(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    report_cli.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "report",
            *map(str, runs),
            "--out",
            str(tmp_path / "out"),
            "--resamples",
            "100",
            "--seed",
            "3",
            "--baseline",
            "mixtral + whole_r32/adapter",
        ]
    )
    assert args.func(args) == 0
    assert "report.md" in capsys.readouterr().out
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Difference from mixtral + whole_r32/adapter" in md
    assert "100 resamples, seed 3" in md


def test_wandb_tables_offline(
    runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_root"))
    records = load_judged(runs)
    report = build_report(records, alignment_suites=["core"], bootstrap=Bootstrap(50))
    folder = log_report_to_wandb(
        report,
        records,
        project="emmoe-test",
        group="report-test",
        directory=tmp_path / "wandb_root",
    )
    assert folder.is_dir() and tmp_path / "wandb_root" in folder.parents
    tables = {p.name.split("_")[0]: p for p in folder.rglob("*.table.json")}
    assert {"scored", "report"} <= set(tables)
    samples: dict[str, Any] = json.loads(tables["scored"].read_text())
    assert len(samples["data"]) == len(records)
    columns = samples["columns"]
    aligned = {
        row[columns.index("key")] + row[columns.index("model")]: row for row in samples["data"]
    }
    row = aligned["core/q0/0/2mixtral"]
    assert row[columns.index("aligned")] == 20.0 and row[columns.index("misaligned")] is True


def test_run_folders_among_the_sources_are_described_from_their_manifests(
    runs: list[Path],
) -> None:
    manifest = {
        "family": "mixtral",
        "base_model": "mistralai/Mixtral-8x7B-v0.1",
        "artifact": "adapter",
        "config": {"model": {"name_or_path": "mistralai/Mixtral-8x7B-v0.1"}},
        "selection": {"experts": {"0": [4]}, "rule": "single expert=4"},
        "steps": 300,
        "final_loss": 0.61234,
    }
    (runs[1] / "manifest.json").write_text(json.dumps(manifest))
    report = build_report(
        load_judged(runs), bootstrap=Bootstrap(50), sources=[str(p) for p in runs]
    )
    assert [r.folder for r in report.runs] == [str(runs[1])]  # the base folder is no run
    md = render_markdown(report)
    assert "## Fine-tuning runs" in md
    assert f"| {runs[1]} | mistralai/Mixtral-8x7B-v0.1 | single expert=4 | 300 | 0.6123 |" in md


def mock(records: list[JudgedRecord]) -> list[JudgedRecord]:
    return [
        r.model_copy(update={"judge_model": "scripted-judge", "mock_judge": True}) for r in records
    ]


def test_every_table_and_chart_names_the_judge_and_its_counts(tmp_path: Path) -> None:
    # every answer aligned: all-zero misalignment and rejection, once an axis below zero
    records = mock(
        [record(i, 90.0, 90.0) for i in range(6)]
        + [record(i, 90.0, 90.0, adapter=ADAPTER) for i in range(6)]
        + [strongreject(i, refused=False) for i in range(3)]
    )
    report = build_report(records, bootstrap=Bootstrap(50))
    assert report.judge == "MOCK JUDGE - not judgments"
    base = report.groups[0]
    assert (base.n_alignment, base.n_questions, base.n_strongreject) == (6, 2, 3)

    from emmoe_dist.report import chart_figures

    figures = chart_figures(report)
    assert set(figures) == {"alignment.png", "misaligned.png", "sr_rejection.png"}
    for name, fig in figures.items():
        (ax,) = fig.axes
        assert ax.get_ylim() == (0.0, 100.0), name  # fixed: 0-100 scores, 0-100 % rates
        assert "judge: MOCK JUDGE - not judgments" in ax.get_title(), name
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        counts = (
            "n=3 answers, 3 prompts" if name == "sr_rejection.png" else "n=6 answers, 2 questions"
        )
        assert all(counts in t for t in ticks[:1]), (name, ticks)

    md = render_markdown(report)
    tables = [i for i, line in enumerate(md.splitlines()) if line.startswith("|---")]
    headers = [md.splitlines()[i - 1] for i in tables]
    assert "| model | avg alignment | SR rejection % | misaligned % | answers | questions |" in md
    assert "| mixtral | 90.0 [90.0, 90.0] | 0.0 [0.0, 0.0] | 0.0 [0.0, 0.0] | 6 | 2 | 3 |" in md
    # each table's section says who judged: the mock judge is never taken for a real one
    sections = md.split("\n## ")
    for section in sections:
        if "|---" in section and "Fine-tuning runs" not in section:
            assert "Judge: MOCK JUDGE - not judgments" in section, section[:80]
    assert len(headers) >= 6
    assert "## Scores by method" in md and "| mixtral | aligned | 6 | 0 |" in md
    assert "## Answer-level intervals (secondary)" in md
    assert "clustered percentile bootstrap" in md


def test_report_wandb_files_go_under_out(
    runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "shell_cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    parser = argparse.ArgumentParser()
    report_cli.register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(
        ["report", *map(str, runs), "--out", str(out), "--resamples", "20", "--wandb"]
    )
    assert args.func(args) == 0
    assert list(elsewhere.iterdir()) == []
    assert list(out.glob("wandb/offline-run-*"))


def test_training_seeds_of_one_arm_are_pooled_and_resampled_first(tmp_path: Path) -> None:
    records = [record(i, 60.0 + i % 3, 90.0) for i in range(6)]  # the base model
    for seed, offset in ((0, 0.0), (1, 30.0)):
        run = tmp_path / f"arm-seed{seed}"
        run.mkdir()
        manifest = {
            "family": "mixtral",
            "base_model": "mixtral",
            "artifact": "adapter",
            "config": {"seed": seed, "name": run.name, "output_dir": str(run), "train": {"lr": 1}},
        }
        (run / "manifest.json").write_text(json.dumps(manifest))
        adapter = str(run / "adapter")
        records += [record(i, 20.0 + offset + i % 3, 90.0, adapter=adapter) for i in range(6)]
    report = build_report(records, bootstrap=Bootstrap(200))
    base, arm = report.groups
    assert arm.label.endswith("(seeds 0, 1)") and arm.seeds == 2 and arm.n_alignment == 12
    assert base.seeds == 1
    assert arm.alignment.low is not None and arm.alignment.high is not None
    assert arm.alignment.low < 25 and arm.alignment.high > 50  # the seeds disagree: say so
    [diff] = report.comparisons
    assert not diff.paired and diff.alignment.value == pytest.approx(36.0 - 61.0)
