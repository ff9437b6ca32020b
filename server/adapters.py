"""LoRA adapters: GGUF files in a directory, and Workers AI fine-tunes uploaded as PEFT and converted to GGUF.

Layout of the adapters directory:
    <name>.gguf                      an adapter dropped in by hand, used as "lora": "<name>"
    finetunes/<id>/finetune.json     a fine-tune made through the REST routes: id, name, model, description
    finetunes/<id>/adapter_config.json, adapter_model.safetensors   its PEFT assets, as uploaded
    finetunes/<id>/adapter.gguf      the GGUF conversion, made once both assets are in
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ASSET_FILES = (CONFIG_FILE, WEIGHTS_FILE)
MAX_RANK = 32  # Workers AI's stated limit for LoRA fine-tunes
MODEL_TYPES = ("llama", "mistral", "gemma")

# PEFT module names (Hugging Face Llama layout) and llama.cpp's tensor names for them.
_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_PEFT_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.default)?\.weight$")


class AdapterError(Exception):
    """A fine-tune or adapter that cannot be created, uploaded or converted; `code` is Workers AI's."""

    def __init__(self, code: int, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class BaseShape:
    """What the conversion needs to know of the base model."""

    n_head: int
    n_head_kv: int


def _rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    # Hugging Face Llama checkpoints order each head's query/key rows for "rotate half"; GGUF orders them for
    # interleaved RoPE. A LoRA's B matrix produces those rows, so it is reordered the same way.
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def peft_to_gguf(config: dict[str, Any], tensors: dict[str, np.ndarray], base: BaseShape, out: Path) -> None:
    """Write a PEFT LoRA (config and tensors) as a llama.cpp GGUF LoRA adapter."""
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _PEFT_KEY.match(key)
        if not match or match.group(2) not in _MODULES:
            raise AdapterError(3039, f"{WEIGHTS_FILE}: unsupported tensor {key!r} (expected Llama attention/MLP LoRA)")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        pairs.setdefault((layer, module), {})[which] = value.astype(np.float32)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(3039, f"{WEIGHTS_FILE}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if module == "self_attn.q_proj":
            b = _rope_permute(b, base.n_head)
        elif module == "self_attn.k_proj":
            b = _rope_permute(b, base.n_head_kv)
        name = f"blk.{layer}.{_MODULES[module]}.weight"
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclass
class Finetune:
    id: str
    name: str
    model: str
    description: str
    created_at: str
    modified_at: str

    def payload(self) -> dict[str, Any]:
        return {**asdict(self), "public": False}


class AdapterStore:
    def __init__(self, directory: Path, served_models: set[str], base: Callable[[], BaseShape | None]) -> None:
        """`base` tells the served model's shape, or None while it loads; conversions need it."""
        self.directory = directory
        self.served_models = served_models
        self.base = base
        self._lock = threading.Lock()

    @property
    def _finetunes_dir(self) -> Path:
        return self.directory / "finetunes"

    def resolve(self, name: str) -> Path | None:
        """The GGUF adapter for a `lora` value: a fine-tune's id or name, or a dropped-in <name>.gguf."""
        finetune = self.finetune(name)
        if finetune is not None:
            path = self._finetunes_dir / finetune.id / "adapter.gguf"
            if not path.is_file():
                raise AdapterError(
                    3039, f"fine-tune {name!r} is missing required files: upload {', '.join(ASSET_FILES)}"
                )
            return path
        # Not a file name (a separator, longer than a file system allows): no adapter can be named so.
        if "/" in name or name.startswith(".") or len(f"{name}.gguf".encode()) > 255:
            return None
        path = self.directory / f"{name}.gguf"
        return path if path.is_file() else None

    def finetunes(self) -> list[Finetune]:
        if not self._finetunes_dir.is_dir():
            return []
        found = []
        for meta in sorted(self._finetunes_dir.glob("*/finetune.json")):
            found.append(Finetune(**json.loads(meta.read_text())))
        return sorted(found, key=lambda f: f.created_at)

    def finetune(self, id_or_name: str) -> Finetune | None:
        return next((f for f in self.finetunes() if id_or_name in (f.id, f.name)), None)

    def create(self, model: str, name: str, description: str) -> Finetune:
        if model not in self.served_models:
            raise AdapterError(5007, f"No such model {model}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise AdapterError(5006, "name must be 1-64 letters, digits, '.', '_' or '-'")
        with self._lock:
            if self.finetune(name) is not None:
                raise AdapterError(5006, f"a fine-tune named {name!r} exists already", status=409)
            now = datetime.now(UTC).isoformat()
            finetune = Finetune(str(uuid.uuid4()), name, model, description, now, now)
            folder = self._finetunes_dir / finetune.id
            folder.mkdir(parents=True)
            (folder / "finetune.json").write_text(json.dumps(asdict(finetune)))
        return finetune

    def upload(self, id_or_name: str, file_name: str, data: bytes) -> Finetune:
        finetune = self.finetune(id_or_name)
        if finetune is None:
            raise AdapterError(3042, f"no fine-tune {id_or_name!r}", status=404)
        if file_name not in ASSET_FILES:
            raise AdapterError(3039, f"file_name must be {CONFIG_FILE} or {WEIGHTS_FILE}, not {file_name!r}")
        folder = self._finetunes_dir / finetune.id
        with self._lock:
            target = folder / file_name
            if target.exists():
                raise AdapterError(5006, f"{file_name} was uploaded already; assets cannot be replaced", status=409)
            if file_name == CONFIG_FILE:
                self._check_config(data)
            target.write_bytes(data)
            if all((folder / f).is_file() for f in ASSET_FILES):
                self._convert(folder)
        return finetune

    @staticmethod
    def _check_config(data: bytes) -> None:
        try:
            config = json.loads(data)
        except ValueError as exc:
            raise AdapterError(5006, f"{CONFIG_FILE} is not JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise AdapterError(5006, f"{CONFIG_FILE} must be a JSON object")
        if config.get("model_type", "llama") not in MODEL_TYPES:
            raise AdapterError(5006, f"{CONFIG_FILE}: model_type must be one of {', '.join(MODEL_TYPES)}")
        if int(config.get("r", 0)) > MAX_RANK:
            raise AdapterError(5006, f"{CONFIG_FILE}: rank r={config['r']} is over the limit of {MAX_RANK}")

    def _convert(self, folder: Path) -> None:
        base = self.base()
        if base is None:
            (folder / WEIGHTS_FILE).unlink()
            raise AdapterError(3040, "the model is still loading; upload again once it is ready", status=503)
        config = json.loads((folder / CONFIG_FILE).read_text())
        try:
            tensors = load_file(str(folder / WEIGHTS_FILE))
        except Exception as exc:  # safetensors raises its own error types for malformed files
            (folder / WEIGHTS_FILE).unlink()
            raise AdapterError(5006, f"{WEIGHTS_FILE} is not a safetensors file: {exc}") from exc
        out = folder / "adapter.gguf"
        try:
            peft_to_gguf(config, tensors, base, out)
        except AdapterError:
            (folder / WEIGHTS_FILE).unlink()
            out.unlink(missing_ok=True)
            raise
