"""Stand-in GGUF models for Llama 3.1 8B Instruct: everything of the real model except its trained weights.

Three builders, each writing into a cache directory and returning the file's path:

- `tiny(cache_dir)`: 2 layers, n_embd 128, seeded random weights, f16. The real Llama 3.1 vocabulary, merges,
  pre-tokenizer, special tokens, chat template, 131072-token trained context and llama3 `rope_freqs`.
- `llama31_8b_q4_k_m(cache_dir)`: the real 8B shape with the same metadata and random weights, written as f16
  and quantized to Q4_K_M by llama.cpp's own quantizer (about 4.9 GB; minutes to build).
- `scripted(cache_dir, scripts)`: a small variant whose greedy output is chosen: after a prompt ending in a
  script's trigger token it emits the script's text and then its end token (a lookup on the last few tokens,
  hand-set weights; about 230 MB for the default scripts).

The vocabulary and template come from the llama-cpp-python 0.3.36 sdist on PyPI (see `fetch_sources`). Each
file is keyed by a hash of everything that shapes its bytes, built under a lock and renamed into place, so
concurrent test processes share one build and never see a half-written file.

Run as a script: `python llama31_standin.py tiny|8b|scripted|sources --cache DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

# Bump when the bytes a builder writes change for reasons the key below cannot see (the 8B key leaves this
# file's own text out, so that editing a comment does not cost a rebuild of minutes).
GENERATOR_VERSION = 1

SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
VOCAB_FILE = "ggml-vocab-llama-bpe.gguf"
TEMPLATE_FILE = "meta-llama-Llama-3.1-8B-Instruct.jinja"
SOURCE_MEMBERS = {VOCAB_FILE: SDIST_ROOT + VOCAB_FILE, TEMPLATE_FILE: SDIST_ROOT + "templates/" + TEMPLATE_FILE}
SOURCES_ENV = "LLAMA31_STANDIN_SOURCES"

N_VOCAB = 128256
FIRST_SPECIAL = 128000

# Llama 3.1's named special tokens, as its Hugging Face tokenizer (and so every GGUF converted from it) has
# them. The llama.cpp vocab file carries Llama 3's names, in which 128004, 128008 and 128010 are reserved; the
# 3.1 names matter because llama.cpp finds EOT, EOM and the end-of-generation set by token text.
LLAMA31_NAMED_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128002: "<|reserved_special_token_0|>",
    128003: "<|reserved_special_token_1|>",
    128004: "<|finetune_right_pad_id|>",
    128005: "<|reserved_special_token_2|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}
BOS_ID = 128000
EOS_ID = 128009  # the Instruct tokenizer_config's eos_token is <|eot_id|>; the converter writes that id
END_TOKENS = {"<|eot_id|>": 128009, "<|eom_id|>": 128008, "<|end_of_text|>": 128001}

# GGUF token types (llama.h's llama_token_type): the converter marks added special tokens CONTROL.
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3

FILE_TYPE_F32 = 0
FILE_TYPE_F16 = 1
FILE_TYPE_Q4_K_M = 15
QUANTIZATION_VERSION = 2


def llama31_special_names() -> dict[int, str]:
    """Names of ids 128000..128255: the named ones, then reserved tokens numbered on from 3."""
    names = dict(LLAMA31_NAMED_SPECIALS)
    for offset, token_id in enumerate(range(128011, N_VOCAB)):
        names[token_id] = f"<|reserved_special_token_{3 + offset}|>"
    return names


# -- hyperparameters -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    """The numbers the official converter takes from Llama 3.1's config.json."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int = N_VOCAB
    n_ctx_train: int = 131072
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    # rope_scaling {"rope_type": "llama3", ...}: baked into the rope_freqs tensor, not into metadata.
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_ctx: int = 8192

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def check(self) -> None:
        if self.n_embd % self.n_head or self.head_dim % 2 or self.n_head % self.n_head_kv:
            raise ValueError(f"inconsistent attention shape: {self}")


LLAMA31_8B = Hyper(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8)
# 4:1 grouped-query attention like the 8B; head_dim 16 keeps 8 query heads inside n_embd 128.
TINY = Hyper(n_layer=2, n_embd=128, n_ff=448, n_head=8, n_head_kv=2)


@dataclass(frozen=True)
class Build:
    """Everything besides the sources that decides a file's bytes."""

    hyper: Hyper
    name: str
    size_label: str
    seed: int = 0
    std: float = 0.02
    matrix_dtype: str = "f16"  # 2-D weights; 1-D ones stay f32 as the converter keeps them
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the scripts, for the cache key

    @property
    def file_type(self) -> int:
        return FILE_TYPE_F16 if self.matrix_dtype == "f16" else FILE_TYPE_F32

    @property
    def np_dtype(self) -> type[np.floating]:
        return np.float16 if self.matrix_dtype == "f16" else np.float32


def rope_freqs(h: Hyper) -> np.ndarray:
    """Per-dimension-pair frequency divisors for llama3 RoPE scaling, as convert_hf_to_gguf.py computes them.

    Pairs whose wavelength is short against the original 8192-token context keep their frequency (1), long
    ones are slowed by `factor`, and those in between are blended. float32 throughout, like the converter's torch.
    """
    dim = h.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    freqs = np.float32(1.0) / (np.float32(h.rope_theta) ** exponents)
    low_freq_wavelen = h.rope_original_ctx / h.rope_low_freq_factor
    high_freq_wavelen = h.rope_original_ctx / h.rope_high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = np.float32(2 * math.pi) / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(h.rope_factor)
        else:
            smooth = (np.float32(h.rope_original_ctx) / wavelen - np.float32(h.rope_low_freq_factor)) / np.float32(
                h.rope_high_freq_factor - h.rope_low_freq_factor
            )
            factors.append(float(np.float32(1) / ((np.float32(1) - smooth) / np.float32(h.rope_factor) + smooth)))
    return np.array(factors, dtype=np.float32)


