"""`python -m workers_ai_local`: check the --model value, then serve while the engine fetches and loads it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from . import cli
from .app import create_app, create_engine
from .config import CATALOG_PATH, configure_logging, load_settings
from .engine import EngineState
from .http_limits import HeadLimits, protocol_with
from .model_store import ModelSourceError, ModelStore
from .surfaces.binding import UpgradeProbeFilter


def main(argv: Sequence[str] | None = None) -> int:
    """The `workers-ai-local` command: serving, or one of its other subcommands (cli.py)."""
    return cli.main(argv, serve)


def serve(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(argv)
    configure_logging(settings.log_level)
    log = logging.getLogger("workers_ai_local")
    if not settings.loopback and not (settings.api_token or settings.api_token_file):
        log.warning(
            "listening on %s with no API token: anyone who can reach this port can use the model; "
            "set --api-token or --api-token-file",
            settings.host,
        )
    store = ModelStore(CATALOG_PATH)
    try:
        source = store.source(settings.model)
    except ModelSourceError as exc:
        log.error("cannot serve --model %s: %s", settings.model, exc)
        return 2

    server: uvicorn.Server | None = None

    def stop_serving(_reason: str) -> None:
        # A server that can never answer is worse than one that exits: let the supervisor or the user see it.
        if server is not None:
            server.should_exit = True

    engine = create_engine(settings, source.fetch, stop_serving)
    log.info("serving %s as %s on http://%s:%d", source, ", ".join(store.models), settings.host, settings.port)

    config = uvicorn.Config(
        create_app(settings, engine, store),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # No route speaks websocket: an upgrade request (Miniflare's RPC probe) is answered as plain HTTP, the 501
        # in binding.py, even where a websocket library is installed (Ray's extra brings one).
        ws="none",
        http=protocol_with(HeadLimits(settings.max_header_bytes, settings.max_headers, settings.header_timeout)),
        timeout_graceful_shutdown=settings.shutdown_timeout or None,  # type: ignore[arg-type]
    )
    logging.getLogger("uvicorn.error").addFilter(UpgradeProbeFilter())
    server = uvicorn.Server(config)
    server.run()
    return 1 if engine.state is EngineState.FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
