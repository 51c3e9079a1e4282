"""Starlette: install the middleware and answer ambient's errors as problem+json.

``AmbientMiddleware`` is plain ASGI and works in a Starlette app as it is. What
:func:`install` adds is the error mapping: Starlette's ``ServerErrorMiddleware`` (always the
outermost layer) turns any exception that reaches it into a bare 500, and the exception
handlers run *inside* ``AmbientMiddleware``, so an :class:`~ambient.AmbientError` that
carries an HTTP status (``PoolExhaustedError`` -> 503 with ``Retry-After``,
``IdentityError`` -> 400/401, ``TooManyRequestsError`` -> 429) must be answered by an
exception handler. :func:`install` registers one that writes the same RFC 9457 body the
middleware writes for its own refusals; every other error keeps propagating (a 500).

That 500 is answered by ``ServerErrorMiddleware`` after the request's scope has closed.
:func:`install` has it answer in the request's name: the 500 (the app's own 500 handler's,
Starlette's plain one, or the debug traceback page) carries the request id the middleware
echoes on every other answer, and the app's 500 handler runs with the request's context
bound, so ``get_current_context()`` and a ``ContextFilter``'s log lines name the request
and its user. Its scope has closed (cleanups have seen the exception): resolving a
component there raises ``ScopeClosedError``. A request whose identity resolver raised (a
bug, not an ambient error), or whose context failed to build, has no context: its 500
carries its request id all the same, and the 500 handler runs with no context bound.

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
from collections.abc import Iterable
from typing import Any

from starlette._utils import is_async_callable
from starlette.applications import Starlette
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, ExceptionHandler

from ambient._observe import Observer
from ambient._registry import Registry
from ambient.errors import AmbientError
from ambient.middleware import AmbientMiddleware, IdentityResolver, Problem, answer_error
from ambient.middleware._asgi import _FAILED_KEY, _FailedRequest
from ambient.middleware._problem import _carries_status

logger = logging.getLogger("ambient.integrations.starlette")

__all__ = ["ambient_error_handler", "install", "problem_response"]


def problem_response(error: AmbientError) -> Response:
    """The RFC 9457 ``application/problem+json`` response that ``error`` carries.

    ``error`` must carry an HTTP status (``error.http_status`` is not ``None``); the
    ``Retry-After`` header is set when the error has a ``retry_after``. A status that
    cannot be read (a property that raises) is answered as the middleware answers it:
    logged, with the status of its class or nearest base that has one, else a 500.

    Raises:
        ValueError: ``error`` carries no HTTP status.
    """
    if not _carries_status(error):
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
    did (it has error handling of its own), and for ``ExceptionGroup`` there too: Starlette
    looks handlers up by the exception's class, so a group reaches only a handler
    registered for groups, and is otherwise that app's 500. (Under :func:`install` a group
    that no handler answers reaches ``AmbientMiddleware``, which answers it the same way.)
    """
    answer = answer_error(exc) if request.scope.get("type") == "http" else None
    if answer is None:
        # Websockets: AmbientMiddleware answers them itself, refusing the handshake or
        # closing the accepted socket with 1013 or 1008 (ServerErrorMiddleware lets
        # non-HTTP errors through). Errors without an HTTP status are bugs: a 500.
        raise exc
    return _response(answer)


def install(
    app: Starlette,
    *,
    registry: Registry,
    identity: IdentityResolver | None,
    anonymous: bool = False,
    anonymous_paths: Iterable[str] = (),
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
        anonymous_paths: Paths (or prefixes ending with ``/``) served so while the rest
            require an identity: a health check, a login endpoint, ``/docs``.
        request_id_header: Header carrying the request id.
        thread_id_header: Header carrying the conversation thread id.
        thread_id_query: Query parameter carrying a websocket's thread id (browsers cannot
            set headers on a websocket).
        max_concurrent_per_user: Requests one user may have in flight at once.
        telemetry: An extra observer (``ambient.telemetry.Telemetry``) for these scopes.

    An exception handler for :class:`~ambient.AmbientError` the app registered before is
    kept (with a warning); otherwise :func:`ambient_error_handler` is registered.

    The app's ``ServerErrorMiddleware`` (built with the rest of its stack on the first
    request) answers an exception that escaped a request's scope in that request's name:
    its 500 carries the request id, unless the app's 500 handler set that header itself,
    and the app's 500 handler (``exception_handlers={500: ...}`` or ``{Exception: ...}``,
    registered before or after :func:`install`) runs with the request's context bound and
    its closed scope, which resolves nothing. A request that failed before it had a
    context (its identity resolver raised an exception that is not an ambient error, or
    its context failed to build) gets its request id too, and the handler runs with no
    context bound. The exception still reaches the server; a response that had started
    (a stream failing midway) stays as it was.

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
        "anonymous_paths": anonymous_paths,
        "request_id_header": request_id_header,
        "thread_id_header": thread_id_header,
        "thread_id_query": thread_id_query,
        "max_concurrent_per_user": max_concurrent_per_user,
        "telemetry": telemetry,
    }
    # Build it once now so that a bad argument fails at start-up, not on the first request.
    AmbientMiddleware(_no_app, **options)
    app.add_middleware(AmbientMiddleware, **options)
    _answer_500s_in_the_request(app)
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