# -- sources ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    vocab: Path
    template: Path

    def digest(self) -> dict[str, str]:
        return {path.name: _file_sha256(path) for path in (self.vocab, self.template)}


def _sources_in(directory: Path) -> Sources | None:
    vocab, template = directory / VOCAB_FILE, directory / TEMPLATE_FILE
    return Sources(vocab, template) if vocab.is_file() and template.is_file() else None


def find_sources(cache_dir: Path, sources_dir: Path | None = None) -> Sources:
    """The vocab and template: from `sources_dir`, $LLAMA31_STANDIN_SOURCES, or cache_dir/sources (fetched once)."""
    for candidate in (sources_dir, os.environ.get(SOURCES_ENV)):
        if candidate:
            found = _sources_in(Path(candidate))
            if found is None:
                raise FileNotFoundError(f"{candidate} lacks {VOCAB_FILE} or {TEMPLATE_FILE}")
            return found
    return fetch_sources(Path(cache_dir) / "sources")


def fetch_sources(dest: Path) -> Sources:
    """Download the llama-cpp-python sdist with pip and keep only the two files the builders read."""
    dest.mkdir(parents=True, exist_ok=True)
    found = _sources_in(dest)
    if found:
        return found
    with _locked(dest / ".fetch.lock"):
        found = _sources_in(dest)
        if found:
            return found
        with tempfile.TemporaryDirectory(dir=dest) as scratch:
            # --no-binary: the vocab and template ship only in the sdist. pip prepares the sdist's metadata
            # (an isolated build environment from PyPI) but compiles nothing.
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            subprocess.run([*command, "--dest", scratch, SDIST_REQUIREMENT], check=True)
            (sdist,) = Path(scratch).glob("llama_cpp_python-*.tar.gz")
            with tarfile.open(sdist) as archive:
                for name, member in SOURCE_MEMBERS.items():
                    extracted = archive.extractfile(member)
                    assert extracted is not None, member
                    _write_atomically(dest / name, extracted.read())
    found = _sources_in(dest)
    assert found is not None
    return found


# -- reading the vocab file ------------------------------------------------------------------------------------

# GGUF value types (gguf.h's gguf_type): fixed-size scalars by struct format; 8 string, 9 array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """A position in a GGUF file's bytes; gguf's own GGUFReader takes ~10 s over 400k vocab strings."""

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data = data
        self.offset = offset

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        raw = self.data[self.offset : self.offset + length]
        self.offset += length
        return raw.decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.scalar(_SCALARS[vtype])
        item_type, count = self.scalar("I"), self.scalar("Q")
        if item_type == _STRING:
            return [self.string() for _ in range(count)]
        if item_type == _ARRAY:
            return [self.value(_ARRAY) for _ in range(count)]
        array = np.frombuffer(self.data, dtype=_NUMPY[item_type], count=count, offset=self.offset)
        self.offset += array.nbytes
        return array.tolist()


@dataclass(frozen=True)
class GGUFInfo:
    kv: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], int]]  # name -> (ggml shape ne0.., ggml type)


def read_gguf_info(path: Path) -> GGUFInfo:
    """Metadata and tensor directory of a GGUF file (tensor data is not read)."""
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
        # Vocab and metadata sit at the front; read enough of it, growing until the directory fits.
        size = 32 << 20
        while True:
            f.seek(0)
            data = f.read(size)
            try:
                return _parse_gguf(data, n_tensors, n_kv)
            except (struct.error, ValueError):  # ran off the end of what was read
                if len(data) < size:
                    raise
                size *= 4


def _parse_gguf(data: bytes, n_tensors: int, n_kv: int) -> GGUFInfo:
    cursor = _Cursor(data, 24)
    kv = {}
    for _ in range(n_kv):
        key = cursor.string()
        kv[key] = cursor.value(cursor.scalar("I"))
    tensors = {}
    for _ in range(n_tensors):
        name = cursor.string()
        shape = tuple(cursor.scalar("Q") for _ in range(cursor.scalar("I")))
        ggml_type = cursor.scalar("I")
        cursor.scalar("Q")  # data offset
        tensors[name] = (shape, ggml_type)
    return GGUFInfo(kv, tensors)


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]  # GPT-2 byte-level strings; specials by name
    types: list[int]
    merges: list[str]


def load_vocab(sources: Sources) -> Vocab:
    kv = read_gguf_info(sources.vocab).kv
    tokens = list(kv["tokenizer.ggml.tokens"])
    types = list(kv["tokenizer.ggml.token_type"])
    if len(tokens) != N_VOCAB or kv.get("tokenizer.ggml.pre") != "llama-bpe":
        raise ValueError(f"{sources.vocab} is not the Llama 3 BPE vocabulary")
    for token_id, name in llama31_special_names().items():
        tokens[token_id] = name
        types[token_id] = TOKEN_CONTROL
    return Vocab(tokens, types, list(kv["tokenizer.ggml.merges"]))


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells each byte as a printable character: the printable Latin-1 bytes as
    themselves, the rest (controls, space, 0x7F-0xA0, soft hyphen) as code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + shifted)] = b
            shifted += 1
    return alphabet


def token_bytes(vocab: Vocab) -> list[bytes]:
    """The bytes each token stands for; control tokens stand for their names' UTF-8."""
    alphabet = _byte_level_alphabet()
    out = []
    for text, kind in zip(vocab.tokens, vocab.types, strict=True):
        out.append(text.encode() if kind == TOKEN_CONTROL else bytes(alphabet[c] for c in text))
    return out


