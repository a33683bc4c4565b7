"""MLflow's own trace view, in a real browser: Playwright drives Debian's
headless Chromium through MLflow's UI over the traces of tests/support/conversations.py
(one app under traced-run), and reads what the page shows: each model call as
the conversation it was, for every kind of message pydantic-ai sends, the
token counts, and the experiment's trace list.

One browser page and one app run serve every test here. With SCREENSHOTS_DIR
set (``SCREENSHOTS_DIR=docs pytest tests/test_browser.py``) each view is saved
there under the name docs/trace-quality.md links."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import App, MlflowServer, poll, spans_by_type, traced_env
from support import conversations

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUIET = """for (const [key, value] of Object.entries({
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.detectIssues.guidanceShown_v1": "true", "mlflow.flagForReview.guidanceShown_v1": "true",
})) localStorage.setItem(key, value);"""
"""MLflow opens its Assistant side panel on a first visit, and guidance pop-ups
over the trace list: a returning user's settings keep them closed."""

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
SCREENSHOTS = os.environ.get("SCREENSHOTS_DIR")
PROMPT = conversations.PROMPT
WITHHELD = "[content not exported]"
RESULTS = conversations.RESULTS


@dataclass
class Runs:
    """One app run's traces in one experiment, by trace name in the order they ran."""

    app: App
    experiment_id: str
    traces: dict[str, list[Any]]


