"""What every example app shares: the components, a ledger of their lives, and the views'
bodies, so one isolation suite can drive any framework on any server (granian runs the app
in another process, so everything the suite checks is also reachable over HTTP)."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

import anyio

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef
from ambient.errors import IdentityError, PoolExhaustedError
from ambient.middleware import IdentityResolver, first_of, trusted_header
from ambient.middleware.identity import jwt_bearer

# A gateway's trusted header, or a bearer token: a request with neither is refused with
# the token's challenge (``WWW-Authenticate: Bearer``), and so is a 401 a view raises.
IDENTITY: IdentityResolver = first_of(
    trusted_header(tenant_header="x-tenant-id"),
    jwt_bearer("example-app-only-not-a-secret-key", algorithms=["HS256"]),
)


class Ledger:
    """Thread-safe record of every component created and cleaned, and of how each
    request's :class:`Work` ended."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._numbers = itertools.count(1)
        self.created: dict[int, tuple[str, str]] = {}
        self.cleaned: Counter[int] = Counter()
        # request id -> "begun", then "commit" or "rollback".
        self.work: dict[str, str] = {}

    def work_state(self, request_id: str, state: str) -> None:
        with self._lock:
            self.work[request_id] = state
            self._lock.notify_all()

    def wait_for_work(self, request_id: str, states: tuple[str, ...]) -> str:
        """Block (at most 30 s) until the request's Work is in one of ``states``."""
        with self._lock:
            self._lock.wait_for(lambda: self.work.get(request_id) in states, timeout=30)
            return self.work.get(request_id, "never begun")

    def create(self, kind: str, owner: str) -> int:
        with self._lock:
            number = next(self._numbers)
            self.created[number] = (kind, owner)
            return number

    def clean(self, number: int) -> None:
        with self._lock:
            self.cleaned[number] += 1

    def open_probes(self) -> int:
        with self._lock:
            return sum(
                1
                for n, (kind, _) in self.created.items()
                if kind == "probe" and not self.cleaned[n]
            )

    def problems(self, kinds: tuple[str, ...] = ("probe", "memory")) -> list[str]:
        """Components of ``kinds`` cleaned other than exactly once."""
        with self._lock:
            return [
                f"{kind} {n} of {owner} cleaned {self.cleaned[n]} times"
                for n, (kind, owner) in self.created.items()
                if kind in kinds and self.cleaned[n] != 1
            ]


class Probe:
    """A REQUEST component."""

    def __init__(self, number: int, ctx: UserExecutionContext) -> None:
        self.number = number
        self.user_id = ctx.user_id
        self.tenant_id = ctx.tenant_id
        self.request_id = ctx.request_id
        self.closed = False


class Memory:
    """A USER component."""

    def __init__(self, number: int, user: UserRef) -> None:
        self.number = number
        self.user_id = user.user_id
        self.tenant_id = user.tenant_id


