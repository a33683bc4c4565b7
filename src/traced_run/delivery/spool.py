"""The on-disk spool: batches MLflow did not take, kept for a later send.

One file per batch: a JSON header line (where it goes, how many spans,
traces and payload bytes) then the OTLP protobuf request body. Files are
written whole under a temporary name and renamed, so a reader never sees half
a batch; a process claims a file by locking it (``flock``, without waiting)
and renaming it before sending it, and holds the lock until the batch is sent,
given back or set aside, so two processes draining the same spool never send
the same batch at once. A claim is given back by whoever finds its file
unlocked: the kernel lets a lock go when its holder dies, however long its post
took and whatever its pid (1, in a container, is alive to everyone), and a
forked child lets go of the claims it inherited (``let_go_inherited``).
Nothing is given back because the batch is old. The
directory is the owner's only and bounded in size: past the bound the oldest
batches are removed, and counted, and so are batches written longer than
``spool_max_age`` ago (an endpoint nobody uses any more never drains them). The
process that wrote a removed batch
counts it: while it runs, the remover leaves a ``.dropped`` file naming the cause
(``BOUND``, ``AGE``) in the batch's place for it to find at exit; a batch of a
process that has ended is counted by the remover. Batches MLflow refused for a
reason of their own are moved aside to ``rejected/`` with the reason beside
them, for a person to inspect, and put back once the cause is fixed.

The protocol (put, claim, done, release, reject, reclaim stale claims) and the
file-name format are written here only; delivery, ``flush`` and the doctor
use these methods.

Whoever else can write to the spool could plant batches that this user's
credentials then send, or symlinks that make a write land elsewhere. So every
directory is opened without following a symlink and used only when it is
this user's and writable by no one else (never ``chmod``-ed into shape: one
line says why it is not used); every file is opened relative to it, without
following symlinks and without blocking (a FIFO named like a batch would
otherwise hold the reader for ever), and read only when it is a regular file
whose header parses within ``HEADER_LIMIT`` with fields of the right types.
A file that is not is set aside once, with the reason. Headers never hold
credentials: the endpoint is stored without its ``user:password@``, and the
sending process adds its own auth.

A process whose trace left it before its root ended (a long run's spans go after
``queue.OPEN_TRACE_WAIT``) keeps that root, ended as interrupted, in a record of its
own (``hold_open``), locked while it lives and removed once the real root leaves. A
process killed meanwhile (SIGKILL, the OOM killer: no code of its runs) leaves the
record unlocked; the next sender renames it into a batch, so the trace MLflow holds
ends as ERROR instead of staying IN_PROGRESS for ever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Collection, Generator, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from traced_run.config.settings import (
    EXPERIMENT_ID,
    EXPERIMENT_NAME,
    RUN_ID,
    WORKSPACE,
    Kind,
    Settings,
    default_of,
)
from traced_run.transport import printable, without_userinfo

if TYPE_CHECKING:
    from traced_run.delivery.export import Outcome

SUFFIX = ".otlp"
STALE_WRITE_SECONDS = 300.0
"""A half-written file older than this was left by a process that died while writing."""
HEADER_ROOM = 4096
"""More than a batch's header line takes (endpoint, experiment, run id, counts)."""
HEADER_LIMIT = 65536
"""The longest header line read; a longer one is not a batch of ours."""
_NAME = re.compile(r"(?P<batch>(?P<time>\d{20})-(?P<writer>\d{1,10})-[0-9a-f]{8})"
                   r"(?:(?P<otlp>\.otlp)(?:\.claimed-(?P<claimer>\d{1,10}))?|(?P<dropped>\.dropped)"
                   r"|(?P<reason>\.reason\.txt)|(?P<open>\.open))")
"""``<time ns>-<writer pid>-<random>.otlp``, claimed: ``...otlp.claimed-<pid>``,
removed by the bound while its writer runs: ``....dropped``, set aside: ``....reason.txt``,
the open root of a trace its writer holds (``hold_open``): ``....open``."""
OPEN = ".open"
_WRITING = ".writing-"
BOUND = "bound"
AGE = "age"
"""Why a batch was removed, as its ``.dropped`` mark says: the size bound, or its age."""
_SENT: dict[str, Kind] = {"experiment_id": EXPERIMENT_ID, "experiment_name": EXPERIMENT_NAME,
                          "run_id": RUN_ID, "workspace": WORKSPACE}
