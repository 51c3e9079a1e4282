"""FastAPI: the context and components as dependencies, and :func:`install`.

::

    from typing import Annotated
    from fastapi import FastAPI
    from ambient.integrations.fastapi import CurrentContext, Resolve, install

    app = FastAPI()
    install(app, registry=registry, identity=jwt_bearer(KEY, algorithms=["RS256"]))

    @app.post("/runs")
    async def start_run(
        ctx: CurrentContext,
        engine: Annotated[ExecutionEngine, Resolve(ExecutionEngine)],
    ) -> dict[str, str]:
        return {"run": await engine.start(ctx.thread_id)}

Both dependencies work in ``async def`` and plain ``def`` endpoints (FastAPI runs those in
its thread pool, which carries the context and the scope along), in dependencies of any
kind including ``yield`` dependencies, and in websocket endpoints. A component a
dependency resolved is the same instance the endpoint gets: one scope serves the whole
request. In a plain ``def`` endpoint, ``ambient.resolve_sync(Key)`` works too.

The scope closes when the app's call returns: after the response body, after
``BackgroundTasks`` and after the exit half of ``yield`` dependencies, so all of them still
see the context and the request's components.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Annotated, Any, TypeVar, overload

from fastapi import Depends

from ambient._accessors import resolve
from ambient._binding import get_current_context
from ambient._context import UserExecutionContext
from ambient._provider import key_name
from ambient.integrations.starlette import ambient_error_handler, install, problem_response

__all__ = [
    "CurrentContext",
    "Resolve",
    "ambient_error_handler",
    "current_context",
    "install",
    "problem_response",
]

T = TypeVar("T")


async def current_context() -> UserExecutionContext:
    """Dependency returning the request's context (an ``async def``: no thread hop).

    Raises:
        NoActiveContextError: the app runs without ``AmbientMiddleware`` (see
            :func:`install`).
    """
    return get_current_context()


CurrentContext = Annotated[UserExecutionContext, Depends(current_context)]
"""The request's :class:`~ambient.UserExecutionContext` as a parameter annotation."""


@overload
def Resolve(key: type[T], /) -> T: ...
@overload
def Resolve(key: Hashable, /) -> Any: ...


def Resolve(key: Any, /) -> Any:  # noqa: N802
    """Dependency marker resolving ``key`` in the request's scope.

    Use it in ``Annotated[Engine, Resolve(Engine)]`` or as a default value
    (``engine: Engine = Resolve(Engine)``). Sync and async factories both work; the
    component is created once per request (or user, or app) whatever asks for it.

    The dependency function is the same one for every ``Resolve(key)`` of a key, so a test
    can replace it as FastAPI's own: ``app.dependency_overrides[Resolve(Engine).dependency]
    = lambda: FakeEngine()``.

    Raises:
        ResolutionError: at request time, for an unknown key (listing what is registered).
    """
    resolve_component = _resolvers.get(key)
    if resolve_component is None:

        async def resolve_component() -> Any:
            return await resolve(key)

        resolve_component.__name__ = f"resolve_{key_name(key)}"
        resolve_component.__qualname__ = resolve_component.__name__
        # Kept while a route (or anyone) holds it: a key's function stays the same one.
        _resolvers[key] = resolve_component
    return Depends(resolve_component)


# Per key, the dependency function of Resolve(key), for FastAPI's dependency_overrides.
_resolvers: weakref.WeakValueDictionary[Hashable, Callable[[], Awaitable[Any]]] = (
    weakref.WeakValueDictionary()
)