class Work:
    """A REQUEST component standing for the request's database transaction: committed when
    its scope closes cleanly, rolled back when the scope closes with an exception (as a
    ``with conn.transaction():`` around a generator factory's ``yield`` does)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


class Stats:
    """An APP component through which the views reach the ledger and the registry."""

    def __init__(self, ledger: Ledger, registry: Registry) -> None:
        self.ledger = ledger
        self.registry = registry


def build_registry() -> tuple[Registry, Ledger]:
    """A registry with a REQUEST ``Probe``, a USER ``Memory`` and the APP ``Stats``."""
    registry = Registry()
    ledger = Ledger()

    def probe(ctx: UserExecutionContext) -> Iterator[Probe]:
        made = Probe(ledger.create("probe", f"{ctx.tenant_id}/{ctx.user_id}"), ctx)
        try:
            yield made
        finally:
            made.closed = True
            ledger.clean(made.number)

    def memory(user: UserRef) -> Iterator[Memory]:
        made = Memory(ledger.create("memory", f"{user.tenant_id}/{user.user_id}"), user)
        try:
            yield made
        finally:
            ledger.clean(made.number)

    def work(ctx: UserExecutionContext) -> Iterator[Work]:
        number = ledger.create("work", f"{ctx.tenant_id}/{ctx.user_id}")
        ledger.work_state(ctx.request_id, "begun")
        state = "rollback"
        try:
            yield Work(ctx.request_id)
            state = "commit"
        finally:
            # Its cleanup runs in its own request's context, or the state says whose.
            bound = ambient.current_context_or_none()
            if bound is None or bound.request_id != ctx.request_id:
                state += f" in the context of {bound and bound.request_id}"
            ledger.clean(number)
            ledger.work_state(ctx.request_id, state)

    registry.register(Probe, probe)
    registry.register(Work, work)
    registry.register(Memory, memory, lifetime=Lifetime.USER)
    registry.register(Stats, lambda: Stats(ledger, registry), lifetime=Lifetime.APP)
    return registry, ledger


# -- concurrency gate ---------------------------------------------------------------------------


class _Gate:
    def __init__(self, size: int) -> None:
        self.size = size
        self.arrived = 0
        self.full: anyio.Event | None = None


_gates: dict[str, _Gate] = {}


async def gate(name: str | None, size: int) -> bool | None:
    """Wait until ``size`` requests passed the gate ``name``; whether they did in time.

    The first ``size`` requests of a run wait for each other, which proves that many
    requests were inside their handlers, each with its own scope, at the same moment.
    """
    if not name:
        return None
    entry = _gates.setdefault(name, _Gate(size))
    if entry.full is None:
        entry.full = anyio.Event()
    entry.arrived += 1
    if entry.arrived >= entry.size:
        entry.full.set()
    with anyio.move_on_after(10):
        await entry.full.wait()
    return entry.full.is_set()


async def do_work(hang: bool) -> Work:
    """Begin the request's Work; with ``hang``, then wait until the framework cancels the
    view (its client has disconnected)."""
    work = await ambient.resolve(Work)
    if hang:
        await anyio.sleep_forever()
    return work


async def refuse() -> NoReturn:
    """Begin the request's Work, then refuse the caller as a view does whose token was
    revoked since it was issued: the answer is a 401, and the Work rolls back."""
    await ambient.resolve(Work)
    raise IdentityError("the token was revoked since it was issued", status=401)


async def grouped() -> None:
    """Begin the request's Work, then fail in a task group around the work: the group
    holds one ``PoolExhaustedError`` (every error in it carries a status), answered as it."""
    await ambient.resolve(Work)

    async def fetch() -> None:
        raise PoolExhaustedError("no connection within 0.1 s", retry_after=2)

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch)


async def work_stream(hang: bool) -> AsyncIterator[bytes]:
    """A streamed answer (an LLM's tokens, written as they come): a first chunk, then with
    ``hang`` no end until the framework cancels the stream (its client has disconnected)."""
    yield b"begun\n"
    if hang:
        await anyio.sleep_forever()
    yield b"done\n"


# -- view bodies ----------------------------------------------------------------------------------


def in_thread() -> dict[str, Any]:
    """What a worker thread sees: the context and the request's own Probe."""
    return {
        "thread_user": ambient.get_current_context().user_id,
        "thread_probe": ambient.resolve_sync(Probe).number,
    }


def describe(probe: Probe, memory: Memory, **extra: Any) -> dict[str, Any]:
    """The body every ``whoami`` view answers."""
    ctx = ambient.get_current_context()
    return {
        "user": ctx.user_id,
        "tenant": ctx.tenant_id,
        "request_id": ctx.request_id,
        "thread_id": ctx.thread_id,
        "probe": probe.number,
        "probe_user": probe.user_id,
        "probe_tenant": probe.tenant_id,
        "probe_request": probe.request_id,
        "memory": memory.number,
        "memory_user": memory.user_id,
        "memory_tenant": memory.tenant_id,
        **extra,
    }


async def describe_socket(gate_name: str | None, size: int) -> dict[str, Any]:
    """The message every ``whoami-socket`` websocket sends once accepted: as ``whoami``'s
    body, read where the socket's handler runs."""
    probe = await ambient.resolve(Probe)
    memory = await ambient.resolve(Memory)
    overlapped = await gate(gate_name, size)
    ctx = ambient.get_current_context()
    return describe(probe, memory, overlapped=overlapped, connection_id=ctx.connection_id)


def describe_sync() -> dict[str, Any]:
    """The body of a sync view, run in whatever thread the framework picks."""
    probe = ambient.resolve_sync(Probe)
    memory = ambient.resolve_sync(Memory)
    return describe(probe, memory, **in_thread(), thread_hop=True)


async def settled() -> dict[str, Any]:
    """Wait (bounded) until every other request's scope has closed; then the ledger.

    Scopes close after their response is sent, so a client can ask before the last
    cleanups ran. This request's own scope stays open and creates no Probe.
    """
    stats = await ambient.resolve(Stats)
    with anyio.move_on_after(10):
        # Other requests' scopes close in their own tasks (or another framework's threads);
        # a bounded poll is the one wait that works the same in every framework.
        while stats.registry.stats().open_scopes > 1 or stats.ledger.open_probes():  # noqa: ASYNC110
            await anyio.sleep(0.005)
    return {
        "open_scopes": stats.registry.stats().open_scopes,
        "probes": sum(1 for kind, _ in stats.ledger.created.values() if kind == "probe"),
        "problems": stats.ledger.problems(("probe", "work")),
    }


async def work_outcome(request_id: str, states: tuple[str, ...]) -> str:
    """The state of request ``request_id``'s Work once it is one of ``states`` (waiting at
    most 30 s): how a test learns over HTTP what happened in an app served from another
    process (granian)."""
    stats = await ambient.resolve(Stats)
    return await anyio.to_thread.run_sync(stats.ledger.wait_for_work, request_id, states)


_holds: dict[str, anyio.Event] = {}


def _hold(name: str) -> anyio.Event:
    return _holds.setdefault(name, anyio.Event())


async def held(name: str) -> None:
    """Wait (at most 30 s) until the hold ``name`` is released: a handler held mid-work
    while its client hangs up, in whatever process the server runs the app."""
    with anyio.move_on_after(30):
        await _hold(name).wait()
    del _holds[name]


def release(name: str) -> None:
    """Let the handler at the hold ``name`` go on (before or after it got there)."""
    _hold(name).set()
