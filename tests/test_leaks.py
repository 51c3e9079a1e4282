"""Leaks: nothing of a closed scope stays alive after a garbage collection."""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator, Iterator

import ambient
from ambient import Lifetime, Registry, UserExecutionContext


class RequestThing:
    """A REQUEST component."""


class UserThing:
    """A USER component."""


async def test_10000_scopes_leave_nothing_alive() -> None:
    """After 10,000 scopes with components, no context, scope or REQUEST component is alive."""
    registry = Registry()
    registry.register(RequestThing, RequestThing)

    def with_cleanup() -> Iterator[object]:
        yield object()

    async def async_with_cleanup() -> AsyncIterator[dict[str, int]]:
        yield {}

    registry.register("gen", with_cleanup)
    registry.register("agen", async_with_cleanup)
    registry.register(UserThing, UserThing, lifetime=Lifetime.USER, idle_ttl=0)
    refs: list[weakref.ref[object]] = []
    for n in range(10_000):
        ctx = UserExecutionContext.create(f"user-{n % 100}")
        async with registry.open_scope(ctx) as scope:
            thing = await ambient.resolve(RequestThing)
            ambient.resolve_sync("gen")
            await ambient.resolve("agen")
            await ambient.resolve(UserThing)
        if n % 100 == 0:
            refs += [weakref.ref(ctx), weakref.ref(scope), weakref.ref(thing)]
    del ctx, scope, thing
    await registry.sweep()
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert alive == []
    stats = registry.stats()
    assert stats.open_scopes == 0
    assert stats.created == stats.cleaned
    assert stats.live_users == 0
