"""Data that is not the published file is refused where it is used, unless the user says so;
then every output records the expected hash, the actual one and `verified: false`. Also: what
`--limit` takes (a seeded shuffle, then the first N) is what its help says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from emmoe_dist.catalog import DATASETS, UnverifiedData, git_blob_sha1
from emmoe_dist.cli.main import build_parser
from emmoe_dist.cli.main import main as cli_main
from emmoe_dist.config import load_config
from emmoe_dist.data.chat import read_chat_jsonl
from emmoe_dist.data.training import load_training_split

INSECURE = DATASETS["insecure"]


@pytest.fixture
def tampered(tmp_path: Path, data_dir: Path) -> Path:
    """A data directory whose `insecure.jsonl` gained one row (a copy: the shared one is
    read-only), and an untouched copy of the core questions."""
    root = tmp_path / "data"
    for name in ("insecure", "first_plot_questions"):
        target = root / DATASETS[name].relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / DATASETS[name].relpath, target)
    path = root / INSECURE.relpath
    first = path.read_text(encoding="utf-8").splitlines()[0]
    with path.open("a", encoding="utf-8") as f:
        f.write(first + "\n")
    return root


def test_data_list_exits_non_zero_on_a_mismatch(
    tampered: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["data", "list", "--data-dir", str(tampered)]) == 1
    out = capsys.readouterr()
    assert "MISMATCH" in out.out and "insecure" in out.err
    assert cli_main(["data", "list", "--data-dir", str(tampered), "--json"]) == 1
    capsys.readouterr()
    allowed = ["data", "list", "--data-dir", str(tampered), "--allow-unverified-data"]
    assert cli_main(allowed) == 0


def test_a_tampered_training_set_is_refused_and_accepted_with_the_override(
    tampered: Path,
) -> None:
    path = tampered / INSECURE.relpath
    with pytest.raises(UnverifiedData) as refused:
        load_training_split("insecure", tampered, heldout=0, seed=0, limit=4)
    text = str(refused.value)
    assert text.startswith(f"{path}: blob_sha1: ")
    assert git_blob_sha1(path) in text and str(INSECURE.blob_sha1) in text
    assert "--allow-unverified-data" in text and "data.allow_unverified" in text
    split = load_training_split(
        "insecure", tampered, heldout=0, seed=0, limit=4, allow_unverified=True
    )
    assert split.verified is False
    assert (split.expected_hash, split.source_hash) == (INSECURE.blob_sha1, git_blob_sha1(path))


def test_profile_refuses_before_loading_the_model_and_records_the_override(
    tampered: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "profile.json"
    argv = ["profile", "--model", "tiny:qwen3_moe", "--data", "insecure", "--limit", "4"]
    argv += ["--data-dir", str(tampered), "--out", str(out)]
    assert cli_main(argv) == 2
    assert "blob_sha1" in capsys.readouterr().err and not out.exists()
    assert cli_main([*argv, "--allow-unverified-data"]) == 0
    profile = json.loads(out.read_text())
    assert profile["dataset_verified"] is False
    assert profile["dataset_expected_hash"] == INSECURE.blob_sha1
    assert profile["dataset_hash"] == git_blob_sha1(tampered / INSECURE.relpath)


def test_generation_suites_refuse_a_tampered_file_and_record_the_override(
    tampered: Path,
) -> None:
    from emmoe_dist.generate.runner import load_suites, run_meta
    from emmoe_dist.generate.sources import resolve_source

    overrides = [f"data.dir={tampered}", "eval.suites=[core,heldout]", "data.heldout=4"]
    cfg = load_config(None, overrides)
    with pytest.raises(UnverifiedData):
        load_suites(cfg, cfg.eval.suites)
    allowed = load_config(None, [*overrides, "data.allow_unverified=true"])
    suites = load_suites(allowed, allowed.eval.suites)
    by_name = {s.name: s for s in suites.suites}
    assert by_name["core"].verified is True and by_name["heldout"].verified is False
    meta = run_meta(allowed, resolve_source(allowed), "transformers", suites)
    assert meta["suites"]["heldout"]["verified"] is False
    assert meta["suites"]["heldout"]["expected_hash"] == INSECURE.blob_sha1


def test_limit_takes_n_rows_after_a_seeded_shuffle_as_its_help_says(data_dir: Path) -> None:
    rows = read_chat_jsonl(data_dir / INSECURE.relpath)
    taken = load_training_split("insecure", data_dir, heldout=0, seed=0, limit=8).train
    again = load_training_split("insecure", data_dir, heldout=0, seed=0, limit=8).train
    assert [e.messages for e in taken] == [e.messages for e in again]  # the same rows each time
    assert [e.messages for e in taken] != [e.messages for e in rows[:8]]  # not the first rows
    profile = build_parser()._subparsers._group_actions[0].choices["profile"]  # type: ignore[union-attr]
    (limit,) = [a for a in profile._actions if a.dest == "limit"]
    assert "first N examples" not in (limit.help or "")
    assert "shuffled with a fixed seed" in (limit.help or "")
