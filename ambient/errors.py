"""Every exception and warning that ambient raises.

All errors derive from :class:`AmbientError`; where a builtin carries the same meaning the
error derives from it too (``LookupError`` for "nothing bound", ``ValueError`` for bad ids),
so ``except LookupError`` keeps working for code that never heard of ambient.

An error that maps to an HTTP answer carries it (``http_status``, ``retry_after``,
``problem_type``, ``title``, ``client_detail``); the middleware turns such an error into an
RFC 9457 ``application/problem+json`` response without knowing which integration raised it.
A refusal of the client's own request (4xx) tells it what was wrong with it: its message. A
failure on the server's side (5xx, and the overload answers 429 and 503) tells it only its
class's ``client_detail``: its message names what the client has no business knowing (a
backend's address, a pool's settings, an exception's text), and goes to the logs and the
trace instead.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import ClassVar

from ambient import _checks

__all__ = [
    "AmbientError",
    "AmbientWarning",
    "BroadcastError",
    "CleanupError",
    "CleanupTimeoutError",
    "ContextSwitchError",
    "GlobalStateError",
    "GlobalStateWarning",
    "IdentityError",
    "IdentityUnavailableError",
    "IncompleteResponseError",
    "InvalidContextError",
    "InvalidTokenError",
    "NoActiveContextError",
    "PoolExhaustedError",
    "RegistryError",
    "ResolutionError",
    "RowSecurityError",
    "RowSecurityWarning",
    "ScopeClosedError",
    "ServerErrorResponseError",
    "TooManyRequestsError",
    "UnsupportedBackendError",
]

_ECHO_LIMIT = 64


def _shorten(value: object) -> str:
    """Return ``repr(value)`` cut to at most 64 characters, for error messages."""
    text = repr(value)
    if len(text) > _ECHO_LIMIT:
        return text[: _ECHO_LIMIT - 3] + "..."
    return text


def _readable(error: BaseException) -> str | None:
    """``str(error)``, or ``None`` when it raises (a message built from an attribute the
    error lacks): said otherwise by each caller, never failing the caller."""
    try:
        return str(error)
    except Exception:  # noqa: BLE001 - the error's own fault, not the caller's to fail on
        return None


def _retry_after(value: float | None) -> float | None:
    """``value`` as a constructor's ``retry_after``, refused with a :class:`TypeError`
    naming it when it is no number (``None``: no Retry-After, as an AmbientError has)."""
    if value is not None:
        _checks.real(value, "retry_after")
    return value


# What the answer to an error reads from it, besides its message.
_ANSWER_ATTRIBUTES = (
    "http_status",
    "problem_type",
    "title",
    "client_detail",
    "retry_after",
    "challenge",
)


def _answer_refusal(name: str, value: object) -> TypeError | ValueError | None:
    """Why no answer can carry ``value`` as its error's ``name`` (one of
    ``_ANSWER_ATTRIBUTES``), as the error to raise, or ``None`` when one can: what the
    constructors refuse when given as an argument (a ``retry_after`` of no number, a
    ``challenge`` no header holds) and what no answer is made of (a status no error has, a
    title or detail of no text)."""
    if name == "http_status":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            return TypeError(
                f"http_status must be an int from 400 to 599 or None, not {value!r:.64}"
            )
        if not 400 <= value <= 599:
            return ValueError(f"http_status must be an int from 400 to 599 or None, not {value!r}")
        return None
    if name == "retry_after":
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            return TypeError(f"retry_after must be a number of seconds or None, not {value!r:.64}")
        return None
    if name == "challenge":
        if value is None:
            return None
        if not isinstance(value, str):
            return TypeError(f"challenge must be a str or None, not {value!r:.64}")
        if not value.strip() or not value.isascii() or not value.isprintable():
            return ValueError(f"challenge must be printable ASCII (a header), not {value!r:.64}")
        return None
    # problem_type, title, client_detail: text of the answer's body (and a close's reason)
    if not isinstance(value, str):
        return TypeError(f"{name} must be a str, not {value!r:.64}")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 holds it
        return ValueError(f"{name} must be text UTF-8 holds, not {value!r:.64}")
    return None


class AmbientError(Exception):
    """Root of every ambient error.

    Attributes:
        http_status: The HTTP status this error maps to, or ``None`` when it is not an
            answer to a client (most errors are programming errors and propagate).
        retry_after: Seconds for a ``Retry-After`` header, or ``None``.
        problem_type: The ``type`` URI of the problem+json body.
        title: The ``title`` of the problem+json body.
        client_detail: The ``detail`` of the problem+json body when ``http_status`` is a
            server error (5xx) or an overload (429): a sentence fit for any client, where
            the error's own message (the body's detail of a 4xx) is for the server's logs.
        challenge: The ``WWW-Authenticate`` challenge of the answer (RFC 9110: a 401
            carries one), e.g. ``Bearer error="invalid_token"``, or ``None``.

    A subclass's own values of these are checked when the class is made: a TypeError or
    ValueError naming the class and the attribute for an ``http_status`` that is no int
    from 400 to 599 (or ``None``), a ``retry_after`` of no number, a ``challenge`` that is
    no printable ASCII, a ``problem_type``, ``title`` or ``client_detail`` that is no text,
    instead of a request failing without its answer. One set on an error afterwards, which
    no answer can carry, is logged by the middleware, which answers with its class's value
    instead (no ``Retry-After``, no challenge, a 500 for no status of the class).
    """

    http_status: int | None = None
    problem_type: ClassVar[str] = "about:blank"
    title: ClassVar[str] = "Error"
    client_detail: ClassVar[str] = "the server could not carry out the request"
    retry_after: float | None = None
    challenge: str | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for name in _ANSWER_ATTRIBUTES:
            value = cls.__dict__.get(name, None)
            if name not in cls.__dict__ or hasattr(value, "__get__"):
                continue  # inherited (checked), or computed (a property): checked when answered
            refusal = _answer_refusal(name, value)
            if refusal is not None:
                raise type(refusal)(f"{cls.__qualname__}.{refusal}")

    def __reduce__(self) -> tuple[object, ...]:
        # Restored as it was, not by calling the constructor again with the message: most
        # subclasses build their message from other arguments than the one they pass on.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(
    cls: type[AmbientError], args: tuple[object, ...], state: dict[str, object]
) -> AmbientError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidContextError(AmbientError, ValueError):
    """A context id (or the context as a whole) failed validation.

    Attributes:
        field: The name of the offending field.
        reason: Why it was refused.
    """

    http_status = 400
    problem_type = "urn:ambient:problem:invalid-context"
    title = "Invalid request context"

    def __init__(self, field: str, reason: str, value: object = None, *, echo: bool = True) -> None:
        self.field = field
        self.reason = reason
        shown = f" (got {_shorten(value)})" if echo else ""
        super().__init__(f"{field} is invalid: {reason}{shown}")


class NoActiveContextError(AmbientError, LookupError):
    """No :class:`~ambient.UserExecutionContext` (or no scope) is bound here."""

    def __init__(self, what: str = "context", *, component: str = "") -> None:
        if what in ("USER", "APP"):
            # Asked inside the factory of a USER or APP component (named by ``component``).
            shared = (
                "by every request of its user: it receives a UserRef(user_id, tenant_id) "
                "to use instead (a factory taking one argument gets it)"
                if what == "USER"
                else "by every request of every user: it receives no context"
            )
            message = (
                f"no request context is bound inside the factory of {what} component "
                f"{component}: the component is shared {shared}. One request's ids would "
                "otherwise be baked into it. Its dependencies are still resolved with "
                "ambient.resolve() and resolve_sync()"
            )
        elif what == "scope":
            message = (
                "a context is bound but no component scope is: components are resolved from "
                "a scope opened by AmbientMiddleware or `registry.open_scope(ctx)`; "
                "`bind_context` alone binds only the context"
            )
        else:
            message = (
                "no user execution context is bound: one is bound by AmbientMiddleware for each "
                "request, by `registry.open_scope(ctx)` or `bind_context(ctx)` in jobs and tests, "
                "and carried into threads and callbacks by `ambient.wrap(fn)`"
            )
        super().__init__(message)


class ContextSwitchError(AmbientError, RuntimeError):
    """A context of another user was bound while one was already bound."""


class RegistryError(AmbientError, RuntimeError):
    """A registration was refused (duplicate key, frozen or closed registry, bad factory)."""


class ResolutionError(AmbientError, LookupError):
    """A component could not be resolved (unknown key, cycle, sync/async misuse)."""


class ScopeClosedError(AmbientError, RuntimeError):
    """A component was resolved from a scope that has already closed."""


class CleanupTimeoutError(AmbientError, TimeoutError):
    """An async cleanup did not finish within the registry's ``cleanup_timeout``."""


