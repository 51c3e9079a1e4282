"""Binding a context: who sees it, restoring it, switching users, carrying it across hops."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import threading
import types
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from asgiref.sync import sync_to_async
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

import ambient
from ambient import (
    ContextSwitchError,
    NoActiveContextError,
    Registry,
    UserExecutionContext,
    bind_context,
    current_context_or_none,
    get_current_context,
)
from ambient._binding import _current, bind, unbind


def ctx_for(user: str, tenant: str | None = None) -> UserExecutionContext:
    return UserExecutionContext.create(user, tenant_id=tenant)


class TestLookup:
    def test_nothing_bound_raises_a_helpful_lookup_error(self) -> None:
        """get_current_context() outside a binding says where contexts come from."""
        with pytest.raises(NoActiveContextError) as info:
            get_current_context()
        message = str(info.value)
        assert "AmbientMiddleware" in message
        assert "bind_context" in message
        assert "ambient.wrap" in message
        assert isinstance(info.value, LookupError)

    def test_or_none(self) -> None:
        """current_context_or_none() returns None outside and the context inside."""
        assert current_context_or_none() is None
        ctx = ctx_for("alice")
        with bind_context(ctx):
            assert current_context_or_none() is ctx
        assert current_context_or_none() is None

    def test_bind_context_rejects_other_types(self) -> None:
        """Only a UserExecutionContext can be bound."""
        with pytest.raises(TypeError, match="UserExecutionContext"):
            bind_context({"user_id": "alice"})  # type: ignore[arg-type]

    def test_current_scope_needs_a_scope(self) -> None:
        """current_scope() with only a context bound says a scope is missing."""
        with bind_context(ctx_for("alice")), pytest.raises(NoActiveContextError, match="scope"):
            ambient.current_scope()
        with pytest.raises(NoActiveContextError):
            ambient.current_scope()


class TestNesting:
    def test_nested_bindings_restore_in_order(self) -> None:
        """Leaving each nested binding restores the one outside it."""
        outer, inner = ctx_for("alice"), ctx_for("alice")
        with bind_context(outer):
            with bind_context(inner):
                assert get_current_context() is inner
            assert get_current_context() is outer
        assert current_context_or_none() is None

    def test_restored_on_exception(self) -> None:
        """An exception inside the block still restores the previous binding."""
        ctx = ctx_for("alice")
        with pytest.raises(RuntimeError, match="boom"), bind_context(ctx):
            raise RuntimeError("boom")
        assert current_context_or_none() is None

    def test_out_of_order_exit_does_not_resurrect(self) -> None:
        """Ending the outer binding first, then the inner, leaves nothing bound."""
        outer = bind(ctx_for("alice"), None)
        inner = bind(ctx_for("alice"), None)
        unbind(outer)
        assert get_current_context() is inner.ctx
        unbind(inner)
        assert current_context_or_none() is None

    async def test_scopes_of_two_users_ended_out_of_order_by_an_error_restore_nothing(
        self,
    ) -> None:
        """alice's scope, then bob's inside it (an impersonation); alice's ends first, by
        an error, then bob's: every component is cleaned, and neither user stays bound."""
        registry = Registry()
        cleaned: list[str] = []

        def component(ctx: UserExecutionContext) -> Iterator[str]:
            try:
                yield ctx.user_id
            finally:
                cleaned.append(ctx.user_id)

        registry.register("who", component)
        alice = registry.open_scope(ctx_for("alice"))
        bob = registry.open_scope(ctx_for("bob"), allow_switch=True)
        await alice.__aenter__()
        assert await ambient.resolve("who") == "alice"
        await bob.__aenter__()
        assert await ambient.resolve("who") == "bob"
        error = RuntimeError("alice's work failed")
        await alice.__aexit__(RuntimeError, error, None)
        assert get_current_context().user_id == "bob"  # the live inner scope is still bob's
        await bob.__aexit__(None, None, None)
        assert current_context_or_none() is None
        assert sorted(cleaned) == ["alice", "bob"]
        assert registry.stats().open_scopes == 0

    def test_out_of_order_in_the_middle_restores_the_live_outer_binding(self) -> None:
        """With three bindings, ending the middle one first then the inner restores the outer."""
        first = bind(ctx_for("alice"), None)
        second = bind(ctx_for("alice"), None)
        third = bind(ctx_for("alice"), None)
        unbind(second)
        unbind(third)
        assert get_current_context() is first.ctx
        unbind(first)
        assert current_context_or_none() is None

    def test_unbind_twice_is_harmless(self) -> None:
        """Ending a binding twice changes nothing the second time."""
        binding = bind(ctx_for("alice"), None)
        unbind(binding)
        unbind(binding)
        assert current_context_or_none() is None

    def test_unbind_twice_changes_nothing_for_a_task_started_inside(self) -> None:
        """A Context copied inside alice's inner binding (a task started there) sees that
        binding once it has ended; ending it a second time, with another binding made
        since, changes nothing, there or in the Context that made it. The second end used
        to mark it ended elsewhere, and the task then saw alice's outer binding instead."""
        made = contextvars.copy_context()
        outer = made.run(bind, ctx_for("alice"), None)
        inner = made.run(bind, outer.ctx.child("plan"), None)
        task = made.copy()
        made.run(unbind, inner)
        assert task.run(get_current_context) is inner.ctx
        later = made.run(bind, outer.ctx.child("act"), None)
        made.run(unbind, inner)
        assert task.run(get_current_context) is inner.ctx
        assert made.run(get_current_context) is later.ctx

    def test_unbind_from_another_context_does_not_raise(self) -> None:
        """Ending a binding from a different contextvars.Context (a generator finalised
        elsewhere) raises no 'created in a different Context' error."""
        holder: list[object] = []

        def make() -> None:
            holder.append(bind(ctx_for("alice"), None))

        copy = contextvars.copy_context()
        copy.run(make)
        binding = holder[0]
        assert copy.run(_current.get) is binding
        copy.run(unbind, binding)  # same context: fine
        assert copy.run(_current.get) is None

        other = contextvars.copy_context()
        other.run(make)
        stale = holder[1]
        elsewhere = contextvars.copy_context()
        elsewhere.run(_current.set, stale)  # type: ignore[arg-type]
        elsewhere.run(unbind, stale)  # token from another Context
        assert elsewhere.run(_current.get) is None

    def test_a_context_started_inside_a_binding_never_shows_a_user_it_shadowed(self) -> None:
        """Carol is bound twice, bob (an admin acting for him) inside; a Context copied
        inside bob's binding (a task started there) goes on, whatever ends where: bob's
        binding ended from a third Context, then the task ending carol's inner binding
        under it. The task sees bob throughout, never carol, and the Context that made
        the bindings sees its own live one, carol's outer. The task used to see carol as
        soon as bob's binding ended elsewhere."""
        made = contextvars.copy_context()
        outer = made.run(bind, ctx_for("carol"), None)
        inner = made.run(bind, ctx_for("carol"), None)
        bob = made.run(bind, ctx_for("bob"), None, allow_switch=True)
        task = made.copy()
        seen = [task.run(get_current_context).user_id]
        contextvars.copy_context().run(unbind, bob)
        seen.append(task.run(get_current_context).user_id)
        task.run(unbind, inner)
        seen.append(task.run(get_current_context).user_id)
        assert seen == ["bob", "bob", "bob"]
        assert made.run(get_current_context) is outer.ctx
        made.run(unbind, outer)
        assert made.run(current_context_or_none) is None
        assert task.run(get_current_context).user_id == "bob"

    def test_ended_from_a_task_it_never_shows_the_user_it_shadowed(self) -> None:
        """Bob (an admin acting for him) bound over carol; a Context copied inside bob's
        binding (a task started there) ends it, with a token of the Context that made it.
        The task goes on seeing bob, never carol; the Context that made the bindings sees
        its own live one, carol's."""
        made = contextvars.copy_context()
        made.run(bind, ctx_for("carol"), None)
        bob = made.run(bind, ctx_for("bob"), None, allow_switch=True)
        task = made.copy()
        task.run(unbind, bob)
        assert task.run(get_current_context).user_id == "bob"
        assert made.run(get_current_context).user_id == "carol"

    @pytest.mark.parametrize("read_first", ["task", "maker"])
    def test_a_task_shows_the_nearest_live_binding_past_an_ended_one(self, read_first: str) -> None:
        """Alice bound three times (a request, then two of its operations inside each
        other); a Context copied inside the innermost (a task started there) reads on while
        the middle one ends out of order and the innermost is ended from a third Context (a
        generator finalised elsewhere). The task sees the live outer binding, as the Context
        that made them does, never the ended middle one (which a walk to the nearest live
        binding that stopped at the first one shadowed, ended or not, would show). Whichever
        reads first: the maker reading first settles the ended bindings there, and the task
        showed the ended innermost one when that was taken for its own end."""
        made = contextvars.copy_context()
        outer = made.run(bind, ctx_for("alice"), None)
        middle = made.run(bind, outer.ctx.child("plan"), None)
        inner = made.run(bind, outer.ctx.child("act"), None)
        task = made.copy()
        made.run(unbind, middle)
        contextvars.copy_context().run(unbind, inner)
        readers = [task, made] if read_first == "task" else [made, task]
        assert [reader.run(get_current_context) for reader in readers] == [outer.ctx] * 2
        made.run(unbind, outer)
        assert made.run(current_context_or_none) is None

    def test_a_bind_context_object_is_single_use(self) -> None:
        """Entering the same bind_context twice is an error, not a silent re-bind."""
        binding = bind_context(ctx_for("alice"))
        with binding, pytest.raises(RuntimeError, match="already in use"), binding:
            pass

    def test_a_context_copied_once_every_binding_ended_shows_nothing(self) -> None:
        """Alice's inner binding ended from another Context (a generator finalised
        elsewhere), then her outer one where both were made: a Context copied there
        afterwards (the next request a server starts inside this one's context) shows
        nothing bound, as the one it was copied from does."""
        made = contextvars.copy_context()
        outer = made.run(bind, ctx_for("alice"), None)
        inner = made.run(bind, outer.ctx.child("job"), None)
        contextvars.copy_context().run(unbind, inner)
        made.run(unbind, outer)
        later = made.copy()
        assert later.run(current_context_or_none) is None
        assert made.run(current_context_or_none) is None

    def test_a_binding_ended_inside_detached_brings_back_nothing_there(self) -> None:
        """Ending a binding made outside a detached() block from inside it (a scope closed
        by shutdown work started there) leaves the block with nothing bound; after the
        block, the live binding it shadowed is current again."""
        outer = bind(ctx_for("alice"), None)
        inner = bind(outer.ctx.child("job"), None)
        with ambient.detached():
            unbind(inner)
            assert current_context_or_none() is None
        assert get_current_context() is outer.ctx
        unbind(outer)
        assert current_context_or_none() is None

    def test_a_task_that_ended_its_binding_keeps_the_outer_one_once_that_ends_too(
        self,
    ) -> None:
        """A Context copied inside alice's inner binding (a task started there) ends that
        binding and sees her outer one; once the outer one ends where it was made, the task
        goes on reading the outer context, never the inner one it ended itself."""
        made = contextvars.copy_context()
        outer = made.run(bind, ctx_for("alice"), None)
        inner = made.run(bind, outer.ctx.child("job"), None)
        task = made.copy()
        task.run(unbind, inner)
        assert task.run(get_current_context) is outer.ctx
        made.run(unbind, outer)
        assert made.run(current_context_or_none) is None
        assert task.run(get_current_context) is outer.ctx

    def test_a_context_copied_after_an_out_of_order_end_shows_what_its_maker_shows(
        self,
    ) -> None:
        """Bob (an admin acting for him) bound over carol, then a step of his; his binding
        ends first, out of order, then the step's. A Context copied there afterwards (a task
        started next) shows carol, as the Context it was copied from does, never bob, whose
        bindings have both ended."""
        made = contextvars.copy_context()
        carol = made.run(bind, ctx_for("carol"), None)
        bob = made.run(bind, ctx_for("bob"), None, allow_switch=True)
        step = made.run(bind, bob.ctx.child("step"), None)
        made.run(unbind, bob)
        made.run(unbind, step)
        later = made.copy()
        assert later.run(get_current_context) is carol.ctx
        assert made.run(get_current_context) is carol.ctx

    def test_the_only_binding_ended_from_another_context_leaves_nothing_bound(self) -> None:
        """Alice's binding, the only one, ended from another Context (a generator finalised
        by another task): where it was made nothing is bound any more."""
        made = contextvars.copy_context()
        alone = made.run(bind, ctx_for("alice"), None)
        contextvars.copy_context().run(unbind, alone)
        with pytest.raises(NoActiveContextError):
            made.run(get_current_context)
        assert made.run(current_context_or_none) is None

    @pytest.mark.parametrize("read", [get_current_context, current_context_or_none])
    def test_past_an_inner_binding_ended_elsewhere_both_readers_show_the_outer_one(
        self, read: Any
    ) -> None:
        """Alice's inner binding ended from another Context: a Context copied inside it (a
        task started there) and the Context that made it both show her live outer binding,
        through get_current_context() and current_context_or_none() alike."""
        made = contextvars.copy_context()
        outer = made.run(bind, ctx_for("alice"), None)
        inner = made.run(bind, outer.ctx.child("job"), None)
        task = made.copy()
        contextvars.copy_context().run(unbind, inner)
        assert task.run(read) is outer.ctx
        assert made.run(read) is outer.ctx

    def test_a_task_ending_its_binding_over_one_ended_elsewhere_keeps_the_one_past_it(
        self,
    ) -> None:
        """Alice's request, an operation bound in it, and a task started inside that which
        binds a step of its own. The operation is ended from a third Context (a generator
        finalised elsewhere), then the task ends its step: the task shows the request's
        binding, and goes on showing it once the request's binding ends too, never the
        operation ended before."""
        made = contextvars.copy_context()
        request = made.run(bind, ctx_for("alice"), None)
        operation = made.run(bind, request.ctx.child("plan"), None)
        task = made.copy()
        step = task.run(bind, request.ctx.child("act"), None)
        contextvars.copy_context().run(unbind, operation)
        task.run(unbind, step)
        made.run(unbind, request)
        assert made.run(current_context_or_none) is None
        assert task.run(get_current_context) is request.ctx

    def test_a_task_shows_the_live_binding_past_one_that_ended_in_order(self) -> None:
        """Alice bound three times; a Context copied inside the innermost (a task started
        there) reads on once the innermost is ended from a third Context and then the
        middle one where it was made, in order: the task sees the live outer binding, never
        the middle one, which has ended."""
        made = contextvars.copy_context()
        outer = made.run(bind, ctx_for("alice"), None)
        middle = made.run(bind, outer.ctx.child("plan"), None)
        inner = made.run(bind, outer.ctx.child("act"), None)
        task = made.copy()
        contextvars.copy_context().run(unbind, inner)
        made.run(unbind, middle)
        assert task.run(get_current_context) is outer.ctx
        assert made.run(get_current_context) is outer.ctx


