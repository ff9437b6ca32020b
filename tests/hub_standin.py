"""A local stand-in for the Hugging Face hub's file endpoint, so the real download path runs without a network.

It answers `HEAD/GET /{repo_id}/resolve/{revision}/{filename}` with the headers huggingface-hub reads
(X-Repo-Commit, ETag, Content-Length), optionally slowly, and records what it was asked.
"""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubStandIn:
    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, files: dict[str, Path], seconds_per_file: float = 0.0) -> None:
        """`files` maps "owner/repo/filename" to the local file served under it."""
        self.files = files
        self.seconds_per_file = seconds_per_file
        self.requests: list[str] = []
        self._etags = {key: hashlib.sha256(path.read_bytes()).hexdigest() for key, path in files.items()}
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                standin._answer(self, body=False)

            def do_GET(self) -> None:
                standin._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append(f"{handler.command} {handler.path}")
        parts = handler.path.split("?")[0].strip("/").split("/")
        # owner / repo / "resolve" / revision / filename
        key = "/".join([*parts[:2], *parts[4:]]) if len(parts) >= 5 and parts[2] == "resolve" else ""
        if key not in self.files:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        data = self.files[key].read_bytes()
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", self.COMMIT)
        handler.send_header("ETag", f'"{self._etags[key]}"')
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if not body:
            return
        chunks = 50
        size = len(data) // chunks + 1
        for i in range(chunks):
            handler.wfile.write(data[i * size : (i + 1) * size])
            if self.seconds_per_file:
                time.sleep(self.seconds_per_file / chunks)
