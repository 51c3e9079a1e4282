"""Registry: registration rules and every factory shape."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from typing import Annotated, Any

import anyio
import pytest

import ambient
from ambient import (
    Lifetime,
    Registry,
    RegistryError,
    ResolutionError,
    UserExecutionContext,
    UserRef,
)


class Log:
    """Records what happened, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []


@pytest.fixture(name="log")
def fixture_log() -> Log:
    return Log()


def ctx() -> UserExecutionContext:
    return UserExecutionContext.create("alice")


class Thing:
    def __init__(self, tag: str = "") -> None:
        self.tag = tag


class Pool:
    """A component made by awaiting a factory's result, then entering it."""


async def _log_later() -> Log:
    return Log()


class TestRegistration:
    def test_duplicate_key_is_refused(self) -> None:
        """Registering a key twice raises unless replace=True."""
        registry = Registry()
        registry.register(Thing, Thing)
        with pytest.raises(RegistryError, match="already registered.*replace=True"):
            registry.register(Thing, Thing)
        registry.register(Thing, lambda: Thing("new"), replace=True)

    async def test_frozen_after_first_scope(self) -> None:
        """After the first scope opens, register() raises."""
        registry = Registry()
        async with registry.open_scope(ctx()):
            pass
        with pytest.raises(RegistryError, match="frozen"):
            registry.register(Thing, Thing)

    async def test_still_frozen_after_aclose(self) -> None:
        """aclose() (shutdown) closes the registry, which then refuses to make USER and APP
        components until a scope opens again: registrations stay refused all along. One
        closed before any scope opened (a failed startup) still takes them."""
        registry = Registry()
        async with registry.open_scope(ctx()):
            pass
        await registry.aclose()
        with pytest.raises(RegistryError, match="frozen"):
            registry.register(Thing, Thing)
        await registry.aclose()
        with pytest.raises(RegistryError, match="frozen"):
            registry.register(Thing, Thing)
        unused = Registry()
        await unused.aclose()
        unused.register(Thing, Thing)

    def test_factory_must_be_callable(self) -> None:
        """A non-callable factory is refused at registration."""
        with pytest.raises(RegistryError, match="callable"):
            Registry().register(Thing, Thing())  # type: ignore[arg-type]

    @pytest.mark.parametrize("lifetime", ["user", "USER", None, 1])
    def test_a_lifetime_that_is_no_lifetime_is_refused(self, lifetime: object) -> None:
        """A lifetime given as its name or value (or anything but a Lifetime) is refused at
        registration, naming what was given, never registered to fail or be taken for
        another lifetime when it is first resolved."""
        registry = Registry()
        with pytest.raises(RegistryError, match=f"lifetime must be a Lifetime, not {lifetime!r}"):
            registry.register(Thing, Thing, lifetime=lifetime)  # type: ignore[arg-type]
        assert Thing not in registry.providers

    @pytest.mark.parametrize(
        ("key", "error"),
        [
            (None, "must not be None"),
            ([Thing], r"must be hashable .*, not \[<class"),
            ((Thing, {"role": "replica"}), "must be hashable"),
        ],
        ids=["none", "list", "tuple-holding-a-dict"],
    )
    def test_a_key_no_scope_could_resolve_is_refused(self, key: Any, error: str) -> None:
        """``None`` (what a failed optional import leaves) or a key that cannot be hashed
        is a ``RegistryError`` naming it, not Python's bare "unhashable type" nor a
        registration under None."""
        registry = Registry()
        with pytest.raises(RegistryError, match=error):
            registry.register(key, Thing)
        assert not registry.providers

    @pytest.mark.parametrize("enter", ["no", 0, None, "False"])
    def test_enter_that_is_no_bool_is_refused(self, enter: object) -> None:
        """``enter="no"`` is truthy: it entered the context manager it was meant to keep
        from being entered. Anything but True or False is refused at registration."""
        registry = Registry()
        with pytest.raises(RegistryError, match=f"enter must be True or False, not {enter!r}"):
            registry.register(Thing, Thing, enter=enter)  # type: ignore[arg-type]
        assert not registry.providers

    @pytest.mark.parametrize("replace", ["no", 0, 1, None, "False"])
    def test_replace_that_is_no_bool_is_refused(self, replace: object) -> None:
        """``replace="no"`` is truthy: it replaced the registration it was meant to keep.
        Anything but True or False is refused, and the earlier registration stays."""

        def other() -> Thing:
            return Thing()

        registry = Registry()
        registry.register(Thing, Thing)
        with pytest.raises(RegistryError, match=f"replace must be True or False, not {replace!r}"):
            registry.register(Thing, other, replace=replace)  # type: ignore[arg-type]
        assert registry.providers[Thing].factory is Thing

    def test_factory_with_two_required_arguments_is_refused(self) -> None:
        """Factories take at most one argument."""
        with pytest.raises(RegistryError, match="exactly one"):
            Registry().register(Thing, lambda a, b: Thing())

    def test_factory_with_a_required_keyword_only_argument_is_refused(self) -> None:
        """A factory is called with the context, the user or nothing, never a keyword:
        one that requires a keyword-only argument is refused where it is registered."""

        def factory(*, setting: str) -> Thing:
            return Thing()

        with pytest.raises(RegistryError, match="exactly one"):
            Registry().register(Thing, factory)

    async def test_a_positional_only_argument_is_the_one_a_factory_takes(self) -> None:
        """A factory whose one argument is positional-only (``def make(context, /)``, or a
        builtin's) gets what its lifetime gives, as any other one-argument factory does;
        it was called with nothing, a TypeError at its first resolution. An APP factory
        requiring one is refused at registration, as for any required argument."""

        def for_request(context: UserExecutionContext, /) -> str:
            return f"request of {context.user_id}"

        def for_user(user: UserRef, /) -> str:
            return f"cache of {user.user_id}"

        def for_app(setting: str, /) -> str:
            return setting

        registry = Registry()
        registry.register("request", for_request)
        registry.register("user", for_user, lifetime=Lifetime.USER)
        with pytest.raises(RegistryError, match="APP factory for 'app' takes no argument"):
            registry.register("app", for_app, lifetime=Lifetime.APP)
        async with registry.open_scope(ctx()):
            assert await ambient.resolve("request") == "request of alice"
            assert ambient.resolve_sync("user") == "cache of alice"
        await registry.aclose()

    @pytest.mark.parametrize("lifetime", list(Lifetime))
    async def test_a_factory_whose_signature_cannot_be_read_is_called_with_nothing(
        self, lifetime: Lifetime
    ) -> None:
        """A builtin whose signature inspect cannot read (``dict``, ``deque``) is taken
        for a factory of no argument, whatever its lifetime: called with nothing, never
        with the context (``dict(context)`` fails) nor refused as an APP factory that
        needs one."""
        registry = Registry()
        registry.register("counts", dict, lifetime=lifetime)
        registry.register("queue", collections.deque, lifetime=lifetime)
        async with registry.open_scope(ctx()):
            assert await ambient.resolve("counts") == {}
            assert ambient.resolve_sync("queue") == collections.deque()
        await registry.aclose()

    def test_app_factory_with_a_required_argument_is_refused(self) -> None:
        """An APP factory is given nothing: one that needs an argument (a class whose
        ``__init__`` takes a setting) is refused where it is registered, not called with
        ``None`` for it at its first resolution."""

        class Settings:
            def __init__(self, path: str) -> None:
                self.path = path

        registry = Registry()
        with pytest.raises(RegistryError, match="APP factory for .*Settings takes no argument"):
            registry.register(Settings, Settings, lifetime=Lifetime.APP)
        registry.register(Settings, lambda path="app.toml": Settings(path), lifetime=Lifetime.APP)

    def test_idle_ttl_only_for_user_components(self) -> None:
        """idle_ttl on a REQUEST component is a mistake."""
        with pytest.raises(RegistryError, match="USER"):
            Registry().register(Thing, Thing, idle_ttl=5)

    def test_provide_takes_the_key_from_the_return_annotation(self) -> None:
        """@provide keys a function by its return annotation, unwrapping iterators."""
        registry = Registry()

        @registry.provide
        def make() -> Thing:
            return Thing()

        @registry.provide(lifetime=Lifetime.USER)
        def make_log() -> Iterator[Log]:
            yield Log()

        @registry.provide(lifetime=Lifetime.APP)
        async def make_ref() -> AsyncIterator[UserRef]:
            yield UserRef("x")

        assert set(registry.providers) == {Thing, Log, UserRef}
        assert registry.providers[Log].lifetime is Lifetime.USER

    async def test_provide_keeps_annotated_metadata_in_the_key(self) -> None:
        """``-> Annotated[Thing, "replica"]`` keys the factory by that ``Annotated`` type,
        as ``register(Annotated[Thing, "replica"], ...)`` does, unwrapped from an iterator
        too. The metadata was dropped: the key was ``Thing``, so a second variant clashed
        with the plain one and resolving the ``Annotated`` key found nothing."""
        registry = Registry()

        @registry.provide
        def primary() -> Thing:
            return Thing("primary")

        @registry.provide
        def replica() -> Annotated[Thing, "replica"]:
            return Thing("replica")

        @registry.provide
        def audit() -> Iterator[Annotated[Thing, "audit"]]:
            yield Thing("audit")

        assert set(registry.providers) == {
            Thing,
            Annotated[Thing, "replica"],
            Annotated[Thing, "audit"],
        }
        async with registry.open_scope(ctx()) as scope:
            assert (await scope.resolve(Thing)).tag == "primary"
            assert (await scope.resolve(Annotated[Thing, "replica"])).tag == "replica"
            assert scope.resolve_sync(Annotated[Thing, "audit"]).tag == "audit"

    async def test_provide_keeps_annotated_metadata_around_an_iterator_or_a_manager(
        self,
    ) -> None:
        """``-> Annotated[Iterator[Thing], "audit"]`` gives an ``Annotated[Thing, "audit"]``:
        the metadata stays with what is unwrapped. The annotation was taken as written, a
        key under which the factory's ``Thing`` was handed out and that nothing resolves
        (before metadata was kept at all, the key was ``Thing``)."""
        registry = Registry()

        @registry.provide
        def audit() -> Annotated[Iterator[Thing], "audit"]:
            yield Thing("audit")

        @registry.provide
        def replica() -> Annotated[contextlib.AbstractContextManager[Thing], "replica"]:
            return contextlib.nullcontext(Thing("replica"))

        assert set(registry.providers) == {Annotated[Thing, "audit"], Annotated[Thing, "replica"]}
        async with registry.open_scope(ctx()) as scope:
            assert (await scope.resolve(Annotated[Thing, "audit"])).tag == "audit"
            assert (await scope.resolve(Annotated[Thing, "replica"])).tag == "replica"
        with pytest.raises(RegistryError, match="annotated to return None"):

            @registry.provide
            def setup() -> Annotated[Iterator[None], "setup"]:
                yield

    def test_provide_refuses_annotated_metadata_that_cannot_be_hashed(self) -> None:
        """Metadata that cannot be hashed (here a dict) makes a key that cannot be: a
        ``RegistryError`` saying so, not the ``TypeError`` of a dict insertion."""
        registry = Registry()
        with pytest.raises(RegistryError, match="cannot be hashed"):

            @registry.provide
            def replica() -> Annotated[Thing, {"role": "replica"}]:
                return Thing("replica")

        assert not registry.providers

    async def test_provide_keys_an_entered_or_awaited_result_by_what_it_gives(
        self,
    ) -> None:
        """A factory annotated to return a context manager or an awaitable of ``X`` gives
        ``X`` once resolution entered or awaited it, so ``X`` is its key (the manager
        itself with ``enter=False``). The key was the annotation as written, e.g.
        ``AbstractAsyncContextManager[Thing]``, under which a ``Thing`` was handed out."""
        registry = Registry()

        @registry.provide
        def entered() -> contextlib.AbstractAsyncContextManager[Thing]:
            return contextlib.nullcontext(Thing("entered"))

        @registry.provide
        def awaited() -> Awaitable[Log]:
            return _log_later()

        @registry.provide(enter=False)
        def kept() -> contextlib.AbstractContextManager[UserRef]:
            return contextlib.nullcontext(UserRef("kept"))

        async def open_pool() -> contextlib.AbstractAsyncContextManager[Pool]:
            return contextlib.nullcontext(Pool())

        # Awaited, then entered: the key is what both give.
        @registry.provide
        def pool() -> Awaitable[contextlib.AbstractAsyncContextManager[Pool]]:
            return open_pool()

        assert set(registry.providers) == {
            Thing,
            Log,
            contextlib.AbstractContextManager[UserRef],
            Pool,
        }
        async with registry.open_scope(ctx()) as scope:
            assert (await scope.resolve(Thing)).tag == "entered"
            assert isinstance(await scope.resolve(Log), Log)
            kept_manager = await scope.resolve(contextlib.AbstractContextManager[UserRef])
            assert isinstance(kept_manager, contextlib.nullcontext)
            assert type(await scope.resolve(Pool)) is Pool

    async def test_provide_keys_a_class_by_itself_and_a_coroutine_by_what_it_returns(
        self,
    ) -> None:
        """``@registry.provide`` on a class registers the class under itself (its
        annotations name no return); on a factory annotated to return
        ``Coroutine[Any, Any, X]`` (what an ``async def`` gives when called) under ``X``."""
        registry = Registry()

        @registry.provide
        class Service:
            pass

        async def make_log() -> Log:
            return Log()

        @registry.provide
        def log() -> Coroutine[Any, Any, Log]:
            return make_log()

        assert set(registry.providers) == {Service, Log}
        async with registry.open_scope(ctx()) as scope:
            assert type(await scope.resolve(Service)) is Service
            assert type(await scope.resolve(Log)) is Log

    def test_provide_needs_an_annotation(self) -> None:
        """A factory without a return annotation cannot be keyed."""
        registry = Registry()
        with pytest.raises(RegistryError, match="no return annotation"):

            @registry.provide
            def make():  # type: ignore[no-untyped-def]
                return Thing()

    def test_provide_refuses_a_factory_annotated_to_return_none(self) -> None:
        """``-> None`` (also as ``Iterator[None]``) names no component: it was registered
        under ``NoneType``, a key nobody resolves, and the real key stayed unregistered."""
        registry = Registry()
        with pytest.raises(RegistryError, match="annotated to return None"):

            @registry.provide
            def setup() -> None:
                pass

        with pytest.raises(RegistryError, match="annotated to return None"):

            @registry.provide
            def setup_gen() -> Iterator[None]:
                yield

        assert not registry.providers

    @pytest.mark.parametrize(
        ("argument", "error"),
        [
            (Lifetime.USER, r"lifetime as a keyword: @registry.provide\(lifetime=Lifetime.USER\)"),
            ("cache", r"no key: use registry.register\(key, factory\)"),
        ],
    )
    def test_provide_given_a_lifetime_or_a_key_says_how_to_pass_it(
        self, argument: Any, error: str
    ) -> None:
        """``@registry.provide(Lifetime.USER)`` (the lifetime positionally) and
        ``@registry.provide("cache")`` were refused as a failure to read the return
        annotation *of the lifetime or key*, which did not say what to write instead."""
        registry = Registry()
        with pytest.raises(RegistryError, match=error):
            registry.provide(argument)
        assert not registry.providers

    async def test_unknown_key_lists_registered_names(self) -> None:
        """Resolving an unknown key names what is registered."""
        registry = Registry()
        registry.register(Thing, Thing)
        registry.register("cache", dict, name="the-cache")
        async with registry.open_scope(ctx()) as scope:
            with pytest.raises(ResolutionError, match="Log.*registered: Thing, the-cache"):
                await scope.resolve(Log)
            with pytest.raises(ResolutionError, match="registered"):
                scope.resolve_sync(Log)

    async def test_unknown_key_lists_registered_names_in_alphabetical_order(self) -> None:
        """The names in the error are sorted, whatever order they were registered in, so
        the one looked for is found by eye among many."""
        registry = Registry()
        registry.register("zeta", dict, name="zeta-cache")
        registry.register("alpha", dict, name="alpha-cache")
        registry.register("mid", dict, name="mid-cache")
        async with registry.open_scope(ctx()) as scope:
            with pytest.raises(
                ResolutionError, match="registered: alpha-cache, mid-cache, zeta-cache\\. "
            ):
                await scope.resolve(Log)

    def test_errors_name_a_nested_class_key_by_its_qualified_name(self) -> None:
        """A class key is named in errors by its qualified name (``Outer.Settings``), so two
        classes of the same name in different places are told apart."""

        class Outer:
            class Settings:
                pass

        registry = Registry()
        registry.register(Outer.Settings, Outer.Settings)
        with pytest.raises(
            RegistryError, match=r"\.<locals>\.Outer\.Settings is already registered"
        ):
            registry.register(Outer.Settings, Outer.Settings)
        assert ".<locals>.Outer.Settings. Register it" in str(registry.unknown_key("other"))

    def test_provide_registers_with_the_name_and_idle_ttl_it_is_given(self) -> None:
        """``@registry.provide(name=..., idle_ttl=...)`` registers the factory under that
        name and idle_ttl, as ``register()`` does: neither is left for its default."""
        registry = Registry()

        @registry.provide(lifetime=Lifetime.USER, name="audit log", idle_ttl=5)
        def make_log() -> Log:
            return Log()

        provider = registry.providers[Log]
        assert (provider.name, provider.idle_ttl) == ("audit log", 5)
        assert "registered: audit log." in str(registry.unknown_key("other"))

    @pytest.mark.parametrize("given", ["alice", None, UserRef("alice")], ids=repr)
    def test_open_scope_takes_only_a_user_execution_context(self, given: Any) -> None:
        """A user id, ``None`` or a ``UserRef`` where a context is wanted is a TypeError
        naming what was given, at the call, not a failure once the scope is entered."""
        registry = Registry()
        with pytest.raises(
            TypeError,
            match=f"open_scope\\(\\) takes a UserExecutionContext, not {type(given).__name__}",
        ):
            registry.open_scope(given)
        assert registry.open_scopes == 0

    @pytest.mark.parametrize("given", ["alice", None, UserRef("alice")], ids=repr)
    def test_a_scope_made_directly_takes_only_a_user_execution_context(self, given: Any) -> None:
        """``Scope(registry, ...)`` refuses the same: bound, anything else would be what
        ``get_current_context()`` answers."""
        registry = Registry()
        with pytest.raises(
            TypeError, match=f"a Scope takes a UserExecutionContext, not {type(given).__name__}"
        ):
            ambient.Scope(registry, given)
        assert registry.open_scopes == 0