class TestSwitching:
    def test_binding_another_user_is_refused(self) -> None:
        """Binding a different user inside a binding raises ContextSwitchError."""
        with bind_context(ctx_for("alice")):
            with (
                pytest.raises(ContextSwitchError, match="another user"),
                bind_context(ctx_for("bob")),
            ):
                pass
            assert get_current_context().user_id == "alice"

    def test_another_tenant_is_another_user(self) -> None:
        """The same user id in another tenant counts as a different user."""
        with (
            bind_context(ctx_for("alice", "acme")),
            pytest.raises(ContextSwitchError),
            bind_context(ctx_for("alice", "globex")),
        ):
            pass

    def test_an_ended_binding_left_in_a_context_refuses_no_other_user(self) -> None:
        """A Context copied inside bob's binding (a task started in his request) that
        outlives it may bind another user: the ended binding has nothing left to mix."""
        made = contextvars.copy_context()
        bob = made.run(bind, ctx_for("bob"), None)
        task = made.copy()
        made.run(unbind, bob)

        def as_alice() -> str:
            with bind_context(ctx_for("alice")):
                return get_current_context().user_id

        assert task.run(as_alice) == "alice"
        assert task.run(get_current_context).user_id == "bob"

    async def test_a_switch_to_another_user_leaves_the_scope_behind(self) -> None:
        """Bob bound with allow_switch inside alice's scope has no scope: he can never
        resolve alice's components."""
        registry = Registry()
        registry.register("x", lambda: "alice's")
        async with registry.open_scope(ctx_for("alice")):
            with bind_context(ctx_for("bob"), allow_switch=True):
                with pytest.raises(NoActiveContextError):
                    await ambient.resolve("x")
                with pytest.raises(NoActiveContextError):
                    ambient.current_scope()
            assert await ambient.resolve("x") == "alice's"

    def test_allow_switch(self) -> None:
        """allow_switch=True permits an intended switch and restores afterwards."""
        alice = ctx_for("alice")
        with bind_context(alice):
            with bind_context(ctx_for("bob"), allow_switch=True):
                assert get_current_context().user_id == "bob"
            assert get_current_context() is alice

    def test_children_are_always_allowed(self) -> None:
        """A child of the current context binds without allow_switch."""
        parent = ctx_for("alice")
        with bind_context(parent), bind_context(parent.child("tool")) as child:
            assert get_current_context() is child
            assert child.parent_run_id == parent.run_id

    def test_same_user_new_request_is_allowed(self) -> None:
        """Another context of the same user is not a switch."""
        with bind_context(ctx_for("alice")), bind_context(ctx_for("alice")):
            assert get_current_context().user_id == "alice"