# -- writing ---------------------------------------------------------------------------------------------------


def _size_label(n_params: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n_params >= scale:
            return f"{n_params / scale:.0f}{suffix}"
    return str(n_params)


def write_metadata(writer: Any, build: Build, vocab: Vocab, template: str) -> None:
    """The keys convert_hf_to_gguf.py writes for Llama 3.1 8B Instruct (general.architecture comes with the
    writer). There are no eot/eom id keys: the converter writes none and llama.cpp finds both by token text."""
    h = build.hyper
    writer.add_string("general.type", "model")
    writer.add_string("general.name", build.name)
    writer.add_string("general.description", "Stand-in with random weights; not a language model.")
    writer.add_string("general.basename", "Meta-Llama-3.1")
    writer.add_string("general.finetune", "Instruct")
    writer.add_string("general.size_label", build.size_label)
    writer.add_string("general.license", "llama3.1")
    writer.add_array("general.tags", ["facebook", "meta", "pytorch", "llama", "llama-3", "text-generation"])
    writer.add_array("general.languages", ["en", "de", "fr", "it", "pt", "hi", "es", "th"])
    writer.add_uint32("llama.block_count", h.n_layer)
    writer.add_uint32("llama.context_length", h.n_ctx_train)
    writer.add_uint32("llama.embedding_length", h.n_embd)
    writer.add_uint32("llama.feed_forward_length", h.n_ff)
    writer.add_uint32("llama.attention.head_count", h.n_head)
    writer.add_uint32("llama.attention.head_count_kv", h.n_head_kv)
    writer.add_float32("llama.rope.freq_base", h.rope_theta)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", h.rms_eps)
    writer.add_uint32("general.file_type", build.file_type)
    writer.add_uint32("llama.vocab_size", h.n_vocab)
    writer.add_uint32("llama.rope.dimension_count", h.head_dim)
    writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "llama-bpe")
    writer.add_array("tokenizer.ggml.tokens", vocab.tokens)
    writer.add_array("tokenizer.ggml.token_type", vocab.types)
    writer.add_array("tokenizer.ggml.merges", vocab.merges)
    writer.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    writer.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    # tokenizer.json's post-processor: ByteLevel (no EOS) then TemplateProcessing "<|begin_of_text|> $A".
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    writer.add_string("tokenizer.chat_template", template)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, columns)
    kind: str  # "matrix", "norm" or "rope_freqs"


def tensor_specs(h: Hyper) -> list[TensorSpec]:
    """llama.cpp's LLM_ARCH_LLAMA tensors, in the order the converter writes them."""
    q_dim, kv_dim = h.n_head * h.head_dim, h.n_head_kv * h.head_dim
    specs = [
        TensorSpec("rope_freqs.weight", (h.head_dim // 2,), "rope_freqs"),
        TensorSpec("token_embd.weight", (h.n_vocab, h.n_embd), "matrix"),
    ]
    for i in range(h.n_layer):
        specs += [
            TensorSpec(f"blk.{i}.attn_norm.weight", (h.n_embd,), "norm"),
            TensorSpec(f"blk.{i}.attn_q.weight", (q_dim, h.n_embd), "matrix"),
            TensorSpec(f"blk.{i}.attn_k.weight", (kv_dim, h.n_embd), "matrix"),
            TensorSpec(f"blk.{i}.attn_v.weight", (kv_dim, h.n_embd), "matrix"),
            TensorSpec(f"blk.{i}.attn_output.weight", (h.n_embd, q_dim), "matrix"),
            TensorSpec(f"blk.{i}.ffn_norm.weight", (h.n_embd,), "norm"),
            TensorSpec(f"blk.{i}.ffn_gate.weight", (h.n_ff, h.n_embd), "matrix"),
            TensorSpec(f"blk.{i}.ffn_up.weight", (h.n_ff, h.n_embd), "matrix"),
            TensorSpec(f"blk.{i}.ffn_down.weight", (h.n_embd, h.n_ff), "matrix"),
        ]
    specs += [
        TensorSpec("output_norm.weight", (h.n_embd,), "norm"),
        TensorSpec("output.weight", (h.n_vocab, h.n_embd), "matrix"),
    ]
    return specs


_NORMAL_TABLE: np.ndarray | None = None


def _normal_table() -> np.ndarray:
    """Standard-normal quantiles at 65536 evenly spaced probabilities. Indexing it with random uint16s draws
    normal samples ~10x faster than numpy's Gaussian sampler plus an f16 cast, which decides the 8B's time."""
    global _NORMAL_TABLE
    if _NORMAL_TABLE is None:
        dist = NormalDist()
        _NORMAL_TABLE = np.array([dist.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float64)
    return _NORMAL_TABLE


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    # Each tensor from its own stream, so one can be regenerated (or overridden) without the others.
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, name_key])


def random_matrix(seed: int, name: str, shape: tuple[int, ...], std: float, dtype: type[np.floating]) -> np.ndarray:
    table = (_normal_table() * std).astype(dtype)
    indices = np.frombuffer(_tensor_rng(seed, name).bytes(2 * math.prod(shape)), dtype=np.uint16)
    return table.take(indices).reshape(shape)


WeightFn = Callable[[TensorSpec], np.ndarray]


def random_weights(build: Build) -> WeightFn:
    """Normal(0, std) matrices and unit norms: activations stay O(1)-O(10) through 32 layers, far from f16's
    limits, so logits stay finite."""

    def make(spec: TensorSpec) -> np.ndarray:
        if spec.kind == "rope_freqs":
            return rope_freqs(build.hyper)
        if spec.kind == "norm":
            return np.ones(spec.shape, dtype=np.float32)
        return random_matrix(build.seed, spec.name, spec.shape, build.std, build.np_dtype)

    return make


def write_model(path: Path, build: Build, sources: Sources, weights: WeightFn) -> None:
    """Stream a GGUF: the directory first, then one tensor at a time, so memory holds one tensor at most."""
    import gguf  # the writer; imported here so that reading helpers work without it

    build.hyper.check()
    vocab = load_vocab(sources)
    writer = gguf.GGUFWriter(path, arch="llama")
    write_metadata(writer, build, vocab, sources.template.read_text(encoding="utf-8"))
    specs = tensor_specs(build.hyper)
    for spec in specs:
        dtype = np.float32 if spec.kind != "matrix" else build.np_dtype
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(dtype), math.prod(spec.shape) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for spec in specs:
        tensor = weights(spec)
        expected = np.float32 if spec.kind != "matrix" else build.np_dtype
        if tensor.shape != spec.shape or tensor.dtype != expected:
            raise ValueError(f"{spec.name}: got {tensor.shape} {tensor.dtype}, want {spec.shape} {expected}")
        writer.write_tensor_data(np.ascontiguousarray(tensor))
    writer.close()


def quantize(source: Path, dest: Path, file_type: int = FILE_TYPE_Q4_K_M, threads: int = 0) -> None:
    """llama.cpp's own quantizer (the code llama-quantize runs), through llama-cpp-python's C API."""
    import ctypes

    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = threads or os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize failed ({status}) on {source}")


# -- the cache -------------------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(build: Build, sources: Sources, **extra: Any) -> str:
    """What decides a file's bytes besides the code (the tiny models' folder stands for the code; see _code_folder)."""
    parts = {"generator": GENERATOR_VERSION, "build": asdict(build), "sources": sources.digest(), **extra}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _write_atomically(path: Path, data: bytes) -> None:
    temp = _temp_path(path)
    temp.write_bytes(data)
    os.replace(temp, path)


def _code_folder(cache_dir: Path) -> Path:
    """Where models whose bytes follow this file's code are kept: a folder named by the code's digest. A new one
    replaces the others, so editing the generator does not leave hundreds of megabytes of stale models behind."""
    folder = cache_dir / f"code-{_file_sha256(Path(__file__))[:12]}"
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.glob("code-*"):
            if stale != folder:
                shutil.rmtree(stale, ignore_errors=True)
    return folder


def _cached(final: Path, build_into: Callable[[Path], None]) -> Path:
    """`final` if it exists; otherwise built once under a lock into a temporary name and renamed into place."""
    if final.exists():
        return final
    with _locked(final.with_name(final.name + ".lock")):
        if final.exists():  # another process built it while we waited
            return final
        temp = _temp_path(final)
        try:
            build_into(temp)
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)
    return final


