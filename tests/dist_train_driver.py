"""Runs several training runs in one 2-rank DeepSpeed job (process start-up is paid once).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist_train_driver.py SPEC.json

SPEC.json: a list of {"name", "ds", "overrides": [...], "stop_after": int|null, "probe": bool,
"resume_overrides": [...]}. A run with `stop_after` is interrupted there and resumed at once, in
the same process, from its checkpoint, with `resume_overrides` added (e.g. the same output_dir
spelled relative). With `probe`, rank 0 saves the trained model's logits on a fixed input to
`<output_dir>/probe_logits.pt`, so the test can compare them with saved adapters and merges;
with `step_logits: N`, also after every N-th step to `<output_dir>/logits_step<k>.pt` (the
snapshot steps). `stop_like: {"run", "metric", "step"}` adds a `train.stop_when` rule that holds
from the value `metric` had at `step` of an earlier run of the spec (`metric above value - 1e-9`).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from emmoe_dist.config import load_config
from emmoe_dist.errors import EmmoeError
from emmoe_dist.parallel.runtime import Runtime, init_runtime, shutdown
from emmoe_dist.train.trainer import run_training


def probe_input(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab_size, (2, 24), generator=g)


def _step_logits(out: str, every: int, rt: Runtime) -> Callable[[int, torch.nn.Module], None]:
    def observe(step: int, model: torch.nn.Module) -> None:
        if step % every:
            return
        ids = probe_input(model.config.vocab_size).to(rt.device)
        with torch.no_grad():  # every rank: the forward gathers ZeRO-3 partitions
            logits = model(input_ids=ids).logits.float().cpu()
        if rt.is_main:
            torch.save({"input_ids": ids.cpu(), "logits": logits}, f"{out}/logits_step{step}.pt")

    return observe


def _stop_rule(runs: list[dict], like: dict) -> str:
    earlier = load_config(None, next(r for r in runs if r["name"] == like["run"])["overrides"])
    text = Path(earlier.output_dir, "metrics.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    value = next(r[like["metric"]] for r in rows if r["step"] == like["step"])
    return f"train.stop_when={{metric: {like['metric']}, above: {value - 1e-9!r}}}"


def _replace_model(folder: str, source: str, rt: Runtime) -> None:
    """Overwrite the model folder's files with another model's (rank 0; every rank waits)."""
    if rt.is_main:
        shutil.copytree(source, folder, dirs_exist_ok=True)
    torch.distributed.barrier()


def run_specs(runs: list[dict], rt: Runtime) -> None:
    """Train each run (interrupting and resuming those with `stop_after`), saving probes."""
    for run in runs:
        overrides = list(run["overrides"])
        if run.get("stop_like"):
            overrides.append(_stop_rule(runs, run["stop_like"]))
        cfg = load_config(None, overrides)
        observe = (
            _step_logits(cfg.output_dir, run["step_logits"], rt) if run.get("step_logits") else None
        )
        if run.get("stop_after"):
            run_training(cfg, run["ds"], rt, stop_after=run["stop_after"])
            if run.get("model_before_resume"):
                _replace_model(cfg.model.name_or_path, run["model_before_resume"], rt)
            cfg = load_config(None, [*overrides, *run.get("resume_overrides", [])])
        if run.get("expect_error"):
            try:
                run_training(cfg, run["ds"], rt)
            except EmmoeError as e:
                if run["expect_error"] not in str(e):
                    raise
                if rt.is_main:
                    Path(cfg.output_dir, "error.txt").write_text(str(e), encoding="utf-8")
                continue
            raise AssertionError(f"{run['name']} ended without the expected error")
        result = run_training(cfg, run["ds"], rt, observe=observe)
        if run.get("probe"):
            model = result.model
            assert model is not None
            model.eval()
            ids = probe_input(model.config.vocab_size).to(rt.device)
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float().cpu()
            if rt.is_main:
                torch.save(
                    {"input_ids": ids.cpu(), "logits": logits}, f"{cfg.output_dir}/probe_logits.pt"
                )
        if rt.is_main:
            print(f"[driver] {run['name']} done", flush=True)


def main(spec_path: str) -> int:
    runs = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    rt = init_runtime()
    try:
        run_specs(runs, rt)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(args[0]))
