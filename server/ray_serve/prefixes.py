"""What the router knows of a request, shared by the router (router.py) and the proxy middleware (proxy.py).

Serve pickles a request router's module by value, so module state there would be a private copy in every process
that unpickles it; state the proxy must share with its routers (ROUTERS) lives here, imported by name.

The router sees a request's headers, never its body: the proxy reads the body, derives keys of the prompt's
prefixes and passes them in PREFIX_HEADER. Replicas report the keys of what they answered (their caches hold those
prompts), and the router sends a request to a replica holding its longest key.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import weakref
from typing import TYPE_CHECKING

from workers_ai_local.http_io import parse_json

if TYPE_CHECKING:
    from ray.serve.request_router import PendingRequest

PREFIX_HEADER = b"x-wai-prefix"
REPLICA_HEADER = b"x-wai-replica"
KEY_LEVELS = 6  # the longest prefixes of a request the router compares
PROMPT_BLOCK_CHARS = 1024
# The routers living in this process (the proxy's), so the proxy can read the replicas' reports from them.
ROUTERS: weakref.WeakSet[object] = weakref.WeakSet()


def stable_hash(*parts: str) -> int:
    # Not hash(): it is salted per process, and every proxy must rank replicas alike.
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "big")


def _key(value: object) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, ensure_ascii=False).encode(), digest_size=6).hexdigest()


def prefix_keys(body: bytes) -> list[str]:
    """Keys of a request's prompt prefixes, longest first. A chat: the conversation before its last message, by
    whole messages, with the tools (the template writes them first). A prompt: its leading 1 KiB blocks. Any body
    shape that is not a run request gives none."""
    try:
        # Depth-limited like the replica's own parsing: a deeply nested body is the replica's 400 to give.
        payload = parse_json(body)
    except ValueError:
        return []
    if not isinstance(payload, dict):
        return []
    # The Worker binding wraps the input ({"inputs": {...}}); Workers AI REST and OpenAI put it at the top.
    run = payload["inputs"] if isinstance(payload.get("inputs"), dict) else payload
    keys: list[str] = []
    messages = run.get("messages")
    if isinstance(messages, list) and messages:
        tools = run.get("tools") or []
        # Never the whole list: its last message is new to every replica. A one-message chat still shares its
        # first message (often a system prompt) with others.
        for n in range(1, max(len(messages), 2)):
            keys.append("m" + _key([tools, messages[:n]]))
    elif isinstance(run.get("prompt"), str):
        prompt = run["prompt"]
        for end in range(PROMPT_BLOCK_CHARS, len(prompt) + 1, PROMPT_BLOCK_CHARS):
            keys.append("p" + _key(prompt[:end]))
    return list(reversed(keys))[:KEY_LEVELS]


def scope_header(pending: PendingRequest, name: bytes) -> str | None:
    """A header of the HTTP request being routed. Serve's proxy passes the request as one argument, the pickled
    `StreamingHTTPRequest` whose `asgi_scope` holds path and headers (Ray 2.60's private shape: anything else,
    such as a DeploymentHandle call, gives None)."""
    if not pending.args or not isinstance(pending.args[0], bytes):
        return None
    try:
        scope = getattr(pickle.loads(pending.args[0]), "asgi_scope", None)
    except Exception:
        return None
    if not isinstance(scope, dict):
        return None
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
