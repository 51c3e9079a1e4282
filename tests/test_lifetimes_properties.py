"""Component lifetimes as a whole, checked against a model of the contract.

Hypothesis draws a registry (REQUEST, USER and APP components made by every kind of
factory, some failing to be made, some whose cleanup fails or outlasts ``cleanup_timeout``)
and a program of operations: users' scopes opened and closed in any order (normally, by a
raising body, by a cancellation), resolutions (awaited, ``resolve_sync`` on the loop or in
a worker thread, several tasks at once, every open scope of a user at once, a creator
cancelled as its factory awaits), work that outlives its scope (a task or worker thread
finishing a creation after the close, or holding the scope open), the clock moved,
``sweep()``, ``aclose()`` midway (the scopes open across it refused USER and APP
components, later ones served afresh) and at the end. Each scope runs in a task of its
own, as a request does; the program is replayed on asyncio and on trio, with or without an
observer.

After every operation the registry must agree with the model: which component each
resolution hands out (a USER component shared by all of a user's scopes and by no other
user, single-flight creation, nothing cached after a failed factory), which components
have been cleaned up and when (REQUEST ones newest first as their scope closes; USER ones
once idle past their ``idle_ttl`` of the registry's clock, at the next scope that opens or
closes or at ``sweep()``, or once evicted past ``max_users``, never while a scope holds
them), ``registry.stats()``, and the errors raised. At the end every component made has
been cleaned up exactly once.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef
from ambient.errors import CleanupError, CleanupTimeoutError, ResolutionError, ScopeClosedError

# (user_id, tenant_id): the same user id under two tenants is two users.
USERS = [("alice", None), ("alice", "acme"), ("bob", None), ("carol", "acme"), ("dave", "globex")]
# Kinds of factory: made without awaiting (resolve_sync can make them) or awaited.
SYNC_MADE = ("class", "plain", "close", "aclose", "generator", "context manager")
ASYNC_MADE = ("async def", "async generator", "async context manager")
ASYNC_CLEANUP = frozenset({"aclose", "async generator", "async context manager"})
NO_CLEANUP = frozenset({"plain"})
CLEANUP_TIMEOUT = 0.02
RANK = {Lifetime.REQUEST: 0, Lifetime.USER: 1, Lifetime.APP: 2}


class FactoryFailedError(Exception):
    """A factory that was told to fail."""


class CleanupFailedError(Exception):
    """A cleanup that was told to fail."""


class BodyFailedError(Exception):
    """A scope body that raised."""


class CreationCancelledError(Exception):
    """A resolution whose task was cancelled while a factory ran (an outcome, never
    raised)."""


# The cancel scope of the task resolving: a factory told to be interrupted cancels it.
_CANCEL: ContextVar[anyio.CancelScope | None] = ContextVar("_CANCEL", default=None)


@dataclass(frozen=True)
class Spec:
    """One registered component: its key, lifetime, factory kind, whether the factory
    takes the context or UserRef, how its cleanup behaves, its idle_ttl and the key its
    factory resolves first (if any)."""

    key: str
    lifetime: Lifetime
    kind: str
    takes: bool
    cleanup: str  # "ok", "raises" or "slow" (past cleanup_timeout)
    ttl: float
    dep: str | None

    @property
    def observable(self) -> bool:
        return self.kind not in NO_CLEANUP

    @property
    def fails_cleanup(self) -> bool:
        return self.observable and self.cleanup != "ok"


class World:
    """What the factories and cleanups did: every component made, in order, and every
    cleanup that ran."""

    def __init__(self) -> None:
        self.made: list[Made] = []
        self.cleaned: list[int] = []
        self.failing: Counter[str] = Counter()
        self.interrupt: Counter[str] = Counter()
        # A USER or APP factory or cleanup that saw a request's context: (what, key).
        self.shown: list[tuple[str, str]] = []
        # A creation to hold up once its dependencies are made: (made it here, go on).
        self.gates: dict[str, tuple[threading.Event, threading.Event]] = {}
        self.lock = threading.Lock()


class Made:
    """A component; ``id`` is its place in the order of creation."""

    def __init__(self, world: World, spec: Spec, arg: object, dep: object) -> None:
        self.world = world
        self.spec = spec
        self.arg = arg
        self.dep = dep
        with world.lock:
            self.id = len(world.made)
            world.made.append(self)

    def clean(self) -> None:
        self.world.cleaned.append(self.id)
        _no_context_shown(self.world, self.spec, "cleanup")
        if self.spec.cleanup == "raises":
            raise CleanupFailedError(self.spec.key)

    async def aclean(self) -> None:
        self.world.cleaned.append(self.id)
        _no_context_shown(self.world, self.spec, "cleanup")
        if self.spec.cleanup == "raises":
            raise CleanupFailedError(self.spec.key)
        if self.spec.cleanup == "slow":
            await anyio.sleep_forever()


class Closing(Made):
    def close(self) -> None:
        self.clean()


class AClosing(Made):
    async def aclose(self) -> None:
        await self.aclean()


class SyncCM:
    def __init__(self, world: World, spec: Spec, arg: object, dep: object) -> None:
        self.parts = (world, spec, arg, dep)
        self.made: Made | None = None

    def __enter__(self) -> Made:
        self.made = Made(*self.parts)
        return self.made

    def __exit__(self, *exc_info: object) -> None:
        assert self.made is not None
        self.made.clean()


class AsyncCM:
    def __init__(self, world: World, spec: Spec, arg: object, dep: object) -> None:
        self.parts = (world, spec, arg, dep)
        self.made: Made | None = None

    async def __aenter__(self) -> Made:
        _interrupt_if_told(self.parts[0], self.parts[1])
        await anyio.lowlevel.checkpoint()
        self.made = Made(*self.parts)
        return self.made

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.made is not None
        await self.made.aclean()


def _fail_if_told(world: World, spec: Spec) -> None:
    if world.failing[spec.key]:
        world.failing[spec.key] -= 1
        raise FactoryFailedError(spec.key)


def _no_context_shown(world: World, spec: Spec, what: str) -> None:
    """A USER or APP component is made and cleaned with no request's context shown."""
    if spec.lifetime is not Lifetime.REQUEST and ambient.current_context_or_none() is not None:
        world.shown.append((what, f"{spec.key} ({spec.lifetime.name})"))


