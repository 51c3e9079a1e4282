"""What the server said when it last refused a pool's new connection."""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any, cast

import psycopg
from psycopg import AsyncConnection

if TYPE_CHECKING:
    from ambient.integrations.psycopg._per_user import PerUserPools
    from ambient.integrations.psycopg._shared import SharedPool


logger = logging.getLogger("ambient")

# libpq's "where" before the server's own words: the 503 goes to the client, which has no
# business knowing the database's address.
_WHERE = re.compile(r"^(?:connection failed: )?connection to server (?:at|on) .*? failed: ")
_MAX_REASON = 300
# psycopg before 3.3 refuses a connection class of the pool's own with close_returns=True.
_CLOSE_RETURNS_NEEDS_OWN_CLASS = [int(n) for n in re.findall(r"\d+", psycopg.__version__)[:2]] < [
    3,
    3,
]


def _first_line(exc: psycopg.Error) -> str:
    """``exc``'s first line, with the password the attempt used blotted out (libpq never
    writes it, but a server message may echo what a connection option held)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    password = getattr(getattr(exc, "pgconn", None), "password", None)
    if password:
        text = text.replace(password.decode(errors="replace"), "***")
    return " ".join(text.split())[:_MAX_REASON]


class _RefusalLog:
    """The refusal one strategy logged last, for all its pools (a PerUserPools has one per
    user): logged once while it lasts, which is until a connection made with a connection
    string it refused succeeds, begun after the last refusal of that string.

    A pool's own note (:class:`_Refusals`) is no guide here: a pool that got a refusal may
    never connect again (a user who does not come back, a pool opened anew), while one
    that connects the same way, noting nothing, shows the server accepts again.
    """

    __slots__ = ("_refused", "reason")

    def __init__(self) -> None:
        self.reason: str | None = None
        # The connection strings refused for ``reason``, and when each was last.
        self._refused: dict[str, float] = {}

    def refused(self, conninfo: str, reason: str, at: float) -> bool:
        """Note a refusal; return whether it is a new one, to log."""
        new = reason != self.reason
        if new:
            self.reason = reason
            self._refused.clear()
        self._refused[conninfo] = at
        return new

    def connected(self, conninfo: str, started: float) -> None:
        """Note a connection made with ``conninfo``, begun at ``started``."""
        at = self._refused.get(conninfo)
        if at is not None and started >= at:
            self.reason = None
            self._refused.clear()


class _Refusals:
    """The last refusal of one psycopg pool's attempts to connect, until one succeeds.

    psycopg's pool opens connections in background workers, logs each failure and tries
    again later, so a checkout that waits for a connection only learns that none came. The
    pool gets a connection class of this object's making (:meth:`connection_class`): its
    ``connect`` is the application's, and notes what the server answered. The connections
    it returns are the application's own class.
    """

    __slots__ = ("_owner", "at", "reason")

    def __init__(self, owner: SharedPool | PerUserPools, previous: _Refusals | None = None) -> None:
        self._owner = owner
        self.reason: str | None = None  # the server's words, without where it runs
        self.at = 0.0
        if previous is not None:
            # A pool opened anew after ``previous``'s got no connection: the refusal it
            # noted lasts until a connection of the new one succeeds, as one of the
            # earlier pool's would have ended it.
            self.reason, self.at = previous.reason, previous.at

    def connection_class(
        self, base: type[AsyncConnection[Any]], options: dict[str, Any]
    ) -> type[AsyncConnection[Any]]:
        """A subclass of ``base`` whose ``connect`` notes refusals (``base`` itself where
        the pool ``options`` could not take one)."""
        if options.get("close_returns") and _CLOSE_RETURNS_NEEDS_OWN_CLASS:
            return base
        refusals = self

        async def connect(
            cls: type[Any], /, conninfo: str = "", **kwargs: Any
        ) -> AsyncConnection[Any]:
            started = time.monotonic()
            try:
                conn = await base.connect(conninfo, **kwargs)
            except psycopg.OperationalError as exc:
                refusals._refused(exc, conninfo)
                raise
            refusals._connected(started, conninfo)
            return conn

        namespace = {
            "connect": classmethod(connect),
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        return cast("type[AsyncConnection[Any]]", type(base.__name__, (base,), namespace))

    def _refused(self, exc: psycopg.OperationalError, conninfo: str = "") -> None:
        line = _first_line(exc)
        self.reason = _WHERE.sub("", line)
        self.at = time.monotonic()
        owner = self._owner
        if owner._refusal_log.refused(conninfo, self.reason, self.at):
            # Once while the server refuses for the same reason: psycopg's pool logs each
            # attempt, and a checkout's 503 says it again.
            logger.warning(
                "ambient: a new connection of %r failed: %s (psycopg's pool tries again; "
                "checkouts that find no connection meanwhile answer 503, with this as a note)",
                owner,
                line,
            )

    def _connected(self, started: float, conninfo: str = "") -> None:
        self._owner._refusal_log.connected(conninfo, started)
        if started < self.at:
            # An attempt begun before the last refusal (the pool opens several at once)
            # says nothing of whether the server refuses now.
            return
        self.reason = None

    def why(self) -> str:
        """The note for the error of a checkout that got no connection: the server's last
        refusal, unless the pool has connected since (``""``)."""
        if self.reason is None:
            return ""
        ago = time.monotonic() - self.at
        said = self.reason
        return f"the pool's last attempt to connect failed {ago:.1f} s ago: {said}"
