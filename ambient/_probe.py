"""IsolationProbe: which user saw which component instance, and was it cleaned once."""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import gc
import re
import threading
import types
import uuid
import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ambient._observe import ComponentEvent, Observer, add_observer
from ambient._provider import RANK, Lifetime
from ambient._scope import Scope

if TYPE_CHECKING:
    from ambient._context import UserRef

__all__ = ["IsolationProbe", "IsolationReport"]


def _owner(event: ComponentEvent, lifetime: Lifetime | None = None) -> UserRef | None:
    """Whom the instance was handed to: its user, or ``None`` for the application (what an
    instance of ``lifetime``, by default the event's, belongs to)."""
    lifetime = event.lifetime if lifetime is None else lifetime
    if lifetime is Lifetime.APP:
        return None
    user = event.user
    if user is None and event.scope is not None:
        user = event.scope.context.user
    return user


def _aliased(event: ComponentEvent) -> Lifetime | None:
    """The lifetime of ``event``'s instance when the scope it was handed to holds it already
    under another key: it was handed out by an alias (a factory returning a component it
    resolved), which neither enters nor closes it. ``None`` when it is not an alias's."""
    scope = event.scope
    if scope is None:
        return None
    instance, alias = event.instance, event.key
    cache = scope._cache
    try:
        holders = [key for key, held in cache.items() if held is instance and key != alias]
    except RuntimeError:  # a worker thread of the scope cached a component meanwhile
        holders = [key for key, held in list(cache.items()) if held is instance and key != alias]
    providers = scope.registry.providers
    # An alias lives no longer than what it resolved: the longest lifetime is the maker's.
    lifetimes = [providers[key].lifetime for key in holders if key in providers]
    return max(lifetimes, key=RANK.__getitem__) if lifetimes else None


def _fresh(event: ComponentEvent) -> bool:
    """Whether ``event``'s instance was made by a plain class, so is new (no alias's)."""
    scope = event.scope
    provider = scope.registry.providers.get(event.key) if scope is not None else None
    return provider is not None and provider.fresh


def _scope_id(event: ComponentEvent) -> int | None:
    """The id of the request scope a REQUEST hand-out is made, and ended, in; ``None`` for
    a longer-lived one (a USER alias ends with its user's components, in no request)."""
    scope = event.scope
    return id(scope) if scope is not None and event.lifetime is Lifetime.REQUEST else None


def _label(user: UserRef | None) -> str:
    if user is None:
        return "(application)"
    if user.tenant_id is None:
        return user.user_id
    return f"{user.user_id} (tenant {user.tenant_id})"


# Values, and objects shared by design: Python and the standard library hand the same
# instance to unrelated code (small ints, interned strings, re.compile's cache, enum
# members, timezone.utc), and two users holding one share no state, so identity says nothing.
_VALUES = frozenset(
    {
        int,
        float,
        complex,
        bool,
        str,
        bytes,
        type(None),
        frozenset,
        range,
        re.Pattern,
        datetime.date,
        datetime.datetime,
        datetime.time,
        datetime.timedelta,
        decimal.Decimal,
        fractions.Fraction,
        uuid.UUID,
        types.FunctionType,
        types.BuiltinFunctionType,
        types.ModuleType,
    }
)
# The same, whatever the subclass: enum members, time zones (zoneinfo caches them), classes.
_SHARED_KINDS = (enum.Enum, datetime.tzinfo, type)


def _immutable(instance: object) -> bool:
    """Whether ``instance`` is a plain value (an int, a str, a tuple of them) or an object
    shared by design (an enum member, a compiled pattern, a time zone, a function, a class,
    a module): two users holding the same one share no state."""
    kind = type(instance)
    if kind in _VALUES:
        return True
    if kind is tuple:
        return all(_immutable(item) for item in instance)  # type: ignore[attr-defined]
    return isinstance(instance, _SHARED_KINDS)