class TestFactoryShapes:
    async def test_plain_class_and_function(self) -> None:
        """A class and a function, with and without the context argument."""
        registry = Registry()
        registry.register("cls", Thing)
        registry.register("with_ctx", lambda c: Thing(c.user_id))
        registry.register("no_arg", lambda: Thing("none"))
        async with registry.open_scope(ctx()) as scope:
            assert isinstance(await scope.resolve("cls"), Thing)
            assert (await scope.resolve("with_ctx")).tag == "alice"
            assert scope.resolve_sync("no_arg").tag == "none"

    async def test_async_factory(self) -> None:
        """An async def factory is awaited."""
        registry = Registry()

        async def make(c: UserExecutionContext) -> Thing:
            return Thing(c.user_id)

        registry.register(Thing, make)
        async with registry.open_scope(ctx()) as scope:
            assert (await scope.resolve(Thing)).tag == "alice"

    async def test_generator_factory_cleans_after_yield(self, log: Log) -> None:
        """Code after a generator's yield runs at scope close."""
        registry = Registry()

        def make() -> Iterator[Thing]:
            log.events.append("start")
            yield Thing()
            log.events.append("end")

        registry.register(Thing, make)
        async with registry.open_scope(ctx()) as scope:
            await scope.resolve(Thing)
            assert log.events == ["start"]
        assert log.events == ["start", "end"]

    async def test_async_generator_factory(self, log: Log) -> None:
        """An async generator's code after yield runs at close."""
        registry = Registry()

        async def make() -> AsyncIterator[Thing]:
            log.events.append("start")
            yield Thing()
            log.events.append("end")

        registry.register(Thing, make)
        async with registry.open_scope(ctx()) as scope:
            await scope.resolve(Thing)
        assert log.events == ["start", "end"]

    async def test_context_manager_results_are_entered(self, log: Log) -> None:
        """A returned (async) context manager is entered; the component is what it gives."""
        registry = Registry()

        @contextlib.contextmanager
        def sync_cm() -> Iterator[str]:
            log.events.append("enter-sync")
            yield "sync-value"
            log.events.append("exit-sync")

        @contextlib.asynccontextmanager
        async def async_cm() -> AsyncIterator[str]:
            log.events.append("enter-async")
            yield "async-value"
            log.events.append("exit-async")

        registry.register("sync", sync_cm)
        registry.register("async", async_cm)
        async with registry.open_scope(ctx()) as scope:
            assert await scope.resolve("sync") == "sync-value"
            assert await scope.resolve("async") == "async-value"
        assert log.events == ["enter-sync", "enter-async", "exit-async", "exit-sync"]

    async def test_enter_false_keeps_the_manager(self, log: Log) -> None:
        """enter=False hands out the context manager itself and only closes it."""

        class Closable:
            def __enter__(self) -> str:
                log.events.append("entered")
                return "inner"

            def __exit__(self, *a: object) -> None:
                log.events.append("exited")

            def close(self) -> None:
                log.events.append("closed")

        registry = Registry()
        registry.register(Closable, Closable, enter=False)
        async with registry.open_scope(ctx()) as scope:
            assert isinstance(await scope.resolve(Closable), Closable)
        assert log.events == ["closed"]

    async def test_a_manager_kept_unentered_is_closed_as_a_plain_result_is(self, log: Log) -> None:
        """With ``enter=False`` a context manager is cleaned by its ``close()`` as any
        other result: awaited when it is ``async def``; a plain ``aclose()`` beside a
        ``close()`` is no async cleanup, ``close()`` is called."""

        class Manager:
            def __enter__(self) -> Manager:
                log.events.append(f"entered {type(self).__name__}")
                return self

            def __exit__(self, *a: object) -> None:
                log.events.append(f"exited {type(self).__name__}")

        class AsyncClose(Manager):
            async def close(self) -> None:
                await anyio.lowlevel.checkpoint()
                log.events.append("AsyncClose closed")

        class PlainAclose(Manager):
            def aclose(self) -> None:
                log.events.append("PlainAclose aclose")

            def close(self) -> None:
                log.events.append("PlainAclose closed")

        registry = Registry()
        registry.register(AsyncClose, AsyncClose, enter=False)
        registry.register(PlainAclose, PlainAclose, enter=False)
        async with registry.open_scope(ctx()) as scope:
            assert type(await scope.resolve(AsyncClose)) is AsyncClose
            assert type(scope.resolve_sync(PlainAclose)) is PlainAclose
        assert log.events == ["PlainAclose closed", "AsyncClose closed"]
        assert registry.stats().cleanup_failures == 0

    async def test_equal_results_of_two_factories_are_each_cleaned(self, log: Log) -> None:
        """Two components that compare equal (two connections to one database) are two
        components: each is cleaned, neither taken for the other handed out again."""

        @dataclasses.dataclass
        class Connection:
            dsn: str

            def close(self) -> None:
                log.events.append(f"closed {id(self)}")

        registry = Registry()
        registry.register("primary", lambda: Connection("db"))
        registry.register("secondary", lambda: Connection("db"))
        async with registry.open_scope(ctx()) as scope:
            primary = await scope.resolve("primary")
            secondary = scope.resolve_sync("secondary")
            assert primary == secondary
            assert primary is not secondary
        assert sorted(log.events) == sorted([f"closed {id(primary)}", f"closed {id(secondary)}"])

    async def test_close_and_aclose_are_detected(self, log: Log) -> None:
        """A result with aclose() or close() is closed by it."""

        class AsyncClosable:
            async def aclose(self) -> None:
                log.events.append("aclose")

        class SyncClosable:
            def close(self) -> None:
                log.events.append("close")

        class AsyncCloseMethod:
            async def close(self) -> None:
                log.events.append("async close")

        registry = Registry()
        registry.register(AsyncClosable, AsyncClosable)
        registry.register(SyncClosable, SyncClosable)
        registry.register(AsyncCloseMethod, AsyncCloseMethod)
        async with registry.open_scope(ctx()) as scope:
            await scope.resolve(AsyncClosable)
            scope.resolve_sync(SyncClosable)
            await scope.resolve(AsyncCloseMethod)
        assert log.events == ["async close", "close", "aclose"]

    async def test_close_is_looked_up_on_every_instance(self, log: Log) -> None:
        """How a class closes is remembered, but an instance's own close still counts, as
        does a close that only ``__getattr__``, ``__getattribute__`` (a proxy forwarding
        every attribute, with or without a ``__dict__``), a staticmethod or a
        ``partialmethod`` (an async one, awaited) provides. One
        only ``__getattribute__`` provided was never called: the component leaked."""

        class Plain:
            pass

        class Dynamic:
            def __getattr__(self, name: str) -> object:
                if name == "close":
                    return lambda: log.events.append("dynamic close")
                raise AttributeError(name)

        class Static:
            @staticmethod
            def close() -> None:
                log.events.append("static close")

        class Target:
            def __init__(self, name: str) -> None:
                self.name = name

            def close(self) -> None:
                log.events.append(f"{self.name} close")

        class Forwarding:
            def __init__(self, target: Target) -> None:
                object.__setattr__(self, "_target", target)

            def __getattribute__(self, name: str) -> object:
                if name in ("__dict__", "__class__"):
                    return object.__getattribute__(self, name)
                return getattr(object.__getattribute__(self, "_target"), name)

        class Partial:
            async def _shutdown(self, how: str) -> None:
                log.events.append(f"{how} aclose")

            aclose = functools.partialmethod(_shutdown, "partial")

        class SlottedForwarding:
            __slots__ = ("_target",)
            __init__ = Forwarding.__init__
            __getattribute__ = Forwarding.__getattribute__

        def with_own_close() -> Plain:
            plain = Plain()
            plain.close = lambda: log.events.append("instance close")  # type: ignore[attr-defined]
            return plain

        def with_own_aclose() -> Plain:
            async def aclose() -> None:
                log.events.append("instance aclose")

            plain = Plain()
            plain.aclose = aclose  # type: ignore[attr-defined]
            return plain

        def with_none_close() -> Plain:
            plain = Plain()
            plain.close = None  # type: ignore[attr-defined]
            return plain

        registry = Registry()
        registry.register("plain", Plain)
        registry.register("own", with_own_close)
        registry.register("own async", with_own_aclose)
        registry.register("none", with_none_close)
        registry.register(Dynamic, Dynamic)
        registry.register(Static, Static)
        registry.register(Forwarding, lambda: Forwarding(Target("forwarded")))
        registry.register("slotted", lambda: SlottedForwarding(Target("slotted")))
        registry.register(Partial, Partial)
        for _ in range(2):  # the second round runs on what the first one remembered
            async with registry.open_scope(ctx()) as scope:
                assert type(await scope.resolve("plain")) is Plain
                scope.resolve_sync("own")
                await scope.resolve("own async")
                await scope.resolve("none")
                await scope.resolve(Dynamic)
                scope.resolve_sync(Static)
                await scope.resolve(Forwarding)
                scope.resolve_sync("slotted")
                await scope.resolve(Partial)
        expected = ["partial aclose", "slotted close", "forwarded close", "static close"]
        expected += ["dynamic close"]
        expected += ["instance aclose", "instance close"]
        assert log.events == expected * 2

    async def test_what_is_remembered_of_classes_made_on_the_fly_stays_bounded(self) -> None:
        """How a class's instances are closed is remembered per class, for a bounded
        number of classes: an application making classes on the fly (a class per request,
        per tenant schema) would otherwise grow it without end. Each component is still
        closed as it should be."""
        from ambient._provider import _MAX_PLAIN, _PLAIN

        closed: list[int] = []
        registry = Registry()
        count = _MAX_PLAIN + 100
        for n in range(count):

            def close(self: object, n: int = n) -> None:
                closed.append(n)

            made = type(f"Made{n}", (), {"close": close} if n % 2 else {})
            registry.register(f"made {n}", made)
        async with registry.open_scope(ctx()) as scope:
            for n in range(count):
                scope.resolve_sync(f"made {n}")
                assert len(_PLAIN) <= _MAX_PLAIN
        assert sorted(closed) == list(range(1, count, 2))

    async def test_async_factory_through_resolve_sync_says_to_await(self) -> None:
        """resolve_sync() of an async factory raises ResolutionError naming `await resolve`
        and what kind of factory it cannot run."""
        registry = Registry()

        async def make() -> Thing:
            return Thing()

        async def agen() -> AsyncIterator[Thing]:
            yield Thing()

        registry.register(Thing, make)
        registry.register("agen", agen)
        registry.register("awaitable", lambda: make())
        said = {
            Thing: "Thing has an async factory",
            "agen": "'agen' has an async generator factory",
            "awaitable": "the factory of 'awaitable' returned an awaitable or async generator",
        }
        async with registry.open_scope(ctx()) as scope:
            for key, kind in said.items():
                with pytest.raises(
                    ResolutionError,
                    match=rf"^{kind}, which resolve_sync\(\) cannot run; .*await resolve",
                ):
                    scope.resolve_sync(key)
            assert isinstance(await scope.resolve(Thing), Thing)
            assert isinstance(await scope.resolve("awaitable"), Thing)

    async def test_async_context_manager_through_resolve_sync(self) -> None:
        """resolve_sync() cannot enter an async context manager and says so."""

        @contextlib.asynccontextmanager
        async def acm() -> AsyncIterator[str]:
            yield "x"

        registry = Registry()
        registry.register("acm", acm)
        async with registry.open_scope(ctx()) as scope:
            with pytest.raises(ResolutionError, match="async context manager"):
                scope.resolve_sync("acm")

    async def test_generator_that_never_yields(self) -> None:
        """A generator factory that returns without yielding is a ResolutionError naming
        it, whatever its lifetime, also when a plain function returns the generator, and
        through resolve_sync() too: never a component of None."""

        def empty() -> Iterator[Thing]:
            return
            yield  # pragma: no cover

        registry = Registry()
        registry.register(Thing, empty)
        registry.register("per user", empty, lifetime=Lifetime.USER)
        registry.register("wrapped", lambda: empty())
        async with registry.open_scope(ctx()) as scope:
            for key, name in (
                (Thing, "Thing"),
                ("per user", "'per user'"),
                ("wrapped", "'wrapped'"),
            ):
                said = f"generator factory of {name} returned"
                with pytest.raises(ResolutionError, match=f"^{said} without yielding"):
                    await scope.resolve(key)
                with pytest.raises(ResolutionError, match=f"^{said} without yielding"):
                    scope.resolve_sync(key)
        await registry.aclose()

    async def test_async_generator_that_never_yields(self) -> None:
        """An async generator factory that returns without yielding is a ResolutionError
        naming it, and leaves nothing behind: the next resolution runs it again."""
        calls = 0

        async def empty() -> AsyncIterator[Thing]:
            nonlocal calls
            calls += 1
            return
            yield  # pragma: no cover

        registry = Registry()
        registry.register(Thing, empty)
        async with registry.open_scope(ctx()) as scope:
            for _ in range(2):
                with (
                    anyio.fail_after(10),  # not waiting for the failed creation
                    pytest.raises(
                        ResolutionError, match="^async generator factory of Thing returned without"
                    ),
                ):
                    await scope.resolve(Thing)
        assert calls == 2
        assert scope.components_created == 0

    async def test_a_returned_async_generator_that_never_yields(self) -> None:
        """An async generator that a plain or an async function returns, and that ends
        without yielding, is the same ResolutionError naming the component, and leaves
        nothing behind."""

        async def empty() -> AsyncIterator[Thing]:
            return
            yield  # pragma: no cover

        async def returns_it() -> AsyncIterator[Thing]:
            return empty()

        registry = Registry()
        registry.register("wrapped", lambda: empty())
        registry.register("awaited", returns_it)
        async with registry.open_scope(ctx()) as scope:
            for key in ("wrapped", "awaited"):
                said = f"async generator factory of {key!r} returned without yielding"
                with anyio.fail_after(10), pytest.raises(ResolutionError, match=f"^{said}$"):
                    await scope.resolve(key)
        assert scope.components_created == 0

    async def test_generator_sees_the_body_exception(self, log: Log) -> None:
        """When the body raises, generator cleanups see the exception at their yield."""

        def make() -> Iterator[Thing]:
            try:
                yield Thing()
            except ValueError as exc:
                log.events.append(f"saw {exc}")
                raise

        registry = Registry()
        registry.register(Thing, make)
        with pytest.raises(ValueError, match="boom"):
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve(Thing)
                raise ValueError("boom")
        assert log.events == ["saw boom"]

    async def test_context_manager_handing_back_the_body_exception_did_not_fail(
        self, log: Log
    ) -> None:
        """A context manager whose exit raises the very exception it was given (as
        SQLAlchemy's transactions do) lets it propagate, as ``with`` would: its cleanup
        did not fail. It was counted, logged and noted on the exception as a failed
        cleanup."""

        class Reraising:
            def __enter__(self) -> str:
                return "sync"

            def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
                log.events.append(f"exit {exc}")
                if exc is not None:
                    raise exc

        class AsyncReraising:
            async def __aenter__(self) -> str:
                return "async"

            async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
                log.events.append(f"aexit {exc}")
                if exc is not None:
                    raise exc

        registry = Registry()
        registry.register("sync", Reraising)
        registry.register("async", AsyncReraising)
        with pytest.raises(ValueError, match="boom") as caught:
            async with registry.open_scope(ctx()) as scope:
                assert await scope.resolve("sync") == "sync"
                assert await scope.resolve("async") == "async"
                raise ValueError("boom")
        assert log.events == ["aexit boom", "exit boom"]
        assert not getattr(caught.value, "__notes__", None)
        assert registry.stats().cleanup_failures == 0

    async def test_user_and_app_factories_receive_user_ref_and_nothing(self) -> None:
        """USER factories get the UserRef, APP factories get no argument."""
        got: dict[str, object] = {}

        def user_factory(user: UserRef) -> Thing:
            got["user"] = user
            return Thing()

        def app_factory() -> Log:
            return Log()

        registry = Registry()
        registry.register(Thing, user_factory, lifetime=Lifetime.USER)
        registry.register(Log, app_factory, lifetime=Lifetime.APP)
        async with registry.open_scope(UserExecutionContext.create("alice", tenant_id="t")):
            await ambient.resolve(Thing)
            await ambient.resolve(Log)
        assert got["user"] == UserRef("alice", "t")
        await registry.aclose()


