"""Every HTTP request traced-run makes: the export post, the experiment
lookup, the doctor's checks and ``flush``.

One place decides the headers (MLflow's experiment and run, auth, the user's
extra headers), the compression, the timeout and what an answer means.
Redirects are never followed: a post that urllib follows turns into a ``GET``
that drops the body and carries the ``Authorization`` header to whatever host
the server named, so a 3xx is an answer like any failure, with the place it
pointed to in the reason. Nothing a server says reaches a terminal or a file
unescaped: its control characters (ANSI escapes, CR/LF) are shown as ``\\x1b``.

urllib is imported on the first request, not with this module: the launcher
imports the message below and must stay quick to start.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from traced_run.report import mask_url

if TYPE_CHECKING:
    import urllib.request

    from traced_run.settings import Settings

NO_TRACKING_URI = ("no MLflow tracking URI: set MLFLOW_TRACKING_URI, --tracking-uri or tracking_uri "
                   "in the config file")
BODY_LIMIT = 1 << 20
"""Most bytes of an answer read (MLflow's answers to us are small)."""
ERROR_BODY_LIMIT = 4096
"""Most bytes of an error answer read: its start is all a message shows."""
_UNSAFE = {**{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
           **{c: f"\\u{c:04x}" for c in (*range(0x200E, 0x2010), *range(0x202A, 0x202F),
                                         *range(0x2066, 0x206A))}}
"""Control characters, and the bidirectional marks that reorder what a terminal shows."""


def printable(text: str) -> str:
    """``text`` with every control character escaped: safe on a terminal and in a file."""
    return text.translate(_UNSAFE)


def without_userinfo(url: str) -> str:
    """``url`` without the ``user:password@`` part, which is never sent and never stored."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


@dataclass(frozen=True)
class Answer:
    """What came back: a status and the start of the body, or why nothing did."""

    status: int | None
    """HTTP status; None when there was no answer."""
    body: bytes = b""
    problem: str = ""
    """Why the request did not succeed, printable: refused, timed out, redirected, HTTP 404 ..."""
    ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except (ValueError, RecursionError):
            return {}

    def error_code(self) -> str:
        """MLflow's ``error_code`` in a JSON error body, printable, or ''."""
        found = self.json() if self.body.startswith(b"{") else {}
        code = found.get("error_code") if isinstance(found, dict) else None
        return printable(str(code))[:100] if code else ""

    def text(self, limit: int = 200) -> str:
        """The start of the body on one printable line."""
        return printable(" ".join(self.body.decode("utf-8", "replace").split()))[:limit]


def auth_headers(settings: Settings) -> dict[str, str]:
    """Basic auth from user name and password, else Bearer from the token, as
    MLflow's own client builds them."""
    if settings.username:
        pair = f"{settings.username}:{settings.password or ''}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    if settings.token:
        return {"Authorization": f"Bearer {settings.token}"}
    return {}


def otlp_headers(settings: Settings, experiment_id: str, run_id: str | None) -> dict[str, str]:
    """The headers of an OTLP post to MLflow: experiment, run, auth, the user's own."""
    headers = {"Content-Type": "application/x-protobuf", "x-mlflow-experiment-id": experiment_id}
    if run_id:
        headers["x-mlflow-run-id"] = run_id
    headers.update(auth_headers(settings))
    headers.update(settings.headers)
    return headers


def compressed(payload: bytes, settings: Settings) -> tuple[bytes, dict[str, str]]:
    """The body as ``settings.compression`` has it sent, and the header that says so."""
    if settings.compression == "gzip":
        import gzip

        return gzip.compress(payload, compresslevel=6), {"Content-Encoding": "gzip"}
    if settings.compression == "deflate":
        return zlib.compress(payload), {"Content-Encoding": "deflate"}
    return payload, {}


def post_otlp(settings: Settings, url: str, payload: bytes, experiment_id: str, run_id: str | None,
              timeout: float) -> Answer:
    """One OTLP post, as the delivery thread, ``flush`` and the doctor's proof make it."""
    body, encoding = compressed(payload, settings)
    headers = {**otlp_headers(settings, experiment_id, run_id), **encoding}
    return request(url, method="POST", data=body, headers=headers, timeout=timeout)


def call_json(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float | None = None) -> Answer:
    """A call to MLflow's REST API under the tracking URI, with auth."""
    if not settings.tracking_uri:
        return Answer(None, problem=NO_TRACKING_URI)
    headers = auth_headers(settings)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return request(settings.tracking_uri + path, method=method, data=data, headers=headers,
                   timeout=settings.timeout if timeout is None else timeout)


def request(url: str, *, method: str = "GET", data: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float) -> Answer:
    """One request, no redirect followed, never raising: a failure is an
    Answer whose ``problem`` says why, in words safe to print."""
    import http.client
    import urllib.error
    import urllib.request

    started = time.monotonic()

    def answer(status: int | None, body: bytes = b"", problem: str = "") -> Answer:
        return Answer(status, body, problem, (time.monotonic() - started) * 1000)

    timeout = max(timeout, 0.05)
    try:
        prepared = urllib.request.Request(without_userinfo(url), data=data, method=method,
                                          headers=headers or {})
        with _opener().open(prepared, timeout=timeout) as response:
            body = response.read(BODY_LIMIT)
            if response.length and len(body) < BODY_LIMIT:  # the connection closed before the end
                return answer(None, problem=f"the answer was cut short after {len(body)} bytes")
            return answer(response.status, body)
    except urllib.error.HTTPError as error:
        try:
            body = error.read(ERROR_BODY_LIMIT)
        except (OSError, http.client.HTTPException):
            body = b""
        if 300 <= error.code < 400:
            return answer(error.code, body, _redirect(error.code, error.headers.get("Location")))
        reason = printable(" ".join(str(error.reason).split()))[:100]
        found = answer(error.code, body)
        detail = found.text()
        return Answer(error.code, body, f"HTTP {error.code} {reason}" + (f": {detail}" if detail else ""),
                      found.ms)
    except TimeoutError:
        return answer(None, problem=f"no answer within {timeout:.1f} s")
    except urllib.error.URLError as error:
        return answer(None, problem=_network_reason(error.reason, timeout))
    except (OSError, ValueError, http.client.HTTPException) as error:
        return answer(None, problem=_network_reason(error, timeout))


def _redirect(status: int, location: str | None) -> str:
    where = printable(mask_url(without_userinfo(location or "")))[:200] or "nowhere"
    return (f"HTTP {status}: redirected to {where}, which is not followed (a redirected post loses its "
            "body and would take the credentials along): set the URL the server redirects to")


def _network_reason(reason: object, timeout: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:.1f} s"
    if isinstance(reason, OSError) and reason.strerror:
        return printable(reason.strerror.lower())
    # Library text may quote the URL, and with it a password.
    return printable(mask_url(str(reason)))[:200] or type(reason).__name__


_OPENER: urllib.request.OpenerDirector | None = None


def _opener() -> urllib.request.OpenerDirector:
    """urllib's usual opener (proxies from the environment, https), minus redirects."""
    global _OPENER
    if _OPENER is None:
        import urllib.request

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None  # urllib then raises the 3xx as an HTTPError

        _OPENER = urllib.request.build_opener(NoRedirect)
    return _OPENER
