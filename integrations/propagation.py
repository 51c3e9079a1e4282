"""Carry a user's context to background jobs and to other services, signed.

A *context token* is a compact string holding the ids of a context (user, tenant, thread,
request, run, parent run and depth; never its metadata, but for the mark of an anonymous
caller's context), the time it was issued and when it expires, signed with HMAC-SHA256
under a secret every party shares. The secret comes from configuration: pass it
(``secret=``) or set ``AMBIENT_CONTEXT_SECRET`` in the environment; it must be at least 32
bytes (``python -c "import secrets; print(secrets.token_urlsafe(32))"``).
:class:`ContextSigner` also verifies tokens signed with previous secrets, for rotation.

Background jobs, with any queue::

    # in the request
    queue.put({"order": order_id, "context": capture()})

    # in the worker process
    async with restore(job["context"], registry=registry) as ctx:
        mailer = await ambient.resolve(Mailer)   # the user's components, then cleaned up

Service to service: the caller adds the signed context (plus ``x-request-id``,
``x-thread-id`` and the W3C ``traceparent``) to its outgoing requests, the callee accepts it
as an identity::

    # service A
    client = httpx.AsyncClient(
        event_hooks={"request": [async_inject_hook(hosts=["billing.internal"])]}
    )

    # service B
    app = AmbientMiddleware(app, registry=registry, identity=signed_context())

A token is a bearer credential until it expires: keep ``ttl`` short for calls (30 s by
default) and let only the services that need it hold the secret. The callee refuses tokens
that are tampered with, signed with another key, expired (replays past expiry included),
meant for another audience, or presented by a peer outside its ``trusted`` networks: 401.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from types import TracebackType
from typing import Any, Final, NamedTuple

from opentelemetry import propagate

from ambient import _checks
from ambient._binding import bind_context, current_context_or_none, get_current_context
from ambient._context import _EMPTY as _NO_METADATA
from ambient._context import ANONYMOUS, ReadOnlyDict, UserExecutionContext
from ambient._registry import Registry
from ambient._scope import Scope
from ambient.errors import IdentityError, InvalidContextError, InvalidTokenError
from ambient.middleware.identity import (
    Identity,
    IdentityResolver,
    _finite_seconds,
    _header_name,
    _networks,
    _peer_trusted,
    _PeerHints,
    header_values,
)

__all__ = [
    "HEADER",
    "SECRET_ENV",
    "ContextSigner",
    "InvalidTokenError",
    "Restored",
    "async_inject_hook",
    "capture",
    "inject",
    "inject_hook",
    "restore",
    "signed_context",
    "verify",
]

HEADER: Final = "x-ambient-context"
"""The request header carrying a context token between services."""

SECRET_ENV: Final = "AMBIENT_CONTEXT_SECRET"  # noqa: S105 - a variable name
"""The environment variable read when no secret is passed."""

MAX_TOKEN_LENGTH: Final = 4096
_VERSION: Final = "v1"
_MIN_SECRET_BYTES: Final = 32
_KID_LABEL: Final = b"ambient context key id"
_MAX_PAYLOAD: Final = 4000
# version . key id . payload . HMAC-SHA256 (32 bytes: 43 base64url characters, no padding)
_TOKEN: Final = re.compile(
    rf"v1\.[0-9a-f]{{8}}\.[A-Za-z0-9_-]{{1,{_MAX_PAYLOAD}}}\.[A-Za-z0-9_-]{{43}}"
)
_LOOPBACK: Final = ("127.0.0.1/32", "::1/128")
_ANONYMOUS: Final = ReadOnlyDict({ANONYMOUS: True})


def _ttl_seconds(ttl: object) -> float:
    """``ttl`` as a token's lifetime: seconds, finite and more than 0."""
    seconds = _checks.number(ttl, "ttl")
    # Finite too: an infinite ttl would make a token that never expires (and fail as an
    # OverflowError when signed).
    if not 0 < seconds <= sys.float_info.max:
        msg = f"ttl must be finite seconds > 0, not {str(ttl)[:64]}"
        raise ValueError(msg)
    return seconds


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Key:
    __slots__ = ("kid", "secret")

    def __init__(self, secret: str | bytes) -> None:
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if not isinstance(secret, bytes):
            msg = f"a context secret is str or bytes, not {type(secret).__name__}"
            raise TypeError(msg)
        if len(secret) < _MIN_SECRET_BYTES:
            msg = (
                f"a context secret must be at least {_MIN_SECRET_BYTES} bytes, not "
                f"{len(secret)}; generate one with secrets.token_urlsafe(32)"
            )
            raise ValueError(msg)
        self.secret = secret
        # Names the key in tokens without revealing anything about it: lets a verifier tell
        # "signed with a key I do not have" from "tampered with".
        self.kid = hmac.new(secret, _KID_LABEL, hashlib.sha256).hexdigest()[:8]

    def mac(self, signed: bytes) -> bytes:
        return hmac.new(self.secret, signed, hashlib.sha256).digest()