def _answer_500s_in_the_request(app: Starlette) -> None:
    """Have the ``ServerErrorMiddleware`` of ``app``'s stack, outside ``AmbientMiddleware``,
    answer a request the middleware served in that request's name.

    The stack is built on the first request, after every middleware and handler has been
    added (those added after :func:`install` included): its build is wrapped, not
    replaced, so that it stays Starlette's (or FastAPI's, or what wrapped it before).
    """
    build = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        return _with_server_errors_in_the_request(build())

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]


def _with_server_errors_in_the_request(stack: ASGIApp) -> ASGIApp:
    """``stack`` with each ``ServerErrorMiddleware`` outside ``AmbientMiddleware`` (the
    outermost layer, and one an instrumentation wrapped with its own outside that) made a
    :class:`_ServerErrorMiddleware` with the same handler and debug flag."""
    outer: Any = None
    layer: Any = stack
    seen: set[int] = set()
    while layer is not None and not isinstance(layer, AmbientMiddleware) and id(layer) not in seen:
        seen.add(id(layer))
        if type(layer) is ServerErrorMiddleware:
            layer = _ServerErrorMiddleware(layer.app, handler=layer.handler, debug=layer.debug)
            if outer is None:
                stack = layer
            else:
                outer.app = layer
        outer = layer
        layer = getattr(layer, "app", None)
    return stack


class _ServerErrorMiddleware(ServerErrorMiddleware):
    """Starlette's ``ServerErrorMiddleware``, answering an exception that escaped a request
    ``AmbientMiddleware`` served (its scope closed by then) in that request's name.

    Its 500 (the app's handler's, the plain one, the debug traceback page) carries the
    request id the middleware echoes on the request's other answers, unless the handler
    set one itself; the app's handler runs with the request's context bound again, and its
    closed scope, which resolves nothing (with no context, for a request whose identity
    resolver failed before it had one). The exception is raised again as before, and
    a response that had started (a stream failing midway) stays as it is: nothing more is
    sent. Requests that did not fail never reach this code.
    """

    def __init__(self, app: ASGIApp, handler: ExceptionHandler | None, debug: bool) -> None:
        super().__init__(
            app, handler=None if handler is None else _in_the_request(handler), debug=debug
        )

    def debug_response(self, request: Request, exc: Exception) -> Response:
        return _with_request_id(request, super().debug_response(request, exc))

    def error_response(self, request: Request, exc: Exception) -> Response:
        return _with_request_id(request, super().error_response(request, exc))


def _in_the_request(handler: ExceptionHandler) -> ExceptionHandler:
    """``handler`` (the app's 500 handler) run in the failed request's context, and its
    response given the request's id. Async or not, as ``handler`` is: Starlette runs a
    sync handler in its thread pool, and this binds the context there."""
    # An HTTP handler: ServerErrorMiddleware handles nothing else.
    call: Any = handler
    if is_async_callable(handler):

        async def handle(request: Request, exc: Exception) -> Response:
            failed = request.scope.get(_FAILED_KEY)
            if not isinstance(failed, _FailedRequest):
                response: Response = await call(request, exc)
                return response
            with failed.bound():
                response = await call(request, exc)
            return _with_request_id(request, response)

        return handle

    def handle_sync(request: Request, exc: Exception) -> Response:
        failed = request.scope.get(_FAILED_KEY)
        if not isinstance(failed, _FailedRequest):
            response: Response = call(request, exc)
            return response
        with failed.bound():
            response = call(request, exc)
        return _with_request_id(request, response)

    return handle_sync


def _with_request_id(request: Request, response: Response) -> Response:
    """``response`` with the request id ``AmbientMiddleware`` echoes, if the request failed
    past it and ``response`` names no request id of its own."""
    failed = request.scope.get(_FAILED_KEY)
    if isinstance(failed, _FailedRequest) and isinstance(response, Response):
        headers = response.headers
        for name, value in failed.echo:
            header = name.decode("latin-1")
            if header not in headers:
                headers.append(header, value.decode("latin-1"))
    return response


async def _no_app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
    msg = "placeholder app used only to validate install() arguments"
    raise RuntimeError(msg)