"""The header fields that go to MLflow, and the settings' rule for each: one a setting
would refuse (written by another version, or by hand) would be refused by MLflow, or
could not be sent at all, for ever."""
GONE = "gone"
"""What reading a file another process moved meanwhile gives: not a fault of the file."""
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Entry:
    """A name in the spool directory, parsed."""

    batch: str
    """The batch's name, unclaimed: what ``put`` returned for it."""
    written: float
    """When the batch was written (seconds since the epoch): its age, which no claim moves."""
    writer: int
    claimer: int | None
    kind: str
    """``otlp`` (waiting or claimed), ``dropped``, ``reason`` or ``open``."""


def parse(name: str) -> Entry | None:
    """What a directory entry is, or None when it is no file of the spool's."""
    found = _NAME.fullmatch(name)
    if found is None:
        return None
    claimer = found["claimer"]
    kinds = ("otlp", "dropped", "open")
    kind = next((kind for kind in kinds if found[kind]), "reason")
    return Entry(found["batch"] + SUFFIX, int(found["time"]) / 1e9, int(found["writer"]),
                 int(claimer) if claimer else None, kind)


def _claimed(batch: str) -> str:
    return f"{batch}.claimed-{os.getpid()}"


def _reason_of(batch: str) -> str:
    return batch.removesuffix(SUFFIX) + ".reason.txt"


def _dropped_of(batch: str) -> str:
    return batch.removesuffix(SUFFIX) + ".dropped"


@dataclass(frozen=True)
class Target:
    """Where a batch goes; auth is never stored, the sending process adds its own."""

    endpoint: str
    experiment_id: str | None
    experiment_name: str | None
    """Kept as a name when MLflow could not be asked yet; resolved when sent."""
    run_id: str | None
    workspace: str | None = None
    """The MLflow workspace the batch was written for; it goes there whoever sends it."""
    version: str | None = None
    """The agent version its traces are linked to once MLflow took it (``links.version_of``)."""


@dataclass(frozen=True)
class Batch:
    target: Target
    spans: int
    traces: int
    payload: bytes
    path: Path
    """Where it is now (claimed)."""
    name: str
    """Its name in the spool, unclaimed: what ``put`` returned for it."""
    lock: int
    """The descriptor whose lock is the claim: closed once the batch is done, released or rejected."""


@dataclass(frozen=True)
class Held:
    """A record of an open root this process holds (``hold_open``)."""

    name: str
    lock: int


@dataclass(frozen=True)
class Header:
    target: Target
    spans: int
    traces: int
    size: int | None
    """Payload bytes; None in batches written before it was recorded."""


@dataclass
class Backlog:
    """The batches waiting for one endpoint."""

    batches: int = 0
    spans: int = 0
    oldest: float = 0.0
    """When the oldest was written (seconds since the epoch)."""

    def add(self, spans: int, written: float) -> None:
        self.batches += 1
        self.spans += spans
        self.oldest = min(self.oldest or written, written)


@dataclass(frozen=True)
class SpoolContents:
    """What the spool holds, read without changing it (the doctor's view)."""

    batches: int = 0
    spans: int = 0
    for_endpoint: int = 0
    unreadable: int = 0
    """Files named like batches that are not (a FIFO, a symlink, a broken header ...)."""
    first_unreadable: str = ""
    rejected: int = 0
    others: dict[str, Backlog] = field(default_factory=dict)
    """Batches written for other endpoints, by endpoint (without credentials)."""
    expired: int = 0
    """Batches older than the spool's max age: the next send removes them."""


class SpoolRefused(OSError):
    """The spool directory is not safe to use; ``str()`` is the one line that says why."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)

    def __str__(self) -> str:
        return str(self.strerror)


def default_directory() -> Path:
    """Per user: $XDG_CACHE_HOME/traced-run/spool, else ~/.cache/..., else a
    private directory of this user's in the system temp dir (see ``_private_temp``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if os.path.isabs(cache) and os.access(os.path.dirname(cache) or "/", os.W_OK | os.X_OK):
        return Path(cache) / "traced-run" / "spool"
    return _private_temp()


def _private_temp() -> Path:
    """A directory no one else can have made: a fixed name there could be made
    first by another user, who would then read the batches, or plant some for
    this user's credentials to send. So it is one made by ``mkdtemp`` (0700,
    atomically) and found again by later processes as the first directory
    named ``traced-run-<uid>-*`` that is this user's and private. When two
    processes make one at once, both settle on the first by name."""
    base = tempfile.gettempdir()
    prefix = f"traced-run-{os.geteuid()}-"

    def first() -> str | None:
        for entry in sorted(os.listdir(base)):
            if entry.startswith(prefix):
                with contextlib.suppress(OSError):
                    if _private(os.lstat(os.path.join(base, entry))):
                        return entry
        return None

    found = first()
    if found is None:
        made = os.path.basename(tempfile.mkdtemp(prefix=prefix, dir=base))
        found = first() or made
        if found != made:
            os.rmdir(os.path.join(base, made))
    return Path(base) / found


