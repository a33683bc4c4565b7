"""Every HTTP request traced-run makes: the export post, the experiment
lookup, the doctor's checks and ``flush``.

One place decides the headers (MLflow's experiment, run and workspace, auth,
the user's extra headers), TLS (the CA bundle, a client certificate,
``insecure_tls``), proxies (``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``, read as
MLflow's client reads them), the compression, the timeout and what an answer
means: a certificate problem, a 401/403 or an unknown workspace is said with
the setting that fixes it. Connections are kept alive, one per endpoint, and a
request's timeout bounds all of it (``connections``).
Redirects are never followed: a followed post turns into a ``GET`` that drops
the body and carries the ``Authorization`` header to whatever host the server
named, so a 3xx is an answer like any failure, with the place it pointed to in
the reason. Only an OTLP answer to a post counts as delivered: a 2xx from
something else (a login page, a proxy's placeholder) is a failure that names
what answered. Nothing a server says reaches a terminal or a file unescaped:
its control characters (ANSI escapes, CR/LF) are shown as ``\\x1b``.

http.client is imported on the first request, not with this module: the launcher
imports the message below and must stay quick to start.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from traced_run.report import mask_url

if TYPE_CHECKING:
    import ssl

    from traced_run.config.settings import Settings


def import_network_modules() -> None:
    """Import now what the first request imports: the delivery thread calls this
    before it lets a fork go ahead. A fork while it is inside one of these imports
    would give the child a module lock that no thread of the child ever releases,
    and the child's own first post would wait for it until the exit bound ran out."""
    import gzip  # noqa: F401

    import opentelemetry.context  # noqa: F401

    import traced_run.transport.connections  # noqa: F401


WORKSPACE_HEADER = "X-MLFLOW-WORKSPACE"
NO_ANSWER = "no answer within"
"""How a request's problem starts when the server did not answer in time."""
CA_FIX = ("set MLFLOW_TRACKING_SERVER_CERT_PATH (or REQUESTS_CA_BUNDLE) to the CA certificate (PEM) that "
          "signed the server's certificate")
CLIENT_CERT_FIX = ("set MLFLOW_TRACKING_CLIENT_CERT_PATH to a client certificate (PEM, with its key, or the "
                   "key in OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY) that the server's CA signed")
CREDENTIALS_FIX = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
NO_TRACKING_URI = ("no MLflow tracking URI: set MLFLOW_TRACKING_URI, --tracking-uri or tracking_uri "
                   "in the config file")
BODY_LIMIT = 1 << 20
"""Most bytes of an answer read (MLflow's answers to us are small)."""
ERROR_BODY_LIMIT = 4096
"""Most bytes of an error answer read: its start is all a message shows."""
MAX_RETRY_AFTER = 120.0
"""Longest ``Retry-After`` honoured: a running process spools meanwhile, and a longer (or
hostile) wait would leave MLflow unasked for longer than an outage line is worth."""
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
    content_type: str = ""
    server: str = ""
    """The ``Server`` header: what answered, when it is not what was meant to."""
    retry_after: float | None = None
    """Seconds a 429 or 503 asked the client to wait before it asks again (``Retry-After``)."""

    @property
    def asked(self) -> str:
        """What a message adds for the wait the answer asked for."""
        return "" if self.retry_after is None else f" (it asks to be retried in {self.retry_after:.0f} s)"

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and not self.problem

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

    @property
    def missing_workspace(self) -> bool:
        """MLflow (with workspaces on) does not know the X-MLFLOW-WORKSPACE sent:
        every route answers 404 then, the OTLP one too."""
        return self.status == 404 and b"Workspace '" in self.body and b"not found" in self.body

    @property
    def workspaces_off(self) -> bool:
        """MLflow without --enable-workspaces was sent an X-MLFLOW-WORKSPACE: every route answers 500."""
        return self.error_code() == "FEATURE_DISABLED" and b"workspaces are not enabled" in self.body

    @property
    def wrong_workspace(self) -> bool:
        """The workspace setting, not the request, is what is wrong."""
        return self.missing_workspace or self.workspaces_off


