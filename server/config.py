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
# The Cloudflare API token --upstream forwards with: a credential, so never a flag.
UPSTREAM_TOKEN_ENV = "CLOUDFLARE_API_TOKEN"
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
    max_asset_bytes: int = 500 * 1000 * 1000
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    allowed_hosts: str = ""
    cors_origins: str = ""
    lora_dir: str = str(Path.home() / ".cache" / "workers-ai-local" / "lora")
    api_token: str = ""
    api_token_file: str = ""
    chat_date: str = ""
    gateway_dir: str = ""
    gateway_cache_ttl: int = 0
    gateway_max_logs: int = 10000
    gateway_max_cache_bytes: int = 256 * 1024 * 1024
    fault: str = ""
    fault_seed: int = 0
    upstream: str = ""
    record: str = ""
    replay: str = ""
    on_miss: str = "fail"
    log_level: str = "info"
    strict: bool = False

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
    "max_asset_bytes": Option(
        "--max-asset-bytes",
        "WAI_MAX_ASSET_BYTES",
        "largest fine-tune asset upload (the whole multipart body), counted as it arrives, declared or chunked",
    ),
    "max_header_bytes": Option(
        "--max-header-bytes", "WAI_MAX_HEADER_BYTES", "largest request head (request line and headers together)"
    ),
    "max_headers": Option("--max-headers", "WAI_MAX_HEADERS", "most headers one request may carry"),
    "header_timeout": Option(
        "--header-timeout",
        "WAI_HEADER_TIMEOUT",
        "seconds a client has to send a request's headers, from connecting or from the first byte of a later "
        "request on the connection; 0 = no bound",
    ),
    "shutdown_timeout": Option(
        "--shutdown-timeout",
        "WAI_SHUTDOWN_TIMEOUT",
        "seconds requests in progress get to finish after SIGTERM or Ctrl-C before they are cancelled; 0 = no bound",
    ),
    "allowed_hosts": Option(
        "--allowed-hosts",
        "WAI_ALLOWED_HOSTS",
        "Host names served besides loopback ones (comma-separated; *.example.com; * = any); while bound to "
        "loopback, any other Host is refused (DNS rebinding)",
    ),
    "cors_origins": Option(
        "--cors-origins",
        "WAI_CORS_ORIGINS",
        "origins of web pages allowed to call the API (comma-separated, e.g. http://localhost:3000; * = any); a "
        "request with any other Origin is refused",
    ),
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
    "gateway_dir": Option(
        "--gateway-dir",
        "WAI_GATEWAY_DIR",
        "AI Gateway: the folder of its SQLite database (cached answers and logs), kept across restarts; empty = "
        "in memory",
    ),
    "gateway_cache_ttl": Option(
        "--gateway-cache-ttl",
        "WAI_GATEWAY_CACHE_TTL",
        "AI Gateway: seconds an answer stays cached when a request sets no TTL of its own (the gateway's "
        "'Cache Responses' setting); 0 = not cached unless asked",
    ),
    "gateway_max_logs": Option(
        "--gateway-max-logs", "WAI_GATEWAY_MAX_LOGS", "AI Gateway: logs kept per gateway; past it the oldest go"
    ),
    "gateway_max_cache_bytes": Option(
        "--gateway-max-cache-bytes",
        "WAI_GATEWAY_MAX_CACHE_BYTES",
        "AI Gateway: bytes of cached answers kept; past it those closest to expiring go",
    ),
    "fault": Option(
        "--fault",
        "WAI_FAULT",
        "faults drawn for run requests, FAULT:RATE[,FAULT:RATE...]: capacity (3040), daily-limit (3036), 4006, "
        "timeout (3007), aborted (3008), internal (3043) or stream-N (a stream cut after N pieces of text); a "
        "request names its own in the x-workers-ai-local-fault header (docs/testing-workers.md)",
    ),
    "fault_seed": Option(
        "--fault-seed", "WAI_FAULT_SEED", "seed of the --fault draws: the same requests meet the same faults"
    ),
    "upstream": Option(
        "--upstream",
        "WAI_UPSTREAM",
        "forward run requests to this Cloudflare API account URL (https://api.cloudflare.com/client/v4/accounts/ID, "
        "the token from CLOUDFLARE_API_TOKEN) and record the answers in --record",
    ),
    "record": Option("--record", "WAI_RECORD", "the folder --upstream writes its recordings to"),
    "replay": Option(
        "--replay", "WAI_REPLAY", "answer run requests from the recordings in this folder, with no network"
    ),
    "on_miss": Option(
        "--on-miss", "WAI_ON_MISS", "a request --replay has no recording of: fail (an error naming it) or local"
    ),
    "log_level": Option("--log-level", "WAI_LOG_LEVEL", "debug, info, warning or error"),
    "strict": Option(
        "--strict",
        "WAI_STRICT",
        "refuse what the hosted model refuses: JSON mode (5025) and this server's extension routes and fields, "
        "so what passes here passes in production (docs/compatibility.md)",
    ),
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
                default = _flag(environ[option.env]) if kind is bool else kind(environ[option.env])
            except ValueError as exc:
                raise SystemExit(f"{option.env}={environ[option.env]!r} is not a valid {kind.__name__}") from exc
        if kind is bool:  # a switch: --strict / --no-strict
            help_text = f"{option.help} [env {option.env}=1; default: %(default)s]"
            cli.add_argument(option.flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default,
                             help=help_text)  # fmt: skip
            continue
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


def _flag(value: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if value.strip().lower() not in words:
        raise ValueError(value)
    return words[value.strip().lower()]


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
