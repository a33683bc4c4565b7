"""Privacy, checked on the bytes that leave the process: a loopback receiver in
front of MLflow keeps every OTLP request body it passes on, and the spool is
read as it lies on disk. With include_content (capture_content) false no
prompt, instruction, tool argument, tool result or answer text is in them;
with content on, secrets are replaced by the marker in every attribute value
and large binary parts are left out."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT, App, QuietHandler, free_port, spans_by_type, traced_env
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from traced_run.spans.redact import DEFAULT_RULES, MAX_SCREENED, SCREEN_SECONDS, Redactor, Rule, until

APP = """
    import base64, sys
    from pydantic_ai import Agent, BinaryContent
    from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import FunctionModel

    def model(messages, info):
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("lookup", {"city": "ZANZIBAR-ARG token=acme-tool-tok"})])
        return ModelResponse(parts=[TextPart("FINAL-ANSWER-TEXT, ask ACME-12345678")])

    agent = Agent(FunctionModel(model), name="private", instructions="SYSTEM-INSTRUCTION-TEXT")

    @agent.tool_plain
    def lookup(city: str) -> str:
        return f"TOOL-RESULT-TEXT for {city} via https://bob:hunter2-url-pw@db.example/x"

    image = BinaryContent(data=b"IMAGEBYTES" * 10_000, media_type="image/png")
    prompt = ("USER-PROMPT-TEXT key sk-proj-A1b2C3d4E5f6G7h8I9j0 header Bearer eyJhbGciOiJIUzI1NiJ9.payload")
    print(agent.run_sync([prompt, image]).output)