def _private(status: os.stat_result) -> bool:
    return stat.S_ISDIR(status.st_mode) and status.st_uid == os.geteuid() and not status.st_mode & 0o077


class _Directory:
    """The spool's directory as a process that writes batches, or only looks, uses it:
    opened safely, written whole, kept within its bound, surveyed. Sending is ``Spool``'s."""

    def __init__(self, directory: Path, max_bytes: int, unusable: str = "",
                 max_age: float = default_of("spool_max_age")) -> None:
        self.directory = directory
        self.unusable = unusable
        """Why there is no directory to use at all (said instead of using one)."""
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.expired = 0
        """Batches of ended processes this process removed for being older than ``max_age``..."""
        self.expired_spans = 0
        """... and their spans."""
        self.expired_told = Backlog()
        """Those of processes that still ran (or seemed to: a pid reused), each told by a mark."""
        self.rejected = directory / "rejected"
        self.unreadable = 0
        """Files this process set aside because they were not batches it could read."""
        self.unreadable_why = ""
        self._held: set[int] = set()
        """The descriptors of this process's claims (see ``Spool.let_go_inherited``)."""

    # -- directories ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _existing(self) -> Iterator[int | None]:
        """The spool directory's descriptor, None when there is none yet;
        every file operation goes through it."""
        if self.unusable:
            raise SpoolRefused(self.unusable)
        with _closing(_open_dir(str(self.directory), None, self.directory)) as fd:
            yield fd

    @contextlib.contextmanager
    def _made(self) -> Iterator[int]:
        if self.unusable:
            raise SpoolRefused(self.unusable)
        os.makedirs(self.directory.parent, exist_ok=True)
        with _closing(_make_dir(str(self.directory), None, self.directory)) as fd:
            assert fd is not None
            yield fd

    @contextlib.contextmanager
    def _made_rejected(self, spool: int) -> Iterator[int]:
        with _closing(_make_dir("rejected", spool, self.rejected)) as fd:
            assert fd is not None
            yield fd

    # -- writing ----------------------------------------------------------------------------

    def put(self, target: Target, spans: int, traces: int, payload: bytes) -> tuple[str | None, int]:
        """Keep a batch: its name (None when it alone is larger than the bound:
        writing it would remove every other batch, then itself), and how many
        spans of ended processes' batches the bound removed to make room."""
        if len(_header_line(target, spans, traces, payload)) + len(payload) > self.max_bytes:
            return None, 0
        with self._made() as fd:
            name = _new_name()
            _write_batch(fd, name, target, spans, traces, payload)
            return name, _enforce_bound(fd, self.max_bytes)

    def hold_open(self, target: Target, payload: bytes, held: Held | None = None) -> Held:
        """Keep the open root of a trace (``payload``: the root ended as interrupted), locked
        while this process lives; ``held``: the record it replaces (written again with a later
        end). Once its holder has died, the next sender makes it a batch (``claim``)."""
        with self._made() as fd:
            name = held.name if held is not None else _new_name().removesuffix(SUFFIX) + OPEN
            out = _written(fd, name, _header_line(target, 1, 1, payload) + payload, lock=True)
        self._held.add(out)
        if held is not None:
            self._let_go(held.lock)
        return Held(name, out)

    def let_go_open(self, held: Held) -> None:
        """The trace's root left this process whole: its record goes."""
        try:
            with self._existing() as fd:
                if fd is not None:
                    _unlink(fd, held.name)
        finally:
            self._let_go(held.lock)

    def _let_go(self, lock: int) -> None:
        if lock in self._held:
            self._held.discard(lock)
            os.close(lock)

    def fits(self, size: int) -> bool:
        """Whether a batch of ``size`` bytes is well within the bound on its own."""
        return size + HEADER_ROOM <= self.max_bytes

    def put_rejected(self, target: Target, spans: int, traces: int, payload: bytes, reason: str) -> Path:
        """Set a batch MLflow refused as invalid aside, with the reason beside it."""
        name = _new_name()
        with self._made() as fd, self._made_rejected(fd) as aside:
            _write_batch(aside, name, target, spans, traces, payload)
            _write(aside, _reason_of(name), _reason_text(reason))
        return self.rejected / name

    # -- reading ----------------------------------------------------------------------------

    def statuses(self, names: Collection[str]) -> tuple[set[str], dict[str, str]]:
        """Of these batches, written by this process: those still waiting
        (claimed ones included) and those the bound or their age removed (``BOUND``,
        ``AGE``). The rest were sent, by this process or another, or set aside by
        the one that sent them."""
        if not names:  # most processes: no need to read the directory at exit
            return set(), {}
        try:
            with self._existing() as fd:
                return _statuses(fd, names) if fd is not None else (set(), {})
        except OSError:  # the directory went, or was swapped, since: the exit line must still come
            return set(names), {}

    def survey(self, endpoint: str) -> SpoolContents:
        """Batches and spans waiting, how many for ``endpoint`` and for each other
        endpoint, how many are past the max age, unreadable files, set-aside
        batches; changes nothing."""
        with self._existing() as fd:
            if fd is None:
                return SpoolContents()
            batches = spans = here = unreadable = expired = 0
            first = ""
            others: dict[str, Backlog] = {}
            for name in _waiting(fd):
                header = _read_header(fd, name, self.max_bytes)
                if header == GONE:
                    continue
                if isinstance(header, str):
                    unreadable += 1
                    first = first or f"{name}: {header}"
                    continue
                batches += 1
                spans += header.spans
                entry = parse(name)
                assert entry is not None
                expired += self._expired(entry)
                if _same_endpoint(header.target.endpoint, endpoint):
                    here += 1
                else:
                    pile = others.setdefault(without_userinfo(header.target.endpoint), Backlog())
                    pile.add(header.spans, entry.written)
            rejected = 0
            with _closing(_open_dir("rejected", fd, self.rejected)) as aside:
                if aside is not None:
                    entries = [parse(name) for name in os.listdir(aside)]
                    rejected = sum(1 for e in entries if e is not None and e.kind == "otlp")
        return SpoolContents(batches, spans, here, unreadable, first, rejected, others, expired)

    def _expired(self, entry: Entry) -> bool:
        """Written longer than ``max_age`` ago, whether its writer still runs or not (a pid
        that is alive to everyone, 1 in a container, would keep it for ever)."""
        return time.time() - entry.written > self.max_age


