"""One-line messages to the user, and the exit codes the launcher documents.

Everything traced-run says goes to stderr, never stdout: stdout belongs to the
app (MCP stdio servers, pipes). Each message is one line starting
``traced-run:`` and is said at most once per process.
"""

from __future__ import annotations

import os
import re
import sys
import threading

EXIT_USAGE = 2
"""A launcher option is wrong (argparse's convention)."""
EXIT_CONFIG = 78
"""The settings are invalid (sysexits' EX_CONFIG): launcher, and strict mode."""
EXIT_SETUP = 70
"""Strict mode only: the tracing pipeline could not be set up (EX_SOFTWARE)."""
EXIT_NOT_EXECUTABLE = 126
"""The command exists but cannot be executed, as shells report it."""
EXIT_NOT_FOUND = 127
"""The command was not found, as shells report it."""

_said: set[str] = set()
_lock = threading.Lock()
# What a URL carries before its host runs to the last "@" before the next URL (a scheme and
# "://" after a space, quote, bracket, "=" or ",") or the end: users paste unencoded "@", "/",
# ":", "://", spaces and even line breaks in passwords and tokens, and a masked host or path
# is harmless where a shown password is not.
_USERINFO = re.compile(r"(?<=://)(?:(?!(?<=[\s'\"(<\[{=,])[A-Za-z][A-Za-z0-9+.-]*://).)*@", re.DOTALL)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""C0, DEL and C1: a server's ANSI escapes, a CR that rewrites the line, a header break."""


class ConfigError(Exception):
    """A setting is wrong; ``str()`` is the one line that says where and why."""


def mask_url(text: str) -> str:
    """``text`` with the credentials of every URL in it hidden: ``https://user:secret@host``
    and ``https://token@host`` become ``https://***@host``. Every message, ``traced-run
    config`` and the doctor show values through this."""
    return _USERINFO.sub("***@", text)


def printable(text: str) -> str:
    """One line, fit for a terminal or a log: whitespace runs become one space, other
    control characters their ``\\xNN`` escape."""
    return CONTROL.sub(lambda found: f"\\x{ord(found[0]):02x}", " ".join(text.split()))


def counted(number: int, noun: str, plural: str = "") -> str:
    """``1 trace``, ``2 traces``: a count as a user reads it."""
    return f"{number} {noun}" if number == 1 else f"{number} {plural or noun + 's'}"


def age(seconds: float) -> str:
    """A duration as a person reads it: ``40 s``, ``12 min``, ``5 h``, ``3 d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def say(message: str) -> None:
    """Write ``traced-run: <message>`` to stderr once per process, URL credentials
    masked and control characters escaped."""
    line = printable(mask_url(message))
    with _lock:
        if line in _said:
            return
        _said.add(line)
    stream = sys.__stderr__
    if stream is None:  # pythonw, or a daemon that closed fd 2
        return
    try:
        stream.write(f"traced-run: {line}\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def untraced_interpreter(strict: bool) -> None:
    """Said by an interpreter a launcher started that cannot import traced_run (another
    environment's Python, a #! interpreter, ``uv run`` in a project without traced-run):
    loaded by path, as nothing else of the package can be. Strict mode stops it here."""
    what = "not starting the app (strict mode)" if strict else "the app runs untraced"
    if os.environ.get("UV"):  # uv run sets it for what it runs: the environment is a uv project's
        fix = ("Run it as `traced-run uv run ...` (uv adds traced-run for that run), or add traced-run "
               "to the project: uv add traced-run")
    else:
        fix = "Install traced-run there, or run the app with the Python traced-run is installed in"
    say(f"{sys.executable} cannot import traced_run: it is not installed in that Python's environment; "
        f"{what}. {fix}")
    if strict:
        os._exit(EXIT_SETUP)


def forget_after_fork() -> None:
    """A forked child reports its own problems, even ones its parent already said."""
    global _lock
    _lock = threading.Lock()
    _said.clear()


os.register_at_fork(after_in_child=forget_after_fork)