# -- the models ------------------------------------------------------------------------------------------------


def tiny(cache_dir: Path | str, seed: int = 0, sources_dir: Path | None = None) -> Path:
    """A 2-layer, 128-wide Llama 3.1 with the real tokenizer, template and context; f16, ~70 MB."""
    cache_dir = Path(cache_dir)
    sources = find_sources(cache_dir, sources_dir)
    h = TINY
    n_params = sum(math.prod(s.shape) for s in tensor_specs(h))
    build = Build(hyper=h, name="Llama 3.1 8B Instruct tiny stand-in", size_label=_size_label(n_params), seed=seed)
    final = _code_folder(cache_dir) / f"llama31-tiny-{cache_key(build, sources)}.gguf"
    return _cached(final, lambda temp: write_model(temp, build, sources, random_weights(build)))


def llama31_8b_q4_k_m(cache_dir: Path | str, seed: int = 0, sources_dir: Path | None = None, threads: int = 0) -> Path:
    """The 8B shape with random weights, f16 then Q4_K_M by llama.cpp (~4.9 GB; minutes, 16 GB of scratch disk)."""
    cache_dir = Path(cache_dir)
    sources = find_sources(cache_dir, sources_dir)
    build = Build(hyper=LLAMA31_8B, name="Llama 3.1 8B Instruct stand-in", size_label="8B", seed=seed)
    import llama_cpp  # its version decides the quantizer's output

    key = cache_key(build, sources, llama_cpp=llama_cpp.__version__, quant=FILE_TYPE_Q4_K_M)
    final = cache_dir / f"llama31-8b-q4_k_m-{key}.gguf"

    def build_into(temp: Path) -> None:
        f16 = temp.with_name(temp.name + ".f16")
        try:
            write_model(f16, build, sources, random_weights(build))
            quantize(f16, temp, FILE_TYPE_Q4_K_M, threads)
        finally:
            f16.unlink(missing_ok=True)

    return _cached(final, build_into)


# -- the scripted model ----------------------------------------------------------------------------------------
#
# A script is (trigger, target text, end token): after a prompt whose last token is the trigger, greedy decoding
# must spell the target and then emit the end token. The model reads the current token and the k tokens before
# it (k = 1..4, the smallest that works) and looks the window up in a table of scripted steps. A pure bigram
# model (next token from the current one alone) cannot do it: each token would get a single successor, and a
# single JSON call already needs '": "' twice, which no spelling of distinct tokens covers.

Script = tuple[int | str, str, int | str]  # (trigger token id or its exact text, target text, end token)