@pytest.mark.parametrize("order", ["registry first", "process-wide first"])
async def test_an_observer_given_to_the_registry_and_installed_process_wide_sees_each_event_once(
    order: str,
) -> None:
    """``Registry(telemetry=probe)`` as the probe's docstring offers, with the same probe
    also installed process-wide (the ``isolation_probe`` fixture): every event reached it
    twice, so the probe reported a correct component "cleaned more than once", and a
    ``Telemetry`` started two scope spans and ended one."""
    from ambient.testing import IsolationProbe

    events: list[str] = []

    class Counting(IsolationProbe):
        def scope_opened(self, scope: Any) -> None:
            events.append("opened")
            super().scope_opened(scope)

    probe = Counting()
    if order == "process-wide first":
        probe.__enter__()
    registry = Registry(telemetry=probe)
    if order == "registry first":
        probe.__enter__()
    try:
        registry.register("resource", lambda: {"rows": []})
        async with registry.open_scope(UserExecutionContext.create("alice")):
            await ambient.resolve("resource")
        report = probe.report()
    finally:
        probe.__exit__(None, None, None)
    assert events == ["opened"]
    assert report.ok, report.violations
    assert (report.created, report.cleaned, report.scopes) == (1, 1, 1)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"lifetime": Lifetime.USER, "idle_ttl": float("nan")}, "idle_ttl must be a number"),
        ({"lifetime": Lifetime.USER, "idle_ttl": "5"}, "idle_ttl must be a number"),
        ({"lifetime": Lifetime.USER, "idle_ttl": True}, "idle_ttl must be a number"),
        # Never expiring, and reckoning an expiry raised OverflowError as the scope closed.
        ({"lifetime": Lifetime.USER, "idle_ttl": float("inf")}, "and finite, not inf"),
        ({"lifetime": Lifetime.USER, "idle_ttl": 10**400}, "and finite, not 1000000"),
        ({"lifetime": "user", "idle_ttl": 5}, "idle_ttl applies to USER components only"),
    ],
)
def test_registrations_no_expiry_could_follow_are_refused(
    options: dict[str, Any], error: str
) -> None:
    """``idle_ttl=nan`` was accepted and stopped the user's other components from ever
    expiring (the next expiry became never); a lifetime given as a string with an
    ``idle_ttl`` was an AttributeError, an ``idle_ttl`` of "5" a TypeError."""
    with pytest.raises(RegistryError, match=error):
        Registry().register("component", object, **options)


