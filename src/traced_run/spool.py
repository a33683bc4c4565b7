"""The on-disk spool: batches MLflow did not take, kept for a later send.

One file per batch: a JSON header line (where it goes, how many spans and
traces) then the OTLP protobuf request body. Files are written whole under a
temporary name and renamed, so a reader never sees half a batch; a process
claims a file by renaming it before sending it, so two processes draining the
same spool never send the same batch at once. The directory is the owner's
only (0700, files 0600) and bounded in size: past the bound the oldest batches
are removed, and counted. The process that wrote a removed batch counts it:
while it runs, the remover leaves an empty ``.dropped`` file in the batch's
place for it to find at exit; a batch of a process that has ended is counted by
the remover. Batches MLflow rejected as invalid are moved aside to
``rejected/`` with the reason beside them, for a person to inspect.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from traced_run.settings import Settings

SUFFIX = ".otlp"
CLAIMED = ".claimed"
DROPPED = ".dropped"
STALE_CLAIM_SECONDS = 300.0
"""A claim older than this was left by a process that died while sending."""
HEADER_ROOM = 4096
"""More than a batch's header line takes (endpoint, experiment, run id, counts)."""


@dataclass(frozen=True)
class Target:
    """Where a batch goes; auth is never stored, the sending process adds its own."""

    endpoint: str
    experiment_id: str | None
    experiment_name: str | None
    """Kept as a name when MLflow could not be asked yet; resolved when sent."""
    run_id: str | None


@dataclass(frozen=True)
class Batch:
    target: Target
    spans: int
    traces: int
    payload: bytes
    path: Path

    @property
    def name(self) -> str:
        """Its name in the spool, unclaimed: what ``put`` returned for it."""
        return self.path.name.split(CLAIMED)[0]