# A templated request's generation prompt ends "<|start_header_id|>assistant<|end_header_id|>\n\n", whose
# last token is "\n\n" (271); raw prompts end in one of the other triggers, each a single token.
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
DEFAULT_SCRIPTS: list[Script] = [
    ("\n\n", "Hello! How can I help you today?", "<|eot_id|>"),
    (" plain", "The sky is blue.", "<|eot_id|>"),
    (" message", "Let me look that up.", "<|eom_id|>"),
    (" story", "Once upon a time, there was a llama.", "<|end_of_text|>"),
    (" unicode", "Olá, café ☕ — 🦙!", "<|eot_id|>"),
    (" tool", CALL, "<|eot_id|>"),
    (" python", "<|python_tag|>" + CALL, "<|eom_id|>"),
    # Llama 3.1 has no official multi-call format (its template refuses more than one call); "; " is the
    # separator vLLM's llama3_json parser splits on.
    (" twice", CALL + '; {"name": "get_weather", "parameters": {"city": "London"}}', "<|eot_id|>"),
]


@dataclass(frozen=True)
class ResolvedScript:
    trigger: int
    target_text: str
    tokens: tuple[int, ...]  # what the model emits after the trigger, before `end`
    end: int


class ScriptError(ValueError):
    pass


class _Lexicon:
    """Token ids by their exact bytes, for segmenting targets into tokens of our choosing."""

    def __init__(self, vocab: Vocab) -> None:
        pieces = token_bytes(vocab)
        self.normal = {
            piece: token_id for token_id, piece in enumerate(pieces) if vocab.types[token_id] == TOKEN_NORMAL
        }
        self.special = {vocab.tokens[i]: i for i in range(FIRST_SPECIAL, N_VOCAB)}
        self.max_len = max(len(piece) for piece in self.normal)
        self._special_re = re.compile("(" + "|".join(re.escape(name) for name in self.special) + ")")

    def token(self, ref: int | str) -> int:
        if isinstance(ref, int):
            if not 0 <= ref < N_VOCAB:
                raise ScriptError(f"token id {ref} out of range")
            return ref
        found = self.special.get(ref, self.normal.get(ref.encode()))
        if found is None:
            raise ScriptError(f"{ref!r} is not a single token of the Llama 3 vocabulary")
        return found

    def parts(self, text: str) -> list[bytes | int]:
        """The target split into plain byte runs and special tokens (named as llama.cpp parses them)."""
        out: list[bytes | int] = []
        for chunk in self._special_re.split(text):
            if chunk in self.special:
                out.append(self.special[chunk])
            elif chunk:
                out.append(chunk.encode())
        return out


def segment_scripts(
    scripts: Sequence[Script], lexicon: _Lexicon, context: int, max_rounds: int = 100
) -> list[ResolvedScript]:
    """Spell every target in tokens so that no context (the `context` tokens before a token, and the token)
    occurs twice in all the chains; the model predicts each next token from exactly that context.

    Any spelling will do as long as its bytes are the target's, and negotiated congestion (PathFinder, from
    FPGA routing) finds one: each target is a cheapest path through its token lattice, contexts wanted by
    several paths get dearer every round, and the paths re-route until none is shared. Deterministic.
    """
    triggers = [lexicon.token(trigger) for trigger, _, _ in scripts]
    ends = [lexicon.token(end) for _, _, end in scripts]
    if len(set(triggers)) != len(triggers):
        raise ScriptError("two scripts share a trigger token")
    for end in ends:
        if end not in END_TOKENS.values():
            raise ScriptError(f"end token {end} is not one of {sorted(END_TOKENS)}")
    # A trigger fires on itself alone, wherever it stands, so no chain may contain one.
    lattices = [_lattice(lexicon.parts(target), lexicon, set(triggers)) for _, target, _ in scripts]
    paths = _route(lattices, triggers, context, max_rounds)
    return [
        ResolvedScript(trigger, target, tuple(path), end)
        for (_, target, _), trigger, path, end in zip(scripts, triggers, paths, ends, strict=True)
    ]


Lattice = list[list[tuple[int, int]]]  # per byte offset: (offset after the token, token id)
Context = tuple[int, ...]


def _lattice(parts: list[bytes | int], lexicon: _Lexicon, forbidden: set[int]) -> Lattice:
    """Every way to spell the target: plain bytes by any token, special tokens by themselves."""
    edges: Lattice = []
    for part in parts:
        base = len(edges)
        if isinstance(part, int):
            if part in forbidden or part in END_TOKENS.values():
                raise ScriptError(f"target spells token {part}, a trigger or an end token")
            edges.append([(base + 1, part)])
            continue
        for start in range(len(part)):
            options = []
            for stop in range(start + 1, min(len(part), start + lexicon.max_len) + 1):
                token = lexicon.normal.get(part[start:stop])
                if token is not None and token not in forbidden:
                    options.append((base + stop, token))
            if not options:
                raise ScriptError(f"no usable token spells byte {part[start : start + 1]!r} of a target")
            edges.append(options)
    return edges


def _cheapest(lattice: Lattice, trigger: int, context: int, cost: Callable[[Context, int], float]) -> list[int]:
    """The cheapest token path through a lattice, where a token's cost depends on the tokens before it."""
    n = len(lattice)
    # best[offset][last `context` tokens] = (cost so far, (offset before, state before))
    best: list[dict[Context, tuple[float, tuple[int, Context] | None]]] = [{} for _ in range(n + 1)]
    best[0][(trigger,)] = (0.0, None)
    for start in range(n):
        for state, (so_far, _) in best[start].items():
            for stop, token in lattice[start]:
                window = (*state, token)
                candidate = so_far + cost(window[-context - 1 :], start)
                following = window[-context:]
                if candidate < best[stop].get(following, (math.inf, None))[0]:
                    best[stop][following] = (candidate, (start, state))
    if not best[n]:
        raise ScriptError("a target cannot be spelled in tokens")
    state = min(best[n], key=lambda s: best[n][s][0])
    path, at = [], n
    while at:
        path.append(state[-1])
        at, state = best[at][state][1]  # type: ignore[misc]
    return path[::-1]


