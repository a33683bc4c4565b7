"""The courier: a process of its own that turns a busy process's batches into
OTLP requests and posts them, so that work does not hold the app's GIL.

Per span, MLflow's copy (OpenInference's rewrite, the conversation, redaction),
its encoding and gzip cost the delivery thread about ten times what handing
the span over costs (150-190 µs against 17 µs, for the recorded conversations of
tests/conversations.py), and the post comes on top: the delivery thread sends
the courier the span's fields (``marshal`` of plain tuples, one write on a
socket pair per batch) and waits for its answer with the GIL released.
Everything else stays where it was: the queue, the back-off, the spool, the
ledger and the exit path are the app process's, and a batch stays the delivery
thread's until the courier has answered for it, so a courier that dies or stops
answering loses nothing: the delivery thread sends that batch, and every later
one, itself.

A process starts its courier only once it is busy (``BUSY_BATCHES`` batches in
a row at ``BUSY_RATE`` spans a second or more: a short script, or an app whose
runs wait on an LLM, never pays for one), and uses it from its first answer on. It
runs ``python -S -m traced_run.delivery.courier_process <pid>`` from ``/``
(nothing in the app's directory can stand in for a module it imports), in a
session of its own (a Ctrl-C at the terminal is the app's to handle), with the
app's ``sys.path``; its stdout and stderr are ``/dev/null``. It never outlives
the app by more than a post: it ends at the end of its input (the app closed
it, or died), on Linux also when the app's delivery thread ends, and the app's
exit path kills it. A forked child never writes to its parent's courier; it
starts its own.
"""

from __future__ import annotations

import marshal
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import astuple, fields
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import ReadableSpan

from traced_run import report
from traced_run.config.settings import SPECS, Settings
from traced_run.delivery.spool import Target

if TYPE_CHECKING:
    from traced_run.delivery.export import Outcome

BUSY_RATE = 128
"""Spans a second that make a batch busy: counted since the batch before was taken, over
a second at least (a batch waits a second at most for more spans)."""
BUSY_BATCHES = 2
"""Busy batches in a row after which a process starts its courier: one that is not
that busy (an app waiting on an LLM for seconds per run) never pays for one."""
ANSWER_MARGIN = 2.0
"""Seconds a courier may take beyond a post's timeout (encoding the batch) before it counts as stuck."""
START_WAIT = 30.0
"""Seconds a courier may take to start (import its modules) before the process gives up on it."""
PROCESS_MODULE = "traced_run.delivery.courier_process"
"""What the courier runs: ``ps`` shows it with the app's pid."""
LENGTH = struct.Struct("!I")
_PATH_KINDS = {"path"}


class CourierGone(Exception):
    """The courier cannot take this batch; why, for the one line the user gets."""


