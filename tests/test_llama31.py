"""Llama 3.1 as the server meets it, without its weights: stand-in models (models/llama31_standin.py) with the real
vocabulary, merges, special tokens, chat template, trained context and rope_freqs, checked over HTTP against Meta's
own tokenizer and the template rendered the Hugging Face way. A scripted stand-in, whose greedy output is set by
its weights, forces each end-of-generation token and each shape of Llama 3.1's native tool calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MODEL, STANDIN_CACHE, ServerProcess
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama31_standin import load_manifest, scripted, tiny
from llama_models.llama3.tokenizer import Tokenizer
from surfaces import SURFACES
from test_contract import assert_ok

TEMPLATE_DEFAULT_DATE = "26 Jul 2024"  # the Llama 3.1 template's own, used unless --chat-date says otherwise
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city"}},
        "required": ["city"],
    },
}


def start(folder: Path, model: Path, *args: str) -> ServerProcess:
    return ServerProcess(folder / "server.log", "--model", str(model), "--ctx-size", "4096", "--parallel", "2", *args)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start(tmp_path_factory.mktemp("llama31"), tiny(STANDIN_CACHE))
    with proc:
        yield proc


@pytest.fixture(scope="module")
def meta() -> Tokenizer:
    return Tokenizer.get_instance()


def hugging_face_render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The chat template as transformers' apply_chat_template renders it, independently of the server's code."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    template = env.from_string((STANDIN_CACHE / "sources" / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text())
    template_tools = [{"type": "function", "function": tool} for tool in tools] if tools else None
    return template.render(
        messages=messages, tools=template_tools, add_generation_prompt=True, bos_token="<|begin_of_text|>"
    )


def tokenize(url: str, body: dict[str, Any]) -> dict[str, Any]:
    return assert_ok(httpx.post(f"{url}/ai/tokenize/{MODEL}", json=body, timeout=60))


PARIS_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
CONVERSATIONS = {
    "user": ([{"role": "user", "content": "What is the origin of the phrase Hello, World?"}], None),
    "system-user-assistant": (
        [
            {"role": "system", "content": "You are a friendly assistant"},
            {"role": "user", "content": "Name a colour. Réponds en français 🙂"},
            {"role": "assistant", "content": "Bleu."},
            {"role": "user", "content": "And another?"},
        ],
        None,
    ),
    "tools": ([{"role": "user", "content": "What is the weather in Paris?"}], [WEATHER]),
    "tool-result": (
        [
            {"role": "system", "content": "Answer with the tools' help."},
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
            },
            {"role": "tool", "content": '{"temperature_c": 21}'},
        ],
        [WEATHER],
    ),
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_prompt_tokens_equal_metas_tokenizer_over_the_hugging_face_rendering(llama, meta, name):
    messages, tools = CONVERSATIONS[name]
    body = {"messages": messages, **({"tools": tools} if tools else {})}
    served = tokenize(llama.url, body)
    # Hugging Face's templates see a call as {"type": "function", "function": {"name", "arguments"}}.
    hf_messages = [
        {**m, "tool_calls": [{"type": "function", "function": c} for c in m["tool_calls"]]} if "tool_calls" in m else m
        for m in messages
    ]
    expected = hugging_face_render(hf_messages, tools)
    assert served["prompt"] == expected
    assert served["tokens"] == meta.encode(expected, bos=False, eos=False, allowed_special="all")
    assert served["tokens"].count(128000) == 1 and served["tokens"][0] == 128000
    answer = assert_ok(httpx.post(f"{llama.url}/ai/run/{MODEL}", json={**body, "max_tokens": 1}, timeout=60))
    assert answer["usage"]["prompt_tokens"] == len(served["tokens"])


def test_a_tool_result_is_the_templates_ipython_turn(llama):
    messages, tools = CONVERSATIONS["tool-result"]
    prompt = tokenize(llama.url, {"messages": messages, "tools": tools})["prompt"]
    # Llama 3.1's template passes a result through tojson when Jinja finds it iterable, as a string is: Hugging
    # Face renders it so too (the token comparison above), quotes and escapes included.
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temperature_c\\": 21}"<|eot_id|>' in prompt
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in prompt


def test_the_same_request_gives_the_same_prompt_on_any_day(llama, tmp_path):
    prompt = tokenize(llama.url, {"messages": CONVERSATIONS["user"][0]})["prompt"]
    assert f"Today Date: {TEMPLATE_DEFAULT_DATE}\n" in prompt
    dated = start(tmp_path, tiny(STANDIN_CACHE), "--chat-date", "1 Jan 2030").wait_ready()
    try:
        assert "Today Date: 1 Jan 2030\n" in tokenize(dated.url, {"messages": CONVERSATIONS["user"][0]})["prompt"]
    finally:
        dated.stop()


def test_raw_mode_never_doubles_bos_and_llama_cpp_never_warns(llama):
    for raw in ("<|begin_of_text|>Hello", "Hello"):
        tokens = tokenize(llama.url, {"prompt": raw, "raw": True})["tokens"]
        assert tokens[0] == 128000 and tokens.count(128000) == 1, tokens
        assert_ok(httpx.post(f"{llama.url}/ai/run/{MODEL}", json={"prompt": raw, "raw": True, "max_tokens": 2}))
    for messages, tools in CONVERSATIONS.values():
        body = {"messages": messages, **({"tools": tools} if tools else {}), "max_tokens": 2}
        assert_ok(httpx.post(f"{llama.url}/ai/run/{MODEL}", json=body, timeout=60))
    assert "BOS" not in llama.log(), "llama.cpp warned about BOS tokens"


STOCK = {
    "name": "get_stock_price",
    "description": "Stock price for a ticker",
    "parameters": {
        "type": "object",
        "properties": {"ticker": {"type": "string", "description": "The ticker"}},
        "required": ["ticker"],
    },
}


def test_a_tools_request_draws_what_its_prompt_draws_raw_unless_it_opens_a_call(llama):
    # The tool grammar holds only an answer that opens a call: text, whitespace first included, is the model's own.
    # This prompt's greedy answer opens with a space; a text branch that forbade it made the model answer otherwise.
    body = {"messages": [{"role": "user", "content": "please about ocean?"}], "tools": [WEATHER, STOCK]}
    prompt = tokenize(llama.url, body)
    greedy = {"temperature": 0, "max_tokens": 12}
    raw = assert_ok(
        httpx.post(f"{llama.url}/ai/run/{MODEL}", json={"prompt": prompt["prompt"], "raw": True, **greedy}, timeout=60)
    )
    tools = assert_ok(httpx.post(f"{llama.url}/ai/run/{MODEL}", json={**body, **greedy}, timeout=60))
    assert raw["usage"]["prompt_tokens"] == tools["usage"]["prompt_tokens"] == len(prompt["tokens"])
    assert raw["response"][0] == " " and raw["response"].strip(), raw
    assert (tools["response"], tools["tool_calls"]) == (raw["response"], [])


def test_the_stand_in_has_the_real_models_context_and_shape(llama):
    health = httpx.get(llama.url + "/health").json()
    assert health["context_window"] == 4096
    found = httpx.get(f"{llama.url}/client/v4/accounts/a/ai/models/search").json()["result"][0]
    # The catalog reports the served context: the trained 131072 clamped by --ctx-size here.
    assert {"property_id": "context_window", "value": "4096"} in found["properties"]


# -- the scripted stand-in: greedy output chosen by its weights -------------------------------------------------------


@pytest.fixture(scope="module")
def scripted_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, Any]]]:
    model = scripted(STANDIN_CACHE)
    scripts = {script.target_text: script for script in load_manifest(model)}
    proc = start(tmp_path_factory.mktemp("scripted"), model)
    with proc:
        yield proc, scripts


@pytest.mark.parametrize(
    ("prompt", "target"),
    [
        ("Say something plain", "The sky is blue."),  # ends with <|eot_id|>
        ("Send a message", "Let me look that up."),  # ends with <|eom_id|>
        ("Tell me a story", "Once upon a time, there was a llama."),  # ends with <|end_of_text|>
        ("Say it in unicode", "Olá, café ☕ — 🦙!"),
    ],
)
def test_each_end_of_generation_token_ends_the_answer_and_never_shows(scripted_llama, prompt, target):
    server, scripts = scripted_llama
    script = scripts[target]
    assert tokenize(server.url, {"prompt": prompt, "raw": True})["tokens"][-1] == script.trigger
    body = {"prompt": prompt, "raw": True, "temperature": 0, "max_tokens": 64}
    for surface in SURFACES:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for reply in (surface.complete(http, body), surface.stream(http, body)):
                assert reply.text == target, (surface, reply.text)
                assert reply.finish_reason == "stop"
                assert reply.usage["completion_tokens"] == len(script.tokens)


def test_a_templated_request_is_answered_from_the_generation_prompt(scripted_llama):
    server, _ = scripted_llama
    answer = assert_ok(httpx.post(f"{server.url}/ai/run/{MODEL}", json={"prompt": "Hi", "temperature": 0}))
    assert answer["response"] == "Hello! How can I help you today?"


# -- Llama 3.1's native tool calls, as the model writes them --------------------------------------------------------

TIME = {
    "name": "get_time",
    "description": "The time in a zone",
    "parameters": {
        "type": "object",
        "properties": {"zone": {"type": "string", "description": "A time zone"}},
        "required": ["zone"],
    },
}
WEATHER_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
TIME_CALL = '{"name": "get_time", "parameters": {"zone": "CET"}}'
NATIVE_ANSWERS = {
    # What the templated request's generation prompt (ending "\n\n") is answered with, and how the answer ends.
    "bare call": (WEATHER_CALL, "<|eot_id|>", [{"name": "get_weather", "arguments": {"city": "Paris"}}]),
    "python_tag call": (
        "<|python_tag|>" + WEATHER_CALL,
        "<|eom_id|>",
        [{"name": "get_weather", "arguments": {"city": "Paris"}}],
    ),
    "several calls": (
        f"{WEATHER_CALL}; {TIME_CALL}",
        "<|eot_id|>",
        [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"zone": "CET"}}],
    ),
}


@pytest.fixture(scope="module", params=list(NATIVE_ANSWERS))
def native_answer(request, tmp_path_factory) -> Iterator[tuple[ServerProcess, list[dict[str, Any]]]]:
    text, end, calls = NATIVE_ANSWERS[request.param]
    # Spelled as llama.cpp tokenizes it: the tool grammar's forced tokens are those, so the answer stays scripted.
    model = scripted(STANDIN_CACHE, [("\n\n", text, end)], spelling="canonical")
    proc = start(tmp_path_factory.mktemp("native"), model)
    with proc:
        yield proc, calls


def test_native_tool_calls_become_tool_calls_on_every_surface(native_answer):
    server, expected = native_answer
    body = {
        "messages": [{"role": "user", "content": "What is the weather in Paris, and the time there?"}],
        "tools": [WEATHER, TIME],
        "temperature": 0,
        "max_tokens": 80,
    }
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for surface in SURFACES:
            for reply in (surface.complete(http, body), surface.stream(http, body)):
                assert reply.tool_calls == expected, (surface, reply)
                assert reply.text == "" and reply.finish_reason == "tool_calls"
