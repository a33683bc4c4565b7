"""A fork during one of traced-run's TLS handshakes: the fork waits for it, and a
child forked anyway (the handshake outlasted the wait) sends nothing over https,
since OpenSSL's locks are held for good there, and says why instead of hanging."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from support.fakes import settings

from traced_run import transport
from traced_run.transport import connections


def _in_child(do: object) -> str:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, str(do() if callable(do) else do).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        said = answer.read().decode()
    os.waitpid(pid, 0)
    return said


def test_a_fork_waits_for_a_handshake_under_way() -> None:
    released = threading.Event()

    def handshake() -> None:
        with connections._IN_OPENSSL:
            released.wait(5)

    shaking = threading.Thread(target=handshake)
    shaking.start()
    threading.Timer(0.3, released.set).start()
    started = time.monotonic()
    assert _in_child(lambda: connections._openssl_unsafe) == "False"
    assert time.monotonic() - started >= 0.25
    shaking.join()


def test_a_child_forked_inside_a_handshake_says_why_and_does_not_hang(tmp_path: Path) -> None:
    held = threading.Event()
    done = threading.Event()

    def handshake() -> None:
        with connections._IN_OPENSSL:
            held.set()
            done.wait(connections.FORK_WAIT + 5)

    shaking = threading.Thread(target=handshake)
    shaking.start()
    held.wait(5)
    try:
        said = _in_child(lambda: transport.request(settings(tmp_path), "https://127.0.0.1:9/v1/traces",
                                                   timeout=1).problem)
    finally:
        done.set()
        shaking.join()
    assert said == connections.FORKED_IN_OPENSSL
    assert not connections._openssl_unsafe  # the parent itself is unharmed