class ContextSigner:
    """Signs and verifies context tokens with HMAC-SHA256.

    Args:
        secret: The key new tokens are signed with (at least 32 bytes).
        previous: Other keys still accepted when verifying; one key or several. To
            rotate without refusing a token, deploy everywhere in turn
            ``ContextSigner(old, previous=new)`` (every service accepts the new key before
            any signs with it), then ``ContextSigner(new, previous=old)``, then, once the
            longest ``ttl`` in use has passed (queued jobs' tokens), ``ContextSigner(new)``.
        clock: Wall clock in seconds since the epoch (tokens cross processes and hosts).
        leeway: Seconds of clock skew tolerated between the issuer and the verifier.

    Raises:
        ValueError: a secret shorter than 32 bytes, or a leeway that is negative or not
            finite.
        TypeError: a leeway that is not a number of seconds.
    """

    __slots__ = ("_keys", "_signing", "clock", "leeway")

    def __init__(
        self,
        secret: str | bytes,
        *,
        previous: str | bytes | Iterable[str | bytes] = (),
        clock: Callable[[], float] = time.time,
        leeway: float = 5.0,
    ) -> None:
        # Finite, as jwt_bearer's: an infinite leeway honoured every token forever, and an
        # int past what a float holds failed every verification with an OverflowError.
        leeway = _finite_seconds(leeway, "leeway")
        clock = _checks.clock(clock)
        self._signing = _Key(secret)
        self._keys = {self._signing.kid: self._signing}
        # One key is a str or bytes, not an iterable of its characters (or of ints).
        for old in (previous,) if isinstance(previous, str | bytes) else previous:
            key = _Key(old)
            self._keys.setdefault(key.kid, key)
        self.clock = clock
        self.leeway = leeway

    @classmethod
    def from_env(cls, name: str = SECRET_ENV) -> ContextSigner:
        """A signer with the secret from the environment variable ``name``.

        Raises:
            LookupError: the variable is not set.
            ValueError: its value is shorter than 32 bytes.
        """
        secret = os.environ.get(name)
        if not secret:
            msg = (
                f"no context secret: pass secret=... or set the {name} environment variable "
                "(the same value in every service and worker that exchanges context tokens)"
            )
            raise LookupError(msg)
        return cls(secret)

    def sign(self, ctx: UserExecutionContext, *, ttl: float, audience: str | None = None) -> str:
        """A token of ``ctx`` valid for ``ttl`` seconds (for ``audience`` only, if given).

        Raises:
            ValueError: ``ttl`` is not finite and positive, or the context's ids are too
                long to carry in a token (about 3,000 bytes of UTF-8 together).
            TypeError: ``ttl`` is not a number of seconds.
        """
        ttl = _ttl_seconds(ttl)
        now = self.clock()
        claims: dict[str, Any] = {
            "u": ctx.user_id,
            "th": ctx.thread_id,
            "r": ctx.run_id,
            "q": ctx.request_id,
            "iat": math.floor(now),
            "exp": math.ceil(now + ttl),
        }
        if ctx.tenant_id is not None:
            claims["t"] = ctx.tenant_id
        if ctx.parent_run_id is not None:
            claims["p"] = ctx.parent_run_id
        if ctx.depth:
            claims["d"] = ctx.depth
        if audience is not None:
            claims["aud"] = audience
        if ctx.metadata.get(ANONYMOUS) is True:
            # Carried, or the context verified from the token would pass for a signed-in
            # user's (a ticket issued for it, its USER components kept after its request).
            claims["an"] = 1
        # UTF-8, not \u escapes: ids in other alphabets take a half to a third of the room.
        raw = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        payload = _b64encode(raw)
        if len(payload) > _MAX_PAYLOAD:
            # Refused here: every verifier would refuse the token as malformed.
            msg = (
                f"the context's ids are too long to carry in a context token ({len(raw)} "
                f"bytes of UTF-8, at most {_MAX_PAYLOAD * 3 // 4}): shorten the longest of "
                "user_id, tenant_id, thread_id, request_id, run_id and parent_run_id"
            )
            raise ValueError(msg)
        key = self._signing
        signed = f"{_VERSION}.{key.kid}.{payload}"
        return f"{signed}.{_b64encode(key.mac(signed.encode('ascii')))}"

    def verify(self, token: str, *, audience: str | None = None) -> UserExecutionContext:
        """The context a token was captured from (same run id, parent and depth).

        A token naming an audience is accepted only where that ``audience`` is expected.

        Raises:
            InvalidTokenError: the token is malformed, signed with an unknown key, tampered
                with, expired, not valid yet, or for another audience.
        """
        return self._verified(token, audience)[0]

    def _verified(self, token: str, audience: str | None) -> tuple[UserExecutionContext, float]:
        """:meth:`verify`, and the time (``clock()``'s) until which the token is honoured."""
        if (
            not isinstance(token, str)
            or len(token) > MAX_TOKEN_LENGTH
            or not _TOKEN.fullmatch(token)
        ):
            raise InvalidTokenError("malformed", "the context token is malformed")
        _, kid, payload, mac = token.split(".")
        key = self._keys.get(kid)
        if key is None:
            raise InvalidTokenError(
                "foreign-key",
                "the context token is signed with a key this service does not have",
            )
        expected = key.mac(f"{_VERSION}.{kid}.{payload}".encode("ascii"))
        # Compared in its canonical text form: no second spelling of a signature verifies.
        if not hmac.compare_digest(mac, _b64encode(expected)):
            raise InvalidTokenError(
                "tampered", "the context token's signature does not match its content"
            )
        # Only authenticated bytes are parsed.
        try:
            claims = json.loads(_b64decode(payload))
        except (binascii.Error, ValueError):
            raise InvalidTokenError("malformed", "the context token is malformed") from None
        return self._context(claims, audience)

    def _context(self, claims: object, audience: str | None) -> tuple[UserExecutionContext, float]:
        if not isinstance(claims, dict):
            raise InvalidTokenError("malformed", "the context token is malformed")
        issued, expires = claims.get("iat"), claims.get("exp")
        if type(issued) is not int or type(expires) is not int:
            raise InvalidTokenError("malformed", "the context token has no valid iat/exp")
        now = self.clock()
        if now > expires + self.leeway:
            ago = math.floor(now - expires)
            raise InvalidTokenError("expired", f"the context token expired {ago} s ago")
        if issued > now + self.leeway:
            raise InvalidTokenError(
                "not-yet-valid", "the context token is issued in the future (clock skew?)"
            )
        token_audience = claims.get("aud")
        if token_audience != audience:
            raise InvalidTokenError(
                "audience",
                "the context token is for another audience"
                if token_audience is not None
                else "the context token names no audience and one is required",
            )
        depth = claims.get("d", 0)
        anonymous = claims.get("an")
        if anonymous is not None and (type(anonymous) is not int or anonymous != 1):
            raise InvalidTokenError("malformed", "the context token's anonymous mark is not 1")
        try:
            context = UserExecutionContext(
                user_id=claims.get("u"),  # type: ignore[arg-type]  # validated by the class
                thread_id=claims.get("th"),  # type: ignore[arg-type]
                run_id=claims.get("r"),  # type: ignore[arg-type]
                request_id=claims.get("q"),  # type: ignore[arg-type]
                tenant_id=claims.get("t"),
                parent_run_id=claims.get("p"),
                depth=depth,
                metadata=_NO_METADATA if anonymous is None else _ANONYMOUS,
            )
        except InvalidContextError as exc:
            detail = f"the context token carries an invalid context: {exc.field}: {exc.reason}"
            raise InvalidTokenError("malformed", detail) from None
        return context, expires + self.leeway


