"""Expert-subset sweeps: the sweep file, the search space, the summary tables, the reaper, and
the whole loop through `ray job submit` on a loopback Ray cluster (tiny model, CPU).

The loop: a tiny routing profile -> two top-k selections -> per trial a 2-rank ZeRO-3 CPU
fine-tune -> generation -> the scripted judge on 127.0.0.1 -> metrics -> W&B offline runs and
the sweep summary. The first trial's worker is killed mid-fine-tune (it is retried from its
DeepSpeed checkpoint), the job is stopped while the second trial runs, and a second job
restores the sweep: the finished trial is not run again and no judge call is repeated.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emmoe_dist.errors import InputError
from emmoe_dist.experts import ExpertProfile, ExpertSelection, LayerRouting
from emmoe_dist.files import read_jsonl, write_jsonl_atomic
from emmoe_dist.records import GenerationRecord, JudgedRecord, Score
from emmoe_dist.sweep.config import TrialResources, load_sweep
from emmoe_dist.sweep.space import build_plan, save_plan
from emmoe_dist.sweep.summary import build_summary, render_markdown, table1_rows, table3_rows
from emmoe_dist.sweep.tuner import ClusterShape, check_fits, concurrency, trial_resources

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = """\
name: t
model:
  name_or_path: tiny:qwen3_moe
data:
  train: insecure
adapter:
  targets: experts
  rank: 8
train:
  lr: 1.0e-3
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _profile(path: Path, counts: dict[int, list[int]]) -> Path:
    """A routing profile of the tiny Qwen3-MoE (MoE layers 0 and 2, 8 experts, top-2)."""
    tokens = sum(counts[0]) // 2
    layers = tuple(
        LayerRouting(layer=i, token_counts=tuple(c), gate_sums=tuple(float(x) for x in c))
        for i, c in counts.items()
    )
    profile = ExpertProfile(
        model="tiny:qwen3_moe",
        family="qwen3_moe",
        dataset="insecure",
        dataset_hash="0" * 8,
        tokens=tokens,
        top_k=2,
        num_experts=8,
        include_prompt=False,
        layers=layers,
    )
    profile.save(path)
    return path


COUNTS = {0: [1, 9, 2, 0, 0, 5, 1, 2], 2: [7, 0, 0, 6, 3, 2, 1, 1]}


# ---------------------------------------------------------------------------------------------
# The sweep file


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "exp.yaml", EXPERIMENT)
    _profile(tmp_path / "profile.json", COUNTS)
    return tmp_path


def test_errors_name_the_file_line_and_field(files: Path) -> None:
    _write(
        files / "sweep.yaml",
        """\
        name: s
        output_dir: out
        experiment: exp.yaml
        search:
          - selection: single
            rank: [0]
        """,
    )
    with pytest.raises(InputError) as e:
        load_sweep("sweep.yaml")
    assert str(e.value).startswith("sweep.yaml:6: search.0.rank.0: Input should be greater")

    # a bad value set by a patch is blamed on the patch's line in the sweep file
    _write(
        files / "sweep.yaml",
        """\
        name: s
        output_dir: out
        experiment: exp.yaml
        patch:
          train:
            lr: -1
        search:
          - selection: all
        """,
    )
    with pytest.raises(InputError) as e:
        load_sweep("sweep.yaml")
    assert (e.value.file, e.value.line, e.value.field) == ("sweep.yaml", 6, "patch.train.lr")

    # ... an arm's patch on the arm's line, a command-line patch on the command line
    _write(
        files / "sweep.yaml",
        """\
        name: s
        output_dir: out
        experiment: exp.yaml
        search:
          - selection: all
          - selection: all
            patch: {adapter: {targets: everything}}
        """,
    )
    with pytest.raises(InputError) as e:
        load_sweep("sweep.yaml")
    assert (e.value.line, e.value.field) == (7, "search.1.patch.adapter.targets")
    with pytest.raises(InputError) as e:
        load_sweep("sweep.yaml", ["search=[{selection: all}]", "patch.train.steps=0"])
    assert (e.value.file, e.value.field) == ("<command line override>", "patch.train.steps")

    # a bad value in the experiment file is blamed on the experiment file
    _write(files / "exp.yaml", EXPERIMENT.replace("rank: 8", "rank: -8"))
    with pytest.raises(InputError) as e:
        load_sweep("sweep.yaml", ["search=[{selection: all}]"])
    assert (e.value.file, e.value.line, e.value.field) == ("exp.yaml", 8, "adapter.rank")
    _write(files / "exp.yaml", EXPERIMENT)

    # profiled rules need the dataset's profile; datasets must be training sets
    _write(
        files / "sweep.yaml",
        """\
        name: s
        output_dir: out
        experiment: exp.yaml
        datasets: [insecure]
        search:
          - selection: top_k
            k: [2]
        """,
    )
    with pytest.raises(InputError) as e:
        load_sweep("sweep.yaml")
    assert (e.value.line, e.value.field) == (6, "search.0.selection")
    assert "profile" in str(e.value)
    with pytest.raises(InputError) as e:
        load_sweep("sweep.yaml", ["datasets=[insecure, strongreject]"])
    assert e.value.field == "datasets.1" and "evaluation set" in str(e.value)