class Spool(_Directory):
    """The claim protocol every sender follows (claim, post, done / set aside / release),
    and the clean-up a sender makes on the way: stale claims given back, expired batches
    and unreadable files removed or set aside, other endpoints' batches dropped."""

    @classmethod
    def of(cls, settings: Settings) -> Spool:
        """``spool_dir`` (or the per-user default), bounded by ``spool_max_mb``."""
        max_bytes = settings.spool_max_mb * 1024 * 1024
        if settings.spool_dir:
            return cls(Path(settings.spool_dir), max_bytes, max_age=settings.spool_max_age)
        try:
            return cls(default_directory(), max_bytes, max_age=settings.spool_max_age)
        except OSError as error:
            temp = Path(tempfile.gettempdir())
            return cls(temp, max_bytes, f"no spool: HOME is not writable and no private directory could be "
                       f"made in {temp} ({error.strerror}); set TRACED_RUN_SPOOL_DIR")

    def claim(self, endpoint: str, written_for: str | None = None) -> Iterator[Batch]:
        """Oldest first, the batches written for ``written_for`` (default
        ``endpoint``) this process now holds, to be sent to ``endpoint``; each
        must then be ``done``, ``release``d or ``reject``ed. The target's
        endpoint is ``endpoint`` itself (with the credentials it may carry,
        which the spool does not keep): a batch goes only where the sender's
        credentials belong. Files that are not readable batches are set aside
        on the way, and counted in ``unreadable``; batches past the max age
        are removed, and counted in ``expired``."""
        with self._existing() as fd:
            if fd is None:
                return
            _reclaim_stale(fd, self.max_age)
            self._expire(fd)
            for name in _waiting(fd):
                header = _read_header(fd, name, self.max_bytes)
                if header == GONE:  # claimed, sent or removed by another process meanwhile
                    continue
                if isinstance(header, str):
                    self._set_aside_unreadable(fd, name, header)
                    continue
                if not _same_endpoint(header.target.endpoint, written_for or endpoint):
                    continue
                held = _claim(fd, name)
                if held is None:  # another process claimed it first
                    continue
                claimed, lock = held
                read = _read(fd, claimed, self.max_bytes)
                if isinstance(read, str):
                    if read != GONE:
                        self._set_aside_unreadable(fd, claimed, read)
                    os.close(lock)
                    continue
                header, payload = read
                target = replace(header.target, endpoint=endpoint)
                self._held.add(lock)
                yield Batch(target, header.spans, header.traces, payload, self.directory / claimed, name,
                            lock)

    def send(self, endpoint: str, post: Callable[[Batch], Outcome],
             written_for: str | None = None) -> Generator[tuple[Batch, Outcome, Path | None]]:
        """The protocol every sender follows: claim the oldest batch for
        ``endpoint`` (or written for ``written_for``, re-addressed to ``endpoint``),
        ``post`` it, then remove it (taken; the traces MLflow rejected alone, if
        any, set aside), set it aside (refused as invalid: where to, third) or
        give it back (not taken: the last one, since the rest would fare the same now)."""
        for batch in self.claim(endpoint, written_for):
            try:
                outcome = post(batch)
            except BaseException:
                self.release(batch)
                raise
            aside = None
            if outcome.delivered:
                for part in outcome.rejected:  # the traces MLflow rejected alone go aside alone
                    aside = self.put_rejected(batch.target, part.spans, 1, part.payload, part.outcome.reason)
                self.done(batch)
            elif outcome.invalid:
                aside = self.reject(batch, outcome.reason)
            else:
                self.release(batch)
            yield batch, outcome, aside
            if not outcome.delivered and not outcome.invalid:
                return

    def _expire(self, fd: int) -> None:
        """Remove the batches older than ``max_age``: they were written for an
        endpoint that has not taken them in all that time. Counted here when their
        writer has ended; a writer that still runs counts its own at exit. A file
        that is no readable batch is left to be set aside, with its reason."""
        for name in _waiting(fd):
            entry = parse(name)
            if entry is None or not self._expired(entry):
                continue
            header = _read_header(fd, name, self.max_bytes)
            if not isinstance(header, Header):
                continue
            here = _remove(fd, name, AGE)
            if here:
                self.expired += 1
                self.expired_spans += header.spans
            elif here is not None:
                self.expired_told.add(header.spans, entry.written)

    def drop_others(self, endpoint: str) -> dict[str, Backlog]:
        """Remove the batches written for any endpoint but ``endpoint``; what went, by endpoint."""
        dropped: dict[str, Backlog] = {}
        with self._existing() as fd:
            if fd is None:
                return dropped
            for name in _waiting(fd):
                header = _read_header(fd, name, self.max_bytes)
                entry = parse(name)
                if (isinstance(header, str) or entry is None
                        or _same_endpoint(header.target.endpoint, endpoint)):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)
                    pile = dropped.setdefault(without_userinfo(header.target.endpoint), Backlog())
                    pile.add(header.spans, entry.written)
        return dropped

    def put_back_set_aside(self) -> int:
        """Move the batches set aside back into the spool, with their reasons gone (the cause
        has been fixed), as batches written now: ageing restarts, and their writers, which
        counted them as rejected, never count them again. Files that are no readable batch
        stay aside. How many went back."""
        with self._existing() as fd:
            if fd is None:
                return 0
            with _closing(_open_dir("rejected", fd, self.rejected)) as aside:
                return 0 if aside is None else _put_back(aside, fd, self.max_bytes)

    def _set_aside_unreadable(self, fd: int, name: str, why: str) -> None:
        """Moved, not read again: whatever it is (a FIFO, a symlink: a rename moves the link itself)."""
        entry = parse(name)
        assert entry is not None
        with contextlib.suppress(FileNotFoundError), self._made_rejected(fd) as aside:
            os.replace(name, entry.batch, src_dir_fd=fd, dst_dir_fd=aside)
            _write(aside, _reason_of(entry.batch), _reason_text(f"not a readable spool batch: {why}"))
            self.unreadable += 1
            self.unreadable_why = self.unreadable_why or f"{entry.batch}: {why}"

    def done(self, batch: Batch) -> None:
        with self._letting_go(batch), self._existing() as fd:
            if fd is not None:
                _unlink(fd, batch.path.name)

    def release(self, batch: Batch) -> None:
        """Give a claimed batch back: it could not be sent now."""
        with self._letting_go(batch), self._existing() as fd, contextlib.suppress(FileNotFoundError):
            if fd is not None:
                os.replace(batch.path.name, batch.name, src_dir_fd=fd, dst_dir_fd=fd)

    def reject(self, batch: Batch, reason: str) -> Path:
        """Move a claimed batch MLflow refused as invalid aside, with the reason beside it;
        written from memory when the claimed file is gone (the directory was tampered with)."""
        with self._letting_go(batch), self._made() as fd, self._made_rejected(fd) as aside:
            try:
                os.replace(batch.path.name, batch.name, src_dir_fd=fd, dst_dir_fd=aside)
            except FileNotFoundError:
                _write_batch(aside, batch.name, batch.target, batch.spans, batch.traces, batch.payload)
            _write(aside, _reason_of(batch.name), _reason_text(reason))
        return self.rejected / batch.name

    @contextlib.contextmanager
    def _letting_go(self, batch: Batch) -> Iterator[None]:
        """The claim's lock goes once the file has moved (or failed to): never before, or
        another process could claim the batch while it is still in its claimed place."""
        try:
            yield
        finally:
            if batch.lock in self._held:
                self._held.discard(batch.lock)
                os.close(batch.lock)

    def let_go_inherited(self) -> None:
        """In a forked child: close the claims' descriptors it inherited, which would otherwise
        hold its parent's claims for as long as the child lives (a lock is the open file's)."""
        for lock in self._held:
            with contextlib.suppress(OSError):
                os.close(lock)
        self._held.clear()