def _signer(secret: str | bytes | ContextSigner | None) -> ContextSigner:
    if isinstance(secret, ContextSigner):
        return secret
    if secret is None:
        return ContextSigner.from_env()
    return ContextSigner(secret)


# -- background jobs --------------------------------------------------------------------------


def capture(
    ctx: UserExecutionContext | None = None,
    *,
    secret: str | bytes | ContextSigner | None = None,
    ttl: float = 3600.0,
    audience: str | None = None,
) -> str:
    """A signed token of the current context (or ``ctx``), to hand to a job or a service.

    Args:
        ctx: The context to capture (default: the one bound here).
        secret: The key, a :class:`ContextSigner`, or ``None`` for ``AMBIENT_CONTEXT_SECRET``.
        ttl: Seconds the token stays valid: how long a job may wait in its queue.
        audience: Restrict the token to verifiers expecting this audience.

    Raises:
        NoActiveContextError: no ``ctx`` and nothing bound here.
        ValueError: the context's ids are too long to carry in a token.
    """
    return _signer(secret).sign(
        get_current_context() if ctx is None else ctx, ttl=ttl, audience=audience
    )


def verify(
    token: str,
    *,
    secret: str | bytes | ContextSigner | None = None,
    audience: str | None = None,
) -> UserExecutionContext:
    """The context ``token`` was captured from, after checking signature, expiry, audience.

    Raises:
        InvalidTokenError: the token was refused (see :attr:`InvalidTokenError.reason`).
    """
    return _signer(secret).verify(token, audience=audience)


