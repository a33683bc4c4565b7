"""The benchmark's published runs (benchmarks/artifact.py): each run a new dated
file, never over another, and docs/benchmarks/latest.md, which the Performance
page includes, the runs holding the newest figures of each section."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import artifact
from artifact import RunInfo, Source

TABLE = "| # | Measure | Variant |\n|---|---|---|\n| {n} | a measure | traced-run |\n"


def _info(when: str, commit: str = "abc1234", dirty: tuple[str, ...] = ()) -> RunInfo:
    return RunInfo(started=datetime.fromisoformat(when).replace(tzinfo=timezone.utc),
                   command="python benchmarks/run.py", source=Source(commit, dirty), machine="m",
                   load_at_start="0.10 / 0.20 / 0.30", versions={"Python": "3.11.7"})


def _publish(directory: Path, when: str, sections: str, commit: str = "abc1234",
             dirty: tuple[str, ...] = ()) -> Path:
    info = _info(when, commit, dirty)
    return artifact.publish(f"{info.heading(sections)}\n\n{TABLE.format(n=sections[0])}", info, sections,
                            directory, root=directory)


def _includes(latest: str) -> list[str]:
    return [line.split('"')[1] for line in latest.splitlines() if line.startswith("--8<--")]


def test_latest_md_lists_the_runs_in_docs_benchmarks() -> None:
    """Nobody edits latest.md: it is what artifact.py makes of the files next to it."""
    latest = artifact.DOCS_RUNS / artifact.LATEST
    assert latest.read_text(encoding="utf-8") == artifact.latest_text(), \
        "docs/benchmarks/latest.md is out of date: python benchmarks/artifact.py writes it again"
    for included in _includes(latest.read_text(encoding="utf-8")):
        assert (artifact.REPO / included).is_file(), included


def test_a_published_run_is_a_new_dated_file_and_never_replaces_another(tmp_path: Path) -> None:
    first = _publish(tmp_path, "2026-12-07T08:30:05", "123456")
    again = _publish(tmp_path, "2026-12-07T08:30:40", "123456")
    dirty = _publish(tmp_path, "2026-12-07T09:00:00", "3", dirty=("benchmarks", "src"))
    assert [first.name, again.name, dirty.name] == ["2026-12-07-0830-abc1234-s123456.md",
                                                    "2026-12-07-0830-abc1234-s123456-2.md",
                                                    "2026-12-07-0900-abc1234-dirty-s3.md"]
    assert first.read_text(encoding="utf-8").startswith(
        "### Run of 2026-12-07 08:30 UTC at abc1234: sections 1, 2, 3, 4, 5 and 6\n")
    assert dirty.read_text(encoding="utf-8").startswith(
        "### Run of 2026-12-07 09:00 UTC at abc1234 (dirty): section 3\n")


def test_latest_shows_for_each_section_the_newest_run_that_measured_it(tmp_path: Path) -> None:
    old_full = _publish(tmp_path, "2026-12-01T10:00:00", "123456", commit="1111111")
    full = _publish(tmp_path, "2026-12-02T10:00:00", "123456", commit="2222222")
    only_3 = _publish(tmp_path, "2026-12-03T10:00:00", "3", commit="3333333")
    latest = (tmp_path / artifact.LATEST).read_text(encoding="utf-8")
    assert latest == artifact.latest_text(tmp_path, root=tmp_path)
    assert _includes(latest) == [only_3.name, full.name]  # the older full run is superseded everywhere
    assert old_full.name not in latest
    assert ("The newest published figures: section 3 from the run of 2026-12-03 10:00 UTC at 3333333; "
            "sections 1, 2, 4, 5 and 6 from the run of 2026-12-02 10:00 UTC at 2222222.") in latest


def test_a_file_not_named_as_a_run_is_reported(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("by hand", encoding="utf-8")
    with pytest.raises(ValueError, match=r"notes\.md: not a benchmark run's name"):
        artifact.latest_text(tmp_path, root=tmp_path)


def test_the_conditions_name_what_was_not_recorded() -> None:
    info = _info("2026-12-07T08:30:05", dirty=("src",))
    lines = info.metadata()
    assert lines[0] == ("- written by `benchmarks/run.py`, not by hand; started 2026-12-07 08:30:05 UTC, "
                        "wall time of the run not recorded")
    assert "- traced-run source: commit abc1234, dirty (uncommitted changes in src)" in lines
    assert "- load average (1/5/15 min): at start 0.10 / 0.20 / 0.30; at end not recorded" in lines
    info.end()
    assert info.metadata()[0].endswith(" s") and "not recorded" not in info.metadata()[4]


@pytest.mark.parametrize(("cpuinfo", "model"), [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n", "AMD EPYC 7B13"),
    ("processor\t: 0\nBogoMIPS\t: 108.00\n\nHardware\t: BCM2835\n", "BCM2835"),
    ("processor\t: 0\n", "not recorded (/CPUINFO names none)"),
])
def test_the_cpu_model_comes_from_proc_cpuinfo(tmp_path: Path, cpuinfo: str, model: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo, encoding="utf-8")
    assert artifact.cpu_model(path) == model.replace("/CPUINFO", str(path))
    assert artifact.cpu_model(tmp_path / "absent") == f"not recorded (no {tmp_path / 'absent'})"