def _interrupt_if_told(world: World, spec: Spec) -> None:
    """Cancel the resolving task, as a client gone or a timeout would, while the factory
    awaits: at its next checkpoint."""
    scope = _CANCEL.get()
    if scope is not None and world.interrupt[spec.key]:
        world.interrupt[spec.key] -= 1
        scope.cancel()


def _before(world: World, spec: Spec) -> object:
    _no_context_shown(world, spec, "factory")
    dep = ambient.resolve_sync(spec.dep) if spec.dep is not None else None
    gate = world.gates.pop(spec.key, None)
    if gate is not None:
        gate[0].set()
        gate[1].wait(10)
    _fail_if_told(world, spec)
    return dep


async def _abefore(world: World, spec: Spec) -> object:
    _no_context_shown(world, spec, "factory")
    dep = await ambient.resolve(spec.dep) if spec.dep is not None else None
    gate = world.gates.pop(spec.key, None)
    if gate is not None:
        gate[0].set()
        await anyio.to_thread.run_sync(gate[1].wait, 10)
    _interrupt_if_told(world, spec)
    await anyio.lowlevel.checkpoint()  # other tasks ask for it meanwhile
    _fail_if_told(world, spec)
    return dep


def factory_for(world: World, spec: Spec) -> Callable[..., Any]:
    """The factory of ``spec``'s kind, taking one argument or none."""
    kind = spec.kind

    def sync(cls: type[Made]) -> Callable[[object], Made]:
        return lambda arg: cls(world, spec, arg, _before(world, spec))

    if kind == "class":

        class Component(Closing):
            def __init__(self, arg: object) -> None:
                super().__init__(world, spec, arg, _before(world, spec))

        if spec.takes:
            return Component

        class Bare(Closing):
            def __init__(self) -> None:
                super().__init__(world, spec, None, _before(world, spec))

        return Bare
    if kind == "plain":
        core: Callable[[object], Any] = sync(Made)
    elif kind == "close":
        core = sync(Closing)
    elif kind == "aclose":
        core = sync(AClosing)
    elif kind == "context manager":

        def core(arg: object) -> SyncCM:
            return SyncCM(world, spec, arg, _before(world, spec))

    elif kind == "async context manager":

        def core(arg: object) -> AsyncCM:
            return AsyncCM(world, spec, arg, _before(world, spec))

    elif kind == "generator":

        def gen(arg: object) -> Iterator[Made]:
            made = Made(world, spec, arg, _before(world, spec))
            try:
                yield made
            finally:
                made.clean()

        if spec.takes:
            return gen

        def gen0() -> Iterator[Made]:
            return (yield from gen(None))

        return gen0
    elif kind == "async def":

        async def make(arg: object) -> Made:
            return Closing(world, spec, arg, await _abefore(world, spec))

        if spec.takes:
            return make

        async def make0() -> Made:
            return await make(None)

        return make0
    else:
        assert kind == "async generator"

        async def agen(arg: object) -> AsyncIterator[Made]:
            made = Made(world, spec, arg, await _abefore(world, spec))
            try:
                yield made
            finally:
                await made.aclean()

        return agen if spec.takes else _agen_no_arg(world, spec)
    if spec.takes:
        return core
    return lambda: core(None)


def _agen_no_arg(world: World, spec: Spec) -> Callable[[], AsyncIterator[Made]]:
    async def agen0() -> AsyncIterator[Made]:
        made = Made(world, spec, None, await _abefore(world, spec))
        try:
            yield made
        finally:
            await made.aclean()

    return agen0


# -- the model ------------------------------------------------------------------------------


@dataclass
class MEntry:
    """One user's USER components in the model."""

    refs: int = 0
    idle_since: float | None = None
    comps: dict[str, int] = field(default_factory=dict)
    deps: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class MScope:
    ref: UserRef
    ctx: UserExecutionContext
    # The user entry this scope holds (taken on its first USER component).
    entry: MEntry | None = None
    # Open across a registry.aclose(): refused USER and APP components for good.
    old: bool = False
    request: dict[str, int] = field(default_factory=dict)
    open: bool = True


class Expected(Exception):  # noqa: N818 - an outcome, not a failure
    """An error the model expects a resolution to raise."""

    def __init__(self, kind: type[BaseException]) -> None:
        super().__init__(kind.__name__)
        self.kind = kind


class Gated(Exception):  # noqa: N818 - a signal, not a failure
    """The model's resolution reached the creation held up at its gate."""

    def __init__(self, store: dict[str, int], owner: object) -> None:
        super().__init__()
        self.store = store
        self.owner = owner


