"""Checks of a fine-tune's PEFT assets, complete before either is kept: an asset that passes converts to a GGUF
adapter that llama.cpp loads for the served model, and one that fails leaves nothing behind.

adapter_config.json: an object; `r` an integer rank of 1 to MAX_RANK; `lora_alpha` a finite number; `model_type`
one of Workers AI's. adapter_model.safetensors: every tensor a `lora_A`/`lora_B` of a known Llama module, of a
layer the model has, in pairs, with the shapes the model's widths and the rank give, float16 or float32, all
values finite; read one tensor at a time, so a check holds one tensor in memory, not the file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from .http_io import parse_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_RANK = 32  # Workers AI's stated limit for LoRA fine-tunes
MODEL_TYPES = ("llama", "mistral", "gemma")
DEFAULT_RANK = 8  # PEFT's LoraConfig default
FLOAT_TYPES = ("F16", "F32")

# PEFT module names (Hugging Face Llama layout) and llama.cpp's tensor names for them.
MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
PEFT_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.default)?\.weight$")


class AssetError(ValueError):
    """An asset that is refused; the message says which field or tensor, and why."""


@dataclass(frozen=True)
class BaseShape:
    """What the checks and the conversion need to know of the base model (0: not known)."""

    n_head: int
    n_head_kv: int
    n_layer: int = 0
    n_embd: int = 0
    n_ff: int = 0
    head_dim: int = 0

    def widths(self, module: str) -> tuple[int, int] | None:
        """(in, out) features of a module's weight, or None where the model's metadata does not tell them."""
        head = self.head_dim or (self.n_embd // self.n_head if self.n_head else 0)
        q, kv = self.n_head * head, self.n_head_kv * head
        widths = {
            "self_attn.q_proj": (self.n_embd, q),
            "self_attn.k_proj": (self.n_embd, kv),
            "self_attn.v_proj": (self.n_embd, kv),
            "self_attn.o_proj": (q, self.n_embd),
            "mlp.gate_proj": (self.n_embd, self.n_ff),
            "mlp.up_proj": (self.n_embd, self.n_ff),
            "mlp.down_proj": (self.n_ff, self.n_embd),
        }[module]
        return widths if all(widths) else None


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float


def check_config(data: bytes) -> AdapterConfig:
    try:
        config = parse_json(data, CONFIG_FILE, max_depth=32, constants=False)
    except ValueError as exc:
        raise AssetError(str(exc)) from exc
    if not isinstance(config, dict):
        raise AssetError(f"{CONFIG_FILE} must be a JSON object")
    return config_fields(config)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def config_fields(config: dict[str, Any]) -> AdapterConfig:
    if config.get("model_type", "llama") not in MODEL_TYPES:
        raise AssetError(f"{CONFIG_FILE}: model_type must be one of {', '.join(MODEL_TYPES)}")
    rank = config.get("r", DEFAULT_RANK)
    if not (_number(rank) and math.isfinite(rank) and rank == int(rank)):
        raise AssetError(f"{CONFIG_FILE}: r must be an integer rank, not {rank!r}")
    if not 1 <= rank <= MAX_RANK:
        raise AssetError(f"{CONFIG_FILE}: rank r={rank} is outside 1 to {MAX_RANK}, the limit")
    alpha = config.get("lora_alpha", rank)
    if not (_number(alpha) and math.isfinite(alpha)):
        raise AssetError(f"{CONFIG_FILE}: lora_alpha must be a finite number, not {alpha!r}")
    if config.get("use_dora"):
        raise AssetError(f"{CONFIG_FILE}: DoRA adapters (use_dora) are not supported, only LoRA")
    return AdapterConfig(int(rank), float(alpha))


def check_weights(path: Path, base: BaseShape) -> int:
    """The rank of the adapter in `path`, once every tensor passed; AssetError otherwise."""
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise AssetError(f"{WEIGHTS_FILE} is not a safetensors file: {exc}") from exc
    with handle as weights:
        keys = list(weights.keys())
        if not keys:
            raise AssetError(f"{WEIGHTS_FILE} holds no tensors")
        most = (base.n_layer or 1_000) * len(MODULES) * 2
        if len(keys) > most:
            raise AssetError(f"{WEIGHTS_FILE} holds {len(keys)} tensors; a LoRA of this model has at most {most}")
        pairs: dict[tuple[int, str], set[str]] = {}
        ranks: set[int] = set()
        for key in keys:
            match = PEFT_KEY.match(key)
            if not match or match.group(2) not in MODULES:
                raise AssetError(f"{WEIGHTS_FILE}: unsupported tensor {key!r} (expected Llama attention/MLP LoRA)")
            layer, module, which = int(match.group(1)), match.group(2), match.group(3)
            if base.n_layer and layer >= base.n_layer:
                raise AssetError(f"{WEIGHTS_FILE}: {key!r} is for layer {layer}; the model has {base.n_layer} layers")
            tensor = weights.get_slice(key)
            dtype, shape = tensor.get_dtype(), tensor.get_shape()
            if dtype not in FLOAT_TYPES:
                raise AssetError(f"{WEIGHTS_FILE}: {key!r} is {dtype}; save the adapter as float16 or float32")
            if len(shape) != 2:
                raise AssetError(f"{WEIGHTS_FILE}: {key!r} has shape {shape}, not a matrix")
            rank = shape[0] if which == "A" else shape[1]
            if not 1 <= rank <= MAX_RANK:
                raise AssetError(f"{WEIGHTS_FILE}: {key!r} has rank {rank}, outside 1 to {MAX_RANK}")
            widths = base.widths(module)
            if widths is not None:
                expected = [rank, widths[0]] if which == "A" else [widths[1], rank]
                if list(shape) != expected:
                    raise AssetError(f"{WEIGHTS_FILE}: {key!r} has shape {list(shape)}; this model needs {expected}")
            ranks.add(rank)
            if len(ranks) > 1:
                raise AssetError(f"{WEIGHTS_FILE}: tensors of different ranks ({sorted(ranks)}); one adapter has one")
            sides = pairs.setdefault((layer, module), set())
            if which in sides:
                raise AssetError(f"{WEIGHTS_FILE}: two lora_{which} tensors for layer {layer} {module}")
            sides.add(which)
        for (layer, module), sides in sorted(pairs.items()):
            if sides != {"A", "B"}:
                raise AssetError(f"{WEIGHTS_FILE}: layer {layer} {module} lacks lora_A or lora_B")
        for key in keys:  # values last: one tensor in memory at a time
            if not np.isfinite(weights.get_tensor(key)).all():
                raise AssetError(f"{WEIGHTS_FILE}: {key!r} holds NaN or infinite values")
    return ranks.pop()


def check_pair(config: AdapterConfig, rank: int) -> None:
    if config.rank != rank:
        raise AssetError(
            f"{CONFIG_FILE} says r={config.rank} but the tensors of {WEIGHTS_FILE} have rank {rank}; "
            "assets cannot be replaced once kept: create a new fine-tune if the kept one is wrong"
        )
