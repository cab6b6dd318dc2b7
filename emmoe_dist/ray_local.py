"""Joining a Ray cluster, or starting a local one, for the project's own commands.

A local cluster that `emmoe serve`, `emmoe generate --ray-data-replicas` or the sweep start for
the user binds every port (GCS, raylet, object manager, agents) to 127.0.0.1, so nothing on
the network can reach it; pass another `host` (`--ray-host`) to open it. Ray 2.60 resolves a
node address of 127.0.0.1 to the machine's network address unless Ray's
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` is 0 when `ray` is first imported (ray_constants reads it
then), so that is set before the import.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from emmoe_dist.errors import EmmoeError

LOOPBACK = "127.0.0.1"
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect_or_start(address: str | None = None, *, host: str = LOOPBACK, **init: Any) -> bool:
    """Join `address` (or $RAY_ADDRESS), or start a local cluster bound to `host`; returns
    True when this call started a local cluster (the caller shuts it down). `init` goes to
    `ray.init` (num_cpus, object_store_memory, ...)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    local = not address
    if local and host == LOOPBACK:
        if "ray" in sys.modules and os.environ.get(_LOCAL_ONLY_ENV) != "0":
            from ray._private import ray_constants

            if ray_constants.ENABLE_RAY_CLUSTER:  # read at import: too late to change
                raise EmmoeError(
                    "ray was imported before a local cluster could be bound to 127.0.0.1: "
                    f"set {_LOCAL_ONLY_ENV}=0 in the environment, or pass a Ray address"
                )
        os.environ[_LOCAL_ONLY_ENV] = "0"
    import ray

    if ray.is_initialized():
        return False
    if not local:
        ray.init(address=address, **init)
        return False
    ray.init(_node_ip_address=host, dashboard_host=host, **init)
    return True
