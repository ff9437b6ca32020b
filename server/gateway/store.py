"""What the local AI Gateway keeps: cached answers and request logs, per gateway, in one SQLite database.

A file under `--gateway-dir` (so a CI cache can carry it between runs), or memory when no folder is given. One
connection, used from the event loop: each statement touches one small row, and WAL keeps a write from waiting on
readers. Both tables are bounded: logs by entries per gateway (the oldest go first, as the platform's "delete
oldest" log management does), cached answers by total bytes (expired entries, then those that expire soonest).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DB_NAME = "gateway.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY,
    gateway TEXT NOT NULL,
    status INTEGER NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    chunks TEXT NOT NULL,
    usage TEXT NOT NULL,
    stored_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cache_expiry ON cache (expires_at);
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    gateway TEXT NOT NULL,
    created_at REAL NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    path TEXT NOT NULL,
    duration INTEGER NOT NULL,
    status_code INTEGER NOT NULL,
    cached INTEGER NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    metadata TEXT,
    request_content_type TEXT,
    response_content_type TEXT,
    request_type TEXT NOT NULL,
    request_body BLOB NOT NULL,
    response_body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_gateway ON logs (gateway, seq);
"""

# Crockford's base32, as ULIDs spell it: the platform's log ids are ULIDs, time-ordered and 26 characters long.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_log_id(now: float | None = None) -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, so ids sort by time as the platform's do."""
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


@dataclass(frozen=True)
class CachedAnswer:
    status: int
    headers: list[tuple[str, str]]
    chunks: list[bytes]  # the body as it was sent: one piece for a whole answer, one per SSE event for a stream
    usage: dict[str, int]


@dataclass
class LogEntry:
    id: str
    gateway: str
    created_at: float
    provider: str
    model: str
    path: str
    duration_ms: int
    status_code: int
    cached: bool
    tokens_in: int
    tokens_out: int
    metadata: dict[str, Any] | None
    request_content_type: str | None
    response_content_type: str | None
    request_type: str
    request_body: bytes = b""
    response_body: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return 200 <= self.status_code < 300


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"


