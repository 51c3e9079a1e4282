"""AmbientMiddleware: one context and one component scope per request, in pure ASGI 3."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any, Final

import anyio
import anyio.lowlevel

from ambient import _binding, _observe
from ambient._binding import (
    _Binding,
    _bound_here,
    _live,
    _shown,
    bind,
    unbind,
)
from ambient._context import (
    _PLACEHOLDERS,
    ANONYMOUS,
    UserExecutionContext,
    UserRef,
    new_id,
    request_context,
)
from ambient._context import (
    ReadOnlyDict as _ReadOnlyDict,
)
from ambient._instances import _Deadline, _set_deadline
from ambient._observe import Observer
from ambient._registry import Registry
from ambient._scope import Scope
from ambient.errors import (
    AmbientError,
    IdentityError,
    IncompleteResponseError,
    InvalidContextError,
    ServerErrorResponseError,
    TooManyRequestsError,
    _readable,
)
from ambient.middleware._problem import (
    Problem,
    Receive,
    Send,
    _carries_status,
    _withholds_detail,
)
from ambient.middleware.identity import (
    _EXPIRES_AT_KEY,
    _VALIDATED_AT_KEY,
    Identity,
    IdentityResolver,
    _challenge_of,
    _check_resolver,
    _header_name,
    _validation_clock,
    checked_identity,
)
from ambient.telemetry import Telemetry, _leave_scopes_context

__all__ = ["AmbientMiddleware", "answer_error", "note_failure"]

logger = logging.getLogger("ambient.middleware")
# Assigned, not imported by name: CPython 3.11 compiles a method call on a name bound by
# `from ... import` as an attribute read (it takes the name for a module's), which builds a
# bound method on every call: _current.get() is run per request.
_current: Final = _binding._current
_resolving: Final = _binding._resolving
_handed_over: Final = _binding._handed_over

ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

# A request id is echoed in a response header, so only visible ASCII is taken from a client,
# at most this long.
_MAX_REQUEST_ID: Final = 128
# The metadata of an anonymous caller's context: its user id is fresh for each request, so
# its USER components can never be used again and are cleaned when the request ends.
_ANONYMOUS: Final = _ReadOnlyDict({ANONYMOUS: True})
# The close code of a websocket whose identity stopped being valid: expired here, or
# revoked through the websockets integration's hub.
CLOSE_IDENTITY_ENDED: Final = 4001
_EXPIRED: Final = "identity expired"
# A stream begun past its identity's expiry is told the client is gone at the app's first
# receive this long after its first message went out, unless its body ended by then.
_LATE_STREAM_GRACE: Final = 0.01
# How long an app told at its identity's expiry that the client is gone may take to end
# before it is cancelled (at most the registry's cleanup_timeout): frameworks that run
# the view in tasks of their own (Django, Quart) cancel them when told, and a
# cancellation of the app would leave them running. Short: the expired credential's app
# runs no longer than that past its expiry.
_TOLD_GRACE: Final = 0.25
# A response with this status or above tells the client its request was not carried out.
_SERVER_ERROR: Final = 500
_TOO_MANY: Final = 429
_UNAVAILABLE: Final = 503
# The websocket close codes that say the same: RFC 6455's "internal error", and 4000 plus
# a 5xx status (Litestar closes a socket whose handler raised with 4500).
_CLOSE_INTERNAL_ERROR: Final = 1011
_CLOSE_SERVER_ERRORS: Final = (4500, 4600)
# Where a request's scope keeps the resolver's WWW-Authenticate challenge, for a 401 that a
# framework's exception handler answers (through answer_error()).
_CHALLENGE_KEY: Final = "ambient.middleware.challenge"
# Where a request that failed with an exception the middleware let through (its app, its
# identity resolver) keeps its _FailedRequest, in the ASGI scope.
_FAILED_KEY: Final = "ambient.failed_request"
_UNAUTHENTICATED = Problem(
    401,
    "Authentication required",
    "this endpoint needs an identity and the request carried none",
    type_="urn:ambient:problem:unauthenticated",
)


# The (middleware's, registry's) Telemetry pairs already warned of: install() builds the
# middleware once to check its arguments and Starlette once more for its stack.
_warned_twice: weakref.WeakKeyDictionary[Observer, weakref.WeakSet[Observer]] = (
    weakref.WeakKeyDictionary()
)


def _warn_if_traced_twice(telemetry: Observer, registry_telemetry: Observer | None) -> None:
    if isinstance(telemetry, Telemetry) and isinstance(registry_telemetry, Telemetry):
        warned = _warned_twice.setdefault(telemetry, weakref.WeakSet())
        if registry_telemetry in warned:
            return
        warned.add(registry_telemetry)
        logger.warning(
            "ambient: the registry and AmbientMiddleware(telemetry=...) were given two "
            "Telemetry objects: every request's scope would be traced and counted twice. "
            "Give a Telemetry to one of them."
        )


class AmbientMiddleware:
    """Give every HTTP request and websocket connection its own context and scope.

    For ``http`` and ``websocket`` scopes: resolve the identity, build and validate the
    :class:`~ambient.UserExecutionContext`, open a :class:`~ambient.Scope` on ``registry``
    (which binds the context), call the app, and close the scope when the app's call returns
    — after a streamed body and Starlette background tasks, so they still see the context.
    Cleanup is shielded from cancellation and runs on client disconnect and on errors.
    Other users' USER components that an HTTP request finds past their ``idle_ttl`` or
    evicts for ``max_users`` are taken out of use at once and cleaned when a scope of the
    registry next closes (this request's at the latest, after its response), not before
    its handler runs; a long streamed response leaves them to other requests' closes.
    (Scopes a handler opens itself clean them as they open.)
    Cleanups see the exception that ended the request, also when the app returned without
    raising yet the request failed: its response never finished (the framework cancelled
    the work of a client that disconnected, or the client disconnected before the end of
    the body, or the app returned without finishing its answer, a websocket's handshake
    included; :class:`~ambient.errors.IncompleteResponseError`),
    it was a 5xx (:class:`~ambient.errors.ServerErrorResponseError`; for a websocket, a
    close with 1011 or 4000 plus a 5xx, as Litestar closes a failed handler's socket, or a
    5xx denial of its handshake), or an ambient error
    was answered by a framework's exception handler through :func:`answer_error` (that
    error; ``ambient.integrations.starlette``'s handler is one).
    On ``lifespan`` shutdown the registry's USER and APP components are closed before the
    app's own shutdown runs, once the requests' scopes still open have closed (requests the
    server cancelled may still be cleaning up; it waits while their cleanups go on, and
    gives up after a whole ``cleanup_timeout`` in which none ended). When scopes the app
    opened itself are still open (a consumer started at startup), the components are
    closed after the app's shutdown instead, which stops them. An app whose lifespan fails
    after its startup, while the server serves (a task it started crashed; Starlette and
    Litestar then send ``lifespan.shutdown.failed`` unasked), would leave the server
    serving on and skipping its shutdown, with the registry never closed: the failure is
    logged at once (an error with its traceback, on the ``ambient.middleware`` logger),
    requests go on with the registry, and the server's shutdown closes it and hears
    ``lifespan.shutdown.failed`` naming the failure. An app that raises as it answers its
    startup, before it waits for more, has failed its startup: that is raised to the
    server, as without the middleware (uvicorn ``--lifespan on`` exits). Other scope types
    pass through untouched.

    Refusals never call the app and never bind anything: no identity is 401, a malformed
    identity or id 400, more than ``max_concurrent_per_user`` requests of one user 429
    with ``Retry-After``; each an RFC 9457 ``application/problem+json`` body. A 401
    carries ``WWW-Authenticate``: the refusing resolver's challenge (``jwt_bearer``:
    ``Bearer error="invalid_token"``), else the challenge of ``identity`` (``Bearer`` for
    ``jwt_bearer``, every scheme of a ``first_of``); a resolver whose credential has no
    standard scheme (``trusted_header``, ``scope_user``, ``signed_context``, tickets) has
    none to offer, and its 401 goes without. Websockets are closed before accept with 1008
    (1013 for a 503, 1011 for another server error), or answered with the same HTTP
    problem, headers included, where the server supports the ``websocket.http.response``
    extension. An :class:`~ambient.AmbientError` that carries an HTTP status
    (``PoolExhaustedError`` -> 503) raised by the app before its response started becomes
    that answer, also inside an exception group (a task group around the work) that holds
    only such errors, answered as its first; any other exception propagates unchanged.
    Raised once a websocket was accepted, such an error closes it instead, with 1013 "try
    again later" for a 503, 1011 for another 5xx and 1008 for the rest (a 429 included),
    the problem's title as reason (nothing is sent on a socket the app or the client
    closed already; one raised as the expiry below cancelled the app gets the expiry's
    4001), and is not raised to the server either; its cleanups see it all the same. A
    websocket whose identity has an ``expires_at`` (a JWT's ``exp``) is closed with 4001
    when it passes, and a streamed HTTP response whose body is streaming (server-sent
    events) is ended then, idle or not:
    the app is told the client is gone (its ``receive`` answers ``websocket.disconnect`` or
    ``http.disconnect``; Django and Quart then end the tasks they run the view in),
    cancelled if it has not returned a quarter of a second later (at most the registry's
    ``cleanup_timeout``), and nothing it sends after the expiry goes out; their cleanups
    then see an :class:`~ambient.errors.IncompleteResponseError`, as for any work cut short.

    Args:
        app: The ASGI application.
        registry: Where components come from.
        identity: Resolver of the request's :class:`~ambient.middleware.identity.Identity`
            (see :mod:`ambient.middleware.identity`); may be ``None`` with
            ``anonymous=True``.
        anonymous: Give a request without identity a fresh ``anonymous:<random>`` user
            instead of answering 401, with ``{"anonymous": True}`` as its context's
            metadata. No two such requests share USER components, and theirs are cleaned
            when the request ends (they could never be used again).
        anonymous_paths: Paths served as with ``anonymous=True`` while the rest require an
            identity: a health check, a login endpoint, FastAPI's ``/docs`` and
            ``/openapi.json``. Each is a path the app routes (``scope["path"]`` less the
            ``root_path`` it starts with, a server's ``--root-path`` or a mount's prefix,
            as Starlette's routers take it) must equal, or, ending with ``/``, a prefix of
            it (``"/static/"``; ``"/"`` is the root alone); a request path with a ``.`` or
            ``..`` segment or an empty one (``//``) matches no prefix (a proxy or framework
            may resolve it to another route). A credential sent there is still checked: a
            valid one serves its user, a bad one is refused as anywhere else.
        request_id_header: Header carrying the request id; a valid one (visible ASCII, at
            most 128 characters) is used, anything else replaced by a generated id. The id
            is echoed on the response.
        thread_id_header: Header carrying the conversation thread id (generated when
            absent; an invalid one is 400).
        thread_id_query: For websocket handshakes, also take the thread id from this query
            parameter (browsers cannot set headers on ``new WebSocket(url)``); a thread id
            given twice, in the header and the query or twice in either, is 400.
        max_concurrent_per_user: Requests and sockets one user may have in flight in this
            process at once; ``None`` for no limit. A request counts until its app returns
            (its streamed body and background tasks included), not while its cleanups run.
        telemetry: An extra observer for the scopes this middleware opens (an
            ``ambient.telemetry.Telemetry``); ``None`` uses the registry's own.
    """

    __slots__ = (
        "_active",
        "_anonymous_paths",
        "_anonymous_prefixes",
        "_challenge",
        "_id_lengths",
        "_request_id_header",
        "_requests",
        "_requests_done",
        "_thread_id_header",
        "_thread_id_query",
        "_warned_leftover",
        "anonymous",
        "app",
        "identity",
        "max_concurrent_per_user",
        "registry",
        "telemetry",
    )

    def __init__(
        self,
        app: ASGIApp,
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
        if not isinstance(registry, Registry):
            msg = f"registry must be an ambient.Registry, not {type(registry).__name__}"
            raise TypeError(msg)
        if identity is None and not anonymous:
            msg = "AmbientMiddleware needs an identity resolver (or anonymous=True)"
            raise ValueError(msg)
        if identity is not None:
            _check_resolver(identity, "identity")
        if max_concurrent_per_user is not None and (
            isinstance(max_concurrent_per_user, bool)
            or not isinstance(max_concurrent_per_user, int)
            or max_concurrent_per_user < 1
        ):
            limit = max_concurrent_per_user
            msg = f"max_concurrent_per_user must be an int >= 1 or None, not {limit!r}"
            raise ValueError(msg)
        self.app = app
        self.registry = registry
        self.identity = identity
        self._challenge = _challenge_of(identity)
        self.anonymous = anonymous
        self._anonymous_paths, self._anonymous_prefixes = _paths(anonymous_paths)
        self._request_id_header = _header_name(request_id_header)
        self._thread_id_header = _header_name(thread_id_header)
        self._id_lengths = frozenset((len(self._request_id_header), len(self._thread_id_header)))
        self._thread_id_query = thread_id_query
        self.max_concurrent_per_user = max_concurrent_per_user
        if telemetry is not None:
            _observe.checked(telemetry, "telemetry")
        self.telemetry = telemetry
        if telemetry is not None and telemetry is not registry.telemetry:
            _warn_if_traced_twice(telemetry, registry.telemetry)
        # Per-user in-flight counts: shared limiter state, not per-request state.
        self._active: dict[UserRef, int] = {}
        self._warned_leftover = False
        # Scopes of requests and sockets still open (their cleanups included), and the event
        # a shutdown waiting for them to end waits on.
        self._requests = 0
        self._requests_done: anyio.Event | None = None

    async def __call__(  # noqa: PLR0915 - one coroutine per request is the point
        self, scope: MutableMapping[str, Any], receive: Receive, send: Send
    ) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # One coroutine per request on the hot path: the scope is opened and closed through
        # its sync halves, awaiting only when cleanup or expiry needs it.
        websocket = kind == "websocket"
        # A server may run this request inside a contextvars.Context left over from an
        # earlier request on the same connection: start from "nothing bound". Reading is
        # cheaper than setting, and nothing is bound almost always.
        bound = _current.get()
        leftover = making = None
        if bound is not None:
            if not self._warned_leftover and _live(bound) is not None:
                self._warn_leftover()
            if _of_request(bound) and not _bound_here(bound):
                # Nor the creations that request was making: the server started this one
                # from its task (as it read its body or sent its end), maybe inside one of
                # its factories. This request would take such a creation for one of its
                # own, and name a cycle where it must wait for it. (A caller's own, making
                # a request in its task, stay: waiting for itself would hang.)
                making = (_resolving.set(()), _handed_over.set(()))
                # Nor its scope's trace and baggage, in which this request's identity would
                # be resolved (or refused) before its own scope opens.
                _leave_scopes_context()
            leftover = _current.set(None)
        user: UserRef | None = None
        counted = False
        try:
            request_id, raw_thread_ids = self._read_ids(scope)
            # Before the resolver looks at the credential: a revocation of the user from
            # this moment on may have come after that look, and must reach the socket.
            validated_at = _validation_clock() if websocket else 0.0
            try:
                # The resolver is called here rather than through resolve_identity(): two
                # coroutines fewer per request for a sync resolver returning an Identity.
                identity: Identity | None = None
                resolver = self.identity
                if resolver is not None:
                    found = resolver(scope)
                    if isinstance(found, Identity):
                        identity = found
                    elif found is not None:
                        identity = await checked_identity(resolver, found)
                ctx = self._context(identity, request_id, raw_thread_ids, scope, websocket)
                # A request id the client did not send is generated by create(),
                # unvalidated (a continued run keeps its parent's request id and echoes a
                # fresh one).
                if request_id is None:
                    request_id = ctx.request_id if ctx.parent_run_id is None else new_id()
                if self.max_concurrent_per_user is not None:
                    user = self._admit(ctx)
            except Exception as refused:
                echo = [(self._request_id_header, (request_id or new_id()).encode())]
                if not isinstance(refused, _Refused) and (
                    not isinstance(refused, AmbientError) or not _carries_status(refused)
                ):
                    # A resolver's bug (an ambient error that is no answer to a client
                    # too), or its database's error: no context exists, yet the 500 a
                    # last-resort handler outside answers (Starlette's) is this request's.
                    scope[_FAILED_KEY] = _FailedRequest(echo, None, None)
                    raise
                if identity is not None:
                    # Before answering: a client that retries at once must find the
                    # ticket back.
                    await identity._refused()
                problem = _problem(refused)._challenged(_challenge_of(self.identity))
                if isinstance(refused, AmbientError):
                    _log_withheld(refused, problem, echo[0][1].decode())
                await self._refuse(problem, scope, receive, send, echo, websocket)
                return

            echo = [(self._request_id_header, request_id.encode())]
            expires_at = identity.expires_at if identity is not None else None
            if expires_at is None:
                response = _Response()
                response._begin(send, echo, receive)
                app_receive: Receive = response._received
            elif websocket:
                response = socket = _Socket(send, echo, receive, expires_at)
            else:
                # A streamed answer (server-sent events) stops at the identity's expiry.
                response = stream = _Stream(
                    send,
                    echo,
                    receive,
                    expires_at,
                    min(_TOLD_GRACE, self.registry.cleanup_timeout),
                )
                app_receive = stream._received_in_time
            registry = self.registry
            telemetry = self.telemetry
            # Without a keyword when there is no telemetry: a call with one builds a dict.
            component_scope = (
                Scope(registry, ctx)
                if telemetry is None
                else Scope(registry, ctx, observer=telemetry)
            )
            if expires_at is not None:
                component_scope.state[_EXPIRES_AT_KEY] = expires_at
            if self._challenge is not None:
                component_scope.state[_CHALLENGE_KEY] = self._challenge
            if websocket:
                component_scope.state[_VALIDATED_AT_KEY] = validated_at
                if registry.expiry_due():
                    await registry.expire_idle()
            else:
                # Other users' cleanups wait for this request's close, after its answer.
                component_scope._others_after = True
                # _queue_expired() unless nothing is idle (expiry_due(), inlined): it looks
                # at the clock itself, and evicted users wait for the close anyway.
                if registry._idle:
                    registry._queue_expired()
            handshake = None
            if websocket:
                app_receive = handshake = _Handshake(receive)
            component_scope._open()
            self._requests += 1
            counted = True
            expired = False
            try:
                if expires_at is None:
                    # Its bound method: a call of one costs less than a call of an object's
                    # __call__, and the app sends at least twice.
                    await self.app(scope, app_receive, response.__call__)
                elif websocket:
                    expired = await _serve_until_expiry(
                        self.app,
                        scope,
                        app_receive,
                        socket,
                        expires_at,
                        min(_TOLD_GRACE, registry.cleanup_timeout),
                        registry.cleanup_timeout,
                    )
                else:
                    await _stream_until_expiry(
                        self.app, scope, app_receive, stream, registry.cleanup_timeout
                    )
            except BaseException as exc:
                if user is not None:
                    # The app's work is over: no longer in flight (see below).
                    self._leave(user)
                    user = None
                if response.cut and _only_cut_off(exc):
                    # The stream this middleware cut at the identity's expiry: the error
                    # it raised to the app's send came back, as it should.
                    failures = await component_scope.finish(_CutOffAtExpiryError(http=True))
                    _log_failures(failures, ctx)
                    return
                # An accepted socket (or one the app closed) has an answer too: a close.
                answerable = not response.started or (websocket and not response.status)
                answer = _answer_of(exc) if answerable else None
                if answer is None:
                    # For a last-resort handler outside (Starlette's 500), which answers
                    # after the scope closed.
                    scope[_FAILED_KEY] = _FailedRequest(echo, ctx, component_scope)
                    await component_scope.__aexit__(type(exc), exc, exc.__traceback__)
                    raise
                failures = await component_scope.finish(exc)
                _log_failures(failures, ctx)
                if response.started:
                    # Its handshake was answered: no ticket to give back, no challenge.
                    problem = Problem.from_error(answer)
                    _log_withheld(answer, problem, ctx.request_id)
                    within = self.registry.cleanup_timeout
                    await _close_answered(problem, response, handshake, ctx, within)
                    return
                if identity is not None:
                    await identity._refused()
                problem = Problem.from_error(answer)._challenged(_challenge_of(self.identity))
                _log_withheld(answer, problem, ctx.request_id)
                if handshake is not None and handshake.connected:
                    # The app took the handshake's connect: waiting for it would hang.
                    await problem.deny_websocket(scope, receive, send, echo, connected=True)
                else:
                    await self._refuse(problem, scope, receive, send, echo, websocket)
                return
            if user is not None:
                # The app has returned: the request is no longer in flight, though its
                # cleanups (a connection going back to its pool) may take a while yet. A
                # client that waits for each answer must not see its next request refused.
                self._leave(user)
                user = None
            # The app returned, yet the request may have failed: an error its framework
            # answered (noted on the scope by answer_error()), a response cut short
            # (frameworks cancel the work when the client disconnects, then return), or a
            # 5xx. Cleanups must see that, or a transaction around a yield commits.
            ended_by = component_scope.exception
            if (
                ended_by is None
                and not websocket
                and (not response.ended or response.status >= _SERVER_ERROR)
            ):
                ended_by = response.failure()
            elif ended_by is None and (expired or response.cut):
                ended_by = _CutOffAtExpiryError(http=response.cut)
            elif ended_by is None and websocket:
                ended_by = response.socket_failure(handshake is None or handshake.disconnected)
            # The response has gone out: a failed cleanup is logged, counted and traced by
            # the scope's observers, never raised to the server.
            done = component_scope._close_now(ended_by)
            if done is None:
                done = await component_scope._close_later(ended_by)
            if done:
                _log_failures(tuple(done), ctx)
        finally:
            if counted:
                self._requests -= 1
                if not self._requests and self._requests_done is not None:
                    self._requests_done.set()
            if user is not None:
                self._leave(user)
            if making is not None:
                with contextlib.suppress(ValueError):  # as below
                    _handed_over.reset(making[1])
                    _resolving.reset(making[0])
            if leftover is not None:
                try:
                    _current.reset(leftover)
                except ValueError:  # pragma: no cover - only if the app switched Contexts
                    _current.set(None)
                else:
                    # Another request's binding, copied in by the server: what runs
                    # outside the middleware for this request (Starlette's error handler,
                    # an outer middleware) must not take it for its own. A caller's that
                    # reached this Context another way stays (a thread hop: asgiref
                    # copies this Context back to the caller). leftover implies bound.
                    if bound is not None and _of_request(bound) and not _bound_here(bound):
                        _current.set(None)

    # -- requests and sockets ------------------------------------------------------------

    def _warn_leftover(self) -> None:
        self._warned_leftover = True
        logger.warning(
            "ambient: a request started inside another request's live context (the server "
            "copied it into the new request's task; uvicorn does this for pipelined and "
            "large-body requests unless run with --reset-contextvars); ambient ignored it "
            "and bound the request's own context. Reported once."
        )

    def _admit(self, ctx: UserExecutionContext) -> UserRef:
        """Count one more request of ``ctx``'s user, or refuse it over the limit."""
        user = ctx.user
        count = self._active.get(user, 0)
        limit = self.max_concurrent_per_user
        if limit is not None and count >= limit:
            msg = f"this user already has {count} requests in flight (limit {limit})"
            raise TooManyRequestsError(msg)
        self._active[user] = count + 1
        return user

    def _leave(self, user: UserRef) -> None:
        remaining = self._active[user] - 1
        if remaining:
            self._active[user] = remaining
        else:
            del self._active[user]

    def _read_ids(self, scope: MutableMapping[str, Any]) -> tuple[str | None, tuple[bytes, ...]]:
        # No lists: most requests carry neither header.
        raw_request_id: bytes | None = None
        thread_ids: tuple[bytes, ...] = ()
        rid_name = self._request_id_header
        tid_name = self._thread_id_header
        lengths = self._id_lengths
        for name, value in scope.get("headers", ()):
            if len(name) not in lengths:
                continue  # neither name, in any case: lowered for nothing
            lowered = name.lower()
            if lowered == rid_name:
                # Sent more than once: none is taken (b"" is no valid id).
                raw_request_id = value if raw_request_id is None else b""
            elif lowered == tid_name:
                thread_ids += (value,)
        query_name = self._thread_id_query
        if query_name is not None and scope["type"] == "websocket":
            query = scope.get("query_string", b"").decode("latin-1")
            # Through latin-1 both ways: every byte, sent raw or %-escaped, comes back as it
            # was sent, to be read as UTF-8 (or refused) as the header's bytes are. Raw
            # UTF-8 must name the same thread as its %-escaped and header forms.
            parsed = urllib.parse.parse_qs(query, keep_blank_values=True, encoding="latin-1")
            found = parsed.get(query_name, [])
            thread_ids += tuple(value.encode("latin-1") for value in found)
        request_id = None
        if raw_request_id and len(raw_request_id) <= _MAX_REQUEST_ID and raw_request_id.isascii():
            candidate = raw_request_id.decode("ascii")
            # Visible ASCII: printable, bar the space (a regular expression costs more). Of
            # validate_id()'s rules only the placeholders' can refuse such an id.
            if (
                candidate.isprintable()
                and " " not in candidate
                and candidate.lower() not in _PLACEHOLDERS
            ):
                request_id = candidate
        return request_id, thread_ids

    def _context(
        self,
        identity: Identity | None,
        request_id: str | None,
        raw_thread_ids: tuple[bytes, ...],
        scope: MutableMapping[str, Any],
        websocket: bool,
    ) -> UserExecutionContext:
        # Before the ids, as a refused credential is: whatever is wrong with its thread id,
        # a request without a credential is told to authenticate (401, with the challenge).
        if identity is None and not self.anonymous and not self._anonymous_path(scope):
            raise _Refused(_UNAUTHENTICATED)
        thread_id = None
        if raw_thread_ids:
            if len(raw_thread_ids) > 1:
                reason = f"was sent {len(raw_thread_ids)} times ({self._thread_source(scope)})"
                raise InvalidContextError("thread_id", reason, echo=False)
            try:
                thread_id = raw_thread_ids[0].decode("utf-8")
            except UnicodeDecodeError:
                reason = f"is not valid UTF-8 ({self._thread_source(scope)})"
                raise InvalidContextError("thread_id", reason, echo=False) from None
        if identity is None:
            return UserExecutionContext.create(
                f"anonymous:{new_id()}",
                thread_id=thread_id,
                request_id=request_id,
                connection_id=new_id() if websocket else None,
                metadata=_ANONYMOUS,
            )
        if identity.parent is not None:
            return _continued(identity, identity.parent, websocket)
        return request_context(
            identity.user_id,
            identity.tenant_id,
            thread_id,
            request_id,
            new_id() if websocket else None,
            {"claims": identity.claims} if identity.claims else None,
        )

    def _thread_source(self, scope: MutableMapping[str, Any]) -> str:
        """Where a refused thread id may have come from: the header, or for a websocket the
        header or the query parameter."""
        where = f"the {self._thread_id_header.decode('latin-1')} header"
        if scope["type"] == "websocket" and self._thread_id_query is not None:
            where += f" or the {self._thread_id_query} query parameter"
        return where

    def _anonymous_path(self, scope: MutableMapping[str, Any]) -> bool:
        path = _route_path(scope)
        if path is None:
            return False
        if path in self._anonymous_paths:
            return True
        prefixes = self._anonymous_prefixes
        if not prefixes or not path.startswith(prefixes):
            return False
        return _plain(path)

    async def _refuse(
        self,
        problem: Problem,
        scope: MutableMapping[str, Any],
        receive: Receive,
        send: Send,
        echo: list[tuple[bytes, bytes]],
        websocket: bool,
    ) -> None:
        if websocket:
            await problem.deny_websocket(scope, receive, send, echo)
        else:
            await problem.send_http(send, echo)

    # -- lifespan ------------------------------------------------------------------------

    async def _lifespan(  # noqa: PLR0915 - one conversation, its state in locals
        self, scope: MutableMapping[str, Any], receive: Receive, send: Send
    ) -> None:
        received: list[str] = []
        startup_answered = False
        started_up = False
        # Whether the app serves: it answered its startup and waits for its shutdown, which
        # the server has not sent yet.
        serving = False
        # What the server is told at its shutdown when the app's lifespan ended while it
        # served (without the middleware, the server would skip its shutdown).
        answer: MutableMapping[str, Any] | None = None
        closed = False

        async def close_registry(*, before_the_apps_shutdown: bool = False) -> None:
            nonlocal closed
            if not closed:
                closed = await self._close_registry(before_the_apps_shutdown)

        async def receive_tracked() -> MutableMapping[str, Any]:
            nonlocal serving
            serving = started_up and "lifespan.shutdown" not in received
            message = await receive()
            received.append(message["type"])
            if message["type"] == "lifespan.shutdown":
                serving = False
                # Before the app's own shutdown: the components were made from what its
                # startup made (a client, an engine), so they go first.
                await close_registry(before_the_apps_shutdown=True)
            return message

        async def send_tracked(message: MutableMapping[str, Any]) -> None:
            nonlocal startup_answered, started_up, answer
            kind = message["type"]
            if kind.startswith("lifespan.startup."):
                startup_answered = True
                started_up = kind == "lifespan.startup.complete"
                if not started_up:
                    # The server exits on it and sends no shutdown: what the startup made
                    # (APP components) is closed now or never.
                    await close_registry()
            elif kind.startswith("lifespan.shutdown."):
                if serving:
                    # Unasked: Starlette and Litestar send shutdown.failed as their lifespan
                    # fails while the server serves. Closed now, the registry would be
                    # refilled by the requests to come; kept for the server's shutdown.
                    answer = message
                    return
                await close_registry()
            await send(message)

        try:
            await self.app(scope, receive_tracked, send_tracked)
        except Exception as exc:
            if serving:
                # Its lifespan failed while the server serves (a task it started crashed).
                # Raised, it would leave the server serving on and skipping its shutdown,
                # with the registry never closed: the conversation goes on for the app.
                answer = _failed_while_serving(exc)
            # An app that took the startup message and raised has failed its startup: the
            # server must hear it (uvicorn --lifespan on exits), as without the middleware;
            # so must one that raised as it answered its startup, before it waited for more.
            elif startup_answered or received:
                if "lifespan.shutdown" in received:
                    # Its shutdown failed, maybe while the registry was closing before it
                    # (a task of its lifespan crashed as requests finished): now or never.
                    await close_registry()
                raise
            else:
                logger.debug("the app does not support lifespan; ambient answers it", exc_info=True)
        else:
            if startup_answered and (not started_up or "lifespan.shutdown" in received):
                return
        if not started_up:
            # The app has no lifespan support: answer the protocol so that shutdown still
            # closes the registry.
            if "lifespan.startup" not in received:
                await receive()
            await send({"type": "lifespan.startup.complete"})
        # Or it answered its startup and returned, having nothing to stop, or its lifespan
        # ended while the server served: the server's shutdown, which it will never
        # receive, is answered here, and closes the registry.
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            await close_registry()
            await send(answer or {"type": "lifespan.shutdown.complete"})

    async def _close_registry(self, before_the_apps_shutdown: bool) -> bool:
        """Close the registry at shutdown, once the scopes using its USER and APP components
        have closed; whether it was closed (not when the app's own shutdown is to end some
        of them first)."""
        registry = self.registry
        # Requests the server cancelled at its graceful-shutdown deadline may still be
        # cleaning up, with USER and APP components: let them finish first.
        still_open = await self._wait_for_requests()
        if registry.open_scopes > still_open and before_the_apps_shutdown:
            # Scopes the app opened itself (a consumer started at startup): its shutdown
            # stops them, so their components go after it.
            return False
        if still_open:
            logger.warning(
                "ambient: %d request(s) still cleaning up, with no cleanup done for %s s, "
                "at shutdown; closing the registry under them",
                still_open,
                registry.cleanup_timeout,
            )
        if registry.open_scopes > still_open:
            others = await registry.wait_for_scopes()
            if others > still_open:
                logger.warning(
                    "ambient: %d scope(s) still open %s s after the app's shutdown; closing "
                    "the registry under them",
                    others - still_open,
                    registry.cleanup_timeout,
                )
        try:
            await registry.aclose()
        except Exception:
            logger.exception("ambient: closing the registry at shutdown failed")
        return True

    async def _wait_for_requests(self) -> int:
        """Wait until this middleware's requests and sockets have closed their scopes, as
        long as their cleanups go on (each is bounded by the registry's
        ``cleanup_timeout``); give up after a whole ``cleanup_timeout`` in which none
        ended. Return how many are still open."""
        registry = self.registry
        while self._requests:
            left = self._requests
            progress = registry.cleaned + registry.cleanup_failures
            done = self._requests_done = anyio.Event()
            try:
                with anyio.move_on_after(registry.cleanup_timeout):
                    await done.wait()
            finally:
                self._requests_done = None
            if self._requests >= left and registry.cleaned + registry.cleanup_failures == progress:
                break
        return self._requests


class _FailedRequest:
    """A request that failed with an exception the middleware let through, as the
    middleware leaves it in the ASGI scope (under :data:`_FAILED_KEY`) for a last-resort
    error handler outside it: Starlette's ``ServerErrorMiddleware``, which answers such a
    request with a 500 after the request's scope has closed.

    A request whose identity resolver (or the building of its context) raised has no
    context and no scope: only its request id.

    Attributes:
        echo: The request id header the middleware echoes on the request's answers.
        context: The request's context; ``None`` when it failed before it had one.
        scope: The request's component scope, closed; ``None`` as ``context`` is.
    """

    __slots__ = ("context", "echo", "scope")

    def __init__(
        self,
        echo: list[tuple[bytes, bytes]],
        context: UserExecutionContext | None,
        scope: Scope | None,
    ) -> None:
        self.echo = echo
        self.context = context
        self.scope = scope

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        """Bind the request's context again for the block, with its closed scope: the
        block sees the request's context and resolves nothing (``ScopeClosedError``).
        A request that failed before it had a context binds none: the block sees no
        context, whatever was bound here (a caller's, or another request's)."""
        if self.context is None:
            token = _current.set(None)
            try:
                yield
            finally:
                _current.reset(token)
            return
        # The request's own context, whatever is bound here: as the middleware binds it.
        binding = bind(self.context, self.scope, allow_switch=True)
        try:
            yield
        finally:
            unbind(binding)


class _Handshake:
    """A websocket's ``receive``, noting whether the app took the handshake's connect, and
    whether it took the client's disconnect (a close sent after that is refused: uvicorn
    raises)."""

    __slots__ = ("_receive", "connected", "disconnected")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.connected = False
        self.disconnected = False

    async def __call__(self) -> MutableMapping[str, Any]:
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.disconnect":
            self.disconnected = True
        elif kind == "websocket.connect":
            self.connected = True
        return message


async def _close_answered(
    problem: Problem,
    socket: _Response,
    handshake: _Handshake | None,
    ctx: UserExecutionContext,
    within: float,
) -> None:
    """Close an accepted websocket whose app raised an error that has an answer (no
    database connection free: 1013), unless the app, its expiry or the client closed it
    already: the client learns to try again later instead of seeing the connection drop.
    An app that raised it as it was cancelled at its identity's expiry gets the expiry's
    close (4001): trying again with the same credential is no use. The close waits at
    most ``within`` seconds for a client that stopped reading."""
    if socket.close_code or handshake is None or handshake.disconnected:
        return
    message: dict[str, Any]
    if isinstance(socket, _Socket) and socket.expired:
        logger.info("ambient: closing a websocket whose identity has expired")
        message = {"type": "websocket.close", "code": CLOSE_IDENTITY_ENDED, "reason": _EXPIRED}
    else:
        message = problem._websocket_close()
        logger.info(
            "ambient: closing a websocket with %d after its app raised a %d error (request %s)",
            message["code"],
            problem.status,
            ctx.request_id,
        )
    # A client gone before its disconnect was received: the server refuses the close
    # (uvicorn's ClientDisconnected), with nobody left to tell. Past the expiry, the
    # socket's own send refuses what the app sends, not this.
    with _Deadline(within), contextlib.suppress(OSError):
        await _Response.__call__(socket, message)


# The messages that start the answer to a request, which carry the request id echo: the
# response, the websocket's accept, or the app's own denial of a handshake.
_ANSWERS: Final = ("http.response.start", "websocket.accept", "websocket.http.response.start")


class _Response:
    """The app's ``send``: echoes the request id and notes how far the answer got (started,
    its status, its body ended, or its trailers when its start said it has some).

    A plain callable returning the server's own awaitable: a coroutine of its own per
    message would cost more than everything it does.
    """

    __slots__ = (
        "_echo",
        "_receive",
        "_send",
        "close_code",
        "ended",
        "gone",
        "started",
        "status",
        "trailers",
    )

    # Whether this middleware ended the body early (a stream past its identity's expiry).
    cut = False

    # No __init__: made by a plain call, then begun (calling a class with an __init__ costs
    # about twice what that does, once per request).
    def _begin(self, send: Send, echo: list[tuple[bytes, bytes]], receive: Receive) -> None:
        self._send = send
        self._echo = echo
        self._receive = receive
        self.started = False
        self.status = 0
        self.ended = False
        # The start said trailers follow the body (the http.response.trailers extension):
        # the response ends with the last of them, not with the body.
        self.trailers = False
        # The client disconnected before the body ended: an end sent after that (a
        # BaseHTTPMiddleware inside re-sends a stream Starlette cancelled, then ends it)
        # never reached it.
        self.gone = False
        # The code of the websocket.close the app sent, if it sent one (of a later one that
        # tells a server error, if it sent two).
        self.close_code = 0

    async def _received(self) -> MutableMapping[str, Any]:
        """The app's ``receive`` for an HTTP request: notes a disconnect before the end."""
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.ended:
            self.gone = True
        return message

    def failure(self) -> AmbientError | None:
        """Why an HTTP request whose app returned failed all the same, if it did."""
        if not self.ended:
            return IncompleteResponseError(started=self.started, client_gone=self.gone)
        if self.status >= _SERVER_ERROR:
            return ServerErrorResponseError(self.status)
        return None

    def socket_failure(self, client_gone: bool) -> AmbientError | None:
        """Why a websocket whose app returned failed all the same, if it did: the app
        closed it with a server error (1011, or 4000 plus a 5xx status, as Litestar closes
        the socket of a handler that raised), or denied its handshake with a 5xx, or never
        answered its handshake while the client waited (unless ``client_gone``: the app
        heard that it left), which the server refuses with a 500."""
        if not self.started and not client_gone:
            return IncompleteResponseError(started=False, client_gone=False)
        code = self.close_code
        if code == _CLOSE_INTERNAL_ERROR:
            return ServerErrorResponseError(_SERVER_ERROR)
        if _CLOSE_SERVER_ERRORS[0] <= code < _CLOSE_SERVER_ERRORS[1]:
            return ServerErrorResponseError(code - 4000)
        if self.status >= _SERVER_ERROR:
            return ServerErrorResponseError(self.status)
        return None

    def __call__(self, message: MutableMapping[str, Any]) -> Awaitable[None]:
        kind = message["type"]
        if kind == "http.response.body":
            if not message.get("more_body", False) and not self.trailers:
                self.ended = not self.gone
            return self._send(message)
        if kind in _ANSWERS or (kind == "http.response.trailers" and not self.started):
            self.started = True
            if kind == "http.response.trailers":
                # Trailers before any start: hypercorn answers them (over HTTP/2, a
                # gRPC-style "trailers-only" response) with a 200 whose headers are these.
                self.status = 200
                if not message.get("more_trailers", False):
                    self.ended = not self.gone
            else:
                status = message.get("status", 0)
                self.status = status if type(status) is int else _number(status)
                self.trailers = message.get("trailers", False)
            echo = self._echo
            headers = message.get("headers") or []
            # The app's message is never written to: an app may send one prebuilt dict for
            # every response, and this request's id left in it would be the next one's.
            if type(headers) is not list and type(headers) is not tuple:
                # Any iterable will do in ASGI: looked through below, it would be used up.
                headers = list(headers)
                message = {**message, "headers": headers}
            echo_name = echo[0][0]
            for name, _ in headers:
                if name.lower() == echo_name:
                    break
            else:
                # Copied, then the headers replaced: a dict display with both costs a
                # second dict.
                message = {**message}
                message["headers"] = [*headers, *echo]
        elif kind == "websocket.close":
            self.started = True
            code = message.get("code")
            if type(code) is not int:
                code = _number(code)
            code = code or 1000  # None: the default, as servers read it
            if self.close_code:
                # Closed already (Litestar closes the socket of a handler that raised, also
                # one the hub closed before raising): uvicorn raises on a second close, and
                # the client has its close frame. A later server error still tells a
                # failure, and a later clean close hides no earlier one.
                if _tells_server_error(code):
                    self.close_code = code
                return anyio.lowlevel.checkpoint()
            self.close_code = code
        elif not self.started and kind.startswith("websocket."):
            self.started = kind != "websocket.send"
        elif kind == "http.response.trailers":
            if not message.get("more_trailers", False):
                self.ended = not self.gone
        elif (
            kind == "http.response.pathsend"
            or (kind == "http.response.zerocopysend" and not message.get("more_body", False))
        ) and not self.trailers:
            self.ended = not self.gone
        return self._send(message)


class _Socket(_Response):
    """The ``send`` of a websocket whose identity expires: also notes whether it closed,
    and whether its app raised as it was ended at the expiry (``expired``). Past the
    expiry nothing the app sends goes out (``told``: the app was told the client is gone,
    or refused a message): the middleware closes the socket."""

    __slots__ = ("_expires_at", "closed", "disconnected", "expired", "told")

    def __init__(
        self, send: Send, echo: list[tuple[bytes, bytes]], receive: Receive, expires_at: float
    ) -> None:
        self._begin(send, echo, receive)
        self._expires_at = expires_at
        self.closed = False
        self.expired = False
        self.told = False
        # The app's receive answered the expiry's disconnect.
        self.disconnected = False

    def __call__(self, message: MutableMapping[str, Any]) -> Awaitable[None]:
        if self.told or _expired(self._expires_at):
            self.told = True
            return anyio.lowlevel.checkpoint()
        if message["type"] in ("websocket.close", "websocket.http.response.start"):
            self.closed = True
        return super().__call__(message)


class _Stream(_Response):
    """The ``send`` of an HTTP request whose identity expires: once its body is streaming
    (its first message with ``more_body`` went out), the app's ``receive`` answers
    ``http.disconnect`` from the expiry on, the app is cancelled through :attr:`expiry`
    if it still runs ``grace`` seconds later, and a body message with bytes it sends after
    the expiry is refused: the middleware then ends the response (a server-sent event
    stream must not go on serving an expired credential, idle or not), with the trailers
    its start announced, and the app gets an error from that ``send`` and from every later
    one. The empty end of its body goes out.

    A server-sent event stream (``content-type: text/event-stream``, no
    ``content-length``) is streaming from its start: one still waiting for its first event
    is cut at the expiry too, and one begun past it right after its start. Otherwise the
    first body message sent after the expiry goes out (one sent before it, held by a client
    that stopped reading, is cut at the expiry), and an answer that is not streaming is
    never cut: a request admitted while its credential was valid gets its answer. A
    response that declared its ``content-length`` cannot be ended early, so nothing more
    is sent and the server closes the connection.
    """

    __slots__ = (
        "_body_done",
        "_expires_at",
        "_grace",
        "_server",
        "_sized",
        "_streaming",
        "_tell_at",
        "_waiting",
        "cut",
        "expiry",
        "told",
    )

    def __init__(
        self,
        send: Send,
        echo: list[tuple[bytes, bytes]],
        receive: Receive,
        expires_at: float,
        grace: float,
    ) -> None:
        # What _Response sends goes through _forward: the start it sends has its headers
        # as a list already, the echo among them.
        self._begin(self._forward, echo, receive)
        self._server = send
        self._expires_at = expires_at
        self._streaming = False
        self._sized = False
        # Its body's last message went out (its trailers may follow).
        self._body_done = False
        self.cut = False
        # Around the app; its deadline (the expiry plus the grace) is set when the body
        # starts streaming.
        self.expiry = anyio.CancelScope()
        self._grace = grace
        # When the app's receive answers that the client is gone (the expiry, on the
        # loop's clock), and the scopes of the receive calls waiting until then.
        self._tell_at = math.inf
        self._waiting: set[anyio.CancelScope] = set()
        # Whether the app was answered that the client is gone, or refused a message.
        self.told = False

    def __call__(self, message: MutableMapping[str, Any]) -> Awaitable[None]:
        if self.cut:
            # Its trailers too: the response is ended with the (empty) ones it announced.
            raise _CutOffAtExpiryError(http=True)
        if message["type"] == "http.response.body":
            more = message.get("more_body", False)
            expiry = self.expiry
            if not self._streaming:
                if self.told or self._tell_at <= anyio.current_time() or expiry.cancel_called:
                    # An event stream cut at the expiry before its first event, whose app
                    # was told the client is gone or caught its cancellation: nothing goes
                    # out.
                    self.cut = self.told = True
                    raise _CutOffAtExpiryError(http=True)
                self._streaming = True
                if more:
                    return self._stream(message)
                # A body in one message: the work after it is not cut (an event stream's
                # deadline is armed from its start).
                self._deadline(math.inf)
                self._body_done = True
            elif not self.ended:
                # An empty last message only ends what went out in time: it goes out, the
                # expiry not asked (trio cancels a scope asked past its deadline).
                if (more or message.get("body")) and (
                    self.told or expiry.cancel_called or _expired(self._expires_at)
                ):
                    # Past the expiry, before the deadline reached the app (a busy loop), or
                    # from an app told the client is gone or that caught its cancellation:
                    # nothing more goes out. Told now that the client is gone, as the
                    # expiry tells it (not later than it was already).
                    self.cut = self.told = True
                    self._deadline(min(self._tell_at, anyio.current_time()))
                    raise _CutOffAtExpiryError(http=True)
                if not more:
                    # The body ends: its trailers or the work after it (background tasks)
                    # are not cut, unless the app was told the client is gone or was
                    # cancelled before (see below); one told keeps its cancellation due.
                    if not self.told:
                        self._deadline(math.inf)
                    self._body_done = True
        return super().__call__(message)

    async def _stream(self, message: MutableMapping[str, Any]) -> None:
        """Send the body's first message, which opens the stream, and arm the expiry: past
        it, once the message went out, for the app's next receive (an end sent before that
        sets it off: the answer went out whole); before it, already while it goes out (a
        client that stopped reading must not hold it past the expiry and the grace)."""
        left = self._arm()
        await super().__call__(message)
        if left is not None and left <= 0:
            # Not in the past: anyio cancels an asyncio scope given a past deadline at once,
            # and a receive waiting (a framework listening for the disconnect) would be
            # told the client is gone before the app's end, sent before it waits, came.
            self._deadline(anyio.current_time() + _LATE_STREAM_GRACE)

    def _forward(self, message: MutableMapping[str, Any]) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            events = False
            for name, value in message.get("headers") or ():
                lowered = name.lower()
                if lowered == b"content-length":
                    self._sized = True
                elif lowered == b"content-type":
                    events = value.partition(b";")[0].strip().lower() == b"text/event-stream"
            if events and not self._sized:
                # A server-sent event stream is a stream from its start: one waiting for
                # its first event (none yet, no ping) is cut at the expiry too.
                left = self._arm()
                if left is not None and left <= 0:
                    # Begun past the expiry: its start is its first message, and one waiting
                    # for its first event must not hold the expired credential until then.
                    self._deadline(anyio.current_time() + _LATE_STREAM_GRACE)
        return self._server(message)

    def _arm(self) -> float | None:
        """Tell the app the client is gone at the expiry (and cancel it after the grace),
        unless the expiry has passed already (the first body message still goes out then)
        or never comes; return the seconds left (``None``: never)."""
        left = _seconds_left(self._expires_at)
        if left is not None and left > 0:
            self._deadline(anyio.current_time() + left)
        return left

    def _deadline(self, at: float) -> None:
        """Tell the app the client is gone at ``at`` (on the loop's clock), and cancel it
        if it is still running ``grace`` seconds later."""
        self._tell_at = at
        _set_deadline(self.expiry, at + self._grace)
        for waiting in self._waiting:
            _set_deadline(waiting, at)

    async def _received_in_time(self) -> MutableMapping[str, Any]:
        """The app's ``receive``: past the expiry, it answers that the client is gone, as
        a server does once the client left (frameworks that run the view in tasks of
        their own cancel them then, and end; cancelling the app would leave them
        running)."""
        if not self.told and self._tell_at > anyio.current_time():
            with anyio.CancelScope() as waiting:
                _set_deadline(waiting, self._tell_at)
                self._waiting.add(waiting)
                try:
                    return await self._received()
                finally:
                    self._waiting.discard(waiting)
        else:
            await anyio.lowlevel.checkpoint()
        self.told = True
        return {"type": "http.disconnect"}

    async def end(self) -> None:
        """End the response cut at the expiry: an empty last body message (unless the app
        ended its body), then the trailers its start announced; nothing for a sized
        response or a client gone."""
        logger.info("ambient: ending a streamed response whose identity has expired")
        if not self._sized and not self.gone:
            if not self._body_done:
                end_body = {"type": "http.response.body", "body": b"", "more_body": False}
                await self._server(end_body)
            if self.trailers:
                # Announced in its start: without them the server never ends the response
                # (hypercorn leaves the HTTP/2 stream open). Not empty: h2 fails to send an
                # empty block, and hypercorn then leaves the stream open too.
                end = {"type": "http.response.trailers", "headers": self._echo}
                await self._server({**end, "more_trailers": False})

    def failure(self) -> AmbientError | None:
        # A stream told the client is gone is cut (see _stream_until_expiry): told or not,
        # the cut is what failed it.
        if self.cut:
            return _CutOffAtExpiryError(http=True)
        return super().failure()


def _number(value: object) -> int:
    """A status or close code the app sent as something other than an int, read as a
    server reads it (hypercorn takes ``int()`` of it: ``"200"`` goes out as a 200); 0 for
    one that no number is made of (``None``: the default, which no server refuses)."""
    try:
        number: int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return 0
    return number


def _tells_server_error(code: int) -> bool:
    """Whether a websocket close code says the server failed: 1011, or 4000 plus a 5xx
    status (as Litestar closes the socket of a handler that raised)."""
    low, high = _CLOSE_SERVER_ERRORS
    return code == _CLOSE_INTERNAL_ERROR or low <= code < high


def _seconds_left(expires_at: float) -> float | None:
    """Seconds until ``expires_at`` (negative once past), or, for an int no float holds,
    ``None`` (an expiry that never comes) or minus infinity (one long past)."""
    try:
        return expires_at - time.time()
    except OverflowError:
        return None if expires_at > 0 else -math.inf


def _expired(expires_at: float) -> bool:
    """Whether ``expires_at`` has passed, read as :func:`_seconds_left` reads it (the
    deadlines and the sends disagreed about an int no float holds)."""
    left = _seconds_left(expires_at)
    return left is not None and left <= 0


def _only_cut_off(error: BaseException, depth: int = 0) -> bool:
    """Whether ``error`` is the stream's cut-off error, alone or grouped (a task group in
    the framework's streamed response), or an error a framework raised from it once the
    response had started: Starlette's routing raises ``RuntimeError("Caught handled
    exception, but response already started.")`` from an error an exception handler
    matches (``install()``'s matches every ambient error), Litestar a
    ``LitestarException`` from the task group of its streamed response."""
    while depth < 8:  # a bounded walk down the explicit causes
        if isinstance(error, BaseExceptionGroup):
            _, rest = error.split(_leaf_cut_off(depth + 1))
            return rest is None
        if isinstance(error, _CutOffAtExpiryError):
            return True
        cause = error.__cause__
        if cause is None:
            return False
        error = cause
        depth += 1
    return False


def _leaf_cut_off(depth: int) -> Callable[[BaseException], bool]:
    """The test ``BaseExceptionGroup.split()`` applies to a group's leaves."""
    return lambda leaf: not isinstance(leaf, BaseExceptionGroup) and _only_cut_off(leaf, depth)


class _CutOffAtExpiryError(IncompleteResponseError):
    """What a websocket's or a streamed response's scope is closed with when its identity
    expired under it: its work was cut off, not finished, so cleanups must not take it for
    a clean end. Also what the app's ``send`` raises once its stream was ended."""

    def __init__(self, *, http: bool = False) -> None:
        super().__init__(started=True)
        what = "the streamed response" if http else "the websocket"
        self.args = (f"{what} was cut off when its identity expired",)


async def _stream_until_expiry(
    app: ASGIApp,
    scope: MutableMapping[str, Any],
    receive: Receive,
    stream: _Stream,
    end_within: float,
) -> None:
    """Run an HTTP request's app until its streamed body passes the identity's expiry (the
    stream's deadline, set when its body starts streaming; an idle stream too), then tell
    it the client is gone and cancel it if it has not returned within the stream's
    grace; a response cut there, or refused a message past the expiry, is ended once
    the app is out, with the trailers its start announced, so nothing the app sends while
    it unwinds can follow the end. The end waits at most ``end_within`` seconds for the
    server to take it: a client that stopped reading must not hold the request's
    components (the server then closes the connection of a response left unfinished). The
    app's error, the cut-off one included, propagates."""
    expiry = stream.expiry
    try:
        with expiry:
            await app(scope, receive, stream)
    finally:
        # Told the client is gone at the expiry, or cancelled after the grace, whether the
        # app let the cancellation out or swallowed it: cut there, also when it ended its
        # body (or all of it) after that. An end that came in time set the deadline off
        # before it could tell or cancel.
        if stream.told or expiry.cancel_called:
            stream.cut = True
        if stream.cut and not stream.ended:
            with _Deadline(end_within):
                await stream.end()


async def _serve_until_expiry(
    app: ASGIApp,
    scope: MutableMapping[str, Any],
    receive: Receive,
    socket: _Socket,
    expires_at: float,
    grace: float,
    close_within: float,
) -> bool:
    """Run a websocket's app until its identity expires; then tell it the client is gone
    (its ``receive`` answers ``websocket.disconnect``, as a server's does: frameworks that
    run the handler in tasks of their own end them), cancel it if it still runs ``grace``
    seconds later, close the socket with 4001, so that no message is handled for an
    identity no longer valid, and return ``True``. The close waits at most
    ``close_within`` seconds for the server to take it: a client that stopped reading must
    not hold the socket's components. A socket the app had not accepted yet is refused as
    any expired credential is (401)."""
    left = _seconds_left(expires_at)
    if left is None:
        await app(scope, receive, socket)
        return False
    tell_at = anyio.current_time() + left
    with anyio.CancelScope() as expiry:
        _set_deadline(expiry, tell_at + grace)

        async def receive_in_time() -> MutableMapping[str, Any]:
            if not socket.told:
                with anyio.CancelScope() as waiting:
                    _set_deadline(waiting, tell_at)
                    message = await receive()
                    if message["type"] == "websocket.disconnect":
                        # The client closed it: a close sent now would be refused (uvicorn
                        # raises).
                        socket.closed = True
                        return message
                    if time.time() < expires_at:
                        return message
                    # Past the deadline before the loop got to it (a busy loop, a receive
                    # that never yielded): the message must not reach the expired user's
                    # app.
            elif socket.disconnected:
                # Told once already: an app that receives on waits for its cancellation
                # rather than spin on the disconnect. On an event, not sleep_forever(): on
                # asyncio that is a timer due at infinity, holding the request's binding
                # in the loop's queue long after it was cancelled.
                await anyio.Event().wait()
            socket.told = socket.disconnected = True
            await anyio.lowlevel.checkpoint()
            return {
                "type": "websocket.disconnect",
                "code": CLOSE_IDENTITY_ENDED,
                "reason": _EXPIRED,
            }

        try:
            await app(scope, receive_in_time, socket)
        except Exception as exc:
            # Raised as the app ended on the disconnect it was told (Starlette's
            # WebSocketDisconnect), or as it was cancelled at the expiry: an error with an
            # answer (no database connection free) is answered with the expiry's close,
            # not its own, and one without is the expiry's end.
            socket.expired = expiry.cancel_called or socket.told
            if not socket.told or _answer_of(exc) is not None:
                raise
            logger.debug("ambient: a websocket's app raised as its identity expired: %r", exc)
        except BaseException:
            socket.expired = expiry.cancel_called or socket.told
            raise
    if not (expiry.cancelled_caught or socket.told):
        return False
    if not socket.started:
        # A close before accept is answered by servers with a bare 403: the client could not
        # tell "refresh your token" from "forbidden".
        msg = "the identity expired before the websocket was accepted"
        raise IdentityError(msg, status=401)
    if not socket.closed:
        logger.info("ambient: closing a websocket whose identity has expired")
        close = {"type": "websocket.close", "code": CLOSE_IDENTITY_ENDED, "reason": _EXPIRED}
        # A client that hung up as the app ended, its disconnect never received: the
        # server refuses the close (uvicorn's ClientDisconnected), with nobody to tell.
        with _Deadline(close_within), contextlib.suppress(OSError):
            await _Response.__call__(socket, close)
    return True


class _Refused(Exception):  # noqa: N818 - control flow, never escapes
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


def _answer_of(error: BaseException) -> AmbientError | None:
    """The :class:`~ambient.AmbientError` whose HTTP answer (e.g. 503) ``error`` raised by
    the app becomes, or ``None`` when it propagates.

    An exception group (an anyio or ``asyncio.TaskGroup`` around the work) is answered as
    its first error when every error in it, nested groups flattened, carries a status; a
    ``CleanupError`` never is (its members are failed cleanups, not answers).
    """
    if isinstance(error, BaseExceptionGroup):
        if isinstance(error, AmbientError):
            return None
        first: AmbientError | None = None
        for member in error.exceptions:
            answer = _answer_of(member)
            if answer is None:
                return None
            if first is None:
                first = answer
        return first
    if isinstance(error, AmbientError) and _carries_status(error):
        return error
    return None


def _of_request(binding: _Binding | None) -> bool:
    """Whether ``binding`` is, or shadows, the binding of an HTTP request's scope that an
    ``AmbientMiddleware`` opened (what a server copies into the next request's task)."""
    while binding is not None:
        resolver = binding.scope
        if resolver is not None and resolver.owner._others_after:
            return True
        binding = binding.prev
    return False


def _note_answered(error: BaseException) -> str | None:
    """Note on the bound request scope that the app answered ``error`` itself (a
    framework's exception handler did), so that the middleware closes the scope with it
    and cleanups see the failure, as when the error reaches the middleware.

    Returns the ``WWW-Authenticate`` challenge of the middleware's resolver, which a 401
    without a challenge of its own gets, as when the middleware answers it."""
    binding = _shown()
    resolver = binding.scope if binding is not None else None
    if resolver is None:
        return None
    scope = resolver.owner
    if scope.exception is None and not scope.closed:
        scope.exception = error
    state = scope._state
    challenge = None if state is None else state.get(_CHALLENGE_KEY)
    return challenge if isinstance(challenge, str) else None


def answer_error(error: BaseException) -> Problem | None:
    """Answer an error that a framework's exception handler caught, as the middleware
    answers one that reaches it; ``None`` when it is not an answer to a client.

    For the exception handler of a framework that answers a view's exception itself
    (Litestar's ``exception_handlers``, Quart's ``errorhandler``, Django's
    ``process_exception``; ``ambient.integrations.starlette`` registers one built on this).
    An :class:`~ambient.AmbientError` that carries an HTTP status (``IdentityError`` 400 or
    401, ``TooManyRequestsError`` 429, ``PoolExhaustedError`` 503, ``InvalidContextError``
    400) becomes its RFC 9457 problem, with its ``Retry-After`` and ``WWW-Authenticate``
    headers; a 401 without a challenge of its own gets the challenge of the middleware's
    resolver (``Bearer`` for ``jwt_bearer``). An exception group (a task group around the
    work) is answered as its first error when every error in it carries a status.

    The error is also noted on the request's scope, so that ``AmbientMiddleware`` closes
    the scope with it, as if it had answered it itself: cleanups see the failure and a
    transaction around a generator factory's ``yield`` rolls back instead of committing
    the work of a refused request. Call it where the request's context is bound (in the
    handler the framework runs for the request, or a thread that carries the context);
    elsewhere nothing is noted and a 401 gets no challenge but its own::

        answer = answer_error(error)
        if answer is None:
            raise error  # a bug: the framework's 500
        headers = {name.decode(): value.decode() for name, value in answer.headers}
        return answer.body(), answer.status, headers  # as application/problem+json

    Args:
        error: What the handler caught.

    Returns:
        The answer (``status``, ``headers``, ``body()``), or ``None`` for an error that
        carries no HTTP status (a bug: raise it again); nothing is noted then.
    """
    answer = _answer_of(error)
    if answer is None:
        return None
    challenge = _note_answered(error)
    problem = Problem.from_error(answer)._challenged(challenge)
    binding = _shown()
    _log_withheld(answer, problem, None if binding is None else binding.ctx.request_id)
    return problem


def note_failure(error: BaseException) -> None:
    """Note on the bound request's scope that the request failed with ``error``, which the
    framework caught and answered itself without letting it reach the middleware, so
    that cleanups see the failure (a transaction around a generator factory's ``yield``
    rolls back) and the scope's span records it.

    For what the middleware cannot tell from the wire: Quart closes the websocket of a
    handler that raised with 1000, a clean close; connect this to its
    ``got_websocket_exception`` signal. An error the framework answers with a 5xx needs
    none (the middleware reads the status), nor one that reaches the middleware. Call it
    where the request's context is bound; elsewhere, or once the scope has closed,
    nothing is noted. A first noted error is kept.

    Args:
        error: What the framework caught.
    """
    _note_answered(error)


def _problem(refusal: Exception) -> Problem:
    if isinstance(refusal, _Refused):
        return refusal.problem
    if isinstance(refusal, AmbientError):  # an InvalidContextError's value is never echoed
        return Problem.from_error(refusal)
    raise refusal  # pragma: no cover - only _Refused and answerable AmbientErrors come here


def _continued(
    identity: Identity, parent: UserExecutionContext, websocket: bool
) -> UserExecutionContext:
    """The context of a request that continues another run (see ``Identity.parent``)."""
    if (parent.user_id, parent.tenant_id) != (identity.user_id, identity.tenant_id):
        raise IdentityError("the identity and the context it continues name different users")
    metadata = {"claims": identity.claims} if identity.claims else {}
    ctx = parent.child("request", **metadata)
    if websocket:
        ctx = dataclasses.replace(ctx, connection_id=new_id())
    return ctx


def _route_path(scope: MutableMapping[str, Any]) -> str | None:
    """The path the app routes: ``scope["path"]`` less the ``root_path`` it starts with (a
    server's ``--root-path``, a mount's prefix), as Starlette's routers take it."""
    path = scope.get("path")
    if not isinstance(path, str):
        return None
    root_path = scope.get("root_path")
    if not root_path or not isinstance(root_path, str) or not path.startswith(root_path):
        return path
    rest = path[len(root_path) :]
    if not rest:
        return ""
    return rest if rest[0] == "/" else path


def _plain(path: str) -> bool:
    """Whether ``path`` has no ``.``, ``..`` or empty segment (but a trailing ``/``)."""
    segments = path.split("/")[1:]
    return "" not in segments[:-1] and "." not in segments and ".." not in segments


def _paths(paths: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """``anonymous_paths`` checked: the exact paths, and the prefixes (those ending in /)."""
    if isinstance(paths, str | bytes):
        msg = f"anonymous_paths must be a collection of paths, not one path {paths!r}"
        raise TypeError(msg)
    exact: set[str] = set()
    prefixes: list[str] = []
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/"):
            msg = f"anonymous_paths must hold paths starting with '/', not {path!r}"
            raise ValueError(msg)
        if not _plain(path):
            msg = f"anonymous_paths must hold plain paths, not {path!r} (a . or .. or // in it)"
            raise ValueError(msg)
        if any(char in path for char in "?#") or not path.isprintable():
            msg = f"anonymous_paths must hold paths without a query or fragment, not {path!r}"
            raise ValueError(msg)
        if path.endswith("/") and path != "/":
            prefixes.append(path)
        else:
            exact.add(path)
    return frozenset(exact), tuple(prefixes)


def _failed_while_serving(error: Exception) -> MutableMapping[str, Any]:
    """Log ``error``, with which the app's lifespan failed while the server served, and
    return the ``lifespan.shutdown.failed`` the server is to hear at its shutdown: the app's
    own shutdown never runs, as Starlette tells the server when its lifespan fails so."""
    logger.error(
        "ambient: the app's lifespan failed after its startup; requests go on, and the "
        "registry is closed at the server's shutdown",
        exc_info=error,
    )
    return {
        "type": "lifespan.shutdown.failed",
        "message": f"ambient: the app's lifespan failed after its startup: {error!r}",
    }


def _log_withheld(error: AmbientError, problem: Problem, request_id: str | None) -> None:
    """Log what the answer ``problem`` to ``error`` leaves out of its body: the message of
    a server error (5xx) or an overload (429), with its notes. It names what only the
    server may know (a backend's address, how long it has been down, a pool's settings).
    An unexpected server error is a warning with its traceback, as a server logs what it
    answers with a 500. An overload (429) or an unavailable backend (503) is information:
    it comes with every request while it lasts, and its source says so itself (the Redis
    backend logs the subscription it lost, jwt_bearer() the key set it cannot fetch)."""
    status = problem.status
    if not _withholds_detail(status):
        return
    notes = getattr(error, "__notes__", None)
    said = _readable(error)
    if said is None:
        said = "(its message could not be read: str() raised)"
    if notes:
        said += " (" + "; ".join(map(str, notes)) + ")"
    logger.log(
        logging.INFO if status in (_TOO_MANY, _UNAVAILABLE) else logging.WARNING,
        "ambient: answered request %s with %d, which does not tell the client: %s: %s",
        request_id,
        status,
        type(error).__name__,
        said,
        exc_info=error if status >= _SERVER_ERROR and status != _UNAVAILABLE else None,
    )


def _log_failures(failures: tuple[Exception, ...], ctx: UserExecutionContext) -> None:
    for failure in failures:
        logger.error(
            "ambient: a cleanup failed after the response was sent (request %s)",
            ctx.request_id,
            exc_info=failure,
        )
