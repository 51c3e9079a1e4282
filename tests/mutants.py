"""Deliberately broken builds of ambient, to prove the isolation tests can fail.

Loaded as a pytest plugin (``-p tests.mutants``) with ``AMBIENT_TEST_MUTANT`` naming one
mutant; ``test_mutants.py`` runs the isolation tests in a subprocess once per mutant and
expects each run to fail. Each mutant is a bug a context library has shipped:

* ``process-global``: the current binding kept in one process-wide slot instead of a
  ContextVar (thread-local or global state on an event loop);
* ``no-unbind``: a binding never undone when its scope ends, so it stays current;
* ``shared-request-store``: REQUEST components kept with the application's instead of the
  scope's, so one request's instance is handed to every later request, whoever's it is.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

MUTANT_ENV = "AMBIENT_TEST_MUTANT"


class _Token:
    __slots__ = ("old",)

    def __init__(self, old: Any) -> None:
        self.old = old


class _ProcessSlot:
    """Looks like ``ContextVar`` to ambient's code, but every task and thread shares it."""

    def __init__(self, default: Any) -> None:
        self.value = default

    def get(self, *default: Any) -> Any:
        return self.value

    def set(self, value: Any) -> _Token:
        token = _Token(self.value)
        self.value = value
        return token

    def reset(self, token: _Token) -> None:
        self.value = token.old


def _process_global() -> None:
    import ambient._binding

    real = ambient._binding._current
    slot = _ProcessSlot(None)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "ambient" and getattr(module, "_current", None) is real:
            module._current = slot  # type: ignore[attr-defined]


def _no_unbind() -> None:
    import ambient._binding
    import ambient._scope

    def unbind(binding: Any) -> None:
        return None

    ambient._binding.unbind = unbind
    ambient._scope.unbind = unbind  # type: ignore[attr-defined]


def _shared_request_store() -> None:
    from ambient._instances import Instances
    from ambient._scope import Scope

    def request_store(self: Scope) -> Instances:
        return self._registry.app_instances

    Scope._request_store = request_store  # type: ignore[method-assign]


MUTANTS = {
    "process-global": _process_global,
    "no-unbind": _no_unbind,
    "shared-request-store": _shared_request_store,
}


def pytest_configure(config: pytest.Config) -> None:
    name = os.environ.get(MUTANT_ENV, "")
    if name:
        MUTANTS[name]()


def pytest_report_header(config: pytest.Config) -> str:
    return f"ambient mutant: {os.environ.get(MUTANT_ENV) or 'none'}"