class GatewayStore:
    def __init__(
        self,
        folder: str,
        max_logs: int,
        max_cache_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.location = str(Path(folder) / DB_NAME)
        else:
            self.location = ":memory:"
        self.max_logs = max_logs
        self.max_cache_bytes = max_cache_bytes
        self.clock = clock
        # Used from the event loop and, under Ray Serve or in tests, possibly another thread: one lock serializes.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.location, check_same_thread=False, isolation_level=None)
        if folder:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # The cache

    def lookup(self, key: str) -> CachedAnswer | None:
        now = self.clock()
        with self._lock:
            row = self._db.execute(
                "SELECT status, headers, body, chunks, usage, expires_at FROM cache WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                return None
            status, headers, body, chunks, usage, expires_at = row
            if expires_at <= now:
                self._db.execute("DELETE FROM cache WHERE key = ?", (key,))
                return None
        pieces, offset = [], 0
        for size in json.loads(chunks):
            pieces.append(bytes(body[offset : offset + size]))
            offset += size
        return CachedAnswer(status, [tuple(h) for h in json.loads(headers)], pieces, json.loads(usage))

    def store(self, key: str, gateway: str, answer: CachedAnswer, ttl: float) -> None:
        now = self.clock()
        body = b"".join(answer.chunks)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    gateway,
                    answer.status,
                    json.dumps(answer.headers),
                    body,
                    json.dumps([len(c) for c in answer.chunks]),
                    json.dumps(answer.usage),
                    now,
                    now + ttl,
                ),
            )
            self._bound_cache(now)

    def _bound_cache(self, now: float) -> None:
        self._db.execute("DELETE FROM cache WHERE expires_at <= ?", (now,))
        total = self._db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM cache").fetchone()[0]
        while total > self.max_cache_bytes:
            row = self._db.execute("SELECT key, LENGTH(body) FROM cache ORDER BY expires_at LIMIT 1").fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM cache WHERE key = ?", (row[0],))
            total -= row[1]

    def cache_stats(self) -> tuple[int, int]:
        """Entries and the bytes of their bodies."""
        with self._lock:
            count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM cache").fetchone()
        return int(count), int(size)

    # The logs

    def add_log(self, entry: LogEntry) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO logs (id, gateway, created_at, provider, model, path, duration, status_code, cached,"
                " tokens_in, tokens_out, metadata, request_content_type, response_content_type, request_type,"
                " request_body, response_body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.id,
                    entry.gateway,
                    entry.created_at,
                    entry.provider,
                    entry.model,
                    entry.path,
                    entry.duration_ms,
                    entry.status_code,
                    int(entry.cached),
                    entry.tokens_in,
                    entry.tokens_out,
                    None if entry.metadata is None else json.dumps(entry.metadata),
                    entry.request_content_type,
                    entry.response_content_type,
                    entry.request_type,
                    entry.request_body,
                    entry.response_body,
                ),
            )
            # Keep the newest max_logs of this gateway.
            self._db.execute(
                "DELETE FROM logs WHERE gateway = ? AND seq <= ("
                " SELECT seq FROM logs WHERE gateway = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (entry.gateway, entry.gateway, self.max_logs),
            )

    _COLUMNS = (
        "id, gateway, created_at, provider, model, path, duration, status_code, cached, tokens_in, tokens_out,"
        " metadata, request_content_type, response_content_type, request_type, request_body, response_body"
    )

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> LogEntry:
        return LogEntry(
            id=row[0],
            gateway=row[1],
            created_at=row[2],
            provider=row[3],
            model=row[4],
            path=row[5],
            duration_ms=row[6],
            status_code=row[7],
            cached=bool(row[8]),
            tokens_in=row[9],
            tokens_out=row[10],
            metadata=None if row[11] is None else json.loads(row[11]),
            request_content_type=row[12],
            response_content_type=row[13],
            request_type=row[14],
            request_body=bytes(row[15]),
            response_body=bytes(row[16]),
        )

    def logs(
        self, gateway: str, page: int, per_page: int, newest_first: bool = True, cached: bool | None = None
    ) -> tuple[list[LogEntry], int]:
        """One page of a gateway's logs and how many there are in all (with the same filter)."""
        where, params = "gateway = ?", [gateway]
        if cached is not None:
            where += " AND cached = ?"
            params.append(int(cached))
        order = "DESC" if newest_first else "ASC"
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM logs WHERE {where}", params).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {self._COLUMNS} FROM logs WHERE {where} ORDER BY seq {order} LIMIT ? OFFSET ?",
                [*params, per_page, (page - 1) * per_page],
            ).fetchall()
        return [self._entry(row) for row in rows], int(total)

    def log(self, gateway: str, log_id: str) -> LogEntry | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._COLUMNS} FROM logs WHERE gateway = ? AND id = ?", (gateway, log_id)
            ).fetchone()
        return None if row is None else self._entry(row)

    def delete_logs(self, gateway: str) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM logs WHERE gateway = ?", (gateway,)).rowcount


def log_summary(entry: LogEntry) -> dict[str, Any]:
    """A log as the Cloudflare API lists it (GET .../ai-gateway/gateways/{id}/logs)."""
    return {
        "id": entry.id,
        "cached": entry.cached,
        "created_at": _iso(entry.created_at),
        "duration": entry.duration_ms,
        "model": entry.model,
        "path": entry.path,
        "provider": entry.provider,
        "success": entry.success,
        "tokens_in": entry.tokens_in,
        "tokens_out": entry.tokens_out,
        "cost": 0,
        "custom_cost": False,
        "metadata": None if entry.metadata is None else json.dumps(entry.metadata),
        "model_type": "text-generation",
        "request_content_type": entry.request_content_type,
        "request_type": entry.request_type,
        "response_content_type": entry.response_content_type,
        "status_code": entry.status_code,
        "step": 0,
    }


def log_detail(entry: LogEntry) -> dict[str, Any]:
    """A log as the Cloudflare API details it (GET .../logs/{id}): the summary and the sizes of both bodies."""
    return {
        **log_summary(entry),
        "request_size": len(entry.request_body),
        "response_size": len(entry.response_body),
        "request_head_complete": True,
        "response_head_complete": True,
        "request_head": entry.request_body[:1024].decode("utf-8", "replace"),
        "response_head": entry.response_body[:1024].decode("utf-8", "replace"),
    }


def folder_size(folder: str) -> int:
    """Bytes the store takes on disk (the database and its WAL)."""
    return sum(p.stat().st_size for p in Path(folder).glob(DB_NAME + "*")) if folder and os.path.isdir(folder) else 0