class _Record:
    """What the probe knows about one component instance."""

    __slots__ = (
        "cleaned",
        "handouts",
        "lifetime",
        "name",
        "ran",
        "ref",
        "scope",
        "strong",
        "users",
    )

    users: set[UserRef | None]

    def __init__(self, event: ComponentEvent, lifetime: Lifetime | None = None) -> None:
        # ``lifetime``: the component's, when ``event`` is an alias's hand-out of it.
        self.name = event.name
        self.scope = id(event.scope) if event.scope is not None else None
        self.lifetime = event.lifetime if lifetime is None else lifetime
        self.users = {_owner(event, self.lifetime)}
        # Its ends taken for its cleanup, and those of them that ran one (an end with
        # nothing to clean, as that of an alias made before the probe, cleans it no more).
        self.cleaned = 0
        self.ran = 0
        # The times it was handed out again, alive, each as (alias, key, scope, counted): by
        # an alias (``alias``: a factory returning a component its scope holds, which its
        # own registration cleans) or by a factory returning an existing object, under
        # ``key`` in the scope of id ``scope``, and whether the probe counted it (it records
        # nothing new at times).
        self.handouts: list[tuple[bool, Hashable, int | None, bool]] = []
        try:
            self.ref: weakref.ref[Any] | None = weakref.ref(event.instance)
            self.strong: Any = None
        except TypeError:
            # Not weakly referenceable (a dict, an int): keep it so its id stays unique.
            self.ref = None
            self.strong = event.instance

    def alive(self) -> bool:
        return self.strong is not None or (self.ref is not None and self.ref() is not None)

    def ended(self, event: ComponentEvent) -> tuple[bool, bool]:
        """Whether the end ``event`` tells of is counted, and whether it is a cleanup of
        this instance: an alias's end is none, whatever cleanup the alias had of its own
        (a generator's code after its ``yield``, a context manager's exit); the end of a
        hand-out by a factory returning an existing object is one when it cleaned it."""
        handouts = self.handouts
        # A REQUEST alias's in the same scope: the same key may clean it in another one.
        scope = _scope_id(event)
        for index, (alias, key, made_in, counted) in enumerate(handouts):
            if alias and key == event.key and made_in == scope:
                del handouts[index]
                return counted, False
        for index, (alias, _, _, counted) in enumerate(handouts):
            if not alias:
                del handouts[index]
                return counted, event.cleanup_ran
        return True, True


@dataclass
class IsolationReport:
    """What an :class:`IsolationProbe` found.

    Attributes:
        shared: One component instance handed to more than one user.
        cleanup: Components cleaned more than once, or never.
        outlived: REQUEST components still alive after their scope closed and a collection.
        open_scopes: Scopes opened but not closed.
        leaked_scopes: Closed scopes still alive after a garbage collection.
        created: Components created.
        cleaned: Cleanups run.
        scopes: Scopes opened.
    """

    shared: list[str] = field(default_factory=list)
    cleanup: list[str] = field(default_factory=list)
    outlived: list[str] = field(default_factory=list)
    open_scopes: list[str] = field(default_factory=list)
    leaked_scopes: list[str] = field(default_factory=list)
    created: int = 0
    cleaned: int = 0
    scopes: int = 0

    @property
    def violations(self) -> list[str]:
        """Every problem, one line each."""
        return [
            *self.shared,
            *self.cleanup,
            *self.outlived,
            *self.open_scopes,
            *self.leaked_scopes,
        ]

    @property
    def ok(self) -> bool:
        """Whether nothing was found."""
        return not self.violations