"""

TEXTS = ["USER-PROMPT-TEXT", "SYSTEM-INSTRUCTION-TEXT", "ZANZIBAR-ARG", "TOOL-RESULT-TEXT",
         "FINAL-ANSWER-TEXT"]
SECRETS = ["sk-proj-A1b2C3d4E5f6G7h8I9j0", "eyJhbGciOiJIUzI1NiJ9.payload", "hunter2-url-pw",
           "acme-tool-tok", "ACME-12345678"]
IMAGE_BASE64 = "SU1BR0VCWVRFU0lNQUdFQllURV"  # base64 of the image's first bytes


class Recorder:
    """Forwards ``POST /v1/traces`` to MLflow and keeps each body, decompressed."""

    def __init__(self, upstream: str) -> None:
        self.bodies: list[bytes] = []
        recorder = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                plain = gzip.decompress(body) if encoding == "gzip" else (
                    zlib.decompress(body) if encoding == "deflate" else body)
                recorder.bodies.append(plain)
                forward = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(upstream + self.path, data=body, headers=forward,
                                                 method="POST")
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, payload, kind = answer.status, answer.read(), answer.headers["Content-Type"]
                except urllib.error.HTTPError as error:
                    status, payload, kind = error.code, error.read(), error.headers["Content-Type"]
                self.answer(status, payload, kind)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def attribute_values(self) -> list[str]:
        """Every string in every attribute (span, event, resource) of every request."""
        values: list[str] = []
        for body in self.bodies:
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                values += _strings(a.value for a in resource_spans.resource.attributes)
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        values += [span.name, span.status.message]
                        values += _strings(a.value for a in span.attributes)
                        for event in span.events:
                            values += _strings(a.value for a in event.attributes)
        return values


def _strings(values: Iterator[AnyValue] | Any) -> list[str]:
    found: list[str] = []
    for value in values:
        kind = value.WhichOneof("value")
        if kind == "string_value":
            found.append(value.string_value)
        elif kind == "array_value":
            found += _strings(iter(value.array_value.values))
        elif kind == "kvlist_value":
            found += _strings(kv.value for kv in value.kvlist_value.values)
    return found


@pytest.fixture
def recorder(app: App) -> Iterator[Recorder]:
    found = Recorder(app.server.url)
    yield found
    found.server.shutdown()


def run(app: App, recorder: Recorder, **env: str) -> None:
    app.write(APP)
    done = app.run("python", "app.py", env=app.env(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{recorder.url}/v1/traces", **env))
    assert done.returncode == 0, done.stderr.decode()
    assert b"FINAL-ANSWER-TEXT" in done.stdout


def test_without_content_no_text_leaves_the_process(app: App, recorder: Recorder) -> None:
    run(app, recorder, TRACED_RUN_CAPTURE_CONTENT="false")
    (trace,) = app.traces(1)  # the trace still arrives, with its structure
    assert {str(s.span_type) for s in trace.data.spans} >= {"AGENT", "LLM", "TOOL"}
    assert recorder.bodies
    for body in recorder.bodies:
        for text in TEXTS + SECRETS + [IMAGE_BASE64]:
            assert text.encode() not in body, text
    values = recorder.attribute_values()
    assert "lookup" in values  # tool names and the agent's are structure, not content
    assert not [v for v in values if any(text in v for text in TEXTS)]


def test_secrets_are_redacted_in_every_attribute_value(app: App, recorder: Recorder) -> None:
    run(app, recorder, TRACED_RUN_REDACT="ACME-[0-9]{8}", TRACED_RUN_REDACTION_MARKER="<hidden>",
        TRACED_RUN_MAX_BINARY_BYTES="1024")
    (trace,) = app.traces(1)
    values = recorder.attribute_values()
    for body in recorder.bodies:
        for secret in [*SECRETS, IMAGE_BASE64]:
            assert secret.encode() not in body, secret
    assert not [v for v in values if any(secret in v for secret in SECRETS)]
    joined = "\n".join(values)
    # Content is there, secrets are not, and the image is named by its size.
    for text in TEXTS:
        assert text in joined, text
    assert "sk-<hidden>" not in joined and "key <hidden>" in joined
    assert "Bearer <hidden>" in joined and "https://bob:<hidden>@db.example/x" in joined
    assert "ask <hidden>" in joined
    assert "100000 bytes not exported" in joined
    # MLflow shows the redacted conversation.
    (agent,) = [s for s in trace.data.spans if str(s.span_type) == "AGENT"]
    assert "key <hidden>" in str(agent.inputs)


def test_the_spool_holds_only_redacted_spans(app: App, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    app.write(APP)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every batch is spooled
    done = app.run("python", "app.py", env=app.env(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{down}/v1/traces", TRACED_RUN_SPOOL_DIR=str(spool),
        TRACED_RUN_EXIT_TIMEOUT="1", TRACED_RUN_REDACT="ACME-[0-9]{8}"))
    assert done.returncode == 0, done.stderr.decode()
    files = [p for p in spool.rglob("*") if p.is_file()]
    assert files, done.stderr.decode()
    data = b"".join(p.read_bytes() for p in files)
    assert b"USER-PROMPT-TEXT" in data  # content is kept; only the secrets are gone
    for secret in SECRETS:
        assert secret.encode() not in data, secret


@pytest.mark.parametrize(("text", "redacted"), [
    ("key sk-proj-A1b2C3d4E5f6G7h8I9j0 ok", "key [REDACTED] ok"),
    ("sk-ant-api03-abcdefghijklmnopqrstuv", "[REDACTED]"),
    ("Authorization: Bearer abc.def-ghi_123", "Authorization: Bearer [REDACTED]"),
    ("postgres://bob:pa55word@db:5432/app", "postgres://bob:[REDACTED]@db:5432/app"),
    ("https://example.com/a:b@c", "https://example.com/a:b@c"),  # a path, not a password
    ('{"api_key": "abc123", "n": 1}', '{"api_key": "[REDACTED]", "n": 1}'),
    ('{"token": 123456, "n": 1}', '{"token": "[REDACTED]", "n": 1}'),  # still JSON
    ("password=hunter2&user=bob", "password=[REDACTED]&user=bob"),
    ("AKIAABCDEFGHIJKLMNOP", "[REDACTED]"),
    ("ghp_" + "a" * 36, "[REDACTED]"),
    ('{"password": {"type": "string"}}', '{"password": {"type": "string"}}'),  # a schema stays JSON
    ("max_tokens=100, the sky is blue", "max_tokens=100, the sky is blue"),
    ("Authorization: Bearer\u00a0abc.def-ghi_123", "Authorization: Bearer\u00a0[REDACTED]"),  # Unicode space
    ("token=abc \udc80 ok", "token=[REDACTED] \ufffd ok"),  # a lone surrogate, as os.listdir may give
])
def test_default_rules(text: str, redacted: str) -> None:
    assert Redactor(DEFAULT_RULES, "[REDACTED]").redact(text) == redacted


# -- redaction within its bounds ---------------------------------------------------------

HOSTILE_APP = AGENT + """
    import sys
    prompt = "://" + "a-" * int(sys.argv[1]) + " db at https://bob:hunter2-url-pw@db.example/x"
    print(agent.run_sync(prompt).output)
