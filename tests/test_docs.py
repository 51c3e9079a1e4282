"""The Python examples of README.md, docs/frameworks.md and docs/migration.md, run as a
user copies them (those that need a framework or a server are run beside that framework's
tests: test_fastapi.py, test_frameworks.py, test_server_errors.py, test_websockets.py)."""

from __future__ import annotations

import ast
import re
import sys
import types
from typing import Any

import pytest

import ambient
from ambient import Registry, UserExecutionContext
from ambient.testing import IsolationProbe
from tests.documented import ROOT, documented_code, python_blocks

DOCUMENTS = ("README.md", "docs/frameworks.md", "docs/migration.md")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_python_block_parses(document: str) -> None:
    """A block marked ``python`` is code a user copies: it parses (an interpreter session
    is marked ``pycon``)."""
    assert python_blocks(document)
    for line, code in python_blocks(document):
        try:
            ast.parse(code)
        except SyntaxError as exc:
            pytest.fail(f"{document}:{line}: a python block that does not parse: {exc.msg}")


# -- README: Use ------------------------------------------------------------------------------


class ToolDispatcher:
    """The class the README's first example says is defined above it."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.closed = False

    async def run(self, prompt: str, thread: str) -> str:
        return f"{self.user_id} on {thread}: {prompt}"

    def close(self) -> None:
        self.closed = True


class Memory:
    """A per-user component of the README's first example."""


async def test_the_readmes_first_example_runs_as_written() -> None:
    """One dispatcher per request, cleaned when it ends; one memory per user, shared by
    that user's scopes; ``job()`` opens a scope of its own outside any request."""
    namespace: dict[str, Any] = {"ToolDispatcher": ToolDispatcher, "Memory": Memory}
    exec(documented_code("README.md", "\n## Use\n"), namespace)  # noqa: S102 - our own docs
    registry: Registry = namespace["registry"]

    await namespace["job"]()
    async with registry.open_scope(UserExecutionContext.create("bob", thread_id="inbox")):
        answer = await namespace["handle"]("summarise my inbox")
        dispatcher = await ambient.resolve(ToolDispatcher)
        memory = await ambient.resolve(Memory)
    assert answer == "bob on inbox: summarise my inbox"
    assert dispatcher.closed
    async with registry.open_scope(UserExecutionContext.create("bob")):
        assert await ambient.resolve(Memory) is memory
        assert await ambient.resolve(ToolDispatcher) is not dispatcher
    async with registry.open_scope(UserExecutionContext.create("alice")):
        assert await ambient.resolve(Memory) is not memory
    await registry.aclose()
    stats = registry.stats()
    assert (stats.open_scopes, stats.live_users, stats.created) == (0, 0, stats.cleaned)


# -- README: the pytest kit -------------------------------------------------------------------


def _kit_example(monkeypatch: pytest.MonkeyPatch, factory: Any) -> Any:
    """The README's pytest example, over a ``myapp`` whose ``ToolDispatcher`` comes from
    ``factory``."""
    registry = Registry()
    registry.register(ToolDispatcher, factory)
    myapp = types.ModuleType("myapp")
    vars(myapp).update(registry=registry, ToolDispatcher=ToolDispatcher)
    monkeypatch.setitem(sys.modules, "myapp", myapp)
    namespace: dict[str, Any] = {}
    code = documented_code("README.md", "## Test your app: the pytest kit")
    exec(code, namespace)  # noqa: S102 - our own docs
    return namespace["test_users_never_share_a_dispatcher"]


async def test_the_readmes_pytest_kit_example_passes_for_a_sound_app(
    monkeypatch: pytest.MonkeyPatch,
    isolation_probe: IsolationProbe,
    make_context: Any,
) -> None:
    example = _kit_example(monkeypatch, lambda ctx: ToolDispatcher(ctx.user_id))
    await example(isolation_probe, make_context)