class TestTasks:
    async def test_spawned_tasks_inherit_the_binding(self) -> None:
        """Tasks started inside a binding see it."""
        seen: list[str] = []

        async def child() -> None:
            seen.append(get_current_context().user_id)

        with bind_context(ctx_for("alice")):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(child)
        assert seen == ["alice"] * 5

    async def test_child_task_writes_never_reach_the_parent(self) -> None:
        """A binding made inside a child task stays in that task."""
        parent = ctx_for("alice")
        bound_in_child = anyio.Event()

        async def child() -> None:
            with bind_context(parent.child("sub")):
                bound_in_child.set()
                await anyio.lowlevel.checkpoint()
                assert get_current_context().depth == 1

        with bind_context(parent):
            async with anyio.create_task_group() as tg:
                tg.start_soon(child)
                await bound_in_child.wait()
                assert get_current_context() is parent
        assert current_context_or_none() is None

    async def test_concurrent_tasks_keep_their_own_users(self) -> None:
        """200 concurrent tasks, each bound to its own user, never see another's."""
        errors: list[str] = []
        gate = anyio.Event()

        async def work(n: int) -> None:
            with bind_context(ctx_for(f"user-{n}")):
                await gate.wait()
                for _ in range(3):
                    await anyio.lowlevel.checkpoint()
                    if get_current_context().user_id != f"user-{n}":
                        errors.append(f"user-{n} saw {get_current_context().user_id}")

        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(work, n)
            await anyio.lowlevel.checkpoint()
            gate.set()
        assert errors == []

    def test_no_thread_local_holds_what_a_request_binds(self) -> None:
        """Every request on the event loop's thread shares that thread's slot of a
        ``threading.local`` (or of asgiref's ``Local``), so nothing bound per request may
        live in one: across ``ambient``, its middleware and integrations, the one
        thread-local is the stack of sync factories running on a thread, which no other
        task's can join while one runs (a sync factory never yields to the loop)."""
        import ambient.integrations
        import ambient.middleware

        spellings = {"local", "Local"}

        def is_local(node: ast.expr) -> bool:
            # threading.local, a module imported under another name (_t.local), a bare name.
            return ast.unparse(node).rsplit(".", 1)[-1] in spellings

        found = []
        for package in (ambient, ambient.middleware, ambient.integrations):
            for path in sorted(Path(package.__file__).parent.rglob("*.py")):
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                    if isinstance(node, ast.ImportFrom):
                        names = {alias.name for alias in node.names}
                        if names & spellings and node.module != "__future__":
                            found.append(f"{path.name}: from {node.module} import {names}")
                    elif isinstance(node, ast.ClassDef):
                        found += [
                            f"{path.name}: class {node.name}({ast.unparse(base)})"
                            for base in node.bases
                            if is_local(base)
                        ]
                    elif isinstance(node, ast.Call) and is_local(node.func):
                        found.append(f"{path.name}: {ast.unparse(node)}")
        assert found == ["_instances.py: class _PerThread(threading.local)"]