class CleanupError(ExceptionGroup[Exception], AmbientError):
    """One or more component cleanups failed; every other cleanup still ran.

    It is an :class:`ExceptionGroup` of the individual failures, so ``except*`` works.
    """

    def __new__(cls, message: str, exceptions: Sequence[Exception]) -> CleanupError:
        return super().__new__(cls, message, exceptions)

    def derive(self, excs: Sequence[Exception]) -> CleanupError:  # type: ignore[override]
        return CleanupError(self.message, excs)

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.message, list(self.exceptions))


class IdentityError(AmbientError):
    """The request carried a malformed identity (answered with 400, or 401 when missing).

    Attributes:
        status: 400 for a malformed identity, 401 for a missing or rejected one.
        challenge: The ``WWW-Authenticate`` challenge sent with the answer, e.g.
            ``Bearer error="invalid_token"`` (RFC 6750), or ``None``. A 401 without one
            gets the challenge of the middleware's resolver, when it has one.
    """

    problem_type = "urn:ambient:problem:identity"
    title = "Invalid identity"

    def __init__(self, detail: str, *, status: int = 400, challenge: str | None = None) -> None:
        if isinstance(status, bool) or not isinstance(status, int) or status not in (400, 401):
            # 400.0 equals 400, yet is no status: the answer's start and its body's status
            # would carry the float.
            msg = f"IdentityError status must be 400 or 401, not {status!r:.64}"
            raise ValueError(msg)
        if challenge is not None and (
            not isinstance(challenge, str)
            or not challenge.strip()
            or not challenge.isascii()
            or not challenge.isprintable()
        ):
            msg = f"IdentityError challenge must be printable ASCII (a header), not {challenge!r}"
            raise ValueError(msg)
        self.status = self.http_status = int(status)
        self.challenge = challenge
        super().__init__(detail)


