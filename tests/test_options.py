"""Options of the wrong type are refused at construction, naming the option.

Text read from a setting (``"5"``), ``None`` where it means nothing, or a bool (``True`` is
no second and no connection) is a TypeError saying which option wants what: Python's own
"'>' not supported between instances of 'str' and 'int'" named nothing, ``True`` was taken
for one second or one connection, and ``max_size=inf`` reached psycopg_pool, failing the
first checkout instead of the start-up.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

import ambient
from ambient import Observer, Registry
from ambient.integrations.propagation import ContextSigner
from ambient.integrations.psycopg import PerUserPools, SharedPool
from ambient.integrations.websockets import ConnectionHub, RedisBroadcast
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import trusted_header
from ambient.middleware.tickets import MemoryTicketStore, WebSocketTickets
from ambient.migration import Rollout
from ambient.telemetry import Telemetry

URL = "postgresql://postgres@127.0.0.1:5432/test"

# (what is built, the option, how to build it with the option set to a value)
BUILDERS: list[tuple[str, Callable[[str, Any], object]]] = [
    ("cleanup_timeout", lambda name, v: Registry(**{name: v})),
    ("close_timeout", lambda name, v: ConnectionHub(**{name: v})),
    ("timeout", lambda name, v: RedisBroadcast("redis://127.0.0.1:6379/0", **{name: v})),
    ("reconnect_delay", lambda name, v: RedisBroadcast("redis://127.0.0.1:6379/0", **{name: v})),
    (
        "health_check_interval",
        lambda name, v: RedisBroadcast("redis://127.0.0.1:6379/0", **{name: v}),
    ),
    ("window", lambda name, v: Rollout("engine", legacy=object(), max_error_rate=0.1, window=v)),
    ("max_error_rate", lambda name, v: Rollout("engine", legacy=object(), max_error_rate=v)),
    ("min_calls", lambda name, v: Rollout("engine", legacy=object(), min_calls=v)),
    ("percent", lambda name, v: Rollout("engine", legacy=object(), percent=v)),
    ("span_threshold", lambda name, v: Telemetry(span_threshold=v)),
    ("timeout", lambda name, v: PerUserPools(URL, **{name: v})),
    ("return_timeout", lambda name, v: SharedPool(URL, **{name: v})),
    ("retry_after", lambda name, v: SharedPool(URL, **{name: v})),
    ("idle_ttl", lambda name, v: PerUserPools(URL, **{name: v})),
    ("max_size", lambda name, v: PerUserPools(URL, **{name: v})),
    ("min_size", lambda name, v: SharedPool(URL, **{name: v})),
]
# None means "no limit" for these: taken, not refused.
NONE_TAKEN = {"max_error_rate"}
COUNTS = {"min_calls", "max_size", "min_size"}


@pytest.mark.parametrize(("option", "build"), BUILDERS, ids=[o for o, _ in BUILDERS])
@pytest.mark.parametrize(
    "value", ["5", None, True, b"1", 1j], ids=["text", "none", "bool", "bytes", "complex"]
)
def test_an_option_that_is_no_number_is_a_type_error_naming_it(
    option: str, build: Callable[[str, Any], object], value: object
) -> None:
    if value is None and option in NONE_TAKEN:
        build(option, value)
        return
    wanted = "a whole number of" if option in COUNTS else "a number of"
    with pytest.raises(TypeError, match=rf"^{option} must be {wanted} .+, not {value!r}"):
        build(option, value)


@pytest.mark.parametrize(
    ("option", "build"),
    [(o, b) for o, b in BUILDERS if o not in COUNTS],
    ids=[o for o, _ in BUILDERS if o not in COUNTS],
)
def test_a_number_no_float_holds_is_a_value_error_naming_the_option(
    option: str, build: Callable[[str, Any], object]
) -> None:
    """An int past what a float holds ended in Python's OverflowError, naming nothing.
    The message shows the number's first 64 digits, not all 401."""
    with pytest.raises(
        ValueError, match=rf"^{option} must be a number of .+ a float holds"
    ) as info:
        build(option, 10**400)
    assert str(info.value).endswith(", not 1" + "0" * 63)


@pytest.mark.parametrize(
    ("option", "build"),
    [(o, b) for o, b in BUILDERS if o not in COUNTS],
    ids=[o for o, _ in BUILDERS if o not in COUNTS],
)
@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=["inf", "-inf"])
def test_infinity_is_a_value_error_naming_the_option(
    option: str, build: Callable[[str, Any], object], value: float
) -> None:
    """No wait, interval, window or threshold is made of infinity: it was taken (a
    cleanup bounded by nothing, whose wait in a worker thread raised OverflowError; a
    broadcast that never reconnected), as some options refused it and others not. Where
    "never" is meant an option says so with None."""
    message = f"{option} must be a finite number of "
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}.+, not {value}$"):
        build(option, value)