class Courier:
    """The delivery thread's courier, in the app process. Only the delivery thread uses it,
    but ``stop`` (the exit path) and ``forget`` (a forked child). It talks over a socket
    pair, not pipes: a send to a courier that died fails with EPIPE, where a pipe would
    kill an app that set SIGPIPE back to its default."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._ready = False
        self._broken = False
        self._busy = 0
        """Busy batches in a row so far."""
        self._last_batch = time.monotonic()
        self._started_at = 0.0
        self._stopped = False
        """The exit path ended it: the delivery thread's late answer is not a failure to tell."""
        self._asked = False
        """A request is with the courier, unanswered."""

    def usable(self, spans: int, *, leaving: bool) -> bool:
        """True when the courier takes batches; ``spans`` is the batch at hand: the
        courier starts after ``BUSY_BATCHES`` busy ones in a row (not when ``leaving``:
        too late to pay off). Called once per batch."""
        if self._ready or self._broken or self._stopped:
            return self._ready
        if self._process is None:
            now, since = time.monotonic(), self._last_batch
            self._last_batch = now
            self._busy = self._busy + 1 if spans / max(now - since, 1.0) >= BUSY_RATE else 0
            wanted = self._busy >= BUSY_BATCHES and not leaving and self._settings.courier
            if wanted and can_start(sys.executable):
                self._start()
            return False
        return self._check_ready()

    def _start(self) -> None:
        try:
            self._socket, theirs = socket.socketpair()
            with theirs:
                self._process = subprocess.Popen(
                    [sys.executable, "-S", "-m", PROCESS_MODULE, str(os.getpid())], stdin=theirs.fileno(),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                    env=process_env(sys.path, os.environ), start_new_session=True)
            self._send(_settings_fields(self._settings), time.monotonic() + START_WAIT)
        except (OSError, CourierGone) as error:
            self._give_up(f"it could not start: {error}")
            return
        self._started_at = time.monotonic()

    def _check_ready(self) -> bool:
        assert self._socket is not None
        waiting = select.poll()  # not select(): an app with over 1024 open files has higher fds
        waiting.register(self._socket, select.POLLIN)
        try:
            if waiting.poll(0):
                if self._receive(time.monotonic() + ANSWER_MARGIN) != "ready":
                    raise CourierGone("it did not start")
                self._ready = True
            elif time.monotonic() - self._started_at > START_WAIT:
                raise CourierGone(f"it did not start within {START_WAIT:g} s")
        except CourierGone as error:
            self._give_up(str(error))
        return self._ready

    def post(self, batch: Sequence[ReadableSpan], target: Target,
             timeout: float | None) -> tuple[bytes, Outcome | None]:
        """The batch's request body (unless MLflow took it), and, unless ``timeout`` is None,
        what MLflow made of it posted within ``timeout``. CourierGone when the courier cannot
        say: the batch is still the caller's, and the courier is not used again."""
        from traced_run.delivery.export import outcome_of

        deadline = time.monotonic() + (timeout or 0.0) + ANSWER_MARGIN
        try:
            request = marshal.dumps((timeout, astuple(target), *flatten(batch)))
        except Exception as error:  # a value marshal cannot write (this batch only): sent from here
            raise CourierGone(f"{type(error).__name__}: {error}") from None
        self._asked = True
        try:
            self._send_bytes(request, deadline)
            del request  # the batch's largest copy: not held while the courier works on it
            answer = self._receive(deadline)
            if answer is None:
                raise CourierGone("it is gone")
            if answer[0] == "error":
                raise CourierGone(f"it failed: {answer[1]}")
            payload, outcome = answer
            return payload, None if outcome is None else outcome_of(outcome)
        except CourierGone as error:
            self._give_up(str(error))
            raise
        except Exception as error:  # an answer that makes no sense: as good as none
            self._give_up(f"{type(error).__name__}: {error}")
            raise CourierGone(str(error)) from None
        finally:
            self._asked = False

    def _send(self, message: Any, deadline: float) -> None:
        self._send_bytes(marshal.dumps(message), deadline)

    def _send_bytes(self, data: bytes, deadline: float) -> None:
        sock = self._socket
        assert sock is not None

        def send(chunk: bytes) -> None:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(chunk, _NO_SIGNAL)

        try:
            write_message(send, data)
        except TimeoutError:
            raise CourierGone("it took no request in time") from None
        except OSError as error:
            raise CourierGone(f"it is gone ({error.strerror})") from None

    def _receive(self, deadline: float) -> Any:
        sock = self._socket
        assert sock is not None

        def read(into: memoryview) -> int:
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                return sock.recv_into(into)
            except TimeoutError:
                raise CourierGone("it did not answer in time") from None
            except OSError as error:
                raise CourierGone(f"it is gone ({error.strerror})") from None

        return read_message(read)

    def _give_up(self, why: str) -> None:
        pid = self._process.pid if self._process is not None else None
        self._ready, self._broken = False, True
        if self._stopped:
            return
        self._end()
        report.say(f"the courier process{'' if pid is None else f' (pid {pid})'} stopped ({why}); this "
                   f"process sends its traces itself from now on")

    def asked(self) -> int | None:
        """The courier's pid while it holds a request it has not answered: at exit, what
        did not answer may be the courier as well as the MLflow it posts to."""
        process = self._process
        return process.pid if self._asked and process is not None else None

    def stop(self) -> None:
        """End the courier at exit: it holds nothing of its own (a batch is the app's until
        answered). Its socket stays open: the delivery thread may be waiting on it, and
        learns from its end that the courier is gone."""
        self._stopped = True
        process = self._process
        if process is not None:
            _kill(process)

    def _end(self) -> None:
        process, self._process = self._process, None
        self._close_socket()
        if process is not None:
            _kill(process)

    def forget(self) -> None:
        """In a forked child: the parent's courier is the parent's; close its socket here only."""
        process, self._process = self._process, None
        self._close_socket()
        if process is not None:
            process.returncode = 0  # never waited for here: it is not this process's child
        self._ready = self._broken = self._stopped = False
        self._busy, self._last_batch = 0, time.monotonic()

    def _close_socket(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


_NO_SIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def can_start(executable: str) -> bool:
    """POSIX, and an interpreter (the app's ``sys.executable``) that is Python: an app embedded
    in another program (uWSGI's ``sys.executable`` is uwsgi) sends its traces itself."""
    return os.name == "posix" and os.path.basename(executable or "").startswith(("python", "pypy"))


def process_env(path: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The courier's environment: the app's ``environ``, with the app's ``sys.path`` as its
    PYTHONPATH, made absolute, since it runs from ``/``."""
    return {**environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(entry) for entry in path if entry)}


def _kill(process: subprocess.Popen[bytes]) -> None:
    try:
        process.kill()
        process.wait(0.5)
    except (OSError, subprocess.TimeoutExpired):  # reaped later by subprocess, or by init
        pass


def _settings_fields(settings: Settings) -> dict[str, Any]:
    """The settings as the courier rebuilds them; paths made absolute, since it runs from ``/``."""
    values = {}
    for field in fields(settings):
        value = getattr(settings, field.name)
        if SPECS[field.name].kind.name in _PATH_KINDS and isinstance(value, str):
            value = os.path.abspath(value)
        values[field.name] = value
    return values


def read_message(read_into: Callable[[memoryview], int]) -> Any:
    """The next message ``read_into`` (a socket's ``recv_into``) gives; None at the end of its input."""
    head = _exactly(read_into, LENGTH.size)
    body = None if head is None else _exactly(read_into, LENGTH.unpack(head)[0])
    return None if body is None else marshal.loads(body)


def _exactly(read_into: Callable[[memoryview], int], size: int) -> bytearray | None:
    """``size`` bytes, read into one buffer: a batch of several MB is never held twice."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        got = read_into(view)
        if not got:
            return None
        view = view[got:]
    return buffer


def write_message(send_all: Callable[[bytes], None], data: bytes) -> None:
    """``data`` (``marshal``'s) framed for ``read_message``; the length goes first, on its own,
    so a batch of several MB is not copied to put four bytes in front of it."""
    send_all(LENGTH.pack(len(data)))
    send_all(data)


# -- spans as plain tuples, and back ---------------------------------------------------------

def flatten(batch: Sequence[ReadableSpan]) -> tuple[list[Any], list[Any], list[Any]]:
    """The resources, scopes and spans of ``batch`` as tuples ``marshal`` writes; a span
    refers to its resource and scope by their place in the first two lists."""
    places: dict[int, int] = {}
    resources: list[Any] = []
    scopes: list[Any] = []
    spans = []
    for span in batch:
        resource, scope = span.resource, span.instrumentation_scope
        if id(resource) not in places:
            places[id(resource)] = len(resources)
            resources.append((dict(resource.attributes), resource.schema_url))
        if id(scope) not in places:
            places[id(scope)] = len(scopes)
            scopes.append(None if scope is None else
                          (scope.name, scope.version, scope.schema_url, dict(scope.attributes or {})))
        context, status = span.get_span_context(), span.status
        assert context is not None  # a finished SDK span always has one
        spans.append((span.name, _context(context), None if span.parent is None else _context(span.parent),
                      places[id(resource)], places[id(scope)], dict(span.attributes or {}),
                      [(event.name, event.timestamp, dict(event.attributes or {})) for event in span.events],
                      [(_context(link.context), dict(link.attributes or {})) for link in span.links],
                      span.kind.value, status.status_code.value, status.description, span.start_time,
                      span.end_time))
    return resources, scopes, spans


def _context(context: Any) -> tuple[int, int, int, bool, list[tuple[str, str]]]:
    return (context.trace_id, context.span_id, int(context.trace_flags), context.is_remote,
            list(context.trace_state.items()) if context.trace_state else [])