class Restored:
    """A verified context token, ready to bind: see :func:`restore`.

    Entered by one ``with`` (or ``async with``) at a time, as many times as wanted one after
    the other; entering it while it is in use raises :class:`RuntimeError`.

    Attributes:
        captured: The context the token was captured from.
        context: The context bound on entry: a child of ``captured`` (same user, tenant,
            thread and request; a new run whose parent is the captured run).
    """

    __slots__ = (
        "_allow_switch",
        "_binding",
        "_in_use",
        "_registry",
        "_scope",
        "captured",
        "context",
    )

    def __init__(
        self,
        captured: UserExecutionContext,
        operation: str,
        registry: Registry | None,
        allow_switch: bool,
    ) -> None:
        self.captured = captured
        self.context = captured.child(operation)
        self._registry = registry
        self._allow_switch = allow_switch
        self._binding: bind_context | None = None
        self._scope: Scope | None = None
        self._in_use = False

    def _take(self) -> None:
        # One binding or scope at a time: a second one, from another task, would replace
        # the first, which would then never be unbound or closed (nor its components
        # cleaned up).
        if self._in_use:
            msg = (
                "this restore() is already in use; use one `with` at a time, or one "
                "restore() per concurrent task"
            )
            raise RuntimeError(msg)
        self._in_use = True

    def __enter__(self) -> UserExecutionContext:
        if self._registry is not None:
            msg = "opening a scope on the registry is async: use `async with restore(...)`"
            raise TypeError(msg)
        self._take()
        try:
            binding = bind_context(self.context, allow_switch=self._allow_switch)
            ctx = binding.__enter__()
        except BaseException:
            self._in_use = False
            raise
        self._binding = binding
        return ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        binding, self._binding = self._binding, None
        try:
            if binding is not None:
                binding.__exit__(exc_type, exc, tb)
        finally:
            self._in_use = False

    async def __aenter__(self) -> UserExecutionContext:
        if self._registry is None:
            return self.__enter__()
        self._take()
        try:
            scope = self._registry.open_scope(self.context, allow_switch=self._allow_switch)
            await scope.__aenter__()
        except BaseException:
            self._in_use = False
            raise
        self._scope = scope
        return self.context

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope, self._scope = self._scope, None
        if scope is None:
            self.__exit__(exc_type, exc, tb)
            return
        try:
            await scope.__aexit__(exc_type, exc, tb)
        finally:
            self._in_use = False


