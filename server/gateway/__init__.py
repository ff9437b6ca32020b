"""AI Gateway, locally: the gateway's URLs and the binding's gateway requests, a response cache, and logs."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from ..model_store import LocalFile, ModelStore
from .layer import GatewayLayer
from .routes import GatewayLogRoutes
from .store import GatewayStore


def served_model(settings: Settings, store: ModelStore) -> str:
    """What names the served model file in a cache key: its source, and for a local file its size and time, so an
    answer cached from one model is never served for another. The chat date changes the prompt, so it counts too."""
    source = store.source(settings.model)
    identity = str(source)
    if isinstance(source, LocalFile):
        stat = Path(source.path).stat()
        identity += f" {stat.st_size} {stat.st_mtime_ns}"
    return f"{identity} chat_date={settings.chat_date}"


__all__ = ["GatewayLayer", "GatewayLogRoutes", "GatewayStore", "served_model"]