def chain_contexts(trigger: int, path: Sequence[int], context: int) -> list[Context]:
    """For each chain token, the window the model predicts the following token from: the token itself and up
    to `context` tokens before it, reaching back no further than the trigger (the user's tokens vary)."""
    chain = [trigger, *path]
    return [tuple(chain[max(0, j - context) : j + 1]) for j in range(1, len(chain))]


def _route(lattices: list[Lattice], triggers: list[int], context: int, max_rounds: int) -> list[list[int]]:
    rng = np.random.default_rng(0)  # fixed: the same scripts always give the same tokens
    jitter: dict[tuple[Any, ...], float] = {}
    history: dict[Context, float] = {}
    usage: dict[Context, int] = {}
    paths: list[list[int]] = [[] for _ in lattices]
    pressure = 0.5

    def noise(key: tuple[Any, ...]) -> float:
        if key not in jitter:
            jitter[key] = float(rng.random())
        return jitter[key]

    for _ in range(max_rounds):
        for i, (lattice, trigger) in enumerate(zip(lattices, triggers, strict=True)):

            def cost(window: Context, offset: int, i: int = i, pressure: float = pressure) -> float:
                # Each token costs 1 (fewer tokens are better), more if its context is held by another path
                # now or was contested before. The contested cost differs by occurrence, so that two
                # occurrences in one path (which this path's search cannot see) part ways.
                contested = history.get(window, 0.0) * (1 + noise((window, i, offset)))
                return (1 + contested) * (1 + pressure * usage.get(window, 0)) + 0.01 * noise((window,))

            for window in chain_contexts(trigger, paths[i], context):
                usage[window] -= 1
            paths[i] = _cheapest(lattice, trigger, context, cost)
            for window in chain_contexts(trigger, paths[i], context):
                usage[window] = usage.get(window, 0) + 1
        contested = [window for window, count in usage.items() if count > 1]
        if not contested:
            return paths
        for window in contested:
            history[window] = history.get(window, 0.0) + usage[window] - 1
        pressure *= 1.5
    raise ScriptError(f"these targets cannot be spelled with distinct {context + 1}-token contexts")


# The scripted network, in the residual stream: C, the current token's code; P1..Pk, the codes of the k
# tokens before it; one constant dimension. Layer 0's attention copies the code of the token o positions back
# into Po (Dc/64 heads per offset); layer 0's FFN holds one unit per scripted step, firing when the current
# token and its context match, and writes the next token's code into C, which the output layer reads. Layer 1
# adds nothing.
HEAD_DIM = 64
MAX_CONTEXT = 4  # tokens before the current one; the smallest that spells all the targets is used
# A canonical spelling cannot route around repeats (two calls' identical keys), so it may look further back.
CANONICAL_MAX_CONTEXT = 8
ANSWER_GAIN = 8.0  # |the FFN's answer| against |a code| (1) in the residual stream
UNIT_SHARPNESS = 40.0  # a unit missing one match sits at silu(-20) ~ -4e-8; a firing one at silu(20) = 20
ATTENTION_GAP = 30.0  # attention logit by which the wanted position beats every other one
SCRIPT_LOGIT = 16.0  # the next token's logit; every other token's stays within about ±2


@dataclass(frozen=True)
class Step:
    window: Context  # the current token last, its predecessors (down to the trigger) before it
    following: int


def script_steps(resolved: Sequence[ResolvedScript], context: int) -> list[Step]:
    steps = []
    for script in resolved:
        followers = [*script.tokens, script.end]
        steps.append(Step((script.trigger,), followers[0]))  # a trigger fires on itself alone
        windows = chain_contexts(script.trigger, script.tokens, context)
        steps += [Step(window, following) for window, following in zip(windows, followers[1:], strict=True)]
    return steps


