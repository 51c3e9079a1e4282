"""Moving a codebase off module-level singletons, one global at a time.

Three tools, used in this order (``docs/migration.md`` walks through an example):

1. :func:`guard_global` wraps a legacy singleton in a transparent proxy that records every
   use made while a user context is bound: a :class:`GlobalStateWarning` once per call
   site, a log line naming the global, the call site and its replacement, and the
   ``ambient.global_state.accesses`` counter. :func:`global_state_report` adds them up per
   global and call site: the number a migration drives to zero.
2. :class:`Rollout` switches one global to a per-user component, user by user: ``legacy``,
   ``shadow`` (create the component, keep serving the legacy object) or ``component``, for a
   stable percentage of users, falling back to legacy by itself when the component path
   fails too often.
3. When the report is empty and the rollout is at 100 %, the guard and the global go.

Metrics go through the OpenTelemetry API (meter ``ambient``), looked up when first needed
and again whenever the global meter provider changes, so an application that configures
its SDK after importing its modules still gets them.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import operator
import os
import re
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    Literal,
    SupportsIndex,
    TypeVar,
    cast,
    get_args,
)

from opentelemetry import metrics

from ambient import __version__, _checks
from ambient._binding import _current, _shown
from ambient.errors import (
    GlobalStateError,
    GlobalStateWarning,
    NoActiveContextError,
    ScopeClosedError,
)

if TYPE_CHECKING:
    from types import FrameType

    from ambient._context import UserExecutionContext
    from ambient._scope import Scope, _Resolver

__all__ = [
    "GlobalAccess",
    "GlobalStateError",
    "GlobalStateReport",
    "GlobalStateWarning",
    "GuardMode",
    "Rollout",
    "RolloutMode",
    "RolloutState",
    "global_state_report",
    "guard_global",
    "reset_global_state_report",
    "unwrap_global",
]

T = TypeVar("T")
GuardMode = Literal["warn", "strict", "off"]
RolloutMode = Literal["legacy", "shadow", "component"]
_GUARD_MODES: Final = get_args(GuardMode)
_ROLLOUT_MODES: Final = get_args(RolloutMode)
GUARD_MODE_ENV: Final = "AMBIENT_GUARD_MODE"
BUCKETS: Final = 10_000
_MIN_WINDOW: Final = 1e-6

logger = logging.getLogger("ambient.migration")


# -- metrics ---------------------------------------------------------------------------------


# name -> (unit, description); the global-state counter is shared with ambient.telemetry
# (same meter, unit and description, so an SDK sees one instrument).
_INSTRUMENTS: Final = {
    "ambient.global_state.accesses": (
        "{access}",
        "Accesses to a guarded module-level global while a user context was bound.",
    ),
    "ambient.rollout.requests": ("{request}", "Requests per rollout and the path they took."),
    "ambient.rollout.failures": ("{failure}", "Component-path failures per rollout."),
    "ambient.rollout.fallbacks": ("{fallback}", "Times a rollout fell back to legacy by itself."),
}


class _Counters:
    """Counters on the global meter provider, created on first use and again when the
    global provider changes (an application installs its SDK after importing modules)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._provider: object = None
        self._counters: dict[str, metrics.Counter] = {}
        self._complained = False

    def add(self, name: str, attributes: dict[str, str]) -> None:
        try:
            provider = metrics.get_meter_provider()
            with self._lock:
                if provider is not self._provider:
                    self._provider = provider
                    self._counters = {}
                counter = self._counters.get(name)
                if counter is None:
                    meter = metrics.get_meter("ambient", __version__, meter_provider=provider)
                    unit, description = _INSTRUMENTS[name]
                    counter = meter.create_counter(name, unit=unit, description=description)
                    self._counters[name] = counter
            counter.add(1, attributes)
        except Exception:
            # Telemetry never breaks the request it observes.
            if not self._complained:
                self._complained = True
                logger.exception("ambient: recording metric %s failed; going on", name)


_counters = _Counters()


# -- the report ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GlobalAccess:
    """How often one guarded global was touched at one call site inside user contexts.

    Attributes:
        name: The name given to :func:`guard_global`.
        filename: The file of the call site.
        lineno: Its line.
        count: Accesses counted there.
        replacement: What to use instead, as given to :func:`guard_global`.
    """

    name: str
    filename: str
    lineno: int
    count: int
    replacement: str | None

    @property
    def site(self) -> str:
        """``file:line``, the file relative to the working directory when inside it."""
        return _site(self.filename, self.lineno)