class Model:
    """The contract, as plain bookkeeping: what lives where, what is cleaned when."""

    def __init__(self, specs: dict[str, Spec], max_users: int) -> None:
        self.specs = specs
        self.max_users = max_users
        self.now = 1000.0
        self.users: OrderedDict[UserRef, MEntry] = OrderedDict()
        self.app: dict[str, int] = {}
        self.failing: Counter[str] = Counter()
        self.interrupt: Counter[str] = Counter()
        self.gated: str | None = None
        self.next_id = 0
        # id -> (key, owner): REQUEST (its MScope), USER (UserRef) or APP (None).
        self.owner: dict[int, tuple[str, object]] = {}
        self.cleaned: set[int] = set()
        # Evicted users' components, cleaned at the latest by the next scope that opens or
        # closes, sweep() or aclose() (a resolution taking a user entry may clean them).
        self.evicted: list[int] = []
        self.doomed: list[int] = []  # cleaned by the operation under way
        self.created = 0
        self.failures = 0

    # resolution

    def resolve(self, scope: MScope, key: str, *, sync: bool) -> int:
        spec = self.specs.get(key)
        if spec is None:
            raise Expected(ResolutionError)
        if not scope.open:
            raise Expected(ScopeClosedError)
        if spec.lifetime is not Lifetime.REQUEST and scope.old:
            raise Expected(ScopeClosedError)
        if spec.lifetime is Lifetime.REQUEST:
            store, owner = scope.request, scope
        elif spec.lifetime is Lifetime.USER:
            entry = scope.entry or self.acquire(scope)
            store, owner = entry.comps, scope.ref
        else:
            store, owner = self.app, None
        if key in store:
            return store[key]
        if sync and spec.kind in ("async def", "async generator"):
            raise Expected(ResolutionError)
        if spec.dep is not None:
            awaited = spec.kind in ("async def", "async generator")
            self.resolve(scope, spec.dep, sync=sync or not awaited)
            if spec.lifetime is Lifetime.USER and self.specs[spec.dep].lifetime is Lifetime.USER:
                store_entry = scope.entry
                assert store_entry is not None
                store_entry.deps.setdefault(key, set()).add(spec.dep)
        if key == self.gated:
            raise Gated(store, owner)
        if spec.kind in ("async def", "async generator"):
            self.interrupted(key)
        if self.failing[key]:
            self.failing[key] -= 1
            raise Expected(FactoryFailedError)
        if sync and spec.kind == "async context manager":
            raise Expected(ResolutionError)
        if spec.kind == "async context manager":
            self.interrupted(key)
        made = store[key] = self.next_id
        self.next_id += 1
        self.created += 1
        self.owner[made] = (key, owner)
        return made

    def ungated(self, key: str, gated: Gated, *, awaited: bool) -> type[Exception]:
        """The rest of a creation held up until its scope closed: made, then kept by its
        user (whose entry lives on) or the app, else refused and cleaned up: at once, or
        by the next scope or sweep when a worker thread made it with an async cleanup."""
        if self.failing[key]:
            self.failing[key] -= 1
            return FactoryFailedError
        made = self.next_id
        self.next_id += 1
        self.created += 1
        self.owner[made] = (key, gated.owner)
        spec = self.specs[key]
        if spec.lifetime is Lifetime.APP or (
            spec.lifetime is Lifetime.USER
            and self.users.get(gated.owner) is not None  # type: ignore[call-overload]
            and self.users[gated.owner].comps is gated.store  # type: ignore[index]
        ):
            gated.store[key] = made
        elif awaited or spec.kind not in ASYNC_CLEANUP:
            self.doomed.append(made)
        else:
            self.evicted.append(made)
        return ScopeClosedError

    def interrupted(self, key: str) -> None:
        if self.interrupt[key]:
            self.interrupt[key] -= 1
            raise Expected(CreationCancelledError)

    def acquire(self, scope: MScope) -> MEntry:
        entry = self.users.get(scope.ref)
        if entry is not None:
            entry.refs += 1
            entry.idle_since = None
        else:
            entry = self.users[scope.ref] = MEntry(refs=1)
            self.evict()
        scope.entry = entry
        return entry

    def release(self, scope: MScope) -> None:
        entry, scope.entry = scope.entry, None
        if entry is None or self.users.get(scope.ref) is not entry:  # aclose() took it
            return
        entry.refs -= 1
        if entry.refs == 0:
            self.users.move_to_end(scope.ref)
            entry.idle_since = self.now
            self.evict()

    def evict(self) -> None:
        """Least recently released first, never a user in use."""
        for ref, entry in list(self.users.items()):
            if len(self.users) <= self.max_users:
                return
            if entry.refs == 0:
                del self.users[ref]
                self.evicted += entry.comps.values()

    def ttls(self, entry: MEntry) -> dict[str, float]:
        """Each component's idle_ttl, raised to that of every component whose factory
        resolved it (it may hold it)."""
        ttls = {key: self.specs[key].ttl for key in entry.comps}
        changed = True
        while changed:
            changed = False
            for dependent, deps in entry.deps.items():
                if dependent not in ttls:
                    continue
                for dep in deps:
                    if dep in ttls and ttls[dep] < ttls[dependent]:
                        ttls[dep] = ttls[dependent]
                        changed = True
        return ttls

    def flush(self) -> None:
        """What a scope opening or closing, or sweep(), cleans: evicted users'
        components, and those idle past their idle_ttl."""
        self.doomed += self.evicted
        self.evicted = []
        for ref, entry in list(self.users.items()):
            if entry.refs or entry.idle_since is None:
                continue
            ttls = self.ttls(entry)
            for key, made in list(entry.comps.items()):
                if entry.idle_since + ttls[key] <= self.now:
                    del entry.comps[key]
                    entry.deps.pop(key, None)
                    self.doomed.append(made)
            if not entry.comps:
                del self.users[ref]

    def close(self, scope: MScope) -> list[int]:
        """Close ``scope``: its REQUEST components newest first; then its user's released."""
        scope.open = False
        request = sorted(scope.request.values(), reverse=True)
        self.doomed += request
        scope.request = {}
        self.release(scope)
        self.flush()
        return request

    def shut(self) -> None:
        """aclose(): every USER and APP component."""
        self.doomed += self.evicted
        self.evicted = []
        for entry in self.users.values():
            self.doomed += entry.comps.values()
        self.users.clear()
        self.doomed += self.app.values()
        self.app = {}

    def mark_cleaned(self, ids: list[int]) -> None:
        for made in ids:
            assert made not in self.cleaned, f"component {made} cleaned twice by the model"
            self.cleaned.add(made)
            if self.spec_of(made).fails_cleanup:
                self.failures += 1

    def spec_of(self, made: int) -> Spec:
        return self.specs[self.owner[made][0]]


# -- the driver -----------------------------------------------------------------------------


class Slot:
    """A scope running in a task of its own, doing what it is sent."""

    def __init__(self, registry: Registry, ref: UserRef) -> None:
        self.ctx = UserExecutionContext.create(ref.user_id, tenant_id=ref.tenant_id)
        self.registry = registry
        self.send, self.receive = anyio.create_memory_object_stream[Any](math.inf)
        self.cancel = anyio.CancelScope()
        self.done = anyio.Event()
        self.outcome: BaseException | None = None
        self.scope: ambient.Scope | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        _CANCEL.set(self.cancel)
        try:
            with self.cancel:
                async with self.registry.open_scope(self.ctx) as scope:
                    self.scope = scope
                    task_status.started()
                    while True:
                        job = await self.receive.receive()
                        if job is None:
                            break
                        await job()
        except Exception as exc:
            self.outcome = exc
        finally:
            self.send.close()
            self.receive.close()
            self.done.set()

    async def ask(self, call: Callable[[], Awaitable[Any]]) -> tuple[Any, BaseException | None]:
        """Run ``call`` in the scope's task; its result or error."""
        box: list[Any] = [None, None]
        answered = anyio.Event()

        async def job() -> None:
            try:
                box[0] = await call()
            except Exception as exc:
                box[1] = exc
            finally:
                answered.set()

        await self.send.send(job)
        await answered.wait()
        return box[0], box[1]