@dataclass(frozen=True)
class ScriptedLayout:
    context: int  # k
    code_dim: int  # Dc

    @property
    def const(self) -> int:
        return (self.context + 1) * self.code_dim

    def block(self, offset: int) -> slice:
        """Residual dimensions holding the code of the token `offset` back (0: the current token)."""
        return slice(offset * self.code_dim, (offset + 1) * self.code_dim)

    def hyper(self, n_units: int) -> Hyper:
        n_embd = self.const + HEAD_DIM
        n_head = n_embd // HEAD_DIM
        n_ff = HEAD_DIM * max(1, -(-n_units // HEAD_DIM))
        return Hyper(n_layer=2, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head)


def scripted_layout(context: int, n_codes: int) -> ScriptedLayout:
    return ScriptedLayout(context, HEAD_DIM * max(1, -(-n_codes // HEAD_DIM)))


def offset_attention(h: Hyper, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Constant query and key (one head) whose RoPE'd dot product peaks when the key is `offset` positions back.

    Pair i of a head rotates by position * theta_i. With q_i = (a_i, 0) and k_i = a_i (cos o theta_i,
    sin o theta_i) the score is sum_i a_i^2 cos((m - n - o) theta_i): largest at n = m - o. Half the weight on
    the fastest pair separates neighbours; the next 15 pairs break its near-recurrences out to the whole
    trained context. The worst margin is checked over every distance the model can see.
    """
    factors = rope_freqs(h).astype(np.float64)
    theta = h.rope_theta ** (-np.arange(0, h.head_dim, 2) / h.head_dim) / factors
    weights = np.zeros(len(theta))
    weights[0], weights[1:16] = 0.5, 0.5 / 15
    distances = np.arange(-offset, h.n_ctx_train)
    distances = distances[distances != 0]
    margins = np.zeros(len(distances))
    for i in np.flatnonzero(weights):  # one pair at a time: the whole table would be 131072 x 32
        margins += weights[i] * (1 - np.cos(distances * theta[i]))
    margin = float(margins.min())
    if margin < 0.1:
        raise ScriptError(f"attention margin {margin:.3f} at offset {offset} is too thin")
    scale = ATTENTION_GAP * math.sqrt(h.head_dim) / margin  # llama.cpp divides scores by sqrt(head_dim)
    amplitude = np.sqrt(scale * weights)
    query, key = np.zeros(h.head_dim), np.zeros(h.head_dim)
    query[0::2] = amplitude
    key[0::2], key[1::2] = amplitude * np.cos(offset * theta), amplitude * np.sin(offset * theta)
    return query, key


def scripted_weights(build: Build, layout: ScriptedLayout, steps: list[Step]) -> WeightFn:
    """Weights under which greedy decoding follows `steps` exactly; see the layout note above."""
    h = build.hyper
    dc, const, k = layout.code_dim, layout.const, layout.context
    tokens = sorted({t for s in steps for t in (*s.window, s.following)})
    rotation, _ = np.linalg.qr(_tensor_rng(build.seed, "scripted.codes").standard_normal((dc, dc)))
    codes = {token: rotation[:, i] for i, token in enumerate(tokens)}  # orthonormal
    # RMSNorm divides by these; every code and the constant have norm 1, so they are the same for all tokens.
    rms_in = math.sqrt(2 / h.n_embd + h.rms_eps)  # the embedding: code + constant
    rms_mid = math.sqrt((k + 2) / h.n_embd + h.rms_eps)  # after attention: + k context codes
    rms_out = math.sqrt((k + 2 + ANSWER_GAIN**2) / h.n_embd + h.rms_eps)  # after the FFN: + the answer
    heads_per_offset = dc // HEAD_DIM
    dtype = build.np_dtype

    def embeddings() -> np.ndarray:
        # Every row has the same norm, so RMSNorm treats every token alike and the constant stays constant.
        rows = random_matrix(build.seed, "token_embd.weight", (h.n_vocab, dc), 1.0, np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        for token, code in codes.items():
            rows[token] = code
        out = np.zeros((h.n_vocab, h.n_embd), dtype=dtype)
        out[:, layout.block(0)] = rows
        out[:, const] = 1
        return out

    def attention(kind: str) -> np.ndarray:
        if kind == "attn_output":  # head group o's values into block o
            out = np.zeros((h.n_embd, h.n_head * h.head_dim))
            for offset in range(1, k + 1):
                out[layout.block(offset), layout.block(offset - 1)] = np.eye(dc)
            return out.astype(dtype)
        out = np.zeros((h.n_head * h.head_dim, h.n_embd))
        for offset in range(1, k + 1):
            rows = layout.block(offset - 1)  # this offset's heads
            if kind == "attn_v":
                out[rows, layout.block(0)] = np.eye(dc) * rms_in  # value: the key token's code
                continue
            vector = offset_attention(h, offset)[0 if kind == "attn_q" else 1] * rms_in
            out[rows, const] = np.tile(vector, heads_per_offset)
        return out.astype(dtype)

    def ffn(kind: str) -> np.ndarray:
        gate = np.zeros((h.n_ff, h.n_embd))
        up = np.zeros((h.n_ff, h.n_embd))
        down = np.zeros((h.n_embd, h.n_ff))
        for j, step in enumerate(steps):
            # gate = sharpness * (matches - (terms - 1/2)): +sharpness/2 when all match, <= -sharpness/2 else.
            for offset, token in enumerate(reversed(step.window)):
                gate[j, layout.block(offset)] = codes[token] * rms_mid
            gate[j, const] = -(len(step.window) - 0.5) * rms_mid
            gate[j] *= UNIT_SHARPNESS
            up[j, const] = rms_mid
            down[layout.block(0), j] = codes[step.following] * (ANSWER_GAIN / (UNIT_SHARPNESS / 2))
        return {"ffn_gate": gate, "ffn_up": up, "ffn_down": down}[kind].astype(dtype)

    def output() -> np.ndarray:
        out = random_matrix(build.seed, "output.weight", (h.n_vocab, h.n_embd), build.std, dtype)
        for token in {s.following for s in steps}:
            out[token] = 0
            out[token, layout.block(0)] = codes[token] * (SCRIPT_LOGIT * rms_out / ANSWER_GAIN)
        return out

    def make(spec: TensorSpec) -> np.ndarray:
        if spec.kind == "rope_freqs":
            return rope_freqs(h)
        if spec.kind == "norm":
            return np.ones(spec.shape, dtype=np.float32)
        if spec.name == "token_embd.weight":
            return embeddings()
        if spec.name == "output.weight":
            return output()
        kind = spec.name.split(".")[2]
        if spec.name.startswith("blk.0."):
            return attention(kind) if kind.startswith("attn") else ffn(kind)
        return np.zeros(spec.shape, dtype=dtype)  # later blocks add nothing to the residual stream

    return make


def canonical_spelling(text: str, lexicon: _Lexicon, vocab_file: Path) -> list[int]:
    """The target as llama.cpp's tokenizer spells it: special tokens by name, plain text by its merges."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(vocab_file).encode(), params)
    if not model:
        raise ScriptError(f"llama.cpp could not read {vocab_file}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        tokens: list[int] = []
        for part in lexicon.parts(text):
            if isinstance(part, int):
                tokens.append(part)
                continue
            out = (llama_cpp.llama_token * (len(part) + 8))()
            n = llama_cpp.llama_tokenize(vocab, part, len(part), out, len(part) + 8, False, False)
            tokens.extend(out[:n])
        return tokens
    finally:
        llama_cpp.llama_model_free(model)


def canonical_steps(resolved: Sequence[ResolvedScript], context: int) -> list[Step] | None:
    """The steps of canonically spelled scripts, or None if one window would have to lead to two tokens. A window
    seen twice with the same successor is one step: where a grammar forces tokens the model's prediction is not
    even read, and the same span may then recur (two calls' keys)."""
    chosen: dict[Context, int] = {}
    for step in script_steps(resolved, context):
        if chosen.setdefault(step.window, step.following) != step.following:
            return None
    return [Step(window, following) for window, following in chosen.items()]


def plan_scripts(
    scripts: Sequence[Script], lexicon: _Lexicon, spelling: str = "route", vocab_file: Path | None = None
) -> tuple[list[ResolvedScript], ScriptedLayout]:
    """The spelling and the smallest context that make every step's window unique. `spelling` "canonical" keeps
    llama.cpp's own tokens, which are those a grammar forces, so a constrained answer stays on the script."""
    if spelling == "canonical":
        assert vocab_file is not None
        triggers = [lexicon.token(trigger) for trigger, _, _ in scripts]
        resolved = []
        for (_, target, end), trigger in zip(scripts, triggers, strict=True):
            tokens = canonical_spelling(target, lexicon, vocab_file)
            if set(tokens) & set(triggers):
                raise ScriptError(f"the canonical spelling of {target!r} holds a trigger token")
            resolved.append(ResolvedScript(trigger, target, tuple(tokens), lexicon.token(end)))
        for context in range(1, CANONICAL_MAX_CONTEXT + 1):
            steps = canonical_steps(resolved, context)
            if steps is not None:
                n_codes = len({t for s in steps for t in (*s.window, s.following)})
                return resolved, scripted_layout(context, n_codes)
        raise ScriptError(f"spelled canonically, these targets need over {CANONICAL_MAX_CONTEXT} tokens of context")
    for context in range(1, MAX_CONTEXT + 1):
        try:
            resolved = segment_scripts(scripts, lexicon, context)
        except ScriptError:
            if context == MAX_CONTEXT:
                raise
            continue
        steps = script_steps(resolved, context)
        n_codes = len({t for s in steps for t in (*s.window, s.following)})
        return resolved, scripted_layout(context, n_codes)
    raise AssertionError("unreachable")


def scripted(
    cache_dir: Path | str,
    scripts: Sequence[Script] = DEFAULT_SCRIPTS,
    seed: int = 0,
    sources_dir: Path | None = None,
    spelling: str = "route",
) -> Path:
    """A small model that, after a prompt whose last token is a script's trigger, greedily emits the script's
    target text and then its end token. The manifest beside it (`.json`) lists each script's token ids.
    `spelling`: "route" finds a spelling with the least context; "canonical" keeps llama.cpp's tokens (for
    answers a grammar constrains, since the tokens a grammar forces are the canonical ones)."""
    cache_dir = Path(cache_dir)
    sources = find_sources(cache_dir, sources_dir)
    scripts = [tuple(script) for script in scripts]
    # The shape follows from the spelling, which the key need not wait for: the scripts decide both.
    build = Build(
        hyper=TINY,
        name="Llama 3.1 8B Instruct scripted stand-in",
        size_label="scripted",
        seed=seed,
        extra={"scripts": [list(script) for script in scripts], "spelling": spelling},
    )
    final = _code_folder(cache_dir) / f"llama31-scripted-{cache_key(build, sources)}.gguf"

    def build_into(temp: Path) -> None:
        resolved, layout = plan_scripts(scripts, _Lexicon(load_vocab(sources)), spelling, sources.vocab)
        canonical = canonical_steps(resolved, layout.context) if spelling == "canonical" else None
        steps = canonical or script_steps(resolved, layout.context)
        sized = replace(build, hyper=layout.hyper(len(steps)))
        write_model(temp, sized, sources, scripted_weights(sized, layout, steps))
        manifest = {
            "scripts": [asdict(script) for script in resolved],
            "context": layout.context,
            "n_embd": sized.hyper.n_embd,
        }
        _write_atomically(manifest_path(final), json.dumps(manifest, indent=1, ensure_ascii=False).encode())

    return _cached(final, build_into)


def manifest_path(model: Path) -> Path:
    return model.with_suffix(".json")


def load_manifest(model: Path) -> list[ResolvedScript]:
    """The scripts a scripted model was built for, with the token ids chosen for each target."""
    raw = json.loads(manifest_path(model).read_text(encoding="utf-8"))
    return [ResolvedScript(s["trigger"], s["target_text"], tuple(s["tokens"]), s["end"]) for s in raw["scripts"]]


# -- command line ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["tiny", "8b", "scripted", "sources"])
    parser.add_argument("--cache", type=Path, required=True, help="directory the models are cached in")
    parser.add_argument("--sources", type=Path, help=f"directory holding {VOCAB_FILE} and {TEMPLATE_FILE}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.model == "sources":
        path = find_sources(args.cache, args.sources).vocab.parent
    elif args.model == "tiny":
        path = tiny(args.cache, args.seed, args.sources)
    elif args.model == "8b":
        path = llama31_8b_q4_k_m(args.cache, args.seed, args.sources)
    else:
        path = scripted(args.cache, DEFAULT_SCRIPTS, args.seed, args.sources)
    print(f"{path}  ({time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
