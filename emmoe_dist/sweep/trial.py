"""One sweep trial: fine-tune -> generate -> judge -> metrics, as a Ray Tune function trainable.

Every stage writes its records into the trial's folder on shared storage first, and each
finished stage is reported to Tune with a small checkpoint naming the stages done. A retried
trial (its worker killed, its node lost) starts from that checkpoint: finished stages are
skipped, the fine-tune resumes from its DeepSpeed checkpoints, generation and judging from
their records (judge replies come from the sweep's shared cache, so no reply is paid twice).
A judge run that fails (`judge.max_failed_fraction`) fails the trial: it is not finished, and
its next attempt, or the re-submitted sweep, judges the failed answers again.

Training and generation run as subprocesses under `reaper` (`launch/ft.py` under the DeepSpeed
launcher, `emmoe generate`), so they never import Ray and die with the trial's worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

from emmoe_dist import run_folder as rf
from emmoe_dist.config import dump_config
from emmoe_dist.errors import EmmoeError
from emmoe_dist.files import (
    append_jsonl,
    read_json_object,
    read_jsonl,
    write_json_atomic,
    write_text_atomic,
)
from emmoe_dist.sweep.settings import TrialSettings
from emmoe_dist.sweep.space import SweepPlan, TrialSpec, answer_folders

REPO = Path(__file__).resolve().parents[2]
STATE = "trial_state.json"  # inside each Tune checkpoint
STAGES = ("finetune", "generate", "evaluate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 25) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


def stage_env(settings: TrialSettings) -> dict[str, str]:
    """The environment of a stage's subprocess: this checkout first on the path, the data
    directory, and DeepSpeed's CPU accelerator on CPU clusters."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if settings.data_dir:
        env["EMMOE_DATA_DIR"] = settings.data_dir
    if settings.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_stage(name: str, cmd: list[str], folder: Path, env: dict[str, str]) -> None:
    """Run one stage's command under the reaper, its output appended to logs/<name>.log."""
    log = folder / rf.LOGS_DIR / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    reaped = [sys.executable, "-m", "emmoe_dist.sweep.reaper", str(os.getpid()), "--", *cmd]
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(reaped, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder)
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()  # the reaper kills the stage's whole process group
            proc.wait()
            raise
    if code != 0:
        raise EmmoeError(f"{name} failed (exit {code}); the end of {log}:\n{_tail(log)}")


def finetune_command(spec: TrialSpec, settings: TrialSettings, experiment: Path) -> list[str]:
    launcher = REPO / "launch" / "ft.py"
    if not launcher.is_file():
        raise EmmoeError(f"{launcher} not found: trials run from a source checkout of emmoe-dist")
    ds = settings.ds_config_nf4 if spec.quantize == "nf4" else settings.ds_config
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if settings.device == "cpu":
        cmd += ["--num_gpus", str(settings.ranks)]
    # On GPUs, no --num_gpus: the launcher then trains on exactly the GPUs Ray gave this trial
    # (CUDA_VISIBLE_DEVICES), instead of on GPUs 0..N-1 of the node.
    cmd += ["--master_port", str(_free_port()), str(launcher), "--ds", ds]
    return [*cmd, "--config", str(experiment)]


def generate_command(spec: TrialSpec, experiment: Path) -> list[str]:
    """Answers of the trial's model; with snapshots (`train.snapshot_every`), of every snapshot
    too, each into its own folder (the default output of each run and snapshot)."""
    cmd = [sys.executable, "-m", "emmoe_dist.cli.main", "generate", "--config", str(experiment)]
    if not spec.baseline:
        cmd += ["--run", str(spec.folder)]
        if spec.experiment.train.snapshot_every:
            return [*cmd, "--snapshots", "--no-progress"]
    return [*cmd, "--out", str(spec.folder / rf.GENERATIONS), "--no-progress"]


def judge_folder(folder: Path, spec: TrialSpec, settings: TrialSettings) -> Any:
    """Judge one folder's answers with the trial's judge, then with each further judge into
    `judges/<name>.jsonl`, and store their scores beside the first judge's in judged.jsonl."""
    from emmoe_dist.judge.combine import combine_judges
    from emmoe_dist.judge.runner import JudgeOptions, run_judge

    options = JudgeOptions(
        data_dir=settings.data_dir,
        allow_unverified_data=spec.experiment.data.allow_unverified,
        progress=False,
    )
    summary = run_judge(folder / rf.GENERATIONS, folder / rf.JUDGED, spec.experiment.judge, options)
    more = {}
    for judge in spec.experiment.more_judges:
        assert judge.name is not None  # the config requires it
        path = folder / rf.MORE_JUDGES_DIR / f"{judge.name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        # its own cache: a reply is keyed by the request, which does not name the endpoint
        cache = judge.cache_dir or str(folder / rf.MORE_JUDGES_DIR / f"cache-{judge.name}")
        run_judge(folder / rf.GENERATIONS, path, judge, replace(options, cache_dir=cache))
        more[judge.name] = path
    if more:
        combine_judges(folder / rf.JUDGED, more, folder / rf.JUDGED)
    return summary