def who(settings: Settings) -> str:
    """The credentials sent, as a message names them (never their secret)."""
    if settings.username:
        return f"user {printable(settings.username)!r}"
    return "a bearer token" if settings.token else "no credentials"


def auth_headers(settings: Settings) -> dict[str, str]:
    """Basic auth from user name and password, else Bearer from the token, as
    MLflow's own client builds them."""
    if settings.username:
        pair = f"{settings.username}:{settings.password or ''}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    if settings.token:
        return {"Authorization": f"Bearer {settings.token}"}
    return {}


def rest_headers(settings: Settings, workspace: str | None) -> dict[str, str]:
    """Auth, and the workspace every request to MLflow names (as MLflow's client sends it)."""
    headers = auth_headers(settings)
    if workspace:
        headers[WORKSPACE_HEADER] = workspace
    return headers


def otlp_headers(settings: Settings, experiment_id: str, run_id: str | None,
                 workspace: str | None) -> dict[str, str]:
    """The headers of an OTLP post to MLflow: experiment, run, workspace, auth, the user's own."""
    headers = {"Content-Type": "application/x-protobuf", "x-mlflow-experiment-id": experiment_id}
    if run_id:
        headers["x-mlflow-run-id"] = run_id
    headers.update(rest_headers(settings, workspace))
    headers.update(settings.headers)
    return headers


COMPRESS_LEVEL = 1
"""zlib's fastest level: per agent run it costs a fraction of level 6's CPU (``python
benchmarks/export_cost.py`` prints both), CPU taken from the machine the app and often MLflow
run on, for a body about half again as large, which a loopback or LAN MLflow reads as fast."""


def compressed(payload: bytes, settings: Settings) -> tuple[bytes, dict[str, str]]:
    """The body as ``settings.compression`` has it sent, and the header that says so."""
    if settings.compression == "gzip":
        import gzip

        return gzip.compress(payload, compresslevel=COMPRESS_LEVEL), {"Content-Encoding": "gzip"}
    if settings.compression == "deflate":
        return zlib.compress(payload, COMPRESS_LEVEL), {"Content-Encoding": "deflate"}
    return payload, {}


def post_otlp(settings: Settings, url: str, payload: bytes, experiment_id: str, run_id: str | None,
              workspace: str | None, timeout: float) -> Answer:
    """One OTLP post, as the delivery thread, ``flush`` and the doctor's proof make it."""
    body, encoding = compressed(payload, settings)
    headers = {**otlp_headers(settings, experiment_id, run_id, workspace), **encoding}
    return otlp_answer(request(settings, url, method="POST", data=body, headers=headers, timeout=timeout))


OTLP_TYPES = ("application/x-protobuf", "application/json")


def otlp_answer(answer: Answer) -> Answer:
    """``answer`` to an OTLP post, a failure unless it is one: a 2xx counts only with an
    OTLP content type and a body that reads as an ExportTraceServiceResponse. A partial
    success (spans the server rejected) is delivered, as OTLP has it (sending it again
    cannot help), and said."""
    if not answer.ok:
        return answer
    media = answer.content_type.partition(";")[0].strip().lower()
    partial = _partial_success(answer.body, as_json=media == OTLP_TYPES[1]) if media in OTLP_TYPES else None
    if partial is None:
        server = f"server {printable(answer.server)[:80]!r}" if answer.server else "an unnamed server"
        what = (f"{media} with a body that is no ExportTraceServiceResponse" if media in OTLP_TYPES
                else f"{printable(media)[:60] or 'no content type'}, not an OTLP answer")
        return replace(answer, problem=f"HTTP {answer.status} {what}, from {server}: is the endpoint "
                       "MLflow's /v1/traces?")
    rejected, message = partial
    if rejected or message:
        from traced_run.report import say

        say(f"MLflow took a batch but rejected {rejected} of its spans"
            + (f": {printable(message)[:200]}" if message else ""))
    return answer