class TestThreadHops:
    async def test_raw_executor_submit_needs_wrap(self) -> None:
        """ThreadPoolExecutor.submit does not copy the context; wrap() carries it."""
        ctx = ctx_for("alice")
        with ThreadPoolExecutor(2) as pool, bind_context(ctx):
            assert pool.submit(current_context_or_none).result(timeout=10) is None
            wrapped = ambient.wrap(get_current_context)
            assert pool.submit(wrapped).result(timeout=10) is ctx

    async def test_run_in_executor_with_wrap(self, anyio_backend: str) -> None:
        """loop.run_in_executor does not copy the context; wrap() carries it."""
        if anyio_backend != "asyncio":
            pytest.skip("loop.run_in_executor exists on asyncio only")
        ctx = ctx_for("alice")
        loop = asyncio.get_running_loop()
        with bind_context(ctx):
            assert await loop.run_in_executor(None, current_context_or_none) is None
            got = await loop.run_in_executor(None, ambient.wrap(get_current_context))
        assert got is ctx

    async def test_anyio_to_thread_copies_the_context(self) -> None:
        """anyio.to_thread.run_sync sees the binding on its own."""
        ctx = ctx_for("alice")
        with bind_context(ctx):
            assert await anyio.to_thread.run_sync(get_current_context) is ctx

    async def test_asgiref_sync_to_async_sees_the_context(self, anyio_backend: str) -> None:
        """asgiref's sync_to_async sees the binding."""
        if anyio_backend != "asyncio":
            pytest.skip("asgiref's sync_to_async runs on asyncio only")
        ctx = ctx_for("alice")
        with bind_context(ctx):
            assert await sync_to_async(get_current_context)() is ctx

    def test_wrapped_function_runs_in_several_threads_at_once(self) -> None:
        """One wrapped function may run concurrently in many threads."""
        ctx = ctx_for("alice")
        barrier = threading.Barrier(4, timeout=10)

        def work() -> str:
            barrier.wait()
            return get_current_context().user_id

        with bind_context(ctx):
            wrapped = ambient.wrap(work)
        with ThreadPoolExecutor(4) as pool:
            results = [f.result(timeout=10) for f in [pool.submit(wrapped) for _ in range(4)]]
        assert results == ["alice"] * 4

    async def test_wrap_async_rebinds_around_the_call(self) -> None:
        """An async function wrapped in one binding runs with it from anywhere."""
        ctx = ctx_for("alice")

        async def whoami() -> UserExecutionContext:
            await anyio.lowlevel.checkpoint()
            return get_current_context()

        with bind_context(ctx):
            wrapped = ambient.wrap(whoami)
        assert current_context_or_none() is None
        assert await wrapped() is ctx
        assert current_context_or_none() is None

    async def test_wrap_rebinds_around_an_async_callable_object_and_a_partial(self) -> None:
        """An object with ``async def __call__`` and a functools.partial of an async
        function are async callables as much as an ``async def``: the call runs with the
        binding (it used to take the sync path, whose coroutine then ran with none)."""
        ctx = ctx_for("alice")

        class Job:
            async def __call__(self, extra: str) -> tuple[UserExecutionContext, str]:
                await anyio.lowlevel.checkpoint()
                return get_current_context(), extra

        async def whoami(extra: str) -> tuple[UserExecutionContext, str]:
            await anyio.lowlevel.checkpoint()
            return get_current_context(), extra

        with bind_context(ctx):
            wrapped = [ambient.wrap(Job()), ambient.wrap(functools.partial(whoami))]
        for call in wrapped:
            # Still an async callable to whoever asks (a router choosing how to call it).
            assert inspect.iscoroutinefunction(call)
            assert await call("x") == (ctx, "x")
            assert current_context_or_none() is None

    async def test_wrap_carries_the_binding_into_a_generators_body(self) -> None:
        """A generator runs its body as it is iterated, not as it is called: a generator
        function or an async generator function wrapped in alice's binding (a stream handed
        to a job queue) ran only the call with it, and its body with whatever its consumer
        had bound, here bob (the job's consumer). Each step of the body sees alice and her
        trace now, a binding the body makes lasts across its yields, and the consumer's
        binding is its own between the steps and after them."""
        alice, bob = ctx_for("alice"), ctx_for("bob")
        key = otel_context.create_key("probe")

        def seen() -> tuple[str | None, object]:
            bound = current_context_or_none()
            return (bound and bound.run_id), otel_context.get_value(key)

        ended: list[tuple[str | None, object]] = []

        def lines() -> Iterator[tuple[str | None, object]]:
            try:
                yield seen()
                with bind_context(get_current_context().child("render")):
                    yield seen()
                    yield seen()
                yield seen()
            finally:
                ended.append(seen())

        async def chunks() -> AsyncIterator[tuple[str | None, object]]:
            for line in lines():
                await anyio.lowlevel.checkpoint()
                yield line

        class Lines:
            def __call__(self) -> Iterator[tuple[str | None, object]]:
                yield from lines()

        token = otel_context.attach(otel_context.set_value(key, "alice's trace"))
        try:
            with bind_context(alice):
                wrapped = [ambient.wrap(lines), ambient.wrap(chunks), ambient.wrap(Lines())]
        finally:
            otel_context.detach(token)

        async def consume(stream: Any) -> tuple[list[Any], list[Any]]:
            got, between = [], []
            if inspect.isasyncgen(stream):
                async for line in stream:
                    got.append(line)
                    between.append(seen())
            else:
                for line in stream:
                    got.append(line)
                    between.append(seen())
            return got, between

        for make in wrapped:
            with bind_context(bob):
                got, between = await consume(make())
                assert seen() == (bob.run_id, None)
            assert [got[0], got[3]] == [(alice.run_id, "alice's trace")] * 2
            assert got[1] == got[2]
            assert got[1][0] not in (alice.run_id, bob.run_id)
            assert got[1][1] == "alice's trace"
            assert between == [(bob.run_id, None)] * 4
            assert current_context_or_none() is None
        for make in wrapped:  # left inside the body's own binding, and closed
            with bind_context(bob):
                stream = make()
                if inspect.isasyncgen(stream):
                    async with contextlib.aclosing(stream):
                        await anext(stream)
                        await anext(stream)
                else:
                    with contextlib.closing(stream):
                        next(stream)
                        next(stream)
                assert seen() == (bob.run_id, None)
        assert ended == [(alice.run_id, "alice's trace")] * 6

    async def test_a_wrapped_generator_gets_what_is_sent_and_thrown_in_its_binding(
        self,
    ) -> None:
        """Made into a context manager (``contextlib.contextmanager`` and its async
        counterpart drive the generator with ``send`` and ``throw``), a wrapped generator
        gets the block's error thrown in at its yield, handles it with alice's binding, and
        its return value and the values sent to it arrive as without the wrapper. A lambda
        handing back a coroutine is awaited with her binding too."""
        alice, bob = ctx_for("alice"), ctx_for("bob")
        handled: list[tuple[str, str]] = []

        def guarded() -> Iterator[str]:
            try:
                yield get_current_context().user_id
            except ValueError as error:
                handled.append((str(error), get_current_context().user_id))

        async def guarded_async() -> AsyncIterator[str]:
            try:
                yield get_current_context().user_id
            except ValueError as error:
                await anyio.lowlevel.checkpoint()
                handled.append((str(error), get_current_context().user_id))

        def echo() -> Generator[str, str, str]:
            got = yield get_current_context().user_id
            return f"{got} for {get_current_context().user_id}"

        async def whoami() -> str:
            await anyio.lowlevel.checkpoint()
            return get_current_context().user_id

        with bind_context(alice):
            manager = contextlib.contextmanager(ambient.wrap(guarded))
            async_manager = contextlib.asynccontextmanager(ambient.wrap(guarded_async))
            wrapped_echo = ambient.wrap(echo)
            later = ambient.wrap(lambda: whoami())
        with bind_context(bob):
            with manager() as user:
                assert user == "alice"
                raise ValueError("sync")
            async with async_manager() as user:
                assert user == "alice"
                raise ValueError("async")
            stream = wrapped_echo()
            assert next(stream) == "alice"
            with pytest.raises(StopIteration) as stop:
                stream.send("hello")
            assert stop.value.value == "hello for alice"
            assert await later() == "alice"
            assert get_current_context() is bob
        assert handled == [("sync", "alice"), ("async", "alice")]

    async def test_a_wrapped_generator_goes_on_after_handling_what_is_thrown_in(self) -> None:
        """A wrapped generator that handles an error thrown in at its yield and yields again
        gets what is sent to it next, in its binding, as without the wrapper (a generator
        and an async generator alike)."""

        def resilient() -> Generator[str, str, None]:
            got = "start"
            while True:
                try:
                    got = yield f"{got} for {get_current_context().user_id}"
                except ValueError as error:
                    got = f"handled {error}"

        async def resilient_async() -> AsyncGenerator[str, str]:
            got = "start"
            while True:
                try:
                    got = yield f"{got} for {get_current_context().user_id}"
                except ValueError as error:
                    await anyio.lowlevel.checkpoint()
                    got = f"handled {error}"

        with bind_context(ctx_for("alice")):
            stream = ambient.wrap(resilient)()
            async_stream = ambient.wrap(resilient_async)()
        assert next(stream) == "start for alice"
        assert stream.throw(ValueError("boom")) == "handled boom for alice"
        assert stream.send("more") == "more for alice"
        stream.close()
        assert await anext(async_stream) == "start for alice"
        assert await async_stream.athrow(ValueError("boom")) == "handled boom for alice"
        assert await async_stream.asend("more") == "more for alice"
        await async_stream.aclose()
        assert current_context_or_none() is None

    def test_wrap_leaves_alone_a_generator_the_call_did_not_start(self) -> None:
        """A wrapped call that hands back a generator already under way (a module-level
        stream, a cursor kept on a component) hands back that very generator: its steps
        run as without the wrapper, wherever it is iterated. Wrapped, it was driven
        through a generator of wrap()'s own, which closed it when it was dropped: the next
        call found the stream ended."""

        def numbers() -> Iterator[int]:
            yield from range(1, 100)

        shared = numbers()
        assert next(shared) == 1
        with bind_context(ctx_for("alice")):
            take = ambient.wrap(lambda: shared)
        for expected in (2, 3):
            stream = take()
            assert stream is shared
            assert next(stream) == expected
            del stream
        assert next(shared) == 4

    async def test_wrap_hands_back_an_awaitable_generator_still_awaitable(self) -> None:
        """A generator-based coroutine (``types.coroutine``) a wrapped call hands back is
        awaited with the captured binding, as a coroutine is; it was made into a plain
        generator, and awaiting it raised ``TypeError``."""

        @types.coroutine
        def legacy() -> Generator[None, None, str]:
            yield from ()
            return get_current_context().user_id

        with bind_context(ctx_for("alice")):
            later = ambient.wrap(lambda: legacy())
        with bind_context(ctx_for("bob")):
            assert await later() == "alice"

    async def test_wrap_carries_the_trace_context(self) -> None:
        """wrap() carries the OpenTelemetry context too, into an async function, and into
        the coroutine a sync function hands back (a lambda's), for the call alone: the
        caller's context is current again after it. The coroutine's left the request's
        trace attached in the task that awaited it."""

        key = otel_context.create_key("probe")
        token = otel_context.attach(otel_context.set_value(key, "request-trace"))
        try:
            sync_fn = ambient.wrap(lambda: otel_context.get_value(key))

            async def read() -> object:
                return otel_context.get_value(key)

            async_fn = ambient.wrap(read)
            handing_back = ambient.wrap(lambda: read())
        finally:
            otel_context.detach(token)
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(sync_fn).result(timeout=10) == "request-trace"
        assert await async_fn() == "request-trace"
        assert otel_context.get_value(key) is None
        assert await handing_back() == "request-trace"
        assert otel_context.get_value(key) is None