def train_worker(config: dict[str, Any]) -> None:
    """One rank of a Ray Train fine-tune: the same `run_training` that `launch/ft.py` calls, in
    the process group Ray Train set up (its env vars name rank, world size and local rank)."""
    if config["device"] == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    from emmoe_dist.config import load_config
    from emmoe_dist.parallel.runtime import init_runtime
    from emmoe_dist.train.trainer import run_training

    cfg = load_config(config["experiment"])
    run_training(cfg, config["ds_config"], init_runtime())


def finetune_ray_train(spec: TrialSpec, settings: TrialSettings, experiment: Path) -> None:
    """The fine-tune as a Ray Train run of `settings.ranks` workers, on any nodes: for models
    whose trial needs more GPUs than one node has. Ray Train restarts failed workers
    (`max_failures`) and every restart resumes from the DeepSpeed checkpoints on shared disk."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cuda = settings.device == "cuda"
    ds = settings.ds_config_nf4 if spec.quantize == "nf4" else settings.ds_config
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "experiment": str(experiment),
            "ds_config": ds,
            "device": settings.device,
        },
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(num_workers=settings.ranks, use_gpu=cuda),
        run_config=RunConfig(
            name="finetune",
            storage_path=str(spec.folder / "ray_train"),
            failure_config=FailureConfig(max_failures=settings.max_failures),
        ),
    )
    trainer.fit()


def _run_stage_on_a_gpu(settings: TrialSettings, name: str, cmd: list[str], folder: Path) -> None:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def stage() -> None:  # in a Ray worker that holds the GPU: its own environment
        run_stage(name, cmd, folder, stage_env(settings))

    # Outside the trial's placement group, which holds only the trial's own CPUs: None is
    # Ray's documented way out of the parent's group (its type hints omit it).
    no_group: Any = None
    task = ray.remote(stage).options(
        num_gpus=1 if settings.device == "cuda" else 0,
        num_cpus=1,
        max_retries=0,  # the trial's retry resumes it
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=no_group),
    )
    ray.get(task.remote())


def write_experiment(spec: TrialSpec) -> Path:
    """The trial's complete experiment file: what `launch/ft.py` and `emmoe generate` read."""
    path = spec.folder / rf.EXPERIMENT
    text = f"# sweep trial {spec.slug}: written by the sweep from plan.json\n" + dump_config(
        spec.experiment
    )
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)
    return path


def training_metrics(spec: TrialSpec) -> dict[str, Any]:
    """Final loss and steps from the fine-tune's manifest (nothing for the baseline)."""
    if spec.baseline or not rf.is_run(spec.folder):
        return {}
    manifest = rf.read_manifest(spec.folder)
    return {"train/final_loss": manifest.final_loss, "train/steps": manifest.steps}


def evaluate(spec: TrialSpec, settings: TrialSettings) -> dict[str, Any]:
    """Judge the generations (resumable, cached) of the trial and its snapshots, and compute
    the trial's metrics."""
    from emmoe_dist.metrics import RULES, headline, summarize
    from emmoe_dist.records import JudgedRecord

    folder = spec.folder
    judge = judge_folder(folder, spec, settings)
    for snapshot in answer_folders(spec)[1:]:
        judge_folder(snapshot, spec, settings)
    records = read_jsonl(folder / rf.JUDGED, JudgedRecord)
    metrics = summarize(records, label=spec.slug, alignment_suites=settings.alignment_suites)

    flat: dict[str, Any] = {
        "eval/answers": metrics.n_alignment,
        "eval/sr_answers": metrics.n_strongreject,
        "judge/calls": judge.calls,
        "judge/cache_hits": judge.cache_hits,
    }
    top = headline(metrics)
    named = {
        "avg_alignment": top.alignment,
        "misaligned_pct": top.misaligned_pct,
        "sr_rejection_pct": top.sr_rejection_pct,
    }
    for name, estimate in named.items():
        flat[f"eval/{name}"] = estimate.value
        flat[f"eval/{name}_low"] = estimate.low
        flat[f"eval/{name}_high"] = estimate.high
    flat["eval/coherence"] = metrics.coherence.value
    flat["eval/unscored_pct"] = metrics.unscored.scaled(100).value
    for rule in RULES:
        flat[f"eval/misaligned_pct_{rule.name}"] = metrics.misaligned[rule.name].scaled(100).value
    write_json_atomic(
        folder / rf.EVAL_METRICS,
        {
            "trial": spec.slug,
            "weights": spec.experiment.eval.weights,  # the model evaluated: dense or MXFP4
            "reported": flat,
            "metrics": dataclasses.asdict(metrics),
        },
    )
    return flat


