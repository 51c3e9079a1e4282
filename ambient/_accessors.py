"""Resolving components from wherever code runs, with no arguments passed down."""

from __future__ import annotations

from collections.abc import Coroutine, Hashable
from typing import Any, Final, Generic, TypeVar, overload

from ambient import _binding
from ambient._binding import _shown
from ambient._provider import key_name
from ambient.errors import NoActiveContextError

__all__ = ["Accessor", "accessor", "proxy", "resolve", "resolve_sync"]

T = TypeVar("T")
# Assigned, not imported by name: CPython 3.11 compiles a method call on a name bound by
# `from ... import` as an attribute read (it takes the name for a module's), which builds a
# bound method on every call: _current.get() is run per request.
_current: Final = _binding._current


def _scope_here() -> Any:
    binding = _shown()
    if binding is None:
        raise NoActiveContextError
    scope = binding.scope
    if scope is None:
        raise NoActiveContextError("scope")
    return scope


@overload
def resolve(key: type[T]) -> Coroutine[Any, Any, T]: ...
@overload
def resolve(key: Hashable) -> Coroutine[Any, Any, Any]: ...


def resolve(key: Any) -> Coroutine[Any, Any, Any]:
    """Resolve ``key`` in the scope bound to the current context: ``await resolve(Engine)``.

    Raises:
        NoActiveContextError: outside any scope.
        ResolutionError: unknown key, cycle or lifetime violation.
        ScopeClosedError: the bound scope has closed.
    """
    binding = _current.get()
    if binding is None or binding.closed or binding.scope is None:
        return _scope_here().resolve(key)  # type: ignore[no-any-return]
    return binding.scope.resolve(key)


@overload
def resolve_sync(key: type[T]) -> T: ...
@overload
def resolve_sync(key: Hashable) -> Any: ...


def resolve_sync(key: Any) -> Any:
    """Resolve a sync-factory component in the current scope (from sync code or threads).

    Raises:
        NoActiveContextError: outside any scope.
        ResolutionError: as :func:`resolve`, and for async factories.
        ScopeClosedError: the bound scope has closed.
    """
    # As resolve(): the binding read in place when it is live and has a scope (factories
    # call this for their dependencies, once per component made).
    binding = _current.get()
    if binding is None or binding.closed or binding.scope is None:
        return _scope_here().resolve_sync(key)
    return binding.scope.resolve_sync(key)


class Accessor(Generic[T]):
    """A module-level handle on a component: ``engine = accessor(Engine)``, then
    ``await engine()`` (or ``engine.sync()``) anywhere inside a scope."""

    __slots__ = ("key",)

    def __init__(self, key: Hashable) -> None:
        self.key = key

    def __call__(self) -> Coroutine[Any, Any, T]:
        return _scope_here().resolve(self.key)  # type: ignore[no-any-return]

    def sync(self) -> T:
        """Resolve with :func:`resolve_sync`."""
        return _scope_here().resolve_sync(self.key)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"accessor({key_name(self.key)})"


@overload
def accessor(key: type[T]) -> Accessor[T]: ...
@overload
def accessor(key: Hashable) -> Accessor[Any]: ...


def accessor(key: Any) -> Accessor[Any]:
    """Return an :class:`Accessor` for ``key``."""
    return Accessor(key)


class _Proxy:
    """Forwards attribute access and calls to the current scope's instance of a component.

    Limits: ``isinstance`` sees the proxy, and dunder protocols other than ``__call__``
    (iteration, ``len``, operators, ``with``) are not forwarded. Outside a scope an
    attribute whose name starts with ``_`` (``__wrapped__``, ``__signature__``, the
    ``_partialmethod`` that ``inspect.signature`` looks for) is missing, an
    ``AttributeError``, so ``hasattr``, ``inspect`` and doctest collection of the module
    holding the proxy work; any other attribute raises :class:`NoActiveContextError`.
    """

    __slots__ = ("_ambient_key",)

    def __init__(self, key: Hashable) -> None:
        object.__setattr__(self, "_ambient_key", key)

    def _ambient_target(self) -> Any:
        return _scope_here().resolve_sync(object.__getattribute__(self, "_ambient_key"))

    def __getattr__(self, name: str) -> Any:
        try:
            target = self._ambient_target()
        except NoActiveContextError as exc:
            if name.startswith("_"):  # what introspection probes for, not an API
                msg = f"{self!r} has no attribute {name!r} outside a scope"
                raise AttributeError(msg, name=name, obj=self) from exc
            raise
        return getattr(target, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._ambient_target(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._ambient_target(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ambient_target()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"proxy({key_name(object.__getattribute__(self, '_ambient_key'))})"


@overload
def proxy(key: type[T]) -> T: ...
@overload
def proxy(key: Hashable) -> Any: ...


def proxy(key: Any) -> Any:
    """Return a stand-in for a module-level singleton that forwards to the current scope's
    instance of ``key`` (sync factories only).

    Example::

        dispatcher: ToolDispatcher = proxy(ToolDispatcher)   # at module level
        dispatcher.dispatch("search", query)                  # inside a request
    """
    return _Proxy(key)
