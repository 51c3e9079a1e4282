"""Delivery backends: the :class:`Broadcast` protocol, its error and the in-process backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import anyio

from ambient import UserRef
from ambient.integrations.websockets._envelope import Envelope

Deliver = Callable[[Envelope], None]


class Broadcast(Protocol):
    """A delivery backend: takes envelopes from senders and hands them to every process's
    hub, which delivers to the sockets it holds."""

    def attach(self, deliver: Deliver) -> None:
        """Remember the hub's delivery callback (called once, by the hub)."""
        ...

    async def publish(self, envelope: Envelope) -> None:
        """Hand ``envelope`` to every process holding sockets of its user.

        Raises:
            BroadcastError: when it cannot be handed on.
        """
        ...

    async def subscribe(self, user: UserRef) -> None:
        """Start receiving ``user``'s envelopes here (reference-counted); returns once
        envelopes published from now on will arrive.

        Raises:
            BroadcastError: when the subscription cannot be made.
        """
        ...

    async def unsubscribe(self, user: UserRef) -> None:
        """Drop one reference taken by :meth:`subscribe`."""
        ...

    async def aclose(self) -> None:
        """Release connections and tasks (the backend may be used again afterwards)."""
        ...


class InProcessBroadcast:
    """The default backend: delivery within this process, nothing to configure."""

    __slots__ = ("_deliver",)

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    def attach(self, deliver: Deliver) -> None:
        """Remember the hub's delivery callback."""
        _attach_once(self._deliver, deliver)
        self._deliver = deliver

    async def publish(self, envelope: Envelope) -> None:
        """Queue ``envelope`` on this process's matching sockets."""
        deliver = self._deliver
        if deliver is not None:
            deliver(envelope)
        # A real suspension point: writers get to run even when a sender emits in a tight
        # loop, so a fast socket keeps up instead of overflowing its queue.
        await anyio.lowlevel.checkpoint()

    async def subscribe(self, user: UserRef) -> None:
        """Nothing to do in one process."""

    async def unsubscribe(self, user: UserRef) -> None:
        """Nothing to do in one process."""

    async def aclose(self) -> None:
        """Nothing to release."""


def _attach_once(current: Deliver | None, new: Deliver) -> None:
    if current is not None and current != new:
        msg = "this backend already delivers to another ConnectionHub; give each hub its own"
        raise RuntimeError(msg)
