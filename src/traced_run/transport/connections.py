"""The connections under ``transport.request``: one kept alive per endpoint, and one
deadline for a whole request.

A post used to open TCP (and TLS) anew each time: urllib's opener sends
``Connection: close``. Here each route (endpoint, proxy, TLS set-up) keeps one
``http.client`` connection between requests; a thread that finds it in use opens
one of its own for that request. A kept connection the server has closed since
(MLflow's uvicorn closes an idle one after 5 s) is noticed before it is used, and
a request that fails on a kept connection before any answer arrived is sent once
more on a new one within the same deadline (an OTLP post is an upsert at MLflow).

A socket timeout bounds each read, so a server that sends one byte a second
never trips it: here every read (and the send, and the connect) gets what is left
of the request's deadline, and a read past it fails, so a trickling server cannot
stretch a request beyond its timeout. (A DNS lookup is not bounded: the resolver
has no timeout to give it.)

Proxies are urllib's (``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``, read once per
process, as urllib's opener read them): plain http through a proxy names the whole
URL in the request, https tunnels through it with ``CONNECT``; a proxy's user and
password become ``Proxy-Authorization: Basic``.

A forked child keeps none of its parent's connections: it opens its own. A fork
waits for a TLS handshake under way (``_IN_OPENSSL``), and a child forked inside
one anyway makes no https request (see ``FORKED_IN_OPENSSL``).
"""

from __future__ import annotations

import base64
import http.client
import io
import os
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from traced_run import __version__

USER_AGENT = f"traced-run/{__version__}"


@dataclass(frozen=True)
class Reply:
    """A whole answer: status, the headers a message needs, the start of the body."""

    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes
    cut_short: bool
    """The connection ended before the body announced was all there."""


@dataclass(frozen=True)
class _Route:
    """How a request to one endpoint leaves: to which host and port, through which proxy."""

    secure: bool
    """The connection speaks TLS (to the endpoint, or to an https:// proxy for plain http)."""
    host: str
    port: int
    tunnel: tuple[str, int] | None = None
    """The endpoint an https request reaches through a proxy's ``CONNECT``."""
    absolute: bool = False
    """Plain http through a proxy: the request line names the whole URL."""
    proxy_headers: tuple[tuple[str, str], ...] = ()


class _Deadline:
    """When the request on a connection must be over."""

    def __init__(self) -> None:
        self.at = 0.0

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        return left


class _TimedReader(io.RawIOBase):
    """The answer's bytes (the socket's own reader), each read given what is left of the
    deadline. Closing it closes that reader: a connection the server ends passes its socket
    to the response, which keeps it open until the answer is read."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._raw = raw
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(self._deadline.left())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _timed_response(deadline: _Deadline) -> type[http.client.HTTPResponse]:
    """http.client's response (a proxy's answer to CONNECT too), read within ``deadline``."""

    class TimedResponse(http.client.HTTPResponse):
        def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
            super().__init__(sock, *args, **kwargs)
            self.fp = io.BufferedReader(_TimedReader(self.fp.detach(), sock, deadline))

    return TimedResponse


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        if _openssl_unsafe:
            raise OSError(FORKED_IN_OPENSSL)
        with _IN_OPENSSL:
            super().connect()


@dataclass
class _Kept:
    connection: http.client.HTTPConnection
    deadline: _Deadline


_kept: dict[tuple[_Route, object], _Kept] = {}
_kept_lock = threading.Lock()
_routes: dict[tuple[str, str], _Route] = {}
_IN_OPENSSL = threading.Lock()
"""Held while this process builds a TLS context or shakes hands, and across a
fork. OpenSSL takes its own locks then (loading certificates, fetching its
algorithms, seeding its random generator); a child forked meanwhile inherits
them held and hangs for good at its next TLS handshake, or at the app's next
``hashlib`` call. So a fork waits for a handshake under way, at most
``FORK_WAIT`` s (a server that hangs mid-handshake holds it for its timeout)."""
FORK_WAIT = 2.0
_held_for_fork = False
_openssl_unsafe = False
"""True in a child forked while its parent was inside OpenSSL: it posts no https
request (each would hang), so its batches go to the spool, with the reason."""
FORKED_IN_OPENSSL = ("this process was forked while its parent was in a TLS handshake, so OpenSSL "
                     "cannot be used in it")
_contexts: dict[object, ssl.SSLContext] = {}


def _before_fork() -> None:
    global _held_for_fork
    _held_for_fork = _IN_OPENSSL.acquire(timeout=FORK_WAIT)


def _after_fork_in_parent() -> None:
    global _held_for_fork
    if _held_for_fork:
        _held_for_fork = False
        _IN_OPENSSL.release()


def _after_fork_in_child() -> None:
    global _IN_OPENSSL, _held_for_fork, _openssl_unsafe, _kept_lock
    _openssl_unsafe = _openssl_unsafe or not _held_for_fork
    _held_for_fork = False
    _IN_OPENSSL = threading.Lock()  # the thread that held it is not in this process
    _kept_lock = threading.Lock()
    # The parent's sockets: closing the child's copies leaves the parent's connections open.
    _kept.clear()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def tls(key: object, build: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """The TLS context for ``key`` (the TLS settings), built once per process, outside
    any fork. An http:// MLflow never touches OpenSSL: a process forked while another of
    its parent's threads was inside OpenSSL hung for good creating a TLS context."""
    if _openssl_unsafe:
        raise OSError(FORKED_IN_OPENSSL)
    with _IN_OPENSSL:
        found = _contexts.get(key)
        if found is None:
            found = _contexts[key] = build()
    return found


