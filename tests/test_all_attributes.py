"""The public surface: ``__all__`` matches what the packages export, and imports stay lean."""

from __future__ import annotations

import importlib
import subprocess
import sys
from typing import TypeVar

import pytest

import ambient
import ambient.check
import ambient.errors
import ambient.integrations.psycopg
import ambient.integrations.websockets
import ambient.middleware
import ambient.middleware.identity
import ambient.migration
import ambient.testing


@pytest.mark.parametrize(
    "module",
    [
        ambient,
        ambient.check,
        ambient.errors,
        ambient.integrations.psycopg,
        ambient.integrations.websockets,
        ambient.middleware,
        ambient.middleware.identity,
        ambient.migration,
        ambient.testing,
    ],
)
def test_all_is_sorted_and_complete(module: object) -> None:
    """__all__ is sorted, every name in it exists, and every public name is in it."""
    names = module.__all__  # type: ignore[attr-defined]
    assert list(names) == sorted(names)
    for name in names:
        assert hasattr(module, name), name
    own = module.__name__  # type: ignore[attr-defined]

    def defined_here(value: object) -> bool:
        # Defined in this module or in one of ambient's private modules (re-exported);
        # a name merely imported from another public module need not be listed.
        origin = getattr(value, "__module__", "")
        if isinstance(value, TypeVar) or not origin.startswith("ambient"):
            return False
        if (
            module is not ambient
            and getattr(ambient, getattr(value, "__name__", ""), None) is value
        ):
            return False  # ambient's own public name, merely used here
        return origin == own or origin.rsplit(".", 1)[-1].startswith("_")

    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, type(ambient)) and defined_here(value)
    }
    assert public <= set(names), public - set(names)


def test_import_ambient_imports_nothing_optional() -> None:
    """`import ambient` never imports a framework, a driver or the OpenTelemetry SDK."""
    code = (
        "import sys, ambient, ambient.errors\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('fastapi','starlette','psycopg','psycopg_pool','redis','jwt','rich','uvicorn',"
        "'httpx','structlog','django','litestar','quart')"
        " or m.startswith('opentelemetry.sdk') or m.startswith('ambient.integrations')"
        " or m.startswith('ambient.middleware') or m.startswith('ambient.demo')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(  # noqa: S603 - our own interpreter, fixed code
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    ("module", "errors"),
    [
        ("ambient.integrations.propagation", ["InvalidTokenError"]),
        ("ambient.integrations.psycopg", ["PoolExhaustedError", "UnsupportedBackendError"]),
        ("ambient.integrations.websockets", ["BroadcastError", "UnsupportedBackendError"]),
    ],
)
def test_integrations_re_export_the_errors_they_raise(module: str, errors: list[str]) -> None:
    """An integration lists the errors it raises in its ``__all__``, as ``ambient.errors``
    defines them (the README: "the integrations re-export their own"), so that
    ``from ambient.integrations.psycopg import PoolExhaustedError`` works."""
    imported = importlib.import_module(module)
    for name in errors:
        assert name in imported.__all__, name
        assert getattr(imported, name) is getattr(ambient.errors, name)
