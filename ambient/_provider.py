"""Recipes: how a registered factory is called, what it returns and how that is cleaned up."""

from __future__ import annotations

import collections.abc
import contextlib
import enum
import inspect
import sys
import types
import typing
import unicodedata
import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from ambient.errors import RegistryError, ResolutionError, _shorten

__all__ = ["Finalizer", "Lifetime", "Provider", "build_async", "build_sync", "make_provider"]


class Lifetime(enum.Enum):
    """How long a component lives, and who shares it."""

    REQUEST = "request"
    """One instance per scope (request, websocket connection, job); cleaned when it closes."""
    USER = "user"
    """One instance per ``(tenant_id, user_id)``, shared by that user's concurrent scopes."""
    APP = "app"
    """One instance per registry; cleaned at shutdown."""


# A component may depend only on components that live at least as long as it does.
RANK = {Lifetime.REQUEST: 0, Lifetime.USER: 1, Lifetime.APP: 2}
# The members as module globals, for code that compares lifetimes on every resolution: on
# Python 3.11 reading a member off an Enum class goes through EnumType.__getattr__, about
# fifteen times the cost of reading a global.
_REQUEST: Final = Lifetime.REQUEST
_USER: Final = Lifetime.USER

_SYNC, _ASYNC, _GEN, _AGEN = "sync", "async", "generator", "async generator"


@dataclass(frozen=True, slots=True, eq=False)
class Provider:
    """A registered recipe."""

    key: Hashable
    factory: Callable[..., Any]
    lifetime: Lifetime
    name: str
    kind: str
    takes_arg: bool
    enter: bool
    idle_ttl: float
    # A class whose call always makes a new object: what it returns is never a component
    # the scope holds already (see _held), so that is not looked for.
    fresh: bool = False


def key_name(key: Hashable) -> str:
    """A readable name for a registry key."""
    if isinstance(key, type):
        return key.__qualname__
    return repr(key)


def _takes_argument(factory: Callable[..., Any], name: str) -> bool:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return False
    required = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    required_kw = [
        p
        for p in signature.parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]
    if len(required) > 1 or required_kw:
        msg = (
            f"factory for {name} must take no argument or exactly one (the context, the user "
            f"or nothing, by lifetime); its signature is {signature}"
        )
        raise RegistryError(msg)
    return len(required) == 1


# What a component's name must not hold, by Unicode category: controls and the line and
# paragraph separators split or garble a log line, a lone surrogate cannot be encoded.
# What else str.isprintable() refuses is kept: the zero-width (non-)joiner of Persian
# words and emoji sequences, no-break spaces, the soft hyphen are part of names.
_GARBLING = frozenset({"Cc", "Zl", "Zp", "Cs"})


def _garbles_lines(name: str) -> bool:
    return not name.isprintable() and any(unicodedata.category(char) in _GARBLING for char in name)