def _partial_success(body: bytes, *, as_json: bool) -> tuple[int, str] | None:
    """(rejected spans, error message) of an ExportTraceServiceResponse, None when ``body``
    is not one. Read by hand, as ``export`` writes requests: protobuf's modules cost a
    process about 4 MB."""
    if as_json:
        return _json_partial_success(body)
    outer = fields(body)
    if outer is None:
        # MLflow before 3.7 answers its JSON model under the protobuf content type.
        return _json_partial_success(body) if body.lstrip().startswith(b"{") else None
    rejected, message = 0, ""
    for number, value in outer:
        inner = fields(value) if number == 1 and isinstance(value, bytes) else []
        if inner is None:
            return None
        for field, part in inner:
            if field == 1 and isinstance(part, int):
                rejected = part
            elif field == 2 and isinstance(part, bytes):
                message = part.decode("utf-8", "replace")
    return rejected, message


def _json_partial_success(body: bytes) -> tuple[int, str] | None:
    try:
        found = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return None
    if not isinstance(found, dict):
        return None
    partial = found.get("partialSuccess", found.get("partial_success")) or {}
    if not isinstance(partial, dict):
        return None
    rejected = partial.get("rejectedSpans", partial.get("rejected_spans")) or 0
    message = partial.get("errorMessage", partial.get("error_message")) or ""
    try:
        return int(rejected), str(message)
    except (TypeError, ValueError):
        return None


def fields(data: bytes) -> list[tuple[int, int | bytes]] | None:
    """A protobuf message's (field number, value) pairs, a fixed-width value as its bytes; None
    when ``data`` is no message."""
    found: list[tuple[int, int | bytes]] = []
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        if key is None or key >> 3 == 0:
            return None
        kind = key & 7
        value: int | bytes | None
        if kind == 0:
            value, at = _varint(data, at)
        elif kind == 2:
            size, at = _varint(data, at)
            value = None if size is None or at + size > len(data) else data[at:at + size]
            at += size or 0
        elif kind in (1, 5):
            size = 8 if kind == 1 else 4
            value = data[at:at + size] if at + size <= len(data) else None
            at += size
        else:
            return None
        if value is None:
            return None
        found.append((key >> 3, value))
    return found


def _varint(data: bytes, at: int) -> tuple[int | None, int]:
    number = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        at += 1
        number |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return number, at
        shift += 7
    return None, at


def call_json(settings: Settings, method: str, path: str, workspace: str | None,
              body: dict[str, Any] | None = None, timeout: float | None = None) -> Answer:
    """A call to MLflow's REST API under the tracking URI, with auth, in ``workspace``
    (a spooled batch's may differ from the configured one; None: the server's default)."""
    if not settings.tracking_uri:
        return Answer(None, problem=NO_TRACKING_URI)
    headers = rest_headers(settings, workspace)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return request(settings, settings.tracking_uri + path, method=method, data=data, headers=headers,
                   timeout=settings.timeout if timeout is None else timeout)


