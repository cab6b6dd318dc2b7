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
