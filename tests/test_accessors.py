"""resolve, resolve_sync, accessor and proxy: reaching components from anywhere."""

from __future__ import annotations

import contextlib
import doctest
import inspect
import types

import anyio
import anyio.lowlevel
import pytest

import ambient
from ambient import NoActiveContextError, Registry, UserExecutionContext, bind_context

# What resolving says when a context is bound without a scope.
NO_SCOPE = "a context is bound but no component scope is"


class Engine:
    """A per-request component."""

    def __init__(self, ctx: UserExecutionContext) -> None:
        self.user_id = ctx.user_id
        self.runs: list[str] = []
        self.mode = "fast"

    def run(self, prompt: str) -> str:
        self.runs.append(prompt)
        return f"{self.user_id}:{prompt}"

    def __call__(self, x: int) -> int:
        return x * 2


engine_accessor = ambient.accessor(Engine)
engine_proxy: Engine = ambient.proxy(Engine)


@pytest.fixture(name="registry")
def fixture_registry() -> Registry:
    registry = Registry()
    registry.register(Engine, Engine)
    return registry


async def deep(level: int) -> str:
    """Reach the engine from deep in a call stack without passing it down."""
    if level:
        return await deep(level - 1)
    engine = await ambient.resolve(Engine)
    assert engine is ambient.resolve_sync(Engine)
    assert engine is await engine_accessor()
    assert engine is engine_accessor.sync()
    return engine_proxy.run("hi")