def default_directory() -> Path:
    """Per user: $XDG_CACHE_HOME/traced-run/spool, else ~/.cache/..., else a
    directory in the system temp dir named after the uid."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if os.path.isabs(cache) and os.access(os.path.dirname(cache) or "/", os.W_OK | os.X_OK):
        return Path(cache) / "traced-run" / "spool"
    return Path(tempfile.gettempdir()) / f"traced-run-{os.getuid()}" / "spool"


class Spool:
    @classmethod
    def of(cls, settings: Settings) -> Spool:
        """``spool_dir`` (or the per-user default), bounded by ``spool_max_mb``."""
        directory = Path(settings.spool_dir) if settings.spool_dir else default_directory()
        return cls(directory, settings.spool_max_mb * 1024 * 1024)

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.rejected = directory / "rejected"

    def _ready(self) -> None:
        for path in (self.directory, self.rejected):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)

    def put(self, target: Target, spans: int, traces: int, payload: bytes) -> tuple[str | None, int]:
        """Keep a batch: its name (None when it alone is larger than the bound:
        writing it would remove every other batch, then itself), and how many
        spans of ended processes' batches the bound removed to make room."""
        if len(_header_line(target, spans, traces)) + len(payload) > self.max_bytes:
            return None, 0
        path = self._write(self.directory, target, spans, traces, payload)
        return path.name, self._enforce_bound()

    def fits(self, size: int) -> bool:
        """Whether a batch of ``size`` bytes is well within the bound on its own."""
        return size + HEADER_ROOM <= self.max_bytes

    def fates(self, names: Collection[str]) -> tuple[set[str], set[str]]:
        """Of these batches, written by this process: those still waiting
        (claimed ones included) and those the bound removed. The rest were sent,
        by this process or another, or set aside by the one that sent them."""
        if not names:  # most processes: no need to read the directory at exit
            return set(), set()
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return set(), set()
        present = {entry.split(CLAIMED)[0] for entry in entries if SUFFIX in entry}
        dropped = {entry.removesuffix(DROPPED) + SUFFIX for entry in entries if entry.endswith(DROPPED)}
        waiting = present.intersection(names)
        removed = dropped.intersection(names) - waiting
        for name in removed:
            (self.directory / name).with_suffix(DROPPED).unlink(missing_ok=True)
        return waiting, removed

    def put_rejected(self, target: Target, spans: int, traces: int, payload: bytes, reason: str) -> Path:
        """Set a batch MLflow refused as invalid aside, with the reason beside it."""
        aside = self._write(self.rejected, target, spans, traces, payload)
        _write_reason(aside, reason)
        return aside

    def _write(self, directory: Path, target: Target, spans: int, traces: int, payload: bytes) -> Path:
        self._ready()
        header = _header_line(target, spans, traces)
        path = directory / f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}{SUFFIX}"
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".writing-")
        try:
            with os.fdopen(fd, "wb") as stream:  # mkstemp creates it 0600
                stream.write(header + payload)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    def _files(self) -> list[Path]:
        try:
            return sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []

    def _enforce_bound(self) -> int:
        """Remove the oldest batches past the bound; the spans of ended processes' batches removed."""
        files = self._files()
        sizes = {path: _size(path) for path in files}
        total = sum(sizes.values())
        orphans = 0
        for path in files:  # oldest first: names start with the time
            if total <= self.max_bytes:
                break
            header = _header(path) or {}
            writer = _writer(path.name)
            # Marked before it goes, so its writer never finds it neither waiting nor removed.
            mark = path.with_suffix(DROPPED) if writer is not None and _alive(writer) else None
            if mark is not None:
                mark.touch(mode=0o600)
            try:
                path.unlink()
            except FileNotFoundError:  # claimed for a send meanwhile: not removed
                if mark is not None:
                    mark.unlink(missing_ok=True)
                continue
            total -= sizes[path]
            if mark is None:
                orphans += int(str(header.get("spans", 0)))
        return orphans

    def count(self) -> tuple[int, int]:
        """Batches and spans waiting."""
        batches = spans = 0
        for path in self._files():
            header = _header(path)
            if header is not None:
                batches += 1
                spans += int(str(header.get("spans", 0)))
        return batches, spans

    def pending(self, endpoint: str) -> Iterator[tuple[Path, dict[str, object]]]:
        """Unclaimed batches waiting for ``endpoint``, oldest first, with their headers."""
        for path in self._files():
            header = _header(path)
            if header is not None and header.get("endpoint") == endpoint:
                yield path, header

    def claim(self, endpoint: str) -> Iterator[Batch]:
        """Oldest first, the batches for ``endpoint`` this process now holds;
        each must then be ``done``, ``release``d or ``reject``ed."""
        self._reclaim_stale()
        for path, header in self.pending(endpoint):
            claimed = path.with_name(f"{path.name}{CLAIMED}-{os.getpid()}")
            try:
                os.replace(path, claimed)
            except FileNotFoundError:  # another process claimed it first
                continue
            try:
                data = claimed.read_bytes()
            except FileNotFoundError:
                continue
            _, _, payload = data.partition(b"\n")
            target = Target(**{key: header.get(key) for key in Target.__dataclass_fields__})  # type: ignore[arg-type]
            yield Batch(target, int(str(header.get("spans", 0))), int(str(header.get("traces", 0))), payload,
                        claimed)

    def done(self, batch: Batch) -> None:
        batch.path.unlink(missing_ok=True)

    def release(self, batch: Batch) -> None:
        """Give a claimed batch back: it could not be sent now."""
        with contextlib.suppress(FileNotFoundError):
            os.replace(batch.path, batch.path.with_name(batch.name))

    def reject(self, batch: Batch, reason: str) -> Path:
        """Move a claimed batch MLflow refused as invalid aside, with the reason beside it."""
        self._ready()
        aside = self.rejected / batch.name
        os.replace(batch.path, aside)
        _write_reason(aside, reason)
        return aside

    def _reclaim_stale(self) -> None:
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return
        now = time.time()
        for path in entries:
            if path.name.endswith(DROPPED):
                writer = _writer(path.name)
                if writer is None or not _alive(writer):  # its writer ended without looking
                    path.unlink(missing_ok=True)
                continue
            if CLAIMED not in path.name:
                continue
            pid = path.name.rsplit("-", 1)[-1]
            alive = pid.isdigit() and _alive(int(pid))
            try:
                stale = now - path.stat().st_mtime > STALE_CLAIM_SECONDS
            except FileNotFoundError:
                continue
            if not alive or stale:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, path.with_name(path.name.split(CLAIMED)[0]))


def _header_line(target: Target, spans: int, traces: int) -> bytes:
    return json.dumps({**asdict(target), "spans": spans, "traces": traces}).encode() + b"\n"


def _writer(name: str) -> int | None:
    """The pid of the process that wrote a batch: names are ``<time>-<pid>-<random>``."""
    parts = name.split("-")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None


def _write_reason(batch: Path, reason: str) -> None:
    path = batch.with_suffix(".reason.txt")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(reason + "\n")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _header(path: Path) -> dict[str, object] | None:
    try:
        with open(path, "rb") as stream:
            line = stream.readline(65536)
        header = json.loads(line)
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) and "endpoint" in header else None
