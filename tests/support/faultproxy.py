"""A loopback HTTP proxy, started in-process by the delivery tests, in front of
the real MLflow server: it injects the failures MLflow itself cannot produce on
demand, and counts what it saw.

Modes (switch with ``proxy.mode = ...`` while apps run; the switch is in force
when the assignment returns):

- ``forward``: pass each request to MLflow and its answer back.
- ``refuse``: the listening socket is closed, so connections are refused as by
  a server that is down; switching to any other mode listens on the same port again.
- ``hang``: accept and read the request, never answer (the connection is
  closed only when the mode changes or the proxy stops).
- ``503``: answer 503 Service Unavailable.
- ``429``: answer 429 Too Many Requests with ``Retry-After: 1`` (or ``proxy.retry_after``).
  A 503 carries ``Retry-After`` only when ``proxy.retry_after`` is set.
- ``slow``: forward the request (MLflow stores it at once), then hold MLflow's
  answer ``proxy.delay`` seconds before it goes back: a slow MLflow.
- ``cut``: forward the request (MLflow stores it), then send the client the
  answer's status line, headers and part of its body, and close the
  connection: the client cannot tell whether its batch was taken.
- ``html``: answer ``200 OK`` with an HTML page (``Server: faultproxy-html``),
  as a login page or a placeholder that is not MLflow would.
- ``trickle``: send a status line, then one byte of a header a second, until the
  mode changes or the client leaves: a server that answers without ever finishing.

In ``forward`` mode, a request whose body (gunzipped) holds ``proxy.reject``
is answered 400 instead, as MLflow answers a request it cannot store: MLflow
stores a request all or nothing.

One request per connection: every request is forwarded with ``Connection: close``;
with ``proxy.keep_alive = True``, a client's connection is kept for its next
request in ``forward`` mode. ``Seen.connection`` numbers the connection a request
came on (in the order the proxy accepted them).
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

Mode = Literal["forward", "refuse", "hang", "503", "429", "cut", "html", "trickle", "slow"]
MODES: tuple[Mode, ...] = ("forward", "refuse", "hang", "503", "429", "cut", "html", "trickle", "slow")
_STATUS_TEXT = {503: "Service Unavailable", 429: "Too Many Requests"}
_IO_TIMEOUT = 60.0


@dataclass
class Seen:
    """One request the proxy read (counted as soon as it is read), and what it did with it."""

    mode: Mode
    method: str
    path: str
    connection: int = 0
    status: int | None = None
    """The status the client was sent in full; None when it got no complete answer (yet)."""
    at: float = 0.0
    """``time.monotonic()`` when the proxy had read the request."""


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        assert parsed.hostname and parsed.port, upstream
        self._upstream = (parsed.hostname, parsed.port)
        self._mode: Mode = "forward"
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopped = threading.Event()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.seen: list[Seen] = []
        self.reject: bytes | None = None
        self.keep_alive = False
        self.accepted = 0
        """Connections accepted so far."""
        self.retry_after: str | None = None
        """The ``Retry-After`` a 503 or 429 answer carries (a 429's is ``1`` when None)."""
        self.delay = 3.0
        """Seconds ``slow`` holds each answer."""
        self.port = 0
        self._listen()
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        assert mode in MODES, mode
        with self._changed:
            self._mode = mode
            self._changed.notify_all()
            if mode == "refuse":
                self._close_listener()
            elif self._listener is None:
                self._listen()

    def count(self, path: str = "/v1/traces", mode: Mode | None = None) -> int:
        """Requests for ``path`` seen so far (in ``mode``, if given)."""
        with self._lock:
            return sum(1 for s in self.seen if s.path.startswith(path) and mode in (None, s.mode))

    def statuses(self, path: str = "/v1/traces") -> list[int | None]:
        with self._lock:
            return [s.status for s in self.seen if s.path.startswith(path)]

    def close(self) -> None:
        self._stopped.set()
        with self._changed:
            self._close_listener()
            self._changed.notify_all()
            for connection in list(self._connections):
                with contextlib.suppress(OSError):
                    connection.close()
        self._acceptor.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- listening ------------------------------------------------------------------
    def _listen(self) -> None:
        """Bind the proxy's port (a free one the first time, the same one after a refuse)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:  # the old socket's port is not free again yet
                if time.monotonic() > deadline:
                    listener.close()
                    raise
                time.sleep(0.05)
        listener.listen(128)
        listener.settimeout(0.05)
        self.port = int(listener.getsockname()[1])
        self._listener = listener

    def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # stops listening at once, even mid-accept
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()  # pending, not yet accepted connections are reset
            self._listener = None

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                connection, _ = listener.accept()
            except (TimeoutError, OSError):  # OSError: closed by a switch to refuse
                continue
            connection.settimeout(_IO_TIMEOUT)
            with self._lock:
                self._connections.add(connection)
                self.accepted += 1
                number = self.accepted
            thread = threading.Thread(target=self._serve, args=(connection, number), daemon=True)
            thread.start()

    # --- one connection -------------------------------------------------------------
    def _serve(self, connection: socket.socket, number: int) -> None:
        try:
            while (request := _read_message(connection)) is not None:
                head, body = request
                method, path = _request_line(head)
                with self._lock:
                    seen = Seen(self._mode, method, path, number, at=time.monotonic())
                    self.seen.append(seen)
                seen.status = self._answer(connection, seen.mode, head, body)
                if not (self.keep_alive and seen.mode == "forward"):
                    return
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(connection)
            with contextlib.suppress(OSError):
                connection.close()

    def _answer(self, connection: socket.socket, mode: Mode, head: bytes, body: bytes) -> int | None:
        if mode in ("503", "429"):
            code = int(mode)
            after = self.retry_after or ("1" if code == 429 else None)
            extra = b"Retry-After: %s\r\n" % after.encode() if after else b""
            text = f"{code} {_STATUS_TEXT[code]} (faultproxy)".encode()
            connection.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                               b"Connection: close\r\n%s\r\n%s"
                               % (code, _STATUS_TEXT[code].encode(), len(text), extra, text))
            return code
        if mode == "hang":
            with self._changed:
                self._changed.wait_for(lambda: self._mode != "hang" or self._stopped.is_set())
            return None
        if mode == "refuse":  # accepted just before the switch: drop it unanswered
            return None
        if mode == "html":
            page = b"<html><body>Sign in</body></html>"
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                               b"Server: faultproxy-html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                               % (len(page), page))
            return 200
        if mode == "trickle":
            connection.sendall(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
            with self._changed:
                while not self._changed.wait_for(lambda: self._mode != "trickle" or self._stopped.is_set(),
                                                 timeout=1.0):
                    connection.sendall(b"a")
            return None
        if mode == "forward" and self.reject is not None and self.reject in _plain(head, body):
            text = b"rejected by faultproxy: the request holds a span MLflow cannot store"
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                               b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text))
            return 400
        answer = self._forward(head, body)
        status = int(answer[0].split(b" ", 2)[1])
        if mode == "cut":
            answer_head, answer_body = answer
            cut_head = _with_header(answer_head, b"Content-Length", b"%d" % (len(answer_body) + 1024))
            connection.sendall(cut_head + b"\r\n\r\n" + answer_body[: len(answer_body) // 2])
            connection.shutdown(socket.SHUT_RDWR)
            return None
        if mode == "slow":
            self._stopped.wait(self.delay)
        answer_head = answer[0]
        if self.keep_alive and mode == "forward":
            answer_head = _with_header(answer_head, b"Connection", b"keep-alive")
        connection.sendall(answer_head + b"\r\n\r\n" + answer[1])
        return status

    def _forward(self, head: bytes, body: bytes) -> tuple[bytes, bytes]:
        host = b"%s:%d" % (self._upstream[0].encode(), self._upstream[1])
        head = _with_header(_with_header(head, b"Host", host), b"Connection", b"close")
        with socket.create_connection(self._upstream, timeout=_IO_TIMEOUT) as upstream:
            upstream.sendall(head + b"\r\n\r\n" + body)
            answer = _read_message(upstream, response=True)
        if answer is None:
            raise OSError("upstream closed without an answer")
        answer_head, answer_body = answer
        # The body was read whole (length or close-delimited): pass it on with its length.
        answer_head = _without_header(answer_head, b"Transfer-Encoding")
        answer_head = _with_header(answer_head, b"Content-Length", b"%d" % len(answer_body))
        return _with_header(answer_head, b"Connection", b"close"), answer_body


# --- HTTP/1.1 framing, as little as these tests need ------------------------------
def _read_message(sock: socket.socket, *, response: bool = False) -> tuple[bytes, bytes] | None:
    """One request or response: its head (without the blank line) and its whole body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    headers = _headers(head)
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        body = bytearray(rest)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed mid-body")
            body += chunk
        return head, bytes(body[:length])
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        return head, _read_chunked(sock, rest)
    if not response:
        return head, b""
    body = bytearray(rest)  # close-delimited answer
    for chunk in iter(lambda: sock.recv(65536), b""):
        body += chunk
    return head, bytes(body)


def _read_chunked(sock: socket.socket, data: bytes) -> bytes:
    buffer = bytearray(data)
    body = bytearray()

    def fill(need: int) -> None:
        while len(buffer) < need:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed mid-chunk")
            buffer.extend(chunk)

    while True:
        while b"\r\n" not in buffer:
            fill(len(buffer) + 1)
        line, _, _ = bytes(buffer).partition(b"\r\n")
        del buffer[: len(line) + 2]
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while not bytes(buffer).startswith(b"\r\n") and b"\r\n\r\n" not in buffer:
                fill(len(buffer) + 1)
            return bytes(body)
        fill(size + 2)
        body += buffer[:size]
        del buffer[: size + 2]


def _plain(head: bytes, body: bytes) -> bytes:
    return gzip.decompress(body) if _headers(head).get(b"content-encoding") == b"gzip" else body


def _request_line(head: bytes) -> tuple[str, str]:
    method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    return method, path


def _headers(head: bytes) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        found[name.strip().lower()] = value.strip()
    return found


def _without_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    kept = [line for line in lines[1:] if line.partition(b":")[0].strip().lower() != name.lower()]
    return b"\r\n".join([lines[0], *kept])


def _with_header(head: bytes, name: bytes, value: bytes) -> bytes:
    return _without_header(head, name) + b"\r\n" + name + b": " + value


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()
