"""Run an expert-subset sweep with Ray Tune: every trial fine-tunes, generates, judges, scores.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python ray_jobs/sweep_experts.py --config examples/sweep_mixtral_single_experts.yaml \\
        output_dir=/shared/sweeps/mixtral-single
    python ray_jobs/sweep_experts.py --config examples/sweep_tiny.yaml    # a local Ray, CPU

`key=value` items override the sweep file (`trial.ranks=4`, `patch.eval.limit=5`). Running the
same command again resumes the sweep from its folder: finished trials stay finished. `ray job
stop` (SIGTERM) ends the sweep after Tune has saved its state. Parse, build, run, clean up;
everything else lives in `emmoe_dist.sweep`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.sweep.config import load_sweep

# Set by Ray in the environment of a `ray job submit` entrypoint.
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="sweep YAML (examples/sweep_*.yaml)")
    p.add_argument("--address", default=None, help="Ray address (default: the job's, or local)")
    p.add_argument(
        "--ray-host",
        default="127.0.0.1",
        help="the address a local Ray cluster started here listens on (default: 127.0.0.1, "
        "unreachable from the network)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides of the sweep file")
    return p.parse_args(argv)


def _stop_gracefully(signum: int, frame: object) -> None:
    # Tune saves its state on SIGUSR1 (as on Ctrl-C); `ray job stop` sends SIGTERM.
    os.kill(os.getpid(), signal.SIGUSR1)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        sweep = load_sweep(args.config, args.overrides)  # fails here, before Ray starts
        if _RAY_JOB_ENV in os.environ and not Path(sweep.config.output_dir).is_absolute():
            raise InputError(
                "must be an absolute path on storage every node sees: a Ray job runs in a "
                "temporary copy of its working directory",
                file=sweep.file,
                field="output_dir",
            )
    except EmmoeError as e:
        print(f"sweep_experts.py: error: {e}", file=sys.stderr)
        return 2

    from emmoe_dist.ray_local import connect_or_start

    # a cluster started here (no address, not a Ray job) listens on --ray-host only
    address = args.address or ("auto" if _RAY_JOB_ENV in os.environ else None)
    connect_or_start(address, host=args.ray_host)
    import ray

    from emmoe_dist.sweep.space import build_plan, save_plan
    from emmoe_dist.sweep.summary import SUMMARY_DIR, build_summary, write_summary
    from emmoe_dist.sweep.tuner import check_judge_keys, run_sweep
    from emmoe_dist.sweep.wandb_views import log_summary

    out = sweep.output_dir
    signal.signal(signal.SIGTERM, _stop_gracefully)  # after ray.init, which installs its own
    try:
        plan = build_plan(sweep)
        save_plan(plan, out)
        check_judge_keys(plan)
        print(f"[sweep] {sweep.config.name}: {len(plan.trials)} trials in {out}", flush=True)
        outcome = run_sweep(sweep, plan)
        summary = build_summary(plan, alignment_suites=sweep.config.alignment_suites)
        paths = write_summary(summary, out / SUMMARY_DIR)
        tracking = sweep.config.tracking
        if outcome.complete and tracking.backend == "wandb":
            folder = log_summary(summary, tracking, sweep.config.group, out / SUMMARY_DIR)
            paths += [folder] if folder else []
    except EmmoeError as e:
        print(f"sweep_experts.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    for path in paths:
        print(f"[sweep] {path}")
    for slug, error in outcome.failed.items():
        print(f"[sweep] trial {slug} failed: {error}", file=sys.stderr)
    if outcome.unfinished:
        print(
            f"[sweep] interrupted with {len(outcome.unfinished)} trials unfinished; run the "
            "same command again to resume",
            file=sys.stderr,
        )
        return 130
    return 0 if outcome.complete else 1


if __name__ == "__main__":
    sys.exit(main())
