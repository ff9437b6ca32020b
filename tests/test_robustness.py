"""Odd and hostile bodies on every POST route: always an error in the route's own shape, never a 500."""

from __future__ import annotations

import pytest
from conftest import MODEL, run_url

ROUTES = [
    run_url(),
    "/v1/chat/completions",
    "/v1/completions",
    "/client/v4/accounts/acc/ai/finetunes",
]
BODIES = [
    b"null",
    b"1",
    b'"text"',
    b"[]",
    b"{}",
    b'{"prompt": "x", "seed": 1.5}',
    b'{"prompt": "x", "max_tokens": 99999999999}',
    b'{"prompt": "\\ud800"}',
    b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f",'
    b' "description": "d", "parameters": {"type": "object", "properties": {"a": {"type": "weird",'
    b' "description": "x"}}}}}]}',
    b'{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"type": "string", "pattern": "("}}}',
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
    b'{"model": "' + MODEL.encode() + b'", "prompt": ["a", "b"]}',
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "x"}], "stop": ["", ""]}',
    # Whole numbers written as floats are JSON Schema integers: they must reach the sampler as ints.
    b'{"prompt": "x", "seed": 690.0, "top_k": 3.0, "max_tokens": 2.0}',
    b'{"model": "' + MODEL.encode() + b'", "prompt": "x", "seed": 690.0, "top_k": 3.0, "max_tokens": 2.0}',
    b'{"messages": [], "max_tokens": 2}',
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_no_server_errors(client, route, body):
    response = client.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    payload = response.json()
    if response.status_code >= 400:
        assert ("error" in payload) if "/v1/" in route else (payload["success"] is False and payload["errors"])


def test_server_still_answers(client):
    assert client.post(run_url(), json={"prompt": "Say hi.", "max_tokens": 2}).status_code == 200
