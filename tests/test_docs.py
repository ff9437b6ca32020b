"""The docs cannot rot: every fenced code block of README.md and docs/*.md is run, parsed or marked, and every flag
and route they name must still exist.

The rules, for whoever writes a page:
- A block in a language a user runs (sh/bash/shell, python, js, ts, ...) is run here, against this module's test
  server: `http://127.0.0.1:8787` (and `localhost:8787`) is rewritten to its address. sh runs in bash (curl fails on
  an HTTP error), python in this venv's interpreter, js as an ES module by node in workers/ (Miniflare and wrangler
  come from workers/node_modules). A block that cannot or must not run here (a GPU, a long benchmark, a server of
  its own, a TypeScript config) has `<!-- not run: REASON -->` on the line right above its fence.
- A configuration block (toml, json, jsonc, yaml) is parsed.
- A block for reading only is labelled so: text, mermaid, diff, ... An unlabelled fence fails: say what it is.
- Every `--flag` anywhere in a page is a flag of the command it is given to: the server's (server/config.py OPTIONS),
  Ray Serve's (CLUSTER_OPTIONS), a project script's argparse flags (bench/, models/, tests/mutation.py ...), or an
  external tool's (EXTERNAL_FLAGS below; add one there when a page uses it). In prose a flag may be any of ours.
- Every route a page names (a `http://127.0.0.1:8787/...` URL outside python/js/ts blocks, which are run anyway and
  hold SDK base URLs, or a `GET /path`-style span) is served: the test server must not answer it with "Could not
  route to". `{placeholder}` and `<placeholder>` segments stand for any value.
- Every relative link points at a file that exists, and at a heading of it when it names one (#anchor).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import PROJECT_ROOT, TEST_CTX, ServerProcess

from workers_ai_local.config import CLUSTER_OPTIONS, OPTIONS, Settings

DOC_FILES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
DOCUMENTED_ADDRESS = re.compile(r"http://(?:127\.0\.0\.1|localhost):8787")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(\S.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")

SHELL = {"sh", "bash", "shell", "console", "zsh"}
PYTHON = {"python", "py", "python3"}
JAVASCRIPT = {"js", "javascript", "mjs"}
CONFIG = {"toml", "json", "jsonc", "yaml", "yml"}
READING = {"text", "txt", "mermaid", "diff", "output", "log", "http", "csv", "markdown", "md", "prometheus"}

# Flags of tools that are not ours, as the docs use them. A flag not listed for its tool fails the test, so a page
# that adds one adds it here, having checked that tool's --help.
EXTERNAL_FLAGS: dict[str, set[str]] = {
    "curl": set(
        "--data --request --header --no-buffer --silent --show-error --fail --fail-with-body --json --include "
        "--max-time --output --form --write-out".split()
    ),
    "wrangler": {"--env", "--config", "--port", "--ip", "--local", "--remote", "--var"},
    "vitest": {"--run", "--config", "--reporter"},
    "ray": {"--head", "--port", "--address", "--num-gpus", "--num-cpus", "--dashboard-host"},
    "serve": {"--address", "--name"},
    "pip": {"--no-deps", "--force-reinstall", "--upgrade", "--editable", "--quiet", "--no-binary", "--find-links"},
    "pipx": {"--pip-args", "--python", "--force", "--find-links"},  # --find-links: pip's, inside --pip-args
    "pytest": {"--durations", "--exitfirst", "--quiet", "--numprocesses"},
    "npm": {"--save-dev", "--no-audit", "--no-fund", "--prefix"},
    "node": {"--input-type"},
    "docker": {
        "--rm",
        "--publish",
        "--volume",
        "--env",
        "--gpus",
        "--name",
        "--tag",
        "--file",
        "--interactive",
        "--build-arg",
        "--cpus",
    },
    "buildah": {"--isolation", "--layers", "--format", "--build-arg", "--tag", "--file", "--volume"},
    "podman": {"--format"},
    "mmdebstrap": {"--variant", "--include"},
    "git": {"--depth", "--branch"},
    "uv": {"--python", "--with", "--find-links"},
    "llama-server": {"--kv-unified", "--parallel", "--ctx-size", "--n-gpu-layers", "--flash-attn", "--cont-batching"},
}
# What runs what: the first word of a command, or python -m's module, to the tool whose flags it takes.
PROGRAMS = {"python": "python", "python3": "python", ".venv/bin/python": "python", "npx": "npx", "make": "make"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason given, when marked

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(PROJECT_ROOT)}:{self.line} (```{self.lang or ''} block)"

    def excerpt(self) -> str:
        lines = self.code.splitlines()
        return "\n".join(["    " + line for line in lines[:6]] + (["    ..."] if len(lines) > 6 else []))


def blocks_of(path: Path) -> list[Block]:
    """Fenced code blocks in document order, indented ones (in list items) included, their indent removed."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if closing and closing["fence"].startswith(fence[0] * len(fence)) and not closing["info"].strip():
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        marker = NOT_RUN.match(lines[i - 1]) if i > 0 else None
        lang = info.split()[0].lower() if info else ""
        found.append(Block(path, i + 1, lang, "\n".join(body) + "\n", marker[1] if marker else None))
        i = j + 1
    return found


