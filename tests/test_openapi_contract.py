"""The served /openapi.json as a contract, checked by schemathesis with every check it has: requests generated from
the document (valid ones and invalid ones, each documented operation and methods it leaves out), and every answer
held to what the document says of it: its status, content type, headers and body, SSE events one by one.

The server under test serves the Llama 3.1 stand-in (its 128K vocabulary and template; fast on two cores) with a
small context so that generated budgets finish quickly, in a LoRA folder of its own (the fuzzer creates fine-tunes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import STANDIN_CACHE, ServerProcess
from llama31_standin import tiny

# Enough examples per operation for hypothesis to explore each schema, few enough for the suite's time budget.
MAX_EXAMPLES = 12
# The operations in three groups, each fuzzed by its own schemathesis process at once: the server batches them
# on its slots. (Processes, not schemathesis's worker threads: those trip CPython 3.11's "AST constructor
# recursion depth mismatch" inside hypothesis.) A route that is another URL of the same handler and schema (the
# account-prefixed run and OpenAI routes, /ai-gateway/run) is left to the behavioural matrix: fuzzing it again
# would double the suite's time and find nothing the first URL does not.
SAME_HANDLER = r"^/client/v4/accounts/[^/]+/ai/(run/|v1/)|^/ai-gateway/run$"
GROUPS = {
    "workers-ai": ["--include-path-regex", "^/ai/(run|tokenize)/"],
    "openai": ["--include-path-regex", "^/v1/"],
    "the rest": ["--exclude-path-regex", rf"^/ai/(run|tokenize)/|^/v1/|{SAME_HANDLER}"],
}


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("contract")
    # A 128-token window keeps each generated run short; a prompt that does not fit is a documented 400.
    proc = ServerProcess(
        folder / "server.log", "--model", str(tiny(STANDIN_CACHE)), "--ctx-size", "128", "--kv-size", "1024",
        "--lora-dir", str(folder / "lora"), "--max-body-bytes", "262144",
    )  # fmt: skip
    with proc:
        yield proc


def test_schemathesis_finds_the_served_api_true_to_its_document(contract_server, tmp_path):
    tests = str(Path(__file__).parent)
    env = {
        **os.environ, "SCHEMATHESIS_HOOKS": "contract_hooks", "NO_COLOR": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p),
    }  # fmt: skip
    runs = {}
    for name, selection in GROUPS.items():
        command = [
            sys.executable, "-m", "schemathesis.cli", "run", f"{contract_server.url}/openapi.json", *selection,
            "--checks", "all", "--exclude-checks", "positive_data_acceptance,negative_data_rejection",
            "--max-examples", str(MAX_EXAMPLES),
            "--seed", "7", "--request-timeout", "60",
        ]  # fmt: skip
        out = (tmp_path / f"{name}.txt").open("w")
        runs[name] = (subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env), out)
    failed = []
    for name, (run, out) in runs.items():
        code = run.wait(timeout=600)
        out.close()
        output = (tmp_path / f"{name}.txt").read_text()
        if code != 0 or ("No issues found" not in output and " passed" not in output):
            failed.append(f"--- {name} (exit {code}) ---\n{output[-6000:]}")
    assert not failed, "\n".join(failed)