async def test_detached_unbinds_for_the_block_and_for_tasks_started_in_it() -> None:
    """Background work started in the block carries neither the request's user nor its
    trace and baggage: its spans would otherwise be filed in the request's trace long
    after the request ended."""
    seen: list[object] = []

    async def background() -> None:
        span = otel_trace.get_current_span().get_span_context()
        seen.append((ambient.current_context_or_none(), span.is_valid, baggage.get_all()))

    ctx = UserExecutionContext.create("alice")
    request_span = otel_trace.NonRecordingSpan(
        otel_trace.SpanContext(trace_id=5, span_id=6, is_remote=False)
    )
    token = otel_context.attach(
        baggage.set_baggage("tenant", "alice-corp", otel_trace.set_span_in_context(request_span))
    )
    try:
        with ambient.bind_context(ctx):
            async with anyio.create_task_group() as tg:
                with ambient.detached():
                    assert ambient.current_context_or_none() is None
                    tg.start_soon(background)
                assert ambient.get_current_context() is ctx
                assert otel_trace.get_current_span() is request_span
                assert baggage.get_baggage("tenant") == "alice-corp"
    finally:
        otel_context.detach(token)
    assert seen == [(None, False, {})]


async def test_a_factory_that_used_detached_still_has_its_cycle_named() -> None:
    """An async factory that starts background work in a ``detached()`` block and then
    (through a dependency) resolves its own key is told of the cycle, as it would be
    without the block: what ``detached()`` set aside for the block is back after it. The
    factory otherwise waited for its own creation, for ever."""
    registry = Registry()
    started: list[object] = []

    async def make_a() -> object:
        with ambient.detached():
            started.append(ambient.current_context_or_none())
        return await ambient.resolve("b")

    async def make_b() -> object:
        return await ambient.resolve("a")

    registry.register("a", make_a)
    registry.register("b", make_b)
    async with registry.open_scope(ctx_for("alice")) as scope:
        with (
            anyio.fail_after(5),
            pytest.raises(ambient.ResolutionError, match="cycle.*'a' -> 'b' -> 'a'"),
        ):
            await scope.resolve("a")
    assert started == [None]
    await registry.aclose()