def prose_of(path: Path) -> str:
    """The page without its fenced blocks and not-run markers (where flags and routes in running text are read)."""
    text = path.read_text()
    kept, inside = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if inside is None and match:
            inside = match["fence"]
        elif inside is not None and match and match["fence"].startswith(inside) and not match["info"].strip():
            inside = None
        elif inside is None:
            kept.append(line)
    return "\n".join(line for line in kept if not NOT_RUN.match(line))


ALL_BLOCKS = [block for path in DOC_FILES for block in blocks_of(path)]


def block_id(block: Block) -> str:
    return f"{block.path.relative_to(PROJECT_ROOT)}:{block.line}-{block.lang or 'unlabelled'}"


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for every block of every page. One decode thread: on a machine shared past its cores, llama.cpp's
    two threads wait on each other at every barrier, and a 16-token answer took 120 s on two threads against 3 s on
    one (load 16-20 on 2 cores); on an idle machine the blocks' short answers cost about the same either way."""
    folder = tmp_path_factory.mktemp("docs")
    proc = ServerProcess(
        folder / "server.log", "--threads", "1", "--kv-layout", "slots", "--ctx-size", str(TEST_CTX),
        "--lora-dir", str(folder / "lora"),
    )  # fmt: skip
    with proc:
        yield proc


def rewritten(code: str, server: ServerProcess) -> str:
    return DOCUMENTED_ADDRESS.sub(server.url, code).replace("127.0.0.1:8787", f"127.0.0.1:{server.port}")


def _report(block: Block, why: str, output: str = "") -> str:
    tail = f"\n--- its output (last 3000 characters):\n{output[-3000:]}" if output else ""
    return f"{block.where} {why}\n{block.excerpt()}{tail}"


# --- every block is run, parsed, read-only by label, or marked --------------------------------------------------


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=block_id)
def test_every_block_says_what_it_is(block: Block) -> None:
    if block.not_run is not None or block.lang in SHELL | PYTHON | JAVASCRIPT | CONFIG | READING:
        return
    if not block.lang:
        pytest.fail(_report(block, "has no language: label it (```sh, ```python, ```text, ...) so it is run, "
                                   "parsed or known to be for reading"))  # fmt: skip
    pytest.fail(_report(block, f"is in {block.lang!r}, which this test cannot run or parse: put "
                               "<!-- not run: REASON --> on the line right above its fence"))  # fmt: skip


def _config(block: Block) -> object:
    if block.lang == "toml":
        return tomllib.loads(block.code)
    if block.lang in ("yaml", "yml"):
        return yaml.safe_load(block.code)
    return json.loads(_strip_jsonc(block.code) if block.lang == "jsonc" else block.code)


def _strip_jsonc(text: str) -> str:
    """JSON with comments and trailing commas (wrangler.jsonc) as plain JSON; strings are left alone."""
    token = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.S)
    text = token.sub(lambda m: m[0] if m[0].startswith('"') else "", text)
    return re.sub(r",(\s*[}\]])", r"\1", text)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in CONFIG], ids=block_id)
def test_configuration_blocks_parse(block: Block) -> None:
    try:
        _config(block)
    except Exception as exc:  # any parser's error: the snippet is not valid in its own language
        pytest.fail(_report(block, f"does not parse as {block.lang}: {exc}"))


RUNNABLE = [b for b in ALL_BLOCKS if b.not_run is None and b.lang in SHELL | PYTHON | JAVASCRIPT]