@dataclass(frozen=True, slots=True)
class GlobalStateReport:
    """Accesses to guarded globals inside user contexts, per global and call site.

    ``str(report)`` is the table ``ambient check`` prints; :meth:`as_dict` is its JSON.

    Attributes:
        accesses: One entry per (global, call site), sorted by name, file and line.
    """

    accesses: tuple[GlobalAccess, ...]

    @property
    def total(self) -> int:
        """Accesses counted over every global and call site."""
        return sum(a.count for a in self.accesses)

    def by_name(self) -> dict[str, int]:
        """Accesses per global name."""
        counts: dict[str, int] = {}
        for access in self.accesses:
            counts[access.name] = counts.get(access.name, 0) + access.count
        return counts

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form: the total, and per global its count, replacement and sites."""
        names: dict[str, dict[str, Any]] = {}
        for access in self.accesses:
            entry = names.setdefault(
                access.name, {"count": 0, "replacement": access.replacement, "sites": {}}
            )
            entry["count"] += access.count
            entry["sites"][access.site] = access.count
        return {"total": self.total, "globals": names}

    def format(self) -> str:
        """The report as a plain-text table."""
        if not self.accesses:
            return "No guarded global was touched inside a user context."
        by_name = self.by_name()
        sites = len(self.accesses)
        lines = [
            f"Guarded globals touched inside user contexts: {self.total} access(es), "
            f"{len(by_name)} global(s), {sites} call site(s)"
        ]
        width = max(len(a.site) for a in self.accesses)
        current = None
        for access in self.accesses:
            if access.name != current:
                current = access.name
                hint = f"  -> {access.replacement}" if access.replacement else ""
                lines.append(f"  {access.name}: {by_name[access.name]}{hint}")
            lines.append(f"    {access.site:<{width}}  {access.count}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


class _Ledger:
    """Every access, counted per (name, file, line); safe from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[tuple[str, str, int], int] = {}
        self.replacements: dict[str, str | None] = {}

    def record(self, name: str, filename: str, lineno: int, replacement: str | None) -> bool:
        """Count one access; ``True`` when it is the first at this call site."""
        key = (name, filename, lineno)
        with self.lock:
            seen = self.counts.get(key, 0)
            self.counts[key] = seen + 1
            if seen == 0:
                self.replacements[name] = replacement
        return seen == 0


_ledger = _Ledger()


def global_state_report() -> GlobalStateReport:
    """Return the accesses to guarded globals made inside user contexts so far.

    Example::

        report = global_state_report()
        assert report.total == 0, str(report)
    """
    with _ledger.lock:
        items = sorted(_ledger.counts.items())
        replacements = dict(_ledger.replacements)
    return GlobalStateReport(
        tuple(
            GlobalAccess(name, filename, lineno, count, replacements.get(name))
            for (name, filename, lineno), count in items
        )
    )


def reset_global_state_report() -> None:
    """Forget every access counted so far, so the next one per call site warns again."""
    with _ledger.lock:
        _ledger.counts.clear()
        _ledger.replacements.clear()


def _site(filename: str, lineno: int) -> str:
    try:
        relative = os.path.relpath(filename)
    except (ValueError, OSError):  # another drive on Windows; a working directory removed
        relative = filename
    shown = filename if relative.startswith("..") else relative
    return f"{shown}:{lineno}"


# -- the guard -------------------------------------------------------------------------------


def _hint(replacement: str | None) -> str:
    if replacement:
        return f"use {replacement} instead"
    return "resolve a per-user component from the current scope instead (ambient.resolve)"


def _count_in_telemetry(name: str) -> None:
    """Count the access in the bound scope's telemetry too, where it has a meter provider
    of its own (``Telemetry(meter_provider=...)``): the count above goes to the global one."""
    binding = _shown()
    scope = None if binding is None else binding.scope
    if scope is None:
        return
    for observer in scope.owner.observers:
        record = getattr(observer, "_record_own_global_access", None)
        if record is not None:
            record(name)


def _record(guard: _Guarded, frame: FrameType | None) -> None:
    name = object.__getattribute__(guard, "_ambient_name")
    replacement = object.__getattribute__(guard, "_ambient_replacement")
    mode = object.__getattribute__(guard, "_ambient_mode")
    if frame is None:  # pragma: no cover - only interpreters without frames
        filename, lineno, module_globals = "<unknown>", 0, None
    else:
        filename, lineno, module_globals = frame.f_code.co_filename, frame.f_lineno, frame.f_globals
    first = _ledger.record(name, filename, lineno, replacement)
    _counters.add("ambient.global_state.accesses", {"ambient.global": name})
    _count_in_telemetry(name)
    if mode == "off":
        return
    site = _site(filename, lineno)
    if mode == "strict":
        hint = _hint(replacement)
        msg = (
            f"legacy global {name!r} was touched at {site} while a user context was bound: "
            f"it is shared by every user. {hint[0].upper()}{hint[1:]}"
        )
        raise GlobalStateError(msg)
    if not first:
        return
    logger.warning(
        "ambient: legacy global %r touched inside a user context at %s; %s",
        name,
        site,
        _hint(replacement),
        extra={"ambient_global": name, "ambient_call_site": site},
    )
    module = module_globals.get("__name__", "") if module_globals is not None else ""
    message = f"legacy global {name!r} touched inside a user context; {_hint(replacement)}"
    try:
        warnings.warn_explicit(
            message, GlobalStateWarning, filename, lineno, module, module_globals=module_globals
        )
    except ImportError:
        # The globals let the warning show a line of a zip-imported module; but the loader
        # of code run by `python -c`, from stdin or in the interactive interpreter has no
        # source to give and raises, before anything is shown: warn without them.
        warnings.warn_explicit(message, GlobalStateWarning, filename, lineno, module)