@pytest.mark.parametrize(("option", "build"), BUILDERS, ids=[o for o, _ in BUILDERS])
def test_a_long_value_is_shown_cut_to_64_characters(
    option: str, build: Callable[[str, Any], object]
) -> None:
    """A whole file read by mistake is not pasted into the error (nor into the log)."""
    value = "5" * 10_000
    with pytest.raises(TypeError, match=rf"^{option} must be ") as info:
        build(option, value)
    assert str(info.value).endswith(", not '" + "5" * 63)


@pytest.mark.parametrize("option", sorted(COUNTS))
def test_a_count_given_as_a_float_is_refused(option: str) -> None:
    """``max_size=inf`` (or 2.0) is no count of connections or calls."""
    build = {o: b for o, b in BUILDERS if o in COUNTS}[option]
    for value in (float("inf"), 2.0):
        with pytest.raises(TypeError, match=rf"^{option} must be a whole number of"):
            build(option, value)


@pytest.mark.parametrize(("option", "build"), BUILDERS, ids=[o for o, _ in BUILDERS])
def test_numbers_of_other_types_are_taken(option: str, build: Callable[[str, Any], object]) -> None:
    """An int where seconds are asked, and a float's equal, still construct."""
    import fractions

    value: object = {"max_error_rate": fractions.Fraction(1, 10), "span_threshold": 0}.get(
        option, 1 if option in COUNTS else fractions.Fraction(3, 2)
    )
    if option == "min_size":
        value = 0
    build(option, value)


async def _app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("never called")


@pytest.mark.parametrize(
    "observer",
    [5, object(), "telemetry", Telemetry],
    # Not repr(): an object's names its address, which differs between processes.
    ids=["int", "object", "str", "class"],
)
def test_an_observer_that_is_none_is_refused_where_it_is_given(observer: object) -> None:
    """Something that is no Observer given as telemetry (the class instead of an instance,
    a setting's text) was taken, and every scope opened with it failed: each request was
    a 500 ("object has no attribute 'inactive_until'")."""
    with pytest.raises(TypeError, match=r"^telemetry must be an ambient Observer"):
        Registry(telemetry=observer)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^telemetry must be an ambient Observer"):
        AmbientMiddleware(
            _app,
            registry=Registry(),
            identity=trusted_header(),
            telemetry=observer,  # type: ignore[arg-type]
        )
    with pytest.raises(TypeError, match=r"^observer must be an ambient Observer"):
        ambient.add_observer(observer)  # type: ignore[arg-type]


def test_observers_of_ambient_are_taken() -> None:
    class Counting(Observer):
        pass

    for observer in (Telemetry(), Counting()):
        assert Registry(telemetry=observer).telemetry is observer
        remove = ambient.add_observer(observer)
        remove()


CLOCKED: list[tuple[str, Callable[[Any], object]]] = [
    ("Registry", lambda clock: Registry(clock=clock)),
    ("Rollout", lambda clock: Rollout("engine", legacy=object(), clock=clock)),
    ("MemoryTicketStore", lambda clock: MemoryTicketStore(clock=clock)),
    ("WebSocketTickets", lambda clock: WebSocketTickets(clock=clock)),
    ("ContextSigner", lambda clock: ContextSigner("s" * 32, clock=clock)),
]


@pytest.mark.parametrize(("owner", "build"), CLOCKED, ids=[o for o, _ in CLOCKED])
@pytest.mark.parametrize("clock", [5, "monotonic", None], ids=repr)
def test_a_clock_that_cannot_be_called_is_refused(
    owner: str, build: Callable[[Any], object], clock: object
) -> None:
    """It was taken, and the first request that read it failed (a USER component's expiry,
    a rollout's window, a ticket's deadline, a signed context's expiry)."""
    with pytest.raises(TypeError, match=r"^clock must be a callable"):
        build(clock)


@pytest.mark.parametrize(
    "option", ["timeout", "reconnect_delay", "max_reconnect_delay", "health_check_interval"]
)
@pytest.mark.parametrize("value", [0, -1.0, float("nan")], ids=["zero", "negative", "nan"])
def test_a_redis_broadcast_duration_that_is_not_positive_is_refused(
    option: str, value: float
) -> None:
    """No time to connect or to wait, a back-off that never waits, a health check that
    never lets the connection be quiet: each is refused, naming the option and the value."""
    message = f"{option} must be > 0 seconds, not {value!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        RedisBroadcast("redis://127.0.0.1:6379/0", **{option: value})


@pytest.mark.parametrize("pools", [SharedPool, PerUserPools])
@pytest.mark.parametrize(
    ("tables", "said"),
    [
        ("notes", "rls_tables must be a list of names, not one str ('notes')"),
        ([b"notes"], "rls_tables must hold names as str, not b'notes'"),
    ],
    ids=["one-name", "bytes"],
)
def test_rls_tables_of_one_name_or_of_no_str_are_refused_when_built(
    pools: Callable[..., object], tables: Any, said: str
) -> None:
    """``rls_tables="notes"`` was kept as the tables ``n``, ``o``, ``t``... (each failing
    the check when the pool opened as a table that does not exist), and a bytes name
    failed it with the server's UndefinedFunction: both a TypeError where the pool is
    built."""
    with pytest.raises(TypeError) as raised:
        pools(URL, rls_tables=tables)
    assert str(raised.value) == said