async def test_work_a_sync_factory_hands_to_a_thread_starts_outside_it_only_in_detached() -> None:
    """A sync factory hands work to a thread (``ambient.wrap``): that work is part of the
    creation (waiting there for the component would wait for itself, and is reported as a
    cycle), what it starts in ``detached()`` is not, and after the block it is again."""
    from ambient import _binding

    seen: list[int] = []

    def work() -> str:
        seen.append(len(_binding._handed_over.get()))
        with ambient.detached():
            seen.append(len(_binding._handed_over.get()))
        seen.append(len(_binding._handed_over.get()))
        return "made"

    def make() -> str:
        with ThreadPoolExecutor(max_workers=1) as threads:
            return threads.submit(ambient.wrap(work)).result(timeout=30)

    registry = Registry()
    registry.register("made", make, lifetime=ambient.Lifetime.APP)
    async with registry.open_scope(ctx_for("alice")):
        assert await ambient.resolve("made") == "made"
    await registry.aclose()
    assert seen == [1, 0, 1]


def test_detached_ended_in_another_context_raises_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An async generator that yields inside ``detached()`` and is closed by its finaliser
    in a task of its own ends the block in another Context: that must end it quietly (it
    raised ValueError for a token of another Context), leaving the Context it ends in as
    it was, and without OpenTelemetry's "Failed to detach context" error."""
    block = ambient.detached()
    elsewhere = contextvars.copy_context()
    ctx = UserExecutionContext.create("alice")
    with ambient.bind_context(ctx):
        elsewhere.run(block.__enter__)
        with caplog.at_level(logging.ERROR):
            block.__exit__(None, None, None)
        assert ambient.get_current_context() is ctx
    assert not [r for r in caplog.records if "detach" in r.getMessage()]


async def test_interleaved_generators_cannot_mix_users() -> None:
    """Async generators share their caller's context, so two of them stepped in turn on
    one task (A1, B1, A2) would leak bindings into each other: B's scope for another user
    is refused with ContextSwitchError, A goes on seeing its own user, and once both are
    done nothing is bound and no scope is open."""
    registry = Registry()

    async def steps(user: str) -> AsyncIterator[str]:
        async with registry.open_scope(UserExecutionContext.create(user)):
            yield get_current_context().user_id
            yield get_current_context().user_id

    alice, bob = steps("alice"), steps("bob")
    assert await alice.__anext__() == "alice"
    with pytest.raises(ContextSwitchError):
        await bob.__anext__()
    assert await alice.__anext__() == "alice"
    with pytest.raises(StopAsyncIteration):
        await alice.__anext__()
    assert current_context_or_none() is None
    assert registry.open_scopes == 0
    await bob.aclose()
    await registry.aclose()