@dataclass(frozen=True)
class Program:
    specs: tuple[Spec, ...]
    max_users: int
    ops: tuple[tuple[Any, ...], ...]
    final: tuple[str, ...]
    shut_early: bool
    observed: bool = False


class Seen(ambient.Observer):
    """Every component event, as (what, component id, user) (an observer changes which
    paths the core takes: it times and reports every creation and cleanup)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, UserRef | None]] = []

    def component_created(self, event: ambient.ComponentEvent) -> None:
        if event.error is None:
            self.events.append(("created", event.instance.id, event.user))

    def component_cleaned(self, event: ambient.ComponentEvent) -> None:
        self.events.append(("cleaned", event.instance.id, event.user))

    def ids(self, what: str) -> list[int]:
        return [made for kind, made, _ in self.events if kind == what]


class Driver:
    def __init__(self, program: Program) -> None:
        self.program = program
        self.world = World()
        self.clock_now = 1000.0
        self.seen = Seen() if program.observed else None
        self.registry = Registry(
            clock=lambda: self.clock_now,
            max_users=program.max_users,
            cleanup_timeout=CLEANUP_TIMEOUT,
            telemetry=self.seen,
        )
        self.specs = {spec.key: spec for spec in program.specs}
        for spec in program.specs:
            self.registry.register(
                spec.key,
                factory_for(self.world, spec),
                lifetime=spec.lifetime,
                idle_ttl=spec.ttl if spec.lifetime is Lifetime.USER else None,
            )
        self.model = Model(self.specs, program.max_users)
        self.slots: list[tuple[Slot, MScope]] = []
        self.closed: list[tuple[Slot, MScope]] = []
        self.step = ""
        self.shut_before = 0
        # A close that stopped waiting for a hold after cleanup_timeout (a machine too
        # busy to end the held work within it): the model no longer applies.
        self.gave_up = False

    # checks

    def made(self, made: int) -> Made:
        return self.world.made[made]

    def check_creations(self, before: int) -> None:
        """What was made is what the model made, in order, each for its owner."""
        model = self.model
        new = self.world.made[before:]
        assert [m.spec.key for m in new] == [
            model.owner[i][0] for i in range(before, model.next_id)
        ], f"{self.step}: made {[m.spec.key for m in new]}"
        for made in new:
            key, owner = model.owner[made.id]
            spec = self.specs[key]
            if spec.lifetime is Lifetime.USER:
                if spec.takes:
                    assert made.arg == owner, f"{self.step}: {key} made for {made.arg}"
                    assert type(made.arg) is UserRef
            elif spec.lifetime is Lifetime.REQUEST and spec.takes:
                assert isinstance(owner, MScope)
                assert made.arg is owner.ctx, f"{self.step}: {key} made with another context"
            if spec.dep is not None:
                assert isinstance(made.dep, Made)
                assert made.dep.spec.key == spec.dep

    def check_cleanups(self, before: int, maybe: list[int]) -> None:
        """Cleaned now: what the model dooms, maybe the evicted users' components it
        allows (all of them or none); never twice."""
        model = self.model
        new = self.world.cleaned[before:]
        twice = [m for m, n in Counter(self.world.cleaned).items() if n > 1]
        assert not twice, f"{self.step}: cleaned twice: {self.describe(twice)}"
        doomed, model.doomed = model.doomed, []
        seen = set(new)
        must = {m for m in doomed if model.spec_of(m).observable}
        missing = must - seen
        assert not missing, f"{self.step}: never cleaned: {self.describe(missing)}"
        may = {m for m in maybe if model.spec_of(m).observable}
        stray = seen - must - may
        assert not stray, f"{self.step}: cleaned too early: {self.describe(stray)}"
        took = seen & may
        if may and took:
            assert took == may, f"{self.step}: evicted users cleaned in part"
        flushed = bool(took) if may else self.unseen_flushed(doomed, maybe)
        if flushed:
            model.evicted = [m for m in model.evicted if m not in maybe]
            doomed = doomed + [m for m in maybe if m not in doomed]
        model.mark_cleaned(doomed)
        if self.seen is not None:
            self.check_seen()

    def check_seen(self) -> None:
        """The observer saw each component made and cleaned (those with nothing to clean
        too) once, when the model says, and each USER or APP one cleaned as its owner's."""
        model = self.model
        created = self.seen.ids("created")
        assert created == list(range(model.next_id)), f"{self.step}: seen made {created}"
        cleaned = self.seen.ids("cleaned")
        assert len(cleaned) == len(set(cleaned)), f"{self.step}: seen cleaned twice {cleaned}"
        assert set(cleaned) == model.cleaned, (
            f"{self.step}: seen cleaned {self.describe(set(cleaned) ^ model.cleaned)}"
        )
        for what, made, user in self.seen.events:
            key, owner = model.owner[made]
            if what == "cleaned" and self.specs[key].lifetime is not Lifetime.REQUEST:
                assert user == owner, f"{self.step}: {made} cleaned as {user}, not {owner}"

    def unseen_flushed(self, doomed: list[int], maybe: list[int]) -> bool:
        """Whether evicted components with no cleanup of their own went (by the count)."""
        if not maybe:
            return False
        return self.registry.stats().cleaned == len(self.model.cleaned) + len(doomed) + len(maybe)

    def check_order(self, request: list[int], before: int) -> None:
        """A scope's REQUEST components are cleaned newest first."""
        ran = [m for m in self.world.cleaned[before:] if m in set(request)]
        expected = [m for m in request if self.model.spec_of(m).observable]
        assert ran == expected, f"{self.step}: REQUEST cleanup order {ran} != {expected}"

    def check_stats(self) -> None:
        model = self.model
        stats = self.registry.stats()
        expected = (
            sum(1 for _, m in self.slots if m.open),
            len(model.users),
            sum(len(e.comps) for e in model.users.values()),
            model.created,
            len(model.cleaned),
            model.failures,
        )
        actual = (
            stats.open_scopes,
            stats.live_users,
            stats.live_user_components,
            stats.created,
            stats.cleaned,
            stats.cleanup_failures,
        )
        assert actual == expected, f"{self.step}: stats {actual} != model {expected}"

    def describe(self, ids: Any) -> list[str]:
        shown = []
        for made in sorted(ids):
            key, owner = self.model.owner[made]
            whose = f"a request of {owner.ref}" if isinstance(owner, MScope) else owner
            shown.append(f"{made}: {key} of {whose}")
        return shown

    # steps

    async def run(self) -> None:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                self.group = group
                for op in self.program.ops:
                    await self.do(op)
                    if self.gave_up:
                        group.cancel_scope.cancel()
                        return
                await self.finish()

    async def do(self, op: tuple[Any, ...]) -> None:
        self.step = repr(op)
        made_before = len(self.world.made)
        cleaned_before = len(self.world.cleaned)
        maybe = list(self.model.evicted)
        name = op[0]
        if name == "open":
            await self.open(USERS[op[1]])
        elif name == "close" and self.open_slots():
            await self.close(self.pick(op[1]), op[2], cleaned_before)
        elif name == "resolve" and self.open_slots():
            await self.resolve(self.pick(op[1]), self.key(op[2]), op[3])
        elif name == "use" and self.open_slots():
            for spec in self.program.specs:
                await self.resolve(self.pick(op[1]), spec.key, op[2])
        elif name == "interrupt" and self.open_slots():
            key = self.key(op[2])
            self.world.interrupt[key] += 1
            self.model.interrupt[key] += 1
            await self.interrupt(self.pick(op[1]), key, op[3], cleaned_before)
            assert self.world.interrupt == self.model.interrupt, f"{self.step}: interrupted"
            self.world.interrupt.clear()
            self.model.interrupt.clear()
        elif name == "held" and self.open_slots():
            await self.held(self.pick(op[1]), self.key(op[2]), op[3], cleaned_before)
        elif name == "straggle" and self.open_slots():
            await self.straggle(self.pick(op[1]), self.key(op[2]), op[3], op[4], cleaned_before)
        elif name == "burst" and self.open_slots():
            await self.burst(self.pick(op[1]), self.key(op[2]), op[3], thread=op[4])
        elif name == "together" and self.open_slots():
            await self.together(self.pick(op[1]), self.key(op[2]))
        elif name == "fail":
            key = self.key(op[1])
            self.world.failing[key] += 1
            self.model.failing[key] += 1
        elif name == "advance":
            self.clock_now += op[1]
            self.model.now += op[1]
        elif name == "shutdown":
            await self.shut(twice=op[1])
        elif name == "sweep":
            await self.registry.sweep()
            self.model.flush()
        elif name == "closed" and self.closed:
            slot, _ = self.closed[op[1] % len(self.closed)]
            assert slot.scope is not None
            with pytest.raises(ScopeClosedError):
                await slot.scope.resolve(self.key(op[2]))
        elif name == "unknown" and self.open_slots():
            slot, _ = self.pick(op[1])
            _, error = await slot.ask(lambda: ambient.resolve("nothing registered"))
            assert type(error) is ResolutionError, f"{self.step}: {error!r}"
            assert self.program.specs[0].key in str(error)
        if self.gave_up:
            return
        maybe += self.model.evicted
        assert not self.world.shown, f"{self.step}: a request's context shown {self.world.shown}"
        self.check_creations(made_before)
        maybe = [m for m in dict.fromkeys(maybe) if m not in self.model.doomed]
        self.check_cleanups(cleaned_before, maybe)
        self.check_stats()

    def open_slots(self) -> list[tuple[Slot, MScope]]:
        return [pair for pair in self.slots if pair[1].open]

    def pick(self, index: int) -> tuple[Slot, MScope]:
        slots = self.open_slots()
        return slots[index % len(slots)]

    def key(self, index: int) -> str:
        return self.program.specs[index % len(self.program.specs)].key

    async def open(self, user: tuple[str, str | None]) -> None:
        ref = UserRef(user[0], user[1])
        slot = Slot(self.registry, ref)
        await self.group.start(slot.run)
        self.model.flush()
        self.slots.append((slot, MScope(ref, slot.ctx)))

    async def close(self, pair: tuple[Slot, MScope], how: str, before: int) -> None:
        slot = pair[0]
        if how == "cancel":
            slot.cancel.cancel()
        else:
            await slot.send.send(_raise_body if how == "raise" else None)
        await slot.done.wait()
        self.ended(pair, how, before)

    def ended(self, pair: tuple[Slot, MScope], how: str, before: int) -> None:
        """Check how a scope ended, and the cleanups it ran."""
        slot, mscope = pair
        request = self.model.close(mscope)
        self.closed.append(pair)
        self.check_order(request, before)
        failures = [self.failure_of(m) for m in request if self.model.spec_of(m).fails_cleanup]
        outcome = slot.outcome
        if how == "cancel":
            assert outcome is None, f"{self.step}: {outcome!r}"
        elif how == "raise":
            assert type(outcome) is BodyFailedError, f"{self.step}: {outcome!r}"
            notes = getattr(outcome, "__notes__", [])
            assert len(notes) == len(failures), f"{self.step}: notes {notes}"
        elif failures:
            assert type(outcome) is CleanupError, f"{self.step}: {outcome!r}"
            assert [type(e) for e in outcome.exceptions] == failures, self.step
        else:
            assert outcome is None, f"{self.step}: {outcome!r}"

    def failure_of(self, made: int) -> type[Exception]:
        spec = self.model.spec_of(made)
        return CleanupFailedError if spec.cleanup == "raises" else CleanupTimeoutError

    def expect(self, mscope: MScope, key: str, *, sync: bool) -> tuple[Any, Any]:
        try:
            return self.model.resolve(mscope, key, sync=sync), None
        except Expected as expected:
            return None, expected.kind

    def check_one(
        self, result: Any, error: BaseException | None, expected: tuple[Any, Any]
    ) -> None:
        want, want_error = expected
        if want_error is not None:
            assert type(error) is want_error, f"{self.step}: {error!r}, not {want_error}"
            return
        assert error is None, f"{self.step}: {error!r}"
        assert isinstance(result, Made), f"{self.step}: {result!r}"
        assert result.id == want, f"{self.step}: got {result.id}, model {want}"

    async def resolve(self, pair: tuple[Slot, MScope], key: str, how: str) -> None:
        slot, mscope = pair
        expected = self.expect(mscope, key, sync=how != "async")
        if how == "async":
            result, error = await slot.ask(lambda: ambient.resolve(key))
        elif how == "sync":

            async def in_task() -> Any:
                return ambient.resolve_sync(key)

            result, error = await slot.ask(in_task)
        else:
            result, error = await slot.ask(
                lambda: anyio.to_thread.run_sync(ambient.resolve_sync, key)
            )
        self.check_one(result, error, expected)

    async def burst(self, pair: tuple[Slot, MScope], key: str, tasks: int, *, thread: bool) -> None:
        """Several tasks of one scope (and a worker thread) ask for one key at once."""
        slot, mscope = pair
        spec = self.specs[key]
        thread = thread and spec.kind in SYNC_MADE and _sync_chain(self.specs, spec)
        callers = tasks + thread
        outcomes = [self.expect(mscope, key, sync=False) for _ in range(callers)]

        async def everyone() -> list[tuple[Any, BaseException | None]]:
            got: list[tuple[Any, BaseException | None]] = []

            async def one(call: Callable[[], Awaitable[Any]]) -> None:
                try:
                    got.append((await call(), None))
                except Exception as exc:
                    got.append((None, exc))

            async with anyio.create_task_group() as group:
                for _ in range(tasks):
                    group.start_soon(one, lambda: ambient.resolve(key))
                if thread:
                    group.start_soon(
                        one, lambda: anyio.to_thread.run_sync(ambient.resolve_sync, key)
                    )
            return got

        got, error = await slot.ask(everyone)
        assert error is None, f"{self.step}: {error!r}"
        self.check_many(got, outcomes)

    async def held(self, pair: tuple[Slot, MScope], key: str, close: str, before: int) -> None:
        """Work the request handed a hold to resolves while the scope's close waits for
        the hold: it is served, and cleaned up by that close once the hold is released."""
        slot, mscope = pair
        scope = slot.scope
        assert scope is not None
        expected = self.expect(mscope, key, sync=False)
        go, finished = anyio.Event(), anyio.Event()
        got: list[tuple[Any, BaseException | None]] = []
        late: list[bool] = []

        async def work(hold: Any) -> None:
            await go.wait()
            with hold:
                try:
                    got.append((await ambient.resolve(key), None))
                except Exception as exc:
                    got.append((None, exc))
                late.append(scope.closed)
            finished.set()

        async def take() -> None:
            self.group.start_soon(work, scope.hold())  # in the scope's context

        await slot.ask(take)
        closing = anyio.current_time()
        if close == "cancel":
            slot.cancel.cancel()
        else:
            await slot.send.send(_raise_body if close == "raise" else None)
        await anyio.wait_all_tasks_blocked()
        early = slot.done.is_set()
        go.set()
        await finished.wait()
        if early or late[0]:
            # Closed under the hold: only once cleanup_timeout went by waiting for it.
            waited = anyio.current_time() - closing
            assert waited >= CLEANUP_TIMEOUT, f"{self.step}: closed under its hold"
            self.gave_up = True
            return
        self.check_one(*got[0], expected)
        await slot.done.wait()
        self.ended(pair, close, before)

    async def straggle(
        self, pair: tuple[Slot, MScope], key: str, how: str, close: str, before: int
    ) -> None:
        """Work that outlives its request: a task or a worker thread of the scope starts
        making a component, and the scope closes before it is done."""
        slot, mscope = pair
        spec = self.specs[key]
        awaited = how == "task"
        if awaited and spec.kind not in ("async def", "async generator"):
            return
        if not awaited and (spec.kind not in SYNC_MADE or not _sync_chain(self.specs, spec)):
            return
        gate = self.world.gates[key] = (threading.Event(), threading.Event())
        self.model.gated = key
        try:
            self.model.resolve(mscope, key, sync=not awaited)
        except Gated as reached:
            gated: Gated | None = reached
            expected: Any = None
        except Expected as early:
            gated, expected = None, early.kind
        else:
            gated = expected = None  # made already: handed out at once
        finally:
            self.model.gated = None
        outcome: list[Any] = []
        done = anyio.Event()

        async def straggler() -> None:
            try:
                if awaited:
                    outcome.append(await ambient.resolve(key))
                else:
                    outcome.append(await anyio.to_thread.run_sync(ambient.resolve_sync, key))
            except Exception as exc:
                outcome.append(exc)
            finally:
                done.set()

        async def start() -> None:
            self.group.start_soon(straggler)  # in the scope's context, outside its body

        await slot.ask(start)
        if gated is None:
            await done.wait()
            self.world.gates.pop(key, None)
            if expected is None:
                assert isinstance(outcome[0], Made), f"{self.step}: {outcome}"
            else:
                assert type(outcome[0]) is expected, f"{self.step}: {outcome}"
            return
        await anyio.to_thread.run_sync(gate[0].wait, 10)
        await self.close(pair, close, before)
        expected = self.model.ungated(key, gated, awaited=awaited)
        gate[1].set()
        await done.wait()
        assert type(outcome[0]) is expected, f"{self.step}: {outcome}"

    async def interrupt(self, pair: tuple[Slot, MScope], key: str, tasks: int, before: int) -> None:
        """Resolutions whose creator is cancelled as its factory awaits: the whole scope's
        body (``tasks`` 0), or one of several tasks asking at once (the others then make
        it)."""
        slot, mscope = pair
        if not tasks:
            expected = self.expect(mscope, key, sync=False)
            result, error = await slot.ask(lambda: ambient.resolve(key))
            if expected[1] is not CreationCancelledError:
                self.check_one(result, error, expected)
                return
            await slot.done.wait()
            self.ended(pair, "cancel", before)
            return
        outcomes = [self.expect(mscope, key, sync=False) for _ in range(tasks)]

        async def everyone() -> list[tuple[Any, BaseException | None]]:
            got: list[tuple[Any, BaseException | None]] = []

            async def one() -> None:
                with anyio.CancelScope() as cancel:
                    _CANCEL.set(cancel)
                    try:
                        got.append((await ambient.resolve(key), None))
                    except Exception as exc:
                        got.append((None, exc))
                if cancel.cancelled_caught:
                    got.append((None, CreationCancelledError()))

            async with anyio.create_task_group() as group:
                for _ in range(tasks):
                    group.start_soon(one)
            return got

        got, error = await slot.ask(everyone)
        assert error is None, f"{self.step}: {error!r}"
        self.check_many(got, outcomes)

    def check_many(
        self, got: list[tuple[Any, BaseException | None]], outcomes: list[tuple[Any, Any]]
    ) -> None:
        """The same outcomes as the model's, in any order (which caller fails is chance)."""
        actual = Counter(
            ("error", type(e).__name__) if e is not None else ("made", r.id) for r, e in got
        )
        wanted = Counter(
            ("error", e.__name__) if e is not None else ("made", r) for r, e in outcomes
        )
        assert actual == wanted, f"{self.step}: {actual} != model {wanted}"

    async def together(self, pair: tuple[Slot, MScope], key: str) -> None:
        """Every open scope of one user asks for one USER component at once."""
        ref = pair[1].ref
        spec = self.specs[key]
        if spec.lifetime is not Lifetime.USER:
            users = [s.key for s in self.program.specs if s.lifetime is Lifetime.USER]
            if not users:
                return
            key = users[0]
        pairs = [p for p in self.open_slots() if p[1].ref == ref]
        outcomes = [self.expect(m, key, sync=False) for _, m in pairs]
        got: list[tuple[Any, BaseException | None]] = []

        async def ask(slot: Slot) -> None:
            got.append(await slot.ask(lambda: ambient.resolve(key)))

        async with anyio.create_task_group() as group:
            for slot, _ in pairs:
                group.start_soon(ask, slot)
        self.check_many(got, outcomes)

    async def finish(self) -> None:
        """Close what is still open, and the registry: before those scopes close or
        after."""
        self.step = "aclose"
        if self.program.shut_early:
            await self.shut()
            self.check_after_shut()
            keys = [s.key for s in self.program.specs if s.lifetime is not Lifetime.REQUEST]
            for slot, _ in self.open_slots():
                for key in keys[:1]:
                    _, error = await slot.ask(lambda k=key: ambient.resolve(k))  # type: ignore[misc]
                    assert type(error) is ScopeClosedError, f"after aclose: {error!r}"
        for index, (_, mscope) in enumerate(list(self.slots)):
            if mscope.open:
                how = self.program.final[index % len(self.program.final)]
                await self.do(("close", self.open_slots().index((_, mscope)), how))
        if not self.program.shut_early:
            self.step = "aclose"
            await self.shut()
            self.check_after_shut()
        cleaned = Counter(self.world.cleaned)
        for made in self.world.made:
            if made.spec.observable:
                assert cleaned[made.id] == 1, f"component {made.id} cleaned {cleaned[made.id]}x"
        stats = self.registry.stats()
        assert stats.created == stats.cleaned == len(self.world.made), stats
        assert (stats.open_scopes, stats.live_users, stats.live_user_components) == (0, 0, 0)

    def check_after_shut(self) -> None:
        self.check_creations(len(self.world.made))
        self.check_cleanups(self.shut_before, [])
        self.check_stats()

    async def shut(self, *, twice: bool = False) -> None:
        """aclose(): every USER and APP component goes, users' first; the scopes open
        across it never get one again."""
        before = self.shut_before = len(self.world.cleaned)
        for _, mscope in self.open_slots():
            mscope.old = True
        self.model.shut()
        doomed = list(self.model.doomed)
        failures = sorted(
            self.failure_of(m).__name__ for m in doomed if self.model.spec_of(m).fails_cleanup
        )
        # Called twice at once (two servers sharing the registry): the second waits for
        # the first, cleans nothing more and raises the same failures.
        raised: list[BaseException | None] = []

        async def close() -> None:
            try:
                await self.registry.aclose()
            except CleanupError as error:
                raised.append(error)
            else:
                raised.append(None)

        async with anyio.create_task_group() as group:
            for _ in range(1 + twice):
                group.start_soon(close)
        for error in raised:
            got = sorted(type(e).__name__ for e in error.exceptions) if error else []
            assert got == failures, f"aclose raised {error!r}, model: {failures}"
        # Users' components go before the app's.
        ran = [self.model.owner[m][1] for m in self.world.cleaned[before:]]
        apps = [i for i, owner in enumerate(ran) if owner is None]
        users = [i for i, owner in enumerate(ran) if owner is not None]
        assert not apps or not users or max(users) < min(apps), f"aclose order {ran}"