@pytest.mark.parametrize("max_users", [0, -1])
def test_max_users_is_at_least_one(max_users: int) -> None:
    """max_users is at least one: a registry keeping no user's components (or fewer than
    none) is a mistake, refused at construction."""
    with pytest.raises(ValueError, match=f"max_users must be an int >= 1, not {max_users!r}"):
        Registry(max_users=max_users)


@pytest.mark.parametrize("max_users", [float("nan"), 1.5, 5.0, True, "5", None])
def test_max_users_is_a_whole_number(max_users: Any) -> None:
    """max_users of another type is a TypeError naming it, as every other option's: a
    count read from a setting ("5"), a float or a bool (``True`` is no count)."""
    with pytest.raises(
        TypeError, match=re.escape(f"max_users must be a whole number of users, not {max_users!r}")
    ):
        Registry(max_users=max_users)


@pytest.mark.parametrize("cleanup_timeout", [0, -1, float("nan")])
def test_cleanup_timeout_is_above_zero(cleanup_timeout: float) -> None:
    """A cleanup_timeout of 0, below it or nan would abandon every async cleanup at once
    (or never): refused at construction, naming the value."""
    with pytest.raises(ValueError, match=r"cleanup_timeout must be > 0 seconds, not "):
        Registry(cleanup_timeout=cleanup_timeout)


