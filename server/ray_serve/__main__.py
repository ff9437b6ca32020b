"""`python -m workers_ai_local.ray_serve --replicas N [--address HOST:PORT] [server flags]`: the API through Ray
Serve."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

import httpx

from workers_ai_local.config import ClusterSettings, configure_logging, load_cluster_settings
from workers_ai_local.ray_serve import cluster


def main(argv: Sequence[str] | None = None) -> int:
    # Every flag is checked before Ray starts: a typo costs no cluster.
    cluster_settings, settings, server_argv = load_cluster_settings(argv)
    configure_logging(settings.log_level)
    log = logging.getLogger("workers_ai_local.ray_serve")
    address = cluster_settings.ray_address
    connection = cluster.Cluster(address, cluster.environment(address, server_argv))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Imported once Ray's environment is set (cluster.Cluster did it).
    from ray import serve

    from workers_ai_local.ray_serve.deployment import APPLICATION, build

    try:
        quiet = {"enable_access_log": False}  # the app keeps its own access log, in each replica
        # On a joined cluster whose Serve already runs, its proxies keep the address they were started with.
        serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=quiet)
        serve.run(
            build(cluster_settings, settings, server_argv), name=APPLICATION, route_prefix="/", logging_config=quiet
        )
        base = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
        try:
            # One request through the proxy makes it build its router, which then answers /health for every replica.
            httpx.get(f"{base}/openapi.json", timeout=60)
        except httpx.TransportError:
            log.warning("nothing answers on %s: Serve on this cluster was started on another address", base)
        log.info("serving on %s with %s", base, describe(cluster_settings))
        stop.wait()
    finally:
        # A joined cluster keeps its Serve (other applications may use it); only ours goes.
        if connection.owned:
            serve.shutdown()
        else:
            serve.delete(APPLICATION)
        connection.close()
    return 0


def describe(cluster_settings: ClusterSettings) -> str:
    if cluster_settings.autoscaling:
        return f"{cluster_settings.min_replicas} to {cluster_settings.max_replicas} replicas (autoscaling)"
    return f"{cluster_settings.replicas} replica(s)"


if __name__ == "__main__":
    sys.exit(main())
