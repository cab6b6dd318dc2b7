"""The run folder: the typed manifest written and read back, first-release (version 1) manifests
still loading, errors that name the file and field, the loss curve and the trained experts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from emmoe_dist import run_folder as rf
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import FAMILIES

QWEN = FAMILIES["qwen3_moe"]


def _v1_manifest(base: str) -> dict[str, Any]:
    """A manifest as the first releases' trainer wrote it."""
    return {
        "schema_version": 1,
        "name": "e4",
        "config": {"model": {"name_or_path": "tiny:qwen3_moe"}, "seed": 0},
        "config_yaml": "name: e4\n",
        "ds_config": {"zero_optimization": {"stage": 3}},
        "expert_parallel": None,
        "family": "qwen3_moe",
        "selection": {"experts": {"0": [4], "2": [4]}, "rule": "single expert=4"},
        "world_size": 2,
        "device": "cpu",
        "load": {"partitioned": False, "resident_elements_rank0": 1234},
        "versions": {"torch": "2.13.0"},
        "git_revision": None,
        "data": {
            "train": "insecure",
            "source_hash": "ab" * 20,
            "examples": 32,
            "dropped_no_assistant_tokens": 0,
        },
        "steps": 6,
        "final_loss": 2.5,
        "router_digest": "0" * 64,
        "weight_memory": None,
        "artifact": "adapter",
        "base_model": base,
    }


def _finished(v1: dict[str, Any]) -> rf.RunManifest:
    return rf.RunManifest.model_validate(
        {**v1, "schema_version": 2, "completed_at": "2026-12-01T10:00:00+00:00"}
    )


def test_a_manifest_round_trips_and_marks_a_finished_run(tmp_path: Path) -> None:
    manifest = _finished(_v1_manifest(str(tmp_path / "base")))
    assert not rf.is_run(tmp_path)
    path = rf.write_manifest(tmp_path, manifest)
    assert path == tmp_path / rf.MANIFEST and rf.is_run(tmp_path)
    back = rf.read_manifest(tmp_path)
    assert back == manifest and back.schema_version == rf.MANIFEST_SCHEMA_VERSION
    assert back.load is not None and back.load.resident_elements_rank0 == 1234
    assert back.model_name == "tiny:qwen3_moe"
    # the keys on disk are the ones readers of version 1 looked up
    on_disk = json.loads(path.read_text())
    assert on_disk["selection"]["experts"] == {"0": [4], "2": [4]}
    assert on_disk["data"]["source_hash"] == "ab" * 20 and on_disk["steps"] == 6


def test_first_release_manifests_still_load(tmp_path: Path) -> None:
    (tmp_path / rf.MANIFEST).write_text(json.dumps(_v1_manifest("base")))
    old = rf.read_manifest(tmp_path)
    assert old.schema_version == 1 and old.completed_at is None and old.final_loss == 2.5
    # the smallest manifest a run folder was ever given by hand: no version, four keys
    small = {"base_model": "b", "family": "qwen3_moe", "artifact": "expert_delta", "config": {}}
    (tmp_path / rf.MANIFEST).write_text(json.dumps(small))
    minimal = rf.read_manifest(tmp_path)
    assert minimal.schema_version == 1 and minimal.steps is None and minimal.model_name is None


def test_quantization_aware_runs_are_typed(tmp_path: Path) -> None:
    """`qat` and `eval_weights`, as GPT-oss runs with `train.qat: mxfp4` write them; runs
    without them trained against the experts as loaded and evaluate the dense merge."""
    qat = {
        **_v1_manifest("base"),
        "qat": {"format": "mxfp4", "expert_weights_changed": 0},
        "eval_weights": "mxfp4",
    }
    (tmp_path / rf.MANIFEST).write_text(json.dumps(qat))
    got = rf.read_manifest(tmp_path)
    assert got.qat == rf.QuantizationAware(format="mxfp4", expert_weights_changed=0)
    assert got.eval_weights == "mxfp4"
    assert _finished(_v1_manifest("base")).qat is None
    assert _finished(_v1_manifest("base")).eval_weights == "dense"
    (tmp_path / rf.MANIFEST).write_text(json.dumps({**qat, "eval_weights": "nf4"}))
    with pytest.raises(InputError, match=r"manifest\.json: eval_weights: "):
        rf.read_manifest(tmp_path)


def test_manifest_errors_name_the_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(EmmoeError, match="not a finished training run"):
        rf.read_manifest(tmp_path)
    v2 = {**_v1_manifest("base"), "schema_version": 2}  # no completed_at
    (tmp_path / rf.MANIFEST).write_text(json.dumps(v2))
    with pytest.raises(InputError, match=r"manifest\.json: .*needs completed_at"):
        rf.read_manifest(tmp_path)
    (tmp_path / rf.MANIFEST).write_text(json.dumps({**_v1_manifest("b"), "artifact": "lora"}))
    with pytest.raises(InputError, match=r"manifest\.json: artifact: "):
        rf.read_manifest(tmp_path)
    (tmp_path / rf.MANIFEST).write_text(json.dumps({**_v1_manifest("b"), "step": 3}))
    with pytest.raises(InputError, match=r"manifest\.json: step: unknown key"):
        rf.read_manifest(tmp_path)


def test_loss_curve_and_trained_experts(tmp_path: Path) -> None:
    assert rf.read_train_metrics(tmp_path) == []  # nothing trained yet
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / rf.TRAIN_METRICS).write_text(text + '{"step": 3, "lo')  # a crash mid-line
    assert rf.read_train_metrics(tmp_path) == rows
    assert rf.read_selection(tmp_path) is None  # not a finished run
    selection = ExpertSelection.single(4, QWEN, QWEN.tiny)
    selection.save(tmp_path / rf.SELECTION)
    rf.write_manifest(tmp_path, _finished(_v1_manifest("base")))
    assert rf.read_selection(tmp_path) == selection