@pytest.mark.parametrize(
    "name", [123, "", "db\nERROR forged line", "\x1b[31mdb", "db\u2028", "db\x85", "db\ud800"]
)
def test_a_name_that_cannot_go_into_errors_and_log_lines_is_refused(name: Any) -> None:
    """A component's name is joined into errors and written to logs and spans: a non-str
    name was accepted and made the error for any unknown key a ``TypeError``; one with a
    line break or an escape sequence forged or garbled log lines."""
    registry = Registry()
    with pytest.raises(RegistryError, match="name must be a non-empty str without line breaks"):
        registry.register("component", object, name=name)
    assert "component" not in registry.providers
    assert "registered: nothing yet" in str(registry.unknown_key("other"))


@pytest.mark.parametrize(
    "name",
    [
        "Kölner cache №2",
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian, with a zero-width non-joiner
        "cache \U0001f468\u200d\U0001f469\u200d\U0001f467",  # emoji joined by zero-width joiners
        "prix\u202f\u20ac",  # French, with a narrow no-break space
        "cache\u00a0EU",
    ],
)
def test_a_name_with_spaces_and_letters_of_any_script_is_kept(name: str) -> None:
    """Names in any script are kept, with what str.isprintable() calls unprintable yet
    belongs in text and does not split a log line: the zero-width (non-)joiners of Persian
    words and emoji sequences, no-break spaces. They were refused as not printable."""
    registry = Registry()
    registry.register("component", object, name=name)
    assert registry.providers["component"].name == name


