"""The official `cloudflare` Python SDK, unmodified, pointed at the local server."""

from __future__ import annotations

import json

import cloudflare
import pytest
from cloudflare import AsyncCloudflare, Cloudflare
from conftest import MODEL
from test_contract import counts

ACCOUNT = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def sdk(server):
    # The SDK percent-encodes the model's slashes (@cf%2Fmeta%2F...), which the server must route.
    with Cloudflare(api_token="local-token", base_url=f"{server.url}/client/v4", max_retries=0) as cf:
        yield cf


def test_run_with_messages(sdk):
    result = sdk.ai.run(
        MODEL,
        account_id=ACCOUNT,
        messages=[
            {"role": "system", "content": "You are a friendly assistant"},
            {"role": "user", "content": "Why is pizza so good"},
        ],
        max_tokens=16,
    )
    assert isinstance(result["response"], str) and result["response"]
    assert 1 <= result["usage"]["completion_tokens"] <= 16


def test_run_with_prompt_and_sampling(sdk):
    kwargs = dict(account_id=ACCOUNT, prompt="Tell me all about PEP-8", max_tokens=12, temperature=0.7, seed=42)
    first = sdk.ai.run(MODEL, **kwargs, top_k=20, top_p=0.9, repetition_penalty=1.1)
    second = sdk.ai.run(MODEL, **kwargs, top_k=20, top_p=0.9, repetition_penalty=1.1)
    assert first["response"] == second["response"]


def test_bad_input_raises_with_the_envelope(sdk):
    with pytest.raises(cloudflare.BadRequestError) as caught:
        sdk.ai.run(MODEL, account_id=ACCOUNT, prompt="x", temperature=9)
    error = caught.value.body["errors"][0] if isinstance(caught.value.body, dict) else caught.value.body[0]
    assert error["code"] == 5006
    assert "'/temperature' must be <= 5" in error["message"]


def test_unknown_model_raises(sdk):
    with pytest.raises(cloudflare.BadRequestError) as caught:
        sdk.ai.run("@cf/nobody/no-model", account_id=ACCOUNT, prompt="x")
    assert "5007" in str(caught.value) or "No such model" in str(caught.value)


def test_streaming_through_the_sdk(sdk):
    with sdk.ai.with_streaming_response.run(
        MODEL, account_id=ACCOUNT, prompt="Count to five.", stream=True, max_tokens=12, temperature=0
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    streamed = "".join(event["response"] for event in events)
    whole = sdk.ai.run(MODEL, account_id=ACCOUNT, prompt="Count to five.", max_tokens=12, temperature=0)
    assert streamed == whole["response"]
    assert counts(events[-1]["usage"]) == counts(whole["usage"])


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_async_client(server):
    async with AsyncCloudflare(api_token="local-token", base_url=f"{server.url}/client/v4", max_retries=0) as cf:
        result = await cf.ai.run(MODEL, account_id=ACCOUNT, prompt="Say hi.", max_tokens=4)
    assert result["usage"]["completion_tokens"] <= 4
