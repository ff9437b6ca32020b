"""Every setting of the server, in one place: defaults, environment variables and command-line flags.

Precedence is flag > environment variable > default, so a `make run` line can be tuned either way.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path


def package_folder(name: str) -> Path:
    """A folder of package data (schemas, models, worker), found through the package wherever it is installed."""
    return Path(str(resources.files(f"{__package__}.{name}")))


SCHEMAS_DIR = package_folder("schemas")
CATALOG_PATH = package_folder("models") / "catalog.json"
WORKER_DIR = package_folder("worker")


def physical_cores() -> int:
    """Cores this process may run on, counting hyper-threads of one core once.

    llama.cpp's matrix kernels saturate a core's execution units, so a second hyper-thread on the same core
    adds contention rather than speed; a thread per logical CPU only pays where there is no SMT.
    """
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return max(1, len(allowed))
    cores: set[tuple[str, str]] = set()
    cpu, physical, core = None, "0", None
    for line in [*text.splitlines(), ""]:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            cpu = int(value)
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        elif not line.strip() and cpu is not None:
            if cpu in allowed:
                cores.add((physical, core if core is not None else str(cpu)))
            cpu, physical, core = None, "0", None
    return max(1, len(cores) or len(allowed))


@dataclass(frozen=True)
class Option:
    flag: str
    env: str
    help: str


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8787
    model: str = "smollm2-135m-instruct"
    ctx_size: int = 0
    kv_size: int = 0
    cache_type: str = "f16"
    kv_layout: str = "auto"
    flash_attention: str = "auto"
    threads: int = 0
    batch_size: int = 512
    max_stall_ms: int = 1000
    prefill_block: int = 0
    parallel: int = 4
    max_queue: int = 256
    max_messages: int = 2048
    max_prompt_chars: int = 1 << 20
    gpu_layers: int = -1
    max_body_bytes: int = 4 * 1024 * 1024
    lora_dir: str = str(Path.home() / ".cache" / "workers-ai-local" / "lora")
    api_token: str = ""
    api_token_file: str = ""
    chat_date: str = ""
    log_level: str = "info"

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    @property
    def effective_threads(self) -> int:
        return self.threads if self.threads > 0 else physical_cores()


OPTIONS: dict[str, Option] = {
    "host": Option("--host", "WAI_HOST", "address to bind; keep loopback unless the port is protected"),
    "port": Option("--port", "WAI_PORT", "TCP port"),
    "model": Option(
        "--model",
        "WAI_MODEL",
        "GGUF to serve as @cf/meta/llama-3.1-8b-instruct-fast: a source name from models/catalog.json "
        "(smollm2-135m-instruct, llama-3.1-8b-instruct-q4_k_m, ...), a local .gguf path, "
        "or hf:OWNER/REPO/FILE.gguf[@REVISION]",
    ),
    "ctx_size": Option(
        "--ctx-size",
        "WAI_CTX_SIZE",
        "the longest context (prompt and answer) one request may use, in tokens; 0 = the model's trained length "
        "(131072 for Llama 3.1), within the KV pool",
    ),
    "kv_size": Option(
        "--kv-size",
        "WAI_KV_SIZE",
        "KV cache tokens shared by all requests (one pool); 0 = the model's trained length, or less if half the "
        "memory left after the weights cannot hold it",
    ),
    "kv_layout": Option(
        "--kv-layout",
        "WAI_KV_LAYOUT",
        "auto: slots where every slot can hold the whole window in the memory a default pool would take, else "
        "pool; pool: one KV pool for every request (long contexts, memory shared); slots: each request slot its "
        "own --ctx-size of KV (default 8192), faster with many streams, and outputs never depend on what else "
        "runs or is cached",
    ),
    "flash_attention": Option(
        "--flash-attention",
        "WAI_FLASH_ATTENTION",
        "auto: llama.cpp's flash attention, except in the slots layout on a CPU (there it would make a stream's "
        "output depend on what runs beside it); on; off (needs --cache-type f16)",
    ),
    "cache_type": Option(
        "--cache-type", "WAI_CACHE_TYPE", "KV cache element type for K and V: f16, q8_0 (about half) or q4_0"
    ),
    "threads": Option("--threads", "WAI_THREADS", "CPU threads for decoding; 0 = physical cores"),
    "batch_size": Option("--batch-size", "WAI_BATCH_SIZE", "most tokens handed to one llama_decode call"),
    "max_stall_ms": Option(
        "--max-stall-ms",
        "WAI_MAX_STALL_MS",
        "longest running streams wait, per step, on newly admitted prompts (whole prompt blocks at the measured "
        "prompt speed, at least one); 0 = no bound",
    ),
    "prefill_block": Option(
        "--prefill-block",
        "WAI_PREFILL_BLOCK",
        "prompt tokens per block (the unit of prompt work and prefix reuse); 0 = 512 with a GPU, on a CPU 64 up to "
        "1.5B parameters, 32 up to 4B, else 16",
    ),
    "parallel": Option("--parallel", "WAI_PARALLEL", "requests decoded together in one batch (slots)"),
    "max_queue": Option(
        "--max-queue", "WAI_MAX_QUEUE", "requests that may wait for a slot; past it, 429 at once; 0 = no bound"
    ),
    "max_messages": Option(
        "--max-messages",
        "WAI_MAX_MESSAGES",
        "most messages one request's conversation may hold; past it, 400 before the prompt is rendered; 0 = no bound",
    ),
    "max_prompt_chars": Option(
        "--max-prompt-chars",
        "WAI_MAX_PROMPT_CHARS",
        "most characters a prompt may hold once rendered through the chat template; past it, 400 before it is "
        "tokenized; 0 = no bound",
    ),
    "gpu_layers": Option(
        "--gpu-layers", "WAI_GPU_LAYERS", "layers offloaded to the GPU; -1 = all (when built with CUDA/Metal)"
    ),
    "max_body_bytes": Option("--max-body-bytes", "WAI_MAX_BODY_BYTES", "largest request body accepted"),
    "lora_dir": Option(
        "--lora-dir", "WAI_LORA_DIR", "LoRA adapters: <name>.gguf files, and fine-tunes uploaded through the API"
    ),
    "api_token": Option(
        "--api-token", "WAI_API_TOKEN", "require Authorization: Bearer with this token (comma-separate several)"
    ),
    "api_token_file": Option("--api-token-file", "WAI_API_TOKEN_FILE", "a file of accepted tokens, one per line"),
    "chat_date": Option(
        "--chat-date",
        "WAI_CHAT_DATE",
        "the date a chat template writes into the prompt (Llama 3.1's system header): empty = the template's "
        "own default, so a request gives the same prompt on any day; 'today'; or a date such as '25 Nov 2026'",
    ),
    "log_level": Option("--log-level", "WAI_LOG_LEVEL", "debug, info, warning or error"),
}


def _add_options(
    cli: argparse.ArgumentParser,
    defaults: Settings | ClusterSettings,
    options: Mapping[str, Option],
    environ: Mapping[str, str],
) -> None:
    """A flag for each field of the settings dataclass `defaults`, its default taken from the environment if set."""
    for field in fields(defaults):
        option = options[field.name]
        kind = type(getattr(defaults, field.name))
        default = getattr(defaults, field.name)
        if option.env in environ:
            try:
                default = kind(environ[option.env])
            except ValueError as exc:
                raise SystemExit(f"{option.env}={environ[option.env]!r} is not a valid {kind.__name__}") from exc
        cli.add_argument(
            option.flag,
            dest=field.name,
            type=kind,
            default=default,
            # A token must not show up in --help just because it came from the environment.
            help=f"{option.help} [env {option.env}]"
            if field.name == "api_token"
            else f"{option.help} [env {option.env}; default: %(default)s]",
        )


def parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="python -m workers_ai_local",
        description="Serve the Cloudflare Workers AI text-generation API for "
        "@cf/meta/llama-3.1-8b-instruct-fast on a local llama.cpp model.",
        epilog="Each flag can also be set by the environment variable shown beside it; a flag wins over it.",
    )
    _add_options(cli, Settings(), OPTIONS, environ)
    return cli


def configure_logging(level: str) -> None:
    """The log format every process of ours writes (the server, and Ray Serve's driver and replicas)."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    args = parser(env).parse_args(argv)
    return Settings(**vars(args))


@dataclass(frozen=True)
class ClusterSettings:
    """`python -m workers_ai_local.ray_serve`'s own settings: how many engine replicas Ray Serve runs and how it
    routes to them. Every other flag is the server's (Settings), given to each replica."""

    replicas: int = 1
    ray_address: str = ""
    min_replicas: int = 0
    max_replicas: int = 0
    target_ongoing: float = 2.0
    gpus_per_replica: float = 0.0
    health_period_s: float = 2.0

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > 0


CLUSTER_OPTIONS: dict[str, Option] = {
    "replicas": Option("--replicas", "WAI_RAY_REPLICAS", "engine replicas, each with its own model and KV cache"),
    "ray_address": Option(
        "--address",
        "RAY_ADDRESS",
        "join this Ray cluster (HOST:PORT of `ray start --head`); empty = start a throwaway one on 127.0.0.1",
    ),
    "min_replicas": Option("--min-replicas", "WAI_RAY_MIN_REPLICAS", "autoscaling: fewest replicas"),
    "max_replicas": Option(
        "--max-replicas", "WAI_RAY_MAX_REPLICAS", "autoscaling: most replicas; 0 = no autoscaling (--replicas fixed)"
    ),
    "target_ongoing": Option(
        "--target-ongoing",
        "WAI_RAY_TARGET_ONGOING",
        "autoscaling: requests in progress per replica that Serve scales towards",
    ),
    "gpus_per_replica": Option(
        "--gpus-per-replica", "WAI_RAY_GPUS_PER_REPLICA", "GPUs Ray reserves for each replica (one per GPU: 1)"
    ),
    "health_period_s": Option(
        "--health-period", "WAI_RAY_HEALTH_PERIOD", "seconds between Serve's health checks of each replica"
    ),
}


def load_cluster_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[ClusterSettings, Settings, list[str]]:
    """The cluster's settings, the replicas' server settings, and the server flags as given (passed on to each
    replica, which reads them with load_settings there)."""
    env = os.environ if environ is None else environ
    cli = argparse.ArgumentParser(
        prog="python -m workers_ai_local.ray_serve",
        description="Serve the same API through Ray Serve, on several engine replicas. Every flag of "
        "`python -m workers_ai_local` is taken too and applies to each replica; --host and --port are the Serve "
        "proxy's.",
        add_help=False,
    )
    _add_options(cli, ClusterSettings(), CLUSTER_OPTIONS, env)
    ours, server_argv = cli.parse_known_args(argv)
    if "-h" in server_argv or "--help" in server_argv:
        cli.print_help()
        print()
        parser(env).parse_args(["--help"])  # the server's flags, then exits
    cluster = ClusterSettings(**vars(ours))
    if cluster.replicas < 1 or (cluster.autoscaling and not 0 <= cluster.min_replicas <= cluster.max_replicas):
        raise SystemExit("--replicas must be at least 1, and --min-replicas at most --max-replicas")
    return cluster, load_settings(server_argv, env), server_argv
