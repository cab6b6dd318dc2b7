"""`emmoe demo`: the embedded default study, end to end on CPU with a tiny Qwen3-MoE.

profile routing on insecure code -> select the top-2 experts per layer -> fine-tune them with
LoRA under DeepSpeed ZeRO-3 on 2 ranks -> merge -> generate answers to the evaluation suites
with the base and the fine-tuned model -> judge them -> report. Each stage writes its records
under `--out` and resumes from what is there, so an interrupted demo picks up where it stopped.

A random tiny model writes no real answers and no real judge is reachable offline, so the
judge here is the built-in scripted (mock) judge: the pipeline is real, the scores are not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from emmoe_dist import run_folder as rf
from emmoe_dist.errors import EmmoeError

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "demo_tiny.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded default study on CPU with tiny models")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--data-dir", help="data directory (default: $EMMOE_DATA_DIR)")
    p.add_argument("--ranks", type=int, default=2, help="training processes (default: 2)")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def fine_tune(config: Path, overrides: list[str], ranks: int, env: dict[str, str]) -> None:
    """Launch `launch/ft.py` under the DeepSpeed launcher, as a user would."""
    launcher = REPO / "launch" / "ft.py"
    if not launcher.is_file():
        raise EmmoeError(f"{launcher} not found: the demo runs from a source checkout")
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(_free_port()),
        str(launcher),
        "--ds",
        str(REPO / "ds_configs" / "zero3.json"),
        "--config",
        str(config),
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, cwd=os.getcwd())
    if proc.returncode != 0:
        raise EmmoeError(f"fine-tuning failed (exit {proc.returncode}); its output is above")


def run(args: argparse.Namespace) -> int:
    from emmoe_dist.config import load_config
    from emmoe_dist.data.datadir import resolve_data_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(args.data_dir)
    env = {**os.environ, "EMMOE_DATA_DIR": str(data_dir), "WANDB_MODE": "offline"}
    try:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        env["DS_ACCELERATOR"] = "cpu"
    cfg = load_config(DEMO_CONFIG)

    profile = out / "profile.json"
    _stage("1/7 profile routing of the base model on the training set")
    if not profile.exists():
        from emmoe_dist.profiling import run_profile

        run_profile(
            cfg.model.name_or_path,
            cfg.data.train,
            data_dir,
            limit=128,
            max_length=cfg.data.max_length,
            batch_size=8,
            out=profile,
            plot=out / "routing_heatmap.png",
        )
    print(f"profile: {profile}  heatmap: {out / 'routing_heatmap.png'}")

    _stage("2/7 fine-tune the top-2 most-routed experts per layer (LoRA, ZeRO-3, 2 ranks)")
    run_dir = out / "finetune"
    if not rf.is_run(run_dir):
        fine_tune(
            DEMO_CONFIG,
            [
                f"output_dir={run_dir}",
                "selection.rule=top_k",
                "selection.k=2",
                f"selection.profile={profile}",
            ],
            args.ranks,
            env,
        )
    print(f"run: {run_dir}")

    _stage("3/7 merge the adapter into a full model")
    merged = out / "merged"
    if not (merged / "config.json").exists():
        from emmoe_dist.train.merge import merge_run

        merge_run(run_dir, merged)
    print(f"merged model: {merged}")

    _stage("4/7 generate answers (base and fine-tuned; transformers backend)")
    generations = {
        "base": out / "base" / rf.GENERATIONS,
        "finetuned": out / "finetuned" / rf.GENERATIONS,
    }
    generate(run_dir / rf.BASE_DIR, generations["base"], data_dir)
    generate(merged, generations["finetuned"], data_dir)

    _stage("5/7 judge with the scripted (mock) judge on 127.0.0.1")
    judged = {name: path.with_name(rf.JUDGED) for name, path in generations.items()}
    judge_mock(generations, judged, data_dir)

    _stage("6/7 report: the paper's table with bootstrap intervals")
    from emmoe_dist.report import build_report, load_judged, write_report

    sources = [str(run_dir), *(str(p) for p in judged.values())]
    report = build_report(load_judged(list(judged.values())), baseline=None, sources=sources)
    write_report(report, out / "report")
    print((out / "report" / "report.md").read_text(encoding="utf-8"))

    _stage("7/7 summary")
    manifest = rf.read_manifest(run_dir)
    first = rf.read_train_metrics(run_dir)[0]["loss"]
    rule = (manifest.selection or {}).get("rule", "?")
    last = float("nan") if manifest.final_loss is None else manifest.final_loss
    print(f"loss {first:.4f} -> {last:.4f} over {manifest.steps} steps ({rule})")
    print(f"artifacts under {out.resolve()}:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name}{'/' if path.is_dir() else ''}")
    shutil.rmtree(run_dir / rf.CHECKPOINTS_DIR, ignore_errors=True)  # resume state; not needed now
    return 0


def generate(model_dir: Path, out: Path, data_dir: Path) -> None:
    """A few answers per suite: enough to exercise every stage in a couple of minutes."""
    from emmoe_dist.config import load_config
    from emmoe_dist.generate.continuous import ContinuousGenerator
    from emmoe_dist.generate.runner import load_suites, run_generation
    from emmoe_dist.generate.sources import load_for_generation, resolve_source

    cfg = load_config(
        DEMO_CONFIG,
        [
            f"model.name_or_path={model_dir.resolve()}",
            f"data.dir={data_dir}",
            "eval.limit=4",
            "eval.samples_per_question=2",
            "eval.max_new_tokens=24",
            "eval.suites=[core, strongreject, heldout]",
        ],
    )
    source = resolve_source(cfg)
    loaded = load_for_generation(source, seed=cfg.seed, device="cpu")
    generator = ContinuousGenerator(loaded.model, loaded.tokenizer, batch_size=8)
    suites = load_suites(cfg, cfg.eval.suites)
    run_generation(cfg, generator, loaded.tokenizer, source, suites, out)
    print(f"generations: {out}")


def judge_mock(generations: dict[str, Path], judged: dict[str, Path], data_dir: Path) -> None:
    from emmoe_dist.config import JudgeConfig
    from emmoe_dist.judge.runner import JudgeOptions, run_judge
    from emmoe_dist.judge.scripted_server import hash_script, scripted_server

    with scripted_server(hash_script()) as server:
        print(f"scripted judge at {server.base_url}: mock scores, not a judgment")
        cfg = JudgeConfig(
            base_url=server.base_url, model="scripted-judge", api_key_env="EMMOE_SCRIPTED_JUDGE_KEY"
        )
        for name, path in generations.items():
            options = JudgeOptions(
                data_dir=str(data_dir), cache_dir=str(path.parent.parent / rf.JUDGE_CACHE_DIR)
            )
            print(run_judge(path, judged[name], cfg, options).format())