def _touch(guard: _Guarded) -> Any:
    """The guarded object, after recording the access when a user context is bound.

    Called directly by every forwarding method, so frame 2 is the code that touched the
    guard (operators and builtins such as ``len`` add no Python frame of their own)."""
    if _current.get() is not None:
        _record(guard, sys._getframe(2))
    return object.__getattribute__(guard, "_ambient_target")


# copy.copy, copy.deepcopy and pickling reach a guard through these modules' own frames,
# several deep when the guard sits inside the object being copied.
_COPY_MODULES: Final = frozenset({"copy", "copyreg", "pickle"})


def _touch_copied(guard: _Guarded) -> Any:
    """Like :func:`_touch`, for a copy: the access is the line that asked for the copy."""
    if _current.get() is not None:
        frame: FrameType | None = sys._getframe(2)
        while frame is not None and frame.f_globals.get("__name__") in _COPY_MODULES:
            frame = frame.f_back
        _record(guard, frame)
    return object.__getattribute__(guard, "_ambient_target")


def _protocol(target: object, method: str, protocol: str) -> Any:
    found = getattr(type(target), method, None)
    if found is None:
        msg = f"{type(target).__name__!r} object does not support the {protocol} protocol"
        raise TypeError(msg)
    return found


class _Guarded:
    """A transparent stand-in for a legacy singleton that records uses inside user contexts.

    Forwarded: attribute get/set/delete, calls, ``[]`` get/set/delete, ``in``, ``len``,
    ``iter``, ``reversed``, ``bool``, ``==``/``!=``, ``hash``, ``str``, ``format``, ``with``,
    ``async with``, ``async for``, ``repr`` and ``dir``; ``copy.copy``, ``copy.deepcopy``
    and pickling give a copy of the guarded object (unguarded); ``next`` and ``anext``
    reach an iterator (see :func:`_guard_class`); ``isinstance`` sees the guarded object's
    class. Not forwarded: arithmetic and ordering operators, ``type()`` (it names the
    guard), ``callable()`` (always true), and the C ``json`` encoder, which checks the real
    type. ``repr``, ``dir``, ``isinstance`` and leaving a ``with`` block are not counted as
    accesses.
    """

    __slots__ = (
        "__weakref__",
        "_ambient_mode",
        "_ambient_name",
        "_ambient_replacement",
        "_ambient_target",
    )

    def __init__(self, target: object, name: str, replacement: str | None, mode: str) -> None:
        object.__setattr__(self, "_ambient_target", target)
        object.__setattr__(self, "_ambient_name", name)
        object.__setattr__(self, "_ambient_replacement", replacement)
        object.__setattr__(self, "_ambient_mode", mode)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance() sees the guarded object's class
        return type(object.__getattribute__(self, "_ambient_target"))

    def __getattr__(self, name: str) -> Any:
        return getattr(_touch(self), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(_touch(self), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(_touch(self), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _touch(self)(*args, **kwargs)

    def __getitem__(self, key: Any) -> Any:
        return _touch(self)[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        _touch(self)[key] = value

    def __delitem__(self, key: Any) -> None:
        del _touch(self)[key]

    def __contains__(self, item: Any) -> bool:
        return item in _touch(self)

    def __len__(self) -> int:
        return len(_touch(self))

    def __iter__(self) -> Iterator[Any]:
        return iter(_touch(self))

    def __reversed__(self) -> Iterator[Any]:
        return reversed(_touch(self))  # type: ignore[no-any-return]

    def __bool__(self) -> bool:
        return bool(_touch(self))

    def __eq__(self, other: object) -> bool:
        return bool(_touch(self) == other)

    def __ne__(self, other: object) -> bool:
        return bool(_touch(self) != other)

    def __hash__(self) -> int:
        return hash(_touch(self))

    def __str__(self) -> str:
        return str(_touch(self))

    def __format__(self, spec: str) -> str:
        return format(_touch(self), spec)

    def __enter__(self) -> Any:
        target = _touch(self)
        return _protocol(target, "__enter__", "context manager")(target)

    def __exit__(self, *exc_info: object) -> Any:
        target = object.__getattribute__(self, "_ambient_target")
        return _protocol(target, "__exit__", "context manager")(target, *exc_info)

    def __aenter__(self) -> Any:
        target = _touch(self)
        return _protocol(target, "__aenter__", "asynchronous context manager")(target)

    def __aexit__(self, *exc_info: object) -> Any:
        target = object.__getattribute__(self, "_ambient_target")
        return _protocol(target, "__aexit__", "asynchronous context manager")(target, *exc_info)

    def __aiter__(self) -> Any:
        target = _touch(self)
        return _protocol(target, "__aiter__", "asynchronous iterator")(target)

    def __repr__(self) -> str:
        return repr(object.__getattribute__(self, "_ambient_target"))

    def __dir__(self) -> list[str]:
        return dir(object.__getattribute__(self, "_ambient_target"))

    def __copy__(self) -> Any:
        return copy.copy(_touch_copied(self))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(_touch_copied(self), memo)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        # Unpickled as the object itself, pickled as pickle does it (the target's own
        # __reduce_ex__ would not do for a dict or a list, which pickle handles natively).
        return (operator.getitem, ((_touch_copied(self),), 0))


class _GuardedIterator(_Guarded):
    """The guard of an iterator: ``next()`` needs the method on the guard's own type."""

    __slots__ = ()

    def __next__(self) -> Any:
        return next(_touch(self))


class _GuardedAsyncIterator(_Guarded):
    """The guard of an asynchronous iterator: ``anext()`` needs it on the guard's type."""

    __slots__ = ()

    def __anext__(self) -> Any:
        target = _touch(self)
        return _protocol(target, "__anext__", "asynchronous iterator")(target)


class _GuardedBothIterators(_GuardedIterator, _GuardedAsyncIterator):
    __slots__ = ()


def _guard_class(target: object) -> type[_Guarded]:
    """Only the guard of an iterator has ``__next__`` / ``__anext__``: on every guard they
    would make ``isinstance(guard, collections.abc.Iterator)`` true for any object."""
    kind = type(target)
    sync, asynchronous = hasattr(kind, "__next__"), hasattr(kind, "__anext__")
    if sync and asynchronous:
        return _GuardedBothIterators
    if sync:
        return _GuardedIterator
    if asynchronous:
        return _GuardedAsyncIterator
    return _Guarded


def guard_global(
    obj: T, *, name: str, replacement: str | None = None, mode: GuardMode = "warn"
) -> T:
    """Wrap a legacy module-level singleton so its uses inside user contexts are recorded.

    The result forwards attribute access, calls and the common protocols to ``obj``
    (``isinstance`` included), so it can replace the global in place. Touched while a user
    context is bound (inside a request, a scope or ``bind_context``), each use is counted
    in :func:`global_state_report` and the ``ambient.global_state.accesses`` counter
    (attribute ``ambient.global`` = ``name``), and then, by ``mode``:

    * ``"warn"``: a :class:`GlobalStateWarning` and a log line on logger
      ``ambient.migration`` naming the global, the call site and the replacement, both once
      per call site (until :func:`reset_global_state_report`);
    * ``"strict"``: :class:`GlobalStateError` is raised at the call site;
    * ``"off"``: only counted.

    Outside any user context (start-up, scripts, shutdown) it is silent and not counted.
    The environment variable ``AMBIENT_GUARD_MODE`` (``warn``, ``strict`` or ``off``),
    when set, overrides ``mode`` for every guard created afterwards, e.g. to run a test
    suite with ``strict``.

    Args:
        obj: The singleton. Guarding a guard re-guards the object underneath.
        name: How reports, logs and metrics name the global (e.g. ``"agent_registry"``).
        replacement: What code should use instead, shown in logs and reports
            (e.g. ``"await ambient.resolve(AgentRegistry)"``).
        mode: ``"warn"`` (default), ``"strict"`` or ``"off"``.

    Raises:
        ValueError: an empty name, or an unknown mode (argument or environment).

    Example::

        engine = guard_global(
            ExecutionEngine(agent_registry, bridge, None),
            name="engine",
            replacement="await ambient.resolve(ExecutionEngine)",
        )
    """
    if not isinstance(name, str) or not name.strip():
        msg = f"guard_global() needs a non-empty name for the global, not {name!r:.64}"
        raise ValueError(msg)
    chosen: str = mode
    source = "mode"
    from_env = os.environ.get(GUARD_MODE_ENV)
    if from_env is not None:
        chosen, source = from_env.strip().lower(), GUARD_MODE_ENV
    if chosen not in _GUARD_MODES:
        msg = f"{source} must be one of {', '.join(_GUARD_MODES)}, not {chosen!r:.64}"
        raise ValueError(msg)
    target = unwrap_global(obj)
    return cast("T", _guard_class(target)(target, name, replacement, chosen))


_GUARD_CLASSES: Final = frozenset(
    {_Guarded, _GuardedIterator, _GuardedAsyncIterator, _GuardedBothIterators}
)


def unwrap_global(obj: T) -> T:
    """Return the object a :func:`guard_global` guard forwards to (or ``obj`` itself).

    For factories that adopt the legacy object during a migration, e.g. an APP component
    that is the existing, stateless catalogue: its uses through the component are not
    global-state accesses.
    """
    if type(obj) in _GUARD_CLASSES:
        return cast("T", object.__getattribute__(obj, "_ambient_target"))
    return obj


# -- rollout ---------------------------------------------------------------------------------


class _Window:
    """Component-path calls and failures in a sliding window, kept in twelve buckets so
    memory stays constant however many requests arrive: a call counts for between
    eleven and twelve twelfths of ``length`` seconds."""

    SLOTS: Final = 12

    def __init__(self, length: float) -> None:
        self.width = length / self.SLOTS
        self.buckets: deque[list[int]] = deque()  # [bucket index, calls, failures]
        self.calls = 0
        self.failures = 0
        self.cleared = 0  # how many times clear() ran: a call counted before is gone

    def _expire(self, index: int) -> None:
        buckets = self.buckets
        while buckets and buckets[0][0] <= index - self.SLOTS:
            _, calls, failures = buckets.popleft()
            self.calls -= calls
            self.failures -= failures

    def add(self, now: float, *, failed: bool) -> tuple[int, int]:
        """Count a call, failed or not; return where it was counted, for :meth:`fail`."""
        index = math.floor(now / self.width)
        self._expire(index)
        if self.buckets and self.buckets[-1][0] == index:
            bucket = self.buckets[-1]
        else:
            bucket = [index, 0, 0]
            self.buckets.append(bucket)
        bucket[1] += 1
        self.calls += 1
        if failed:
            bucket[2] += 1
            self.failures += 1
        return self.cleared, index

    def fail(self, now: float, counted: tuple[int, int] | None) -> tuple[int, int]:
        """Count a failure of the call counted at ``counted`` (by :meth:`add`): the call
        moves to now's bucket beside its failure, so the two leave the window together and
        the window never holds a failure without its call; a call that has left the window
        already (a request longer than the window) is counted again."""
        self._expire(math.floor(now / self.width))
        if counted is not None and counted[0] == self.cleared:
            for bucket in self.buckets:
                if bucket[0] == counted[1]:
                    bucket[1] -= 1
                    self.calls -= 1
                    break
        return self.add(now, failed=True)

    def totals(self, now: float) -> tuple[int, int]:
        self._expire(math.floor(now / self.width))
        return self.calls, self.failures

    def clear(self) -> None:
        self.buckets.clear()
        self.calls = self.failures = 0
        self.cleared += 1


@dataclass(frozen=True, slots=True)
class RolloutState:
    """A snapshot of a :class:`Rollout`.

    Attributes:
        name: The rollout's name (logs, metrics, environment variables).
        mode: The configured mode.
        percent: The configured share of users on the new path.
        fallen_back: Whether the switch fell back to legacy by itself (until ``reset()``).
        reason: Why it fell back, or ``None``.
        window_calls: Component-path requests in the sliding window.
        window_failures: Those that failed.
        legacy: Requests that took the legacy path so far.
        component: Requests that took the component path so far (one whose component
            failed, with ``max_error_rate`` set, was then served the legacy object).
        shadow: Requests that took the shadow path so far.
        failures: Component-path failures so far (component and shadow).
        fallbacks: How many times the switch has fallen back.
    """

    name: str
    mode: RolloutMode
    percent: float
    fallen_back: bool
    reason: str | None
    window_calls: int
    window_failures: int
    legacy: int
    component: int
    shadow: int
    failures: int
    fallbacks: int

    @property
    def effective_mode(self) -> RolloutMode:
        """What new requests get: ``"legacy"`` after a fallback, else :attr:`mode`."""
        return "legacy" if self.fallen_back else self.mode

    @property
    def error_rate(self) -> float:
        """Failures over calls in the window (0.0 with no calls)."""
        return self.window_failures / self.window_calls if self.window_calls else 0.0


class _Decision:
    """Which path one request takes; kept in its scope so the request never switches."""

    __slots__ = ("claimed", "counted", "failed", "path", "shadowing")

    def __init__(self, path: str) -> None:
        self.path = path
        self.failed = False
        self.claimed = False  # a resolve of the request has finished and counts it
        self.shadowing = False  # a resolve of the request is making the shadow
        self.counted: tuple[int, int] | None = None  # where the window counted its call


def _env_name(name: str) -> str:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return re.sub(r"[^A-Z0-9]+", "_", spaced.upper()).strip("_")


class Rollout(Generic[T]):
    """One switch between a legacy singleton and the per-user component replacing it.

    Each request takes one path, decided the first time it calls :meth:`resolve` and kept
    for the rest of that request:

    * ``mode="legacy"``: the legacy object, for everyone;
    * ``mode="component"``: the component resolved from the current scope for the users
      that ``percent`` selects, the legacy object for the others;
    * ``mode="shadow"``: for the selected users the component is also created (in the
      current scope, which cleans it up) but the legacy object is returned; its failures
      are recorded and never raised.

    Users are selected by a stable hash of (salt, tenant, user) into 10,000 buckets, so a
    user never flips between requests at a fixed percent, raising the percent only adds
    users, and two rollouts (salted with their names) at 30 % do not pick the same users.

    Without ``max_error_rate`` a failing component propagates. With it, the request is
    served the legacy object instead, and once more than ``max_error_rate`` of at least
    ``min_calls`` component-path requests in the last ``window`` seconds failed, the switch
    falls back to legacy for every new request, logs it and counts it
    (``ambient.rollout.fallbacks``), and stays there until :meth:`reset`.

    ``mode`` and ``percent`` can be assigned at run time (new requests follow; requests in
    flight keep their path). The environment variables ``AMBIENT_ROLLOUT_<NAME>_MODE`` and
    ``AMBIENT_ROLLOUT_<NAME>_PERCENT`` override the constructor's arguments, ``<NAME>``
    being the name in upper snake case (``ExecutionEngine`` -> ``EXECUTION_ENGINE``; see
    :attr:`env_prefix`). Outside any user context :meth:`resolve` returns the legacy object.

    Args:
        key: The registry key of the component (usually its class).
        legacy: The legacy object (a :func:`guard_global` guard is fine).
        mode: ``"legacy"`` (default), ``"shadow"`` or ``"component"``.
        percent: Share of users on the new path, 0 to 100 (default 100).
        max_error_rate: Fall back above this failure rate (0 <= rate < 1); ``None`` never
            falls back and lets failures propagate.
        window: Seconds of the sliding window (default 60; at least a microsecond).
        min_calls: Fewest component-path requests in the window before falling back.
        name: Name in logs, metrics and environment variables (default: the key's name).
        salt: Bucketing salt (default: the name).
        clock: Monotonic clock for the window (inject one in tests).

    Raises:
        ValueError: an invalid argument or environment variable, named in the message.

    Example::

        engines = Rollout(ExecutionEngine, legacy=engine, mode="component", percent=10,
                          max_error_rate=0.05)
        engine = await engines.resolve()
    """

    def __init__(
        self,
        key: Hashable,
        *,
        legacy: T,
        mode: RolloutMode = "legacy",
        percent: float = 100.0,
        max_error_rate: float | None = None,
        window: float = 60.0,
        min_calls: int = 20,
        name: str | None = None,
        salt: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if name is None:
            name = key.__qualname__ if isinstance(key, type) else str(key)
        if not isinstance(name, str) or not name:
            msg = f"Rollout needs a non-empty name (a str), not {name!r:.64}"
            raise ValueError(msg)
        if (
            max_error_rate is not None
            and not 0 <= _checks.number(max_error_rate, "max_error_rate", "failures per call") < 1
        ):
            msg = f"max_error_rate must be in [0, 1) or None, not {max_error_rate!r:.64}"
            raise ValueError(msg)
        # Below a microsecond a twelfth of the window divides a clock reading into
        # infinity (or by zero), and every component-path request would fail on it.
        if not _checks.number(window, "window") >= _MIN_WINDOW:
            msg = f"window must be at least {_MIN_WINDOW:g} seconds, not {window!r:.64}"
            raise ValueError(msg)
        if _checks.whole(min_calls, "min_calls", "calls") < 1:
            msg = f"min_calls must be >= 1, not {min_calls!r:.64}"
            raise ValueError(msg)
        self.key = key
        self.legacy = legacy
        self.name = name
        # Floats, as checked: a Fraction has no :g format (before Python 3.12) to put in
        # the reason of a fallback, whose request would fail on it.
        self.max_error_rate = None if max_error_rate is None else float(max_error_rate)
        self.window = float(window)
        self.min_calls = min_calls
        env_name = _env_name(name)
        if not env_name:
            # Every such rollout would read the same AMBIENT_ROLLOUT__MODE and _PERCENT.
            msg = (
                f"Rollout name {name!r:.64} has no ASCII letter or digit to name its "
                "environment variables (AMBIENT_ROLLOUT_<NAME>_MODE); pass an ASCII name="
            )
            raise ValueError(msg)
        self.env_prefix = f"AMBIENT_ROLLOUT_{env_name}_"
        self._salt = (name if salt is None else salt).encode()
        self._clock = _checks.clock(clock)
        self._lock = threading.Lock()
        self._window = _Window(self.window)
        self._fallen_back = False
        self._reason: str | None = None
        self._served = {"legacy": 0, "component": 0, "shadow": 0}
        self._failures = 0
        self._fallbacks = 0
        self._logged_failure = False
        # Each request's decision, by its scope: kept past the scope's close (which empties
        # its state), so work that outlived its request keeps that request's path and
        # counts no second request.
        self._decisions: weakref.WeakKeyDictionary[Scope, _Decision] = weakref.WeakKeyDictionary()
        env_mode = os.environ.get(self.env_prefix + "MODE")
        env_percent = os.environ.get(self.env_prefix + "PERCENT")
        self._mode: RolloutMode = self._check_mode(
            mode if env_mode is None else env_mode.strip().lower(),
            "mode" if env_mode is None else self.env_prefix + "MODE",
        )
        self._threshold = 0
        self._percent = 0.0
        if env_percent is None:
            self._set_percent(percent, "percent")
        else:
            try:
                parsed = float(env_percent)
            except ValueError:
                msg = (
                    f"{self.env_prefix}PERCENT must be a number from 0 to 100, "
                    f"not {env_percent!r:.64}"
                )
                raise ValueError(msg) from None
            self._set_percent(parsed, self.env_prefix + "PERCENT")

    def __repr__(self) -> str:
        state = "fallen back" if self._fallen_back else self._mode
        return f"<Rollout {self.name} {state} {self._percent:g}%>"

    # -- configuration ---------------------------------------------------------------------

    @staticmethod
    def _check_mode(mode: str, source: str) -> RolloutMode:
        if mode not in _ROLLOUT_MODES:
            msg = f"{source} must be one of {', '.join(_ROLLOUT_MODES)}, not {mode!r:.64}"
            raise ValueError(msg)
        return cast("RolloutMode", mode)

    def _set_percent(self, percent: float, source: str) -> None:
        value = _checks.number(percent, source, "percent")
        if not 0 <= value <= 100:
            msg = f"{source} must be from 0 to 100, not {percent!r:.64}"
            raise ValueError(msg)
        self._percent = value
        self._threshold = round(value * BUCKETS / 100)

    @property
    def mode(self) -> RolloutMode:
        """``"legacy"``, ``"shadow"`` or ``"component"``; assignable at run time."""
        return self._mode

    @mode.setter
    def mode(self, mode: RolloutMode) -> None:
        previous, self._mode = self._mode, self._check_mode(mode, "mode")
        logger.info("ambient: rollout %s mode changed from %s to %s", self.name, previous, mode)

    @property
    def percent(self) -> float:
        """Share of users (0 to 100) on the new path; assignable at run time."""
        return self._percent

    @percent.setter
    def percent(self, percent: float) -> None:
        previous = self._percent
        self._set_percent(percent, "percent")
        logger.info(
            "ambient: rollout %s percent changed from %g to %g", self.name, previous, percent
        )

    def bucket(self, user_id: str, tenant_id: str | None = None) -> int:
        """The user's bucket in ``range(10_000)``: stable across requests and processes."""
        text = b"\x00".join((self._salt, (tenant_id or "").encode(), user_id.encode()))
        digest = hashlib.blake2b(text, digest_size=8).digest()
        return int.from_bytes(digest, "big") % BUCKETS

    def includes(self, user_id: str, tenant_id: str | None = None) -> bool:
        """Whether ``percent`` selects this user for the new path."""
        return self.bucket(user_id, tenant_id) < self._threshold

    def reset(self) -> None:
        """Leave a fallback: forget the window and follow ``mode`` and ``percent`` again."""
        with self._lock:
            was = self._fallen_back
            self._fallen_back = False
            self._reason = None
            self._window.clear()
            self._logged_failure = False
        if was:
            logger.warning(
                "ambient: rollout %s reset; following mode %s again", self.name, self._mode
            )

    def state(self) -> RolloutState:
        """A snapshot of configuration, fallback and counts."""
        with self._lock:
            calls, failures = self._window.totals(self._clock())
            return RolloutState(
                name=self.name,
                mode=self._mode,
                percent=self._percent,
                fallen_back=self._fallen_back,
                reason=self._reason,
                window_calls=calls,
                window_failures=failures,
                legacy=self._served["legacy"],
                component=self._served["component"],
                shadow=self._served["shadow"],
                failures=self._failures,
                fallbacks=self._fallbacks,
            )

    # -- resolution ------------------------------------------------------------------------

    def _choose(self, ctx: UserExecutionContext) -> str:
        if self._fallen_back or self._mode == "legacy":
            return "legacy"
        if self.bucket(ctx.user_id, ctx.tenant_id) >= self._threshold:
            return "legacy"
        return self._mode

    def _begin(self) -> tuple[_Decision, _Resolver | None]:
        """This request's decision and the resolver to use."""
        binding = _shown()
        if binding is None:
            return _Decision("legacy"), None
        resolver = binding.scope
        owner = None if resolver is None else resolver.owner
        if owner is not None:
            decision = self._decisions.get(owner)
            if decision is not None:
                return decision, resolver
        made = _Decision(self._choose(binding.ctx))
        if owner is not None:
            with self._lock:
                decision = self._decisions.setdefault(owner, made)
            if decision is not made:  # another task or thread of this request decided first
                return decision, resolver
        elif made.path != "legacy":
            raise NoActiveContextError("scope")
        with self._lock:
            self._served[made.path] += 1
        _counters.add(
            "ambient.rollout.requests",
            {"ambient.rollout": self.name, "ambient.rollout.path": made.path},
        )
        return made, resolver

    async def resolve(self) -> T:
        """Return the legacy object or this request's component, as the switch decides.

        Raises:
            NoActiveContextError: a context without a scope is bound and the component is
                due.
            ScopeClosedError: the component is due and the scope bound here has closed
                (work that outlived its request); not counted as a failure of the component.
            Exception: whatever the component's factory raised, without ``max_error_rate``.
        """
        decision, resolver = self._begin()
        if resolver is None or decision.path == "legacy":
            return self.legacy
        shadowing = decision.path == "shadow"
        if shadowing and not self._shadows(decision):
            return self.legacy
        try:
            component = await resolver.resolve(self.key)
        except ScopeClosedError:
            # Work that outlived its request: its mistake, not a failure of the component.
            if decision.path == "shadow":
                return self.legacy
            raise
        except Exception as exc:
            if self._absorbed(decision, exc, first=self._claim(decision)):
                return self.legacy
            raise
        finally:
            if shadowing:
                decision.shadowing = False
        return self._served_by(decision, component, first=self._claim(decision))

    def resolve_sync(self) -> T:
        """Like :meth:`resolve`, for components with sync factories (and worker threads)."""
        decision, resolver = self._begin()
        if resolver is None or decision.path == "legacy":
            return self.legacy
        shadowing = decision.path == "shadow"
        if shadowing and not self._shadows(decision):
            return self.legacy
        try:
            component = resolver.resolve_sync(self.key)
        except ScopeClosedError:
            # Work that outlived its request: its mistake, not a failure of the component.
            if decision.path == "shadow":
                return self.legacy
            raise
        except Exception as exc:
            if self._absorbed(decision, exc, first=self._claim(decision)):
                return self.legacy
            raise
        finally:
            if shadowing:
                decision.shadowing = False
        return self._served_by(decision, component, first=self._claim(decision))

    def _shadows(self, decision: _Decision) -> bool:
        """Whether this resolve makes the request's shadow: none made it yet, and no other
        task or thread of the request is making it (that one is not waited for).

        Not only the resolve that made the decision: that one may have been cancelled (a
        timeout around it) before its component was made, and the request resolved again."""
        with self._lock:
            if decision.claimed or decision.shadowing:
                return False
            decision.shadowing = True
        return True

    def _claim(self, decision: _Decision) -> bool:
        """Whether this is the first resolve of the request to finish, which counts it.

        Not the one that made the decision: that one may have been cancelled (a timeout
        around it) before its component was made, and the request resolved again."""
        with self._lock:
            first = not decision.claimed
            decision.claimed = True
        return first

    def _served_by(self, decision: _Decision, component: Any, *, first: bool) -> T:
        if first:
            self._tally(decision, decision.path, failed=False)
        # A shadow's, or one the registry made again for a task that waited on an attempt
        # that failed for another task of the request, which is on legacy since.
        return cast("T", component) if decision.path == "component" else self.legacy

    def _absorbed(self, decision: _Decision, error: Exception, *, first: bool) -> bool:
        """Record a failure of the new path; whether the request gets legacy instead."""
        path = decision.path
        absorbed = path == "shadow" or self.max_error_rate is not None
        if absorbed:
            decision.path = "legacy" if path == "component" else path  # for the whole request
        if not first:
            return absorbed
        decision.failed = True
        if absorbed:
            with self._lock:
                traceback = not self._logged_failure
                self._logged_failure = True
            logger.warning(
                "ambient: rollout %s: the %s path failed (%s: %s); served legacy",
                self.name,
                path,
                type(error).__name__,
                error,
                exc_info=error if traceback else None,
            )
        self._tally(decision, path, failed=True)
        return absorbed

    def record_failure(self) -> None:
        """Count the current request's component as failed although it was created (it
        failed in use); once per request, and a no-op when the request is on legacy."""
        binding = _shown()
        resolver = None if binding is None else binding.scope
        if resolver is None:
            return
        decision = self._decisions.get(resolver.owner)
        if decision is not None and decision.path in ("component", "shadow"):
            self._tally(decision, decision.path, failed=True, in_use=True)

    def _tally(self, decision: _Decision, path: str, *, failed: bool, in_use: bool = False) -> None:
        """Count the request's call (``in_use``: the failure in use of a call counted)."""
        now = self._clock()
        reason = None
        with self._lock:
            if in_use:
                if decision.failed:  # once per request, whichever task or thread reports
                    return
                decision.failed = True
                decision.counted = self._window.fail(now, decision.counted)
            elif decision.counted is None:
                decision.counted = self._window.add(now, failed=failed)
            else:
                # Another task of the request reported a failure while this one was making
                # the component: the request was counted then, as one failed call.
                return
            if failed:
                self._failures += 1
            # Checked after a success too: the request that brings the window to
            # `min_calls` may be one, with the failures before it already over the rate.
            calls, failures = self._window.calls, self._window.failures
            limit = self.max_error_rate
            if (
                limit is not None
                and not self._fallen_back
                and calls >= self.min_calls
                and failures / calls > limit
            ):
                self._fallen_back = True
                self._fallbacks += 1
                reason = self._reason = (
                    f"{failures} of {calls} component-path requests failed in the last "
                    f"{self.window:g} s, above max_error_rate {limit:g}"
                )
        if failed:
            _counters.add(
                "ambient.rollout.failures",
                {"ambient.rollout": self.name, "ambient.rollout.path": path},
            )
        if reason is not None:
            logger.error(
                "ambient: rollout %s fell back to legacy: %s; call reset() to resume",
                self.name,
                reason,
                extra={"ambient_rollout": self.name},
            )
            _counters.add(
                "ambient.rollout.fallbacks",
                {"ambient.rollout": self.name},
            )
