"""llama.cpp's buffers in transparent huge pages: the server re-executes itself once with glibc's malloc asking for
them (server/huge_pages.py), and --huge-pages 0 leaves the system's default."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess

from server import huge_pages

madvise_only = pytest.mark.skipif(
    huge_pages.thp_mode() != "madvise", reason="THP mode is not madvise: glibc's tunable changes nothing here"
)


def environ_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in entries if entry)


@madvise_only
def test_the_server_restarts_itself_into_huge_pages_and_can_be_told_not_to(server, tmp_path):
    # Same pid: whoever started the server (a supervisor, this suite) still holds it after the re-execution.
    assert environ_of(server.process.pid)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert httpx.get(f"{server.url}/health").json()["huge_pages_mib"] > 0
    with ServerProcess(tmp_path / "small.log", "--huge-pages", "0", "--ctx-size", "512", "--parallel", "1") as proc:
        assert "GLIBC_TUNABLES" not in environ_of(proc.process.pid)
        assert httpx.get(f"{proc.url}/health").json()["huge_pages_mib"] == 0


def test_the_users_own_tunables_are_kept_and_their_choice_wins(tmp_path, monkeypatch):
    mode = tmp_path / "enabled"
    monkeypatch.setattr(huge_pages, "THP_MODE", mode)
    mode.write_text("always [madvise] never\n")
    assert huge_pages.tunables_with_huge_pages({}) == "glibc.malloc.hugetlb=1"
    kept = huge_pages.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert kept == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert huge_pages.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    for other in ("[always] madvise never\n", "always madvise [never]\n"):
        mode.write_text(other)
        assert huge_pages.tunables_with_huge_pages({}) is None
