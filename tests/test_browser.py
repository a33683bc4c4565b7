"""MLflow's own trace view, in a real browser: headless Chromium (Debian's
``chromium``) driven over its DevTools protocol opens a traced run and shows
the model call as a conversation: the system instructions, the user's prompt,
the assistant's tool call with its arguments, the tool's result and the answer."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT_APP, App, free_port, poll

CHROMIUM = "/usr/bin/chromium"

websocket = pytest.importorskip("websocket", reason="websocket-client is in the test extra")


class Chromium:
    """One headless Chromium with a fresh profile, and its first page over CDP."""

    def __init__(self, profile: Path) -> None:
        port = free_port()
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--window-size=1600,1000",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def page() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as answer:
                    pages = json.load(answer)
            except OSError:
                return None
            return next((p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page"), None)

        self.socket = websocket.create_connection(poll(page, timeout=30, what="chromium's DevTools"),
                                                  timeout=30)
        self._next = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        self.socket.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.socket.recv())
            if message.get("id") == self._next:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result

    def js(self, expression: str) -> Any:
        done = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return done["result"].get("value")

    def text(self) -> str:
        return str(self.js("document.body ? document.body.innerText : ''") or "")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not installed (Debian: apt-get install chromium; .ci/run does it in CI)")
    browser = Chromium(tmp_path / "profile")
    yield browser
    browser.close()


def test_the_trace_view_shows_the_model_call_as_a_conversation(app: App, chromium: Chromium,
                                                               tmp_path: Path) -> None:
    app.write(AGENT_APP)
    done = app.run("python", "app.py")
    assert done.returncode == 0, done.stderr.decode()
    (trace,) = app.traces(1)
    experiment_id = app.server.experiment_id(app.experiment)

    chromium.call("Page.enable")
    chromium.call("Page.navigate", url=f"{app.server.url}/#/experiments/{experiment_id}/traces"
                                       f"?selectedEvaluationId={trace.info.trace_id}")
    poll(lambda: "execute_tool lookup" in chromium.text(), timeout=60, what="the trace's span tree")
    # The second model call is the one that was sent the whole exchange.
    clicked = chromium.js("""(() => {
        const names = [...document.querySelectorAll('span, div, p')]
            .filter(e => e.childElementCount === 0 && e.textContent.trim() === 'chat test');
        if (names.length < 2) return false;
        names[names.length - 1].click();
        return true;
    })()""")
    assert clicked, chromium.text()[:2000]

    def chat_panel() -> str | None:
        text = chromium.text()
        panel = text[text.find("Inputs / Outputs"):]
        return panel if "Tool calls" in panel and "Outputs" in panel else None

    panel: str = poll(chat_panel, timeout=30, what="the chat view of the model call")
    inputs, _, outputs = panel.partition("\nOutputs\n")
    expected_inputs = ["System", "Be brief.", "User", "What is the weather in Paris?", "Assistant",
                       "Tool calls", "lookup", "city", "a", "lookup", "a: sunny"]
    lines = [line.strip() for line in inputs.splitlines() if line.strip()]
    assert _in_order(expected_inputs, lines), lines
    assert "Assistant" in outputs and '"lookup": "a: sunny"' in outputs, outputs

    shot = base64.b64decode(chromium.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "trace-view-chat.png").write_bytes(shot)
    assert shot.startswith(b"\x89PNG")


def _in_order(expected: list[str], lines: list[str]) -> bool:
    """Each expected line appears, as a whole line, after the one before it."""
    at = 0
    for wanted in expected:
        try:
            at = lines.index(wanted, at) + 1
        except ValueError:
            return False
    return True
