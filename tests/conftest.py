"""Shared fixtures: every async test runs on asyncio and trio; real services by URL."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator, Iterator

import pytest

import ambient._observe

pytest_plugins = ["ambient.testing"]

DATABASE_URL = os.environ.get(
    "AMBIENT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("AMBIENT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("AMBIENT_REQUIRE_SERVICES") == "1"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what exists once the tests are collected (imported modules, test items),
    which lives as long as the run: the tests that collect garbage (leak checks, the
    probe of ``ambient check``) then traverse what the tests made, not all of that."""
    # Hypothesis, when first imported, registers trio's random generator and warns unless
    # gc.get_referrers() finds what keeps it, which it does not look for among frozen
    # objects: imported before, as any test using it would have.
    import hypothesis  # noqa: F401

    gc.freeze()


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test once on asyncio and once on trio."""
    return str(request.param)


@pytest.fixture
async def eager_tasks(anyio_backend: str) -> AsyncIterator[None]:
    """Run the test's event loop with asyncio's eager task factory (as an application may
    set it at startup): a task made by ``asyncio.create_task`` runs its first step at once,
    inside that call. Skipped on trio and on Pythons before 3.12, which have none."""
    factory = getattr(asyncio, "eager_task_factory", None)
    if anyio_backend != "asyncio" or factory is None:
        pytest.skip("asyncio's eager task factory needs asyncio on Python 3.12 or later")
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    loop.set_task_factory(factory)
    try:
        yield
    finally:
        loop.set_task_factory(previous)


def service_unavailable(name: str, reason: str) -> None:
    """Skip (or, with AMBIENT_REQUIRE_SERVICES=1, fail) a test whose service is down."""
    message = f"{name} is not reachable: {reason}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (AMBIENT_REQUIRE_SERVICES=1)")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _no_leftover_observers() -> Iterator[None]:
    """A test that adds a process-wide observer must remove it again."""
    before = ambient._observe.observers
    yield
    leftover = ambient._observe.observers
    ambient._observe.observers = before
    assert leftover == before, "a test left a process-wide observer registered"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Run a test marked ``load`` without coverage tracing, which doubles the time of a load
    test for lines its smaller siblings cover. (pytest-cov's own ``no_cover`` marker fails
    every marked test under ``--no-cov``.)"""
    if item.get_closest_marker("load") is None:
        return (yield)
    try:
        from coverage import Coverage
    except ImportError:  # pragma: no cover - coverage comes with the test extra
        return (yield)
    tracing = Coverage.current()
    if tracing is None:
        return (yield)
    tracing.stop()
    try:
        return (yield)
    finally:
        tracing.start()
