"""Starting or joining the Ray cluster that runs the replicas, and keeping a local one on 127.0.0.1.

Ray reads its environment when it is imported and hands it to every process it starts (GCS, raylet, workers, the
Serve proxy and replicas), so `environment()` must be applied before `import ray` in the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence

# Named in the proxy's environment: Serve calls it in each HTTP proxy to wrap its ASGI app (see proxy.py).
PROXY_CALLBACK = "workers_ai_local.ray_serve.proxy.middlewares"
# The server flags as given, for the proxy: it answers /metrics itself and must ask for the same API tokens.
SERVER_ARGV_ENV = "WAI_SERVER_ARGV"
LOOPBACK = "127.0.0.1"


def is_local(address: str) -> bool:
    host = address.rpartition(":")[0] or address
    return not address or host in ("127.0.0.1", "localhost")


def environment(address: str, server_argv: Sequence[str]) -> dict[str, str]:
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # The header Serve's proxy copies into a request's session id, which our router keeps on one replica.
        "RAY_SERVE_SESSION_ID_HEADER_KEY": "x-session-affinity",
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
        SERVER_ARGV_ENV: json.dumps(list(server_argv)),
    }
    if is_local(address):
        # Without it Ray rewrites 127.0.0.1 to the machine's external address and its processes listen on every
        # interface; with it a cluster is one node, so a multi-node cluster is joined by its own address instead.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Ray 2.60 turns token auth on by default and writes ~/.ray/auth_token; a loopback cluster needs none.
        env["RAY_AUTH_MODE"] = "disabled"
    return env


class Cluster:
    """A connection to Ray: a throwaway single-node cluster of our own (removed on close), or an existing one."""

    def __init__(self, address: str, env: dict[str, str]) -> None:
        for key, value in env.items():
            os.environ.setdefault(key, value)
        import ray

        self._temp_dir = ""
        runtime_env = {"env_vars": env}
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
            return
        # Short: Ray puts unix sockets under it (108-byte limit).
        self._temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        ray.init(
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=128 * 2**20,  # replicas exchange no objects; Ray's default takes 30% of memory
            _node_ip_address=LOOPBACK,
            _temp_dir=self._temp_dir,
            runtime_env=runtime_env,
            log_to_driver=True,
        )

    @property
    def owned(self) -> bool:
        """Started by us (and removed on close), rather than joined."""
        return bool(self._temp_dir)

    def close(self) -> None:
        import ray

        ray.shutdown()
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


def pin_replica_grpc_to_loopback() -> None:
    """Ray 2.60 starts an inter-deployment gRPC server in every replica bound to "[::]:0" (every interface), used
    only when RAY_SERVE_USE_GRPC_BY_DEFAULT=1. Called first in the replica's constructor, which runs before Serve
    starts that server, this binds it to 127.0.0.1 instead. Check with `ss` after each Ray upgrade."""
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "pinned_to_loopback", False):
        return

    def add_port(server: object, address: str) -> int:
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", ""):
            address = f"{LOOPBACK}:{port}"
        return original(server, address)

    add_port.pinned_to_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
