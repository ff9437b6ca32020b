"""LoRA adapters for the embedded model, built here for real: GGUF files by name, and PEFT fine-tunes uploaded
through Workers AI's routes."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cloudflare import Cloudflare
from conftest import MODEL, run_url
from safetensors.numpy import save as save_bytes
from test_contract import assert_error, assert_ok

from workers_ai_local.adapters import BaseShape, peft_to_gguf

# SmolLM2-135M: 30 layers, 576-wide, 9 query heads and 3 key/value heads of 64.
LAYERS, EMBED, HEADS, KV_HEADS = 30, 576, 9, 3
KV_WIDTH = KV_HEADS * EMBED // HEADS
PROMPT = {"prompt": "Once upon a time", "raw": True, "temperature": 0, "max_tokens": 24}


def peft_adapter(rank: int = 4, b_scale: float = 0.0, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """A PEFT LoRA on q_proj, k_proj and v_proj of every layer; B = 0 makes it a no-op."""
    rng = np.random.default_rng(seed)
    config = {"peft_type": "LORA", "model_type": "llama", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": ["q_proj", "k_proj", "v_proj"]}  # fmt: skip
    tensors = {}
    for layer in range(LAYERS):
        for module, width in (("q_proj", EMBED), ("k_proj", KV_WIDTH), ("v_proj", KV_WIDTH)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, 0.5, (rank, EMBED)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (b_scale * rng.normal(0, 1, (width, rank))).astype(np.float32)
    return config, tensors


def install(lora_dir: Path, name: str, b_scale: float) -> None:
    config, tensors = peft_adapter(b_scale=b_scale)
    peft_to_gguf(config, tensors, BaseShape(HEADS, KV_HEADS), lora_dir / f"{name}.gguf")


@pytest.fixture(scope="module")
def adapters(lora_dir):
    install(lora_dir, "zero", 0.0)
    install(lora_dir, "strong", 0.3)
    return lora_dir


def test_zero_adapter_changes_nothing_and_a_real_one_does(client, adapters):
    base = assert_ok(client.post(run_url(), json=PROMPT))["response"]
    zero = assert_ok(client.post(run_url(), json={**PROMPT, "lora": "zero"}))["response"]
    strong = assert_ok(client.post(run_url(), json={**PROMPT, "lora": "strong"}))["response"]
    assert zero == base
    assert strong != base
    # The adapter applied to that request alone: the base model answers as before afterwards.
    assert assert_ok(client.post(run_url(), json=PROMPT))["response"] == base


def test_mixed_adapters_in_one_batch_each_get_their_own(client, adapters):
    bodies = [PROMPT, {**PROMPT, "lora": "strong"}, PROMPT, {**PROMPT, "lora": "strong"}]
    alone = [assert_ok(client.post(run_url(), json=b))["response"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: assert_ok(client.post(run_url(), json=b))["response"], bodies))
    # Requests without an adapter never share a decode call with adapted ones, so they are untouched...
    assert together[0] == together[2] == alone[0]
    # ...and adapted ones are adapted. (Two adapted requests batched together are not bit-identical to one
    # alone: llama.cpp multiplies the f32 adapter matrices with different kernels for different batch sizes.)
    assert together[1] != alone[0] and together[3] != alone[0]


def test_unknown_adapter(client):
    assert_error(client.post(run_url(), json={**PROMPT, "lora": "no-such"}), 404, 3042, "no-such")
    assert_error(client.post(run_url(), json={**PROMPT, "lora": "../etc/passwd"}), 404, 3042)


def finetunes_url(account: str = "acc") -> str:
    return f"/client/v4/accounts/{account}/ai/finetunes"


def upload(client, finetune: str, file_name: str, data: bytes):
    return client.post(
        f"{finetunes_url()}/{finetune}/finetune-assets",
        data={"file_name": file_name},
        files={"file": (file_name, data, "application/octet-stream")},
    )


def test_peft_finetune_round_trip(client, server):
    created = assert_ok(client.post(finetunes_url(), json={"model": MODEL, "name": "pirate", "description": "arr"}))
    assert created["name"] == "pirate" and created["model"] == MODEL and len(created["id"]) == 36
    # Not usable until both assets are in.
    assert_error(client.post(run_url(), json={**PROMPT, "lora": "pirate"}), 400, 3039, "missing required files")

    config, tensors = peft_adapter(b_scale=0.3, seed=7)
    assert_error(upload(client, "pirate", "weights.bin", b"x"), 400, 3039, "file_name")
    assert_ok(upload(client, "pirate", "adapter_config.json", json.dumps(config).encode()))
    assert_error(upload(client, "pirate", "adapter_config.json", b"{}"), 409, 5006, "cannot be replaced")
    assert_ok(upload(client, created["id"], "adapter_model.safetensors", save_bytes(tensors)))

    listed = assert_ok(client.get(finetunes_url()))
    assert {"id": created["id"], "name": "pirate"}.items() <= next(f for f in listed if f["name"] == "pirate").items()

    base = assert_ok(client.post(run_url(), json=PROMPT))["response"]
    by_name = assert_ok(client.post(run_url(), json={**PROMPT, "lora": "pirate"}))["response"]
    by_id = assert_ok(client.post(run_url(), json={**PROMPT, "lora": created["id"]}))["response"]
    assert by_name == by_id != base

    # The official SDK's run takes the fine-tune by name too.
    cf = Cloudflare(api_token="local", base_url=f"{server.url}/client/v4", max_retries=0)
    assert cf.ai.run(MODEL, account_id="acc", lora="pirate", **PROMPT)["response"] == by_name


def test_finetune_errors(client):
    assert_error(client.post(finetunes_url(), json={"model": "@cf/none/none", "name": "x"}), 400, 5007)
    assert_error(client.post(finetunes_url(), json={"model": MODEL}), 400, 5006, "'name'")
    assert_ok(client.post(finetunes_url(), json={"model": MODEL, "name": "twice"}))
    assert_error(client.post(finetunes_url(), json={"model": MODEL, "name": "twice"}), 409, 5006, "exists")
    assert_error(upload(client, "nobody", "adapter_config.json", b"{}"), 404, 3042)
    too_wide = json.dumps({"model_type": "llama", "r": 64}).encode()
    assert_ok(client.post(finetunes_url(), json={"model": MODEL, "name": "wide"}))
    assert_error(upload(client, "wide", "adapter_config.json", too_wide), 400, 5006, "rank")
    assert_ok(client.post(finetunes_url(), json={"model": MODEL, "name": "broken"}))
    assert_ok(upload(client, "broken", "adapter_config.json", b'{"r": 4}'))
    assert_error(upload(client, "broken", "adapter_model.safetensors", b"not safetensors"), 400, 5006, "safetensors")


def created(client, name: str) -> None:
    assert_ok(client.post(finetunes_url(), json={"model": MODEL, "name": name}))


GOOD_CONFIG = {"peft_type": "LORA", "model_type": "llama", "r": 4, "lora_alpha": 8}


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (b'{"model_type": "llama", "r": "abc"}', "r must be an integer"),
        (b'{"model_type": "llama", "r": NaN}', "NaN"),
        (b'{"model_type": "llama", "r": null}', "r must be an integer"),
        (b'{"model_type": "llama", "r": 4.5}', "r must be an integer"),
        (b'{"model_type": "llama", "r": 0}', "outside 1 to 32"),
        (b'{"model_type": "llama", "r": true}', "r must be an integer"),
        (b'{"model_type": "llama", "r": 4, "lora_alpha": "abc"}', "lora_alpha must be a finite number"),
        (b'{"model_type": "llama", "r": 4, "lora_alpha": Infinity}', "Infinity"),
        (b'{"r": 4, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "levels deep"),
        (b"[4]", "must be a JSON object"),
    ],
    ids=["r-abc", "r-nan", "r-null", "r-fraction", "r-0", "r-bool", "alpha-abc", "alpha-inf", "deep", "array"],
)
def test_a_refused_config_leaves_the_finetune_as_it_was(client, config, needle):
    name = f"cfg-{abs(hash(config)) % 10**8}"
    created(client, name)
    assert_error(upload(client, name, "adapter_config.json", config), 400, 5006, needle)
    # Nothing was kept: the corrected config is taken, and with its weights the fine-tune runs.
    assert_ok(upload(client, name, "adapter_config.json", json.dumps(GOOD_CONFIG).encode()))
    _, tensors = peft_adapter(b_scale=0.3)
    assert_ok(upload(client, name, "adapter_model.safetensors", save_bytes(tensors)))
    assert_ok(client.post(run_url(), json={**PROMPT, "max_tokens": 2, "lora": name}))


def bad_weights() -> dict[str, tuple[dict[str, np.ndarray], str]]:
    _, good = peft_adapter()
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    q_b = q_a.replace("lora_A", "lora_B")
    nan = dict(good)
    nan[q_b] = good[q_b].copy()
    nan[q_b][3, 1] = np.nan
    inf = dict(good)
    inf[q_a] = good[q_a].copy()
    inf[q_a][0, 0] = np.inf
    return {
        "rank-mismatch": (peft_adapter(rank=8)[1], "r=4"),
        "rank-256": (peft_adapter(rank=256)[1], "rank 256"),
        "rank-0": ({q_a: np.zeros((0, EMBED), np.float32), q_b: np.zeros((EMBED, 0), np.float32)}, "rank 0"),
        "width-100": ({**good, q_a: np.zeros((4, 100), np.float32)}, "[4, 576]"),
        "layer-9999": (
            {**good, q_a.replace(".0.", ".9999."): good[q_a], q_b.replace(".0.", ".9999."): good[q_b]},
            "layer 9999",
        ),
        "no-lora-B": ({k: v for k, v in good.items() if k != q_b}, "lacks lora_A or lora_B"),
        "unknown-tensor": ({**good, "model.embed_tokens.weight": np.zeros((4, 4), np.float32)}, "unsupported tensor"),
        "nan": (nan, "NaN"),
        "inf": (inf, "infinite"),
        "int-dtype": ({**good, q_a: good[q_a].astype(np.int32)}, "I32"),
        "mixed-ranks": (
            {**good, q_a: np.zeros((8, EMBED), np.float32), q_b: np.zeros((EMBED, 8), np.float32)},
            "different ranks",
        ),
    }


def test_refused_weights_leave_the_finetune_as_it_was(client):
    created(client, "shapes")
    assert_ok(upload(client, "shapes", "adapter_config.json", json.dumps(GOOD_CONFIG).encode()))
    for label, (tensors, needle) in bad_weights().items():
        response = upload(client, "shapes", "adapter_model.safetensors", save_bytes(tensors))
        assert_error(response, 400, 5006, needle)
        assert label and "missing required files" in client.post(run_url(), json={**PROMPT, "lora": "shapes"}).text
    assert_error(upload(client, "shapes", "adapter_model.safetensors", b"\x08" + bytes(20)), 400, 5006, "safetensors")
    # Each refusal left the fine-tune as it was: correct weights are taken, and it runs.
    _, tensors = peft_adapter(b_scale=0.3, seed=3)
    assert_ok(upload(client, "shapes", "adapter_model.safetensors", save_bytes(tensors)))
    assert_ok(client.post(run_url(), json={**PROMPT, "max_tokens": 2, "lora": "shapes"}))
    # A kept asset is not replaced (Workers AI's rule): a new fine-tune is made instead.
    assert_error(upload(client, "shapes", "adapter_model.safetensors", save_bytes(tensors)), 409, 5006, "replaced")


def test_weights_first_then_a_config_that_disagrees(client):
    created(client, "weights-first")
    _, tensors = peft_adapter(rank=4, b_scale=0.3)
    assert_ok(upload(client, "weights-first", "adapter_model.safetensors", save_bytes(tensors)))
    wrong = json.dumps({**GOOD_CONFIG, "r": 16}).encode()
    assert_error(upload(client, "weights-first", "adapter_config.json", wrong), 400, 5006, "r=16", "rank 4")
    assert_ok(upload(client, "weights-first", "adapter_config.json", json.dumps(GOOD_CONFIG).encode()))
    assert_ok(client.post(run_url(), json={**PROMPT, "max_tokens": 2, "lora": "weights-first"}))


def test_a_finetune_name_may_not_clash_with_an_installed_adapter(client, adapters):
    # `adapters` installed zero.gguf in the adapters directory.
    response = client.post(finetunes_url(), json={"model": MODEL, "name": "zero"})
    assert_error(response, 409, 5006, "installed adapter", "zero.gguf")
