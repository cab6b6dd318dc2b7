"""What a training run checks before any model loads: selection errors name the file, line and
field the user wrote; a malformed or too-small dataset is one clear error; a finished run is a
no-op and one of another experiment is refused; under the DeepSpeed launcher an input error
prints once and leaves no folder behind. No test here trains (the 2-rank runs that resume and
re-run finished trainings are in test_train_distributed.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emmoe_dist import run_folder as rf
from emmoe_dist.cli.main import main as cli_main
from emmoe_dist.config import load_config
from emmoe_dist.errors import InputError
from emmoe_dist.files import exclusive_writer
from emmoe_dist.parallel.runtime import Runtime
from emmoe_dist.train.preflight import Finished, Prepared, prepare
from emmoe_dist.train.trainer import run_training

REPO = Path(__file__).resolve().parents[1]
ZERO3 = str(REPO / "ds_configs" / "zero3.json")
ONE_CPU_RANK = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def experiment(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\ntracking:\n  backend: none\n{body}")
    return path


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything builds or loads model weights."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("emmoe_dist.models.loading.load_model", refuse)
    monkeypatch.setattr("emmoe_dist.models.tiny.build_tiny", refuse)


def test_out_of_range_experts_name_the_experiment_line_and_field(
    tmp_path: Path, no_model_loads: None
) -> None:
    path = experiment(
        tmp_path,
        "data:\n  limit: 8\nselection:\n  rule: explicit\n  experts:\n    0: [1]\n    2: [9]\n",
    )
    with pytest.raises(InputError) as err:
        prepare(load_config(path), 1)
    where = (err.value.file, err.value.line, err.value.field)
    assert where == (str(path), 10, "selection.experts.2")
    assert (
        str(err.value) == f"{path}:10: selection.experts.2: layer 2: expert 9 is out of range 0..7"
    )

    single = experiment(tmp_path, "selection:\n  rule: single\n  expert: 9\n")
    with pytest.raises(InputError) as err:
        prepare(load_config(single), 1)
    assert (err.value.line, err.value.field) == (6, "selection.expert")
    assert str(err.value).startswith(f"{single}:6: selection.expert: expert 9 is out of range")
    with pytest.raises(InputError, match=r"<command line override>: selection\.expert: expert 8"):
        prepare(load_config(single, ["selection.expert=8"]), 1)


def test_a_selection_file_names_its_own_line_and_field(
    tmp_path: Path, no_model_loads: None
) -> None:
    chosen = tmp_path / "chosen.json"
    chosen.write_text('{\n  "experts": {\n    "0": [1],\n    "2": [3, 9]\n  }\n}\n')
    path = experiment(tmp_path, f"selection:\n  rule: file\n  file: {chosen}\n")
    with pytest.raises(InputError) as err:
        prepare(load_config(path), 1)
    assert (err.value.file, err.value.line, err.value.field) == (str(chosen), 4, "experts.2")


def test_emmoe_select_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["select", "--rule", "single", "--expert", "9", "--model", "tiny:qwen3_moe"]
    assert cli_main([*argv, "--out", str(tmp_path / "s.json")]) == 2
    assert "<command line>: --expert: expert 9 is out of range" in capsys.readouterr().err


def test_a_malformed_dataset_fails_before_the_model_loads(
    tmp_path: Path, no_model_loads: None
) -> None:
    data = tmp_path / "mine.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "user"}]}\n')
    path = experiment(tmp_path, f"data:\n  train: {data}\n  heldout: 0\n")
    with pytest.raises(InputError) as err:
        run_training(load_config(path), ZERO3, ONE_CPU_RANK)
    assert (err.value.file, err.value.line) == (str(data), 2)
    assert not (tmp_path / "out").exists()  # nothing was created


def test_data_that_cannot_fill_one_step_is_one_clear_error(
    tmp_path: Path, no_model_loads: None
) -> None:
    path = experiment(tmp_path, "data:\n  limit: 8\n  heldout: 4\n  max_length: 16\n")
    with pytest.raises(InputError) as err:
        run_training(load_config(path), ZERO3, ONE_CPU_RANK)
    assert (err.value.line, err.value.field) == (7, "data.max_length")
    assert "none of the 8 examples of insecure" in str(err.value)
    few = experiment(tmp_path, "data:\n  limit: 3\n  heldout: 4\ntrain:\n  micro_batch_size: 2\n")
    with pytest.raises(InputError) as err:
        prepare(load_config(few), 2)
    assert err.value.field == "data.limit" and err.value.line == 5
    assert "one optimizer step needs 4 (train.micro_batch_size 2 x 2 ranks" in str(err.value)
    assert not (tmp_path / "out").exists()


def _finished_run(tmp_path: Path) -> Path:
    """A run folder whose manifest says this experiment finished (what training writes)."""
    path = experiment(tmp_path, "data:\n  limit: 8\n  heldout: 4\n")
    cfg = load_config(path)
    prepared = prepare(cfg, 1)
    assert isinstance(prepared, Prepared)
    out = Path(cfg.output_dir)
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"trained")
    rf.write_manifest(
        out,
        rf.RunManifest(
            schema_version=1,
            config=cfg.model_dump(mode="json"),
            family="qwen3_moe",
            artifact="adapter",
            base_model="tiny",
            steps=3,
            final_loss=1.5,
            identity=prepared.identity,
        ),
    )
    return path


def test_a_finished_run_is_a_no_op_and_another_experiment_is_refused(
    tmp_path: Path,
    no_model_loads: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = _finished_run(tmp_path)
    out = tmp_path / "out"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    result = run_training(load_config(path), ZERO3, ONE_CPU_RANK)
    assert (result.steps, result.final_loss, result.artifact) == (3, 1.5, out / "adapter")
    assert "nothing to do" in capsys.readouterr().out
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before
    # the same experiment spelled another way (a relative output_dir) is the same run
    monkeypatch.chdir(tmp_path)
    relative = load_config(path, ["output_dir=out"])
    assert isinstance(prepare(relative, 1), Finished)
    with pytest.raises(InputError) as err:
        prepare(load_config(path, ["train.lr=0.5"]), 1)
    assert err.value.field == "output_dir" and "train.lr is 0.0001 there, 0.5 here" in str(
        err.value
    )


def test_checkpoints_of_another_experiment_are_not_resumed(
    tmp_path: Path, no_model_loads: None
) -> None:
    from emmoe_dist.train.preflight import record_identity

    path = experiment(tmp_path, "data:\n  limit: 8\n  heldout: 4\n")
    prepared = prepare(load_config(path), 1)
    assert isinstance(prepared, Prepared)
    record_identity(tmp_path / "out", prepared.identity)
    assert isinstance(prepare(load_config(path, ["train.log_every=5"]), 1), Prepared)
    with pytest.raises(
        InputError, match=r"holds checkpoints of another experiment .*adapter\.rank"
    ):
        prepare(load_config(path, ["adapter.rank=4"]), 1)


def test_a_writer_leaves_no_lock_and_an_aborted_one_no_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "judged.jsonl"
    with pytest.raises(RuntimeError), exclusive_writer(out, "judge"):
        assert (out.parent / "judged.jsonl.lock").exists()
        raise RuntimeError("input error")
    assert not (tmp_path / "new").exists()
    with exclusive_writer(out, "judge"):
        out.write_text("one record\n")
    assert sorted(p.name for p in out.parent.iterdir()) == ["judged.jsonl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_input_error_prints_once_under_the_launcher(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "x"
    path = tmp_path / "exp.yaml"
    path.write_text(f"output_dir: {out}\nselection:\n  rule: single\n  expert: 9\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    cmd += ["--master_port", str(_free_port()), str(REPO / "launch" / "ft.py"), "--ds", ZERO3]
    proc = subprocess.run(
        [*cmd, "--config", str(path), "tracking.backend=none"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert text.count("ft.py: error:") == 1, text[-3000:]
    assert f"{path}:4: selection.expert: expert 9 is out of range" in text
    assert "rank 1" not in text and not (tmp_path / "runs").exists()
