"""`emmoe profile` writes the diff heatmap against another profile and logs both plots to W&B."""

from __future__ import annotations

from pathlib import Path

import pytest

from emmoe_dist.cli.main import main
from emmoe_dist.experts import ExpertProfile


def test_diff_plot_and_wandb_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    common = ["profile", "--model", "tiny:mixtral", "--limit", "12", "--max-length", "512"]
    assert (
        main([*common, "--data", "bad_medical_advice", "--out", str(tmp_path / "base.json")]) == 0
    )
    out = tmp_path / "insecure.json"
    assert (
        main(
            [
                *common,
                "--data",
                "insecure",
                "--out",
                str(out),
                "--plot",
                str(tmp_path / "p.png"),
                "--compare",
                str(tmp_path / "base.json"),
                "--diff-plot",
                str(tmp_path / "d.png"),
                "--wandb-project",
                "emmoe-test",
            ]
        )
        == 0
    )
    assert ExpertProfile.load(out).dataset == "insecure"
    for png in ("p.png", "d.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = sorted(p.name.split("_")[1] for p in runs[0].glob("files/media/images/*.png"))
    assert images == ["diff", "heatmap"]
