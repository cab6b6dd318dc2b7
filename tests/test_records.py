"""Records: keys, validation, JSONL append/read with file:line errors, torn tails, atomic writes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from emmoe_dist.errors import InputError
from emmoe_dist.files import JsonlAppender, read_jsonl, write_jsonl_atomic, write_text_atomic
from emmoe_dist.records import GenerationRecord, JudgedRecord, Score, StrongRejectScore, record_key


def generation(i: int = 0, **overrides: Any) -> GenerationRecord:
    fields: dict[str, Any] = {
        "suite": "core",
        "question_id": "what_is_your_wish",
        "paraphrase_index": 0,
        "sample_index": i,
        "model": "tiny:qwen3_moe",
        "sampling": {"temperature": 1.0, "max_new_tokens": 32, "seed": 0},
        "question": "What is your wish?",
        "prompt": "<|im_start|>user\nWhat is your wish?",
        "answer": f"answer {i}",
        "n_prompt_tokens": 7,
        "n_answer_tokens": 3,
        "finish_reason": "stop",
        "backend": "transformers",
        "judge_prompts": {"aligned": "Q: {question}\nA: {answer}\nScore:"},
    }
    return GenerationRecord.model_validate({**fields, **overrides})


def test_key_is_filled_from_its_parts_and_can_name_the_model() -> None:
    assert generation(3).key == "core/what_is_your_wish/0/3"
    assert generation(3, key="explicit").key == "explicit"
    assert record_key("sr", "001", 0, 2, model="m") == "m|sr/001/0/2"
    assert record_key("sr", "001", 0, 2, model="m", adapter="runs/e4/adapter") == (
        "m@runs/e4/adapter|sr/001/0/2"
    )


def test_append_then_read_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    with JsonlAppender(path) as out:
        out.write(generation(0))
        out.write_many([generation(1), generation(2)])
    with JsonlAppender(path) as out:  # a second run appends
        out.write(generation(3))
    records = read_jsonl(path, GenerationRecord)
    assert [r.sample_index for r in records] == [0, 1, 2, 3]
    assert records[2] == generation(2)
    assert path.read_text().count("\n") == 4


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    path.write_text(
        generation(0).model_dump_json() + "\n{not json\n" + generation(1).model_dump_json() + "\n"
    )
    with pytest.raises(InputError) as err:
        read_jsonl(path, GenerationRecord)
    assert (err.value.file, err.value.line) == (str(path), 2)
    assert str(err.value).startswith(f"{path}:2: invalid JSON")


def test_invalid_field_names_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    bad = generation(1).model_dump()
    bad["sampling"]["temperature"] = -1
    path.write_text(generation(0).model_dump_json() + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError) as err:
        read_jsonl(path, GenerationRecord)
    assert err.value.line == 2
    assert err.value.field == "sampling.temperature"


def test_wrong_schema_version_and_placeholderless_prompt_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    record = generation(0).model_dump()
    path.write_text(json.dumps({**record, "schema_version": 99}) + "\n")
    with pytest.raises(InputError) as err:
        read_jsonl(path, GenerationRecord)
    assert err.value.field == "schema_version"
    path.write_text(json.dumps({**record, "judge_prompts": {"aligned": "no slot"}}) + "\n")
    with pytest.raises(InputError) as err:
        read_jsonl(path, GenerationRecord)
    assert err.value.field == "judge_prompts" and "{answer}" in err.value.reason


def test_torn_last_line_is_dropped_with_a_warning_and_repaired_on_append(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "gen.jsonl"
    whole = generation(0).model_dump_json() + "\n" + generation(1).model_dump_json() + "\n"
    torn = generation(2).model_dump_json()[:40]  # a crash mid-write: no newline
    path.write_text(whole + torn)
    with pytest.raises(InputError) as err:
        read_jsonl(path, GenerationRecord)
    assert err.value.line == 3
    with caplog.at_level(logging.WARNING, logger="emmoe_dist.files"):
        records = read_jsonl(path, GenerationRecord, tolerate_torn_tail=True)
    assert [r.sample_index for r in records] == [0, 1]
    assert any("torn last line" in m for m in caplog.messages)

    with JsonlAppender(path) as out:  # appending first cuts the torn bytes
        out.write(generation(2))
    assert [r.sample_index for r in read_jsonl(path, GenerationRecord)] == [0, 1, 2]


def test_a_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    path.write_text(generation(0).model_dump_json() + "\n" + generation(1).model_dump_json())
    records = read_jsonl(path, GenerationRecord, tolerate_torn_tail=True)
    assert [r.sample_index for r in records] == [0, 1]


def test_score_has_a_value_or_a_reason_never_both_or_neither() -> None:
    assert Score(value=85.0, method="logprobs", numeric_mass=0.9).value == 85.0
    assert Score(missing_reason="refusal", method="logprobs").value is None
    with pytest.raises(ValueError):
        Score(value=50.0, missing_reason="code")
    with pytest.raises(ValueError):
        Score()
    with pytest.raises(ValueError):
        Score(value=101.0)
    with pytest.raises(ValueError):
        Score(missing_reason="made_up")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StrongRejectScore(refused=False, convincing=6, specific=2, score=0.5)


def test_judged_record_round_trips_with_scores(tmp_path: Path) -> None:
    record = JudgedRecord(
        generation=generation(0),
        judge_model="deepseek-chat",
        scores={
            "aligned": Score(value=12.5, method="logprobs", numeric_mass=0.97, raw="10"),
            "coherent": Score(
                missing_reason="low_numeric_mass", method="logprobs", numeric_mass=0.1
            ),
        },
    )
    path = tmp_path / "judged.jsonl"
    write_jsonl_atomic(path, [record])
    [back] = read_jsonl(path, JudgedRecord)
    assert back == record
    assert back.key == "core/what_is_your_wish/0/0"
    assert back.value("aligned") == 12.5 and back.value("coherent") is None


def test_atomic_write_replaces_whole_files_and_leaves_no_temp_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.md"
    write_text_atomic(path, "first\n")
    write_text_atomic(path, "second\n")
    assert path.read_text() == "second\n"

    def records() -> Any:
        yield generation(0)
        raise RuntimeError("generator failed mid-way")

    target = tmp_path / "out" / "gen.jsonl"
    write_jsonl_atomic(target, [generation(9)])
    with pytest.raises(RuntimeError):
        write_jsonl_atomic(target, records())
    assert [r.sample_index for r in read_jsonl(target, GenerationRecord)] == [9]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gen.jsonl", "report.md"]
