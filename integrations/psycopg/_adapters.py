"""Each connection's adapters as its pool made them, put back when a handler changed them."""

from __future__ import annotations

import weakref
from typing import Any

from psycopg import AsyncConnection
from psycopg.adapt import AdaptersMap


def _mappings(adapters: AdaptersMap) -> tuple[object, ...]:
    """The mappings ``adapters`` looks dumpers, loaders and types up in."""
    return (
        adapters.types._registry,
        *adapters._loaders,
        *adapters._dumpers_by_oid,
        *adapters._dumpers.values(),
    )


class _AdaptersAsMade:
    """The adapters of each connection of a pool as the pool made it (``keep``), put back
    when a handler registered a loader, a dumper or a type on the connection (``restore``):
    the next checkout would load and dump values that handler's way (JSON with its
    ``loads``, an enum or composite as its classes, a text type as its loader).

    psycopg's adapters maps are copy-on-write: a map made from another shares its mappings,
    and the first registration that changes one replaces it with a changed copy, never a
    shared one in place. A connection whose map still holds the mappings of the copy kept
    when it was made has had nothing registered since: telling costs a comparison of a
    few objects by identity per checkout, no round trip, and putting them back a new map
    over the kept one (psycopg has no public setter for a connection's map).
    """

    __slots__ = ("_of",)

    def __init__(self) -> None:
        self._of: weakref.WeakKeyDictionary[
            AsyncConnection[Any], tuple[AdaptersMap, tuple[object, ...]]
        ] = weakref.WeakKeyDictionary()

    def keep(self, conn: AsyncConnection[Any]) -> None:
        """Remember ``conn``'s adapters as they are now (as its pool made it)."""
        made = AdaptersMap(conn.adapters)
        self._of[conn] = (made, _mappings(made))

    def restore(self, conn: AsyncConnection[Any]) -> None:
        """Give ``conn`` its kept adapters back, if anything was registered on it since."""
        kept = self._of.get(conn)
        if kept is None:
            return
        made, mappings = kept
        # Equal tuples: the same objects (the usual case, decided by identity), or mappings
        # changed back to what they held.
        if _mappings(conn.adapters) != mappings:
            conn._adapters = AdaptersMap(made)
