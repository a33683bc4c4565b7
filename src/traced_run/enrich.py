"""Adds OpenInference's attributes to a copy of each finished span.

OpenInference's processor rewrites the span it is given in place; working on a
copy keeps the app's other exporters (logfire, its own) seeing pydantic-ai's
spans as they were, and lets the work happen on the delivery thread instead of
the thread that ended the span. Processor order stops mattering.
"""

from __future__ import annotations

from openinference.instrumentation.pydantic_ai import OpenInferenceSpanProcessor
from opentelemetry.sdk.trace import ReadableSpan

_processor = OpenInferenceSpanProcessor()


def for_mlflow(span: ReadableSpan) -> ReadableSpan:
    """A copy of ``span`` carrying the OpenInference attributes MLflow translates."""
    copy = ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=dict(span.attributes or {}),
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
    _processor.on_end(copy)
    return copy