def route(url: str) -> _Route:
    """How a request to ``url`` leaves (proxies as urllib reads them, once per endpoint)."""
    parts = urlsplit(url)
    key = (parts.scheme, parts.netloc)
    found = _routes.get(key)
    if found is None:
        found = _routes[key] = _route_of(parts.scheme, parts.hostname or "", parts.port, parts.netloc)
    return found


def _route_of(scheme: str, host: str, port: int | None, netloc: str) -> _Route:
    secure = scheme == "https"
    port = port or (443 if secure else 80)
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(netloc):
        return _Route(secure, host, port)
    found = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    via_tls = found.scheme == "https"
    proxy_port = found.port or (443 if via_tls else 80)
    headers: tuple[tuple[str, str], ...] = ()
    if found.username and found.password:
        pair = f"{unquote(found.username)}:{unquote(found.password)}".encode()
        headers = (("Proxy-Authorization", "Basic " + base64.b64encode(pair).decode()),)
    if secure:
        return _Route(True, found.hostname or "", proxy_port, tunnel=(host, port), proxy_headers=headers)
    return _Route(via_tls, found.hostname or "", proxy_port, absolute=True, proxy_headers=headers)


def exchange(url: str, method: str, body: bytes | None, headers: dict[str, str], deadline: float,
             context: Callable[[], ssl.SSLContext], tls_key: object, limit: int) -> Reply:
    """One request to ``url``, over the route's kept connection when it is free, over in
    full by ``deadline`` (monotonic): its first ``limit`` bytes of body. Raises what the
    connection raises (OSError, TimeoutError, http.client.HTTPException)."""
    way = route(url)
    target = url if way.absolute else _path(url)
    headers = {"User-Agent": USER_AGENT, **dict(way.proxy_headers if way.absolute else ()), **headers}
    key = (way, tls_key if way.secure else None)
    kept, reused = _checkout(key, way, context)
    kept.deadline.at = deadline
    try:
        try:
            reply = _ask(kept, method, target, body, headers, limit)
        except (ConnectionError, http.client.RemoteDisconnected):
            if not reused:
                raise
            # The server closed the kept connection as the request left: once more on a new one.
            kept.connection.close()
            reply = _ask(kept, method, target, body, headers, limit)
    except BaseException:
        kept.connection.close()
        raise
    _checkin(key, kept)
    return reply


def _path(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _ask(kept: _Kept, method: str, target: str, body: bytes | None, headers: dict[str, str],
         limit: int) -> Reply:
    connection = kept.connection
    connection.timeout = kept.deadline.left()
    if connection.sock is not None:
        connection.sock.settimeout(connection.timeout)
    connection.request(method, target, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read(limit)
    reply = Reply(response.status, response.reason, response.headers, data,
                  bool(response.length) and len(data) < limit)
    if not response.isclosed():  # more than ``limit``: the rest is not worth reading
        connection.close()
    return reply


def _checkout(key: tuple[_Route, object], way: _Route,
              context: Callable[[], ssl.SSLContext]) -> tuple[_Kept, bool]:
    """The route's kept connection (taken out while in use), or a new one; whether it was kept."""
    with _kept_lock:
        kept = _kept.pop(key, None)
    if kept is not None:
        sock = kept.connection.sock
        if sock is None or not _dropped(sock):
            return kept, sock is not None
        kept.connection.close()
        return kept, False
    deadline = _Deadline()
    connection = _connection(way, context)
    connection.response_class = _timed_response(deadline)
    return _Kept(connection, deadline), False


def _checkin(key: tuple[_Route, object], kept: _Kept) -> None:
    with _kept_lock:
        if _kept.setdefault(key, kept) is kept:
            return
    kept.connection.close()  # another thread's connection was kept meanwhile


def _dropped(sock: socket.socket) -> bool:
    """An idle connection the server has closed (or said something on) since: readable.
    poll, not select: an app with more than 1024 files open has sockets select cannot take."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _connection(way: _Route, context: Callable[[], ssl.SSLContext]) -> http.client.HTTPConnection:
    connection: http.client.HTTPConnection
    if way.secure:
        connection = _GuardedHTTPSConnection(way.host, way.port, context=context())
    else:
        connection = http.client.HTTPConnection(way.host, way.port)
    if way.tunnel is not None:
        connection.set_tunnel(*way.tunnel, headers=dict(way.proxy_headers))
    return connection
