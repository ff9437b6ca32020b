"""Limits on a request's head, enforced in uvicorn's httptools protocol, before any application code runs.

httptools (llhttp) buffers a header line of any length and hands over any number of headers, and uvicorn arms
no timer until a connection's first response is sent: a 32 MiB header or 100,000 headers were parsed and held,
and a client could hold a connection open for ever by never finishing its headers. This protocol counts the
bytes and the headers of each request's head as they arrive and gives it a deadline; past any of them the client
gets one answer (431 or 408, Workers AI's error envelope) and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("workers_ai_local.http")

HEADERS_TOO_LARGE = 431
HEADERS_TIMEOUT = 408
LIMIT_CODE = 3006  # Workers AI's code for a request that is too large


@dataclass(frozen=True)
class HeadLimits:
    max_bytes: int  # the request line and all headers together
    max_count: int
    timeout: float  # seconds from the connection (or the end of the previous response) to the head's end; 0 = none


def refusal(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"result": None, "success": False, "errors": [{"code": LIMIT_CODE, "message": message}],
                       "messages": []}).encode()  # fmt: skip
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `LIMITS` on each request's head (set by `protocol_with`)."""

    LIMITS = HeadLimits(max_bytes=32 * 1024, max_count=100, timeout=10.0)

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_count = 0
        self._head_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def _arm_deadline(self) -> None:
        if self.LIMITS.timeout > 0 and self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.LIMITS.timeout, self._head_timed_out)

    def _disarm_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._refused = True
        self._disarm_deadline()
        log.info("refused a request head: %s", message)
        if not self.transport.is_closing():
            self.transport.write(refusal(status, reason, message))
            self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a pipelined head waits, unread, for the answer in progress: not the client's delay
        if self._in_head and not self._refused:
            self._refuse(
                HEADERS_TIMEOUT, "Request Timeout", f"Request headers not received within {self.LIMITS.timeout:g} s"
            )

    def _too_large(self) -> None:
        self._refuse(
            HEADERS_TOO_LARGE,
            "Request Header Fields Too Large",
            f"Request headers are too large: the limit is {self.LIMITS.max_bytes} bytes"
            f" and {self.LIMITS.max_count} headers",
        )

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        # A head that has not ended after this read: all it holds so far counts (a head that ends within a read
        # is measured exactly in on_headers_complete). One read (at most 256 KiB) bounds what is parsed past it.
        if self._in_head and not self._refused:
            self._head_bytes += len(data)
            if self._head_bytes > self.LIMITS.max_bytes:
                self._too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._head_count = 0
        self._arm_deadline()

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        super().on_url(url)
        if len(self.url) > self.LIMITS.max_bytes:
            self._too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._head_count += 1
        if self._head_count > self.LIMITS.max_count:
            self._too_large()
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._disarm_deadline()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.LIMITS.max_bytes:
            self._too_large()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's head starts its clock at its first byte (on_message_begin); until then the
        # keep-alive timeout bounds an idle connection.


def protocol_with(limits: HeadLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http` setting, bound to these limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"LIMITS": limits})