def make_provider(
    key: Hashable,
    factory: Callable[..., Any],
    *,
    lifetime: Lifetime,
    name: str | None,
    enter: bool,
    idle_ttl: float,
) -> Provider:
    """Inspect ``factory`` once, at registration, so resolution does no introspection."""
    if not callable(factory):
        msg = f"factory for {key_name(key)} must be callable, not {type(factory).__name__}"
        raise RegistryError(msg)
    if not isinstance(lifetime, Lifetime):
        msg = f"lifetime must be a Lifetime, not {lifetime!r}"
        raise RegistryError(msg)
    if (
        isinstance(idle_ttl, bool)
        or not isinstance(idle_ttl, int | float)
        # nan too: it would stop the user's components expiring; infinity, or an int no
        # float holds (an OverflowError when its expiry was reckoned), is no number of
        # seconds either, as for every other option taking seconds
        or not 0 <= idle_ttl <= sys.float_info.max
    ):
        msg = f"idle_ttl must be a number of seconds >= 0 and finite, not {idle_ttl!s:.64}"
        raise RegistryError(msg)
    if name is not None and (not isinstance(name, str) or not name or _garbles_lines(name)):
        # It is joined into errors and written to log lines and span attributes: a
        # non-str broke the error for an unknown key, a line break would split a log line.
        msg = (
            "name must be a non-empty str without line breaks, control characters or "
            f"surrogates, not {_shorten(name)}"
        )
        raise RegistryError(msg)
    label = name if name is not None else key_name(key)
    if inspect.isasyncgenfunction(factory):
        kind = _AGEN
    elif inspect.isgeneratorfunction(factory):
        kind = _GEN
    elif inspect.iscoroutinefunction(factory):
        kind = _ASYNC
    else:
        kind = _SYNC
    takes_arg = _takes_argument(factory, label)
    if takes_arg and lifetime is Lifetime.APP:
        # It would be called with None for it: an APP component belongs to no request
        # and no user.
        msg = (
            f"the APP factory for {label} takes no argument, but this one requires one "
            "(a REQUEST factory may take the request's context, a USER factory the "
            "UserRef): give it a default or wrap it, e.g. `lambda: Factory(setting)`"
        )
        raise RegistryError(msg)
    return Provider(
        key=key,
        factory=factory,
        lifetime=lifetime,
        name=label,
        kind=kind,
        takes_arg=takes_arg,
        enter=enter,
        idle_ttl=idle_ttl,
        fresh=_makes_new(factory),
    )


def _makes_new(factory: Callable[..., Any]) -> bool:
    """Whether ``factory`` is a class whose call always makes a new object (no ``__new__``
    or metaclass ``__call__`` of its own that could hand out an existing one)."""
    if not isinstance(factory, type):
        return False
    new: object = factory.__new__
    call: object = type(factory).__call__
    return new is object.__new__ and call is type.__call__


# Return annotations whose first argument is the component (see key_from_annotation).
_YIELDED = (
    collections.abc.Iterator,
    collections.abc.Generator,
    collections.abc.AsyncIterator,
    collections.abc.AsyncGenerator,
    collections.abc.Iterable,
    collections.abc.AsyncIterable,
)
_ENTERED = (contextlib.AbstractContextManager, contextlib.AbstractAsyncContextManager)


