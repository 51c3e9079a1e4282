"""ambient.migration, property-based: any ids, percents, modes, orders of resolves and
sequences of failures against a model of what the contract promises.

Each property runs on asyncio and trio, through real registries and scopes; the window of
``max_error_rate`` is driven by a clock moved by hand, never by sleeping.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import ambient
from ambient import (
    CleanupError,
    InvalidContextError,
    Registry,
    ScopeClosedError,
    UserExecutionContext,
    bind_context,
)
from ambient._context import validate_id
from ambient.migration import (
    GlobalStateError,
    GlobalStateWarning,
    Rollout,
    RolloutMode,
    global_state_report,
    guard_global,
    reset_global_state_report,
)
from tests.test_migration import (
    LEGACY,
    Catalog,
    FakeClock,
    counter_values,
    fixture_metric_reader,  # noqa: F401 - the fixture, used by name
)

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
PROPERTY = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MODES: tuple[RolloutMode, ...] = ("legacy", "shadow", "component")
# A fresh name per example: metrics and report entries of one example never mix with
# another's, so a fixture's reader serves every example of a test.
_names = itertools.count()


def fresh(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def _valid_id(value: str) -> bool:
    try:
        validate_id("user_id", value)
    except InvalidContextError:
        return False
    return True


# Ids ambient takes: non-ASCII letters, symbols, inner spaces.
ids = st.text(
    st.characters(exclude_categories=["Cc", "Cf", "Cs", "Zl", "Zp"]), min_size=1, max_size=24
).filter(_valid_id)
tenants = st.none() | ids
users = st.lists(st.tuples(ids, tenants), min_size=1, max_size=12, unique=True)
percents = st.sampled_from([0, 100, 0.01, 99.99]) | st.floats(0, 100) | st.integers(0, 100)


@dataclass
class Engine:
    """A per-request component that knows whose it is and counts its cleanups."""

    user_id: str
    tenant_id: str | None
    cleaned: int = 0


@dataclass
class Engines:
    """A registry of one REQUEST component whose creation and cleanup fail on demand."""

    registry: Registry = field(default_factory=Registry)
    made: list[Engine] = field(default_factory=list)
    fail_creation: set[str] = field(default_factory=set)
    fail_once: set[str] = field(default_factory=set)  # the first attempt only
    fail_cleanup: set[str] = field(default_factory=set)
    asynchronous: bool = False  # an async factory, whose creation other tasks overlap

    def __post_init__(self) -> None:
        self.registry.register(Engine, self.make_async if self.asynchronous else self.make)

    def make(self, context: UserExecutionContext) -> Iterator[Engine]:
        if context.user_id in self.fail_creation or context.user_id in self.fail_once:
            self.fail_once.discard(context.user_id)
            msg = "engine backend unavailable"
            raise ConnectionError(msg)
        engine = Engine(context.user_id, context.tenant_id)
        self.made.append(engine)
        yield engine
        engine.cleaned += 1
        if context.user_id in self.fail_cleanup:
            msg = "engine did not shut down"
            raise ConnectionError(msg)

    async def make_async(self, context: UserExecutionContext) -> AsyncIterator[Engine]:
        await anyio.lowlevel.checkpoint()
        made = self.make(context)
        yield next(made)
        await anyio.lowlevel.checkpoint()
        next(made, None)

    def check_cleaned(self) -> None:
        """Every component created was cleaned exactly once."""
        assert [e.cleaned for e in self.made] == [1] * len(self.made)


def context_of(user: tuple[str, str | None]) -> UserExecutionContext:
    return UserExecutionContext.create(user[0], tenant_id=user[1])


async def request(engines: Engines, rollout: Rollout[Any], user: tuple[str, str | None]) -> Any:
    """One request of ``user``: what its resolve() gives, checked to be its own."""
    async with engines.registry.open_scope(context_of(user)):
        got = await rollout.resolve()
    if got is not LEGACY:
        assert (got.user_id, got.tenant_id) == user
    return got


# -- bucketing --------------------------------------------------------------------------------


@BACKENDS
@PROPERTY
@given(
    # Any text with an ASCII letter or digit, which names the environment variables.
    key=st.tuples(st.text(max_size=15), st.sampled_from("kZ7")).map("".join),
    people=users,
    low=percents,
    high=percents,
    mode=st.sampled_from(["shadow", "component"]),
)
def test_a_user_keeps_their_path_and_raising_the_percent_only_adds_users(
    backend: str,
    key: str,
    people: list[tuple[str, str | None]],
    low: float,
    high: float,
    mode: RolloutMode,
) -> None:
    """For any key, ids (tenant or not) and two percents: each user takes the same path in
    every request at a percent, the one includes() says; at the higher percent every user
    selected at the lower one still is; 0 selects nobody and 100 everybody. Each
    component is its user's and is cleaned once."""
    low, high = min(low, high), max(low, high)
    engines = Engines()
    rollout: Rollout[Any] = Rollout(Engine, legacy=LEGACY, mode=mode, percent=low, name=key)

    async def selected() -> set[tuple[str, str | None]]:
        chosen = set()
        for user in people:
            paths = set()
            for _ in range(2):
                got = await request(engines, rollout, user)
                paths.add(got is not LEGACY)
            included = rollout.includes(*user)
            assert paths == {included and mode == "component"}, user
            if included:
                chosen.add(user)
        return chosen

    async def run() -> None:
        at_low = await selected()
        rollout.percent = high
        at_high = await selected()
        assert at_low <= at_high
        for percent, chosen in ((low, at_low), (high, at_high)):
            if percent == 0:
                assert chosen == set()
            if percent == 100:
                assert chosen == set(people)

    anyio.run(run, backend=backend)
    engines.check_cleaned()
    state = rollout.state()
    assert state.legacy + state.shadow + state.component == 4 * len(people)
    assert len(engines.made) == state.shadow + state.component