async def test_the_readmes_pytest_kit_example_fails_for_a_shared_dispatcher(
    monkeypatch: pytest.MonkeyPatch, make_context: Any
) -> None:
    shared = ToolDispatcher("everyone")
    example = _kit_example(monkeypatch, lambda: shared)
    with IsolationProbe() as probe, pytest.raises(AssertionError, match="alice, bob"):
        await example(probe, make_context)


# -- docs/frameworks.md: background jobs ------------------------------------------------------


class Mailer:
    """The component the background-jobs example resolves in its worker."""

    def __init__(self, ctx: UserExecutionContext) -> None:
        self.ctx = ctx


async def test_the_background_job_example_runs_as_the_captured_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``capture()`` in the request, ``restore(..., registry=)`` in the worker: the job
    runs as the request's user and tenant, as a child run, in a scope of its own."""
    monkeypatch.setenv("AMBIENT_CONTEXT_SECRET", "s" * 32)
    registry = Registry()
    registry.register(Mailer, Mailer)
    jobs: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    class Queue:
        def enqueue(self, fn: Any, *args: Any, **kwargs: Any) -> None:
            jobs.append((fn, args, kwargs))

    code = documented_code("docs/frameworks.md", "## Background jobs").replace(
        "        ...\n", "        seen.append((ctx, mailer))\n"
    )
    seen: list[tuple[UserExecutionContext, Mailer]] = []
    namespace: dict[str, Any] = {
        "ambient": ambient,
        "Mailer": Mailer,
        "queue": Queue(),
        "registry": registry,
        "order_id": 7,
        "send_receipt": None,  # the worker's function, imported where the request enqueues it
        "seen": seen,
    }
    request = UserExecutionContext.create("alice", tenant_id="acme")
    async with registry.open_scope(request):
        exec(code, namespace)  # noqa: S102 - our own docs
    ((_, args, kwargs),) = jobs
    await namespace["send_receipt"](*args, **kwargs)

    ((ctx, mailer),) = seen
    assert (ctx.user_id, ctx.tenant_id, ctx.thread_id) == ("alice", "acme", request.thread_id)
    assert ctx.parent_run_id == request.run_id
    assert mailer.ctx is ctx
    assert registry.stats().open_scopes == 0
    assert ambient.current_context_or_none() is None


# -- docs/migration.md: each step is the example's code -----------------------------------------

STEPS = [
    ("## Step 1: guard the globals", "legacy.py"),
    ("## Step 2: register a factory", "migrated.py"),
    ("## Step 3: roll out", "rollout.py"),
    ("## Step 4: remove the guard", "migrated.py"),
]


def _without_docstrings(source: str) -> str:
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            end = body[0].end_lineno or body[0].lineno
            for number in range(body[0].lineno - 1, end):
                lines[number] = ""
    return "".join(lines)


@pytest.mark.parametrize(("step", "module"), STEPS)
def test_each_migration_step_shows_the_example_code(step: str, module: str) -> None:
    """The guide's code is ``tests/migration_example/``'s, which the suite runs: each of
    its top-level statements, in order (its imports may be placed otherwise, and ``...``
    stands for code left out)."""
    code = documented_code("docs/migration.md", step)
    source = _without_docstrings((ROOT / "tests" / "migration_example" / module).read_text())
    body = []
    for line in code.splitlines():
        if line.startswith(("from ", "import ")):
            assert line in source.splitlines(), f"{module} does not import as the guide: {line}"
        else:
            body.append(line)
    position = 0
    squashed = re.sub(r"\s+", "", source)  # the layout may differ: `Starlette(routes=[...])`
    for chunk in re.split(r"\n\n\n+", "\n".join(body).strip()):  # top-level statements
        pattern = re.escape(re.sub(r"\s+", "", chunk)).replace(re.escape("..."), ".*?")
        found = re.compile(pattern, re.DOTALL).search(squashed, position)
        assert found, f"{step!r}: this is not the code of {module}:\n{chunk}"
        position = found.end()