def restore(
    token: str,
    *,
    secret: str | bytes | ContextSigner | None = None,
    registry: Registry | None = None,
    operation: str = "job",
    audience: str | None = None,
    allow_switch: bool = False,
) -> Restored:
    """Verify ``token`` and return a context manager that binds its context.

    ``with restore(token) as ctx:`` binds the context; ``async with restore(token,
    registry=registry) as ctx:`` also opens a scope on ``registry``, so the job resolves
    its own components and they are cleaned up when it ends. The bound context is a child
    of the captured one (``operation`` names it): the job keeps the user, tenant, thread
    and request ids and gets its own run, whose parent is the captured run.

    Raises:
        InvalidTokenError: tampered, expired, foreign-key or malformed token (raised here,
            before anything is bound).
    """
    captured = _signer(secret).verify(token, audience=audience)
    return Restored(captured, operation, registry, allow_switch)


# -- service to service -----------------------------------------------------------------------


def _set_header(headers: MutableMapping[str, str], name: str, value: str | None) -> None:
    """Set ``name`` to ``value`` (``None``: remove it), whatever the case of its spelling."""
    lowered = name.lower()
    for existing in [key for key in headers if key.lower() == lowered and key != name]:
        del headers[existing]
    if value is not None:
        headers[name] = value
    elif name in headers:
        del headers[name]


def inject(
    headers: MutableMapping[str, str],
    *,
    secret: str | bytes | ContextSigner | None = None,
    ttl: float = 30.0,
    audience: str | None = None,
    header: str = HEADER,
    request_id_header: str | None = "x-request-id",
    thread_id_header: str | None = "x-thread-id",
    trace: bool = True,
) -> MutableMapping[str, str]:
    """Add the current context to the headers of an outgoing request.

    Sets ``header`` to a signed token of the current context, the request and thread id
    headers (so the callee's middleware keeps them; :func:`signed_context` checks they
    match the token; an id that is not ASCII travels only in the token, and its header is
    removed), and with ``trace`` the W3C ``traceparent`` (and ``baggage``) of the
    current OpenTelemetry context through the globally configured propagator.

    Returns:
        ``headers``, changed in place.

    Raises:
        NoActiveContextError: nothing is bound here.
        ValueError: the context's ids are too long to carry in a token.
    """
    ctx = get_current_context()
    _set_header(headers, header, _signer(secret).sign(ctx, ttl=ttl, audience=audience))
    # An id that is not ASCII (a thread id may be any text) cannot go into a header that
    # httpx encodes as ASCII; the token carries it, and the callee takes it from there. A
    # header already there goes: it names another request or thread (headers forwarded
    # from the incoming request, a dict used before), which the callee refuses.
    for name, value in ((request_id_header, ctx.request_id), (thread_id_header, ctx.thread_id)):
        if name:
            _set_header(headers, name, value if value.isascii() else None)
    if trace:
        propagate.inject(headers)
    return headers


def _parse_host(entry: str) -> tuple[str, int | None]:
    if not isinstance(entry, str) or not entry:
        msg = (
            f"a host is a non-empty str like 'billing.internal' or '127.0.0.1:8001', not {entry!r}"
        )
        raise ValueError(msg)
    host, port = entry, ""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            # "[::1" or "[::1]8001": a typo the hook would otherwise read as a host.
            msg = f"the host {entry!r} is not '[address]' or '[address]:port'"
            raise ValueError(msg)
        port = rest[1:]
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    if not host:
        msg = f"the host {entry!r} names no host, only a port"
        raise ValueError(msg)
    if port and not (port.isascii() and port.isdigit()):
        msg = f"the port in host {entry!r} is not a number"
        raise ValueError(msg)
    return host.lower(), int(port) if port else None


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


_INJECTED: Final = "ambient.injected"
"""The request extension where each hook notes the headers it set: httpx hands a request's
extensions to the request that follows its redirect, and builds that one's headers from it."""


class _Noted(MutableMapping[str, str]):
    """Headers that note the values set in them (by :func:`inject` and the propagator)."""

    __slots__ = ("headers", "set")

    def __init__(self, headers: MutableMapping[str, str]) -> None:
        self.headers = headers
        self.set: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        return self.headers[name]

    def __setitem__(self, name: str, value: str) -> None:
        self.headers[name] = value
        self.set[name.lower()] = value

    def __delitem__(self, name: str) -> None:
        del self.headers[name]
        self.set.pop(name.lower(), None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.headers)

    def __len__(self) -> int:
        return len(self.headers)


