"""traced-run's own requests (issue 24 items 2 and 3, issue 23 item 5), against the
real MLflow behind the fault proxy, from real processes under ``traced-run``: one
kept-alive connection per endpoint that a forked child does not share, one deadline
for the whole request that a trickling server cannot stretch, only an OTLP answer
counts as delivered, and an app that instruments its own HTTP clients sees none of
traced-run's requests."""

from __future__ import annotations

import http.server
import json
import re
import threading
import urllib.request

import pytest
from conftest import App, MlflowServer, QuietHandler, poll
from support.faultproxy import FaultProxy
from support.launched import (
    EXIT_TIMEOUT,
    NOT_WAITING,
    Lines,
    flush,
    loop_app,
    proxied_env,
    spool_of,
    spooled,
    start,
    stop,
    tool_agent,
    traced_lines,
    wait_runs,
)

from traced_run import transport
from traced_run.config.settings import Settings
from traced_run.transport import connections


def by_id(app: App, proxy: FaultProxy, **extra: str) -> dict[str, str]:
    """The app's environment with its experiment given by id: no lookup is made."""
    env = proxied_env(app, proxy, MLFLOW_EXPERIMENT_ID=app.server.client().create_experiment(app.experiment),
                      **extra)
    del env["MLFLOW_EXPERIMENT_NAME"]
    return env


# --- only MLflow's answer counts -----------------------------------------------------------
def test_a_2xx_that_is_not_an_otlp_answer_keeps_the_spans_and_names_the_server(
        app: App, proxy: FaultProxy) -> None:
    """Before, a server answering ``200 text/html`` to everything (a login page, a
    placeholder) emptied the spool and nothing was said."""
    app.write(tool_agent("html", "agent.run_sync('html 0')\n"))
    env = by_id(app, proxy)
    proxy.mode = "html"
    done = app.run("python", "app.py", env=env)
    assert done.returncode == 0, done.stderr.decode()
    (line,) = traced_lines(done.stderr)
    assert re.fullmatch(r"traced-run: 4 spans of 1 trace not delivered to .*/v1/traces \(HTTP 200 text/html, "
                        r"not an OTLP answer, from server 'faultproxy-html': .*\): kept in .*", line), line
    assert spooled(spool_of(app))
    assert proxy.count(path="/api") == 0  # the id was given: the only requests were posts

    proxy.mode = "forward"
    flush(app, env)
    wait_runs(app.server, app.experiment, "html", 1)


def test_an_otlp_answer_with_a_partial_success_is_delivered_and_said(
        capfd: pytest.CaptureFixture[str]) -> None:
    """MLflow sends no partial success today; an OTLP receiver may: the batch is delivered
    (sending it again cannot help) and what was rejected is said."""
    partial = b"\x0a\x0b\x08\x03\x12\x07too old"  # partial_success {rejected_spans: 3, error_message}
    assert transport.otlp_answer(transport.Answer(200, partial, content_type="application/x-protobuf")).ok
    assert "traced-run: MLflow took a batch but rejected 3 of its spans: too old" in capfd.readouterr().err
    as_json = b'{"partialSuccess": {"rejectedSpans": "2"}}'
    assert transport.otlp_answer(transport.Answer(200, as_json, content_type="application/json")).ok
    assert transport.otlp_answer(transport.Answer(200, b"", content_type="application/x-protobuf")).ok
    broken = transport.Answer(200, b"\x0a\xff", content_type="application/x-protobuf", server="edge")
    assert "no ExportTraceServiceResponse, from server 'edge'" in transport.otlp_answer(broken).problem


# --- one deadline for the whole request ----------------------------------------------------
def test_a_trickling_answer_ends_at_the_post_timeout_and_flush_ends_too(app: App, proxy: FaultProxy) -> None:
    """The proxy sends a status line, then a byte a second. Before, the timeout was per
    socket read: a running app's post stayed open as long as the server trickled, and
    ``traced-run flush`` ran past 60 s."""
    app.write(loop_app("trickle", pause=0.1))
    env = by_id(app, proxy, OTEL_EXPORTER_OTLP_TIMEOUT="3", TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT))
    proxy.mode = "trickle"
    process = start(app, "python", "app.py", env=env)
    try:
        out = Lines(process)
        # The first post ends at its 3 s deadline, so the process asks again.
        poll(lambda: proxy.count(mode="trickle") >= 2, timeout=60, what="a second post")
        (app.directory / "stop").touch()
        out.wait_for("stopped")
        err = out.finish(timeout=NOT_WAITING)  # a post that followed the trickle would never end
    finally:
        stop(process)
    assert process.returncode == 0, err.decode()
    # Said of what was queued ("not delivered ... (no answer within 3.0 s)") or of what was posted
    # and left unanswered ("sent to ...: no answer within 3.0 s"), depending on when the app left.
    assert "no answer within 3.0 s" in traced_lines(err)[-1], err.decode()
    assert spooled(spool_of(app))

    done = app.run("flush", env=env, timeout=12)
    assert done.returncode == 1 and "no answer within 3.0 s" in done.stderr.decode(), done.stderr.decode()

    proxy.mode = "forward"
    flush(app, env)
    wait_runs(app.server, app.experiment, "trickle", out.done())


