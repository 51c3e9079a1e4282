"""``ambient check``: drive many concurrent simulated users through an ASGI app in process and
report isolation violations, cleanup completeness, leaks, memory growth and latency.

Components are seen through the core's observer hook (an :class:`~ambient.testing.IsolationProbe`),
so no registry needs to be named. Every simulated user has a unique id (with tenants, unique
within its tenant); a response or a log record made for one user that carries another simulated
user's id, or another tenant's, is a violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import math
import re
import secrets
import statistics
import threading
import time
import traceback
import tracemalloc
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    MutableMapping,
    Sequence,
)
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from ambient import _checks, _probe, add_observer, current_context_or_none
from ambient._context import UserRef
from ambient._observe import ComponentEvent, Observer
from ambient.errors import _readable

__all__ = [  # noqa: RUF022 - sorted as sorted() sorts, which test_all_attributes checks
    "CheckReport",
    "JWTIdentity",
    "JWT_ALGORITHMS",
    "PlannedRequest",
    "parse_request",
    "run_check",
]

ASGIApp = Callable[..., Awaitable[None]]
Progress = Callable[[int, int], None]

_MAX_SHOWN = 20

#: The algorithms a :class:`JWTIdentity` signs with.
JWT_ALGORITHMS = (
    *("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    *("ES256", "ES384", "ES512", "EdDSA"),
)

# What one process can drive: every simulated user is a task in flight at once, and every
# request keeps its latency and what the probe saw of it until the report is made (about
# 30 KiB per user of the demo and 1 KiB per request): a check stays within about a GiB.
_MAX_USERS = 10_000
_MAX_REQUESTS = 10_000
_MAX_TOTAL_REQUESTS = 1_000_000

# Filled, while a simulated request runs, with the user its first scope was opened for and
# whether that context was an anonymous one.
_served: ContextVar[list[tuple[UserRef, bool]] | None] = ContextVar("_served", default=None)
# The simulated user a request, or socket, is sent for, while the app serves it.
_simulating: ContextVar[UserRef | None] = ContextVar("_simulating", default=None)


class _StartupError(RuntimeError):
    """The app's lifespan startup failed or never answered: there is no app to check."""


class _ServedAs(Observer):
    """Notes whom each simulated request was served as: without it a check whose requests
    all fell back to anonymous users, or were read as one user, would find no data of
    another and pass."""

    def scope_opened(self, scope: Any) -> None:
        note = _served.get()
        if note is not None and not note:
            ctx = scope.context
            user = UserRef(ctx.user_id, ctx.tenant_id)
            note.append((user, ctx.metadata.get("anonymous") is True))


