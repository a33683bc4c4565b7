"""The run's dated artifact: its conditions, taken here and never typed by hand,
then the table, as one Markdown file; and ``docs/benchmarks/latest.md``, which
docs/performance.md includes: every run that holds the newest published figures
of some section, newest first.

    python benchmarks/artifact.py   # write latest.md again from the runs in docs/benchmarks/

``run.py --publish`` writes a run to docs/benchmarks/ and calls ``write_latest``;
``run.py --out PATH`` writes the same file anywhere else.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from harness import REPO, REQUIRED
from harness import versions as installed

DOCS_RUNS = REPO / "docs" / "benchmarks"
LATEST = "latest.md"
NOT_RECORDED = "not recorded"
NO_GIT = "nogit"
KEY_VERSIONS = ("pydantic-ai-slim", "mlflow", "opentelemetry-sdk")
"""What a figure depends on most, named first; the other compared tools follow."""


# ---------------------------------------------------------------- the run's conditions


@dataclass(frozen=True)
class Source:
    """The commit the measured code comes from, and the top-level paths with uncommitted changes."""

    commit: str
    dirty: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.commit == NO_GIT:
            return f"not a git checkout: commit and changes {NOT_RECORDED}"
        if not self.dirty:
            return f"commit {self.commit}, clean"
        return f"commit {self.commit}, dirty (uncommitted changes in {', '.join(self.dirty)})"


def source_state(repo: Path = REPO) -> Source:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=30).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return Source(NO_GIT)
    if not head:
        return Source(NO_GIT)
    # porcelain v1: two status letters and a space, then the path (a rename: "old -> new")
    changed = {line[3:].split(" -> ")[-1].strip('"').split("/")[0] for line in status.splitlines()}
    return Source(head, tuple(sorted(changed)))


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name as the kernel gives it (x86 "model name", some ARM boards "Hardware")."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return f"{NOT_RECORDED} (no {cpuinfo})"
    for key in ("model name", "Hardware", "cpu model", "Processor"):
        found = re.search(rf"^{key}\s*:\s*(.+)$", text, flags=re.MULTILINE)
        if found:
            return found.group(1).strip()
    return f"{NOT_RECORDED} ({cpuinfo} names none)"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return NOT_RECORDED


@dataclass
class RunInfo:
    """Taken by ``start`` before anything is measured, completed by ``end`` after the last section."""

    started: datetime
    command: str
    source: Source
    machine: str
    load_at_start: str
    versions: dict[str, str]
    load_at_end: str = NOT_RECORDED
    wall_s: float | None = None
    _clock: float = field(default=0.0, repr=False)

    @classmethod
    def start(cls, argv: Sequence[str] | None = None) -> RunInfo:
        found = installed([*KEY_VERSIONS, *(d for d in REQUIRED if d not in KEY_VERSIONS)])
        machine = f"{platform.platform()}; {os.cpu_count()} cores; CPU {cpu_model()}"
        return cls(started=datetime.now(timezone.utc),
                   command=shlex.join([sys.executable, *(sys.argv if argv is None else argv)]),
                   source=source_state(), machine=machine, load_at_start=load_average(),
                   versions={"Python": f"{platform.python_version()} ({sys.executable})", **found},
                   _clock=time.monotonic())

    def end(self) -> None:
        self.load_at_end = load_average()
        self.wall_s = time.monotonic() - self._clock

    def heading(self, sections: str) -> str:
        return (f"### Run of {self.started:%Y-%m-%d %H:%M} UTC at {self.source.commit}"
                f"{' (dirty)' if self.source.dirty else ''}: {_sections(sections)}")

    def metadata(self) -> list[str]:
        wall = NOT_RECORDED if self.wall_s is None else f"{self.wall_s:.0f} s"
        return [
            f"- written by `benchmarks/run.py`, not by hand; started {self.started:%Y-%m-%d %H:%M:%S} UTC, "
            f"wall time of the run {wall}",
            f"- command: `{self.command}`",
            f"- traced-run source: {self.source}",
            f"- machine: {self.machine}",
            f"- load average (1/5/15 min): at start {self.load_at_start}; at end {self.load_at_end}",
            f"- versions: {', '.join(f'{name} {version}' for name, version in self.versions.items())}",
        ]


def _sections(sections: str) -> str:
    if not sections:
        return "no section measured"
    if len(sections) == 1:
        return f"section {sections}"
    return f"sections {', '.join(sections[:-1])} and {sections[-1]}"


# ---------------------------------------------------------------- docs/benchmarks/


NAME = re.compile(r"(?P<date>\d{4}-\d{2}-\d{2})(?:-(?P<time>\d{4}))?-(?P<commit>[0-9a-z]+)(?P<dirty>-dirty)?"
                  r"-s(?P<sections>[1-6]+)(?:-(?P<n>\d+))?\.md")
"""<date>[-<HHMM> UTC]-<commit>[-dirty]-s<sections with rows>[-<n>].md; the runs converted
from hand-pasted tables have no time: it was not recorded."""


@dataclass(frozen=True)
class Published:
    path: Path
    date: str
    time: str
    commit: str
    sections: str
    n: int

    @classmethod
    def of(cls, path: Path) -> Published:
        found = NAME.fullmatch(path.name)
        if not found:
            raise ValueError(f"{path}: not a benchmark run's name "
                             "(<date>[-HHMM]-<commit>[-dirty]-s<sections>.md)")
        return cls(path, found["date"], found["time"] or "", found["commit"] + (found["dirty"] or ""),
                   found["sections"], int(found["n"] or 1))

    @property
    def order(self) -> tuple[str, str, int, str]:
        """Oldest first; a run without a recorded time goes before the timed ones of its day."""
        return self.date, self.time, self.n, self.path.name

    @property
    def label(self) -> str:
        at = f" {self.time[:2]}:{self.time[2:]} UTC" if self.time else ""
        return f"the run of {self.date}{at} at {self.commit}"


def publish(report: str, info: RunInfo, sections: str, directory: Path = DOCS_RUNS,
            root: Path = REPO) -> Path:
    """Write ``report`` as a new dated file (never over an earlier run: each is history), then latest.md."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = (f"{info.started:%Y-%m-%d-%H%M}-{info.source.commit}{'-dirty' if info.source.dirty else ''}"
            f"-s{sections}")
    path, n = directory / f"{stem}.md", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}.md"
    path.write_text(report, encoding="utf-8")
    write_latest(directory, root)
    return path


