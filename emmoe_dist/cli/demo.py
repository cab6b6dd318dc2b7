"""`emmoe demo`: the embedded default study, end to end on CPU with a tiny Qwen3-MoE.

profile routing on insecure code -> select the top-2 experts per layer -> fine-tune them with
LoRA under DeepSpeed ZeRO-3 on 2 ranks -> merge -> generate answers to the evaluation suites
with the base and the fine-tuned model -> judge them -> report. Each stage writes its records
under `--out` and resumes from what is there, so an interrupted demo picks up where it stopped.

`emmoe demo --experts` runs the chain of "which experts carry misalignment" instead: fine-tune
expert 0 of every MoE layer -> answers of the base and the fine-tune, judged -> ablations
without E0 (the trained expert) and without E1 (an untrained one, the control) -> the expert
table and its heatmaps -> router steering with E0 switched off, and a random-expert control ->
a report with a row for each.

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
    p.add_argument(
        "--experts",
        action="store_true",
        help="the expert chain instead: expert table, ablations, router steering, report "
        "(default --out: runs/demo-experts)",
    )
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


def _launch_env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "EMMOE_DATA_DIR": str(data_dir), "WANDB_MODE": "offline"}
    try:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run(args: argparse.Namespace) -> int:
    from emmoe_dist.config import load_config
    from emmoe_dist.data.datadir import resolve_data_dir

    if args.experts:
        out = Path("runs/demo-experts" if args.out == "runs/demo" else args.out)
        return experts_demo(out, resolve_data_dir(args.data_dir), args.ranks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(args.data_dir)
    env = _launch_env(data_dir)
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
        from emmoe_dist.adapters.merge import merge_run

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
    from emmoe_dist.judge.scripted_server import SCRIPTED_MODEL, hash_script, scripted_server

    with scripted_server(hash_script()) as server:
        print(f"scripted judge at {server.base_url}: mock scores, not a judgment")
        cfg = JudgeConfig(
            base_url=server.base_url, model=SCRIPTED_MODEL, api_key_env="EMMOE_SCRIPTED_JUDGE_KEY"
        )
        for name, path in generations.items():
            options = JudgeOptions(
                data_dir=str(data_dir), cache_dir=str(path.parent.parent / rf.JUDGE_CACHE_DIR)
            )
            print(run_judge(path, judged[name], cfg, options).format())


def experts_demo(out: Path, data_dir: Path, ranks: int) -> int:
    """Which experts carry misalignment, end to end on CPU (module docstring)."""
    from emmoe_dist.analyze.ablate import AblateOptions, run_ablate
    from emmoe_dist.analyze.common import ModelOptions, judge_answer_sets
    from emmoe_dist.analyze.experts import ExpertsOptions, run_experts
    from emmoe_dist.analyze.router_steer import RouterSteer
    from emmoe_dist.analyze.steer import (
        SteerGeneration,
        SteerOptions,
        generation_config,
        run_steer,
        steering_suites,
    )
    from emmoe_dist.config import JudgeConfig
    from emmoe_dist.generate.backends import generate_sources
    from emmoe_dist.generate.sources import from_run, model_source
    from emmoe_dist.report import build_report, load_judged, write_report

    out.mkdir(parents=True, exist_ok=True)
    run_dir, base_dir = out / "finetune", out / "base"
    # Every answer set: the 8 core questions, 3 samples each, the same seeds everywhere.
    generation = SteerGeneration(
        suite="core", data_dir=str(data_dir), limit=8, samples=3, max_new_tokens=24
    )
    models = ModelOptions(device="cpu", batch_size=12, max_length=512)
    judge = JudgeConfig()

    _stage("1/7 fine-tune expert 0 of every MoE layer (LoRA, ZeRO-3)")
    if not rf.is_run(run_dir):
        fine_tune(DEMO_CONFIG, [f"output_dir={run_dir}"], ranks, _launch_env(data_dir))
    print(f"run: {run_dir}")

    _stage("2/7 answers of the base and the fine-tune, judged (scripted mock judge)")
    cfg = generation_config(generation, seed=0, batch_size=models.batch_size)
    suites, _ = steering_suites(cfg)
    targets = [
        (model_source(str(run_dir / rf.BASE_DIR)), base_dir / rf.GENERATIONS),
        (from_run(run_dir), run_dir / rf.GENERATIONS),
    ]
    base_dir.mkdir(exist_ok=True)
    generate_sources(cfg, targets, suites, device="cpu", progress=False)
    judge_answer_sets(
        [base_dir, run_dir], judge, cache_dir=out / rf.JUDGE_CACHE_DIR, scripted=True, say=print
    )

    _stage("3/7 ablations: without E0 (trained) and without E1 (untrained: the control)")
    ablated = run_ablate(
        AblateOptions(
            run_dir=str(run_dir),
            experts=(0, 1),
            full_records=str(run_dir / rf.JUDGED),
            generation=generation,
            judge=judge,
            scripted_judge=True,
            run=models,
            progress=False,
        ),
        say=print,
    )

    _stage("4/7 the expert table: ΔW, routing share, routing shift, activation-rate difference")
    experts = run_experts(
        ExpertsOptions(run_dir=str(run_dir), limit=64, run=models, progress=False), say=print
    )
    for note in experts.notes:
        print(f"not measured: {note}")

    _stage("5/7 router steering: E0 switched off in every MoE layer, and a random control")
    steer_out = out / "router_steer"
    run_steer(
        SteerOptions(
            model=str(run_dir),
            directions=None,
            out=str(steer_out),
            router=RouterSteer(off=(0,)),
            generation=generation,
            judge=judge,
            scripted_judge=True,
            run=models,
            progress=False,
        ),
        say=print,
    )

    _stage("6/7 report: base, fine-tune, ablations and router steering")
    judged = [
        base_dir / rf.JUDGED,
        run_dir / rf.JUDGED,
        *(folder / rf.JUDGED for folder in ablated.folders.values()),
        steer_out / "experts" / "alpha_+1" / rf.JUDGED,
        steer_out / "random_experts" / "alpha_+1" / rf.JUDGED,
    ]
    report = build_report(
        load_judged(judged), baseline=None, sources=[str(run_dir), *map(str, judged)]
    )
    write_report(report, out / "report")
    print((out / "report" / "report.md").read_text(encoding="utf-8"))

    _stage("7/7 summary")
    print((run_dir / rf.EXPERTS_DIR / "experts.md").read_text(encoding="utf-8"))
    print(f"expert table and heatmaps: {run_dir / rf.EXPERTS_DIR}")
    print(f"ablations: {run_dir / rf.ABLATIONS_DIR}; router steering: {steer_out}")
    print(f"report: {out / 'report' / 'report.md'}")
    shutil.rmtree(run_dir / rf.CHECKPOINTS_DIR, ignore_errors=True)
    return 0