class _CleanupFailures(Observer):
    """Notes the cleanups that raised, timed out or were cut short: the registry logs them
    and goes on, so a check that only counted the cleanups run would pass an app whose
    every cleanup fails (a connection never given back, a file never closed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failed: dict[str, tuple[int, str]] = {}  # component -> (count, first error)

    def component_cleaned(self, event: ComponentEvent) -> None:
        error = event.error
        if error is None:
            return
        with self._lock:
            count, first = self.failed.get(event.name, (0, _said(error)))
            self.failed[event.name] = (count + 1, first)

    def findings(self) -> list[str]:
        with self._lock:
            failed = sorted(self.failed.items())
        return [
            f"{name}: {count} cleanup(s) failed (the first: {first[:160]})"
            for name, (count, first) in failed
        ]


@dataclass(frozen=True)
class JWTIdentity:
    """Simulated users presenting signed JWTs (``Authorization: Bearer <jwt>``), as an app
    behind :func:`~ambient.middleware.identity.jwt_bearer` reads them (extra ``jwt``).

    Each user's token has ``sub`` (the user's id), ``iat`` and ``exp`` (``lifetime`` seconds
    later; a user's token is made anew once half of that has passed, so a run may last
    longer), ``aud`` and ``iss`` when given, and the user's tenant id in ``tenant_claim``
    when the check simulates tenants. Tokens are signed with ``algorithm``: HS256 (the
    default) and the other HMAC ones with ``secret`` as the shared secret; RS, PS, ES and
    EdDSA ones with ``secret`` as a PEM private key, whose public key (or a key set holding
    it, then named by ``key_id``, the tokens' ``kid``) the app verifies them with. The secret
    is never shown (not in the ``repr`` either), nor are the tokens.

    Raises:
        ValueError: An empty secret, one PyJWT cannot sign ``algorithm``'s tokens with (a
            public key, or a private key of another kind), an algorithm not listed above,
            an empty audience, issuer, key id or tenant claim, or a lifetime that is not
            more than 0 seconds.
        ImportError: PyJWT is not installed.
    """

    secret: str | bytes = field(repr=False)
    audience: str | None = None
    issuer: str | None = None
    lifetime: float = 900.0
    tenant_claim: str = "tenant_id"
    algorithm: str = "HS256"
    key_id: str | None = None
    # The secret as PyJWT signs with it: a private key is read once, not for every token.
    _key: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if not self.secret:
            msg = "the JWT secret is empty"
            raise ValueError(msg)
        if self.algorithm not in JWT_ALGORITHMS:
            known = ", ".join(JWT_ALGORITHMS)
            msg = f"the JWT algorithm must be one of {known}, not {self.algorithm!r}"
            raise ValueError(msg)
        if not self.tenant_claim:
            msg = "the JWT tenant claim must be a non-empty string"
            raise ValueError(msg)
        named = (("audience", self.audience), ("issuer", self.issuer), ("key id", self.key_id))
        for name, value in named:
            if value is not None and not value:
                msg = f"the JWT {name} must be a non-empty string or None"
                raise ValueError(msg)
        if not 0 < self.lifetime < float("inf"):
            msg = f"the JWT lifetime must be more than 0 seconds, not {self.lifetime}"
            raise ValueError(msg)
        import jwt

        try:
            key = jwt.get_algorithm_by_name(self.algorithm).prepare_key(self.secret)
        except (jwt.InvalidKeyError, ValueError, TypeError):
            raise ValueError(self._unusable()) from None
        object.__setattr__(self, "_key", key)
        self.token("check-secret-test")  # a key PyJWT reads but cannot sign with (a public one)

    def _unusable(self) -> str:
        # Said without PyJWT's message, which may quote the secret.
        if self.algorithm.startswith("HS"):
            secret = self.secret if isinstance(self.secret, str) else self.secret.decode("latin-1")
            if "PRIVATE KEY-----" in secret:
                return (
                    f"the JWT secret cannot sign {self.algorithm} tokens: it is a PEM private "
                    "key, which signs RS, PS, ES or EdDSA tokens"
                )
            return f"the JWT secret cannot sign {self.algorithm} tokens (is it a public key?)"
        return (
            f"the JWT secret cannot sign {self.algorithm} tokens: it must be a PEM private "
            "key of that algorithm's kind"
        )

    def token(self, user: str, tenant: str | None = None) -> str:
        """A token for ``user`` (of ``tenant``), valid from now for ``lifetime`` seconds."""
        import jwt

        now = int(time.time())
        claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + math.ceil(self.lifetime)}
        if tenant is not None:
            claims[self.tenant_claim] = tenant
        if self.audience is not None:
            claims["aud"] = self.audience
        if self.issuer is not None:
            claims["iss"] = self.issuer
        headers = None if self.key_id is None else {"kid": self.key_id}
        try:
            return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)
        except (jwt.InvalidKeyError, AttributeError, TypeError, ValueError):
            raise ValueError(self._unusable()) from None


@dataclass(frozen=True)
class PlannedRequest:
    """One request a simulated user sends; ``{user}`` in the path or body is replaced by
    the user's id, ``{tenant}`` by their tenant's (empty without tenants)."""

    method: str = "GET"
    path: str = "/"
    body: str | None = None


def parse_request(text: str) -> PlannedRequest:
    """Parse ``"GET /path"`` or ``'POST /path {"json": "body"}'``."""
    parts = text.strip().split(" ", 2)
    if len(parts) == 1:
        parts.insert(0, "GET")
    method, path = parts[0].upper(), parts[1]
    if not path.startswith("/"):
        msg = f"request {text!r}: the path must start with '/'"
        raise ValueError(msg)
    body = parts[2] if len(parts) == 3 else None
    if body is not None:
        try:  # as it is sent: {user} replaced by a user's id, as application/json
            json.loads(_filled(body, UserRef("check-00000-000000", "check-tenant-00000-000000")))
        except ValueError:
            msg = f"request {text!r}: the body is not JSON (it is sent as application/json)"
            raise ValueError(msg) from None
        except RecursionError:  # the whole body would be no help in the message
            msg = f"request {method} {path}: the body's JSON is nested too deeply to be read"
            raise ValueError(msg) from None
    return PlannedRequest(method, path, body)


@dataclass
class CheckReport:
    """The outcome of :func:`run_check`.

    ``ok`` is true only when there was no violation and no leak. ``tokens_refused`` counts
    the requests whose JWT (a :class:`JWTIdentity`) the app refused with 401. ``tenants``
    is how many tenants the users were spread over (0: users of no tenant);
    ``websockets`` how many sockets were held open (one per user, with ``websocket``) and
    ``websocket_frames`` the frames the app sent on them. ``memory_growth_kib_per_1k`` is
    ``None`` when the memory phase was skipped (``growth_requests=0``), as
    ``middleware_overhead_us`` is without its measurement.
    """

    app: str
    users: int
    requests: int
    tenants: int = 0
    websockets: int = 0
    websocket_frames: int = 0
    isolation: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    cleanup: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    components_created: int = 0
    components_cleaned: int = 0
    scopes: int = 0
    memory_growth_kib_per_1k: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    throughput_rps: float = 0.0
    middleware_overhead_us: float | None = None
    global_state_accesses: dict[str, Any] = field(default_factory=dict)
    tokens_refused: int = 0

    @property
    def violations(self) -> list[str]:
        """Every problem found (isolation, failed requests, cleanup, leaks)."""
        return [*self.isolation, *self.failed_requests, *self.cleanup, *self.leaks]

    @property
    def ok(self) -> bool:
        """No violation and no leak."""
        return not self.violations

    def to_json(self) -> str:
        """The report as JSON (for CI)."""
        data = asdict(self)
        data["ok"] = self.ok
        return json.dumps(data, indent=2, sort_keys=True)


class _Driver:
    """Calls an ASGI app in process with synthetic scopes."""

    def __init__(
        self,
        app: ASGIApp,
        identity: tuple[str, str] | JWTIdentity,
        time_limit: float | None = None,
        tenant_header: str = "x-tenant-id",
    ) -> None:
        self.app = app
        self.identity = identity
        self.tenant_header = tenant_header.lower().encode()
        # user -> (their token, when to make it anew), with a JWTIdentity.
        self._tokens: dict[UserRef, tuple[str, float]] = {}
        self.time_limit = time_limit
        # The lifespan scope's state, which the app's startup may fill: each request's and
        # socket's scope gets a shallow copy of it, as servers give it.
        self.state: dict[str, Any] = {}
        self.shutdown_unanswered = False
        # What went wrong in the app's lifespan shutdown, said in one line.
        self.shutdown_failed: str | None = None

    def token(self, user: UserRef) -> str | None:
        """The JWT ``user`` presents now, or ``None`` without a :class:`JWTIdentity`."""
        identity = self.identity
        if not isinstance(identity, JWTIdentity):
            return None
        now = time.time()
        made = self._tokens.get(user)
        if made is None or now >= made[1]:
            made = (identity.token(user.user_id, user.tenant_id), now + identity.lifetime / 2)
            self._tokens[user] = made
        return made[0]

    def _headers(self, user: UserRef, body: bytes | None) -> list[tuple[bytes, bytes]]:
        # The host a local client of the server in the scope names: an app that checks it
        # (Django's ALLOWED_HOSTS, Starlette's TrustedHostMiddleware) serves it in development.
        headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"ambient-check")]
        if isinstance(self.identity, JWTIdentity):
            headers.append((b"authorization", f"Bearer {self.token(user)}".encode()))
            kind = name = ""
        else:
            kind, name = self.identity
        if kind == "header":
            headers.append((name.lower().encode(), user.user_id.encode()))
            if user.tenant_id is not None:
                headers.append((self.tenant_header, user.tenant_id.encode()))
        elif kind == "bearer":
            headers.append((b"authorization", f"Bearer {user.user_id}".encode()))
        if body is not None:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
        return headers

    async def request(
        self,
        user: UserRef,
        planned: PlannedRequest,
        served: list[tuple[UserRef, bool]] | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> tuple[int, bytes, float]:
        """Send one request; return its status, body and duration (status 0 and what went
        wrong instead of a body when there was no whole response). The response's headers
        are added to ``headers`` when given."""
        body = _filled(planned.body, user).encode() if planned.body else None
        scope = self.scope("http", user, planned.path, body)
        scope["method"] = planned.method
        sent_body = False
        done = anyio.Event()
        status = 0
        finished = False
        chunks: list[bytes] = []

        async def receive() -> MutableMapping[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body or b"", "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status, finished
            _refuse_malformed(message)
            if message["type"] == "http.response.start":
                status = message["status"]
                if headers is not None:
                    headers.extend(message.get("headers", ()))
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    finished = True
                    done.set()

        started = time.perf_counter()
        token = _served.set(served)
        simulating = _simulating.set(user)
        try:
            if self.time_limit is None:
                await self.app(scope, receive, send)
            else:
                with anyio.move_on_after(self.time_limit) as waited:
                    await self.app(scope, receive, send)
                if waited.cancel_called and not finished:
                    done.set()
                    said = f"no whole response within {self.time_limit:g} s"
                    return 0, said.encode(), time.perf_counter() - started
        # SystemExit too, as servers take it: an app's sys.exit() would end the check with
        # its status (0 often) and no report.
        except BaseException as exc:
            if not _app_error(exc):
                raise
            done.set()
            return 500, _said(exc).encode(), time.perf_counter() - started
        finally:
            _simulating.reset(simulating)
            _served.reset(token)
        done.set()
        elapsed = time.perf_counter() - started
        if not status:
            return 0, b"the app returned without answering", elapsed
        if not finished:
            return 0, b"the app returned before its response body ended", elapsed
        return status, b"".join(chunks), elapsed

    def scope(
        self, kind: str, user: UserRef, path: str, body: bytes | None = None
    ) -> dict[str, Any]:
        """A scope of ``kind`` (``http`` or ``websocket``) of ``user``'s at ``path``."""
        raw_path, _, query = _filled(path, user).partition("?")
        scope: dict[str, Any] = {
            "type": kind,
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "ws" if kind == "websocket" else "http",
            "path": raw_path,
            "raw_path": raw_path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": self._headers(user, body),
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
            "state": dict(self.state),
        }
        if kind == "websocket":
            scope["subprotocols"] = []
            scope["extensions"] = {"websocket.http.response": {}}
        return scope

    def tenant_source(self) -> str:
        """Where a simulated user's tenant id is, said for a finding."""
        if isinstance(self.identity, JWTIdentity):
            return (
                f"the tokens' {self.identity.tenant_claim!r} claim (--tenant-claim names another)"
            )
        return f"the {self.tenant_header.decode()} header (--tenant-header names another)"

    def shutdown_findings(self) -> list[str]:
        """What went wrong in the app's lifespan shutdown, one line each."""
        if self.shutdown_unanswered:
            return [f"the app's shutdown did not answer within {self.time_limit:g} s"]
        return [] if self.shutdown_failed is None else [self.shutdown_failed]

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[list[bool]]:
        """Run the app's lifespan around the block; ``[True]`` once shutdown completed."""
        shut_down = [False]
        to_app, app_inbox = anyio.create_memory_object_stream[dict[str, Any]](4)
        from_app, inbox = anyio.create_memory_object_stream[dict[str, Any]](4)

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            task_status.started()
            scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
            try:
                await self.app(scope, app_inbox.receive, from_app.send)
            except BaseException as error:
                if not _app_error(error):  # as servers take it
                    raise
                said = _said(error)
                await from_app.send({"type": "lifespan.unsupported", "error": said})
            else:
                # Returning without a word is the other way to say it (as uvicorn takes it);
                # whoever waits for an answer must not wait forever.
                await from_app.send({"type": "lifespan.returned"})

        failed: str | None = None
        with to_app, app_inbox, from_app, inbox:
            async with anyio.create_task_group() as group:
                await group.start(run)
                await to_app.send({"type": "lifespan.startup"})
                answer: dict[str, Any] | None = None
                with anyio.move_on_after(self.time_limit):
                    answer = await inbox.receive()
                if answer is None:
                    failed = f"the app's startup did not answer within {self.time_limit:g} s"
                    group.cancel_scope.cancel()
                elif answer["type"] == "lifespan.startup.failed":
                    failed = f"the app's startup failed: {_error_of(answer.get('message', ''))}"
                    group.cancel_scope.cancel()
                else:
                    supported = answer["type"] == "lifespan.startup.complete"
                    try:
                        yield shut_down
                    finally:
                        if supported:
                            await to_app.send({"type": "lifespan.shutdown"})
                            with anyio.move_on_after(self.time_limit) as waited:
                                reply = await inbox.receive()
                                shut_down[0] = reply["type"] == "lifespan.shutdown.complete"
                                self.shutdown_failed = _shutdown_failure(reply)
                            self.shutdown_unanswered = waited.cancelled_caught
                        group.cancel_scope.cancel()
        # Raised out here, not inside the task group, which would wrap it in a group.
        if failed is not None:
            raise _StartupError(failed)