class _Injected(NamedTuple):
    """What one hook set on one request."""

    request: weakref.ref[Any]
    headers: dict[str, str]


def _note(request: Any, key: object, injected: _Injected | None) -> None:
    records = {k: v for k, v in request.extensions.get(_INJECTED, {}).items() if k is not key}
    if injected is not None:
        records[key] = injected
    # A new dict, never a change to the old one: httpx may share it between requests (the
    # redirect's with the one before; the application's own dict between its calls), and a
    # note on a request to a third party would then name its headers as ours.
    request.extensions = {**request.extensions, _INJECTED: records}


def inject_hook(
    *,
    hosts: Iterable[str],
    secret: str | bytes | ContextSigner | None = None,
    ttl: float = 30.0,
    audience: str | None = None,
    header: str = HEADER,
) -> Callable[[Any], None]:
    """An httpx request event hook that calls :func:`inject` for requests to ``hosts``.

    For ``httpx.Client(event_hooks={"request": [inject_hook(hosts=[...])]})``; use
    :func:`async_inject_hook` with ``httpx.AsyncClient``. Requests sent outside any
    context go out unchanged; requests to other hosts go out without the context: the
    token is a credential, the ids and the W3C ``baggage`` (which may hold the user's and
    the tenant's ids, see ``Telemetry(baggage=...)``) are the user's, and a client shared
    with third-party APIs must not hand them out.

    When an allowed host answers with a redirect to another host, httpx builds the next
    request from the headers of the last one (it drops only ``Authorization``): on that
    request the hook takes off every header it set (the token, ``x-request-id``,
    ``x-thread-id``, ``traceparent``, ``baggage``) that still holds the value it set. A
    redirect to an allowed host gets them all afresh, one past another host included.
    Headers the application sets itself on a request to another host go out as they are,
    except ``header``: a token goes to no other host, whoever put it there, but for one
    that another inject hook on the client set on that request for a host of its own
    (hooks for several services, each with its ``audience``, may share the header).

    Args:
        hosts: The services that may receive the context: ``"billing.internal"`` (any
            port), ``"127.0.0.1:8001"``, ``"[::1]:8001"``.
        secret: As for :func:`capture`.
        ttl: Token lifetime in seconds.
        audience: The audience the callee expects, if any.
        header: The header carrying the token.

    Raises:
        ValueError: no host, a host that is not ``name`` or ``name:port``, a ``header``
            that is not an HTTP token, or a ``ttl`` that is not finite and positive.
        TypeError: a ``ttl`` that is not a number of seconds.
    """
    allowed = [_parse_host(entry) for entry in ([hosts] if isinstance(hosts, str) else hosts)]
    _header_name(header, "header")
    # Here, not at the first request: every request to the hosts would fail on it.
    _ttl_seconds(ttl)
    if not allowed:
        msg = "inject_hook() needs at least one host that may receive the signed context"
        raise ValueError(msg)
    signer = _signer(secret)
    # Names this hook's notes: a client may have hooks for other hosts, whose headers are
    # theirs to take off.
    key = object()

    def hook(request: Any) -> None:
        url = request.url
        host = str(url.host).lower()
        port = url.port or _DEFAULT_PORTS.get(url.scheme)
        noted: dict[object, _Injected] = request.extensions.get(_INJECTED, {})
        mine = noted.get(key)
        if not any(host == name and (wanted is None or wanted == port) for name, wanted in allowed):
            # A value another hook set on this very request, for a host of its own, stays:
            # its token too, under the same header name.
            theirs = {
                item
                for other in noted.values()
                if other.request() is request
                for item in other.headers.items()
            }
            if mine is not None:
                # Redirected here from an allowed host: what the hook set there must not
                # follow (httpx drops only Authorization across origins).
                for name, value in mine.headers.items():
                    if request.headers.get(name) == value and (name, value) not in theirs:
                        del request.headers[name]
                _note(request, key, None)
            token = request.headers.get(header)
            if token is not None and (header.lower(), token) not in theirs:
                del request.headers[header]
            return
        if current_context_or_none() is not None:
            headers = _Noted(request.headers)
            inject(headers, secret=signer, ttl=ttl, audience=audience, header=header)
            # What it set at an earlier allowed host, and did not set again here, is still
            # its own to take off if the redirects go on elsewhere.
            earlier = {} if mine is None else mine.headers
            kept = {name: value for name, value in earlier.items() if headers.get(name) == value}
            _note(request, key, _Injected(weakref.ref(request), kept | headers.set))

    return hook


