"""Training when ranks span nodes: two launcher processes with `--nnodes 2` on this machine.

Each "node" is a torchrun with one gloo rank, so the ranks see the environment a real
two-node job gives them (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE=1). One job trains:
- `zero2_ep.json` (ep_size auto): expert parallelism stays inside a node, which here means no
  split at all (one rank per node), and the run is interrupted and resumed across both nodes;
- `zero3_ep.json` with ep_size 2: an EP group that spans the nodes, which the layout must say
  (the all-to-all would cross the inter-node links);
- `zero3_multinode.json`: hierarchical partitioning within each node (hpZ size 1 here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_launch import REPO, free_port

pytestmark = pytest.mark.distributed


def _config(tmp: Path, source: str, edit: dict[str, object]) -> str:
    raw = json.loads((REPO / "ds_configs" / source).read_text())
    for dotted, value in edit.items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path = tmp / f"two_nodes_{source}"
    path.write_text(json.dumps(raw))
    return str(path)


def _run(name: str, ds: str, out: Path, steps: int, stop_after: int | None = None) -> dict:
    return {
        "name": name,
        "ds": ds,
        "stop_after": stop_after,
        "overrides": [
            f"output_dir={out / name}",
            "data.limit=96",
            "data.max_length=256",
            f"train.steps={steps}",
            "train.micro_batch_size=2",
            "train.save_every=2",
            "train.lr=1e-3",
            "tracking.backend=none",
        ],
    }


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two_nodes")
    runs = [
        _run("node_local_ep", str(REPO / "ds_configs" / "zero2_ep.json"), out, 4, stop_after=2),
        _run("ep_across", _config(out, "zero3_ep.json", {"expert_parallel.ep_size": 2}), out, 2),
        _run(
            "hpz",
            _config(out, "zero3_multinode.json", {"zero_optimization.zero_hpz_partition_size": 1}),
            out,
            2,
        ),
    ]
    spec = out / "spec.json"
    spec.write_text(json.dumps(runs))
    port = free_port()
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node_rank",
            str(node),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(REPO / "tests" / "dist_train_driver.py"),
            str(spec),
        ]
        log = open(out / f"node{node}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log), log))
    for proc, log in procs:
        proc.wait(timeout=900)
        log.close()
    for node, (proc, _) in enumerate(procs):
        text = (out / f"node{node}.log").read_text()
        assert proc.returncode == 0, text[-6000:]
    return out


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_node_local_groups_keep_experts_whole_and_resume_across_nodes(two_nodes: Path) -> None:
    manifest = json.loads((two_nodes / "node_local_ep" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    # one rank per node: the largest group inside a node is 1, so no expert leaves its rank
    assert manifest["expert_parallel"] == {"ep_size": 1, "requested": "auto"}
    losses = _losses(two_nodes / "node_local_ep")
    assert len(losses) == 4  # steps 1-2, interrupted, then 3-4 after the resume
    assert all(loss == loss for loss in losses)  # no NaN across the resume
    assert (two_nodes / "node_local_ep" / "adapter" / "adapter_model.safetensors").is_file()


def test_an_ep_group_across_nodes_is_named_as_such(two_nodes: Path) -> None:
    log = (two_nodes / "node0.log").read_text()
    assert "ACROSS nodes (1 ranks per node)" in log
    manifest = json.loads((two_nodes / "ep_across" / "manifest.json").read_text())
    assert manifest["expert_parallel"] == {"ep_size": 2, "requested": "2"}


def test_hierarchical_partitioning_trains_over_two_nodes(two_nodes: Path) -> None:
    losses = _losses(two_nodes / "hpz")
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
