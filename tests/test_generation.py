"""Generation semantics over HTTP: templates, raw mode, every sampling parameter, limits and determinism."""

from __future__ import annotations

import pytest
from conftest import TEST_CTX, run_url
from test_contract import assert_error, assert_ok, counts

# SmolLM2's own template (from its GGUF) adds this system turn when the conversation has none.
SMOL_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
STORY = "Once upon a time, in a small village by the sea, there"


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns) + "<|im_start|>assistant\n"


def run(client, **body) -> dict:
    return assert_ok(client.post(run_url(), json=body))


def test_prompt_mode_renders_the_models_template_with_prompt_as_user_turn(client):
    templated = run(client, prompt="Name a colour.", temperature=0, max_tokens=16)
    raw = run(
        client, prompt=SMOL_DEFAULT_SYSTEM + chatml(("user", "Name a colour.")), raw=True, temperature=0, max_tokens=16
    )
    assert templated["response"] == raw["response"]
    assert counts(templated["usage"]) == counts(raw["usage"])
    assert templated["response"].strip()


def test_raw_sends_the_prompt_verbatim(client):
    raw = run(client, prompt="Name a colour.", raw=True, temperature=0, max_tokens=16)
    templated = run(client, prompt="Name a colour.", temperature=0, max_tokens=16)
    # Four words alone are a handful of tokens; the templated form adds the system and header turns.
    assert raw["usage"]["prompt_tokens"] < 8 < templated["usage"]["prompt_tokens"]


def test_messages_mode_renders_every_role(client):
    turns = [
        ("system", "You answer in one word."),
        ("user", "What is 2+2?"),
        ("assistant", "Four."),
        ("tool", '{"result": 4}'),
        ("user", "And 3+3?"),
    ]
    messages = run(client, messages=[{"role": r, "content": c} for r, c in turns], temperature=0, max_tokens=12)
    raw = run(client, prompt=chatml(*turns), raw=True, temperature=0, max_tokens=12)
    assert messages["response"] == raw["response"]
    assert counts(messages["usage"]) == counts(raw["usage"])


def test_usage_adds_up(client):
    result = run(client, prompt="Say hi.", max_tokens=5)
    usage = result["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 5
    assert result["tool_calls"] == []


def test_temperature_zero_is_greedy_whatever_the_seed(client):
    outputs = {run(client, prompt=STORY, raw=True, temperature=0, seed=s, max_tokens=24)["response"] for s in (1, 2, 3)}
    outputs.add(run(client, prompt=STORY, raw=True, temperature=0, max_tokens=24)["response"])
    assert len(outputs) == 1


def test_no_seed_differs_between_requests(client):
    outputs = {run(client, prompt=STORY, raw=True, temperature=1.2, max_tokens=32)["response"] for _ in range(3)}
    assert len(outputs) >= 2


def test_top_k_1_is_greedy_even_when_hot(client):
    greedy = run(client, prompt=STORY, raw=True, temperature=0, max_tokens=24)["response"]
    for seed in (1, 2):
        hot = run(client, prompt=STORY, raw=True, temperature=5, top_k=1, seed=seed, max_tokens=24)
        assert hot["response"] == greedy


def test_top_p_0_is_greedy_even_when_hot(client):
    greedy = run(client, prompt=STORY, raw=True, temperature=0, max_tokens=24)["response"]
    for seed in (1, 2):
        hot = run(client, prompt=STORY, raw=True, temperature=5, top_p=0, seed=seed, max_tokens=24)
        assert hot["response"] == greedy


def test_top_k_50_widens_the_choice(client):
    # Very hot sampling from the 50 best candidates wanders; from the single best it cannot.
    outputs = {
        run(client, prompt=STORY, raw=True, temperature=5, top_k=50, seed=s, max_tokens=16)["response"]
        for s in (1, 2, 3)
    }
    assert len(outputs) >= 2


@pytest.mark.parametrize("penalty", ["repetition_penalty", "frequency_penalty", "presence_penalty"])
def test_penalties_change_greedy_output(client, penalty):
    # A story, not the counting prompt: counting on is so sure that a presence penalty of 2 need not move it.
    plain = run(client, prompt=STORY, raw=True, temperature=0, max_tokens=40)["response"]
    penalised = run(client, prompt=STORY, raw=True, temperature=0, max_tokens=40, **{penalty: 2})["response"]
    assert penalised != plain


def test_neutral_penalties_change_nothing(client):
    plain = run(client, prompt=COUNTING, raw=True, temperature=0, max_tokens=40)["response"]
    neutral = run(
        client,
        prompt=COUNTING,
        raw=True,
        temperature=0,
        max_tokens=40,
        repetition_penalty=1,
        frequency_penalty=0,
        presence_penalty=0,
    )["response"]
    assert neutral == plain


def test_max_tokens_is_clamped_to_the_context(client):
    long_prompt = "word " * 900
    result = run(client, prompt=long_prompt, raw=True, temperature=0, max_tokens=100_000)
    usage = result["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= TEST_CTX


def test_prompt_beyond_the_context_is_refused_before_any_work(client):
    for stream in (False, True):
        response = client.post(run_url(), json={"prompt": "word " * 5000, "raw": True, "stream": stream})
        assert_error(response, 400, 5006, "context window holds", str(TEST_CTX))


def test_image_is_accepted_and_ignored(client):
    with_image = run(client, prompt="Say hi.", temperature=0, max_tokens=6, image=[0, 255, 128])
    without = run(client, prompt="Say hi.", temperature=0, max_tokens=6)
    assert with_image["response"] == without["response"]
