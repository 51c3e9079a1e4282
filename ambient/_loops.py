"""Event-loop checks shared by integrations whose drivers run on asyncio only."""

from __future__ import annotations

import asyncio
import sys

from ambient.errors import UnsupportedBackendError

__all__ = ["refuse_trio", "require_asyncio"]


def refuse_trio(reason: str) -> None:
    """Raise :class:`UnsupportedBackendError` (with ``reason``) when called inside trio.

    Construction outside any event loop is fine; trio is never imported here.
    """
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_run():
        raise UnsupportedBackendError(reason)


def require_asyncio(reason: str) -> None:
    """Raise :class:`UnsupportedBackendError` (with ``reason``) unless asyncio runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise UnsupportedBackendError(reason) from None
