"""A traced app for the trace-isolation tests: opentelemetry-instrumentation-asgi outside
AmbientMiddleware (identity from ``x-user-id``), an endpoint answering with the ids it sees.

``build(tracer_provider)`` serves in-process servers (spans collected in memory); ``app``
is the same app for granian, which runs it in its own process: it exports over OTLP/HTTP to
``TRACED_APP_COLLECTOR``, and ``POST /flush`` sends what is buffered.
"""

from __future__ import annotations

import json
import os
from typing import Any

import anyio.to_thread
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.trace import TracerProvider

import ambient
from ambient import Lifetime, Registry, UserRef
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import trusted_header
from ambient.telemetry import Telemetry

HASH_KEY = b"trace-isolation"


class Dispatcher:
    """A REQUEST component with a cleanup, so that both are traced."""

    def close(self) -> None:
        """Nothing to release; being called is the point."""


class Memory:
    """A USER component."""

    def __init__(self, user: UserRef) -> None:
        self.user = user


def build(tracer_provider: TracerProvider, flush: Any = None) -> Any:
    """The traced app, its spans going to ``tracer_provider``."""
    registry = Registry()
    registry.register(Dispatcher, Dispatcher)
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    telemetry = Telemetry(
        tracer_provider=tracer_provider, hash_key=HASH_KEY, span_threshold=0, baggage=()
    )

    async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/flush" and flush is not None:
            await anyio.to_thread.run_sync(flush)
            body = b"{}"
        else:
            ctx = ambient.get_current_context()
            await ambient.resolve(Dispatcher)
            memory = await ambient.resolve(Memory)
            span = trace.get_current_span().get_span_context()
            body = json.dumps(
                {
                    "user": ctx.user_id,
                    "memory": memory.user.user_id,
                    "request_id": ctx.request_id,
                    "trace_id": f"{span.trace_id:032x}",
                    "span_id": f"{span.span_id:016x}",
                }
            ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    ambient_app = AmbientMiddleware(
        endpoint, registry=registry, identity=trusted_header(), telemetry=telemetry
    )
    return OpenTelemetryMiddleware(
        ambient_app, tracer_provider=tracer_provider, exclude_spans=["receive", "send"]
    )


def _for_granian() -> Any:
    collector = os.environ.get("TRACED_APP_COLLECTOR")
    if collector is None:
        return None
    from ambient.integrations.otel import configure_tracing

    handle = configure_tracing("traced-app", collector, metrics=False, set_global=False)
    return build(handle.tracer_provider, lambda: handle.force_flush(timeout=20))


app = _for_granian()
