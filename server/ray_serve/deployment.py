"""The engine replica, as a Ray Serve deployment, and the Serve application built from the settings.

A replica is one engine (one model, one KV cache) and the whole app over it, behind Serve's HTTP proxy: each
surface, the playground and the operations routes work exactly as on `python -m workers_ai_local`. Serve's late-bound
ingress (`@serve.ingress()` with `__serve_build_asgi_app__`) builds the app inside the replica's process, so the
engine's thread is never pickled.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig, RequestRouterConfig
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers_ai_local.app import create_app, create_engine
from workers_ai_local.config import CATALOG_PATH, ClusterSettings, Settings, configure_logging, load_settings
from workers_ai_local.engine import Engine, EngineState
from workers_ai_local.model_store import ModelStore
from workers_ai_local.ray_serve import cluster
from workers_ai_local.ray_serve.prefixes import PREFIX_HEADER, REPLICA_HEADER
from workers_ai_local.surfaces.operations import health_report

DEPLOYMENT = "EngineReplica"
APPLICATION = "workers-ai-local"
PREFIXES_KEPT = 256  # prompt-prefix keys a replica reports as cached, most recent first
STATS_PERIOD_S = 1.0  # how often Serve collects each replica's report for the routers and the proxy


class ReplicaGate:
    """Around a replica's app: its lifespan startup completes only once the engine has loaded the model (or fails
    with it), so Serve routes nothing to a replica still loading; every answer names the replica; the prefix keys
    of a request answered with 200 are remembered as held by this replica's cache."""

    def __init__(self, app: ASGIApp, engine: Engine, replica_id: str, held: OrderedDict[str, None]) -> None:
        self.app = app
        self.engine = engine
        self.replica_id = replica_id.encode()
        self.held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._gated(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        keys = next((v.decode() for k, v in scope["headers"] if k == PREFIX_HEADER), "")

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.replica_id)]}
                if keys and message["status"] == 200:
                    self._hold(keys.split(","))
            await send(message)

        await self.app(scope, receive, marked)

    def _hold(self, keys: list[str]) -> None:
        for key in keys:
            self.held[key] = None
            self.held.move_to_end(key)
        while len(self.held) > PREFIXES_KEPT:
            self.held.popitem(last=False)

    def _gated(self, send: Send) -> Send:
        async def gate(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                while self.engine.state is EngineState.LOADING:
                    await asyncio.sleep(0.05)
                if self.engine.state is not EngineState.READY:
                    message = {"type": "lifespan.startup.failed", "message": self.engine.error or "engine failed"}
            await send(message)

        return gate


@serve.ingress()
class EngineReplica:
    def __init__(self, server_argv: Sequence[str]) -> None:
        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":  # a loopback cluster (cluster.environment)
            cluster.pin_replica_grpc_to_loopback()
        self.settings = load_settings(list(server_argv))
        configure_logging(self.settings.log_level)
        self.store = ModelStore(CATALOG_PATH)
        # No failure callback: check_health reads the engine's state, which a failed load leaves FAILED.
        self.engine = create_engine(self.settings, self.store.source(self.settings.model).fetch)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.held: OrderedDict[str, None] = OrderedDict()
        self.asgi: Starlette | None = None  # not `app`: Serve's ingress wrapper owns that name

    def __serve_build_asgi_app__(self) -> ASGIApp:
        self.asgi = create_app(self.settings, self.engine, self.store)
        return ReplicaGate(self.asgi, self.engine, self.replica_id, self.held)

    def check_health(self) -> None:
        """Serve replaces a replica whose engine failed."""
        if self.engine.state is EngineState.FAILED:
            raise RuntimeError(f"the engine failed: {self.engine.error}")

    def record_routing_stats(self) -> dict[str, Any]:
        """Collected by Serve every STATS_PERIOD_S and given to every router: what the router weighs (queue,
        cached prefixes) and what the proxy answers /health and /metrics with."""
        ready = self.engine.state is EngineState.READY
        return {
            **(health_report(self.engine) if ready else {"status": self.engine.state.value}),
            "pid": os.getpid(),
            "prefixes": list(self.held),
            "metrics": self.asgi.state.metrics.render().decode() if self.asgi is not None else "",
        }


def build(cluster_settings: ClusterSettings, settings: Settings, server_argv: Sequence[str]) -> Any:
    """The Serve application: replicas of the engine, routed by AffinityRouter, queue bounded by --max-queue."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        # llama.cpp's threads are --threads; Ray reserving cores for them would only limit replicas per node.
        "ray_actor_options": {"num_cpus": 0, "num_gpus": cluster_settings.gpus_per_replica},
        # A replica takes what its slots decode together; the rest wait in the proxy, where the router can still
        # choose, up to --max-queue for the whole deployment (0: no bound), then 429.
        "max_ongoing_requests": settings.parallel,
        "max_queued_requests": settings.max_queue or -1,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
        "health_check_period_s": cluster_settings.health_period_s,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 5,
        "request_router_config": RequestRouterConfig(
            request_router_class="workers_ai_local.ray_serve.router.AffinityRouter",
            request_routing_stats_period_s=STATS_PERIOD_S,
            request_routing_stats_timeout_s=5,
        ),
    }
    scaling = cluster_settings
    if scaling.autoscaling:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            initial_replicas=min(max(scaling.replicas, scaling.min_replicas), scaling.max_replicas),
            target_ongoing_requests=scaling.target_ongoing,
        )
    else:
        options["num_replicas"] = scaling.replicas
    return serve.deployment(EngineReplica, **options).bind(list(server_argv))


def build_app(args: dict[str, Any]) -> Any:
    """For a Serve config file (`import_path: workers_ai_local.ray_serve.deployment:build_app`): `args.argv` holds
    the same flags as `python -m workers_ai_local.ray_serve`; a `deployments:` entry may then override replicas or
    autoscaling."""
    from workers_ai_local.config import load_cluster_settings

    cluster_settings, settings, server_argv = load_cluster_settings([str(a) for a in args.get("argv", [])])
    return build(cluster_settings, settings, server_argv)
