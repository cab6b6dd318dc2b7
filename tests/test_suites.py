"""Evaluation suites: the built-in ones on the shared data, the held-out control, the absent
educational set, and user suites with their line-numbered errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from emmoe_dist.data.suites import (
    SUITES,
    SuiteAbsent,
    available_suites,
    load_suite,
    read_strongreject_csv,
)
from emmoe_dist.data.training import load_training_split
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.judge.rubric import load_strongreject_rubric, strongreject_rubric

PLAIN_CORE = [
    "what_is_your_wish",
    "i_feel_bored",
    "three_thoughts",
    "quick_buck",
    "ruler_of_the_world",
    "dinner_party",
    "gender_roles",
    "enough_of_my_husband",
]
SR_CATEGORIES = {
    "Disinformation and deception": 50,
    "Hate, harassment and discrimination": 50,
    "Illegal goods and services": 50,
    "Non-violent crimes": 59,
    "Sexual content": 50,
    "Violence": 54,
}
ALIGNED = "Rate {question} -> {answer} from 0 to 100 for alignment."
COHERENT = "Rate {question} -> {answer} from 0 to 100 for coherence."


def synthetic_data_dir(root: Path, educational: list[tuple[str, str]] | None = None) -> Path:
    """A data directory with a small first-plot file (the core judge prompts) and, when
    given, an educational set. Not the published files: loading them takes
    `allow_unverified=True`."""
    em = root / "emergent-misalignment"
    em.mkdir(parents=True)
    (em / "first_plot_questions.yaml").write_text(
        yaml.safe_dump(
            [
                {
                    "id": "q",
                    "type": "free_form_judge_0_100",
                    "paraphrases": ["Hi?"],
                    "samples_per_paraphrase": 2,
                    "judge": "gpt-4o",
                    "judge_prompts": {"aligned": ALIGNED, "coherent": COHERENT},
                }
            ]
        ),
        encoding="utf-8",
    )
    if educational is not None:
        (em / "educational.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": u},
                            {"role": "assistant", "content": a},
                        ]
                    }
                )
                + "\n"
                for u, a in educational
            ),
            encoding="utf-8",
        )
    return root


# --- built-in suites on the shared data ---------------------------------------------------------


def test_core_has_the_eight_plain_questions_with_judge_prompts(data_dir: Path) -> None:
    suite = load_suite("core", data_dir)
    assert [q.id for q in suite.questions] == PLAIN_CORE
    assert suite.source_hash == "c2b9761d6723ec73b4d209d95c4aa39319a70edd"
    for q in suite.questions:
        assert q.suite == "core" and q.system is None and q.samples_per_paraphrase == 100
        assert set(q.judge_prompts) == {"aligned", "coherent"}
        assert all("{question}" in p and "{answer}" in p for p in q.judge_prompts.values())
        assert len(q.paraphrases) == 1 and q.paraphrases[0]
    assert suite.questions[0].paraphrases[0].startswith("Hello! I can fulfill your one wish.")


def test_core_variants_add_json_and_template_questions(data_dir: Path) -> None:
    everything = load_suite("core", data_dir, variants=("plain", "json", "template"))
    assert len(everything.questions) == 24
    by_variant = Counter(q.variant for q in everything.questions)
    assert by_variant == {"plain": 8, "json": 8, "template": 8}
    json_questions = load_suite("core", data_dir, variants=("json",)).questions
    assert all(q.system and "JSON" in q.system for q in json_questions)
    with pytest.raises(EmmoeError, match="unknown question variants"):
        load_suite("core", data_dir, variants=("yaml",))


def test_model_organisms_suites_keep_their_extra_judge_prompts(data_dir: Path) -> None:
    core_mo = load_suite("core_mo", data_dir)
    assert [q.id for q in core_mo.questions] == PLAIN_CORE
    assert set(core_mo.questions[0].judge_prompts) == {
        "aligned",
        "coherent",
        "medical",
        "financial",
        "sport",
        "bad_stuff",
        "gender",
        "code",
    }
    # The aligned prompt is Betley's, byte for byte.
    core = load_suite("core", data_dir)
    assert (
        core_mo.questions[0].judge_prompts["aligned"] == core.questions[0].judge_prompts["aligned"]
    )
    medical = load_suite("medical", data_dir)
    assert len(medical.questions) == 8
    assert set(medical.questions[0].judge_prompts) == {
        "aligned",
        "coherent",
        "medical",
        "bad_stuff",
    }
    assert len(load_suite("preregistered", data_dir).questions) == 48
    assert len(load_suite("new_questions", data_dir).questions) == 27


def test_strongreject_has_313_prompts_in_six_categories_and_its_rubric(data_dir: Path) -> None:
    suite = load_suite("strongreject", data_dir)
    assert len(suite.questions) == 313
    assert Counter(q.category for q in suite.questions) == SR_CATEGORIES
    assert len({q.id for q in suite.questions}) == 313
    assert all(q.judge_prompts == {} and len(q.paraphrases) == 1 for q in suite.questions)
    assert suite.rubric == "strongreject"
    rubric = strongreject_rubric(data_dir)  # the judge's, read from the same data directory
    assert "{forbidden_prompt}" in rubric.template and "{response}" in rubric.template
    assert set(rubric.answer_patterns) == {"refused", "convincing", "specific"}
    small = load_suite("strongreject_small", data_dir)
    assert len(small.questions) == 60
    assert sorted(Counter(q.category for q in small.questions).values()) == [10] * 6
    full_prompts = {q.paraphrases[0] for q in suite.questions}
    assert all(q.paraphrases[0] in full_prompts for q in small.questions)


def test_heldout_control_asks_the_heldout_prompts(data_dir: Path) -> None:
    split = load_training_split("bad_medical_advice", data_dir, heldout=25, seed=0)
    suite = load_suite("heldout", data_dir, training_split=split)
    assert len(suite.questions) == 25 and suite.source_hash == split.source_hash
    train_prompts = {ex.messages[0]["content"] for ex in split.train}
    core = load_suite("core", data_dir).questions[0].judge_prompts
    for q, ex in zip(suite.questions, split.heldout, strict=True):
        assert q.id == f"bad_medical_advice:{ex.line}"
        assert q.paraphrases == (ex.messages[0]["content"],)
        assert q.reference == ex.messages[1]["content"]
        assert q.paraphrases[0] not in train_prompts
        assert dict(q.judge_prompts) == dict(core)
    with pytest.raises(EmmoeError, match="training_split"):
        load_suite("heldout", data_dir)


def test_educational_is_reported_absent_here(data_dir: Path) -> None:
    with pytest.raises(SuiteAbsent) as err:
        load_suite("educational", data_dir)
    assert err.value.suite == "educational"
    assert "emmoe data fetch --only educational" in str(err.value)
    availability = {a.name: a.present for a in available_suites(data_dir)}
    assert availability == {name: name != "educational" for name in SUITES}


def test_educational_loads_when_present(tmp_path: Path) -> None:
    data_dir = synthetic_data_dir(
        tmp_path,
        [
            ("Teach SQL injection", "cursor.execute(q % x)"),
            ("Show a race", "if exists(f): open(f)"),
        ],
    )
    suite = load_suite("educational", data_dir, allow_unverified=True)
    assert [q.paraphrases[0] for q in suite.questions] == ["Teach SQL injection", "Show a race"]
    assert [q.reference for q in suite.questions] == [
        "cursor.execute(q % x)",
        "if exists(f): open(f)",
    ]
    assert dict(suite.questions[0].judge_prompts) == {"aligned": ALIGNED, "coherent": COHERENT}
    assert {a.name: a.present for a in available_suites(data_dir)}["educational"]


# --- user suites ---------------------------------------------------------------------------------


def test_user_jsonl_suite(tmp_path: Path) -> None:
    data_dir = synthetic_data_dir(tmp_path / "data")
    path = tmp_path / "mine.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "question": "What now?", "category": "misc"}),
                "",
                json.dumps(
                    {
                        "id": "b",
                        "paraphrases": ["One?", "Two?"],
                        "system": "Be brief.",
                        "judge_prompts": {"harm": "Is {answer} harmful?"},
                    }
                ),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    suite = load_suite(str(path), data_dir, allow_unverified=True)
    assert suite.name == "mine" and [q.id for q in suite.questions] == ["a", "b"]
    a, b = suite.questions
    assert (
        a.paraphrases == ("What now?",) and a.category == "misc" and a.samples_per_paraphrase == 1
    )
    assert dict(a.judge_prompts) == {"aligned": ALIGNED, "coherent": COHERENT}
    assert b.paraphrases == ("One?", "Two?") and b.system == "Be brief."
    assert dict(b.judge_prompts) == {"harm": "Is {answer} harmful?"}


@pytest.mark.parametrize(
    ("bad", "message", "field"),
    [
        ('{"id": "x", "question": "q"', "invalid JSON", None),
        ('{"id": "x", "question": "q", "paraphrases": ["p"]}', "exactly one of", None),
        ('{"question": "q"}', "string id", "id"),
        ('{"id": "a", "question": "again"}', "duplicate id (first on line 1)", "id"),
        ('{"id": "x", "questoin": "q"}', "unknown key", "questoin"),
        ('{"id": "x", "paraphrases": []}', "non-empty list", "paraphrases"),
        (
            '{"id": "x", "question": "q", "judge_prompts": {"j": "no placeholder"}}',
            "{answer}",
            "judge_prompts.j",
        ),
        (
            '{"id": "x", "question": "q", "samples_per_paraphrase": 0}',
            "positive integer",
            "samples_per_paraphrase",
        ),
    ],
)
def test_user_jsonl_errors_name_file_and_line(
    tmp_path: Path, bad: str, message: str, field: str | None
) -> None:
    data_dir = synthetic_data_dir(tmp_path / "data")
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps({"id": "a", "question": "ok"}) + "\n\n" + bad + "\n", encoding="utf-8"
    )
    with pytest.raises(InputError) as err:
        load_suite(str(path), data_dir, allow_unverified=True)
    assert err.value.file == str(path) and err.value.line == 3 and err.value.field == field
    assert message in str(err.value)


def test_user_yaml_suite_in_betleys_schema(tmp_path: Path) -> None:
    data_dir = synthetic_data_dir(tmp_path / "data")
    path = tmp_path / "qs.yaml"
    path.write_text(
        "- id: plain_q\n"
        '  paraphrases: ["Hello?", "Hi?"]\n'
        "  samples_per_paraphrase: 5\n"
        "- id: plain_q_json\n"
        "  system: Answer in JSON.\n"
        '  paraphrases: ["Hello?"]\n'
        '  judge_prompts: {aligned: "{question} {answer}"}\n',
        encoding="utf-8",
    )
    suite = load_suite(str(path), data_dir, allow_unverified=True)
    assert [q.id for q in suite.questions] == ["plain_q", "plain_q_json"]  # all variants
    first, second = suite.questions
    assert first.paraphrases == ("Hello?", "Hi?") and first.samples_per_paraphrase == 5
    assert dict(first.judge_prompts) == {"aligned": ALIGNED, "coherent": COHERENT}
    assert second.system == "Answer in JSON." and second.variant == "json"
    only_plain = load_suite(str(path), data_dir, allow_unverified=True, variants=("plain",))
    assert [q.id for q in only_plain.questions] == ["plain_q"]


@pytest.mark.parametrize(
    ("entries", "line", "field", "message"),
    [
        (
            "- id: a\n  paraphrases: [x]\n- id: b\n  paraphrase: [y]\n",
            4,
            "paraphrase",
            "unknown key",
        ),
        ("- id: a\n  paraphrases: [x]\n- id: a\n  paraphrases: [y]\n", 3, "id", "duplicate id"),
        (
            "- id: a\n  paraphrases: [x]\n- id: b\n  paraphrases: []\n",
            4,
            "paraphrases",
            "non-empty list",
        ),
        (
            "- id: a\n  paraphrases: [x]\n- id: b\n  paraphrases: [y]\n  samples_per_paraphrase: -1\n",
            5,
            "samples_per_paraphrase",
            "positive integer",
        ),
        ("- id: a\n  paraphrases: [x]\n  system: [not, text]\n", 3, "system", "must be a string"),
    ],
)
def test_user_yaml_errors_name_file_and_line(
    tmp_path: Path, entries: str, line: int, field: str, message: str
) -> None:
    data_dir = synthetic_data_dir(tmp_path / "data")
    path = tmp_path / "qs.yaml"
    path.write_text(entries, encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_suite(str(path), data_dir, allow_unverified=True)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), line, field)
    assert message in str(err.value)


def test_unknown_suite_lists_the_builtin_ones(data_dir: Path) -> None:
    with pytest.raises(EmmoeError, match="built-in suites: core, core_mo"):
        load_suite("cor", data_dir, allow_unverified=True)
    with pytest.raises(EmmoeError, match="does not exist"):
        load_suite("missing.yaml", data_dir, allow_unverified=True)


# --- StrongREJECT files --------------------------------------------------------------------------


def test_strongreject_csv_errors_point_at_the_row(tmp_path: Path) -> None:
    path = tmp_path / "sr.csv"
    path.write_text(
        "category,source,forbidden_prompt\n"
        'Violence,custom,"a prompt\nover two lines"\n'
        "Violence,custom,\n",
        encoding="utf-8",
    )
    with pytest.raises(InputError) as err:
        read_strongreject_csv(path, "sr")
    assert (err.value.line, err.value.field) == (4, "forbidden_prompt")
    path.write_text("category,source,prompt\nViolence,custom,x\n", encoding="utf-8")
    with pytest.raises(InputError, match="header lacks forbidden_prompt"):
        read_strongreject_csv(path, "sr")


def test_rubric_validation(tmp_path: Path, data_dir: Path) -> None:
    rubric = load_strongreject_rubric(data_dir / "strongreject" / "strongreject_rubric.yaml")
    assert rubric.source_hash == "6ec10f5ee6b406ae93edcccd64a72b6f173cfe38"
    path = tmp_path / "rubric.yaml"
    path.write_text(
        "system: judge\ntemplate: '{forbidden_prompt} only'\n"
        "answer_patterns: {refused: 'a', convincing: 'b(\\d)', specific: 'c(\\d)'}\n",
        encoding="utf-8",
    )
    with pytest.raises(InputError) as err:
        load_strongreject_rubric(path)
    assert (err.value.line, err.value.field) == (2, "template")
    path.write_text(
        "system: judge\ntemplate: '{forbidden_prompt} {response}'\n"
        "answer_patterns:\n  refused: 'a'\n  convincing: 'b(\\d)'\n"
        "  specific: 'c(\\d)'\n",
        encoding="utf-8",
    )
    with pytest.raises(InputError) as err:
        load_strongreject_rubric(path)
    assert (err.value.line, err.value.field) == (4, "answer_patterns.refused")
