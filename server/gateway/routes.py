"""The Cloudflare API's AI Gateway log routes, over what the local gateway logged: list (paged, newest first by
default, filtered by `cached`), delete, one log's detail, and its request and response bodies as they were sent."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ApiError, bad_input, success
from .store import GatewayStore, LogEntry, log_detail, log_summary

PREFIX = "/client/v4/accounts/{account_id}/ai-gateway/gateways/{gateway_id}/logs"
LOG_NOT_FOUND = 7002  # this server's code; the platform's own for a missing log is not documented
MAX_PER_PAGE = 50


def _positive(request: Request, name: str, default: int, most: int | None = None) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1 or (most is not None and int(value) > most):
        bound = f" and at most {most}" if most is not None else ""
        raise bad_input(f"Error: '{name}' must be a whole number, at least 1{bound}, got {value!r}")
    return int(value)


class GatewayLogRoutes:
    def __init__(self, store: GatewayStore) -> None:
        self.store = store

    def routes(self) -> list[Route]:
        return [
            Route(PREFIX, self.list_logs, methods=["GET"]),
            Route(PREFIX, self.delete_logs, methods=["DELETE"]),
            Route(PREFIX + "/{log_id}", self.get_log, methods=["GET"]),
            Route(PREFIX + "/{log_id}/request", self.request_body, methods=["GET"]),
            Route(PREFIX + "/{log_id}/response", self.response_body, methods=["GET"]),
        ]

    async def list_logs(self, request: Request) -> Response:
        page = _positive(request, "page", 1)
        per_page = _positive(request, "per_page", 20, MAX_PER_PAGE)
        direction = request.query_params.get("direction", request.query_params.get("order_by_direction", "desc"))
        if direction not in ("asc", "desc"):
            raise bad_input(f"Error: 'direction' must be asc or desc, got {direction!r}")
        cached_param = request.query_params.get("cached")
        if cached_param not in (None, "true", "false"):
            raise bad_input(f"Error: 'cached' must be true or false, got {cached_param!r}")
        cached = None if cached_param is None else cached_param == "true"
        entries, total = self.store.logs(request.path_params["gateway_id"], page, per_page, direction == "desc", cached)
        return JSONResponse(
            {
                "result": [log_summary(entry) for entry in entries],
                "result_info": {"page": page, "per_page": per_page, "count": len(entries), "total_count": total},
                "success": True,
                "errors": [],
                "messages": [],
            }
        )

    async def delete_logs(self, request: Request) -> Response:
        self.store.delete_logs(request.path_params["gateway_id"])
        return success({"success": True})

    def _entry(self, request: Request) -> LogEntry:
        entry = self.store.log(request.path_params["gateway_id"], request.path_params["log_id"])
        if entry is None:
            raise ApiError(404, LOG_NOT_FOUND, f"Log {request.path_params['log_id']} not found in this gateway")
        return entry

    async def get_log(self, request: Request) -> Response:
        return success(log_detail(self._entry(request)))

    async def request_body(self, request: Request) -> Response:
        entry = self._entry(request)
        return Response(entry.request_body, media_type=entry.request_content_type or "application/json")

    async def response_body(self, request: Request) -> Response:
        entry = self._entry(request)
        return Response(entry.response_body, media_type=entry.response_content_type or "application/json")
