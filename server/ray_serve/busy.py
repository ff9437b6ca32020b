"""rejectIfBusy in front of the replicas: a request that asks not to wait is refused in the proxy when Serve would
have to hold it there, every replica having as many requests as it takes (max_ongoing_requests, its slots).

Once a request reaches a replica, the replica's engine decides as on one server (the requests waiting there and
its KV pool). What the proxy knows of each replica is its router's count of requests sent to it and not finished
(Serve's queue-length cache), or, where that count has gone stale (no request for a while), the replica's own last
report (busy slots and queue, every routing-stats period).
"""

from __future__ import annotations

import json

from workers_ai_local.errors import ApiError
from workers_ai_local.ray_serve import prefixes
from workers_ai_local.run_options import RunOptions


def rejects_if_busy(body: bytes) -> bool:
    """Whether a run body asks for rejectIfBusy, read as the replica reads it (RunOptions, `options` first, then the
    top level that Chat Completions takes); a body the replica will refuse asks for nothing here."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(payload, dict):
        return False
    try:
        return RunOptions.from_body(payload, top_level=True).reject_if_busy
    except ApiError:
        return False


def cluster_busy() -> bool:
    """Whether no replica this proxy routes to has room for another request (False before the first request, when
    no router exists yet: the replica decides)."""
    replicas = 0
    for router in list(prefixes.ROUTERS):
        for replica_id, replica in router.curr_replicas.items():  # type: ignore[attr-defined]
            replicas += 1
            ongoing = router.replica_queue_len_cache.get(replica_id)  # type: ignore[attr-defined]
            if ongoing is None:
                report = replica.routing_stats or {}
                ongoing = int(report.get("slots_busy", 0)) + int(report.get("queue_depth", 0))
            if ongoing < replica.max_ongoing_requests:
                return False
    return replicas > 0
