"""The Serve application's shape, without starting Ray: what each deployment may hold in flight.

The route itself runs for real in tests/test_vllm_cpu.py (vLLM on CPU).
"""

from __future__ import annotations

import pytest

from emmoe_dist.errors import EmmoeError
from emmoe_dist.serve.app import ServedModel, ServeOptions, build_app


def test_engines_receive_enough_requests_to_batch() -> None:
    # Ray Serve's default of 5 requests in flight per replica capped vLLM's batches at 5: on
    # CPU the route ran 7x slower than with the engine fed (benchmarks/RESULTS.md).
    models = [ServedModel(name="a", path="/a"), ServedModel(name="b", path="/b")]
    app = build_app(models, ServeOptions(replicas=3, max_ongoing_requests=256))
    router = app._bound_deployment
    servers = {name: handle._bound_deployment for name, handle in router.init_args[0].items()}
    assert {s.max_ongoing_requests for s in servers.values()} == {256}
    assert {s.num_replicas for s in servers.values()} == {3}
    assert router.max_ongoing_requests >= 256 * 3 * 2  # the router holds them all at once
    assert ServeOptions().max_ongoing_requests >= 256


def test_served_names_must_be_unique() -> None:
    with pytest.raises(EmmoeError, match="unique"):
        build_app(
            [ServedModel(name="a", path="/a"), ServedModel(name="a", path="/b")], ServeOptions()
        )


def test_serve_without_vllm_says_how_to_install_it(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from emmoe_dist.cli.main import main

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here (the vLLM venv)")
    assert main(["serve", "--replicas", "1"]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and "pip install vllm" in err
    assert "scripts/install_vllm_cpu.sh" in err and "No module named" not in err


def test_an_application_the_cluster_cannot_place_is_refused_with_the_arithmetic() -> None:
    from emmoe_dist.serve.app import check_resources

    models = [ServedModel(name="base", path="/a"), ServedModel(name="e4", path="/b")]
    options = ServeOptions(replicas=1, cpus_per_replica=1.0)
    check_resources(models, options, {"CPU": 4.0})  # 2.1 CPUs fit
    with pytest.raises(EmmoeError) as err:
        check_resources(models, options, {"CPU": 2.0})
    assert "2 model(s) x 1 replica(s) x (1 CPU + 0 GPU) + 0.1 CPU for the router = 2.1 CPUs" in str(
        err.value
    )
    assert "the Ray cluster has 2 CPUs and 0 GPUs" in str(err.value)
    on_gpus = ServeOptions(replicas=4, gpus_per_replica=1.0)
    with pytest.raises(
        EmmoeError, match=r"= 4\.1 CPUs and 4 GPUs; the Ray cluster has 8 CPUs and 2"
    ):
        check_resources(models[:1], on_gpus, {"CPU": 8.0, "GPU": 2.0})


_LOCAL_RAY = """
import json, psutil
from emmoe_dist.ray_local import connect_or_start
from emmoe_dist.serve.app import ServedModel, ServeOptions, check_resources
started = connect_or_start(num_cpus=1, object_store_memory=128 * 2**20, include_dashboard=False)
import ray
me = psutil.Process()
ours = {me.pid, *(p.pid for p in me.children(recursive=True))}
listening = sorted({c.laddr.ip for c in psutil.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.pid in ours})
try:
    check_resources([ServedModel(name="m", path="/m")], ServeOptions(replicas=2),
                    ray.cluster_resources())
    refused = ""
except Exception as e:
    refused = str(e)
ray.shutdown()
print(json.dumps({"started": started, "listening": listening, "refused": refused}))
"""


def test_a_local_ray_cluster_started_for_the_user_listens_on_loopback_only() -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", _LOCAL_RAY], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["started"] and result["listening"]
    assert set(result["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, result
    assert "= 2.1 CPUs and 0 GPUs; the Ray cluster has 1 CPUs" in result["refused"]
