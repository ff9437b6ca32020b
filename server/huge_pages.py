"""Transparent huge pages for llama.cpp's own buffers (the repacked weights and the KV cache).

llama.cpp allocates them with posix_memalign, which glibc serves from 4 KiB pages unless its malloc is told to
ask for huge ones: the tunable glibc.malloc.hugetlb=1 makes it madvise(MADV_HUGEPAGE) every chunk it maps, which
is what a system in THP mode "madvise" (the common default) waits for. On a CPU most of a Q4_K model is repacked
into such a buffer, so a decode step reads gigabytes through 4 KiB pages otherwise, and pays the page walks (in a
virtual machine, walks of two page tables). glibc reads GLIBC_TUNABLES only when a process starts, and
madvise(MADV_COLLAPSE) on the buffers afterwards is missing from some kernels (EINVAL on the 6.18 VM this was
measured on), so the server re-executes itself once, before it loads anything, with the tunable added.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The system's THP mode (always, madvise or never), or None where there is none to read."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def tunables_with_huge_pages(environ: Mapping[str, str]) -> str | None:
    """GLIBC_TUNABLES with glibc's malloc asking for huge pages, or None where that would change nothing: not
    Linux, THP "always" (huge pages already) or "never", or the tunable already set (by us, or by the user)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or thp_mode() != "madvise" or f"{TUNABLE}=" in current:
        return None
    return ":".join(part for part in (current, f"{TUNABLE}=1") if part)


def restart_with_huge_pages() -> None:
    """Re-execute this process (same pid, same command line) with glibc's malloc asking for huge pages, where that
    changes anything; returns only where it does not."""
    tunables = tunables_with_huge_pages(os.environ)
    if tunables is None:
        return
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})


def huge_page_bytes() -> int:
    """Bytes of this process's anonymous memory in transparent huge pages (AnonHugePages); 0 where unknown."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0