def _run(app: App, *kinds: str, **env: str) -> Runs:
    source = Path(conversations.__file__).read_text()
    app.write(source, name="conversations.py")
    done = app.run("python", "conversations.py", *kinds, env=traced_env(app, **env))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    expected = sum(conversations.TRACES[kind] for kind in kinds)
    by_name: dict[str, list[Any]] = {}
    for trace in sorted(app.traces(expected), key=lambda t: t.info.request_time):
        by_name.setdefault(trace.info.tags["mlflow.traceName"], []).append(trace)
    experiment_id = app.server.experiment_id(app.experiment)
    assert experiment_id
    return Runs(app, experiment_id, by_name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> Runs:
    app = App(tmp_path_factory.mktemp("conversations"), mlflow_server, f"chat-{uuid.uuid4().hex[:12]}")
    return _run(app, *conversations.KINDS, TRACED_RUN_USER_ID="alice")


@pytest.fixture(scope="module")
def hidden(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> Runs:
    app = App(tmp_path_factory.mktemp("hidden"), mlflow_server, f"hidden-{uuid.uuid4().hex[:12]}")
    return _run(app, "two-tools", TRACED_RUN_INCLUDE_CONTENT="false")


@dataclass
class Panel:
    """The Inputs / Outputs pane of the selected span, as lines of text."""

    inputs: list[str]
    outputs: list[str]

    def shows(self, inputs: Sequence[str], outputs: Sequence[str] = ()) -> None:
        assert _in_order(inputs, self.inputs), "\n".join(self.inputs)
        assert _in_order(outputs, self.outputs), self.outputs


class View:
    """MLflow's UI in one headless Chromium page."""

    def __init__(self, page: Any, server: MlflowServer) -> None:
        self.page = page
        self.server = server
        self.experiment_id = ""

    def text(self) -> str:
        return str(self.page.inner_text("body"))

    def traces(self, runs: Runs, query: str = "") -> None:
        """The experiment's Traces tab (with ``query``, a trace opened over it)."""
        if runs.experiment_id != self.experiment_id:  # the UI does not follow a hash change to another one
            self.page.goto("about:blank")
            self.experiment_id = runs.experiment_id
        self.page.goto(f"{self.server.url}/#/experiments/{runs.experiment_id}/traces{query}")

    def trace(self, runs: Runs, trace: Any) -> None:
        """The trace's view, its span tree loaded."""
        self.traces(runs, f"?selectedEvaluationId={trace.info.trace_id}")
        short = trace.info.trace_id.removeprefix("tr-")[:8]
        poll(lambda: f"Trace\n{short}" in self.text() and "\nSpans\n" in self.text(), timeout=60,
             what=f"the view of trace {short}")

    def pane(self) -> Panel | None:
        text = self.text()
        inputs, found, outputs = text[text.find("Inputs / Outputs"):].partition("\nOutputs\n")
        return Panel(_lines(inputs), _lines(outputs)) if found else None

    def span(self, trace: Any, kind: str = "LLM") -> Panel:
        """Select the trace's last span of ``kind`` (by its id) and read its pane,
        once it has replaced the pane of the span selected before."""
        span = max(spans_by_type(trace)[kind], key=lambda s: s.start_time_ns)
        before = self.pane()
        self.page.get_by_test_id(f"span-title-row-{span.span_id}").click()

        def pane() -> Panel | None:
            now = self.pane()
            return now if now != before else None

        found: Panel = poll(pane, timeout=30, what=f"the pane of span {span.name}")
        return found

    def tokens(self, span: Any) -> int:
        """The token count the span tree shows under a span."""
        metrics = self.page.get_by_test_id(f"span-metric-row-{span.span_id}").inner_text()
        return int(_lines(metrics)[-1])

    def tool_call_ids(self) -> list[str]:
        """The ids behind each 'Copy tool call ID' button of the pane, top to bottom."""
        ids = []
        for button in self.page.get_by_role("button", name="Copy tool call ID").all():
            button.click()
            ids.append(str(self.page.evaluate("navigator.clipboard.readText()")))
        return ids

    def screenshot(self, name: str) -> None:
        self.page.mouse.move(0, 0)  # no tooltip left over the view
        # Each "Copy tool call ID" button read by tool_call_ids shows a "Copied" tooltip
        # over the call it belongs to for a while: a screenshot waits until none is shown.
        self.page.evaluate("document.activeElement?.blur()")  # nor the focus ring of the last click
        copied = self.page.get_by_text("Copied", exact=True)
        poll(lambda: not any(tip.is_visible() for tip in copied.all()), timeout=30,
             what='the "Copied" tooltips to close')
        shot = self.page.screenshot()
        assert shot.startswith(b"\x89PNG")
        if SCREENSHOTS:
            (Path(SCREENSHOTS) / f"trace-view-{name}.png").write_bytes(shot)


@pytest.fixture(scope="module")
def view(mlflow_server: MlflowServer) -> Iterator[View]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not installed (Debian: apt-get install chromium; .ci/run does it in CI)")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=mlflow_server.url)
        context.add_init_script(QUIET)
        yield View(context.new_page(), mlflow_server)
        browser.close()


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _in_order(expected: Sequence[str], lines: list[str]) -> bool:
    """Each expected line appears, as a whole line, after the one before it."""
    at = 0
    for wanted in expected:
        try:
            at = lines.index(wanted, at) + 1
        except ValueError:
            return False
    return True


def _conversation_of(tools: tuple[str, ...]) -> list[str]:
    """What the last model call of a run of the support agent was sent, as shown."""
    calls = [line for tool in tools for line in (tool, "customer", "cust-Q7")]
    answers = [line for tool in tools for line in (tool, f"cust-Q7 {RESULTS[tool]}")]
    return ["System", "Be brief.", "User", PROMPT, "Assistant", "Tool calls", *calls, *answers]


# -- the conversation, kind by kind ---------------------------------------------------------

@pytest.mark.parametrize("kind, tools", [("two-tools", ("balance", "orders")),
                                         ("three-tools", ("balance", "orders", "address"))])
def test_parallel_tool_calls_each_show_their_result(view: View, runs: Runs, kind: str,
                                                    tools: tuple[str, ...]) -> None:
    (trace,) = runs.traces[kind]
    view.trace(runs, trace)
    panel = view.span(trace)
    panel.shows(_conversation_of(tools), ["Assistant", f"Done: {len(tools)} lookups."])
    ids = [f"call_{tool}" for tool in tools]
    assert view.tool_call_ids() == ids + ids  # the calls, then each result under its call's id
    view.screenshot(kind)
    # The agent (root) span shows the prompt and the answer.
    view.span(trace, "AGENT").shows([PROMPT], [f"Done: {len(tools)} lookups."])


def test_a_retry_shows_the_prompt_the_model_got(view: View, runs: Runs) -> None:
    (trace,) = runs.traces["retries"]
    view.trace(runs, trace)
    panel = view.span(trace)
    panel.shows(["User", "Refund my order.",
                 "Assistant", "Tool calls", "refund", "amount", "lots",
                 "refund", "\"Field required\"",  # pydantic-ai's validation retry, its errors as JSON
                 "Assistant", "Tool calls", "refund", "order", "o-1",
                 "refund"],
                ["Assistant", "Refund not possible for o-1."])
    retry = "Order o-1 was never paid: ask the customer for another order."
    assert any(retry in line for line in panel.inputs), panel.inputs  # the ModelRetry's message
    view.screenshot("retries")


def test_structured_output_shows_the_final_result_call(view: View, runs: Runs) -> None:
    (trace,) = runs.traces["structured"]
    view.trace(runs, trace)
    view.span(trace).shows(["User", "Refund o-1 by 12.50."],
                                            ["Assistant", "Tool calls", "final_result", "order", "o-1",
                                             "amount", "12.5"])
    view.screenshot("structured")


def test_a_second_turn_shows_the_whole_history(view: View, runs: Runs) -> None:
    first, second = runs.traces["multi-turn"]
    view.trace(runs, first)  # a plain-text run
    view.span(first).shows(["User", "Hi there."], ["Assistant", "Hello! How can I help?"])
    view.trace(runs, second)
    panel = view.span(second)
    panel.shows(["User", "Hi there.", "Assistant", "Hello! How can I help?",
                 "User", "When does my order ship?"], ["Assistant", "Your order ships Friday."])
    view.screenshot("multi-turn")


def test_system_prompt_and_instructions_are_shown(view: View, runs: Runs) -> None:
    (trace,) = runs.traces["prompts"]
    view.trace(runs, trace)
    view.span(trace).shows(
        ["System", "Answer in one sentence.", "The customer is on the gold tier.",  # static, then dynamic
         "System", "You are the support desk of ACME.", "User", "Can I upgrade?"], ["Assistant", "Ok."])
    view.screenshot("prompts")


def test_thinking_is_shown_with_the_answer(view: View, runs: Runs) -> None:
    (trace,) = runs.traces["thinking"]
    view.trace(runs, trace)
    view.span(trace).shows(
        ["User", "When will it ship?"],
        ["Assistant", "[thinking] The customer wants a date; orders ship on Fridays.", "Friday."])
    view.screenshot("thinking")


def test_images_show_as_placeholders_not_base64(view: View, runs: Runs) -> None:
    (trace,) = runs.traces["images"]
    view.trace(runs, trace)
    panel = view.span(trace)
    panel.shows(["User", "What are these?", f"[image/png: {conversations.IMAGE_URL}]",
                 f"[image/png, {len(conversations.PIXEL)} bytes]"], ["Assistant", "Two receipts."])
    assert "iVBORw0KGgo" not in view.text()
    view.screenshot("images")


@pytest.mark.parametrize("kind", ["run-stream", "run-stream-events", "iter"])
def test_streamed_and_iterated_runs_show_the_same_conversation_and_tokens(view: View, runs: Runs,
                                                                         kind: str) -> None:
    (plain,) = runs.traces["run-sync"]
    view.trace(runs, plain)
    expected = view.span(plain)
    results = [line for tool in ("balance", "orders", "address") for line in (tool, f"a {RESULTS[tool]}")]
    expected.shows(["System", "Be brief.", "User", PROMPT, "Assistant", "Tool calls", *results])
    (trace,) = runs.traces[kind]
    view.trace(runs, trace)
    assert view.span(trace) == expected
    usage = trace.info.token_usage
    assert usage["input_tokens"] + usage["output_tokens"] == usage["total_tokens"], usage
    assert f"{usage['total_tokens']} tokens" in view.text()  # the trace's header
    assert sum(view.tokens(span) for span in spans_by_type(trace)["LLM"]) == usage["total_tokens"]
    if kind == "run-stream":
        view.screenshot("streamed")


def test_token_counts_add_up_for_every_run_kind(runs: Runs) -> None:
    """Per model call input + output = total, and a trace's numbers are the sums
    of its model calls' (MLflow adds up what each span reports)."""
    for name, traces in runs.traces.items():
        for trace in traces:
            calls = [span.get_attribute("mlflow.chat.tokenUsage") for span in spans_by_type(trace)["LLM"]]
            for call in calls:
                assert call["input_tokens"] + call["output_tokens"] == call["total_tokens"], (name, call)
            usage = trace.info.token_usage
            for key in ("input_tokens", "output_tokens", "total_tokens"):
                assert usage[key] == sum(call[key] for call in calls), (name, key, usage, calls)


def test_without_content_the_view_shows_the_structure_only(view: View, hidden: Runs) -> None:
    (trace,) = hidden.traces["two-tools"]
    view.trace(hidden, trace)
    panel = view.span(trace)
    panel.shows(["User", WITHHELD, "Assistant", "Tool calls", "balance", "orders",
                 "balance", WITHHELD, "orders", WITHHELD], ["Assistant", WITHHELD])
    text = view.text()
    for said in (PROMPT, "Be brief.", "42.50", "Done: 2 lookups."):
        assert said not in text
    assert "error" not in text.lower()
    view.screenshot("without-content")


# -- the trace list -------------------------------------------------------------------------

def test_the_trace_list_shows_prompt_answer_tokens_session_and_user(view: View, runs: Runs) -> None:
    view.traces(runs)
    poll(lambda: "Done: 3 lookups." in view.text(), timeout=60, what="the trace list")
    view.page.get_by_role("button", name="Display").click()
    view.page.get_by_text("Columns", exact=True).hover()
    # User and name on, and room for them: timing columns off.
    for column in ("User", "Trace name", "Time", "Duration", "State"):
        view.page.get_by_role("menuitemcheckbox", name=column).click()
    view.page.keyboard.press("Escape")
    view.page.keyboard.press("Escape")
    (trace,) = runs.traces["two-tools"]
    session = trace.info.trace_metadata["mlflow.trace.session"]

    def row() -> list[str] | None:
        for each in view.page.get_by_role("row").all():
            lines = _lines(each.inner_text())
            if "two-tools" in lines and "alice" in lines:
                return lines
        return None

    lines: list[str] = poll(row, timeout=30, what="the two-tools trace's row with its user")
    assert _in_order(["two-tools", f'"{PROMPT}"', '"Done: 2 lookups."', "alice", session,
                      str(trace.info.token_usage["total_tokens"])], lines), lines
    view.page.set_viewport_size({"width": 1600, "height": 900})  # every column on screen
    view.screenshot("list")