def request(settings: Settings, url: str, *, method: str = "GET", data: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float) -> Answer:
    """One request, over the endpoint's kept connection, with the TLS and proxies
    ``settings`` and the environment give, over in full (connect, send, answer)
    within ``timeout``, no redirect followed, never raising: a failure is an Answer
    whose ``problem`` says why, and what fixes it, in words safe to print. No
    instrumentation of the app's sees it (OpenTelemetry's suppression keys are set)."""
    import http.client

    from traced_run.transport import connections

    started = time.monotonic()

    def answer(status: int | None, body: bytes = b"", problem: str = "") -> Answer:
        return Answer(status, body, problem, (time.monotonic() - started) * 1000)

    timeout = max(timeout, 0.05)
    secure = url.startswith("https:")
    if settings.insecure_tls and secure:
        from traced_run.report import say

        say(INSECURE_WARNING)  # once per process: say() repeats no line
    tls_key = (settings.ca_bundle, settings.client_cert, settings.client_key, settings.insecure_tls)
    try:
        with uninstrumented():
            reply = connections.exchange(
                without_userinfo(url), method, data, headers or {}, started + timeout,
                lambda: connections.tls(tls_key, lambda: tls_context(settings)), tls_key, BODY_LIMIT)
    except TlsSetupError as error:
        return answer(None, problem=str(error))
    except (OSError, ValueError, http.client.HTTPException) as error:  # TimeoutError is an OSError
        return answer(None, problem=_network_reason(error, timeout, settings, url))
    if reply.cut_short:
        return answer(None, problem=f"the answer was cut short after {len(reply.body)} bytes")
    found = Answer(reply.status, reply.body if reply.status < 300 else reply.body[:ERROR_BODY_LIMIT],
                   ms=(time.monotonic() - started) * 1000, content_type=reply.headers.get("Content-Type", ""),
                   server=reply.headers.get("Server", ""))
    if found.status is not None and found.status < 300:
        return found
    if reply.status < 400:
        return replace(found, problem=_redirect(reply.status, reply.headers.get("Location")))
    reason = printable(" ".join(reply.reason.split()))[:100]
    detail = found.text()
    problem = f"HTTP {reply.status} {reason}" + (f": {detail}" if detail else "")
    if reply.status in (429, 503):
        found = replace(found, retry_after=retry_after(reply.headers.get("Retry-After")))
        problem += found.asked
    return replace(found, problem=_with_fix(found, problem, settings))


def retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header's wait in seconds (delay-seconds or an HTTP-date), at most
    ``MAX_RETRY_AFTER``; None when it is absent or says nothing readable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT; a zone-less one is read so
        import datetime

        when = when.replace(tzinfo=datetime.timezone.utc)
    return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER)


@contextlib.contextmanager
def uninstrumented() -> Iterator[None]:
    """OpenTelemetry's suppress-instrumentation context, as the SDK's own exporters set it
    around an export: the app's urllib, urllib3, requests (and any) instrumentation makes no
    span of traced-run's own requests. The keys are opentelemetry-api's; the helpers that set
    them live in opentelemetry-instrumentation, which an app need not have (and which costs
    its import), so they are set here; the plain key is the one older instrumentations read."""
    from opentelemetry import context

    values = context.set_value(context._SUPPRESS_INSTRUMENTATION_KEY, True)
    values = context.set_value(context._SUPPRESS_HTTP_INSTRUMENTATION_KEY, True, values)
    token = context.attach(context.set_value("suppress_instrumentation", True, values))
    try:
        yield
    finally:
        context.detach(token)


def _with_fix(found: Answer, problem: str, settings: Settings) -> str:
    """An error answer's problem, led by what it means and what fixes it where that is known."""
    if found.status == 401:
        return (f"HTTP 401: MLflow did not accept the credentials ({who(settings)}); {CREDENTIALS_FIX} "
                f"[{found.text(80)}]")
    if found.status == 403 and b"Invalid Host header" not in found.body:
        return (f"HTTP 403 {found.text(60)}: {who(settings)} has no permission for this (MLflow's answer); "
                "ask an MLflow admin for EDIT permission on the experiment, or set other credentials "
                "(MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD)")
    if found.missing_workspace:
        workspace = printable(str(found.json().get("message", "")))[:120] or "the workspace"
        return (f"HTTP 404: {workspace} on MLflow; create it (mlflow.create_workspace) or set "
                "MLFLOW_WORKSPACE to a workspace that exists")
    if found.workspaces_off:
        return (f"HTTP {found.status} FEATURE_DISABLED: this MLflow has no workspaces, and "
                "MLFLOW_WORKSPACE is set; unset MLFLOW_WORKSPACE, or start mlflow server with "
                "--enable-workspaces")
    return problem


def _redirect(status: int, location: str | None) -> str:
    where = printable(mask_url(without_userinfo(location or "")))[:200] or "nowhere"
    return (f"HTTP {status}: redirected to {where}, which is not followed (a redirected post loses its "
            "body and would take the credentials along): set the URL the server redirects to")