@pytest.mark.parametrize("block", RUNNABLE, ids=block_id)
def test_runnable_blocks_run_against_a_real_server(block: Block, docs_server: ServerProcess) -> None:
    code = rewritten(block.code, docs_server)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    if block.lang in SHELL:
        # curl as documented, but an HTTP error fails the block instead of printing an error body.
        # A block that prints the status itself (-w) shows an error on purpose.
        prelude = (
            'curl() { case " $* " in *" -w "*|*" --write-out "*) set -- "$@";; *) set -- --fail-with-body "$@";; esac\n'
            '  command curl --silent --show-error --max-time 280 "$@"; }\n'
        )
        command, cwd = ["bash", "-euo", "pipefail", "-c", prelude + code], PROJECT_ROOT
    elif block.lang in PYTHON:
        command, cwd = [sys.executable, "-c", code], PROJECT_ROOT
    else:
        workers = PROJECT_ROOT / "workers"
        if shutil.which("node") is None or not (workers / "node_modules" / "miniflare").exists():
            pytest.skip(f"{block.where}: node and workers/node_modules are needed (make workers)")
        # An ES module evaluated in workers/, so its imports resolve against workers/node_modules.
        command, cwd = ["node", "--input-type=module", "--eval", code], workers
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(_report(block, "ran over 300 s", f"{exc.stdout or ''}{exc.stderr or ''}"))
    if done.returncode != 0:
        why = f"exited with {done.returncode} against {docs_server.url}"
        pytest.fail(_report(block, why, done.stdout + done.stderr))


# --- flags ----------------------------------------------------------------------------------------------------------


def _argparse_flags(source: Path) -> set[str]:
    """Every long flag given to an add_argument call in a Python file."""
    flags: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {arg.value for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value)[:2] == "--"}
    return flags


# A switch (a bool setting, such as --strict) also takes its --no- form.
SWITCHES = {OPTIONS[f.name].flag.replace("--", "--no-", 1) for f in fields(Settings) if f.type in (bool, "bool")}
SERVER_FLAGS = {option.flag for option in OPTIONS.values()} | SWITCHES | {"--help"}
RAY_SERVE_FLAGS = SERVER_FLAGS | {option.flag for option in CLUSTER_OPTIONS.values()}


@cache
def project_script_flags(relative: str) -> set[str] | None:
    path = PROJECT_ROOT / relative
    return _argparse_flags(path) | {"--help"} if path.is_file() and path.suffix == ".py" else None


@cache
def all_project_flags() -> set[str]:
    """Our own flags, wherever defined: the server's, Ray Serve's, and every argparse flag of our Python files
    (scripts, and subcommands such as a console command's)."""
    flags = RAY_SERVE_FLAGS | {"--version"}  # the console command reads --version itself (server/cli.py)
    for folder in ("server", "bench", "models", "deploy", "tests"):
        for source in (PROJECT_ROOT / folder).rglob("*.py"):
            flags |= _argparse_flags(source)
    return flags


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _tool_of(command: str) -> tuple[str, set[str]]:
    """The tool a command line runs, and the flags it takes."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        words = command.split()
    while words and ENV_ASSIGNMENT.match(words[0]):
        words.pop(0)
    if not words or words[0].startswith("-"):
        return "this project (a flag named on its own may be any of ours)", all_project_flags()
    program = PROGRAMS.get(words[0], Path(words[0]).name)
    if program == "npx" and len(words) > 1:
        program = words[1]
    if program == "python":
        if len(words) > 2 and words[1] == "-m":
            module = words[2]
            if module == "workers_ai_local":
                return "python -m workers_ai_local", SERVER_FLAGS
            if module.startswith("workers_ai_local.ray_serve"):
                return "python -m workers_ai_local.ray_serve", RAY_SERVE_FLAGS
            if module.startswith("workers_ai_local"):
                return f"python -m {module}", all_project_flags()
            program = module
        elif len(words) > 1 and words[1].endswith(".py"):
            flags = project_script_flags(words[1])
            if flags is None:
                return f"{words[1]} (no such script in this repository)", set()
            return words[1], flags
    if program == "make":
        target = next((word for word in words[1:] if not ENV_ASSIGNMENT.match(word) and word[:1] != "-"), "")
        return f"make {target}", RAY_SERVE_FLAGS if target == "ray-serve" else SERVER_FLAGS
    if program == "docker" and "run" in words[1:2]:  # what follows the image is the server's (its entrypoint)
        return "docker run", EXTERNAL_FLAGS["docker"] | SERVER_FLAGS
    if program in EXTERNAL_FLAGS:
        return program, EXTERNAL_FLAGS[program]
    return program, all_project_flags()  # our own console command, or a tool named in prose


def _commands(code: str) -> list[str]:
    """A shell block's commands: continuation lines joined, split at ;, &&, || and |."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [part for line in joined.splitlines() for part in re.split(r"&&|\|\||;|\|", line) if part.strip()]


