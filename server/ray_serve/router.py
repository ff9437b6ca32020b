"""The Serve request router for the engine replicas (only the class: Serve pickles this module by value)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from workers_ai_local.ray_serve import prefixes


class AffinityRouter(RequestRouter):
    """Ranks the replicas for one request; Serve takes the first rank's replica with the shortest queue that has
    room (max_ongoing_requests), else the next rank, else waits and asks again.

    1. A session (x-session-affinity, Serve's session id): rendezvous hashing, so a session stays on one replica
       while it lives and only the sessions of a removed replica move.
    2. Prompt-prefix keys (from the proxy, longest first): the replicas known to hold the longest one, from this
       router's own recent choices (at once) or the replicas' reports (every routing-stats period), then the rest.
    3. Otherwise, or when queues differ by more than `imbalance`: least loaded first, ties taken in turn so that
       new conversations spread.
    """

    def initialize_state(self, imbalance: int = 4, remember: int = 4096, **_: Any) -> None:
        self.imbalance = imbalance
        self.remember = remember
        self.placed: OrderedDict[str, str] = OrderedDict()  # prefix key -> replica id, most recent last
        self.turn = 0
        prefixes.ROUTERS.add(self)

    def _load(self, replica: RunningReplica) -> int:
        # Requests Serve has sent it, plus those waiting in its engine (a replica may take more than its slots).
        stats = replica.routing_stats or {}
        return (self.replica_queue_len_cache.get(replica.replica_id) or 0) + int(stats.get("queue_depth", 0))

    def _by_load(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        self.turn += 1
        ordered = sorted(replicas, key=lambda r: r.replica_id.unique_id)
        n = len(ordered)
        return [r for _, r in sorted(enumerate(ordered), key=lambda p: (self._load(p[1]), (p[0] - self.turn) % n))]

    def _imbalanced(self, replicas: list[RunningReplica]) -> bool:
        loads = [self._load(r) for r in replicas]
        return max(loads) - min(loads) > self.imbalance

    @staticmethod
    def _keys(pending_request: PendingRequest) -> list[str]:
        return [k for k in (prefixes.scope_header(pending_request, prefixes.PREFIX_HEADER) or "").split(",") if k]

    def _holds(self, replica: RunningReplica, key: str) -> bool:
        return self.placed.get(key) == replica.replica_id.unique_id or key in (replica.routing_stats or {}).get(
            "prefixes", ()
        )

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        candidates = list(candidate_replicas)
        if not candidates:
            return []
        if pending_request is None or len(candidates) == 1:
            return [self._by_load(candidates)]
        # When every ranked replica is full, wait before the next round rather than spin.
        pending_request.routing_context.should_backoff = True
        session = pending_request.metadata.session_id
        if session:
            by_hash = sorted(candidates, key=lambda r: prefixes.stable_hash(session, r.replica_id.unique_id))
            return [[replica] for replica in reversed(by_hash)]
        keys = self._keys(pending_request)
        if keys and not self._imbalanced(candidates):
            for key in keys:
                holders = [r for r in candidates if self._holds(r, key)]
                if holders:
                    rest = [r for r in candidates if r not in holders]
                    return [self._by_load(holders), *([self._by_load(rest)] if rest else [])]
        return [self._by_load(candidates)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        for key in self._keys(pending_request):
            self.placed[key] = replica_id.unique_id
            self.placed.move_to_end(key)
        while len(self.placed) > self.remember:
            self.placed.popitem(last=False)
