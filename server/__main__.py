"""`python -m server`: resolve the model (downloading it if need be), then serve."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from .app import create_app
from .config import CATALOG_PATH, load_settings
from .engine import ContextSettings, Engine
from .model_store import ModelSourceError, ModelStore


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    log = logging.getLogger("server")
    store = ModelStore(CATALOG_PATH)
    try:
        model_path = store.locate(settings.model)
    except ModelSourceError as exc:
        log.error("cannot serve --model %s: %s", settings.model, exc)
        return 2
    engine = Engine(
        model_path,
        ContextSettings(
            n_ctx=settings.ctx_size,
            n_batch=settings.batch_size,
            n_seq=settings.parallel,
            n_threads=settings.effective_threads,
            n_gpu_layers=settings.gpu_layers,
        ),
    )
    log.info("serving %s as %s on http://%s:%d", model_path, ", ".join(store.models), settings.host, settings.port)
    uvicorn.run(
        create_app(settings, engine, store),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