@pytest.mark.parametrize(
    "given", ["to the registry", "to the scope", "process-wide", "to the registry and the scope"]
)
async def test_an_observer_inactive_until_later_is_not_asked_until_then(given: str) -> None:
    """An observer whose ``inactive_until`` is still to come is left out of the scopes
    opening before then without ``active`` being asked; once that time has passed (or it
    is ``None``) ``active`` is asked again for every scope."""
    import time

    asked: list[str] = []
    opened: list[str] = []

    class Sleepy(ambient.Observer):
        @property
        def active(self) -> bool:
            asked.append("active")
            return True

        def scope_opened(self, scope: ambient.Scope) -> None:
            opened.append(scope.context.user_id)

    observer = Sleepy()
    observer.inactive_until = time.monotonic() + 3600
    registry = Registry(telemetry=observer) if given.startswith("to the registry") else Registry()
    extra = observer if given.endswith("to the scope") else None
    with contextlib.ExitStack() as stack:
        if given == "process-wide":
            stack.callback(ambient.add_observer(observer))
        async with registry.open_scope(UserExecutionContext.create("alice"), observer=extra):
            pass
        assert (asked, opened) == ([], [])
        observer.inactive_until = time.monotonic() - 1
        async with registry.open_scope(UserExecutionContext.create("bob"), observer=extra):
            pass
        observer.inactive_until = None
        async with registry.open_scope(UserExecutionContext.create("carol"), observer=extra):
            pass
    assert (asked, opened) == (["active", "active"], ["bob", "carol"])
