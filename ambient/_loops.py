"""Event-loop checks shared by integrations whose drivers run on asyncio only."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

from ambient.errors import UnsupportedBackendError

__all__ = ["in_trio", "loop_call_soon", "on_loop_thread", "refuse_trio", "require_asyncio"]


def in_trio() -> bool:
    """Whether this code runs inside trio (trio is never imported here)."""
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_run())


def _in_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def on_loop_thread() -> bool:
    """Whether this thread runs an event loop (asyncio's, or trio's if trio is imported)."""
    return _in_asyncio() or in_trio()


def loop_call_soon() -> Callable[[Callable[[], object]], object] | None:
    """A thread-safe way to run a callback on the event loop running in this thread
    (asyncio's or trio's), or ``None`` when none runs here."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return loop.call_soon_threadsafe
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            return None
        return token.run_sync_soon  # type: ignore[no-any-return]
    return None


def refuse_trio(reason: str) -> None:
    """Raise :class:`UnsupportedBackendError` (with ``reason``) when called inside trio.

    Construction outside any event loop is fine; trio is never imported here.
    """
    if in_trio():
        raise UnsupportedBackendError(reason)


def require_asyncio(reason: str) -> None:
    """Raise :class:`UnsupportedBackendError` (with ``reason``) unless asyncio runs here."""
    if not _in_asyncio():
        raise UnsupportedBackendError(reason)