# --- one kept connection per endpoint, a forked child's own ---------------------------------
def test_one_kept_connection_per_process_and_a_forked_child_opens_its_own(
        app: App, proxy: FaultProxy) -> None:
    """Before, every request opened a connection of its own (urllib sends ``Connection:
    close``). The parent's lookup and posts share one connection, before and after the
    child's life; the child's post goes on a connection of its own."""
    app.write(tool_agent("kept", """
    import os
    import time

    agent.run_sync("kept 0")
    deadline = time.monotonic() + 60
    while not os.path.exists("posted") and time.monotonic() < deadline:
        time.sleep(0.05)  # the test says when this run's post has been made
    child = os.fork()
    if child == 0:
        agent.run_sync("kept 1")
        os._exit(0)
    os.waitpid(child, 0)
    agent.run_sync("kept 2")
    """))
    proxy.keep_alive = True
    process = start(app, "python", "app.py", env=proxied_env(app, proxy))
    try:
        poll(lambda: proxy.count() >= 1, timeout=60, what="the first post")
        (app.directory / "posted").touch()
        err = Lines(process).finish(timeout=120)
    finally:
        stop(process)
    assert process.returncode == 0 and traced_lines(err) == [], err.decode()
    wait_runs(app.server, app.experiment, "kept", 3)
    parent = proxy.seen[0].connection
    (child,) = {seen.connection for seen in proxy.seen} - {parent}
    assert proxy.seen[-1].connection == parent, proxy.seen  # the parent's post after the child ended
    assert any(seen.connection == child and seen.path == "/v1/traces" for seen in proxy.seen), proxy.seen


# --- traced-run's requests are not the app's to trace --------------------------------------
INSTRUMENTED = """
    import json
    import os
    import time
    import urllib.request

    import requests
    import urllib3
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.instrumentation.urllib import URLLibInstrumentor
    from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    for instrumentor in (URLLibInstrumentor(), URLLib3Instrumentor(), RequestsInstrumentor()):
        instrumentor.instrument(tracer_provider=provider)

    health = os.environ["MLFLOW_TRACKING_URI"] + "/health"
    urllib.request.urlopen(health).read()  # the app's own requests: these are traced
    urllib3.request("GET", health)
    requests.get(health)

    for n in range(2):
        agent.run_sync(f"instrumented {n}")
        deadline = time.monotonic() + 60
        while not os.path.exists(f"stored {n}") and time.monotonic() < deadline:
            time.sleep(0.05)  # the test says when MLflow holds this run's trace
    spans = [{"name": span.name, "scope": span.instrumentation_scope.name,
              "url": span.attributes.get("url.full") or span.attributes.get("http.url")}
             for span in exporter.get_finished_spans()]
    print(json.dumps(spans))
"""


def test_an_app_that_instruments_its_http_clients_sees_none_of_traced_run_s_requests(app: App) -> None:
    """urllib, urllib3 and requests instrumented on the app's own provider: its own
    requests make spans; traced-run's experiment lookup and posts make none (the second
    run's trace in MLflow means the first run's post has ended), and the traces arrive."""
    app.write(tool_agent("instrumented", INSTRUMENTED))
    process = start(app, "python", "app.py", env=app.env(TRACED_RUN_SPOOL_DIR=str(spool_of(app))))
    try:
        out = Lines(process)
        for n in range(2):
            app.traces(n + 1, timeout=60)
            (app.directory / f"stored {n}").touch()
        err = out.finish(timeout=120)
    finally:
        stop(process)
    assert process.returncode == 0, err.decode()
    spans = json.loads(out.lines[-1])
    scopes = {span["scope"].rsplit(".", 1)[-1] for span in spans if span["url"]}
    assert scopes == {"urllib", "urllib3", "requests"}, spans
    assert all(span["url"].endswith("/health") for span in spans if span["url"]), spans


def test_requests_made_as_traced_run_makes_them_are_not_instrumented(mlflow_server: MlflowServer) -> None:
    """The suppression itself, against the instrumentations: a urllib request made inside
    ``transport.uninstrumented()`` makes no span; the same request outside it does."""
    from opentelemetry.instrumentation.urllib import URLLibInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = URLLibInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        with transport.uninstrumented():
            urllib.request.urlopen(mlflow_server.url + "/health", timeout=30).read()
            assert transport.request(Settings(), mlflow_server.url + "/health", timeout=30).ok
        assert exporter.get_finished_spans() == ()
        urllib.request.urlopen(mlflow_server.url + "/health", timeout=30).read()
        assert len(exporter.get_finished_spans()) == 1
    finally:
        instrumentor.uninstrument()


@pytest.mark.parametrize("noticed", [True, False], ids=["noticed before use", "found on use"])
def test_a_kept_connection_the_server_closed_meanwhile_is_replaced(
        noticed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's uvicorn closes an idle kept connection after 5 s (this stand-in at once):
    the next request goes on a new connection, whether the closed one is noticed before
    it is used or only when the request meets the closed socket."""
    opened: list[int] = []
    closed: list[int] = []

    class ClosesIdle(QuietHandler):
        protocol_version = "HTTP/1.1"
        timeout = 0.1  # seconds an idle kept connection lives

        def setup(self) -> None:
            opened.append(1)
            super().setup()

        def finish(self) -> None:
            super().finish()
            closed.append(1)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.answer(200, b"", "application/x-protobuf")

    if not noticed:
        monkeypatch.setattr(connections, "_dropped", lambda sock: False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ClosesIdle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    settings = Settings(tracking_uri=url)
    try:
        for n in range(1, 4):
            answer = transport.post_otlp(settings, url + "/v1/traces", b"", "0", None, None, 10)
            assert answer.ok, answer
            poll(lambda: len(closed) == n, timeout=30, what="the server to close the idle connection")  # noqa: B023
    finally:
        server.shutdown()
        server.server_close()
    assert len(opened) == 3