async def _raise_body() -> None:
    raise BodyFailedError


def _sync_chain(specs: dict[str, Spec], spec: Spec) -> bool:
    while spec.dep is not None:
        spec = specs[spec.dep]
        if spec.kind not in SYNC_MADE:
            return False
    return True


# -- strategies -----------------------------------------------------------------------------


@st.composite
def programs(draw: st.DrawFn) -> Program:
    count = draw(st.integers(2, 5))
    specs: list[Spec] = []
    for index in range(count):
        lifetime = draw(st.sampled_from([Lifetime.REQUEST, Lifetime.USER] * 2 + [Lifetime.APP]))
        kind = draw(st.sampled_from(SYNC_MADE + ASYNC_MADE))
        cleanup = draw(st.sampled_from(["ok", "ok", "ok", "raises", "slow"]))
        if cleanup == "slow" and kind not in ASYNC_CLEANUP:
            cleanup = "ok"
        # A dependency lives at least as long; one a sync factory resolves is made sync.
        deps = [
            s.key
            for s in specs
            if RANK[s.lifetime] >= RANK[lifetime]
            and (kind in ("async def", "async generator") or s.kind in SYNC_MADE)
        ]
        dep = draw(st.none() | st.sampled_from(deps)) if deps else None
        specs.append(
            Spec(
                key=f"c{index}",
                lifetime=lifetime,
                kind=kind,
                takes=lifetime is not Lifetime.APP and draw(st.booleans()),
                cleanup=cleanup,
                ttl=draw(st.sampled_from([0.0, 5.0, 10.0, 30.0])),
                dep=dep,
            )
        )
    index = st.integers(0, 7)
    shapes: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
        "open": st.tuples(st.integers(0, len(USERS) - 1)),
        "close": st.tuples(index, st.sampled_from(["normal", "raise", "cancel"])),
        "resolve": st.tuples(index, index, st.sampled_from(["async", "async", "sync", "thread"])),
        "use": st.tuples(index, st.sampled_from(["async", "sync"])),
        "burst": st.tuples(index, index, st.integers(2, 3), st.booleans()),
        "together": st.tuples(index, index),
        "interrupt": st.tuples(index, index, st.integers(0, 3)),
        "held": st.tuples(index, index, st.sampled_from(["normal", "raise", "cancel"])),
        "straggle": st.tuples(
            index,
            index,
            st.sampled_from(["task", "thread"]),
            st.sampled_from(["normal", "raise", "cancel"]),
        ),
        "fail": st.tuples(index),
        "advance": st.tuples(st.sampled_from([1.0, 4.0, 5.0, 10.0, 30.0])),
        "sweep": st.tuples(),
        "closed": st.tuples(index, index),
        "unknown": st.tuples(index),
    }
    # Weighted: mostly scopes opening, resolving and closing.
    names = st.sampled_from(
        ["open"] * 3
        + ["close"] * 3
        + ["resolve"] * 4
        + ["use"] * 2
        + ["burst", "together", "interrupt", "straggle", "held"] * 2
        + ["fail", "advance", "advance", "advance", "sweep", "sweep", "closed", "unknown"]
    )
    ops = [("open", draw(st.integers(0, len(USERS) - 1))) for _ in range(draw(st.integers(1, 3)))]
    ops.extend(
        (name, *draw(shapes[name])) for name in draw(st.lists(names, min_size=12, max_size=40))
    )
    if draw(st.integers(0, 3)) == 0:  # the registry closed, and opened again, midway
        ops.insert(draw(st.integers(1, len(ops))), ("shutdown", draw(st.booleans())))
    return Program(
        specs=tuple(specs),
        max_users=draw(st.integers(2, 4)),
        ops=tuple(ops),
        final=tuple(
            draw(st.lists(st.sampled_from(["normal", "raise", "cancel"]), min_size=1, max_size=3))
        ),
        shut_early=draw(st.booleans()),
        observed=draw(st.booleans()),
    )