class IsolationProbe(Observer):
    """Watches scopes and components and reports isolation and cleanup problems.

    Records which user each component instance was created for and fails when one instance
    is handed to two users (a factory returning a cached global), when a cleanup did not run
    exactly once, when a REQUEST component is still alive after its scope closed and a
    garbage collection, or when a scope was left open or is kept alive.

    Use it as a context manager (``with IsolationProbe() as probe:``), through the
    ``isolation_probe`` fixture, or pass it as ``Registry(telemetry=probe)``.

    Plain values (numbers, strings, tuples of them) and objects shared by design (enum
    members, compiled patterns, dates, times and time zones, ``Decimal``, ``Fraction``,
    ``UUID``, functions, classes and modules) are not tracked: one of them handed to two
    users shares no state.

    Args:
        expect_closed: Also require USER and APP components to be cleaned (call
            :meth:`report` after ``registry.aclose()``).
        shared_types: More types whose instances are shared by design (immutable values
            of the application, such as a frozen settings class), not tracked either.

    Raises:
        TypeError: ``shared_types`` holds something that is not a class.
    """

    def __init__(self, *, expect_closed: bool = False, shared_types: Iterable[type] = ()) -> None:
        self.expect_closed = expect_closed
        self._shared_types = tuple(shared_types)
        for kind in self._shared_types:
            # Checked here: the observer hooks that use them only log their failures, and
            # a probe whose every check fails that way records nothing and reports clean.
            if not isinstance(kind, type):
                msg = (
                    f"IsolationProbe(shared_types=...) takes classes, not {kind!r} "
                    f"(a {type(kind).__name__})"
                )
                raise TypeError(msg)
        self._lock = threading.Lock()
        self._records: dict[int, _Record] = {}
        self._retired: list[_Record] = []
        self._shared: list[str] = []
        self._extra_cleanups: list[str] = []
        self._scopes: list[weakref.ref[Scope]] = []
        self._open: dict[int, tuple[weakref.ref[Scope], str]] = {}
        self._created = 0
        self._cleaned = 0
        self._remove: Callable[[], None] | None = None
        # False while only the ends of what is already recorded matter (a load that would
        # make the records grow, as ambient check's memory measurement).
        self._recording = True

    def _untracked(self, instance: object) -> bool:
        return _immutable(instance) or isinstance(instance, self._shared_types)

    # -- Observer ------------------------------------------------------------------------

    def scope_opened(self, scope: Scope) -> None:
        if not self._recording:
            return
        with self._lock:
            self._scopes.append(weakref.ref(scope))
            self._open[id(scope)] = (weakref.ref(scope), repr(scope.context))

    def scope_closed(self, scope: Scope, failures: tuple[BaseException, ...]) -> None:
        with self._lock:
            self._open.pop(id(scope), None)

    def component_created(self, event: ComponentEvent) -> None:
        if event.error is not None or self._untracked(event.instance):
            return
        with self._lock:
            key = id(event.instance)
            record = self._records.get(key)
            if record is not None and record.alive():
                alias = _aliased(event) is not None
                record.handouts.append((alias, event.key, _scope_id(event), self._recording))
                if not self._recording:
                    return
                self._created += 1
                if record.lifetime is Lifetime.APP:
                    # The application's component, handed out by a user's alias of it:
                    # it belongs to every user alike.
                    return
                user = _owner(event)
                if user not in record.users:
                    record.users.add(user)
                    self._shared.append(
                        f"{record.name}: one instance was handed to users "
                        f"{', '.join(sorted(_label(u) for u in record.users))} (a factory "
                        "returning a shared object, e.g. one cached in a module global?)"
                    )
                return
            if record is not None:
                # A dead recorded instance's id: retire its record, or this one's cleanup
                # would be counted as a second one of it.
                self._retired.append(self._records.pop(key))
            if not self._recording:
                return
            self._created += 1
            # Seen first handed out by an alias (it was made before the probe was
            # installed): recorded as the component it is, this hand-out as an alias.
            aliased = None if _fresh(event) else _aliased(event)
            record = self._records[key] = _Record(event, aliased)
            if aliased is not None:
                record.handouts.append((True, event.key, _scope_id(event), True))

    def component_cleaned(self, event: ComponentEvent) -> None:
        if self._untracked(event.instance):
            return
        with self._lock:
            record = self._records.get(id(event.instance))
            if record is None:
                if self._recording:
                    self._cleaned += 1
                # else made while nothing new was recorded: not counted either
                return
            counted, cleans = record.ended(event)
            if counted:
                self._cleaned += 1
            if not cleans:
                return
            record.cleaned += 1
            if not event.cleanup_ran:
                return
            record.ran += 1
            if record.ran == 2:
                self._extra_cleanups.append(f"{record.name}: cleaned more than once")

    # -- results -------------------------------------------------------------------------

    def report(self) -> IsolationReport:
        """Collect garbage, then say what was found so far."""
        gc.collect()
        with self._lock:
            records = [*self._retired, *self._records.values()]
            report = IsolationReport(
                shared=list(self._shared),
                cleanup=list(self._extra_cleanups),
                created=self._created,
                cleaned=self._cleaned,
                scopes=len(self._scopes),
            )
            report.open_scopes = [
                f"a scope for {context} was opened and never closed"
                + ("" if ref() is not None else " (garbage-collected: its cleanups never ran)")
                for ref, context in self._open.values()
            ]
            # Components of a scope that is still open may be cleaned later; those of an
            # unclosed scope that is gone never will be.
            open_ids = {key for key, (ref, _) in self._open.items() if ref() is not None}
            alive_scopes = [ref() for ref in self._scopes]
        report.leaked_scopes = [
            f"a closed scope for {scope.context!r} is still alive after garbage collection "
            "(kept by a pending task, a global or a cycle with a finalizer?)"
            for scope in alive_scopes
            if scope is not None and id(scope) not in open_ids and scope.closed
        ]
        never: dict[str, int] = {}
        outlived: dict[str, int] = {}
        for record in records:
            must_clean = record.lifetime is Lifetime.REQUEST or self.expect_closed
            if record.cleaned == 0 and must_clean and record.scope not in open_ids:
                never[record.name] = never.get(record.name, 0) + 1
            if (
                record.lifetime is Lifetime.REQUEST
                and record.cleaned
                and record.ref is not None
                and record.ref() is not None
            ):
                outlived[record.name] = outlived.get(record.name, 0) + 1
        report.cleanup += [
            f"{name}: {count} instance(s) created but never cleaned"
            for name, count in never.items()
        ]
        report.outlived = [
            f"{name}: {count} instance(s) still alive after their scope closed "
            "(referenced from a global, a cache or a pending task?)"
            for name, count in outlived.items()
        ]
        return report

    def assert_clean(self) -> None:
        """Raise :class:`AssertionError` listing every violation, if there is any."""
        report = self.report()
        if not report.ok:
            lines = "\n  ".join(report.violations)
            msg = f"ambient isolation probe found {len(report.violations)} problem(s):\n  {lines}"
            raise AssertionError(msg)

    # -- installation --------------------------------------------------------------------

    def __enter__(self) -> IsolationProbe:
        if self._remove is not None:
            msg = "this IsolationProbe is already installed"
            raise RuntimeError(msg)
        self._remove = add_observer(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        remove, self._remove = self._remove, None
        if remove is not None:
            remove()
