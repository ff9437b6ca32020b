"""The llama.cpp model and context, through llama-cpp-python's low-level C bindings.

This is the only module that holds llama.cpp pointers. Loading, tokenizing and rendering pieces are safe from
any thread (the vocabulary is read-only once loaded); `decode` and everything touching the context belong to
the engine thread alone.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as llama
import numpy as np

log = logging.getLogger("workers_ai_local.llama")

# ggml's log levels (ggml.h of this build): 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line.
# Its info level narrates every model load in a hundred lines, so it goes to debug with the rest.
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}


# The buffers llama.cpp reports as it creates a context ("CPU compute buffer size = 25.01 MiB"), in MiB.
_BUFFER_REPORT = re.compile(r"(compute|KV|output) buffer size = +([0-9.]+) MiB")
_reported_buffers: dict[str, float] = {}


@llama.llama_log_callback
def _forward_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp writes its load report to stderr by default; route it through logging so the server's
    # one-line-per-request log stays readable and `--log-level debug` still shows it.
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        log.log(_LOG_LEVELS.get(level, logging.DEBUG), "%s", message)
        found = _BUFFER_REPORT.search(message)
        if found:
            _reported_buffers[found[1]] = _reported_buffers.get(found[1], 0.0) + float(found[2])


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama.llama_log_set(_forward_log, ctypes.c_void_p(0))
        llama.llama_backend_init()
        _load_backend_libraries()
        _backend_ready = True


def _load_backend_libraries() -> None:
    # A build with GGML_BACKEND_DL (the container image's: one CPU library per instruction-set level) registers no
    # backend until one is loaded, and ggml's default search (beside the executable, the working directory) misses
    # the package's lib folder, where they are installed. A build with the backends linked in has them already.
    # Called through libllama's handle: the wheel holds libggml.so and libggml.so.0 as two files, and only the
    # registry in the one libllama links (.so.0) counts.
    from llama_cpp.llama_cpp import _lib as libllama

    if libllama.ggml_backend_reg_count() == 0:
        libllama.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        libllama.ggml_backend_load_all_from_path.restype = None
        libllama.ggml_backend_load_all_from_path(str(Path(llama.__file__).parent / "lib").encode())


class ModelLoadError(Exception):
    pass


class DecodeError(Exception):
    pass


class AdapterError(Exception):
    pass


# Special tokens per llama_tokenize call (see LlamaModel.tokenize_pieces).
SPECIAL_TOKENS_PER_CALL = 64


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int  # the longest context one request may use; 0: the model's trained length (within the pool)
    n_batch: int
    n_seq: int  # requests decoded together
    n_threads: int
    n_gpu_layers: int  # -1: every layer, where the build can offload
    kv_size: int = 0  # KV cache cells shared by every request; 0: derived from the model and free memory
    cache_type: str = "f16"  # K and V element type: f16, q8_0 or q4_0
    # "pool": one unified KV cache; "slots": a KV stream of n_ctx per request slot; "auto": slots where every slot
    # can hold the whole window in the memory a pool would take, else the pool (see choose_layout)
    kv_layout: str = "auto"
    # "auto": as _flash_attention decides; "on" or "off": as told (llama.cpp's -fa)
    flash_attention: str = "auto"


MIB = 1024 * 1024
# Bytes per K or V element: f16, and ggml's blocks of 32 (an f16 scale with 32 8-bit or 4-bit values).
CACHE_TYPES = {
    "f16": (llama.GGML_TYPE_F16, 2.0),
    "q8_0": (llama.GGML_TYPE_Q8_0, 34 / 32),
    "q4_0": (llama.GGML_TYPE_Q4_0, 18 / 32),
}
# Of the memory left once the weights are in, what a derived pool may take: the rest stays for the system, the
# compute buffers and other processes.
DEFAULT_KV_SHARE = 0.5
KV_GRANULE = 256  # llama.cpp pads the attended cells to this
KV_LAYOUTS = ("auto", "pool", "slots")
FLASH_ATTENTION = ("auto", "on", "off")
# A slot's own window in the slots layout, when --ctx-size does not say: Llama 3.1's 128K would need 16 GB of f16
# KV cache per slot.
SLOT_WINDOW_CAP = 8192
# ggml's CPU flash attention takes one kernel for calls of fewer than this many queries per sequence and another,
# tiled one (GGML_FA_TILE_Q) from this many on; each sums in its own order.
ATTENTION_QUERY_TILE = 64
# The most a slots layout spends on attention scores (see LlamaModel.flash_attention).
SCORES_LIMIT = 1024 * MIB


def available_memory() -> int:
    """Bytes the kernel says can be had without swapping (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class MemoryPlan:
    """What a layout needs: the weights, the shared KV pool and the compute buffers (an estimate until the context
    exists and llama.cpp reports them)."""

    weights: int
    kv_tokens: int
    kv_bytes_per_token: float
    compute: int
    available: int

    @property
    def kv(self) -> int:
        return int(self.kv_tokens * self.kv_bytes_per_token)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute

    def describe(self) -> str:
        return (
            f"weights {self.weights / MIB:.0f} MiB + KV cache {self.kv / MIB:.0f} MiB ({self.kv_tokens} tokens at "
            f"{self.kv_bytes_per_token / 1024:.1f} KiB) + compute buffers {self.compute / MIB:.0f} MiB "
            f"= {self.total / MIB:.0f} MiB, of {self.available / MIB:.0f} MiB available"
        )


class LlamaModel:
    def __init__(self, path: Path, settings: ContextSettings) -> None:
        _init_backend()
        model_params = llama.llama_model_default_params()
        if llama.llama_supports_gpu_offload():
            model_params.n_gpu_layers = 2**31 - 1 if settings.n_gpu_layers < 0 else settings.n_gpu_layers
        else:
            model_params.n_gpu_layers = 0
        self.gpu_offload = model_params.n_gpu_layers > 0
        self.model = llama.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {path}")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama.llama_model_n_ctx_train(self.model)
        self.n_params = llama.llama_model_n_params(self.model)

        if settings.cache_type not in CACHE_TYPES:
            raise ModelLoadError(f"unknown cache type {settings.cache_type!r}: use one of {', '.join(CACHE_TYPES)}")
        if settings.kv_layout not in KV_LAYOUTS:
            raise ModelLoadError(f"unknown KV layout {settings.kv_layout!r}: use one of {', '.join(KV_LAYOUTS)}")
        if settings.flash_attention not in FLASH_ATTENTION:
            raise ModelLoadError(
                f"unknown flash attention setting {settings.flash_attention!r}: use one of {', '.join(FLASH_ATTENTION)}"
            )
        if settings.flash_attention == "off" and settings.cache_type != "f16":
            raise ModelLoadError(f"a {settings.cache_type} cache needs flash attention (llama.cpp quantizes V only so)")
        cache_type, element_bytes = CACHE_TYPES[settings.cache_type]
        if settings.kv_layout == "slots" and settings.kv_size:
            raise ModelLoadError("--kv-size sizes the pool layout; in the slots layout each slot holds --ctx-size")
        self.kv_layout = self._choose_layout(settings, element_bytes)
        self.shared_pool = self.kv_layout == "pool"
        self.flash_attention = self._flash_attention(settings)
        self.plan = self._plan_memory(settings, element_bytes)
        if self.plan.total > self.plan.available and not self.gpu_offload:
            llama.llama_model_free(self.model)
            fix = "lower --kv-size" if self.shared_pool else "lower --ctx-size or --parallel"
            raise ModelLoadError(f"this layout does not fit in memory: {self.plan.describe()}; {fix}")
        # The pool layout is one set of KV cells for every request (llama.cpp's unified KV cache): a request may use
        # up to its context window, and many short ones share the same memory. But attention then runs over the
        # pool's occupied extent and a request's cells lie wherever room was, and llama.cpp's kernels do not sum
        # bit-identically over different extents and placements: a request's output can depend on what else the
        # pool holds. The slots layout gives each slot a stream of its own, as before the pool, and keeps outputs
        # independent of everything else.
        ctx_params = llama.llama_context_default_params()
        ctx_params.n_ctx = self.plan.kv_tokens
        ctx_params.n_batch = settings.n_batch
        ctx_params.n_ubatch = settings.n_batch
        ctx_params.n_seq_max = settings.n_seq
        ctx_params.n_threads = settings.n_threads
        ctx_params.n_threads_batch = settings.n_threads
        ctx_params.kv_unified = self.shared_pool
        ctx_params.type_k = ctx_params.type_v = cache_type
        if not self.flash_attention:
            ctx_params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        elif settings.cache_type != "f16" or settings.flash_attention == "on":
            # llama.cpp needs it for a quantized V; "on" is a demand, not a preference it may decline
            ctx_params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx_params.no_perf = True
        _reported_buffers.clear()
        self.ctx = llama.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            llama.llama_model_free(self.model)
            raise ModelLoadError(f"llama.cpp could not create a context for {path}: {self.plan.describe()}")
        self.memory = llama.llama_get_memory(self.ctx)
        self.kv_size = llama.llama_n_ctx(self.ctx)
        if self.shared_pool:
            self.context_window = min(settings.n_ctx or self.n_ctx_train, self.kv_size)
        else:
            self.context_window = self.kv_size // settings.n_seq
        self.cache_type = settings.cache_type
        self.n_batch = llama.llama_n_batch(self.ctx)
        self.n_seq = settings.n_seq
        self.n_threads = settings.n_threads
        self._adapters: dict[Path, llama.llama_adapter_lora_p] = {}
        self._active_adapter: Path | None = None
        self.bos = llama.llama_vocab_bos(self.vocab)
        self.eos = llama.llama_vocab_eos(self.vocab)
        self.bos_text = self.token_text(self.bos) if self.bos >= 0 else "\0"
        self._pieces: dict[int, bytes] = {}
        self.adds_bos = bool(llama.llama_vocab_get_add_bos(self.vocab))
        self._special_pattern = self._special_tokens_pattern()
        self.description = self._string(lambda buf, n: llama.llama_model_desc(self.model, buf, n))

    def _kv_bytes_per_token(self, element_bytes: float) -> float:
        head_dim = llama.llama_model_n_embd(self.model) // max(1, llama.llama_model_n_head(self.model))
        per_token = llama.llama_model_n_layer(self.model) * 2 * llama.llama_model_n_head_kv(self.model) * head_dim
        return per_token * element_bytes

    def _flash_attention(self, settings: ContextSettings) -> bool:
        """Whether attention runs as llama.cpp's flash attention (llama.cpp's own choice, on a CPU) or as a product of
        scores (up to n_batch x window x heads floats in the compute buffer) and a softmax. On a CPU, ggml's flash
        attention sums a position by what shares its call: one kernel below ATTENTION_QUERY_TILE queries per
        sequence and a tiled one from there on, and the attention of a lone query over 512 cells or more (one stream
        decoding alone past 256 tokens) split across the threads and merged, not walked in order. So in the slots
        layout a stream decoded alone drew other tokens than the same stream decoded beside another one (seeded,
        on the embedded model, diverging within a few tokens), and blocks under the tile could never share a call
        of more. Without it a position's sums depend on neither (checked bit for bit on the embedded model and the
        8B stand-in: calls of any whole multiple of 8 tokens, a stream alone and beside another at 300 and 600
        cells), so the slots layout on a CPU runs without it wherever the scores fit SCORES_LIMIT. It costs little:
        on the embedded model, servers taking turns, decode was 2-5% faster without it and a 400-token
        prompt 3% slower (see docs/determinism.md)."""
        if settings.flash_attention != "auto":
            return settings.flash_attention == "on"
        return (
            self.shared_pool
            or self.gpu_offload
            or settings.cache_type != "f16"
            or self._scores_bytes(settings) > SCORES_LIMIT
        )

    def _scores_bytes(self, settings: ContextSettings) -> int:
        # The scores, f32, of a whole batch of queries against a slot's whole window: an upper bound (on the 8B
        # stand-in llama.cpp allocated 306 MiB more compute at --ctx-size 8192 than with flash attention, against
        # 512 MiB by this, and no more at --ctx-size 1024).
        return settings.n_batch * self._slot_window(settings) * llama.llama_model_n_head(self.model) * 4

    def _slot_window(self, settings: ContextSettings) -> int:
        """The tokens each slot's stream holds in the slots layout."""
        cap = self.n_ctx_train if settings.kv_layout == "auto" else min(self.n_ctx_train, SLOT_WINDOW_CAP)
        return settings.n_ctx or cap

    def _compute_bytes(self, settings: ContextSettings, flash_attention: bool = True) -> int:
        # llama.cpp keeps logits for a whole batch and activations for a batch of n_embd-wide rows.
        activations = settings.n_batch * (self.n_vocab * 4 + llama.llama_model_n_embd(self.model) * 4 * 16)
        return activations + (0 if flash_attention else self._scores_bytes(settings))

    def _kv_room(self, settings: ContextSettings, available: int) -> float:
        """Bytes a KV cache may take by default: a share of what is left once the weights and buffers are in."""
        weights = llama.llama_model_size(self.model)
        return max(0, available - weights - self._compute_bytes(settings)) * DEFAULT_KV_SHARE

    def _choose_layout(self, settings: ContextSettings, element_bytes: float) -> str:
        """The layout `auto` means: slots where every slot can hold the whole window (--ctx-size, else the trained
        length) within the memory a default pool may take, since a pool then shares nothing that is short and
        costs every running token attention over the other requests' cells (measured 0.73-0.82x llama-server's
        throughput at 8-16 streams of the embedded model, against 0.96-0.97x in slots); otherwise the pool, so one
        request can still reach the window. An explicit --kv-size sizes a pool. With a GPU the choice is the pool:
        what the GPU holds is not in this arithmetic, and the slots layout has not been measured there."""
        if settings.kv_layout != "auto":
            return settings.kv_layout
        if settings.kv_size or self.gpu_offload:
            return "pool"
        window = settings.n_ctx or self.n_ctx_train
        need = window * settings.n_seq * self._kv_bytes_per_token(element_bytes)
        return "slots" if need <= self._kv_room(settings, available_memory()) else "pool"

    def _plan_memory(self, settings: ContextSettings, element_bytes: float) -> MemoryPlan:
        bytes_per_token = self._kv_bytes_per_token(element_bytes)
        weights = llama.llama_model_size(self.model)
        compute = self._compute_bytes(settings, self.flash_attention)
        available = available_memory()
        if not self.shared_pool:
            window = self._slot_window(settings)
            return MemoryPlan(weights, window * settings.n_seq, bytes_per_token, compute, available)
        kv_tokens = settings.kv_size
        if not kv_tokens:
            room = self._kv_room(settings, available)
            kv_tokens = min(self.n_ctx_train, int(room / bytes_per_token))
            kv_tokens = max(kv_tokens // KV_GRANULE * KV_GRANULE, KV_GRANULE * settings.n_seq)
        return MemoryPlan(weights, kv_tokens, bytes_per_token, compute, available)

    @property
    def memory_report(self) -> str:
        """The memory plan with llama.cpp's own figures for what it allocated, once the context exists."""
        reported = " + ".join(f"{kind} {mib:.0f} MiB" for kind, mib in sorted(_reported_buffers.items()))
        return f"{self.plan.describe()}; llama.cpp allocated {reported or 'nothing it reported'}"

    # -- vocabulary (any thread) ---------------------------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama.llama_model_meta_val_str(self.model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def chat_template(self) -> str | None:
        raw = llama.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int) -> str:
        raw = llama.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def _special_tokens_pattern(self) -> re.Pattern[bytes] | None:
        """What finds the special tokens llama.cpp parses in a text (control, user-defined and unknown tokens, the
        longest first); None where splitting a text at them could change its tokens (a token that strips the
        whitespace beside it, or a vocabulary that appends EOS)."""
        parsed = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_USER_DEFINED | llama.LLAMA_TOKEN_ATTR_UNKNOWN
        stripping = llama.LLAMA_TOKEN_ATTR_LSTRIP | llama.LLAMA_TOKEN_ATTR_RSTRIP
        texts = set()
        for token in range(self.n_vocab):
            attr = llama.llama_vocab_get_attr(self.vocab, token)
            if attr & parsed:
                if attr & stripping:
                    return None
                text = self.token_bytes(token)
                if text:
                    texts.add(text)
        if not texts or llama.llama_vocab_get_add_eos(self.vocab):
            return None
        return re.compile(b"|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))

    def tokenize_pieces(self, text: str, specials_per_piece: int = SPECIAL_TOKENS_PER_CALL) -> Iterator[list[int]]:
        """Tokens of `text`, special tokens parsed, BOS added where the model wants one but never twice; a piece at
        a time, each piece starting at a special token and holding at most `specials_per_piece` of them, so that a
        caller can stop between pieces. llama.cpp finds special tokens
        by scanning the text once per special token over a list of fragments that grows with every match, which
        is quadratic in a prompt's special tokens (see docs/hardening.md); it tokenizes the text between special
        tokens apart, so the pieces' tokens are the whole text's."""
        data = text.encode("utf-8")
        # A template or raw prompt that already spells out the BOS text gets it parsed as BOS; asking llama.cpp to
        # add its own as well would give two (which measurably degrades Llama 3 output, and llama.cpp warns).
        add_special = not (self.adds_bos and text.startswith(self.bos_text))
        if self._special_pattern is None:
            yield self._tokenize(data, add_special, parse_special=True)
            return
        start, count = 0, 0
        for match in self._special_pattern.finditer(data):
            count += 1
            if count > specials_per_piece:
                yield self._tokenize(data[start : match.start()], add_special, parse_special=True)
                start, count, add_special = match.start(), 1, False
        yield self._tokenize(data[start:], add_special, parse_special=True)

    def tokenize_text(self, data: bytes) -> list[int]:
        """Tokens of plain text: no BOS, and special-token names read as text."""
        return self._tokenize(data, add_special=False, parse_special=False)

    def tokenize_special(self, text: str) -> list[int]:
        """Tokens of `text` with special-token names parsed, no BOS."""
        return self._tokenize(text.encode(), add_special=False, parse_special=True)

    def _tokenize(self, data: bytes, add_special: bool, parse_special: bool) -> list[int]:
        capacity = len(data) + 2
        tokens = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n < 0:  # too small: llama.cpp says how many it needs
            capacity = -n
            tokens = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        return list(tokens[:n])

    def token_bytes(self, token: int) -> bytes:
        """What a token stands for, control tokens by their names (as templates and grammars write them)."""
        buf = ctypes.create_string_buffer(256)
        n = llama.llama_token_to_piece(self.vocab, token, buf, 256, 0, True)
        return buf.raw[:n] if n >= 0 else b""

    def is_control(self, token: int) -> bool:
        return bool(llama.llama_vocab_get_attr(self.vocab, token) & llama.LLAMA_TOKEN_ATTR_CONTROL)

    def has_control_token(self, name: str) -> bool:
        """Whether the vocabulary has a control token spelled `name` (e.g. <|python_tag|>)."""
        tokens = self.tokenize_special(name)
        return len(tokens) == 1 and self.is_control(tokens[0])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for; control tokens (EOS, headers) render as nothing."""
        # Memoised: this runs once per generated token, and a vocabulary's pieces never change.
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        self._pieces[token] = piece = buf.raw[:n]
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    # -- context (engine thread only) ----------------------------------------------------------------------

    def decode(self, batch: llama.llama_batch) -> None:
        status = llama.llama_decode(self.ctx, batch)
        if status != 0:
            reason = "no room left in the KV cache" if status == 1 else f"llama_decode returned {status}"
            raise DecodeError(reason)

    def logits(self, output_index: int) -> np.ndarray:
        """The logits of an output of the last decode, as a view of llama.cpp's buffer (valid until the next)."""
        return np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, output_index), shape=(self.n_vocab,))

    def use_adapter(self, path: Path | None) -> None:
        """Make the context decode with this LoRA adapter (loaded on first use), or with none."""
        if path == self._active_adapter:
            return
        if path is None:
            status = llama.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            adapter = self._adapters.get(path)
            if adapter is None:
                adapter = llama.llama_adapter_lora_init(self.model, str(path).encode())
                if not adapter:
                    raise AdapterError(f"llama.cpp could not load the LoRA adapter {path.name}")
                self._adapters[path] = adapter  # freed with the model
            adapters = (llama.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(1.0)
            status = llama.llama_set_adapters_lora(self.ctx, adapters, 1, scales)
        if status != 0:
            raise AdapterError(f"llama.cpp refused the LoRA adapter ({status})")
        self._active_adapter = path

    def forget(self, seq_id: int, from_pos: int = 0) -> None:
        """Drop a sequence's cached positions from `from_pos` on."""
        llama.llama_memory_seq_rm(self.memory, seq_id, from_pos, -1)

    def close(self) -> None:
        if self.ctx:
            llama.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama.llama_model_free(self.model)
            self.model = None

    @staticmethod
    def _string(call: object) -> str:
        buf = ctypes.create_string_buffer(256)
        n = call(buf, 256)  # type: ignore[operator]
        return buf.value.decode("utf-8", errors="replace") if n > 0 else ""