def _two_idle_users_then_a_third(resolve: str, *, shut_early: bool) -> Program:
    """alice's and bob's USER components idle, bob's released first, then carol's made
    with room for two users: bob's go (least recently used), and are cleaned by the close
    right after or, when the resolution was sync, by ``aclose()`` at the latest."""
    memory = Spec("c0", Lifetime.USER, "close", True, "ok", 30.0, None)
    return Program(
        specs=(memory,),
        max_users=2,
        ops=(
            ("open", 0),
            ("open", 2),
            ("resolve", 0, 0, "async"),
            ("resolve", 1, 0, "async"),
            ("close", 1, "normal"),
            ("close", 0, "normal"),
            ("open", 3),
            ("resolve", 0, 0, resolve),
        ),
        final=("normal",),
        shut_early=shut_early,
    )


def _made_for_an_idle_user(how: str) -> Program:
    """A task (or worker thread) of alice's request makes her short-lived USER component
    as the request ends: it is kept with her components, then expires with its own
    idle_ttl, at the next scope that opens, not with the longer-lived one's."""
    kind = "async def" if how == "task" else "close"
    return Program(
        specs=(
            Spec("c0", Lifetime.USER, "close", True, "ok", 30.0, None),
            Spec("c1", Lifetime.USER, kind, True, "ok", 5.0, None),
        ),
        max_users=4,
        ops=(
            ("open", 0),
            ("resolve", 0, 0, "async"),
            ("straggle", 0, 1, how, "normal"),
            ("advance", 10.0),
            ("open", 2),
        ),
        final=("normal",),
        shut_early=False,
    )


