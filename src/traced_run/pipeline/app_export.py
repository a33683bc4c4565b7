"""The app's own exporter to the MLflow traced-run sends to (the seed's manual
recipe left in the app: an ``OTLPSpanExporter`` to ``<mlflow>/v1/traces`` with
``x-mlflow-experiment-id``, on the provider its agents use).

MLflow stores a trace id once, in the experiment of whichever copy arrives
first, so traced-run's copy aimed at another experiment makes each trace land
in one of the two by chance, and the other sees none. traced-run leaves the
spans of such a provider to the app's exporter: they land where the app's code
says, every time, and one line names both experiments. When both are the same
experiment there is nothing to choose, and traced-run sends as usual. Decided at
the provider's first span, not when traced-run joins it: the app may add its
exporter after ``set_tracer_provider``.
"""

from __future__ import annotations

import dataclasses
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import Span as SdkSpan

from traced_run import report, transport
from traced_run.config.settings import Settings

EXPERIMENT_HEADER = "x-mlflow-experiment-id"
LOOKUP_TIMEOUT = 2.0
"""Longest the app's ``set_tracer_provider`` waits for traced-run's experiment to be looked
up, once, and only when the app exports to the same MLflow itself."""


@dataclasses.dataclass(frozen=True)
class AppExport:
    endpoint: str
    experiment_id: str


class AppExports:
    """Decides, once per provider traced-run joins, whether its spans are the app's to send."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._ours: tuple[str | None, str] | None = None

    def left_to_app(self, provider: object) -> bool:
        """True (and said) when ``provider`` exports to the same MLflow as traced-run, into an
        experiment that is not traced-run's."""
        found = _export_to(provider, self._settings.traces_endpoint or "")
        if found is None:
            return False
        ours, named = self._our_experiment()
        if ours == found.experiment_id:
            return False
        theirs = found.experiment_id
        report.say(f"the app itself exports the traces of its tracer provider to experiment {theirs} of "
                   f"the same MLflow ({transport.without_userinfo(found.endpoint)}); MLflow keeps a trace "
                   f"in one experiment only, so traced-run does not send them to its own experiment {named} "
                   f"as well: they are in experiment {theirs} (remove that exporter from the app to have "
                   f"traced-run send them to {named})")
        return True

    def _our_experiment(self) -> tuple[str | None, str]:
        """traced-run's experiment id (None when it cannot be known now) and how to name it."""
        if self._ours is None:
            settings = self._settings
            name = settings.experiment_name
            if settings.experiment_id or not name:
                ours = settings.experiment_id or "0"
                self._ours = (ours, ours)
            else:
                self._ours = (_existing_experiment(settings, name), repr(name))
        return self._ours


class UnlessLeftToApp(SpanProcessor):
    """``inner`` on ``provider``, unless its first span finds it ``left_to_app``."""

    def __init__(self, inner: SpanProcessor, provider: object, left_to_app: Callable[[object], bool]) -> None:
        self._inner = inner
        self._provider = provider
        self._left_to_app = left_to_app
        self._left: bool | None = None
        self._lock = threading.Lock()

    def _passes(self) -> bool:
        if self._left is None:
            with self._lock:
                if self._left is None:
                    self._left = self._left_to_app(self._provider)
        return not self._left

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        if self._passes():
            self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self._passes():
            self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _existing_experiment(settings: Settings, name: str) -> str | None:
    """The id of experiment ``name``; None when MLflow has none (traced-run creates it only
    when it sends something) or does not answer in time."""
    answer = transport.call_json(settings, "GET", "/api/2.0/mlflow/experiments/get-by-name?"
                                 + urllib.parse.urlencode({"experiment_name": name}), settings.workspace,
                                 timeout=min(settings.timeout, LOOKUP_TIMEOUT))
    found = answer.json() if answer.ok else None
    experiment = found.get("experiment") if isinstance(found, dict) else None
    ours = experiment.get("experiment_id") if isinstance(experiment, dict) else None
    return None if ours is None else str(ours)


def _export_to(provider: object, endpoint: str) -> AppExport | None:
    """An OTLP exporter on the SDK ``provider`` that posts to ``endpoint``'s host, port and path,
    with MLflow's experiment header (without one, MLflow stores nothing of it)."""
    if not endpoint:
        return None
    active = getattr(provider, "_active_span_processor", None)
    for processor in getattr(active, "_span_processors", ()):
        # SimpleSpanProcessor, and BatchSpanProcessor before OTel 1.28 / after it.
        exporter = getattr(processor, "span_exporter", None) or getattr(
            getattr(processor, "_batch_processor", None), "_exporter", None)
        target = getattr(exporter, "_endpoint", None)
        if not isinstance(target, str) or _place(target) != _place(endpoint):
            continue
        experiment = _header(exporter, EXPERIMENT_HEADER)
        if experiment is not None:
            return AppExport(target, experiment)
    return None


def _place(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")


def _header(exporter: object, name: str) -> str | None:
    """Header ``name`` of an OTLP/HTTP exporter, wherever its OTel release keeps its headers."""
    for holder in (exporter, getattr(exporter, "_client", None)):
        headers = getattr(holder, "_headers", None)
        if isinstance(headers, Mapping):
            for key, value in headers.items():
                if isinstance(key, str) and key.lower() == name and isinstance(value, str):
                    return value
    return None
