"""Moves finished spans from the app's threads to MLflow, off those threads.

A bounded queue feeds one daemon thread that batches, retries with back-off
while MLflow is unreachable, and never lets the process wait at exit longer
than ``exit_timeout``: at normal exit, after an uncaught exception and on
SIGTERM (then the app's own handler, or the default action, follows). What
could not be delivered is said in one line on stderr, never dropped silently.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
from collections import deque
from types import FrameType
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from traced_run import report
from traced_run.export import Sender
from traced_run.report import mask_url
from traced_run.settings import Settings

BATCH_SIZE = 512
"""Spans per export request."""
BATCH_DELAY = 1.0
"""Seconds a partial batch waits for more spans before it is sent anyway."""
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds between retries while MLflow does not take a batch."""


class Delivery:
    """The queue, the delivery thread and the exit bound of one process."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """Start empty: a forked child never re-sends its parent's queue, and
        starts its own thread when it has spans of its own."""
        self._wake = threading.Condition()
        self._queue: deque[ReadableSpan] = deque()
        self._in_flight: list[ReadableSpan] = []
        self._thread: threading.Thread | None = None
        self._sender: Sender | None = None
        self._closing = False
        self._gave_up = False
        self._flushing = 0
        self._closed = False
        self.delivered = 0
        self.dropped = 0

    def submit(self, span: ReadableSpan) -> None:
        with self._wake:
            if self._closed:
                self.dropped += 1
                return
            if len(self._queue) >= self._settings.queue_size:
                self.dropped += 1
                return
            self._queue.append(span)
            if self._thread is None:
                self._start()
            if len(self._queue) >= BATCH_SIZE:
                self._wake.notify_all()

    def start(self) -> None:
        """Start the delivery thread now, so that importing the exporter and
        looking the experiment up are done before the first batch is due."""
        with self._wake:
            if self._thread is None:
                self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="traced-run-delivery", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        sender = self._sender = Sender(self._settings)
        sender.prepare()
        while True:
            with self._wake:
                self._wake.wait_for(self._batch_due, timeout=BATCH_DELAY)
                if not self._queue:
                    continue
                batch = [self._queue.popleft() for _ in range(min(BATCH_SIZE, len(self._queue)))]
                self._in_flight = batch
            try:
                sent = sender.send(batch)
            except Exception as error:  # a bug of ours or a library's must not kill delivery
                sender.problem = f"{type(error).__name__}: {error}"
                sent = False
            with self._wake:
                self._in_flight = []
                if sent:
                    self.delivered += len(batch)
                    failures = 0
                else:
                    self._queue.extendleft(reversed(batch))
                self._wake.notify_all()
                if not sent and self._closing:
                    self._gave_up = True  # close() sums up in one line
                    self._wake.notify_all()
                    return
                if not sent:
                    report.say(f"cannot deliver traces yet ({sender.problem}); retrying in the background")
                    delay = 0.2 if self._flushing else BACKOFF[min(failures, len(BACKOFF) - 1)]
                    failures += 1
                    self._wake.wait(timeout=delay)

    def _batch_due(self) -> bool:
        urgent = self._closing or self._flushing
        return len(self._queue) >= BATCH_SIZE or bool(urgent and self._queue)

    def flush(self, timeout: float) -> bool:
        """Send what is queued now; True when all of it was taken within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._wake:
            self._flushing += 1
            self._wake.notify_all()
            try:
                return self._wake.wait_for(
                    lambda: (not self._queue and not self._in_flight) or self._gave_up,
                    timeout=max(0.0, deadline - time.monotonic()),
                ) and not self._gave_up
            finally:
                self._flushing -= 1

    def close(self) -> None:
        """Deliver what is queued, waiting at most ``exit_timeout``; say what was lost."""
        with self._wake:
            if self._closed:
                return
            self._closing = True
            if self._sender is not None:
                self._sender.leave()
        self.flush(self._settings.exit_timeout)
        with self._wake:
            self._closed = True
            left = list(self._queue) + self._in_flight
            dropped = self.dropped
        if self._sender is not None and left:
            self._sender.abandon()
        if left or dropped:
            traces = len({span.context.trace_id for span in left if span.context})
            problem = self._sender.problem if self._sender else None
            why = problem or f"no answer within exit_timeout={self._settings.exit_timeout:g}s"
            endpoint = mask_url(self._settings.traces_endpoint or "")
            lost = f"{len(left)} spans of {traces} traces not delivered to {endpoint} ({why})" if left else ""
            over = f"{dropped} spans dropped: more than queue_size={self._settings.queue_size} waiting" \
                if dropped else ""
            report.say("; ".join(part for part in (lost, over) if part))

    def install_exit_hooks(self) -> None:
        atexit.register(self.close)
        try:
            previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _ChainedSigterm(self, previous))
        except ValueError:  # not the main thread: the app's own exit path still runs atexit
            pass


class _ChainedSigterm:
    """Delivers, then does what SIGTERM did before: the app's handler, or dying by it."""

    def __init__(self, delivery: Delivery, previous: Any) -> None:
        self._delivery = delivery
        self._previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self._delivery.close()
        if callable(self._previous):
            self._previous(signum, frame)
        elif self._previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class DeliveryProcessor(SpanProcessor):
    """Hands each finished span to the delivery queue; costs the app an append."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self._delivery.submit(span)

    def shutdown(self) -> None:
        self._delivery.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._delivery.flush(timeout_millis / 1000)