"""


@pytest.mark.parametrize("pairs", [20_000, 100_000], ids=["40KB", "200KB"])
def test_a_hostile_prompt_arrives_redacted_and_whole_and_the_app_finishes(app: App, pairs: int) -> None:
    """``"://" + "a-" * n`` made the default URL rule quadratic under Python's re, which held
    the GIL throughout: 40 KB cost the app seconds, 200 KB froze it for minutes (redaction ran
    again at exit, on the main thread) and its exit line blamed MLflow."""
    app.write(HOSTILE_APP)
    done = app.run("python", "app.py", str(pairs), env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    assert b"traced-run" not in done.stderr, done.stderr.decode()  # no exit line: every span was delivered
    (trace,) = app.traces(1)
    assert "hunter2-url-pw" not in trace.to_json()
    inputs = [json.dumps(span.inputs) for span in spans_by_type(trace)["LLM"]]
    hostile = "://" + "a-" * pairs + " db at https://bob:[REDACTED]@db.example/x"
    assert inputs and all(hostile in text for text in inputs)


CATASTROPHIC_APP = AGENT + """
    print(agent.run_sync("word " * 5000 + "!").output)
"""


def test_a_users_catastrophic_rule_runs_in_linear_time(app: App) -> None:
    """``(\\w+\\s?)+$`` backtracks for ever under Python's re on text that ends otherwise than
    in a word; RE2 takes one pass."""
    app.write(CATASTROPHIC_APP)
    done = app.run("python", "app.py", env=traced_env(app, TRACED_RUN_REDACT=r"(\w+\s?)+$"))
    assert done.returncode == 0, done.stderr.decode()
    assert b"traced-run" not in done.stderr, done.stderr.decode()
    (trace,) = app.traces(1)
    assert "[REDACTED]" in trace.to_json()  # the rule ran: the model's name ends in a word
    assert all("word " * 5000 + "!" in json.dumps(span.inputs) for span in spans_by_type(trace)["LLM"])


def test_a_rule_that_would_take_too_long_leaves_a_note_in_place_of_the_text() -> None:
    """``a+b|a`` searches to the text's end for each of its matches: quadratic, about a minute
    on 200 000 characters. The text is cut off once it has had its CPU time."""
    redactor = Redactor([Rule("a+b|a")], "[R]")
    assert redactor.redact("a" * 200_000) == (
        f"[200000 characters not exported: redaction took longer than its {SCREEN_SECONDS:g} s]")
    assert redactor.redact("xaax") == "x[R][R]x"


def test_a_text_longer_than_redaction_screens_is_left_out_only_when_a_rule_would_scan_it() -> None:
    redactor = Redactor(DEFAULT_RULES, "[R]")
    long = "x" * MAX_SCREENED
    assert redactor.redact(long + "y") == long + "y"  # no default rule's literal: nothing to scan
    assert redactor.redact(long + "token=abc") == (
        f"[{MAX_SCREENED + 9} characters not exported: redaction screens at most {MAX_SCREENED}]")


def test_past_the_exit_bound_a_text_a_rule_would_scan_is_left_out() -> None:
    redactor = Redactor(DEFAULT_RULES, "[R]")
    with until(time.monotonic() - 1):
        assert redactor.redact("nothing to hide") == "nothing to hide"  # no rule would scan it
        assert redactor.redact("token=abc") == (
            "[9 characters not exported: the process was leaving, and exit_timeout ran out before redaction]")
    assert redactor.redact("token=abc") == "token=[R]"
