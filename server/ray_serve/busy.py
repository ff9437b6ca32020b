"""rejectIfBusy in front of the replicas: a request that asks not to wait is refused in the proxy when Serve would
have to hold it there, every replica having as many requests as it takes (max_ongoing_requests, its slots).

Once a request reaches a replica, the replica's engine decides as on one server (the requests waiting there and
its KV pool). What the proxy knows of each replica is its router's count of requests sent to it and not finished
(Serve's queue-length cache), or, where that count has gone stale (no request for a while), the replica's own last
report (busy slots and queue, every routing-stats period).
"""

from __future__ import annotations

import json

from workers_ai_local.ray_serve import prefixes


def rejects_if_busy(body: bytes) -> bool:
    """Whether a run body asks for rejectIfBusy: in `options` (REST, Chat Completions, the binding's wrapper) or,
    on Chat Completions, at the top."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(payload, dict):
        return False
    options = payload.get("options")
    if isinstance(options, dict) and options.get("rejectIfBusy") is True:
        return True
    return payload.get("rejectIfBusy") is True


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