class TestAccessors:
    async def test_reachable_from_deep_call_stacks(self, registry: Registry) -> None:
        """Every accessor finds the current scope's instance with no arguments passed."""
        async with registry.open_scope(UserExecutionContext.create("alice")):
            assert await deep(30) == "alice:hi"

    async def test_each_user_gets_their_own_instance(self, registry: Registry) -> None:
        """Concurrent requests of 50 users each see their own engine through the proxy."""
        results: dict[str, str] = {}

        async def request(n: int) -> None:
            async with registry.open_scope(UserExecutionContext.create(f"u{n}")):
                await anyio.lowlevel.checkpoint()
                results[f"u{n}"] = engine_proxy.run("x")

        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(request, n)
        assert results == {f"u{n}": f"u{n}:x" for n in range(50)}

    async def test_proxy_forwards_attributes_and_calls(self, registry: Registry) -> None:
        """The proxy forwards get/set/delete of attributes and calls."""
        async with registry.open_scope(UserExecutionContext.create("alice")):
            engine_proxy.mode = "careful"
            assert ambient.resolve_sync(Engine).mode == "careful"
            assert engine_proxy(21) == 42  # type: ignore[operator]
            assert engine_proxy(x=21) == 42  # type: ignore[operator]
            del engine_proxy.mode
            assert "mode" not in vars(ambient.resolve_sync(Engine))
            assert repr(engine_proxy) == "proxy(Engine)"
            assert repr(engine_accessor) == "accessor(Engine)"

    async def test_outside_any_scope(self) -> None:
        """Outside a scope every accessor raises NoActiveContextError."""
        with pytest.raises(NoActiveContextError):
            await ambient.resolve(Engine)
        with pytest.raises(NoActiveContextError):
            ambient.resolve_sync(Engine)
        with pytest.raises(NoActiveContextError):
            await engine_accessor()
        with pytest.raises(NoActiveContextError):
            engine_proxy.run("x")

    async def test_outside_a_scope_a_dunder_attribute_is_missing(self, registry: Registry) -> None:
        """hasattr(proxy, "__wrapped__"), inspect.unwrap(), inspect.signature() and so
        doctest collection of a module holding a proxy used to raise NoActiveContextError;
        outside a scope (bound context or not) an attribute starting with "_" is missing
        now, and an ordinary one still says no scope is bound. Inside a scope attributes
        are the instance's, as before."""
        module = types.ModuleType("legacy_tools", ">>> 20 + 22\n42\n")
        module.engine = engine_proxy  # type: ignore[attr-defined]
        for bound in (contextlib.nullcontext(), bind_context(UserExecutionContext.create("a"))):
            with bound:
                assert not hasattr(engine_proxy, "__wrapped__")
                assert inspect.unwrap(engine_proxy) is engine_proxy
                with pytest.raises(AttributeError, match="'__signature__' outside a scope"):
                    _ = engine_proxy.__signature__  # type: ignore[attr-defined]
                # inspect.signature() also asks for `_partialmethod`, a single underscore.
                assert list(inspect.signature(engine_proxy).parameters) == ["args", "kwargs"]
                with pytest.raises(AttributeError, match="'_private' outside a scope") as info:
                    _ = engine_proxy._private  # type: ignore[attr-defined]
                # Says why it is missing: no scope is bound.
                assert isinstance(info.value.__cause__, NoActiveContextError)
                assert (info.value.name, info.value.obj) == ("_private", engine_proxy)
                tests = doctest.DocTestFinder().find(module)
                assert [test.name for test in tests] == ["legacy_tools"]
                with pytest.raises(NoActiveContextError):
                    _ = engine_proxy.mode
        async with registry.open_scope(UserExecutionContext.create("alice")):
            assert engine_proxy.__dict__ is vars(ambient.resolve_sync(Engine))
            assert not hasattr(engine_proxy, "__wrapped__")

    async def test_context_without_scope(self) -> None:
        """A bare bind_context has no scope; resolving says so (not that no context is
        bound), whichever way it is asked."""
        with bind_context(UserExecutionContext.create("alice")):
            with pytest.raises(NoActiveContextError, match=NO_SCOPE):
                await ambient.resolve(Engine)
            with pytest.raises(NoActiveContextError, match=NO_SCOPE):
                ambient.resolve_sync(Engine)
            with pytest.raises(NoActiveContextError, match=NO_SCOPE):
                await engine_accessor()
            with pytest.raises(NoActiveContextError, match=NO_SCOPE):
                engine_accessor.sync()
            with pytest.raises(NoActiveContextError, match=NO_SCOPE):
                engine_proxy.run("x")

    async def test_child_binding_keeps_the_scope(self, registry: Registry) -> None:
        """bind_context(ctx.child(...)) inside a scope still resolves from that scope."""
        async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
            engine = await scope.resolve(Engine)
            with bind_context(scope.context.child("tool")):
                assert await ambient.resolve(Engine) is engine
                assert ambient.current_scope() is scope


@pytest.mark.parametrize("first", ["resolve", "resolve_sync", "accessor.sync"])
async def test_resolve_after_an_inner_scope_ended_from_another_task_uses_the_outer_one(
    first: str,
) -> None:
    """alice's inner scope, opened inside her outer one, is closed by another task (a
    shutdown closing it, a generator finalised elsewhere): where it was opened, resolve()
    goes on with the outer scope, still open, as resolve_sync() and current_scope() do,
    whichever is asked first, an accessor too (resolve_sync() asked first, taking the
    ended binding's scope for the current one, raised ScopeClosedError)."""
    registry = Registry()
    registry.register("x", Engine)
    alice = UserExecutionContext.create("alice")
    async with registry.open_scope(alice) as outer:
        inner = registry.open_scope(alice)
        await inner.__aenter__()
        async with anyio.create_task_group() as tg:
            tg.start_soon(inner.aclose)
        assert inner.closed
        # The first one asked finds the ended binding current here, and restores the outer.
        if first == "resolve":
            assert await ambient.resolve("x") is await outer.resolve("x")
        elif first == "resolve_sync":
            assert ambient.resolve_sync("x") is await outer.resolve("x")
        else:
            assert ambient.accessor("x").sync() is await outer.resolve("x")
        assert await ambient.resolve("x") is await outer.resolve("x")
        assert ambient.current_scope() is outer
        assert ambient.resolve_sync("x") is await outer.resolve("x")
