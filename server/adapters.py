"""LoRA adapters: GGUF files in a directory, and Workers AI fine-tunes uploaded as PEFT and converted to GGUF.

Layout of the adapters directory:
    <name>.gguf                      an adapter dropped in by hand, used as "lora": "<name>"
    finetunes/<id>/finetune.json     a fine-tune made through the REST routes: id, name, model, description
    finetunes/<id>/adapter_config.json, adapter_model.safetensors   its PEFT assets, as uploaded
    finetunes/<id>/adapter.gguf      the GGUF conversion, made once both assets are in and checked

An upload is written beside its fine-tune under a temporary name, checked completely (adapter_checks) together
with the other asset if that is in, converted when both are, and only then renamed into place: a refused asset
leaves the fine-tune as it was. The GGUF appears last, so a fine-tune is usable exactly when it has one.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
from safetensors.numpy import load_file

from .adapter_checks import (
    CONFIG_FILE,
    MAX_RANK,
    MODULES,
    PEFT_KEY,
    WEIGHTS_FILE,
    AssetError,
    BaseShape,
    check_config,
    check_pair,
    check_weights,
    config_fields,
)

ASSET_FILES = (CONFIG_FILE, WEIGHTS_FILE)
GGUF_FILE = "adapter.gguf"
__all__ = ["MAX_RANK", "AdapterError", "AdapterStore", "BaseShape", "Finetune", "peft_to_gguf"]


class AdapterError(Exception):
    """A fine-tune or adapter that cannot be created, uploaded or converted; `code` is Workers AI's."""

    def __init__(self, code: int, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    # Hugging Face Llama checkpoints order each head's query/key rows for "rotate half"; GGUF orders them for
    # interleaved RoPE. A LoRA's B matrix produces those rows, so it is reordered the same way.
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def peft_to_gguf(config: dict[str, Any], tensors: dict[str, np.ndarray], base: BaseShape, out: Path) -> None:
    """Write a PEFT LoRA (config and tensors, checked by adapter_checks) as a llama.cpp GGUF LoRA adapter."""
    alpha = config_fields(config).alpha
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = PEFT_KEY.match(key)
        if not match or match.group(2) not in MODULES:
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
        name = f"blk.{layer}.{MODULES[module]}.weight"
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
        """`base` tells the served model's shape, or None while it loads; checks of weights need it."""
        self.directory = directory
        self.served_models = served_models
        self.base = base
        self._lock = threading.Lock()

    @property
    def _finetunes_dir(self) -> Path:
        return self.directory / "finetunes"

    def _installed(self, name: str) -> Path | None:
        # Not a file name (a separator, longer than a file system allows): no adapter can be named so.
        if "/" in name or name.startswith(".") or len(f"{name}.gguf".encode()) > 255:
            return None
        path = self.directory / f"{name}.gguf"
        return path if path.is_file() else None

    def resolve(self, name: str) -> Path | None:
        """The GGUF adapter for a `lora` value: a fine-tune's id or name, or a dropped-in <name>.gguf."""
        finetune = self.finetune(name)
        if finetune is not None:
            path = self._finetunes_dir / finetune.id / GGUF_FILE
            if not path.is_file():
                raise AdapterError(
                    3039, f"fine-tune {name!r} is missing required files: upload {', '.join(ASSET_FILES)}"
                )
            return path
        return self._installed(name)

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
            if self._installed(name) is not None:
                # "lora": name would then mean two adapters; the fine-tune would hide the installed file.
                raise AdapterError(
                    5006, f"an installed adapter is named {name!r} ({name}.gguf): choose another name", status=409
                )
            now = datetime.now(UTC).isoformat()
            finetune = Finetune(str(uuid.uuid4()), name, model, description, now, now)
            folder = self._finetunes_dir / finetune.id
            folder.mkdir(parents=True)
            (folder / "finetune.json").write_text(json.dumps(asdict(finetune)))
        return finetune

    def upload(self, id_or_name: str, file_name: str, source: BinaryIO) -> Finetune:
        """Keep `source` (a file, read from where it stands) as the asset `file_name` once it passed every check;
        blocking (file copies, checks, conversion): call it off the event loop."""
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
            staged = folder / f".{file_name}.upload"
            converted = folder / f".{GGUF_FILE}.upload"
            try:
                with staged.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                self._check_and_convert(folder, file_name, staged, converted)
                staged.replace(target)
                if converted.exists():
                    converted.replace(folder / GGUF_FILE)
            except AssetError as exc:
                raise AdapterError(5006, str(exc)) from exc
            finally:
                staged.unlink(missing_ok=True)
                converted.unlink(missing_ok=True)
        return finetune

    def _check_and_convert(self, folder: Path, file_name: str, staged: Path, converted: Path) -> None:
        config_path = staged if file_name == CONFIG_FILE else folder / CONFIG_FILE
        weights_path = staged if file_name == WEIGHTS_FILE else folder / WEIGHTS_FILE
        config = check_config(config_path.read_bytes()) if config_path.is_file() else None
        if not weights_path.is_file():
            return
        base = self.base()
        if base is None:
            raise AdapterError(3040, "the model is still loading; upload again once it is ready", status=503)
        rank = check_weights(weights_path, base)
        if config is None:
            return
        check_pair(config, rank)
        peft_to_gguf(json.loads(config_path.read_bytes()), load_file(str(weights_path)), base, converted)