def _said(error: BaseException) -> str:
    """How a finding shows ``error``: its class and message; its class alone when the
    message is empty (``RuntimeError``, not ``RuntimeError: ``) or cannot be read (its
    ``str()`` raises, which would end the check in a traceback instead of a report)."""
    message = _readable(error)
    if message is None:
        return f"{type(error).__name__} (its message could not be read)"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _app_error(error: BaseException) -> bool:
    """Whether ``error``, raised out of the app, is its failure, to report: an
    ``Exception``; ``SystemExit``, as servers take it (an app's ``sys.exit()`` would end the
    check with its status, 0 often, and no report); or asyncio's ``CancelledError`` raised
    while nothing cancels the task (the app awaited a task or future cancelled elsewhere and
    let that out), which raised on would end a simulated user's task quietly, its requests
    never looked at, and the check pass. Trio raises no cancellation unasked."""
    if isinstance(error, Exception | SystemExit):
        return True
    if not isinstance(error, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop here: trio
        return False
    return task is not None and not task.cancelling()


def _refuse_malformed(message: MutableMapping[str, Any]) -> None:
    """Raise :class:`TypeError` in the app's ``send`` for a status or body of the wrong
    type, as a server does: a request the app fails, not a check that ends in a traceback
    when it adds up the body or compares the status."""
    kind = message["type"]
    if kind == "http.response.start":
        status = message["status"]
        if isinstance(status, bool) or not isinstance(status, int):
            msg = f"the response status must be an int, not {status!r}"
            raise TypeError(msg)
        # As HTTP/1.1 servers refuse one (h11's range): a status of no final response
        # would otherwise be taken for neither a success nor a failure, and pass.
        if not 200 <= status <= 999:
            msg = f"the response status must be from 200 to 999, not {status}"
            raise ValueError(msg)
    elif kind == "http.response.body":
        body = message.get("body", b"")
        if not isinstance(body, bytes | bytearray | memoryview):
            msg = f"a response body must be bytes, not {type(body).__name__!r}"
            raise TypeError(msg)


def _shutdown_failure(reply: dict[str, Any]) -> str | None:
    """What the app's answer to the shutdown says went wrong, or ``None``: a failure it
    sent, or an error its lifespan raised (after a startup it completed, so it does
    support the protocol)."""
    if reply["type"] == "lifespan.shutdown.failed":
        return f"the app's shutdown failed: {_error_of(reply.get('message', ''))}"
    if reply["type"] == "lifespan.unsupported":
        return f"the app's lifespan raised {reply['error']} before its shutdown completed"
    return None


def _error_of(message: str) -> str:
    """The error a startup failure's message ends with, without the traceback before it
    (Starlette sends the whole of it)."""
    if not message.startswith("Traceback (most recent call last):"):
        return message
    lines = message.rstrip().splitlines()
    frames = [n for n, line in enumerate(lines) if line.startswith("  File ")]
    rest = lines[frames[-1] + 1 :] if frames else lines[1:]
    while rest and rest[0].startswith("    "):  # the frame's source line and its markers
        rest.pop(0)
    return "\n".join(rest) or message


class _LogWatch:
    """Flags log records made for one user that name another simulated user, in their
    message, in the exception logged with them (``logger.exception``) or in a field given
    as ``extra`` (what structured logs write out).

    Records are looked at as they are made (a log record factory), not where they end up:
    a logger that does not propagate to the root (one with handlers of its own, as
    ``dictConfig`` setups often have) would otherwise hide its records from the check.
    The logger sets a record's ``extra`` fields after the factory returned it, so those
    are read when the next record is made in the same thread, or when the watch stops."""

    def __init__(self, known: set[str]) -> None:
        # The simulated users' ids, and their tenants'.
        self.known = known
        # Kept to those shown: an app logging others' ids on every request makes millions.
        self.findings = _Findings()
        self._watching = False
        self._previous: Callable[..., logging.LogRecord] | None = None
        self._factory: Callable[..., logging.LogRecord] | None = None
        # Per thread, the last record made there for a user, and that user: its extra
        # fields, set by then, are read when the next one is made or the watch stops.
        self._pending: dict[int, tuple[logging.LogRecord, UserRef]] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Look at every log record made from now on."""
        previous = self._previous = logging.getLogRecordFactory()

        def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if self._watching:
                self._look_at(record)
            return record

        self._watching = True
        self._factory = make
        logging.setLogRecordFactory(make)

    def flush(self) -> None:
        """Read the extra fields of the records still held, and let go of them.

        A record logged with its exception holds the traceback, whose frames can hold a
        request's Context (a worker thread's) and so its scope: held on, it would be
        reported as the app's leak.
        """
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for record, user in pending:
            self._look_at_extra(record, user)

    def stop(self) -> None:
        """Stop looking."""
        self._watching = False
        self.flush()
        # Put back unless the app installed a factory of its own on top of ours meanwhile:
        # ours then stays in its chain, passing records through.
        if logging.getLogRecordFactory() is self._factory and self._previous is not None:
            logging.setLogRecordFactory(self._previous)

    def _look_at(self, record: logging.LogRecord) -> None:
        ctx = current_context_or_none()
        if ctx is None:
            return
        user = UserRef(ctx.user_id, ctx.tenant_id)
        if ctx.user_id not in self.known:
            # An app that serves its users under ids of its own (an account looked up by
            # the id presented): a record made in the context a simulated user's request,
            # or socket, was served in is made for that user all the same.
            served, simulated = _served.get(), _simulating.get()
            if simulated is None or not served or served[0][0] != user:
                return
            user = simulated
        with self._lock:
            before = self._pending.get(threading.get_ident())
            self._pending[threading.get_ident()] = (record, user)
        if before is not None:
            self._look_at_extra(*before)
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not our finding
            return
        named = _mentions(text, self.known, user)
        for other in named:
            self.findings.append(
                f"log record from {record.name} emitted for {_label(user)} names "
                f"{_whose(other)}: {text[:120]!r}"
            )
        exc_info = record.exc_info
        if not isinstance(exc_info, tuple) or exc_info[1] is None:
            return
        # The exception logged with it (``logger.exception``) is written out with it.
        error = exc_info[1]
        said = "".join(traceback.format_exception(error))
        shown = _said(error)[:120]
        for other in _mentions(said, self.known, user):
            if other not in named:
                self.findings.append(
                    f"log record from {record.name} emitted for {_label(user)} names "
                    f"{_whose(other)} in the exception logged with it: {shown!r}"
                )

    def _look_at_extra(self, record: logging.LogRecord, user: UserRef) -> None:
        for name, value in list(vars(record).items()):
            if name in _RECORD_FIELDS:
                continue
            said = _text_of(value)
            self.findings.extend(
                f"log record from {record.name} emitted for {_label(user)} names "
                f"{_whose(other)} in its field {name!r}: {said[:120]!r}"
                for other in _mentions(said, self.known, user)
            )


def _text_of(value: object) -> str:
    """A log record's field as a log would write it out ("" when it cannot be)."""
    if isinstance(value, str):
        return value
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - a broken value is not our finding
        return ""


