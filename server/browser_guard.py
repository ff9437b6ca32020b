"""Defence against a web page in a browser on the same machine, which can reach a loopback server too.

- DNS rebinding: a page of evil.example whose name is made to resolve to 127.0.0.1 talks to this server as its
  own origin, so the browser allows it to read the answers. Its requests still name `Host: evil.example`: a
  server bound to loopback answers only loopback names (`localhost`, `127.x.x.x`, `[::1]`) unless
  `--allowed-hosts` names more.
- Cross-site requests: any page can POST a "simple" request (a form, or fetch without custom headers) to
  localhost; the browser merely hides the answer. Browsers name the page's origin in `Origin` on every such
  POST, so a request with an `Origin` that is neither this server's own (the playground page) nor one of
  `--cors-origins` is refused before any work. Clients that are not browsers (curl, the SDKs, workerd and
  Miniflare's binding requests, Ray Serve's proxy) send no `Origin` and are unaffected, whatever their content
  type: a body sent with curl's default form type still runs.

Refusals answer 403 in the shape of the route that was called. Origins that `--cors-origins` allows get CORS
headers, and their preflight requests an answer (Starlette's CORSMiddleware, placed inside this guard).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError
from .surfaces.openai import error_response

FORBIDDEN = 10000  # Cloudflare's code for a request it will not authorize


def split_list(value: str) -> list[str]:
    return [item.strip().lower() for item in value.split(",") if item.strip()]


def host_name(host: str) -> str:
    """The name of a `Host` value, without its port: `[::1]:8787` -> `::1`, `localhost:80` -> `localhost`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):  # browsers resolve *.localhost to loopback themselves
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class BrowserGuard:
    def __init__(self, app: ASGIApp, check_host: bool, allowed_hosts: Iterable[str], cors_origins: Iterable[str]):
        """`check_host`: whether Host is checked at all (the server is bound to loopback, or --allowed-hosts is
        set); then loopback names and `allowed_hosts` (names, `*.domain`, or `*`) pass. `cors_origins`: origins
        (`scheme://host[:port]`, or `*`) whose pages may call the API."""
        self.app = app
        self.allowed_hosts = set(allowed_hosts)
        self.check_host = check_host and "*" not in self.allowed_hosts
        self.cors_origins = {origin.rstrip("/") for origin in cors_origins}

    def host_allowed(self, host: str | None) -> bool:
        if not self.check_host or host is None:  # HTTP/1.0 without Host: not something a browser sends
            return True
        name = host_name(host)
        if is_loopback_name(name) or name in self.allowed_hosts:
            return True
        return any(allowed.startswith("*.") and name.endswith(allowed[1:]) for allowed in self.allowed_hosts)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        if "*" in self.cors_origins or origin.lower() in self.cors_origins:
            return True
        # The server's own pages (the playground) call it from its own origin, which matches the Host they used.
        url = urlsplit(origin.lower())
        return url.scheme in ("http", "https") and host is not None and url.netloc == host.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        origin = headers.get("origin")
        if not self.host_allowed(host):
            message = (
                f"Host {host!r} is not served: this server answers loopback names only; "
                "list other names in --allowed-hosts"
            )
        elif origin is not None and not self.origin_allowed(origin, host):
            message = (
                f"Origin {origin!r} is not allowed: list the origins of pages that may call this API in --cors-origins"
            )
        else:
            await self.app(scope, receive, send)
            return
        await error_response(scope["path"], ApiError(403, FORBIDDEN, message))(scope, receive, send)