def key_from_annotation(factory: Callable[..., Any], *, enter: bool = True) -> Hashable:
    """The key ``@registry.provide`` derives from a factory: the class itself, or what the
    return annotation names, unwrapped as resolution unwraps the result: ``Awaitable[X]``
    and ``Coroutine[..., X]`` (awaited), ``Iterator[X]``, ``AsyncIterator[X]`` and the like
    (a generator's yield) and, unless ``enter`` is false, ``AbstractContextManager[X]`` and
    ``AbstractAsyncContextManager[X]`` (entered); ``Annotated`` metadata is kept, also
    around what is unwrapped (``Annotated[Iterator[X], m]`` gives ``Annotated[X, m]``)."""
    if isinstance(factory, type):
        return factory
    try:
        # With extras: `-> Annotated[Engine, "replica"]` is a key of its own, as it is
        # for register(); stripped, it was Engine's and clashed with the primary one.
        hints = typing.get_type_hints(factory, include_extras=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable annotation"
        msg = f"cannot read the return annotation of {factory!r}: {exc}"
        raise RegistryError(msg) from None
    annotation = hints.get("return")
    if annotation is None:
        msg = (
            f"{getattr(factory, '__qualname__', factory)!r} has no return annotation; "
            "annotate it or use registry.register(key, factory)"
        )
        raise RegistryError(msg)
    annotation = _given(annotation, enter=enter)
    if annotation is None or annotation is type(None):
        # `-> None` (NoneType to get_type_hints) or `Iterator[None]`: no key to resolve.
        msg = (
            f"{getattr(factory, '__qualname__', factory)!r} is annotated to return None; "
            "annotate the component it gives or use registry.register(key, factory)"
        )
        raise RegistryError(msg)
    try:
        # Not isinstance(Hashable): an Annotated type says it is, and fails to hash when
        # its metadata does not (a dataclass instance, a dict).
        hash(annotation)
    except TypeError:
        msg = (
            f"return annotation {annotation!r} cannot be a registry key (it cannot be "
            "hashed): use hashable Annotated metadata or registry.register(key, factory)"
        )
        raise RegistryError(msg) from None
    return typing.cast(Hashable, annotation)


def _given(annotation: Any, *, enter: bool) -> Any:
    """What a factory annotated to return ``annotation`` gives (see key_from_annotation)."""
    if typing.get_origin(annotation) is typing.Annotated:
        # `Annotated[Iterator[X], m]` gives `Annotated[X, m]`: the metadata stays with
        # what is unwrapped (stripped, as it once was, this was simply `X`).
        wrapped = annotation.__origin__
        given = _given(wrapped, enter=enter)
        if given is wrapped:
            return annotation
        if given is None or given is type(None):
            return given  # refused as annotated to return None
        return typing.Annotated[(given, *annotation.__metadata__)]
    origin = typing.get_origin(annotation)
    if origin in (collections.abc.Awaitable, collections.abc.Coroutine):
        return _given(typing.get_args(annotation)[-1], enter=enter)
    if origin in _YIELDED or (enter and origin in _ENTERED):
        return typing.get_args(annotation)[0]
    return annotation


_new_object: Final = object.__new__
# What next() returns for a generator factory that has finished (its cleanup ran through).
_FINISHED: Final = object()


class Finalizer:
    """How one created component is cleaned up. ``is_async`` says which ``run`` to call.

    Cleanups see the exception the scope's body raised, cancellation included (context
    managers get it in ``__exit__``, generators have it thrown in at their ``yield``, as
    with :func:`contextlib.contextmanager`), so a transaction opened around a ``yield`` is
    rolled back, never committed, when the request was cancelled; they can never swallow
    it.
    """

    __slots__ = ("how", "is_async", "name", "target")

    # is_async positional too: the per-request calls pass it so (a keyword builds a dict).
    def __init__(self, name: str, how: str, target: Any, is_async: bool) -> None:
        self.name = name
        self.how = how
        self.target = target
        self.is_async = is_async

    def run_sync(self, exc: BaseException | None) -> None:
        target = self.target
        if self.how == "generator":
            try:
                if exc is None:
                    # A default rather than StopIteration: raising and catching that costs
                    # more than the rest of this cleanup, on every request with one.
                    if next(target, _FINISHED) is _FINISHED:
                        return
                else:
                    target.throw(exc)
            except StopIteration:
                return
            except BaseException as raised:
                if raised is exc:
                    return
                raise
            self.yielded_again()
        if self.how == "context manager":
            if exc is None:
                target.__exit__(None, None, None)
                return
            try:
                target.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException as raised:
                # Handing back the exception it was given (SQLAlchemy's transactions do)
                # is how `with` lets it propagate too: not a failure of the cleanup.
                if raised is not exc:
                    raise
            return
        target.close()

    def yielded_again(self) -> NoReturn:
        """Close a generator factory that yielded a second time, and raise that."""
        self.target.close()
        msg = f"generator factory of {self.name} yielded more than once"
        raise RuntimeError(msg)

    async def run(self, exc: BaseException | None) -> None:
        target = self.target
        if self.how == "async generator":
            try:
                if exc is None:
                    await target.__anext__()
                else:
                    await target.athrow(exc)
            except StopAsyncIteration:
                return
            except BaseException as raised:
                if raised is exc:
                    return
                raise
            await target.aclose()
            msg = f"async generator factory of {self.name} yielded more than once"
            raise RuntimeError(msg)
        if self.how == "async context manager":
            if exc is None:
                await target.__aexit__(None, None, None)
                return
            try:
                await target.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseException as raised:
                if raised is not exc:  # as in run_sync
                    raise
            return
        await target.aclose()


# Per class of factory result that is neither an awaitable, a generator, an async generator
# nor a context manager (most components): how its instances are closed, as
# ``(how, instances_have_dict)`` with ``how`` one of "aclose", "close", "async close" or
# None, or None when only the instance can tell. Every check is a class-level one, so a
# class seen once skips them (inspect.isawaitable alone costs more than creating a small
# object). Bounded, in case an application creates classes on the fly.
_PLAIN: dict[type, tuple[str | None, bool] | None] = {}
_MAX_PLAIN = 4096
_UNSEEN: Any = object()
# What _PLAIN holds for a class whose instances have nothing to clean and no ``__dict__``
# to give them a close() of their own: build_sync() and build_now() look for it in place,
# a call fewer for such a component.
_BARE: Final = (None, False)
# What it holds for a class with nothing to clean whose instances have a ``__dict__``, found
# by the usual attribute lookup: getattr() tells whether an instance has a close() of its
# own. Reading ``result.__dict__`` would tell too, but (on Python 3.11 and later) builds
# that dict, which the object keeps, its attribute reads slower ever after.
_BARE_DICT: Final = (None, True)


def _special(result: Any) -> bool:
    """Whether ``result`` needs more than ``aclose()``/``close()`` lookups."""
    cls = type(result)
    return (
        inspect.isawaitable(result)
        or inspect.isasyncgen(result)
        or inspect.isgenerator(result)
        or hasattr(cls, "__aenter__")
        or hasattr(cls, "__enter__")
    )


def _class_close(cls: type) -> tuple[str | None, bool] | None:
    """``(how, instances_have_dict)``, or ``None`` when only the instance can tell."""
    how: str | None = None
    if (
        inspect.getattr_static(cls, "__getattr__", None) is not None
        # A __getattribute__ of its own (a proxy forwarding every attribute) may give an
        # instance a close() that neither the class nor the instance's __dict__ holds.
        or cls.__getattribute__ is not object.__getattribute__  # type: ignore[comparison-overlap]
    ):
        return None  # names appear at run time
    aclose = inspect.getattr_static(cls, "aclose", None)
    close = inspect.getattr_static(cls, "close", None)
    for found in (aclose, close):
        if found is not None and not inspect.isfunction(found):
            return None  # a descriptor, a staticmethod, a callable object: ask the instance
    if aclose is not None and inspect.iscoroutinefunction(aclose):
        how = "aclose"
    elif close is not None:
        how = "async close" if inspect.iscoroutinefunction(close) else "close"
    has_dict = cls.__dictoffset__ != 0
    if how is None:
        if not has_dict:
            return _BARE
        if _usual_lookup(cls):
            return _BARE_DICT
    return how, has_dict


def _usual_lookup(cls: type) -> bool:
    """Whether an attribute of ``cls``'s instances is looked up as ``object``'s are, in
    the ``__dict__`` the type gives them."""
    if cls.__getattribute__ is not object.__getattribute__:  # type: ignore[comparison-overlap]
        return False
    for base in cls.__mro__:
        found = base.__dict__.get("__dict__")
        if found is not None:
            return type(found) is types.GetSetDescriptorType
    return False


def _plain(
    provider: Provider, result: Any, components: Mapping[Hashable, Any]
) -> tuple[Any, Finalizer | None] | None:
    """The component and its cleanup when ``result`` is a plain object (see ``_PLAIN``),
    without the cleanup when it is a component the scope holds already (see
    :func:`_owned`); ``None`` when it must be awaited, iterated or entered first."""
    cls = type(result)
    known = _PLAIN.get(cls, _UNSEEN)
    if known is _BARE or (
        # No close() or aclose() on the class: none on the instance either (see _BARE_DICT).
        known is _BARE_DICT
        and getattr(result, "close", None) is None
        and getattr(result, "aclose", None) is None
    ):
        return result, None
    if known is _UNSEEN:
        if _special(result):
            return None
        known = _class_close(cls)
        if len(_PLAIN) >= _MAX_PLAIN:
            _PLAIN.clear()
        _PLAIN[cls] = known
    if known is not None:
        how, has_dict = known
        # An instance attribute of the same name still wins.
        if not has_dict or not ("close" in result.__dict__ or "aclose" in result.__dict__):
            if how is None:
                return result, None  # most components: nothing to clean, no _owned() call
            if how == "async close":
                return _owned(provider, (result, _AsyncClose(provider.name, result)), components)
            finalizer = Finalizer(provider.name, how, result, how == "aclose")
            return _owned(provider, (result, finalizer), components)
    aclose = getattr(result, "aclose", None)
    if callable(aclose) and inspect.iscoroutinefunction(aclose):
        finalizer = Finalizer(provider.name, "aclose", result, is_async=True)
        return _owned(provider, (result, finalizer), components)
    close = getattr(result, "close", None)
    if callable(close):
        if inspect.iscoroutinefunction(close):
            return _owned(provider, (result, _AsyncClose(provider.name, result)), components)
        finalizer = Finalizer(provider.name, "close", result, is_async=False)
        return _owned(provider, (result, finalizer), components)
    return result, None


def _closer(provider: Provider, result: Any, *, can_await: bool) -> tuple[Any, Finalizer | None]:
    """Decide how a plain factory result is cleaned up (and enter it if it is a CM)."""
    cls = type(result)
    name = provider.name
    if provider.enter:
        if hasattr(cls, "__aenter__") and hasattr(cls, "__aexit__") and can_await:
            return None, Finalizer(name, "async context manager", result, is_async=True)
        if hasattr(cls, "__enter__") and hasattr(cls, "__exit__"):
            return result.__enter__(), Finalizer(name, "context manager", result, is_async=False)
        if hasattr(cls, "__aenter__"):
            msg = (
                f"{name} is an async context manager, which resolve_sync() cannot enter; "
                "use `await resolve(...)`, or register it with enter=False"
            )
            raise ResolutionError(msg)
    aclose = getattr(result, "aclose", None)
    if callable(aclose) and inspect.iscoroutinefunction(aclose):
        return result, Finalizer(name, "aclose", result, is_async=True)
    close = getattr(result, "close", None)
    if callable(close):
        if inspect.iscoroutinefunction(close):
            return result, _AsyncClose(name, result)
        return result, Finalizer(name, "close", result, is_async=False)
    return result, None


class _AsyncClose(Finalizer):
    __slots__ = ()

    def __init__(self, name: str, target: Any) -> None:
        super().__init__(name, "async close", target, is_async=True)

    async def run(self, exc: BaseException | None) -> None:
        await self.target.close()


def _held(provider: Provider, result: Any, components: Mapping[Hashable, Any]) -> bool:
    """Whether ``result``, made by ``provider``, is a component the scope holds already (a
    factory handing out another component: an alias of it). Its own store cleans it; the
    alias must not."""
    if provider.fresh:
        return False
    try:
        for held in components.values():
            if held is result:
                return True
    except RuntimeError:  # a worker thread of the scope added a component meanwhile
        return any(held is result for held in list(components.values()))
    return False


def _owned(
    provider: Provider, plain: tuple[Any, Finalizer | None], components: Mapping[Hashable, Any]
) -> tuple[Any, Finalizer | None]:
    """``plain`` (a plain result and its cleanup), without the cleanup when the result is
    a component the scope holds already (see :func:`_held`)."""
    if plain[1] is not None and _held(provider, plain[0], components):
        return plain[0], None
    return plain


async def build_async(
    provider: Provider, arg: object, components: Mapping[Hashable, Any]
) -> tuple[Any, Finalizer | None]:
    """Call the factory and enter its result; return the component and its cleanup.

    ``components`` are those the scope holds: a result that is one of them is handed out
    as is, neither entered nor cleaned (its own store cleans it)."""
    args = (arg,) if provider.takes_arg else ()
    kind = provider.kind
    if kind is _AGEN:
        return await _enter_agen(provider, provider.factory(*args))
    if kind is _GEN:
        return _enter_gen(provider, provider.factory(*args))
    result = provider.factory(*args)
    if kind is _SYNC:
        plain = _plain(provider, result, components)
        if plain is not None:
            return plain
    return await finish_async(provider, result, components)


async def finish_async(
    provider: Provider, result: Any, components: Mapping[Hashable, Any]
) -> tuple[Any, Finalizer | None]:
    """Await and enter what a factory returned, as :func:`build_async` does."""
    if provider.kind is _ASYNC or inspect.isawaitable(result):
        result = await result
    plain = _plain(provider, result, components)
    if plain is not None:
        return plain
    return await enter_async(provider, result, components)


async def enter_async(
    provider: Provider, result: Any, components: Mapping[Hashable, Any]
) -> tuple[Any, Finalizer | None]:
    """The rest of :func:`finish_async` once ``result`` is awaited and not a plain object
    (:func:`_plain` answered ``None``): enter it."""
    if inspect.isasyncgen(result):  # e.g. `lambda: make(x)` around an async generator
        return await _enter_agen(provider, result)
    if inspect.isgenerator(result):
        return _enter_gen(provider, result)
    if _held(provider, result, components):
        return result, None
    instance, finalizer = _closer(provider, result, can_await=True)
    if finalizer is not None and finalizer.how == "async context manager":
        instance = await result.__aenter__()
    return instance, finalizer


# What build_now() returns, with the factory's result, when that result must be awaited.
AWAIT: Any = object()


def build_now(
    provider: Provider, arg: object, components: Mapping[Hashable, Any]
) -> tuple[Any, Any]:
    """Build a component of a sync factory (a plain function or a generator, which may
    still return an awaitable) without awaiting.

    Returns ``(instance, finalizer)``, or ``(AWAIT, result)`` when the factory returned
    something to await or enter asynchronously: pass ``result`` to :func:`finish_async`.
    """
    # The call spelled out: a call with *args builds a tuple, and costs more.
    result = provider.factory(arg) if provider.takes_arg else provider.factory()
    if provider.kind is _GEN:
        return _enter_gen(provider, result)
    if _PLAIN.get(type(result)) is _BARE:
        return result, None
    return finish_now(provider, result, components)


def finish_now(
    provider: Provider, result: Any, components: Mapping[Hashable, Any]
) -> tuple[Any, Any]:
    """The rest of :func:`build_now` once a plain function returned ``result``, which
    is not of a class with nothing to clean (``_BARE``)."""
    plain = _plain(provider, result, components)
    if plain is not None:
        return plain
    if inspect.isgenerator(result):
        return _enter_gen(provider, result)
    if (
        inspect.isawaitable(result)
        or inspect.isasyncgen(result)
        or (provider.enter and hasattr(type(result), "__aenter__"))
    ):
        return AWAIT, result
    if _held(provider, result, components):
        return result, None
    return _closer(provider, result, can_await=True)


def build_sync(
    provider: Provider, arg: object, components: Mapping[Hashable, Any]
) -> tuple[Any, Finalizer | None]:
    """Like :func:`build_async`, for sync factories only."""
    kind = provider.kind
    if kind is _ASYNC or kind is _AGEN:
        msg = (
            f"{provider.name} has an {kind} factory, which resolve_sync() cannot run; "
            "use `await resolve(...)`"
        )
        raise ResolutionError(msg)
    # As in build_now().
    result = provider.factory(arg) if provider.takes_arg else provider.factory()
    if kind is _GEN:
        return _enter_gen(provider, result)
    if _PLAIN.get(type(result)) is _BARE:
        return result, None
    return finish_sync(provider, result, components)


def finish_sync(
    provider: Provider, result: Any, components: Mapping[Hashable, Any]
) -> tuple[Any, Finalizer | None]:
    """The rest of :func:`build_sync` once a plain function returned ``result``, which
    is not of a class with nothing to clean (``_BARE``)."""
    plain = _plain(provider, result, components)
    if plain is not None:
        return plain
    if inspect.isawaitable(result) or inspect.isasyncgen(result):
        if inspect.iscoroutine(result):
            result.close()
        msg = (
            f"the factory of {provider.name} returned an awaitable or async generator, which "
            "resolve_sync() cannot run; use `await resolve(...)`"
        )
        raise ResolutionError(msg)
    if inspect.isgenerator(result):
        return _enter_gen(provider, result)
    if _held(provider, result, components):
        return result, None
    return _closer(provider, result, can_await=False)


def _no_yield(provider: Provider, kind: str = _GEN) -> ResolutionError:
    """The error of a generator (or async generator) factory that returned without
    yielding."""
    return ResolutionError(f"{kind} factory of {provider.name} returned without yielding")


def _enter_gen(provider: Provider, gen: Any) -> tuple[Any, Finalizer]:
    try:
        instance = next(gen)
    except StopIteration:
        raise _no_yield(provider) from None
    # Finalizer.__init__, inlined: calling a class with an __init__ in Python costs about
    # twice what making the object and setting its slots here does.
    finalizer = _new_object(Finalizer)
    finalizer.name = provider.name
    finalizer.how = "generator"
    finalizer.target = gen
    finalizer.is_async = False
    return instance, finalizer


async def _enter_agen(provider: Provider, agen: Any) -> tuple[Any, Finalizer]:
    step = agen.__anext__() if provider.lifetime is _REQUEST else _unseen_step(provider, agen)
    try:
        instance = await step
    except StopAsyncIteration:
        raise _no_yield(provider, _AGEN) from None
    return instance, Finalizer(provider.name, "async generator", agen, is_async=True)


def _unseen_step(provider: Provider, agen: Any) -> Any:
    """The first ``agen.__anext__()`` of a USER or APP component's async generator, which
    the event loop's async generator hooks do not see.

    A loop closes the generators it saw first iterated, unfinished, as it ends
    (``shutdown_asyncgens``, trio's end of run): it closed the components of a registry that
    outlives it (one ``asyncio.run`` per job), which the next loop was handed, cleaned; and
    one ending while another loop ran such a cleanup (``registry.aclose()``, an expiry)
    logged "asynchronous generator is already running". The registry cleans them; the
    loop's finalizer still closes one garbage-collected unfinished while it runs.
    """
    firstiter, finalizer = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(None, _Abandoned(provider.name, finalizer))
    try:
        return agen.__anext__()
    finally:
        sys.set_asyncgen_hooks(firstiter, finalizer)


class _Abandoned:
    """The finalizer of a USER or APP component's async generator garbage-collected
    unfinished (its registry was dropped without ``aclose()``): the event loop it was made
    on closes it, as it would have; once that loop has ended, a warning says that its
    cleanup never ran (asyncio's own finalizer says nothing then)."""

    __slots__ = ("_finalizer", "_name")

    def __init__(self, name: str, finalizer: Callable[[Any], object] | None) -> None:
        self._name = name
        self._finalizer = finalizer

    def __call__(self, agen: Any) -> None:
        finalizer = self._finalizer
        loop = getattr(finalizer, "__self__", None)
        is_closed = getattr(loop, "is_closed", None)
        if finalizer is not None and not (is_closed is not None and is_closed()):
            try:
                finalizer(agen)
            except RuntimeError:
                pass  # trio's run has ended
            else:
                return
        warnings.warn(
            f"the cleanup of {self._name} never ran: its async generator was "
            "garbage-collected unfinished after the event loop it was made on had ended "
            "(the registry was never closed); call `await registry.aclose()` at shutdown",
            ResourceWarning,
            stacklevel=1,
        )
