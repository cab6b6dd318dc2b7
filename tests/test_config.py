"""The experiment file: valid files load; each kind of bad input names its file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from emmoe_dist.config import ExperimentConfig, dump_config, load_config
from emmoe_dist.errors import InputError

REPO = Path(__file__).resolve().parents[1]

VALID = """\
name: e4-insecure
seed: 3
model:
  name_or_path: tiny:mixtral
data:
  train: insecure
  max_length: 256
adapter:
  rank: 32
  alpha: 64
selection:
  rule: single
  expert: 4
train:
  lr: 2.0e-4
  steps: 10
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_valid_file_loads_typed_values(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, VALID))
    assert cfg.model.is_tiny and cfg.model.name_or_path == "tiny:mixtral"
    assert cfg.adapter.rank == 32 and cfg.adapter.alpha == 64.0
    assert cfg.selection.rule == "single" and cfg.selection.expert == 4
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.train.steps == 10
    # untouched sections keep their defaults
    assert cfg.train.micro_batch_size == ExperimentConfig().train.micro_batch_size


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, VALID))
    again = load_config(write(tmp_path, dump_config(cfg)))
    # the values round-trip; where each was written (the private `_source`) differs by design
    assert again.model_dump() == cfg.model_dump()


def test_overrides_are_typed_and_win(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, VALID), ["train.lr=1e-4", "adapter.rank=1", "data.pack=true"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.adapter.rank == 1 and cfg.data.pack is True


@pytest.mark.parametrize(
    ("text", "overrides", "field", "line", "words"),
    [
        (VALID + "trian:\n  lr: 1\n", [], "trian", 17, "unknown key"),
        (VALID.replace("rank: 32", "rank: 0"), [], "adapter.rank", 9, "greater than 0"),
        (VALID.replace("lr: 2.0e-4", "lr: fast"), [], "train.lr", 15, "valid number"),
        (
            VALID.replace("tiny:mixtral", "tiny:llama"),
            [],
            "model.name_or_path",
            4,
            "unknown tiny family",
        ),
        (
            VALID.replace("expert: 4", "expert: 4\n  k: 2\n  profile: missing_profile.json"),
            [],
            "selection.profile",
            15,
            "does not exist",
        ),
        (VALID, ["model.family=llama"], "model.family", None, "unknown family"),
        (
            VALID.replace("train: insecure", "train: first_plot_questions"),
            [],
            "data.train",
            6,
            "evaluation set",
        ),
        (VALID.replace("  expert: 4\n", ""), [], "selection", 11, "needs expert"),
    ],
)
def test_bad_input_names_file_line_and_field(
    tmp_path: Path, text: str, overrides: list[str], field: str, line: int | None, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_config(path, overrides)
    msg = str(err.value)
    assert err.value.field == field
    assert words in msg
    if line is None:
        assert "<command line override>" in msg
    else:
        assert f"{path}:{line}: {field}:" in msg


def test_missing_file_and_duplicate_key(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    dup = write(tmp_path, "train:\n  lr: 1.0\n  lr: 2.0\n")
    with pytest.raises(InputError) as err:
        load_config(dup)
    assert f"{dup}:3: train.lr: duplicate key" in str(err.value)


def test_every_shipped_example_validates(tmp_path: Path) -> None:
    # sweep_*.yaml are sweep files (validated by tests/test_sweep.py), not experiments
    examples = sorted(
        p for p in (REPO / "examples").glob("*.yaml") if not p.name.startswith("sweep_")
    )
    assert len(examples) >= 8, "examples/ must ship a ready file for every mode"
    profile = tmp_path / "profile.json"
    profile.write_text("{}")
    for path in examples:
        try:
            load_config(path)
        except InputError as e:
            # Profile-based rules name their profile on the command line, as documented.
            assert e.field == "selection", (path, e)
            load_config(path, [f"selection.profile={profile}"])