def runs(directory: Path = DOCS_RUNS) -> list[Published]:
    """Every published run, newest first."""
    found = [Published.of(path) for path in directory.glob("*.md") if path.name != LATEST]
    return sorted(found, key=lambda run: run.order, reverse=True)


def newest(published: Sequence[Published]) -> dict[str, Published]:
    """Section -> the newest run that measured it (``published`` newest first)."""
    chosen: dict[str, Published] = {}
    for run in published:
        for section in run.sections:
            chosen.setdefault(section, run)
    return dict(sorted(chosen.items()))


def latest_text(directory: Path = DOCS_RUNS, root: Path = REPO) -> str:
    published = runs(directory)
    chosen = newest(published)
    shown = [run for run in published if run in chosen.values()]
    by_run = [f"{_sections(''.join(s for s, r in chosen.items() if r == run))} from {run.label}"
              for run in shown]
    lines = [
        "<!-- Written by benchmarks/artifact.py (`python benchmarks/run.py --publish` runs it) from the runs "
        "in docs/benchmarks/: do not edit. -->",
        "",
        f"The newest published figures: {'; '.join(by_run) or 'none yet'}. Each of these runs follows, "
        "newest first, with the conditions it was measured in; every published run, older ones too, is a "
        "file in `docs/benchmarks/`.",
    ]
    for run in shown:
        lines += ["", f'--8<-- "{run.path.relative_to(root).as_posix()}"']
    return "\n".join(lines) + "\n"


def write_latest(directory: Path = DOCS_RUNS, root: Path = REPO) -> Path:
    path = directory / LATEST
    path.write_text(latest_text(directory, root), encoding="utf-8")
    return path


if __name__ == "__main__":
    try:
        print(f"wrote {write_latest()}")
    except (OSError, ValueError) as error:
        raise SystemExit(f"benchmarks/artifact.py: {error}") from None
