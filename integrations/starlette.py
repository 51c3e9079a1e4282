"""Starlette: install the middleware and answer ambient's errors as problem+json.

``AmbientMiddleware`` is plain ASGI and works in a Starlette app as it is. What
:func:`install` adds is the error mapping: Starlette's ``ServerErrorMiddleware`` (always the
outermost layer) turns any exception that reaches it into a bare 500, and the exception
handlers run *inside* ``AmbientMiddleware``, so an :class:`~ambient.AmbientError` that
carries an HTTP status (``PoolExhaustedError`` -> 503 with ``Retry-After``,
``IdentityError`` -> 400/401, ``TooManyRequestsError`` -> 429) must be answered by an
exception handler. :func:`install` registers one that writes the same RFC 9457 body the
middleware writes for its own refusals; every other error keeps propagating (a 500).

Handlers reach the context and components without ``request.state``::

    app = Starlette(routes=[Route("/", home)])
    install(app, registry=registry, identity=trusted_header())

    async def home(request: Request) -> Response:
        ctx = ambient.get_current_context()
        engine = await ambient.resolve(ExecutionEngine)
        ...

Middleware added to the app *after* :func:`install` wraps ``AmbientMiddleware`` (Starlette
puts each new middleware outside the earlier ones): add ``AuthenticationMiddleware`` after
it when the identity comes from :func:`~ambient.middleware.identity.scope_user`.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from ambient._observe import Observer
from ambient._registry import Registry
from ambient.errors import AmbientError
from ambient.middleware import AmbientMiddleware, IdentityResolver, Problem, answer_error

logger = logging.getLogger("ambient.integrations.starlette")

__all__ = ["ambient_error_handler", "install", "problem_response"]


def problem_response(error: AmbientError) -> Response:
    """The RFC 9457 ``application/problem+json`` response that ``error`` carries.

    ``error`` must carry an HTTP status (``error.http_status`` is not ``None``); the
    ``Retry-After`` header is set when the error has a ``retry_after``.

    Raises:
        ValueError: ``error`` carries no HTTP status.
    """
    if error.http_status is None:
        msg = f"{type(error).__name__} carries no HTTP status; it is not an answer to a client"
        raise ValueError(msg)
    return _response(Problem.from_error(error))


def _response(problem: Problem) -> Response:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in problem.headers}
    return Response(
        problem.body(),
        status_code=problem.status,
        headers=headers,
        media_type="application/problem+json",
    )


async def ambient_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: an :class:`~ambient.AmbientError` with an HTTP status
    becomes its problem+json response (:func:`~ambient.middleware.answer_error`'s answer);
    anything else is raised again.

    The error is also noted on the request's scope, so that ``AmbientMiddleware`` closes it
    with the error as if it had answered it itself: cleanups see the failure and a
    transaction around a generator factory's ``yield`` rolls back. A 401 without a
    challenge of its own gets the ``WWW-Authenticate`` challenge of the middleware's
    resolver (``Bearer`` for ``jwt_bearer``), as when the middleware answers it. An
    exception group whose every error carries a status (a task group around the work) is
    answered as its first.

    Registered by :func:`install`; register it yourself with
    ``app.add_exception_handler(AmbientError, ambient_error_handler)`` in a stack that
    installs the middleware by other means, or on a sub-application mounted below one that
    did (it has error handling of its own).
    """
    answer = answer_error(exc) if request.scope.get("type") == "http" else None
    if answer is None:
        # Websockets: AmbientMiddleware refuses the handshake itself (ServerErrorMiddleware
        # lets non-HTTP errors through). Errors without an HTTP status are bugs: a 500.
        raise exc
    return _response(answer)


def install(
    app: Starlette,
    *,
    registry: Registry,
    identity: IdentityResolver | None,
    anonymous: bool = False,
    request_id_header: str = "x-request-id",
    thread_id_header: str = "x-thread-id",
    thread_id_query: str | None = None,
    max_concurrent_per_user: int | None = None,
    telemetry: Observer | None = None,
) -> None:
    """Add :class:`~ambient.middleware.AmbientMiddleware` to ``app`` and map ambient's errors.

    Call it before the app serves its first request (Starlette refuses new middleware
    after that). The arguments after ``app`` are those of
    :class:`~ambient.middleware.AmbientMiddleware`. The registry is closed on lifespan
    shutdown.

    Args:
        app: A Starlette (or FastAPI) application.
        registry: Where components come from.
        identity: The identity resolver (``None`` only with ``anonymous=True``).
        anonymous: Serve requests without identity as fresh anonymous users.
        request_id_header: Header carrying the request id.
        thread_id_header: Header carrying the conversation thread id.
        thread_id_query: Query parameter carrying a websocket's thread id (browsers cannot
            set headers on a websocket).
        max_concurrent_per_user: Requests one user may have in flight at once.
        telemetry: An extra observer (``ambient.telemetry.Telemetry``) for these scopes.

    An exception handler for :class:`~ambient.AmbientError` the app registered before is
    kept (with a warning); otherwise :func:`ambient_error_handler` is registered.

    Raises:
        RuntimeError: the middleware is already installed, or the app has started.
    """
    installed: list[object] = [entry.cls for entry in app.user_middleware]
    if AmbientMiddleware in installed:
        msg = "AmbientMiddleware is already installed on this app; install() it once"
        raise RuntimeError(msg)
    if app.middleware_stack is not None:
        msg = "install() must run before the app serves its first request"
        raise RuntimeError(msg)
    options: dict[str, Any] = {
        "registry": registry,
        "identity": identity,
        "anonymous": anonymous,
        "request_id_header": request_id_header,
        "thread_id_header": thread_id_header,
        "thread_id_query": thread_id_query,
        "max_concurrent_per_user": max_concurrent_per_user,
        "telemetry": telemetry,
    }
    # Build it once now so that a bad argument fails at start-up, not on the first request.
    AmbientMiddleware(_no_app, **options)
    app.add_middleware(AmbientMiddleware, **options)
    own = app.exception_handlers.get(AmbientError)
    if own is not None and own is not ambient_error_handler:
        # The app's own, registered before: kept, as a later registration would be.
        logger.warning(
            "install(): the app already handles AmbientError with %r; it is kept, so "
            "cleanups see the errors it answers with a 4xx as successes unless it returns "
            "`await ambient_error_handler(request, exc)` for them",
            own,
        )
        return
    app.add_exception_handler(AmbientError, ambient_error_handler)


async def _no_app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
    msg = "placeholder app used only to validate install() arguments"
    raise RuntimeError(msg)
