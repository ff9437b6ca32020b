"""Mutation testing: apply each plausible bug from tests/mutants.toml to a scratch copy of the tree, one at a time, and
see whether the suite notices. `make mutation` runs it; it is not part of `make test` (a full run takes an hour or
more on 2 cores).

A mutant names a file, an exact piece of its text and what to put instead, and the tests most likely to notice it:
those run first, stopping at the first failure, and only a mutant they miss pays for the whole suite. A survivor
the project accepts carries its reason in `accepted`; any other survivor is a gap in the tests and fails the run.

    python tests/mutation.py [--only NAME ...] [--tests-from REV] [--report FILE]

`--tests-from REV` runs the tests of another commit against today's server (to score the suite before a change).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = Path(__file__).with_name("mutants.toml")
# Large or generated things the copy links to rather than copies.
LINKED = ("workers/node_modules",)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    accepted: str = ""
    occurrences: int = 1  # how often `find` stands in the file; each is replaced

    def apply(self, tree: Path) -> None:
        path = tree / self.file
        text = path.read_text()
        found = text.count(self.find)
        if found != self.occurrences:
            where = f"{self.file} {found} times, not {self.occurrences}"
            raise SystemExit(f"mutant {self.name}: its text occurs in {where}")
        path.write_text(text.replace(self.find, self.replace))


def load(names: list[str]) -> list[Mutant]:
    entries = tomllib.loads(MUTANTS.read_text())["mutant"]
    mutants = [Mutant(**{**entry, "tests": tuple(entry.get("tests", ()))}) for entry in entries]
    unknown = set(names) - {m.name for m in mutants}
    if unknown:
        raise SystemExit(f"no such mutant: {', '.join(sorted(unknown))}")
    return [m for m in mutants if not names or m.name in names]


def copy_tree(target: Path, tests_from: str | None) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file() and not any(name.startswith(linked) for linked in LINKED):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    for linked in LINKED:
        if (ROOT / linked).exists():
            (target / linked).parent.mkdir(parents=True, exist_ok=True)
            (target / linked).symlink_to(ROOT / linked)
    if tests_from:
        shutil.rmtree(target / "tests")
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)


def package_view(tree: Path) -> Path:
    """A folder for PYTHONPATH in which `import workers_ai_local` is the tree's own server/ (the venv's editable
    install points at the repository, not at this copy): the package's folders as pyproject's package-dir maps them,
    made of links to the tree's files, so a module's resolved path is still the tree's."""
    view = tree / ".package-view"
    shutil.rmtree(view, ignore_errors=True)  # a copied tree's view links to the tree it was copied from
    mapping = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items(), reverse=True):
        target = view.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for entry in (tree / folder).iterdir():
            if not (target / entry.name).exists():  # a subpackage's own folder, made above, wins
                (target / entry.name).symlink_to(entry)
    return view


def suite_passes(tree: Path, selection: list[str], extra: list[str]) -> bool:
    """The selected tests pass (stopping at the first failure). pytest's exit 5, no test collected, is a pass:
    a hint that names no test of an older suite."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *selection]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(package_view(tree)), os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env)
    return run.returncode in (0, 5)


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--only", nargs="*", default=[], help="mutants to run, by name")
    cli.add_argument("--tests-from", help="a git revision whose tests/ to run instead of today's")
    cli.add_argument("--report", type=Path, help="write the results as Markdown here too")
    cli.add_argument("--pytest-args", default="", help="more pytest arguments for every run, e.g. deselections")
    cli.add_argument("--skip-baseline", action="store_true", help="the unmutated suite was just seen to pass")
    cli.add_argument(
        "--skip-accepted", action="store_true", help="leave out the accepted survivors (each costs a suite)"
    )
    args = cli.parse_args()
    mutants = [m for m in load(args.only) if not (args.skip_accepted and m.accepted)]
    extra = args.pytest_args.split()
    rows, gaps = [], []
    with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
        base = Path(scratch) / "base"
        copy_tree(base, args.tests_from)
        if not args.skip_baseline and not suite_passes(base, [], extra):
            raise SystemExit("the suite fails without any mutant: fix that first")
        for mutant in mutants:
            tree = Path(scratch) / mutant.name
            shutil.copytree(base, tree, symlinks=True)
            mutant.apply(tree)
            started = time.monotonic()
            hinted = [t for t in mutant.tests if (tree / t.split("::")[0]).exists()]
            killed = (bool(hinted) and not suite_passes(tree, hinted, extra)) or not suite_passes(tree, [], extra)
            seconds = time.monotonic() - started
            verdict = "killed" if killed else ("accepted" if mutant.accepted else "SURVIVED")
            rows.append(f"| {mutant.name} | {verdict} | {seconds:.0f} s | {mutant.accepted} |")
            print(f"{verdict:>9}  {mutant.name}  ({seconds:.0f} s)", flush=True)
            if not killed and not mutant.accepted:
                gaps.append(mutant.name)
            shutil.rmtree(tree)
    killed_count = sum(" killed " in row for row in rows)
    summary = f"{killed_count} of {len(rows)} mutants killed"
    report = "\n".join(["| mutant | verdict | time | why a survivor is accepted |", "|---|---|---|---|", *rows])
    print(f"\n{report}\n\n{summary}; unaccepted survivors: {', '.join(gaps) or 'none'}")
    if args.report:
        args.report.write_text(f"{report}\n\n{summary}\n")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