def _put_back(aside: int, fd: int, max_bytes: int) -> int:
    back = 0
    for name in sorted(os.listdir(aside)):
        entry = parse(name)
        if (entry is None or entry.kind != "otlp" or entry.claimer is not None
                or not isinstance(_read_header(aside, name, max_bytes), Header)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.replace(name, _new_name(), src_dir_fd=aside, dst_dir_fd=fd)
            back += 1
            _unlink(aside, _reason_of(name))
    return back


def _statuses(fd: int, names: Collection[str]) -> tuple[set[str], dict[str, str]]:
    entries = [e for e in map(parse, os.listdir(fd)) if e is not None]
    present = {e.batch for e in entries if e.kind == "otlp"}
    dropped = {e.batch for e in entries if e.kind == "dropped"}
    waiting = present.intersection(names)
    removed = {}
    for name in dropped.intersection(names) - waiting:
        with _opened(fd, _dropped_of(name), HEADER_LIMIT) as opened:
            cause = os.read(opened[0], 16) if not isinstance(opened, str) else b""
        removed[name] = AGE if cause.strip() == AGE.encode() else BOUND
        _unlink(fd, _dropped_of(name))
    return waiting, removed


def _claim(fd: int, name: str) -> tuple[str, int] | None:
    """Claim batch ``name``: its claimed name and the descriptor holding the lock, None when
    another process holds it, or moved it meanwhile. Locked first, renamed second: whoever
    moves a batch holds its lock, so the name is checked to be still the locked file."""
    lock = _locked(fd, name)
    if lock is None:
        return None
    claimed = _claimed(name)
    try:
        os.replace(name, claimed, src_dir_fd=fd, dst_dir_fd=fd)
    except FileNotFoundError:  # removed by the bound or for its age meanwhile
        os.close(lock)
        return None
    return claimed, lock


def _locked(fd: int, name: str) -> int | None:
    """Regular file ``name``, open and locked by this process, when it is still under that
    name once locked; None when another process holds the lock, or it is gone or no file."""
    try:
        lock = os.open(name, _OPEN_READ, dir_fd=fd)
    except OSError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(name, dir_fd=fd, follow_symlinks=False).st_ino == os.fstat(lock).st_ino:
            return lock
    except OSError:  # held by another process (BlockingIOError), or gone
        pass
    os.close(lock)
    return None


def _waiting(fd: int) -> list[str]:
    """Unclaimed batches, oldest first."""
    found = (parse(name) for name in os.listdir(fd))
    return sorted(e.batch for e in found if e is not None and e.kind == "otlp" and e.claimer is None)


def _enforce_bound(fd: int, max_bytes: int) -> int:
    """Remove the oldest batches past the bound; the spans of ended processes' batches removed."""
    sizes = {name: _regular_size(fd, name) for name in _waiting(fd)}
    total = sum(sizes.values())
    orphans = 0
    for name, size in sizes.items():  # oldest first: names start with the time
        if total <= max_bytes:
            break
        header = _read_header(fd, name, max_bytes)
        here = _remove(fd, name, BOUND)
        if here is None:
            continue
        total -= size
        if here and isinstance(header, Header):
            orphans += header.spans
    return orphans


def _remove(fd: int, name: str, cause: str) -> bool | None:
    """Remove waiting batch ``name`` for ``cause``: whether the remover counts it (its writer
    has ended) or its writer does (a mark in its place names the cause); None when it was
    claimed for a send meanwhile, and stays."""
    entry = parse(name)
    assert entry is not None
    # Marked before it goes, so its writer never finds it neither waiting nor removed.
    mark = _dropped_of(name) if _alive(entry.writer) else None
    if mark is not None:
        _write(fd, mark, cause.encode())
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        if mark is not None:
            _unlink(fd, mark)
        return None
    return mark is None


def _reclaim_stale(fd: int, max_age: float) -> None:
    """Give back the claims no process holds a lock on (and claimed names that are no
    regular file: claim sets them aside); make the open roots' records no process holds
    batches; remove half-written files of processes
    that ended, and the marks of processes that ended, or that have not looked for
    them in ``max_age`` (a pid that stays alive for ever, such as 1 in a container,
    must not keep one for ever)."""
    now = time.time()
    for name in os.listdir(fd):
        if name.startswith(_WRITING):
            with contextlib.suppress(OSError):
                if now - os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime > STALE_WRITE_SECONDS:
                    _unlink(fd, name)
            continue
        entry = parse(name)
        if entry is None:
            continue
        if entry.kind == "open":
            _batch_of_unheld(fd, name, entry.batch)
            continue
        if entry.kind == "dropped" and (not _alive(entry.writer) or _older(fd, name, now - max_age)):
            _unlink(fd, name)
        if entry.claimer is None:
            continue
        _give_back_unheld(fd, name, entry.batch)


def _batch_of_unheld(fd: int, record: str, batch: str) -> None:
    """An open root's record its holder no longer holds (it died: the kernel let the lock go)
    becomes a batch, sent as any other: MLflow then shows the trace ended as interrupted."""
    lock = _locked(fd, record)
    if lock is None:  # its holder runs, or another sender took it first
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.replace(record, batch, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(lock)


def _give_back_unheld(fd: int, claimed: str, batch: str) -> None:
    try:
        regular = stat.S_ISREG(os.stat(claimed, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return
    lock = _locked(fd, claimed) if regular else None
    if regular and lock is None:  # its claimer holds it still
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.replace(claimed, batch, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        if lock is not None:
            os.close(lock)


def _older(fd: int, name: str, than: float) -> bool:
    """Whether file ``name`` was last changed before time ``than``; False when it is gone."""
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime < than
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _closing(fd: int | None) -> Iterator[int | None]:
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _make_dir(name: str, parent: int | None, shown: Path) -> int | None:
    """``_open_dir``, making the directory (0700) when missing."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
    except FileExistsError:
        return _open_dir(name, parent, shown)
    fd = _open_dir(name, parent, shown, made=True)
    if fd is None:
        raise FileNotFoundError(errno.ENOENT, "removed while it was made", str(shown))
    return fd


def _open_dir(name: str, parent: int | None, shown: Path, made: bool = False) -> int | None:
    """``name`` (under ``parent``) opened as a directory without following a
    symlink, when it is this user's and no one else may write to it; None when
    it does not exist. One it did not just make is never changed."""
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        link = stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        raise _refused(shown, "is a symbolic link" if link else "is not a directory") from None
    try:
        status = os.fstat(fd)
        if made and stat.S_IMODE(status.st_mode) != 0o700:  # the umask took bits we need
            os.fchmod(fd, 0o700)
        elif status.st_uid != os.geteuid():
            raise _refused(shown, f"belongs to uid {status.st_uid}, not to this user (uid {os.geteuid()})")
        elif status.st_mode & 0o022:
            raise _refused(shown, f"may be written by other users (mode {stat.S_IMODE(status.st_mode):04o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refused(directory: Path, why: str) -> SpoolRefused:
    return SpoolRefused(f"spool directory {directory} {why}: not used, nothing is read from it or "
                        "written to it (set TRACED_RUN_SPOOL_DIR to a directory only you can write to)")


def _new_name() -> str:
    return f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}{SUFFIX}"


def _write(fd: int, name: str, data: bytes) -> None:
    """Write ``name`` in directory ``fd`` whole (0600): a new file, renamed over any old one."""
    os.close(_written(fd, name, data, lock=False))


def _written(fd: int, name: str, data: bytes, *, lock: bool) -> int:
    """``_write``, returning the file's descriptor, open; ``lock``: the file is locked (flock)
    before it has its name, so no sender ever finds it unheld while the descriptor is open."""
    temporary = f"{_WRITING}{os.urandom(6).hex()}"
    out = os.open(temporary, _OPEN_NEW, 0o600, dir_fd=fd)
    try:
        if lock:
            fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with os.fdopen(out, "wb", closefd=False) as stream:
            stream.write(data)
        os.replace(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        os.close(out)
        _unlink(fd, temporary)
        raise
    return out


def _unlink(fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=fd)


def _write_batch(fd: int, name: str, target: Target, spans: int, traces: int, payload: bytes) -> None:
    _write(fd, name, _header_line(target, spans, traces, payload) + payload)


def _header_line(target: Target, spans: int, traces: int, payload: bytes) -> bytes:
    fields = {**asdict(target), "endpoint": without_userinfo(target.endpoint)}
    return json.dumps({**fields, "spans": spans, "traces": traces, "bytes": len(payload)}).encode() + b"\n"


def _reason_text(reason: str) -> bytes:
    # A reason may quote a lone surrogate (an OS error's file name): escaped, the file is still written.
    return (printable(reason) + "\n").encode(errors="backslashreplace")


def _same_endpoint(stored: str, endpoint: str) -> bool:
    return without_userinfo(stored) == without_userinfo(endpoint)


def _regular_size(fd: int, name: str) -> int:
    try:
        status = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    return status.st_size if stat.S_ISREG(status.st_mode) else 0


@contextlib.contextmanager
def _opened(fd: int, name: str, max_bytes: int) -> Iterator[tuple[int, int] | str]:
    """A regular file of this user's in directory ``fd``, open for reading
    (descriptor and size), or why it cannot be a batch."""
    try:
        before = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        yield GONE
        return
    if not stat.S_ISREG(before.st_mode):
        yield "a symbolic link" if stat.S_ISLNK(before.st_mode) else "not a regular file"
        return
    try:
        stream = os.open(name, _OPEN_READ, dir_fd=fd)
    except OSError as error:
        yield printable(str(error.strerror)).lower()
        return
    try:
        status = os.fstat(stream)
        if not stat.S_ISREG(status.st_mode) or status.st_ino != before.st_ino:
            yield "replaced while it was read"
        elif status.st_uid != os.geteuid():
            yield f"belongs to uid {status.st_uid}"
        elif status.st_size == 0:
            yield "empty"
        elif status.st_size > max_bytes + HEADER_LIMIT:
            yield f"{status.st_size} bytes, more than the spool holds"
        else:
            yield stream, status.st_size
    finally:
        os.close(stream)


def _read_header(fd: int, name: str, max_bytes: int) -> Header | str:
    with _opened(fd, name, max_bytes) as opened:
        if isinstance(opened, str):
            return opened
        stream, size = opened
        start = os.read(stream, HEADER_LIMIT)
        line, newline, _ = start.partition(b"\n")
        if not newline:
            return "no header line (truncated, or not a batch)"
        header = _parse_header(line)
        if isinstance(header, Header) and header.size is not None and size - len(line) - 1 != header.size:
            return f"truncated: {size - len(line) - 1} of {header.size} payload bytes"
        return header


def _read(fd: int, name: str, max_bytes: int) -> tuple[Header, bytes] | str:
    with _opened(fd, name, max_bytes) as opened:
        if isinstance(opened, str):
            return opened
        stream, size = opened
        chunks = []
        left = size
        while left > 0:
            chunk = os.read(stream, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        line, newline, payload = b"".join(chunks).partition(b"\n")
        header = _parse_header(line) if newline else "no header line (truncated, or not a batch)"
        if isinstance(header, str):
            return header
        if header.size is not None and len(payload) != header.size:
            return f"truncated: {len(payload)} of {header.size} payload bytes"
        return header, payload


def _parse_header(line: bytes) -> Header | str:
    """The header, when every field has its type; else what is wrong, printable."""
    try:
        found = json.loads(line)
    except (ValueError, RecursionError):
        return "its header is not JSON"
    if not isinstance(found, dict):
        return "its header is not a JSON object"
    texts = {}
    for key in ("endpoint", "experiment_id", "experiment_name", "run_id", "workspace", "version"):
        value = found.get(key)
        if value is not None and (not isinstance(value, str) or printable(value) != value):
            return f"header field {key!r} is not a one-line string"
        texts[key] = value
    if not texts["endpoint"]:
        return "its header names no endpoint"
    for key, kind in _SENT.items():
        sent = texts[key]
        try:
            if sent is not None and kind.parse_text(sent) != sent:
                raise ValueError("expected no surrounding spaces")
        except ValueError as error:  # MLflow would refuse it, or it cannot go into a header at all
            return f"header field {key!r} cannot be sent: {error}"
    numbers = {}
    for key in ("spans", "traces", "bytes"):
        value = found.get(key, 0 if key != "bytes" else None)
        if value is not None and (type(value) is not int or value < 0):
            return f"header field {key!r} is not a count"
        numbers[key] = value
    target = Target(texts["endpoint"] or "", texts["experiment_id"], texts["experiment_name"],
                    texts["run_id"], texts["workspace"], texts["version"])
    return Header(target, numbers["spans"] or 0, numbers["traces"] or 0, numbers["bytes"])


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