@PROPERTY
@given(salt=st.text(min_size=1, max_size=16), other=st.text(min_size=1), percent=percents)
def test_the_share_selected_is_close_to_the_percent_and_salted(
    salt: str, other: str, percent: float
) -> None:
    """Over 2,000 users the share selected is within 4 points of the percent (more than 4
    standard deviations: derandomized, it cannot flake), and a rollout salted otherwise
    at the same percent picks another set: its overlap with the first is close to the
    share of both, not to the share of one."""
    assume(salt != other)
    people = [f"user-{n}" for n in range(2_000)]
    one = Rollout(Engine, legacy=LEGACY, percent=percent, salt=salt)
    two = Rollout(Engine, legacy=LEGACY, percent=percent, salt=other)
    a = {u for u in people if one.includes(u)}
    b = {u for u in people if two.includes(u)}
    share = percent / 100
    assert abs(len(a) / len(people) - share) <= 0.04
    assert abs(len(a & b) / len(people) - share * share) <= 0.04
    if 10 <= percent <= 90:
        assert a != b


# -- validation -------------------------------------------------------------------------------


anything = (
    st.none()
    | st.booleans()
    | st.integers(-5, 200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.fractions(min_value=-2, max_value=200)
    | st.text(max_size=4)
)


def mostly(valid: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Three times in four from ``valid``: a rollout is made often enough to be used."""
    return st.integers(0, 3).flatmap(lambda n: other if n == 0 else valid)


def _number(value: object) -> float | None:
    """The value as a float when it is a real number that is no bool, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
        return None
    return float(value)


@BACKENDS
@PROPERTY
@given(
    percent=mostly(percents, anything),
    mode=mostly(st.sampled_from(MODES), st.text(max_size=10) | st.none()),
    rate=mostly(st.none() | st.floats(0, 1) | st.fractions(0, 1), anything),
    window=mostly(st.floats(0, 1e6, exclude_min=True) | st.fractions(0, 1e6), anything),
)
@example(percent=Fraction(1, 2), mode="component", rate=Fraction(1, 4), window=Fraction(30))
@example(percent=50, mode="component", rate=0.5, window=5e-324)
@example(percent=50, mode="component", rate=0.5, window=1e-310)
@example(percent=100, mode="shadow", rate=1.0, window=60)
def test_a_rollout_refuses_bad_settings_and_works_with_any_it_takes(
    backend: str, percent: object, mode: object, rate: object, window: object
) -> None:
    """A percent outside 0..100, an unknown mode, a rate outside [0, 1) and a window
    that is no finite number of seconds of at least a microsecond are refused at
    construction, with an error naming the setting; at run time too, and the refused
    change leaves the setting as it was. Whatever is taken works: a component path whose
    every call fails falls back, and the state says why."""
    p, r, w = _number(percent), _number(rate), _number(window)
    refused = [
        name
        for name, ok in (
            ("percent", p is not None and 0 <= p <= 100),
            ("mode", mode in MODES),
            ("max_error_rate", rate is None or (r is not None and 0 <= r < 1)),
            ("window", w is not None and 1e-6 <= w < math.inf),
        )
        if not ok
    ]

    def make() -> Rollout[Any]:
        return Rollout(
            Engine,
            legacy=LEGACY,
            percent=percent,  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
            max_error_rate=rate,  # type: ignore[arg-type]
            window=window,  # type: ignore[arg-type]
            min_calls=1,
            name=fresh("validated"),
        )

    if refused:
        with pytest.raises((TypeError, ValueError), match="|".join(refused)):
            make()
        return
    rollout = make()
    for attribute, kept in (("percent", p), ("mode", mode)):
        for value in (-1, 101, math.nan, "50", None, True, "on"):
            with pytest.raises((TypeError, ValueError), match=attribute):
                setattr(rollout, attribute, value)
            assert getattr(rollout, attribute) == kept
    engines = Engines(fail_creation={"alice"})
    rollout.mode, rollout.percent = "component", 100

    async def run() -> None:
        got = await request(engines, rollout, ("alice", None))
        if rate is None:
            return
        assert got is LEGACY

    if rate is None:
        with pytest.raises(ConnectionError):
            anyio.run(run, backend=backend)
    else:
        anyio.run(run, backend=backend)
        state = rollout.state()
        assert state.fallen_back
        assert state.reason is not None
        assert state.reason.startswith("1 of 1 component-path requests failed")
    assert rollout.state().failures == 1


# -- one path per request ---------------------------------------------------------------------


change = st.one_of(
    st.tuples(st.just("mode"), st.sampled_from(MODES)),
    st.tuples(st.just("percent"), percents),
)
step = st.one_of(
    st.tuples(st.just("resolve"), st.integers(1, 4)),
    st.tuples(st.just("thread"), st.integers(1, 2)),
    st.tuples(st.just("wrapped"), st.integers(1, 2)),
    change,
)


@BACKENDS
@PROPERTY
@given(
    people=users,
    mode=st.sampled_from(MODES),
    percent=percents,
    plans=st.lists(st.lists(step, min_size=1, max_size=6), min_size=1, max_size=4),
    late=st.lists(st.none() | change, min_size=1, max_size=4),
)
def test_every_resolve_of_a_request_gets_the_same_object(
    backend: str,
    people: list[tuple[str, str | None]],
    mode: RolloutMode,
    percent: float,
    plans: list[list[tuple[str, Any]]],
    late: list[tuple[str, Any] | None],
) -> None:
    """Concurrent requests of several users, each resolving from several tasks at once,
    from worker threads and from threads of their own (through ambient.wrap), while mode
    and percent change under them, and some with a task that resolves after the request
    ended and the switch changed again: every resolve of one request takes one path, the
    legacy object or that user's own component (which a task that outlived the request
    can no longer have: ScopeClosedError); a shadow request always gets the legacy
    object. Each request is counted once, and each component is cleaned once."""
    engines = Engines()
    rollout: Rollout[Any] = Rollout(
        Engine, legacy=LEGACY, mode=mode, percent=percent, name=fresh("paths")
    )
    requests = [(user, plans[n % len(plans)], late[n % len(late)]) for n, user in enumerate(people)]
    served: list[Any] = []

    async def one(
        user: tuple[str, str | None],
        plan: list[tuple[str, Any]],
        then: tuple[str, Any] | None,
        service: Any,
    ) -> None:
        got: list[Any] = []
        closed, late_done = anyio.Event(), anyio.Event()

        async def resolve() -> None:
            got.append(await rollout.resolve())

        async def in_thread() -> None:
            got.append(await anyio.to_thread.run_sync(rollout.resolve_sync))

        async def in_raw_thread() -> None:
            """A thread of its own, which ambient.wrap() carries the request into."""
            wrapped = ambient.wrap(rollout.resolve_sync)
            thread = threading.Thread(target=lambda: got.append(wrapped()))
            thread.start()
            await anyio.to_thread.run_sync(thread.join)

        async def outlived() -> None:
            await closed.wait()
            for sync in (False, True):
                try:
                    got.append(rollout.resolve_sync() if sync else await rollout.resolve())
                except ScopeClosedError:
                    got.append(ScopeClosedError)
            late_done.set()

        async with engines.registry.open_scope(context_of(user)):
            if then is not None:
                service.start_soon(outlived)
            for what, arg in plan:
                if what in ("mode", "percent"):
                    setattr(rollout, what, arg)
                    continue
                async with anyio.create_task_group() as tg:
                    for _ in range(arg):
                        tg.start_soon(
                            {"resolve": resolve, "thread": in_thread}.get(what, in_raw_thread)
                        )
                await anyio.lowlevel.checkpoint()
        if then is not None:
            setattr(rollout, *then)
            closed.set()
            await late_done.wait()
        if not got:
            return
        first = got[0]
        if first is ScopeClosedError:  # decided after the request, for the component
            assert got == [ScopeClosedError] * 2
            served.append(first)
            return
        component = first is not LEGACY
        if component:
            assert (first.user_id, first.tenant_id) == user
        late_gets = ScopeClosedError if component else first
        assert got == [first] * (len(got) - 2 * (then is not None)) + [late_gets] * 2 * (
            then is not None
        ), (user, got)
        served.append(first)

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            for user, plan, then in requests:
                tg.start_soon(one, user, plan, then, tg)

    anyio.run(run, backend=backend)
    engines.check_cleaned()
    state = rollout.state()
    assert state.legacy + state.shadow + state.component == len(served)
    assert state.component == sum(s is not LEGACY for s in served)
    # A request first resolving after it ended makes no component (nor shadow).
    components = sum(s is not LEGACY and s is not ScopeClosedError for s in served)
    decided_late = sum(all(w in ("mode", "percent") for w, _ in p) for _, p, _ in requests)
    assert 0 <= state.shadow + components - len(engines.made) <= decided_late


# -- shadow -----------------------------------------------------------------------------------


@BACKENDS
@PROPERTY
@given(
    people=users,
    percent=percents,
    broken=st.data(),
    resolves=st.integers(1, 4),
)
def test_a_shadow_is_made_and_cleaned_once_per_selected_request_and_never_served(
    backend: str,
    people: list[tuple[str, str | None]],
    percent: float,
    broken: st.DataObject,
    resolves: int,
) -> None:
    """In shadow mode, whatever the users and whichever of their components fail to be
    made or to be cleaned: every resolve gets the legacy object, no error reaches the
    request; a selected user's request makes its component once however often it
    resolves, and its scope cleans it once; the others make none. A failure to make it is
    counted as the request's one failure; one to clean it is the scope's, as any
    component's (the rollout has handed the legacy object back long before)."""
    names = [u for u, _ in people]
    fail_creation = broken.draw(st.sets(st.sampled_from(names)), label="fail_creation")
    fail_cleanup = broken.draw(st.sets(st.sampled_from(names)), label="fail_cleanup")
    engines = Engines(fail_creation=fail_creation, fail_cleanup=fail_cleanup)
    rollout: Rollout[Any] = Rollout(
        Engine, legacy=LEGACY, mode="shadow", percent=percent, name=fresh("shadow")
    )
    cleanup_errors: list[str] = []

    async def one(user: tuple[str, str | None]) -> None:
        try:
            async with engines.registry.open_scope(context_of(user)):
                for _ in range(resolves):
                    assert await rollout.resolve() is LEGACY
                    assert rollout.resolve_sync() is LEGACY
        except CleanupError:
            cleanup_errors.append(user[0])

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            for user in people:
                tg.start_soon(one, user)

    logging.getLogger("ambient.migration").disabled = True
    try:
        anyio.run(run, backend=backend)
    finally:
        logging.getLogger("ambient.migration").disabled = False
    selected = [u for u in people if rollout.includes(*u)]
    made = [u for u in selected if u[0] not in fail_creation]
    assert sorted((e.user_id, e.tenant_id or "") for e in engines.made) == sorted(
        (u, t or "") for u, t in made
    )
    engines.check_cleaned()
    assert sorted(cleanup_errors) == sorted(u for u, _ in made if u in fail_cleanup)
    state = rollout.state()
    assert (state.shadow, state.legacy, state.component) == (
        len(selected),
        len(people) - len(selected),
        0,
    )
    assert state.failures == len(selected) - len(made)


# -- max_error_rate ---------------------------------------------------------------------------


@dataclass
class WindowModel:
    """The contract's window: a call at ``t`` counts while the clock is less than twelve
    twelfths (of ``length``) past the start of the twelfth it fell in; a failure in use
    moves its request's call to the moment it is reported."""

    length: float
    rate: float
    min_calls: int
    calls: list[list[Any]] = field(default_factory=list)  # [time, failed]
    fallen_back: bool = False
    fallbacks: int = 0
    failures: int = 0

    def totals(self, now: float) -> tuple[int, int]:
        width = self.length / 12
        live = [f for t, f in self.calls if math.floor(t / width) > math.floor(now / width) - 12]
        return len(live), sum(live)

    def call(self, now: float, *, failed: bool, moved: list[Any] | None = None) -> list[Any]:
        """Count a call (or move ``moved``, counted before, here as failed)."""
        if moved is not None and any(c is moved for c in self.calls):
            self.calls.remove(moved)
        counted = [now, failed]
        self.calls.append(counted)
        self.failures += failed
        calls, failures = self.totals(now)
        if not self.fallen_back and calls >= self.min_calls and failures / calls > self.rate:
            self.fallen_back = True
            self.fallbacks += 1
        return counted

    def reset(self) -> None:
        self.calls.clear()
        self.fallen_back = False


outcome = st.sampled_from(["ok", "fails", "fails once", "fails in use"])
NOT_MADE = ("fails", "fails once")
event = st.one_of(
    st.tuples(st.just("request"), outcome, st.integers(1, 3)),
    st.tuples(st.just("open"), st.sampled_from(["ok", "fails"]), st.just(0)),
    st.tuples(st.just("finish"), st.integers(0, 3), st.booleans()),
    # Waits about a twelfth, and about a window, reach each edge of the window.
    st.tuples(st.just("wait"), st.sampled_from([5, 55, 60, 65]) | st.integers(0, 61), st.just(0)),
    st.tuples(st.just("reset"), st.just(0), st.just(0)),
)


@dataclass
class Open:
    """A long request (a stream, a websocket) left open while others come and go."""

    user: str
    on_component: bool
    counted: list[Any] | None
    fail: bool = False
    finish: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)


@BACKENDS
@settings(PROPERTY, max_examples=200)
@given(
    mode=st.sampled_from(["component", "shadow"]),
    rate=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75]) | st.floats(0, 0.99),
    min_calls=st.integers(1, 8),
    events=st.lists(event, min_size=1, max_size=40),
)
def test_the_switch_falls_back_exactly_when_the_window_fails_too_often(
    backend: str,
    mode: RolloutMode,
    rate: float,
    min_calls: int,
    events: list[tuple[str, Any, Any]],
    metric_reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In component or shadow mode, requests whose component is made, fails to be made,
    or fails in use (reported by record_failure()), from several tasks each, and long
    requests that stay open while the clock moves and report a failure in use much later,
    or none: the switch falls back exactly when the model's window (of at least
    min_calls calls) fails above the rate, then serves legacy without touching the
    factory until reset(); each request is one call of the window however many of its
    tasks resolve or report, and a component that could not be made one WARNING line;
    the fallback is one ERROR line and one count of the metric each time; nobody sees an
    error."""
    clock = FakeClock()
    clock.now = 1_200.0
    name = fresh("fallback")
    rollout: Rollout[Any] = Rollout(
        Engine,
        legacy=LEGACY,
        mode=mode,
        max_error_rate=rate,
        min_calls=min_calls,
        window=60,
        name=name,
        clock=clock,
    )
    model = WindowModel(60, rate, min_calls)
    engines = Engines(asynchronous=True)
    opened: list[Open] = []
    not_made: list[str] = []  # requests whose component failed to be made
    caplog.clear()

    async def resolve_as(user: str, result: str) -> Any:
        """The request's path as the model predicts it, checked against what it got."""
        made = len(engines.made)
        got = await rollout.resolve()
        if model.fallen_back:
            assert got is LEGACY
            assert len(engines.made) == made
        else:
            assert (got is LEGACY) is (result in NOT_MADE or mode == "shadow")
        return got

    def arm(user: str, result: str) -> None:
        """Make the factory fail for this request as ``result`` says."""
        engines.fail_creation = {user} if result == "fails" else set()
        engines.fail_once = {user} if result == "fails once" else set()

    async def one(user: str, result: str, tasks: int) -> None:
        on_component = not model.fallen_back
        arm(user, result)
        got: list[Any] = []

        async def resolve() -> None:
            got.append(await resolve_as(user, result))
            if result == "fails in use":
                rollout.record_failure()

        async with (
            engines.registry.open_scope(context_of((user, None))),
            anyio.create_task_group() as tg,
        ):
            for _ in range(tasks):
                tg.start_soon(resolve)
        assert all(g is got[0] for g in got)
        if on_component:
            model.call(clock.now, failed=result != "ok")
            if result in NOT_MADE:
                not_made.append(user)

    async def long(request: Open, result: str, resolved: anyio.Event) -> None:
        async with engines.registry.open_scope(context_of((request.user, None))):
            await resolve_as(request.user, result)
            resolved.set()
            await request.finish.wait()
            if request.fail:
                rollout.record_failure()
        request.done.set()

    async def step(n: int, what: str, arg: Any, extra: Any, tg: Any) -> None:
        if what == "request":
            await one(f"user-{n}", arg, extra)
        elif what == "open":
            request = Open(f"user-{n}", not model.fallen_back, None)
            resolved = anyio.Event()
            arm(request.user, arg)
            tg.start_soon(long, request, arg, resolved)
            await resolved.wait()
            if request.on_component:
                request.counted = model.call(clock.now, failed=arg == "fails")
                if arg == "fails":
                    not_made.append(request.user)
            # A component that could not be made leaves the request on legacy.
            request.on_component = request.on_component and arg == "ok"
            opened.append(request)
        elif what == "finish" and opened:
            request = opened.pop(arg % len(opened))
            request.fail = extra
            request.finish.set()
            await request.done.wait()
            if request.on_component and extra:
                model.call(clock.now, failed=True, moved=request.counted)
        elif what == "wait":
            clock.now += arg
        elif what == "reset":
            rollout.reset()
            model.reset()

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            for n, (what, arg, extra) in enumerate(events):
                await step(n, what, arg, extra, tg)
                state = rollout.state()
                assert (state.window_calls, state.window_failures) == model.totals(clock.now)
                assert (state.fallen_back, state.fallbacks) == (
                    model.fallen_back,
                    model.fallbacks,
                )
                assert state.failures == model.failures
            for request in opened:
                request.finish.set()

    with caplog.at_level(logging.WARNING, logger="ambient.migration"):
        anyio.run(run, backend=backend)
    engines.check_cleaned()
    failed = [r for r in caplog.records if " path failed " in r.getMessage()]
    assert len(failed) == len(not_made)
    fell = [r for r in caplog.records if "fell back to legacy" in r.getMessage()]
    assert len(fell) == model.fallbacks
    assert all(r.levelno == logging.ERROR for r in fell)
    metric = counter_values(metric_reader, "ambient.rollout.fallbacks")
    assert metric.get((("ambient.rollout", name),), 0) == model.fallbacks