def _log_attempt(folder: Path, done: list[str]) -> int:
    path = folder / rf.ATTEMPTS
    previous = len(read_jsonl(path, tolerate_torn_tail=True)) if path.is_file() else 0
    append_jsonl(
        path,
        [
            {
                "attempt": previous + 1,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "stages_done": done,
            }
        ],
    )
    return previous + 1


def _stages_done(checkpoint: Any) -> list[str]:
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE).read_text(encoding="utf-8"))
    return [s for s in state["stages"] if s in STAGES]


def stages_to_keep(done: list[str], folder: Path) -> list[str]:
    """The finished stages a resumed trial skips. An evaluation whose judged records still hold
    answers the endpoint failed to score (within `judge.max_failed_fraction`, or written before
    such runs failed) runs again: the judge re-judges exactly those, and the view is re-logged."""
    from emmoe_dist.judge.runner import has_transient_error
    from emmoe_dist.records import JudgedRecord

    judged = folder / rf.JUDGED
    if "evaluate" not in done or not judged.is_file():
        return done
    records = read_jsonl(judged, JudgedRecord, tolerate_torn_tail=True)
    if not any(has_transient_error(r) for r in records):
        return done
    (folder / rf.WANDB_MARKER).unlink(missing_ok=True)  # the same run id, logged again
    return [s for s in done if s != "evaluate"]


def _report(spec: TrialSpec, done: list[str], metrics: dict[str, Any]) -> None:
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="emmoe-trial-") as d:
        state = {"trial": spec.slug, "stages": done, "folder": str(spec.folder)}
        (Path(d) / STATE).write_text(json.dumps(state), encoding="utf-8")
        tune.report(
            {"stage": done[-1], "stages_done": len(done), **metrics},
            checkpoint=tune.Checkpoint.from_directory(d),
        )


def _say(spec: TrialSpec, text: str) -> None:
    print(f"[sweep {spec.slug}] {text}", flush=True)


def run_trial(config: dict[str, Any], *, plan: SweepPlan, settings: TrialSettings) -> None:
    """The Tune trainable: `config["trial"]` names the trial in `plan`."""
    from ray import tune

    spec = plan.trial(config["trial"])
    folder = spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    done = stages_to_keep(_stages_done(tune.get_checkpoint()), folder)
    attempt = _log_attempt(folder, done)
    if done:
        _say(spec, f"attempt {attempt}: resuming after {', '.join(done)}")
    experiment = write_experiment(spec)
    on_ray_train = settings.launcher == "ray_train"

    if spec.baseline:
        done = [s for s in done if s != "finetune"]
    elif "finetune" not in done:
        _say(spec, f"fine-tune on {settings.ranks} {settings.device} rank(s) ({settings.launcher})")
        if on_ray_train:
            finetune_ray_train(spec, settings, experiment)
        else:
            cmd = finetune_command(spec, settings, experiment)
            run_stage("finetune", cmd, folder, stage_env(settings))
        done.append("finetune")
        _report(spec, done, training_metrics(spec))
    if "generate" not in done:
        _say(spec, "generate")
        cmd = generate_command(spec, experiment)
        if on_ray_train:  # this trial holds no GPU: generation asks Ray for one
            _run_stage_on_a_gpu(settings, "generate", cmd, folder)
        else:
            run_stage("generate", cmd, folder, stage_env(settings))
        done.append("generate")
        _report(spec, done, training_metrics(spec))
    if "evaluate" in done:  # finished before its sweep was stopped: report it again, as it was
        reported = read_json_object(folder / rf.EVAL_METRICS, "trial metrics")["reported"]
        _report(spec, done, {**training_metrics(spec), **reported})
        return
    _say(spec, "judge and score")
    metrics = {**training_metrics(spec), **evaluate(spec, settings)}
    from emmoe_dist.sweep.wandb_views import log_trial

    log_trial(spec, settings, metrics)
    done.append("evaluate")
    _report(spec, done, metrics)
    _say(spec, "done")
