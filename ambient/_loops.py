"""Event-loop checks shared by integrations whose drivers run on asyncio only."""

from __future__ import annotations

import asyncio
import sys

from ambient.errors import UnsupportedBackendError

__all__ = ["in_trio", "on_loop_thread", "refuse_trio", "require_asyncio"]


def in_trio() -> bool:
    """Whether this code runs inside trio (trio is never imported here)."""
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_run())


def on_loop_thread() -> bool:
    """Whether this thread runs an event loop (asyncio's, or trio's if trio is imported)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return True
    return in_trio()


def refuse_trio(reason: str) -> None:
    """Raise :class:`UnsupportedBackendError` (with ``reason``) when called inside trio.

    Construction outside any event loop is fine; trio is never imported here.
    """
    if in_trio():
        raise UnsupportedBackendError(reason)


def require_asyncio(reason: str) -> None:
    """Raise :class:`UnsupportedBackendError` (with ``reason``) unless asyncio runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise UnsupportedBackendError(reason) from None
