"""The isolation tests can fail: each runs against deliberately broken builds of ambient.

A test that passes whatever the code does proves nothing (an in-process client that never
interleaves requests, an endpoint that reads the context before anyone else can run). Each
mutant of ``tests/mutants.py`` is a real class of context bug; the tests named for it run in
a subprocess with the mutant applied and must fail there. The unmutated runs are the main
suite itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mutants import MUTANT_ENV, MUTANTS

ROOT = Path(__file__).resolve().parent.parent
MANY_USERS = (
    "tests/test_middleware_servers.py::"
    "test_many_users_on_keep_alive_connections_never_see_each_other[asyncio-hypercorn]"
)
PIPELINED = (
    "tests/test_middleware_servers.py::"
    "test_pipelined_requests_do_not_inherit_the_previous_users_context[asyncio-uvicorn]"
)

# For each mutant, test selections that must each catch it on their own.
CATCHERS = {
    # 200 users on real keep-alive connections through hypercorn, and the binding tests.
    "process-global": [MANY_USERS, "tests/test_binding.py"],
    # Invisible to a request's own task on a real server (each request has its own
    # context); the in-process tests check that nothing stays bound after a scope.
    "no-unbind": ["tests/test_binding.py", "tests/test_middleware.py"],
    # Three requests pipelined on one uvicorn connection, and the middleware tests.
    "shared-request-store": [PIPELINED, "tests/test_middleware.py"],
}


def test_every_mutant_has_catchers() -> None:
    assert sorted(CATCHERS) == sorted(MUTANTS)


def _run(mutant: str, selection: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, MUTANT_ENV: mutant}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.mutants",
        "-p",
        "no:cacheprovider",
        "--no-cov",
        "-x",
        selection,
    ]
    return subprocess.run(  # noqa: S603 - our own interpreter and test paths
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize(
    ("mutant", "selection"),
    [
        pytest.param(mutant, selection, id=f"{mutant}:{selection.split('::')[-1]}")
        for mutant, selections in CATCHERS.items()
        for selection in selections
    ],
)
def test_the_isolation_tests_fail_against_a_mutant(mutant: str, selection: str) -> None:
    """The selected tests fail (exit status 1: test failures, not a usage or collection
    error) when ``mutant`` is applied."""
    result = _run(mutant, selection)
    output = result.stdout + result.stderr
    assert f"ambient mutant: {mutant}" in output, output[-2000:]
    assert result.returncode == 1, output[-2000:]
    assert " failed" in output.splitlines()[-1], output[-2000:]