def async_inject_hook(
    *,
    hosts: Iterable[str],
    secret: str | bytes | ContextSigner | None = None,
    ttl: float = 30.0,
    audience: str | None = None,
    header: str = HEADER,
) -> Callable[[Any], Awaitable[None]]:
    """:func:`inject_hook` for ``httpx.AsyncClient`` (whose hooks are awaited)."""
    sync_hook = inject_hook(hosts=hosts, secret=secret, ttl=ttl, audience=audience, header=header)

    async def hook(request: Any) -> None:
        sync_hook(request)

    return hook


def signed_context(
    secret: str | bytes | ContextSigner | None = None,
    *,
    trusted: Iterable[str] = _LOOPBACK,
    audience: str | None = None,
    header: str = HEADER,
    request_id_header: str | None = "x-request-id",
    thread_id_header: str | None = "x-thread-id",
) -> IdentityResolver:
    """Identity resolver accepting the signed context another service sent (see
    :func:`inject`).

    A request without the header has no identity from this resolver (combine it with
    others in :func:`~ambient.middleware.identity.first_of`). A token that is tampered
    with, signed with an unknown key, expired or for another audience, a token from a
    peer outside ``trusted`` (the peer that connected: a client address the server read
    from ``X-Forwarded-For`` or ``Forwarded`` does not count, see
    :func:`~ambient.middleware.identity.trusted_header`), and request or thread id headers
    that contradict the token are all refused with 401; a repeated header (the token's,
    the request id's or the thread id's) is malformed, 400. The request's context
    continues the caller's: same user, tenant, thread and request ids, a new run whose
    parent is the caller's run.

    Args:
        secret: As for :func:`capture`; read once, when the resolver is built.
        trusted: Networks (CIDR) of the services allowed to present a signed context, and
            ``"unix"`` for those connecting through the server's Unix domain socket.
        audience: The audience this service expects in tokens, if any.
        header: The header carrying the token.
        request_id_header: The middleware's request id header, checked against the token.
        thread_id_header: The middleware's thread id header, checked against the token.

    Raises:
        LookupError: no secret given and ``AMBIENT_CONTEXT_SECRET`` is not set.
        ValueError: a secret shorter than 32 bytes, a network that is not CIDR, or none; a
            header name that is not an HTTP token (no request could carry it).
    """
    signer = _signer(secret)
    networks = _networks(trusted)
    _header_name(header, "header")
    if request_id_header is not None:
        _header_name(request_id_header, "request_id_header")
    if thread_id_header is not None:
        _header_name(thread_id_header, "thread_id_header")
    hints = _PeerHints("signed_context()")

    def resolve(scope: Mapping[str, Any]) -> Identity | None:
        values = header_values(scope, header)
        if not values:
            return None
        if len(values) > 1:
            # Malformed, not unauthenticated: never "first wins" (as RFC 6750 for bearer).
            raise IdentityError(f"the {header} header was sent {len(values)} times", status=400)
        if not hints.admits(scope, peer_trusted=_peer_trusted(scope, networks)):
            raise InvalidTokenError(
                "untrusted-peer", "a signed context is accepted only from trusted services"
            )
        caller, honoured_until = signer._verified(values[0].decode("latin-1"), audience)
        for name, expected in (
            (request_id_header, caller.request_id),
            (thread_id_header, caller.thread_id),
        ):
            if name is None:
                continue
            sent = header_values(scope, name)
            if len(sent) > 1:
                # Malformed, as the token's header sent twice (and the middleware's thread
                # id): not "does not match" when every copy may match.
                raise IdentityError(f"the {name} header was sent {len(sent)} times", status=400)
            if sent and sent != [expected.encode("utf-8")]:
                raise InvalidTokenError(
                    "mismatch", f"the {name} header does not match the signed context"
                )
        # A websocket it opens is closed (4001) when the token would no longer be honoured.
        return Identity(caller.user_id, caller.tenant_id, parent=caller, expires_at=honoured_until)

    return resolve
