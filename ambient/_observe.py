"""Process-wide observers of scopes and components (telemetry, probes, ``ambient check``)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ambient._context import UserRef
    from ambient._provider import Lifetime, Provider
    from ambient._scope import Scope

__all__ = ["ComponentEvent", "Observer", "add_observer", "notify"]

logger = logging.getLogger("ambient")


@dataclass(frozen=True, slots=True)
class ComponentEvent:
    """One component created (or failed to be created) or cleaned up.

    Attributes:
        key: The registry key.
        name: The component's readable name.
        lifetime: Its lifetime.
        instance: The component (``None`` when its factory failed).
        user: The user it belongs to (``None`` for APP components).
        scope: The scope that caused the event (``None`` for cleanups at expiry or shutdown).
        start_ns: Wall-clock start in nanoseconds since the epoch (OpenTelemetry's clock).
        duration: Seconds the factory or cleanup took (0.0 when no cleanup ran).
        error: The exception it raised, if any.
        cleanup_ran: For cleanups: ``False`` when the component had nothing to clean up
            (no ``close()``, no generator, no context manager); the event then only marks
            the end of its life, and telemetry records no cleanup for it.
    """

    key: Hashable
    name: str
    lifetime: Lifetime
    instance: Any
    user: UserRef | None
    scope: Scope | None
    start_ns: int
    duration: float
    error: BaseException | None = None
    cleanup_ran: bool = True


class _DraftEvent:
    """A :class:`ComponentEvent` being filled in: the same slots, plain (not frozen)."""

    __slots__ = ComponentEvent.__slots__


def component_event(
    provider: Provider,
    instance: Any,
    user: UserRef | None,
    scope: Scope | None,
    start_ns: int,
    duration: float,
    error: BaseException | None,
    cleanup_ran: bool,
) -> ComponentEvent:
    """``ComponentEvent(...)`` for ``provider``'s component at a fraction of the cost: the
    core makes one per component creation and cleanup while anybody observes. The frozen
    dataclass's ``__init__`` goes through ``object.__setattr__`` for every field, and even
    its slots' own setters take a call each; a plain object with the same slots is filled
    in and then becomes the event (same layout, so its class may be assigned)."""
    event: Any = _DraftEvent()
    event.key = provider.key
    event.name = provider.name
    event.lifetime = provider.lifetime
    event.instance = instance
    event.user = user
    event.scope = scope
    event.start_ns = start_ns
    event.duration = duration
    event.error = error
    event.cleanup_ran = cleanup_ran
    event.__class__ = ComponentEvent
    return cast("ComponentEvent", event)


class Observer:
    """Sees every scope and component of every registry (or of one, see ``Registry``).

    Subclass and override what you need; each method runs inline, so keep it fast. An
    observer that raises is logged and otherwise ignored: it never breaks a request.

    Attributes:
        inactive_until: A :func:`time.monotonic` time before which :attr:`active` is surely
            false, or ``None`` (the default). Until then a scope may leave the observer out
            without asking :attr:`active` (one reporting to this observer alone does): a
            telemetry waiting for an SDK costs a clock read per scope instead of a call.
    """

    inactive_until: float | None = None

    @property
    def active(self) -> bool:
        """Whether this observer wants the scope that is opening; read once per scope
        (unless :attr:`inactive_until` says it is false).

        An inactive observer is left out of that scope entirely (no hooks are called and no
        events are built for it), so a dormant telemetry costs next to nothing.
        """
        return True

    def scope_opened(self, scope: Scope) -> None:
        """A scope was opened and its context bound."""

    def scope_closed(self, scope: Scope, failures: tuple[BaseException, ...]) -> None:
        """A scope finished its cleanups and was unbound."""

    def component_created(self, event: ComponentEvent) -> None:
        """A factory returned (or raised: ``event.error``)."""

    def component_cleaned(self, event: ComponentEvent) -> None:
        """A cleanup finished (or failed: ``event.error``)."""


# A tuple, replaced on change, so the hot path reads it without a lock.
observers: tuple[Observer, ...] = ()
# The observers whose failure has been logged, by id(), each with a weak reference to it:
# an id is reused once its object is gone, and a new observer at the same address must
# not pass for one already logged (its failures would never be). An entry leaves with
# its observer.
_complained: dict[int, Callable[[], object]] = {}


def checked(observer: object, name: str) -> Observer:
    """``observer``, or :class:`TypeError` naming ``name`` when it is no :class:`Observer`:
    scopes read its attributes as they open, and a request would fail at each."""
    if not isinstance(observer, Observer):
        msg = (
            f"{name} must be an ambient Observer (such as ambient.telemetry.Telemetry()), "
            f"not {type(observer).__name__}"
        )
        raise TypeError(msg)
    return observer


def add_observer(observer: Observer) -> Callable[[], None]:
    """Let ``observer`` see every scope and component in this process.

    Returns:
        A function that removes the observer again.

    Raises:
        TypeError: ``observer`` is not an :class:`Observer`.
    """
    checked(observer, "observer")
    global observers  # noqa: PLW0603 - replaced as a whole so readers need no lock
    observers = (*observers, observer)

    def remove() -> None:
        global observers  # noqa: PLW0603
        observers = tuple(o for o in observers if o is not observer)

    return remove


def notify(targets: tuple[Observer, ...], method: str, *args: Any) -> None:
    """Call ``method`` on every observer; log (once per observer) and go on when one fails."""
    for observer in targets:
        try:
            getattr(observer, method)(*args)
        except Exception:
            if not _logged_before(observer):
                logger.exception(
                    "ambient observer %r failed in %s; the request goes on", observer, method
                )


def _logged_before(observer: Observer) -> bool:
    """Whether ``observer``'s failure has been logged already; marks it logged if not."""
    key = id(observer)
    known = _complained.get(key)
    if known is not None and known() is observer:
        return True

    def forget(ref: object) -> None:
        if _complained.get(key) is ref:
            del _complained[key]

    try:
        _complained[key] = weakref.ref(observer, forget)
    except TypeError:  # not weakly referable (slots without __weakref__): kept alive
        _complained[key] = lambda: observer
    return False