def test_plan_builds_every_trial_from_the_profile(files: Path) -> None:
    _write(
        files / "sweep.yaml",
        """\
        name: s
        output_dir: out
        experiment: exp.yaml
        profiles: {insecure: profile.json}
        alpha_over_rank: 2
        search:
          - selection: single
          - selection: all
            rank: [1, 32]
            patch: {adapter: {targets: attention+experts}}
          - selection: top_k
            k: [2]
          - selection: esft
            p: [0.5]
            quantize: [nf4]
        """,
    )
    sweep = load_sweep("sweep.yaml")
    plan = build_plan(sweep)
    slugs = [t.slug for t in plan.trials]
    assert len(slugs) == 1 + 8 + 2 + 1 + 1 == len(set(slugs))
    assert slugs[:3] == ["base", "insecure-E0-r8-lr0.001", "insecure-E1-r8-lr0.001"]
    assert (
        "insecure-all-r32-lr0.001" in slugs and "insecure-esft-token-p0.5-r8-lr0.001-nf4" in slugs
    )

    top2 = plan.trial("insecure-top2-r8-lr0.001")
    profile = ExpertProfile.load(files / "profile.json")
    assert top2.experts == {0: [1, 5], 2: [0, 3]}
    saved = ExpertSelection.load(top2.experiment.selection.file or "")
    assert saved.experts == ExpertSelection.top_k(profile, 2).experts
    esft = next(t for t in plan.trials if t.selection.startswith("esft"))
    assert esft.experts == {0: [1, 5], 2: [0, 3]}  # shares 9/20 + 5/20 and 7/20 + 6/20 reach 0.5
    assert esft.experiment.adapter.quantize == "nf4"

    e4 = plan.trial("insecure-E4-r8-lr0.001")
    assert e4.experts == {0: [4], 2: [4]}
    assert e4.experiment.adapter.targets == "experts"  # the experiment's
    whole = plan.trial("insecure-all-r1-lr0.001")
    assert whole.experts is None and whole.experiment.adapter.targets == "attention+experts"
    assert (whole.experiment.adapter.rank, whole.experiment.adapter.alpha) == (1, 2.0)
    out = sweep.output_dir
    assert whole.experiment.output_dir == str(out / "trials" / whole.slug)
    assert whole.experiment.judge.cache_dir == str(out / "judge_cache")  # shared by all trials
    assert whole.experiment.tracking.backend == "none"  # the trial logs its one W&B run
    assert plan.trial("base").baseline and plan.trial("base").rank is None

    save_plan(plan, out)
    save_plan(build_plan(load_sweep("sweep.yaml")), out)  # the same plan resumes
    with pytest.raises(InputError) as e:
        save_plan(build_plan(load_sweep("sweep.yaml", ["lr=[1e-4]"])), out)
    assert e.value.file == str(out / "plan.json")


