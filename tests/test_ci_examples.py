"""The CI recipes in examples/ci/ are valid against the published schemas of their CI systems.

The schemas are schemastore's GitHub workflow and GitLab CI schemas and compose-spec's schema, as vendored (offline)
in check-jsonschema. Their server steps run here as scripts in tests/test_package.py, against the installed package.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_ROOT

EXAMPLES = PROJECT_ROOT / "examples" / "ci"
RECIPES = {
    "github-actions.yml": "vendor.github-workflows",
    "gitlab-ci.yml": "vendor.gitlab-ci",
    "docker-compose.yml": "vendor.compose-spec",
}


def load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def validate(path: Path, schema: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_valid_against_its_published_schema(name):
    result = validate(EXAMPLES / name, RECIPES[name])
    assert result.returncode == 0, result.stdout + result.stderr


# One typo a user could make in each file: the same check must reject it, so a pass above means something.
TYPOS = {
    "github-actions.yml": ("runs-on: ubuntu-latest", "run-on: ubuntu-latest"),
    "gitlab-ci.yml": ("  before_script:", "  befor_script:"),
    "docker-compose.yml": ("    healthcheck:", "    health_check:"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_schema_check_rejects_a_typo(name, tmp_path):
    good, bad = TYPOS[name]
    text = (EXAMPLES / name).read_text()
    assert good in text
    broken = tmp_path / name
    broken.write_text(text.replace(good, bad, 1))
    assert validate(broken, RECIPES[name]).returncode == 1


def test_recipes_pin_the_llama_cpp_python_the_package_needs():
    pin = re.search(r'"llama-cpp-python==([0-9.]+)"', (PROJECT_ROOT / "pyproject.toml").read_text())
    assert pin is not None
    for name in ("github-actions.yml", "gitlab-ci.yml"):
        versions = set(re.findall(r"llama-cpp-python==([0-9.]+)", (EXAMPLES / name).read_text()))
        versions |= set(re.findall(r"-llama-([0-9.]+\d)-", (EXAMPLES / name).read_text()))
        assert versions == {pin.group(1)}, name


def test_github_caches_the_folders_the_install_and_pull_steps_use():
    steps = {step.get("name"): step for step in load("github-actions.yml")["jobs"]["vitest"]["steps"]}
    cached = steps["Cache llama.cpp and the model"]["with"]["path"].split()
    assert "~/.cache/workers-ai-local/wheels" in cached
    assert "wheels=~/.cache/workers-ai-local/wheels" in steps["Install workers-ai-local"]["run"]
    # huggingface-hub's default cache (HF_HOME unset): where `pull` puts the model (checked by running it).
    assert "~/.cache/huggingface/hub" in cached