# -- guard_global -----------------------------------------------------------------------------


def touch_attribute(guard: Catalog) -> object:
    return guard.label


def touch_len(guard: Catalog) -> object:
    return len(guard)


def touch_item(guard: Catalog) -> object:
    return guard["a"]


SITES: dict[str, Callable[[Catalog], object]] = {
    "attribute": touch_attribute,
    "len": touch_len,
    "item": touch_item,
}


def site_of(kind: str) -> tuple[str, int]:
    """The file and line where ``SITES[kind]`` touches the guard."""
    code = SITES[kind].__code__
    return code.co_filename, code.co_firstlineno + 1


access = st.tuples(st.sampled_from(sorted(SITES)), st.sampled_from(["task", "thread", "outside"]))


@BACKENDS
@PROPERTY
@given(
    mode=st.sampled_from(["warn", "strict", "off"]),
    name=st.text(min_size=1, max_size=12).filter(str.strip),
    plans=st.lists(st.lists(access, max_size=8), min_size=1, max_size=10),
    bound=st.sampled_from(["scope", "bind_context"]),
)
def test_the_report_counts_every_access_made_inside_a_user_context(
    backend: str,
    mode: str,
    name: str,
    plans: list[list[tuple[str, str]]],
    bound: str,
    metric_reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Concurrent users touching a guarded global at several call sites, from their
    tasks and worker threads, and code with no context touching it too: the report counts
    exactly the accesses made inside a context, per call site, and so does the counter;
    "warn" warns and logs once per call site, "strict" raises GlobalStateError at every counted
    access and warns never, "off" only counts; outside a context nothing is counted and
    nothing raised."""
    reset_global_state_report()
    name = fresh(name)
    guard = guard_global(Catalog(), name=name, mode=mode)  # type: ignore[arg-type]
    registry = Registry()
    raised: list[str] = []
    expected: dict[tuple[str, int], int] = {}
    for plan in plans:
        for kind, where in plan:
            if where != "outside":
                expected[site_of(kind)] = expected.get(site_of(kind), 0) + 1

    def touch(kind: str) -> None:
        try:
            SITES[kind](guard)
        except GlobalStateError:
            raised.append(kind)

    async def user(n: int, plan: list[tuple[str, str]]) -> None:
        context = UserExecutionContext.create(f"user-{n}")
        for kind, where in plan:
            if where == "outside":
                touch(kind)
                continue
            if bound == "scope":
                async with registry.open_scope(context):
                    await work(kind, where)
            else:
                with bind_context(context):
                    await work(kind, where)

    async def work(kind: str, where: str) -> None:
        await anyio.lowlevel.checkpoint()
        if where == "task":
            touch(kind)
        else:
            await anyio.to_thread.run_sync(touch, kind)

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            for n, plan in enumerate(plans):
                tg.start_soon(user, n, plan)

    caplog.clear()
    with (
        warnings.catch_warnings(record=True) as caught,
        caplog.at_level(logging.WARNING, logger="ambient.migration"),
    ):
        warnings.simplefilter("always")
        anyio.run(run, backend=backend)
    report = global_state_report()
    counted = {(a.filename, a.lineno): a.count for a in report.accesses if a.name == name}
    assert counted == expected
    assert report.total == sum(expected.values())
    assert report.by_name() == ({name: report.total} if expected else {})
    metric = counter_values(metric_reader, "ambient.global_state.accesses")
    assert metric.get((("ambient.global", name),), 0) == report.total
    warned = [w for w in caught if issubclass(w.category, GlobalStateWarning)]
    assert len(raised) == (report.total if mode == "strict" else 0)
    assert len(warned) == (len(expected) if mode == "warn" else 0)
    assert {(w.filename, w.lineno) for w in warned} <= set(expected)
    logged = [r for r in caplog.records if getattr(r, "ambient_global", None) == name]
    assert len(logged) == len(warned)