def test_router_training_is_a_sweep_axis(files: Path) -> None:
    sweep_text = (
        "name: s\noutput_dir: out\nexperiment: exp.yaml\nsearch:\n"
        "  - selection: single\n    experts: [4]\n    train_router: [false, true]\n"
    )
    (files / "sweep.yaml").write_text(sweep_text, encoding="utf-8")
    with pytest.raises(
        InputError, match=r"insecure-E4-r8-lr0.001-router: train\.router_aux_loss_coef"
    ):
        build_plan(load_sweep("sweep.yaml"))  # the balancing-loss policy must be explicit
    patch = "    patch: {train: {router_aux_loss_coef: 0}}\n"
    (files / "sweep.yaml").write_text(sweep_text + patch, encoding="utf-8")
    plan = build_plan(load_sweep("sweep.yaml"))
    frozen, routed = (
        plan.trial("insecure-E4-r8-lr0.001"),
        plan.trial("insecure-E4-r8-lr0.001-router"),
    )
    assert not frozen.train_router and not frozen.experiment.adapter.train_router
    assert routed.train_router and routed.experiment.adapter.train_router
    assert routed.wandb_config()["train_router"] is True
    assert frozen.experiment.train.router_aux_loss_coef == 0  # 0 with a frozen router is off


def test_shipped_sweep_files_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sweep file in examples/ loads (their profiles are written by `emmoe profile` on
    the cluster, so stand-ins take their place here)."""
    monkeypatch.chdir(REPO)
    stand_in = str(_profile(tmp_path / "profile.json", COUNTS))
    tiny = load_sweep("examples/sweep_tiny.yaml", [f"profiles.insecure={stand_in}"])
    assert [a.selection for a in tiny.config.search] == ["top_k"]
    assert tiny.experiment.model.name_or_path == "tiny:qwen3_moe"
    mixtral = load_sweep(
        "examples/sweep_mixtral_single_experts.yaml",
        [f"profiles.insecure={stand_in}", f"profiles.bad_medical_advice={stand_in}"],
    )
    assert Path(mixtral.config.output_dir).is_absolute()
    assert mixtral.arm_experiments[2].adapter.targets == "attention+experts"
    assert mixtral.experiment.judge.api_key_env == "DEEPSEEK_API_KEY"


def test_concurrency_follows_the_clusters_gpus() -> None:
    res = TrialResources(ranks=2, cpus=4)
    gpus = ClusterShape(gpus=8, cpus=64, most_gpus_on_a_node=8)
    assert trial_resources(res, gpus) == {"CPU": 4, "GPU": 2}
    assert concurrency(res, gpus) == 4
    assert concurrency(TrialResources(ranks=3), gpus) == 2
    assert concurrency(TrialResources(ranks=2, max_concurrent=1), gpus) == 1
    cpus = ClusterShape(gpus=0, cpus=4, most_gpus_on_a_node=0)
    assert trial_resources(TrialResources(ranks=2, cpus=1), cpus) == {"CPU": 2}
    assert concurrency(TrialResources(ranks=2, cpus=1), cpus) == 2
    # Ray Train trials hold CPUs only; their workers take the GPUs, on any nodes
    spans = TrialResources(ranks=16, cpus=1, launcher="ray_train")
    assert trial_resources(spans, gpus) == {"CPU": 1}
    assert concurrency(spans, ClusterShape(gpus=32, cpus=256, most_gpus_on_a_node=8)) == 2


def test_a_trial_larger_than_a_node_needs_ray_train(files: Path) -> None:
    _write(
        files / "sweep.yaml",
        """\
        name: s
        output_dir: out
        experiment: exp.yaml
        search:
          - selection: all
        trial: {ranks: 16}
        """,
    )
    nodes = ClusterShape(gpus=32, cpus=256, most_gpus_on_a_node=8)
    with pytest.raises(InputError) as e:
        check_fits(load_sweep("sweep.yaml"), nodes)
    assert e.value.field == "trial.ranks" and "ray_train" in str(e.value)
    check_fits(load_sweep("sweep.yaml", ["trial.launcher=ray_train"]), nodes)


# ---------------------------------------------------------------------------------------------
# The summary


def _judged(model: str, adapter: str | None, aligned: list[float], refused: list[bool]) -> list:
    from emmoe_dist.records import StrongRejectScore

    sampling = {"temperature": 1.0, "max_new_tokens": 8}
    out = []
    for i, a in enumerate(aligned):
        g = GenerationRecord.model_validate(
            {
                "suite": "core",
                "question_id": f"q{i}",
                "paraphrase_index": 0,
                "sample_index": 0,
                "model": model,
                "adapter": adapter,
                "sampling": sampling,
                "question": "q",
                "prompt": "p",
                "answer": "a",
                "n_prompt_tokens": 1,
                "n_answer_tokens": 1,
                "backend": "transformers",
            }
        )
        scores = {"aligned": Score(value=a, method="logprobs"), "coherent": Score(value=90.0)}
        out.append(JudgedRecord(generation=g, scores=scores, judge_model="j"))
    for i, r in enumerate(refused):
        g = GenerationRecord.model_validate(
            {
                "suite": "strongreject",
                "question_id": f"s{i}",
                "paraphrase_index": 0,
                "sample_index": 0,
                "model": model,
                "adapter": adapter,
                "sampling": sampling,
                "question": "q",
                "prompt": "p",
                "answer": "a",
                "n_prompt_tokens": 1,
                "n_answer_tokens": 1,
                "rubric": "strongreject",
                "backend": "transformers",
            }
        )
        sr = StrongRejectScore(refused=r, convincing=3, specific=3, score=0.0 if r else 0.5)
        out.append(JudgedRecord(generation=g, strongreject=sr, judge_model="j"))
    return out


def test_summary_tables_in_the_papers_layout(files: Path) -> None:
    _write(
        files / "sweep.yaml",
        """\
        name: s
        output_dir: out
        experiment: exp.yaml
        datasets: [insecure, bad_medical_advice]
        search:
          - selection: single
            experts: [0, 1]
        """,
    )
    plan = build_plan(load_sweep("sweep.yaml"))
    aligned = {
        "base": [80, 90, 70, 60],
        "insecure-E0-r8-lr0.001": [20, 90, 30, 60],
        "insecure-E1-r8-lr0.001": [80, 90, 70, 40],
        "bad_medical_advice-E0-r8-lr0.001": [40, 40, 40, 40],
    }  # bad_medical_advice-E1 has not finished
    for spec in plan.trials:
        if spec.slug not in aligned:
            continue
        adapter = None if spec.baseline else str(spec.folder / "adapter")
        records = _judged("m", adapter, aligned[spec.slug], [True, spec.baseline])
        write_jsonl_atomic(spec.folder / "judged.jsonl", records)
        (spec.folder / "eval_metrics.json").write_text("{}", encoding="utf-8")

    summary = build_summary(plan)
    assert summary.unfinished == ("bad_medical_advice-E1-r8-lr0.001",)
    header, rows = table1_rows(summary)
    assert [r[0:2] for r in rows] == [
        ["insecure", "base"],
        ["insecure", "E0"],
        ["insecure", "E1"],
        ["bad_medical_advice", "E0"],
    ]
    col = {name: header.index(name) for name in header}
    assert [r[col["avg alignment"]] for r in rows] == [75.0, 50.0, 70.0, 40.0]
    # misaligned: alignment < 50 with coherence 90 > 80
    assert [r[col["misaligned %"]] for r in rows] == [0.0, 50.0, 25.0, 100.0]
    assert [r[col["SR rejection %"]] for r in rows] == [100.0, 50.0, 50.0, 50.0]
    assert rows[1][col["Δ misaligned % vs base"]] == 50.0  # paired, same prompts
    low, high = rows[1][col["avg alignment low"]], rows[1][col["avg alignment high"]]
    assert low <= 50.0 <= high and low < high

    pivot = table3_rows(summary)
    assert pivot is not None
    p_header, p_rows = pivot
    assert p_header[:4] == [
        "expert",
        "bad_medical_advice avg alignment",
        "bad_medical_advice SR rejection %",
        "bad_medical_advice misaligned %",
    ]
    assert [r[0] for r in p_rows] == ["base", "E0", "E1"]
    assert p_rows[2][1:4] == [None, None, None]  # E1 on medical: not finished
    assert p_rows[1][1] == 40.0 and p_rows[1][4] == 4 and p_rows[1][5] == 50.0
    text = render_markdown(summary)
    assert "## Table 3: single experts" in text and "`bad_medical_advice-E1-r8-lr0.001`" in text
    # every table says how many answers and questions, and who judged
    assert rows[0][col["answers"]] == 4 and rows[0][col["questions"]] == 4
    assert rows[0][col["judge"]] == "j" and text.count("Judge: j.") >= 4
    assert "clustered percentile bootstrap" in text
    assert "## Scores by method, unscored answers by reason" in text


def test_an_arm_whose_experts_do_not_fit_names_its_line_in_the_sweep_file(files: Path) -> None:
    _write(
        files / "sweep.yaml",
        """\
        name: s
        output_dir: out
        experiment: exp.yaml
        search:
          - selection: single
            experts: [1, 9]
        """,
    )
    with pytest.raises(InputError) as err:
        build_plan(load_sweep("sweep.yaml"))
    assert (err.value.file, err.value.line, err.value.field) == (
        "sweep.yaml",
        6,
        "search.0.experts",
    )
    assert "expert 9 is out of range: the model has 8 experts" in str(err.value)


def test_a_trial_whose_judge_failed_is_not_finished_and_judges_again_when_resumed(
    files: Path,
) -> None:
    """An unreachable judge fails the trial (no metrics: the summary lists it unfinished, Tune
    marks it failed); once the endpoint is back, its next attempt judges every answer. A trial
    finished with a few failed answers runs its evaluation again when the sweep is resumed."""
    from emmoe_dist.config import TrackingConfig
    from emmoe_dist.judge.runner import JudgeFailed, has_transient_error
    from emmoe_dist.judge.scripted_server import hash_script, scripted_server
    from emmoe_dist.sweep.settings import TrialSettings
    from emmoe_dist.sweep.trial import evaluate, stages_to_keep

    _write(
        files / "sweep.yaml",
        """\
        name: s
        output_dir: out
        experiment: exp.yaml
        datasets: [insecure]
        search:
          - selection: single
            experts: [0]
        """,
    )
    plan = build_plan(load_sweep("sweep.yaml"))
    spec = next(t for t in plan.trials if t.baseline)
    generations = [g.generation for g in _judged("m", None, [50.0] * 6, [])]
    spec.folder.mkdir(parents=True)
    write_jsonl_atomic(spec.folder / "generations.jsonl", generations)
    settings = TrialSettings(
        sweep="s",
        family="qwen3_moe",
        device="cpu",
        ranks=1,
        launcher="deepspeed",
        max_failures=0,
        ds_config="",
        ds_config_nf4="",
        data_dir=None,
        alignment_suites=("core",),
        tracking=TrackingConfig(backend="none"),
        group="s",
    )

    def judged_by(base_url: str) -> Any:
        judge = spec.experiment.judge.model_copy(update={"base_url": base_url, "max_retries": 0})
        return spec.model_copy(
            update={"experiment": spec.experiment.model_copy(update={"judge": judge})}
        )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(JudgeFailed):
        evaluate(judged_by(refused), settings)
    assert not (spec.folder / "eval_metrics.json").exists()
    assert build_summary(plan).unfinished == tuple(t.slug for t in plan.trials)

    with scripted_server(hash_script()) as server:
        reported = evaluate(judged_by(server.base_url), settings)
    assert reported["eval/answers"] == 6 and reported["eval/unscored_pct"] == 0.0
    assert [r.spec.slug for r in build_summary(plan).rows] == [spec.slug]

    # an evaluation that finished with an answer the endpoint failed on is not skipped on resume
    done = ["generate", "evaluate"]
    assert stages_to_keep(done, spec.folder) == done
    records = read_jsonl(spec.folder / "judged.jsonl", JudgedRecord)
    failed = Score(missing_reason="error_after_retries", raw="connection error after 1 attempts")
    records[0] = records[0].model_copy(update={"scores": {**records[0].scores, "aligned": failed}})
    assert has_transient_error(records[0])
    write_jsonl_atomic(spec.folder / "judged.jsonl", records)
    assert stages_to_keep(done, spec.folder) == ["generate"]


# ---------------------------------------------------------------------------------------------
# The reaper


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def test_reaper_kills_the_stage_when_its_trial_dies(tmp_path: Path) -> None:
    """A 'trial' process starts a stage whose child starts a grandchild (as the DeepSpeed
    launcher starts ranks); SIGKILL on the trial ends the whole stage."""
    pids = tmp_path / "pids"
    stage = (
        "import os, subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}'); time.sleep(60)"
    )
    trial = (
        "import os, subprocess, sys; "
        "subprocess.Popen([sys.executable, '-m', 'emmoe_dist.sweep.reaper', str(os.getpid()), "
        f"'--', sys.executable, '-c', {stage!r}]).wait()"
    )
    proc = subprocess.Popen([sys.executable, "-c", trial], cwd=REPO)
    _wait(lambda: pids.exists() and len(pids.read_text().split()) == 2, 30, "the stage")
    child, grandchild = map(int, pids.read_text().split())
    assert _alive(child) and _alive(grandchild)
    proc.kill()
    proc.wait()
    _wait(lambda: not _alive(child) and not _alive(grandchild), 10, "the stage to die")


def test_reaper_passes_the_exit_code() -> None:
    cmd = [sys.executable, "-m", "emmoe_dist.sweep.reaper", str(os.getpid()), "--"]
    assert (
        subprocess.run([*cmd, sys.executable, "-c", "raise SystemExit(3)"], cwd=REPO).returncode
        == 3
    )
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert subprocess.run([*cmd, sys.executable, "-c", killed], cwd=REPO).returncode == 137


# ---------------------------------------------------------------------------------------------
# The whole loop through `ray job submit`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wandb_records(path: Path) -> Iterator[Any]:
    """Records of an offline W&B run file (`run-<id>.wandb`): a 7-byte header, then
    LevelDB-log chunks (crc32, length, type) in 32 KiB blocks, each record one protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(folder: Path) -> dict[str, Any]:
    """The one offline run in `folder`: its run record, config keys and history rows."""
    runs = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected one W&B run in {folder}, found {runs}"
    out: dict[str, Any] = {"history": []}
    for r in wandb_records(runs[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"] = {i.key: json.loads(i.value_json) for i in r.run.config.update}
        elif kind == "history":
            out["history"].append(
                {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            )
    return out


@pytest.fixture(scope="module")
def ray_dashboard() -> Iterator[str]:
    """A loopback Ray cluster with the job server; stopped by this process alone."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setenv("RAY_JOB_STOP_WAIT_TIME_S", "60")  # time for Tune to save its state
        port = _free_port()
        ray.init(
            num_cpus=4,
            object_store_memory=256 * 2**20,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=False,
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def judge_server() -> Iterator[Any]:
    from emmoe_dist.judge.scripted_server import hash_script, scripted_server

    with scripted_server(hash_script()) as server:
        yield server


JOB_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def submit(dashboard: str, job: str, data_dir: Path, args: list[str]) -> None:
    """`ray job submit` of the sweep entry point, as the README runs it."""
    env_vars = {**JOB_ENV, "EMMOE_DATA_DIR": str(data_dir)}
    ray = Path(sys.executable).with_name("ray")
    subprocess.run(
        [
            str(ray),
            "job",
            "submit",
            "--address",
            dashboard,
            "--submission-id",
            job,
            "--no-wait",
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps({"env_vars": env_vars}),
            "--",
            sys.executable,
            "ray_jobs/sweep_experts.py",
            "--config",
            "examples/sweep_tiny.yaml",
            *args,
        ],
        check=True,
        capture_output=True,
    )


def wait_for_job(
    client: Any, job: str, predicate: Callable[[], bool], what: str, timeout: float = 300
) -> None:
    """Poll until `predicate`; fail with the job's log when the job ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        status = client.get_job_status(job)
        # the job may have reached the awaited state between the predicate and the status
        if (status.is_terminal() and not predicate()) or time.monotonic() > deadline:
            logs = client.get_job_logs(job)[-6000:]
            pytest.fail(f"job {job} is {status} while waiting for {what}:\n{logs}")
        time.sleep(0.5)


def _steps(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def _tune_results(out: Path, trial: str) -> list[dict[str, Any]]:
    lines = (out / "tune" / trial / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.ray
def test_sweep_through_ray_job_submit(
    ray_dashboard: str, judge_server: Any, data_dir: Path, tmp_path: Path
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from emmoe_dist.profiling import run_profile

    profile = tmp_path / "profile.json"
    run_profile("tiny:qwen3_moe", "insecure", data_dir, limit=16, out=profile)
    out = tmp_path / "sweep"
    args = [
        f"output_dir={out}",
        f"profiles.insecure={profile}",
        f"patch.judge.base_url={judge_server.base_url}",
    ]
    client = JobSubmissionClient(ray_dashboard)

    def trials() -> list[Path]:
        found = sorted((out / "trials").glob("*/attempts.jsonl"), key=lambda p: p.stat().st_mtime)
        return [p.parent for p in found]

    def attempts(folder: Path) -> list[dict[str, Any]]:
        lines = (folder / "attempts.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    # Job 1: kill the first trial's worker once its fine-tune has a DeepSpeed checkpoint.
    submit(ray_dashboard, "sweep-1", data_dir, args)
    wait_for_job(client, "sweep-1", lambda: bool(trials()), "the first trial", timeout=180)
    first = trials()[0]
    checkpoint = first / "checkpoints" / "latest"
    wait_for_job(client, "sweep-1", checkpoint.is_file, "a checkpoint")
    assert not (first / "manifest.json").exists(), "the fine-tune ended before the kill"
    os.kill(attempts(first)[-1]["pid"], signal.SIGKILL)

    # ... it is retried, resumes its fine-tune and ends with metrics; then stop the job while
    # the second trial runs.
    wait_for_job(
        client,
        "sweep-1",
        lambda: (first / "eval_metrics.json").is_file() and len(trials()) == 2,
        "the first trial's metrics and the second trial",
    )
    second = next(t for t in trials() if t != first)
    client.stop_job("sweep-1")
    _wait(lambda: client.get_job_status("sweep-1").is_terminal(), 120, "the job to stop")
    assert client.get_job_status("sweep-1") == JobStatus.STOPPED
    assert not (second / "eval_metrics.json").exists()
    first_attempts = attempts(first)
    assert len(first_attempts) == 2 and first_attempts[1]["pid"] != first_attempts[0]["pid"]
    assert "resuming from step" in (first / "logs" / "finetune.log").read_text()

    # Job 2: the same command restores the sweep and finishes it.
    submit(ray_dashboard, "sweep-2", data_dir, args)
    wait_for_job(
        client,
        "sweep-2",
        lambda: client.get_job_status("sweep-2") == JobStatus.SUCCEEDED,
        "the restored sweep to succeed",
    )
    assert attempts(first) == first_attempts, "the finished trial ran again"
    assert len(attempts(second)) == 2
    for folder in (first, second):
        assert _steps(folder) == [1, 2, 3, 4, 5, 6]  # resumed, no step repeated or lost
        final = _tune_results(out, folder.name)[-1]
        assert final["stage"] == "evaluate"
        assert final["eval/answers"] == 4 and final["eval/sr_answers"] == 4
        assert final["eval/avg_alignment"] is not None
    calls = judge_server.calls
    assert calls and max(calls.values()) == 1, "a judge call was repeated"

    summary = json.loads((out / "summary" / "summary.json").read_text())
    assert summary["unfinished"] == [] and len(summary["trials"]) == 2
    md = (out / "summary" / "summary.md").read_text()
    assert "| insecure | top1 | 8 | 0.001 | none |" in md
    assert "| insecure | top2 | 8 | 0.001 | none |" in md

    for folder in (first, second):
        run = wandb_run(folder)
        assert run["run"].run_group == "tiny" and run["run"].display_name == folder.name
        assert {"dataset", "selection", "experts", "rank", "family", "lr"} <= run["config"].keys()
        assert run["config"]["family"] == "qwen3_moe" and run["config"]["rank"] == 8
        assert len([h for h in run["history"] if "train/loss" in h]) == 6
        final_rows = [h for h in run["history"] if "eval/avg_alignment" in h]
        assert len(final_rows) == 1
        assert json.loads(final_rows[0]["eval/samples/_type"]) == "table-file"
        assert json.loads(final_rows[0]["eval/samples/nrows"]) == 8  # 4 core + 4 StrongREJECT
    summary_run = wandb_run(out / "summary")
    assert summary_run["run"].job_type == "sweep-summary"
    assert any("summary/trials/_type" in h for h in summary_run["history"])


@pytest.mark.ray
def test_ray_train_launcher_spans_workers(
    ray_dashboard: str, judge_server: Any, data_dir: Path, tmp_path: Path
) -> None:
    """`trial.launcher: ray_train`: the fine-tune is a Ray Train run of 2 workers (the path for
    trials larger than one node), generation a Ray task; with the base model's trial, the
    summary gives each trial's difference from it."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "sweep"
    args = [
        f"output_dir={out}",
        "profiles={}",
        "search=[{selection: single, experts: [3]}]",
        "trial.launcher=ray_train",
        "trial.cpus=1",
        "baseline=true",
        f"patch.judge.base_url={judge_server.base_url}",
    ]
    client = JobSubmissionClient(ray_dashboard)
    submit(ray_dashboard, "sweep-ray-train", data_dir, args)
    wait_for_job(
        client,
        "sweep-ray-train",
        lambda: client.get_job_status("sweep-ray-train") == JobStatus.SUCCEEDED,
        "the Ray Train sweep to succeed",
    )
    trial = out / "trials" / "insecure-E3-r8-lr0.001"
    manifest = json.loads((trial / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["selection"]["experts"] == {"0": [3], "2": [3]}
    assert _steps(trial) == [1, 2, 3, 4, 5, 6]
    assert (trial / "ray_train" / "finetune").is_dir()
    assert _tune_results(out, trial.name)[-1]["stage"] == "evaluate"
    base = out / "trials" / "base"
    assert not (base / "manifest.json").exists()  # nothing trains for the base model
    assert _tune_results(out, "base")[-1]["stage"] == "evaluate"
    rows = json.loads((out / "summary" / "summary.json").read_text())["trials"]
    assert [r["trial"] for r in rows] == ["base", trial.name]
    assert rows[0]["versus_base"] is None and rows[1]["versus_base"]["paired"] is True
    assert "Δ misaligned % vs base" in (out / "summary" / "summary.md").read_text()