def _network_reason(reason: object, timeout: float, settings: Settings, url: str) -> str:
    import ssl

    from traced_run.transport.certnames import name_mismatch

    if isinstance(reason, ssl.SSLCertVerificationError):
        mismatch = name_mismatch(reason, url, settings, timeout)
        if mismatch is not None:
            return mismatch
        said = printable(str(reason.verify_message or reason.reason or "")).lower()
        return f"certificate verify failed: {said}; {CA_FIX}"
    if isinstance(reason, ssl.SSLError):
        code = str(reason.reason or "")
        said = printable(code.lower().replace("_", " "))[:100] or printable(str(reason))[:100]
        if code in _CLIENT_CERT_ALERTS:
            return f"the server refused the TLS handshake ({said}): it wants a client certificate; " \
                   f"{CLIENT_CERT_FIX}"
        if isinstance(reason, ssl.SSLEOFError) and not settings.client_cert:
            # A TLS 1.3 server that requires a client certificate checks it after the handshake
            # and may just close the connection: the client sees only the end of it.
            # Worded as the alert's line is: which of the two a client sees is a race.
            return f"the server closed the TLS connection ({said}): it may want a client certificate; " \
                   f"{CLIENT_CERT_FIX}"
        if code == "WRONG_VERSION_NUMBER":
            return f"TLS failed ({said}): is the server plain http://? then write http:// in the URL"
        return f"TLS failed ({said})"
    if isinstance(reason, TimeoutError):
        return f"{NO_ANSWER} {timeout:.1f} s"
    if isinstance(reason, OSError) and reason.strerror:
        return printable(reason.strerror.lower())
    # Library text may quote the URL, and with it a password.
    return printable(mask_url(str(reason)))[:200] or type(reason).__name__


_CLIENT_CERT_ALERTS = {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE",
                       "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA",
                       "SSLV3_ALERT_CERTIFICATE_UNKNOWN"}
"""What a server that requires a client certificate answers a handshake without
one (or with one its CA did not sign)."""


class TlsSetupError(Exception):
    """The configured CA bundle or client certificate cannot be used; ``str()`` says which and why."""


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context every https:// request uses: the CA bundle instead of the
    system's when one is set (as ``requests`` uses MLFLOW_TRACKING_SERVER_CERT_PATH
    or REQUESTS_CA_BUNDLE), the client certificate, or no verification at all."""
    import ssl

    cafile = capath = None
    if settings.ca_bundle:
        capath, cafile = (settings.ca_bundle, None) if os.path.isdir(settings.ca_bundle) \
            else (None, settings.ca_bundle)
    try:
        context = ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise TlsSetupError(f"cannot use the CA bundle {settings.ca_bundle} ({_ssl_words(error)}); set "
                            "MLFLOW_TRACKING_SERVER_CERT_PATH to a PEM file of CA certificates") from None
    if settings.insecure_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.client_cert:
        try:
            # A key that needs a passphrase fails here instead of prompting on the app's terminal.
            context.load_cert_chain(settings.client_cert, settings.client_key, password=lambda: b"")
        except (OSError, ValueError) as error:
            raise TlsSetupError(f"cannot use the client certificate {settings.client_cert}"
                                + (f" with key {settings.client_key}" if settings.client_key else "")
                                + f" ({_ssl_words(error)}); set MLFLOW_TRACKING_CLIENT_CERT_PATH to a PEM "
                                "file with the certificate and its unencrypted key") from None
    return context


def _ssl_words(error: BaseException) -> str:
    import ssl

    if isinstance(error, ssl.SSLError) and error.reason:
        return printable(str(error.reason).lower().replace("_", " "))
    return printable(getattr(error, "strerror", None) or str(error))[:120].lower()


INSECURE_WARNING = ("MLFLOW_TRACKING_INSECURE_TLS is true: the MLflow server's certificate is not verified, "
                    "so anyone on the way can read and change traces; use it for a development server only")

def proxy_for(url: str) -> str | None:
    """The proxy a request to ``url`` goes through (HTTPS_PROXY/HTTP_PROXY, unless
    NO_PROXY covers the host), without its credentials; None when it goes direct."""
    import urllib.request

    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.netloc.rpartition("@")[2]):
        return None
    return mask_url(proxy)