# The fields of every log record: the others were given as ``extra``.
_RECORD_FIELDS = frozenset(
    {*vars(logging.LogRecord("", 0, "", 0, "", None, None)), "message", "asctime"}
)


def _mentions(text: str, known: set[str], own: UserRef) -> list[str]:
    """The ids of simulated users, and tenants, other than ``own`` and ``own``'s tenant
    that ``text`` contains."""
    if "check-" not in text:
        return []
    # Most texts name their own user, and tenant, alone: told so by counting, which
    # allocates nothing (the memory phase checks every answer under tracemalloc, which
    # traces every allocation). Each simulated id holds "check-" once, at its start, and
    # no other id inside it.
    named = text.count(own.user_id) + (text.count(own.tenant_id) if own.tenant_id else 0)
    if text.count("check-") == named:
        return []
    # Found by their shape, then looked up: a cost that grows with the text, not with the
    # number of simulated users (10,000 of them made every response 10,000 searches).
    found = dict.fromkeys(_SIMULATED_ID.findall(text))
    return [
        other for other in found if other not in (own.user_id, own.tenant_id) and other in known
    ]


def _whose(simulated_id: str) -> str:
    """How a finding names the simulated user, or tenant, of ``simulated_id``."""
    return f"tenant {simulated_id}" if simulated_id.startswith(_TENANT) else simulated_id


def _label(user: UserRef) -> str:
    """How a finding names a simulated user (as the probe names users)."""
    return _probe._label(user)


def _filled(text: str, user: UserRef) -> str:
    """``text`` with ``{user}`` and ``{tenant}`` replaced by ``user``'s ids."""
    return text.replace("{user}", user.user_id).replace("{tenant}", user.tenant_id or "")


def _detail(text: str) -> str:
    """The ``detail`` of a problem+json answer (RFC 9457), or ``text`` as it is."""
    try:
        problem = json.loads(text)
    except ValueError:
        return text
    detail = problem.get("detail") if isinstance(problem, dict) else None
    return detail if isinstance(detail, str) and detail else text


def _shown(body: bytes, token: str | None) -> str:
    """The start of a response body, with ``token`` (a JWT an app may echo) taken out."""
    if token is None:
        return body[:160].decode("utf-8", "replace")
    return body.decode("utf-8", "replace").replace(token, "<token>")[:160]


def _header_text(headers: list[tuple[bytes, bytes]]) -> str:
    """Headers as text, a ``name: value`` line each; "" when none holds ``check-``, the
    start of every simulated id (told without decoding them, as most answers are)."""
    for name, value in headers:
        for raw in (name, value):
            # find(), not ``in``: ``in`` on bytes first tries its operand as an int, raising
            # and dropping a TypeError each time.
            is_bytes = isinstance(raw, (bytes, bytearray))
            if raw.find(b"check-") != -1 if is_bytes else "check-" in str(raw):
                return "\n".join(f"{_latin1(name)}: {_latin1(value)}" for name, value in headers)
    return ""


def _latin1(raw: object) -> str:
    """A header name or value as text (an app that sends ``str`` is not our finding)."""
    return raw.decode("latin-1") if isinstance(raw, bytes | bytearray) else str(raw)


def _simulated_ids(users: int, prefix: str = "check-") -> list[str]:
    """Ids for ``users`` simulated users, each unlike any id an app would make up."""
    return [f"{prefix}{n:05d}-{secrets.token_hex(3)}" for n in range(users)]