def documented_flags(path: Path) -> list[tuple[str, str, str, set[str]]]:
    """(flag, where, tool, the tool's flags) for every long flag on a page."""
    found = []
    relative = path.relative_to(PROJECT_ROOT)
    for block in blocks_of(path):
        if block.lang in SHELL:
            for command in _commands(block.code):
                tool, flags = _tool_of(command)
                found += [(flag, block.where, tool, flags) for flag in FLAG.findall(command)]
        elif block.lang not in PYTHON | JAVASCRIPT | {"ts", "typescript"}:  # code's own -- operators are not flags
            found += [(flag, block.where, "this project", all_project_flags()) for flag in FLAG.findall(block.code)]
    # Inline code may wrap across lines: a span is whatever lies between a pair of backticks.
    for span in (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose_of(path))):
        tool, flags = _tool_of(span) if FLAG.search(span) else ("prose", set())
        found += [(flag, f"{relative} (`{span}`)", tool, flags) for flag in FLAG.findall(span)]
    prose = re.sub(r"`[^`]+`", " ", prose_of(path))
    found += [(flag, f"{relative} (text)", "this project", all_project_flags()) for flag in FLAG.findall(prose)]
    return found


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_documented_flag_exists(path: Path) -> None:
    missing = [
        f"{where}: {flag} is not a flag of {tool}" for flag, where, tool, flags in documented_flags(path)
        if flag not in flags
    ]  # fmt: skip
    assert not missing, "documented flags that do not exist:\n" + "\n".join(missing)


# --- routes ---------------------------------------------------------------------------------------------------------

METHOD_PATH = re.compile(r"\b(?:GET|POST|PUT|PATCH|DELETE) (/[^\s`\"',)]*)")
URL_PATH = re.compile(DOCUMENTED_ADDRESS.pattern + r"(/[^\s`\"'<>)\]]*)?")


def documented_routes(path: Path) -> list[tuple[str, str]]:
    """(path, where) for every route a page names."""
    found: list[tuple[str, str]] = []
    relative = path.relative_to(PROJECT_ROOT)
    for block in blocks_of(path):
        if block.lang in PYTHON | JAVASCRIPT | {"ts", "typescript"}:
            continue  # SDK base URLs are prefixes, not routes; these blocks are run (or say why not)
        found += [(match[1] or "/", block.where) for match in URL_PATH.finditer(block.code)]
        found += [(match[1], block.where) for match in METHOD_PATH.finditer(block.code)]
    prose = prose_of(path)
    found += [(match[1] or "/", f"{relative} (text)") for match in URL_PATH.finditer(prose)]
    found += [(match[1], f"{relative} (text)") for match in METHOD_PATH.finditer(prose)]
    return found


def _probe_path(route: str) -> str:
    route = route.split("?")[0].rstrip(".:;")
    route = re.sub(r"\{[^}]*\}|<[^>]*>", "x", route)
    return route.replace("[", "").replace("]", "") or "/"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_documented_route_is_served(path: Path, docs_server: ServerProcess) -> None:
    missing = []
    with httpx.Client(base_url=docs_server.url, timeout=30) as http:
        for route, where in sorted(set(documented_routes(path))):
            # GET: a route that takes another method answers 405, one that does not exist "Could not route to".
            answer = http.get(_probe_path(route))
            if answer.status_code == 404 and "Could not route to" in answer.text:
                missing.append(f"{where}: {route} is not served (GET {_probe_path(route)}: {answer.text[:200]})")
    assert not missing, "documented routes that the server does not serve:\n" + "\n".join(missing)


# --- links ----------------------------------------------------------------------------------------------------------

# Pages that other branches add and the README already links; the lead empties this once they are merged, and from
# then on a link to a missing page fails like any other.
PENDING_PAGES = {"docs/container.md", "docs/compatibility.md"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors_of(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation but - and _ dropped, spaces as -."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", prose_of(page), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for target in LINK.findall(prose_of(path)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here (no network)
        file, _, anchor = target.partition("#")
        page = (path.parent / file).resolve() if file else path
        relative = page.relative_to(PROJECT_ROOT).as_posix() if page.is_relative_to(PROJECT_ROOT) else str(page)
        if not page.exists():
            if relative not in PENDING_PAGES:
                broken.append(f"{path.relative_to(PROJECT_ROOT)}: ({target}): {relative} does not exist")
        elif anchor and page.suffix == ".md" and anchor not in anchors_of(page):
            broken.append(f"{path.relative_to(PROJECT_ROOT)}: ({target}): {relative} has no heading #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)
