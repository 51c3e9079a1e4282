"""Pytest plugin and helpers for testing applications built on ambient.

Registered through the ``pytest11`` entry point, so its fixtures are available in every
project that installs ``ambient-context``:

- ``make_context`` — a factory of valid :class:`~ambient.UserExecutionContext` objects;
- ``ambient_context`` — a context bound for the duration of the test;
- ``isolation_probe`` — an :class:`IsolationProbe` watching every scope and component of
  the test, which fails the test when a component instance was seen by two users, was not
  cleaned exactly once, or outlived its scope.

Example (an async test needs a runner: anyio's ``@pytest.mark.anyio`` or pytest-asyncio)::

    @pytest.mark.anyio
    async def test_each_user_gets_their_own_dispatcher(isolation_probe, make_context):
        for user in ("alice", "bob"):
            async with registry.open_scope(make_context(user)):
                await ambient.resolve(ToolDispatcher)
        # the probe checks at teardown; or explicitly:
        isolation_probe.assert_clean()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ambient import UserExecutionContext, bind_context
from ambient._probe import IsolationProbe, IsolationReport

__all__ = [
    "IsolationProbe",
    "IsolationReport",
    "ambient_context",
    "isolation_probe",
    "make_context",
]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def make_context() -> Callable[..., UserExecutionContext]:
    """A factory of valid contexts: ``make_context("alice", tenant_id="acme")``."""

    def make(user_id: str = "test-user", **ids: Any) -> UserExecutionContext:
        return UserExecutionContext.create(user_id, **ids)

    return make


@pytest.fixture
def ambient_context(
    make_context: Callable[..., UserExecutionContext],
) -> Iterator[UserExecutionContext]:
    """A context for ``test-user``, bound while the test runs (no component scope)."""
    ctx = make_context()
    with bind_context(ctx):
        yield ctx


@pytest.fixture
def isolation_probe() -> Iterator[IsolationProbe]:
    """An :class:`IsolationProbe` for the test; the test fails if it finds a problem."""
    with IsolationProbe() as probe:
        yield probe
    report = probe.report()
    if not report.ok:
        lines = "\n  ".join(report.violations)
        pytest.fail(f"ambient isolation probe found problems:\n  {lines}", pytrace=False)