class IdentityUnavailableError(AmbientError):
    """A credential could not be checked because what checks it is unavailable: the
    identity provider's key set (JWKS) could not be fetched or is unusable. Answered with
    503 and ``Retry-After``, not 401: the credential itself may be fine, and a client told
    it is not would drop it and sign in again for nothing."""

    http_status = 503
    problem_type = "urn:ambient:problem:identity-unavailable"
    title = "Identity check unavailable"
    client_detail = "the credential cannot be checked right now; try again later"

    def __init__(self, detail: str, *, retry_after: float = 5.0) -> None:
        self.retry_after = _retry_after(retry_after)
        super().__init__(detail)


class TooManyRequestsError(AmbientError):
    """A user has more requests in flight than the middleware allows (HTTP 429)."""

    http_status = 429
    problem_type = "urn:ambient:problem:too-many-requests"
    title = "Too many concurrent requests"
    client_detail = "this user has too many requests in flight; try again later"

    def __init__(self, detail: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = _retry_after(retry_after)
        super().__init__(detail)


class PoolExhaustedError(AmbientError):
    """No database connection became available in time (HTTP 503 with ``Retry-After``)."""

    http_status = 503
    problem_type = "urn:ambient:problem:pool-exhausted"
    title = "Service temporarily unavailable"
    client_detail = "no database connection is available right now; try again later"

    def __init__(self, detail: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = _retry_after(retry_after)
        super().__init__(detail)


class IncompleteResponseError(AmbientError):
    """A request's app returned without raising, but its response never completed.

    Most often the client disconnected and the framework cancelled the work and returned
    (Starlette's streamed responses below ASGI 2.4, Django, Quart); otherwise the app
    returned without finishing its answer. ``AmbientMiddleware`` closes the request's scope
    with it, so a cleanup that commits only on a clean exit rolls back instead of
    committing half a request. It is never raised to the server.

    Attributes:
        started: Whether the response had started (its status and headers were sent).
        client_gone: Whether the client was gone before the response ended (the app's
            ``receive`` said it disconnected, or its identity expired): work cut short,
            which telemetry records as a cancellation. ``False``: the app returned without
            finishing its answer while the client waited, which the server answers with a
            500 or by dropping the connection: an error.
    """

    def __init__(self, *, started: bool, client_gone: bool = True) -> None:
        self.started = started
        self.client_gone = client_gone
        if not client_gone:
            detail = (
                "the response was cut short: the app returned before its end, with the "
                "client still there"
                if started
                else "the request got no response: the app returned without answering, with "
                "the client still there"
            )
        elif started:
            detail = (
                "the response was cut short: its body never reached its end (the client "
                "disconnected before it, and the framework cancelled the stream, or the app "
                "never sent the last body message)"
            )
        else:
            detail = (
                "the request got no response: the app returned without answering (the client "
                "disconnected and the framework cancelled the work, or the app never answered)"
            )
        super().__init__(detail)


class ServerErrorResponseError(AmbientError):
    """A request's app answered with a server error (5xx) without raising.

    A framework's own error handling (Django's, Quart's, Litestar's, an exception handler)
    turned an exception into that answer before it reached ``AmbientMiddleware``, which
    closes the request's scope with this error: a 5xx tells the client the request was not
    carried out (it may retry), so what it wrote must not be committed. It is never raised
    to the server.

    Attributes:
        status: The response's HTTP status.
    """

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"the app answered the request with status {status} (a server error)")


class RowSecurityError(AmbientError, RuntimeError):
    """Row-level security would not protect a connection (the role is a superuser, has
    ``BYPASSRLS``, owns a table without ``FORCE ROW LEVEL SECURITY``...).

    Attributes:
        problems: One sentence per problem found.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            "row-level security would not protect this connection: " + "; ".join(problems)
        )


class InvalidTokenError(IdentityError):
    """A context token was refused (answered with 401 when it came with a request).

    Attributes:
        reason: ``"malformed"``, ``"foreign-key"`` (signed with a key this side does not
            have), ``"tampered"`` (the signature does not match), ``"expired"``,
            ``"not-yet-valid"``, ``"audience"``, ``"untrusted-peer"`` or ``"mismatch"``
            (a correlation header contradicts the token).
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail, status=401)


class BroadcastError(AmbientError, ConnectionError):
    """The event could not be handed to the delivery backend (Redis is unreachable).

    Raised to the sender, never swallowed: the event was not delivered anywhere. An HTTP
    request that lets it propagate is answered 503 with ``Retry-After`` by the middleware.
    """

    http_status = 503
    problem_type = "urn:ambient:problem:broadcast-unavailable"
    title = "Event delivery unavailable"
    client_detail = "events cannot be delivered right now; try again later"

    def __init__(self, detail: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = _retry_after(retry_after)
        super().__init__(detail)


class UnsupportedBackendError(AmbientError, RuntimeError):
    """An integration was used on an event loop its driver does not support (psycopg's
    async pool and redis-py's async client run on asyncio only, not on trio)."""


class GlobalStateError(AmbientError, RuntimeError):
    """A guarded legacy global was touched inside a user context in ``strict`` mode."""


class AmbientWarning(UserWarning):
    """Root of every ambient warning."""


class GlobalStateWarning(AmbientWarning):
    """A guarded legacy global was touched while a user context was bound."""


class RowSecurityWarning(AmbientWarning):
    """Row-level security would not protect a connection (``rls_check="warn"``)."""