def _simulated_users(users: int, tenants: int = 0) -> list[UserRef]:
    """``users`` simulated users; with ``tenants``, spread over that many tenants in turn,
    and each user id used in as many tenants as it can (an id is unique only within its
    tenant): two users of one id in two tenants are two users to keep apart."""
    if not tenants:
        return [UserRef(user) for user in _simulated_ids(users)]
    ids = _simulated_ids(-(-users // tenants))
    tenant_ids = _simulated_ids(tenants, _TENANT)
    return [UserRef(ids[n // tenants], tenant_ids[n % tenants]) for n in range(users)]


def _start_order(users: list[UserRef], tenants: int) -> list[UserRef]:
    """``users``, as :func:`_simulated_users` makes them, in the order they start: one
    after another, they differ in user id and in tenant, so that the users in flight
    together are users of other ids even when fewer run at once than there are tenants
    (in the order they are made, the users of one id in every tenant come one after
    another, and a race between two users of other ids would hardly ever be run)."""
    if tenants < 2:
        return users
    # users[n] is user id n // tenants in tenant n % tenants: taken by diagonals, each
    # the next id in the next tenant.
    order = sorted(range(len(users)), key=lambda n: ((n % tenants - n // tenants) % tenants, n))
    return [users[n] for n in order]


# Seconds a user's requests wait, after its socket's accept, for the app to listen on it.
_LISTENING = 1.0


def _ids_of(users: Sequence[UserRef]) -> set[str]:
    """The ids of ``users`` and of their tenants."""
    return {user.user_id for user in users} | {
        user.tenant_id for user in users if user.tenant_id is not None
    }


_TENANT = "check-tenant-"
# The shape of _simulated_ids(), of users and tenants: _mentions() finds them by it.
_SIMULATED_ID = re.compile(r"check-(?:tenant-)?[0-9]{5,}-[0-9a-f]{6}")


async def _overhead() -> float:
    """Microseconds AmbientMiddleware adds to a bare endpoint, measured interleaved here."""
    from ambient._registry import Registry
    from ambient.middleware import AmbientMiddleware, trusted_header

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = AmbientMiddleware(bare, registry=Registry(), identity=trusted_header())
    plan = PlannedRequest()
    bare_times: list[float] = []
    wrapped_times: list[float] = []
    bare_driver = _Driver(bare, ("header", "x-user-id"))
    wrapped_driver = _Driver(wrapped, ("header", "x-user-id"))
    user = UserRef("check-overhead")
    for _ in range(5):
        for driver, times in ((bare_driver, bare_times), (wrapped_driver, wrapped_times)):
            started = time.perf_counter()
            for _ in range(400):
                await driver.request(user, plan)
            times.append((time.perf_counter() - started) / 400)
    return (statistics.median(wrapped_times) - statistics.median(bare_times)) * 1e6


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
        return round(ordered[index] * 1000, 3)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": at(1.0)}


def _cut(findings: list[str]) -> list[str]:
    if len(findings) <= _MAX_SHOWN:
        return findings
    return [*findings[:_MAX_SHOWN], f"... and {len(findings) - _MAX_SHOWN} more"]


class _Findings:
    """Findings of one kind: those shown, and a count of the rest. A broken app can make
    millions (every run announced on every socket grows with the square of the users),
    more than a check could keep."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.more = 0
        # Log records are looked at in whichever thread makes them.
        self._lock = threading.Lock()

    def append(self, finding: str) -> None:
        with self._lock:
            if len(self.shown) < _MAX_SHOWN:
                self.shown.append(finding)
            else:
                self.more += 1

    def extend(self, findings: Iterable[str]) -> None:
        for finding in findings:
            self.append(finding)

    def cut(self) -> list[str]:
        """As :func:`_cut` says them."""
        return [*self.shown, f"... and {self.more} more"] if self.more else list(self.shown)


class _ClientGoneError(OSError):
    """What a simulated socket's ``send`` raises once its client has left, as a server's
    does (the ASGI spec asks for an ``OSError``; uvicorn raises ``ClientDisconnected``):
    an app that only sends on a socket (a feed, heartbeats) learns so that it may end."""


class _Socket:
    """A simulated user's websocket at ``path``, held open while its requests run; what
    the app sent on it, and what went wrong."""

    def __init__(
        self,
        driver: _Driver,
        user: UserRef,
        path: str,
        look: Callable[[str, UserRef | None, UserRef | None], None],
        sends: str | None = None,
    ) -> None:
        self.driver = driver
        self.user = user
        self.path = path
        # The text frame the user sends once the app listens, if any.
        self.sends = None if sends is None else _filled(sends, user)
        self._connected = False
        # Each frame is looked at as it comes and counted, not kept: there may be millions.
        self.look = look
        self.frames = 0
        self.served: list[tuple[UserRef, bool]] = []
        # What went wrong: a handshake refused, a socket the app closed or failed early.
        self.problem: str | None = None
        self.accepted = False
        self.settled = anyio.Event()  # accepted, or ended without
        # Once the app awaits a message, sends a frame or returns: an app that registers the
        # socket after its accept (with a per-user manager) has done so by then.
        self.listening = anyio.Event()
        self.ended = anyio.Event()  # the app returned
        self._leaving = anyio.Event()
        # A denial response under way: what the failure says, and the body so far.
        self._denied: tuple[str, list[bytes]] | None = None
        # The status of the denial response that refused the handshake, and its detail.
        self.denied_status: int | None = None
        self.denied_detail = ""
        # What else the app said to this user on the socket, to look at as its frames are:
        # (what it was, its text).
        self.said: list[tuple[str, str]] = []

    async def run(self) -> None:
        """Connect, and call the app until it returns (after :meth:`leave`)."""
        scope = self.driver.scope("websocket", self.user, self.path)
        token = _served.set(self.served)
        simulating = _simulating.set(self.user)
        try:
            await self.driver.app(scope, self._receive, self._send)
        except _ClientGoneError:
            pass  # the app let the disconnect through, as servers let it
        except BaseException as exc:
            if not _app_error(exc):
                raise
            said = _said(exc)
            late = " after its client left" if self._leaving.is_set() else ""
            self._failed(f"raised {said}{late}")
        finally:
            _simulating.reset(simulating)
            _served.reset(token)
            if not self.accepted:
                self._failed("returned without accepting the socket")
            self.settled.set()
            self.listening.set()
            self.ended.set()

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        """What the app sends on the socket."""
        kind = message["type"]
        if kind == "websocket.accept":
            self.accepted = True
            self.settled.set()
        elif kind == "websocket.send":
            if not self.accepted:
                # As servers refuse it: the frame would reach no client.
                msg = "a websocket frame sent before the socket was accepted"
                raise RuntimeError(msg)
            self.listening.set()
            text, data = message.get("text"), message.get("bytes")
            self.frames += 1
            # Whose request the app sent it in: another user's is a frame of theirs
            # reaching this one, whatever it says.
            ctx = current_context_or_none()
            sender = None if ctx is None else UserRef(ctx.user_id, ctx.tenant_id)
            served = self.served[0][0] if self.served else None
            self.look(text if text is not None else _latin1(data or b""), sender, served)
            if self._leaving.is_set():
                # Still looked at (the app sent it for this user), but it went nowhere.
                msg = "the client disconnected"
                raise _ClientGoneError(msg)
        elif kind.startswith("websocket.http.response."):
            self._denial(message)
        elif kind == "websocket.close":
            reason = message.get("reason")
            if reason:
                self.said.append(("close reason", str(reason)))
            if self._leaving.is_set():
                return
            code = message.get("code", 1000)
            said = "refused the handshake" if not self.accepted else "closed the socket"
            self._failed(f"{said} with close code {code}")

    async def _receive(self) -> MutableMapping[str, Any]:
        """What the app receives: the connect, the frame the user sends once the app
        listens (if any), and the disconnect once the user leaves."""
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        self.listening.set()
        if self.sends is not None:
            text, self.sends = self.sends, None
            return {"type": "websocket.receive", "text": text}
        await self._leaving.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    def _failed(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem[:200]
        self.settled.set()

    def _denial(self, message: MutableMapping[str, Any]) -> None:
        """A denial response to the handshake: failed, saying why as its body does (the
        ``detail`` of a problem+json: an ``OriginAllowList``'s 403 explains itself)."""
        if message["type"] == "websocket.http.response.start":
            status = message.get("status")
            refused = f"refused the handshake with HTTP {status}"
            if self.problem is None:
                self.denied_status = status if isinstance(status, int) else None
            self._failed(refused)
            self._denied = (refused, [])
            return
        if self._denied is None:
            return
        refused, body = self._denied
        body.append(bytes(message.get("body", b"")))
        if message.get("more_body", False):
            return
        text = b"".join(body).decode("utf-8", "replace")
        token = self.driver.token(self.user)  # the one the handshake sent: never shown
        if token is not None:
            text = text.replace(token, "<token>")
        self.said.append(("denial response", text))
        detail = _detail(text).strip()
        if detail and self.problem == refused:
            self.problem = f"{refused}: {detail}"[:200]
            self.denied_detail = detail[:160]

    def leave(self) -> None:
        """Disconnect: the app's next ``receive`` is ``websocket.disconnect``."""
        self._leaving.set()


class _Traffic:
    """One simulated user's requests, and what their responses showed."""

    def __init__(
        self,
        driver: _Driver,
        users: list[UserRef],
        plan: Sequence[PlannedRequest],
        requests: int,
        progress: Progress | None,
        websocket: str | None = None,
        websocket_send: str | None = None,
    ) -> None:
        self.driver = driver
        self.websocket = websocket
        self.websocket_send = websocket_send
        self.sockets = 0
        self.frames = 0
        self.known = _ids_of(users)
        self.plan = plan
        self.requests = requests
        self.total = len(users) * requests
        self.progress = progress
        self.done = 0
        self.latencies: list[float] = []
        self.isolation = _Findings()
        self.failed = _Findings()
        self.served_as: dict[UserRef, set[UserRef]] = {}
        self.anonymous: set[UserRef] = set()
        # With a JWTIdentity: the requests answered 401, and what the first answer said.
        self.refused = 0
        self.refused_said = ""
        self.sockets_refused = 0  # the websocket handshakes refused so

    async def user(self, user: UserRef) -> None:
        if self.websocket is None:
            await self._requests(user)
            return
        socket = _Socket(
            self.driver,
            user,
            self.websocket,
            functools.partial(self._look_at_frame, user),
            self.websocket_send,
        )
        limit = self.driver.time_limit
        async with anyio.create_task_group() as group:
            group.start_soon(socket.run)
            with anyio.move_on_after(limit):
                await socket.settled.wait()
            if not socket.settled.is_set():
                socket.problem = f"did not accept the socket within {limit:g} s"
            with anyio.move_on_after(min(limit or _LISTENING, _LISTENING)):
                await socket.listening.wait()
            await self._requests(user)
            socket.leave()
            with anyio.move_on_after(limit):
                await socket.ended.wait()
            if not socket.ended.is_set():
                socket.problem = socket.problem or f"did not end within {limit:g} s of its close"
                group.cancel_scope.cancel()
        self._look_at_socket(socket)

    def _look_at_socket(self, socket: _Socket) -> None:
        where, whom = f"WS {socket.path}", _label(socket.user)
        self.sockets += 1
        self.frames += socket.frames
        self.isolation.extend(
            f"{where}: the {what} sent to {whom} contains {_whose(other)}'s data"
            for what, text in socket.said
            for other in _mentions(text, self.known, socket.user)
        )
        if socket.served:
            self._note_served(socket.user, *socket.served[0])
            another = self._served_as_another(socket.user, socket.served)
            if another is not None:
                self.isolation.append(f"{where} for {whom}: {another}")
        if socket.denied_status == 401 and isinstance(self.driver.identity, JWTIdentity):
            # Said once for them all with the requests refused so (see refusal()).
            if not self.refused and not self.sockets_refused:
                self.refused_said = socket.denied_detail
            self.sockets_refused += 1
        elif socket.problem is not None:
            self.failed.append(f"{where} for {whom}: the app {socket.problem}")

    def _look_at_frame(
        self, user: UserRef, frame: str, sender: UserRef | None, served: UserRef | None
    ) -> None:
        # Sent while serving another simulated user (not in a job of the app's own): that
        # user's event reaching this one, whatever the frame says. A socket the app serves
        # in no ambient context of its own is this user's all the same.
        if sender is None or sender.user_id not in self.known:
            served_by_other = False
        elif served is not None:
            served_by_other = sender != served
        else:  # a tenant the sender was served without is no other tenant (said elsewhere)
            served_by_other = sender.user_id != user.user_id or sender.tenant_id not in (
                None,
                user.tenant_id,
            )
        if served_by_other and sender is not None:
            self.isolation.append(
                f"WS {self.websocket}: a frame sent to {_label(user)} was sent while serving "
                f"{_label(sender)}"
            )
            return
        self.isolation.extend(
            f"WS {self.websocket}: a frame sent to {_label(user)} contains {_whose(other)}'s data"
            for other in _mentions(frame, self.known, user)
        )

    def _note_served(self, user: UserRef, served_as: UserRef, anonymous: bool) -> None:
        self.served_as.setdefault(user, set()).add(served_as)
        if anonymous:
            self.anonymous.add(user)

    async def _requests(self, user: UserRef) -> None:
        for index in range(self.requests):
            await self.one(user, self.plan[index % len(self.plan)])

    async def one(self, user: UserRef, planned: PlannedRequest) -> None:
        served: list[tuple[UserRef, bool]] = []
        self.latencies.append(await self.answered(user, planned, served))
        if served:
            self._note_served(user, *served[0])
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    async def answered(
        self,
        user: UserRef,
        planned: PlannedRequest,
        served: list[tuple[UserRef, bool]],
        phase: str = "",
    ) -> float:
        """Send one request of ``user``'s and look at its answer: a failed request, or
        another user's data in its body or headers, is a finding (said with ``phase``, the
        phase it was sent in, when given), and so, in a later phase, is a request served
        as none of the user's requests before were. Whom it was served as goes into
        ``served``. Return how long it took."""
        headers: list[tuple[bytes, bytes]] = []
        # The token this request sends (the same the driver puts in its headers, before
        # anything is awaited): taken out of what is shown of an answer that echoes it.
        token = self.driver.token(user)
        status, body, elapsed = await self.driver.request(user, planned, served, headers)
        named = _mentions(body.decode("utf-8", "replace"), self.known, user)
        # Headers carry data too (a cookie, a redirect's location, an echoed id), and a
        # leak there reaches the other user as surely as one in the body.
        named_in_headers = _mentions(_header_text(headers), self.known, user)
        # Served as another simulated user: that user's answer, whatever it shows. In a
        # later phase, whom it was served as is also compared with the user's requests
        # before: an app may serve one user as another only once warm.
        served_otherwise = self._served_as_another(user, served)
        if served_otherwise is None and phase:
            served_otherwise = self._served_otherwise(user, served)
        if 0 < status < 300 and not named and not named_in_headers and not served_otherwise:
            # Most answers: nothing to say, told without making a line (the memory phase
            # looks at every answer under tracemalloc, which makes allocations costly).
            return elapsed
        where = f"{planned.method} {planned.path}{f' in the {phase}' if phase else ''}"
        whom = _label(user)
        if not status:  # no complete response: the driver says what went wrong
            self.failed.append(f"{where} for {whom}: {body.decode()}")
        elif status == 401 and token is not None and not phase:
            # Said once for them all (see refusal()): the app refuses the tokens.
            if not self.refused and not self.sockets_refused:
                text = body.decode("utf-8", "replace").replace(token, "<token>")
                self.refused_said = _detail(text)[:160]
            self.refused += 1
        elif status == 401 and token is not None and (self.refused or self.sockets_refused):
            pass  # in a later phase, by an app already said to refuse the tokens: not again
        elif status >= 400:
            shown = _shown(body, token)
            self.failed.append(f"{where} for {whom}: HTTP {status} {shown!r}")
        elif status >= 300:
            # Redirects are not followed: the isolation checks never saw the page behind it.
            self.failed.append(
                f"{where} for {whom}: HTTP {status}, a redirect (not followed; plan the "
                "request it leads to, or send what the app needs to serve this one)"
            )
        self.isolation.extend(
            f"{where}: the response for {whom} contains {_whose(other)}'s data" for other in named
        )
        self.isolation.extend(
            f"{where}: the response headers for {whom} contain {_whose(other)}'s data"
            for other in named_in_headers
        )
        if served_otherwise:
            self.isolation.append(f"{where} for {whom}: {served_otherwise}")
        return elapsed

    def _served_as_another(self, user: UserRef, served: list[tuple[UserRef, bool]]) -> str | None:
        """What to say of a request, or socket, of ``user``'s served as another simulated
        user, or in another simulated tenant, or ``None``. Each user served as another's
        consistently (two users swapped) is caught here only: no user is served as two,
        nor two as one, and an answer that names no id shows nothing."""
        if not served:
            return None
        served_as = served[0][0]
        if served_as == user:
            return None
        if served_as.user_id != user.user_id and served_as.user_id in self.known:
            return f"served as {_label(served_as)}, another simulated user"
        if served_as.tenant_id not in (None, user.tenant_id) and served_as.tenant_id in self.known:
            return f"served as {_label(served_as)}, in another simulated tenant"
        return None

    def _served_otherwise(self, user: UserRef, served: list[tuple[UserRef, bool]]) -> str | None:
        """What to say of a request of ``user``'s served as none of its requests before
        were, or ``None``: also ``None`` for a user those requests said was not served
        as itself (anonymous, or never in an ambient context: identity_findings())."""
        before = self.served_as.get(user)
        if not served or before is None or user in self.anonymous or served[0][0] in before:
            return None
        served_as, anonymous = served[0]
        said = "an anonymous user" if anonymous else _label(served_as)
        earlier = ", ".join(sorted(_label(other) for other in before))
        return f"served as {said}, where its requests before were served as {earlier}"

    def refusal(self) -> list[str]:
        """The requests and websocket handshakes whose JWT the app refused (401), in one
        line."""
        if not self.refused and not self.sockets_refused:
            return []
        refused = [f"{self.refused} of {self.done} requests"] if self.refused else []
        if self.sockets_refused:
            refused.append(f"{self.sockets_refused} of {self.sockets} websocket handshakes")
        said = f" (the first answer: {self.refused_said!r})" if self.refused_said else ""
        identity = self.driver.identity
        algorithm = identity.algorithm if isinstance(identity, JWTIdentity) else "HS256"
        key = (
            "the secret they are signed with (AMBIENT_JWT_SECRET)"
            if algorithm.startswith("HS")
            else "the public key of the private key they are signed with (AMBIENT_JWT_SECRET), "
            "or a key set holding it under their kid (--jwt-key-id)"
        )
        return [
            f"the app refused the tokens of {' and '.join(refused)} with HTTP "
            f"401{said}: does it verify {algorithm} tokens with {key}, and expect the aud and "
            "iss they carry (--jwt-audience, --jwt-issuer)?"
        ]

    def identity_findings(self) -> list[str]:
        """Simulated users not served as one user of their own: their requests cannot show
        one user's data reaching another."""
        findings: list[str] = []
        if self.done and self.refused == self.done:
            # Every token refused: no request reached the app, for that reason (refusal()).
            return findings
        if self.done and not self.served_as:
            findings.append(
                "no request reached the app in an ambient context (is it wrapped in "
                "AmbientMiddleware, and does --identity name what that reads the user "
                "from?), so isolation between the users was not tested"
            )
        if self.anonymous:
            findings.append(
                f"{len(self.anonymous)} simulated user(s) were served as anonymous users, "
                "so isolation between them was not tested: does --identity name what the "
                "app reads the user from?"
            )
        untenanted = sum(
            1
            for user, seen in self.served_as.items()
            if user.tenant_id is not None and any(served.tenant_id is None for served in seen)
        )
        if untenanted:
            # With one tenant, no user id is in two of them.
            several = len({user.tenant_id for user in self.served_as}) > 1
            apart = ", so users of one id in two tenants were not told apart" if several else ""
            findings.append(
                f"{untenanted} simulated user(s) of a tenant were served as users of no "
                f"tenant{apart}: does the app read the tenant from "
                f"{self.driver.tenant_source()}?"
            )
        split = sorted((user for user, seen in self.served_as.items() if len(seen) > 1), key=_label)
        if split and not self.anonymous:
            findings.append(
                f"the requests of {_label(split[0])} were served as "
                f"{len(self.served_as[split[0]])} different users ({len(split)} simulated "
                "user(s) in all were split so)"
            )
        owners: dict[UserRef, list[str]] = {}
        for user, seen in self.served_as.items():
            for served_as in seen:
                owners.setdefault(served_as, []).append(_label(user))
        # Users of one id in two tenants, served without them, were served as one: said
        # above, with why.
        shared = [] if untenanted else sorted(sorted(u) for u in owners.values() if len(u) > 1)
        findings += [
            f"simulated users {', '.join(users)} were all served as one user" for users in shared
        ]
        return findings


async def run_check(
    app: ASGIApp,
    *,
    name: str = "app",
    users: int = 100,
    requests: int = 20,
    concurrency: int | None = None,
    identity: tuple[str, str] | JWTIdentity = ("header", "x-user-id"),
    plan: Sequence[PlannedRequest] = (PlannedRequest(),),
    growth_requests: int = 1000,
    max_growth_kib: float = 64.0,
    measure_overhead: bool = True,
    progress: Progress | None = None,
    time_limit: float | None = None,
    tenants: int = 0,
    tenant_header: str = "x-tenant-id",
    websocket: str | None = None,
    websocket_send: str | None = None,
) -> CheckReport:
    """Drive ``users`` simulated users, ``requests`` each, through ``app`` and report.

    Args:
        app: The ASGI app (usually wrapped in ``AmbientMiddleware``).
        name: How the report names the app.
        users: Simulated users, each with a unique id (with tenants, unique within its
            tenant): from 1 to 10,000.
        requests: Requests per user, cycling through ``plan``: from 1 to 10,000, and at
            most 1,000,000 in all (``users * requests``).
        concurrency: Users in flight at once, at least 1 (default: all of them).
        identity: How a user presents itself: ``("header", name)``, ``("bearer", "")``
            (the user id as an opaque token) or a :class:`JWTIdentity` (a signed JWT).
        plan: The requests each user sends.
        growth_requests: Requests in the tracemalloc memory-growth phase (0 to skip it,
            leaving the report's ``memory_growth_kib_per_1k`` ``None``; at most 1,000,000).
            Their answers are checked as the users' are: a failed request, another
            user's data in one or a request served as another user than the user's
            requests before is a finding that names the memory phase.
        max_growth_kib: Growth per 1,000 requests above which memory counts as leaking;
            with fewer than 1,000 requests measured, growth above it in all (what a few
            requests allocate once, extrapolated to 1,000, is no leak).
        measure_overhead: Also measure the middleware's own cost on a bare endpoint.
        progress: Called with ``(done, total)`` as requests complete.
        time_limit: Seconds a request, and the lifespan startup and shutdown, may take: a
            request that has not answered by then is cancelled and counted as failed, a
            startup that has not raises. ``None`` (the default) waits as long as they take.
        tenants: Tenants to spread the users over, in turn (0, the default: users of no
            tenant), at most one per user. User ids then repeat across tenants, as they may
            in a multi-tenant app: the user of one id in each of two tenants must still see
            nothing of the other. A user presents its tenant id in ``tenant_header``, or in
            the tokens' ``tenant_claim`` with a :class:`JWTIdentity`.
        tenant_header: The header of a user's tenant id, with a ``("header", name)``
            identity and ``tenants``.
        websocket: A path (``{user}`` and ``{tenant}`` are replaced) at which each user
            holds a websocket open, presenting itself as its requests do, from before its
            first request until after its last; a frame the app sends on it that carries
            another user's or tenant's id, or that it sends while serving another user's
            request, is a violation, a handshake refused or a socket the app closes first is
            a failed request.
        websocket_send: A text frame (``{user}`` and ``{tenant}`` are replaced) each user
            sends on its websocket once the app listens on it, for an app that answers
            messages (a prompt, a subscription).

    Raises:
        ValueError: ``users``, ``requests``, ``growth_requests`` or ``tenants`` out of
            those bounds, ``tenants`` with a ``("bearer", "")`` identity (an opaque token
            carries no tenant), a ``websocket`` path not starting with ``/``,
            ``websocket_send`` without ``websocket``, ``time_limit`` not more than 0, or
            ``concurrency`` less than 1.
    """
    _check_arguments(users, requests, time_limit, growth_requests, concurrency)
    _check_simulated(tenants, users, identity, websocket, websocket_send)
    from ambient.migration import global_state_report, reset_global_state_report

    simulated = _simulated_users(users, tenants)
    report = CheckReport(app=name, users=users, requests=users * requests, tenants=tenants)
    driver = _Driver(app, identity, time_limit, tenant_header)
    traffic = _Traffic(driver, simulated, plan, requests, progress, websocket, websocket_send)
    watch = _LogWatch(traffic.known)
    root = logging.getLogger()
    old_level = root.level
    watch.start()
    root.setLevel(min(old_level or logging.WARNING, logging.INFO))
    reset_global_state_report()
    order = iter(_start_order(simulated, tenants))

    async def simulate() -> None:
        # Each takes the next user once free, so users start in that order (trio does not
        # run tasks in the order they were started, nor wake a semaphore's waiters so).
        for user in order:
            await traffic.user(user)

    probe = _probe.IsolationProbe()
    remove_served_as = add_observer(_ServedAs())
    cleanup_failures = _CleanupFailures()
    remove_cleanup_failures = add_observer(cleanup_failures)
    try:
        with probe:
            async with driver.lifespan() as shut_down:
                started = time.perf_counter()
                async with anyio.create_task_group() as group:
                    for _ in range(min(concurrency or users, users)):
                        group.start_soon(simulate)
                elapsed = time.perf_counter() - started
                # Every request has finished: a closed scope or REQUEST component still
                # alive now is kept by a pending task or a global.
                after_run = await _report_after_run(probe, watch)
                # The simulated users' accesses, not the memory measurement's after them.
                globals_report = global_state_report()
                if growth_requests:
                    root.setLevel(old_level)
                    report.memory_growth_kib_per_1k = await _quiet_growth(
                        probe, traffic, simulated, growth_requests
                    )
            probe.expect_closed = shut_down[0]
            findings = probe.report()
    finally:
        remove_cleanup_failures()
        remove_served_as()
        watch.stop()
        root.setLevel(old_level)
    _summarise(report, traffic, watch, after_run, findings, elapsed)
    if report.memory_growth_kib_per_1k is not None:
        report.leaks += _growth_findings(
            report.memory_growth_kib_per_1k, growth_requests, max_growth_kib
        )
    report.cleanup += _cut(cleanup_failures.findings())
    report.cleanup += driver.shutdown_findings()
    if globals_report.total:
        report.global_state_accesses = globals_report.as_dict()
    if measure_overhead:
        report.middleware_overhead_us = round(await _overhead(), 2)
    return report


def _check_arguments(
    users: int,
    requests: int,
    time_limit: float | None,
    growth_requests: int = 0,
    concurrency: int | None = None,
) -> None:
    bounds = (("users", users, _MAX_USERS), ("requests", requests, _MAX_REQUESTS))
    for option, value, most in bounds:
        if not 1 <= value <= most:
            msg = f"{option} must be from 1 to {most}, not {value}"
            raise ValueError(msg)
    if users * requests > _MAX_TOTAL_REQUESTS:
        msg = (
            f"users={users} and requests={requests} make {users * requests} requests; "
            f"at most {_MAX_TOTAL_REQUESTS} in all"
        )
        raise ValueError(msg)
    if not 0 <= growth_requests <= _MAX_TOTAL_REQUESTS:
        msg = f"growth_requests must be from 0 to {_MAX_TOTAL_REQUESTS}, not {growth_requests}"
        raise ValueError(msg)
    # None waits as long as a request takes; infinity is refused as for every option
    # taking seconds.
    if time_limit is not None and not _checks.number(time_limit, "time_limit") > 0:
        msg = f"time_limit must be more than 0 seconds, not {time_limit}"
        raise ValueError(msg)
    # Fewer than one user in flight would send no request at all, and pass any app.
    if concurrency is not None and not concurrency >= 1:
        msg = f"concurrency must be at least 1 (None: all the users), not {concurrency}"
        raise ValueError(msg)


def _check_simulated(
    tenants: int,
    users: int,
    identity: tuple[str, str] | JWTIdentity,
    websocket: str | None,
    websocket_send: str | None = None,
) -> None:
    if websocket is not None and not websocket.startswith("/"):
        msg = f"the websocket path must start with '/', not {websocket!r}"
        raise ValueError(msg)
    if websocket_send is not None and websocket is None:
        msg = "websocket_send is sent on the websocket, which needs a websocket path"
        raise ValueError(msg)
    if not 0 <= tenants <= users:
        msg = f"tenants must be from 0 to the number of users ({users}), not {tenants}"
        raise ValueError(msg)
    if tenants and not isinstance(identity, JWTIdentity) and identity[0] != "header":
        msg = (
            "tenants need an identity that can carry the tenant id: a header or a "
            "JWTIdentity (an opaque bearer token is the user id alone)"
        )
        raise ValueError(msg)


async def _report_after_run(
    probe: _probe.IsolationProbe, watch: _LogWatch
) -> _probe.IsolationReport:
    """The probe's report once every request has finished, the records the watch still
    held let go of first: they are not the app's.

    Taken again, for a moment, while it finds something alive: a worker thread (anyio's)
    that ran a request's code hands the result back before it lets go of that request's
    Context, and so of its scope, and the event loop may finish the run in between. What
    a real leak keeps stays alive past that moment."""
    watch.flush()
    report = probe.report()
    for pause in _SETTLE_PAUSES:
        if not (report.outlived or report.leaked_scopes):
            break
        await anyio.sleep(pause)  # the worker threads get the GIL meanwhile
        report = probe.report()
    return report


# How long, at most, the report after the run waits for worker threads to let go of the
# requests they ran: 155 ms in pauses that double, since each is followed by a full garbage
# collection, which in a large process costs more than the pause (a real leak paid for 20
# of them with pauses of 5 ms).
_SETTLE_PAUSES = (0.005, 0.01, 0.02, 0.04, 0.08)


def _summarise(
    report: CheckReport,
    traffic: _Traffic,
    watch: _LogWatch,
    after_run: _probe.IsolationReport,
    findings: _probe.IsolationReport,
    elapsed: float,
) -> None:
    report.throughput_rps = round(report.requests / elapsed, 1) if elapsed else 0.0
    report.latency_ms = _percentiles(traffic.latencies)
    report.isolation = [
        *_cut(traffic.identity_findings()),
        *_cut(findings.shared),
        *traffic.isolation.cut(),
        *watch.findings.cut(),
    ]
    report.failed_requests = [*traffic.refusal(), *traffic.failed.cut()]
    report.websockets = traffic.sockets
    report.websocket_frames = traffic.frames
    report.tokens_refused = traffic.refused
    report.cleanup = _cut(findings.cleanup + findings.open_scopes)
    report.leaks = _cut(after_run.outlived + after_run.leaked_scopes)
    report.components_created = findings.created
    report.components_cleaned = findings.cleaned
    report.scopes = findings.scopes


def _growth_findings(per_1k: float, requests: int, max_growth_kib: float) -> list[str]:
    """The memory growth measured over ``requests`` requests as a leak, if it is one: above
    the limit per 1,000 requests, and, measured over fewer, above the limit in all (what
    a few requests allocate once, extrapolated to 1,000, is no leak)."""
    if per_1k <= max_growth_kib or per_1k * min(requests, 1000) / 1000 <= max_growth_kib:
        return []
    return [
        f"memory grew {per_1k:.1f} KiB per 1,000 requests (limit {max_growth_kib:g}) after warm-up"
    ]


# How a finding in the requests of the memory measurement names where it was found.
_MEMORY_PHASE = "memory phase"


async def _quiet_growth(
    probe: _probe.IsolationProbe, traffic: _Traffic, users: list[UserRef], count: int
) -> float:
    """:func:`_growth`, with the probe recording nothing new (its records would grow with
    every component) while it still sees what it recorded cleaned (USER components that
    expire meanwhile), and no log records below warnings: a host's handler that keeps
    records (a test runner's capture, a buffer) would keep each request's, and their
    arguments, and they would be counted as the app's growth."""
    probe._recording = False
    disabled = logging.root.manager.disable
    logging.disable(max(disabled, logging.INFO))
    try:
        return await _growth(traffic, users, count)
    finally:
        logging.disable(disabled)
        probe._recording = True


async def _growth(traffic: _Traffic, simulated: list[UserRef], count: int) -> float:
    """KiB the process keeps per 1,000 requests by users that are already warm.

    Each answer is looked at as the simulated users' are, and whom it was served as
    against the user's requests before (``traffic`` keeps what they show): an app may
    fail, hand one user's data to another or serve one user as another only after many
    requests (a cache that fills, a global set once warm)."""
    users = simulated[: min(len(simulated), 10)]
    plan = traffic.plan

    async def run(n: int) -> None:
        for index in range(n):
            user, planned = users[index % len(users)], plan[index % len(plan)]
            await traffic.answered(user, planned, [], phase=_MEMORY_PHASE)
        # Let the event loop run once: asyncio frees the timers the requests' time limits
        # left cancelled only then, and requests that never waited never let it run.
        await anyio.lowlevel.checkpoint()

    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        # Warm up under tracing and as long as we measure: bounded caches (histories,
        # pools) fill first, and what they evict later was traced, so it counts as freed.
        await run(count)
        gc.collect()
        ignore = [
            tracemalloc.Filter(inclusive=False, filename_pattern=__file__),
            tracemalloc.Filter(inclusive=False, filename_pattern="*/ambient/_probe.py"),
            tracemalloc.Filter(inclusive=False, filename_pattern=tracemalloc.__file__),
            # Log records kept by whatever handlers the host installed (pytest's capture).
            tracemalloc.Filter(inclusive=False, filename_pattern=logging.__file__),
        ]
        before = tracemalloc.take_snapshot().filter_traces(ignore)
        await run(count)
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(ignore)
    finally:
        if not tracing:
            tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return round(max(grown, 0) / 1024 / (count / 1000), 2)