def _requests_then_an_idle_user() -> Program:
    """Three REQUEST components with cleanups cleaned newest first, by a scope holding a
    USER component and by one holding none (each closes its own way); then the user's
    component kept a tick before its idle_ttl has passed."""
    return Program(
        specs=(
            Spec("c0", Lifetime.REQUEST, "close", True, "ok", 0.0, None),
            Spec("c1", Lifetime.REQUEST, "generator", False, "ok", 0.0, None),
            Spec("c2", Lifetime.REQUEST, "context manager", True, "ok", 0.0, None),
            Spec("c3", Lifetime.USER, "close", True, "ok", 5.0, None),
        ),
        max_users=2,
        ops=(
            ("open", 0),
            ("use", 0, "async"),
            ("close", 0, "normal"),
            ("open", 2),
            ("resolve", 0, 0, "async"),
            ("resolve", 0, 1, "async"),
            ("resolve", 0, 2, "sync"),
            ("close", 0, "normal"),
            ("advance", 4.0),
            ("sweep",),
        ),
        final=("normal",),
        shut_early=False,
    )


def _a_user_in_use_before_an_idle_one() -> Program:
    """Three users with room for two: the one idle is evicted, never the one in use made
    before it. Then a REQUEST factory fails once: nothing is cached, and the next
    resolution makes it. Last, two aclose() at once both raise the failed cleanups."""
    return Program(
        specs=(
            Spec("c0", Lifetime.USER, "close", True, "raises", 30.0, None),
            Spec("c1", Lifetime.REQUEST, "close", True, "ok", 0.0, None),
        ),
        max_users=2,
        ops=(
            ("open", 0),
            ("open", 2),
            ("resolve", 0, 0, "async"),
            ("resolve", 1, 0, "async"),
            ("close", 1, "normal"),
            ("open", 3),
            ("resolve", 1, 0, "async"),
            ("fail", 1),
            ("resolve", 0, 1, "async"),
            ("resolve", 0, 1, "async"),
            ("shutdown", True),
        ),
        final=("normal",),
        shut_early=False,
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@example(program=_a_user_in_use_before_an_idle_one())
@example(program=_requests_then_an_idle_user())
@example(program=_made_for_an_idle_user("task"))
@example(program=_made_for_an_idle_user("thread"))
@example(program=_two_idle_users_then_a_third("async", shut_early=False))
@example(program=_two_idle_users_then_a_third("sync", shut_early=True))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs())
def test_lifetimes_agree_with_the_model(backend: str, program: Program) -> None:
    """Any program of scopes, resolutions, failures, clock moves and sweeps leaves the
    registry where the model of the contract says, step by step, and ``aclose()`` then
    cleans every component made exactly once."""
    driver = Driver(program)
    anyio.run(driver.run, backend=backend)
    assume(not driver.gave_up)
