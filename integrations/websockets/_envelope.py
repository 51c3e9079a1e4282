"""One event on its way to a user's sockets: the envelope, its frame data and its wire form."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ambient import UserRef

# Whom an envelope is for, within its user.
TO_USER: Final = 0
TO_THREAD: Final = 1
TO_CONNECTION: Final = 2
# Not an event: the user's sockets (or the one named by ``target``) lose their access.
REVOKE: Final = 3

Event = Mapping[str, Any] | bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event on its way to a user's sockets.

    Attributes:
        user: The user whose sockets receive it (always taken from a bound context).
        mode: ``TO_USER``, ``TO_THREAD``, ``TO_CONNECTION`` or ``REVOKE``.
        target: The thread id or connection id for the middle two modes; for ``REVOKE``
            the one connection to revoke, or ``None`` for all of the user's.
        data: A text frame (``str``, JSON) or a binary frame (``bytes``); for ``REVOKE``
            the close reason.
    """

    user: UserRef
    mode: int
    target: str | None
    data: str | bytes


def _encode(event: Event, limit: int) -> str | bytes:
    data: str | bytes
    if isinstance(event, bytes | bytearray | memoryview):
        data = bytes(event)
    elif isinstance(event, Mapping):
        document = event if isinstance(event, dict) else dict(event)
        data = json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    else:
        msg = f"an event is a JSON-serialisable mapping or bytes, not {type(event).__name__}"
        raise TypeError(msg)
    if len(data) > limit:
        msg = f"the event is {len(data)} long, more than the hub's queue_bytes ({limit})"
        raise ValueError(msg)
    if isinstance(data, str) and not data.isascii():
        # A text frame is UTF-8: a lone surrogate (json.loads makes one of "\ud800") cannot
        # be sent, and the server's failure to encode it would drop every receiving socket
        # as if its client had gone.
        try:
            data.encode()
        except UnicodeEncodeError as exc:
            msg = (
                f"the event's text cannot be sent as UTF-8: {exc.reason} at position "
                f"{exc.start} of its JSON (a lone surrogate)"
            )
            raise ValueError(msg) from None
    return data


_HEADER = struct.Struct("!BBHHH")  # kind, mode, len(tenant)+1 or 0, len(user), len(target)
_TEXT, _BINARY = 0, 1
# Added to the kind for a target that is there but empty: a length of 0 alone means none
# (all of the user's sockets, for a revocation). A flag rather than a new length rule, so
# an older process drops such an envelope as malformed instead of misreading the others.
_EMPTY_TARGET = 0x80


def encode_envelope(envelope: Envelope) -> bytes:
    """The wire form of ``envelope`` on Redis (the user travels along and is checked)."""
    user = envelope.user
    tenant = b"" if user.tenant_id is None else user.tenant_id.encode()
    user_id = user.user_id.encode()
    target = b"" if envelope.target is None else envelope.target.encode()
    data = envelope.data
    kind = _TEXT if isinstance(data, str) else _BINARY
    if envelope.target == "":
        kind |= _EMPTY_TARGET
    payload = data.encode() if isinstance(data, str) else data
    tenant_len = 0 if user.tenant_id is None else len(tenant) + 1
    header = _HEADER.pack(kind, envelope.mode, tenant_len, len(user_id), len(target))
    return b"".join((header, tenant, user_id, target, payload))


def decode_envelope(raw: bytes) -> Envelope:
    """The inverse of :func:`encode_envelope`.

    Raises:
        ValueError: ``raw`` is not an envelope.
    """
    try:
        kind, mode, tenant_len, user_len, target_len = _HEADER.unpack_from(raw)
    except struct.error:
        raise ValueError("not an ambient websocket envelope") from None
    at = _HEADER.size
    # A message cut short (or with lengths that lie) would decode as another user's or
    # target's: every part it declares must be there, and a user named.
    if not user_len or len(raw) < at + max(tenant_len - 1, 0) + user_len + target_len:
        raise ValueError("not an ambient websocket envelope")
    tenant = None
    if tenant_len:
        tenant = raw[at : at + tenant_len - 1].decode()
        at += tenant_len - 1
    user_id = raw[at : at + user_len].decode()
    at += user_len
    empty_target = kind & _EMPTY_TARGET
    kind &= ~_EMPTY_TARGET
    if empty_target and target_len:
        raise ValueError("not an ambient websocket envelope")
    target = raw[at : at + target_len].decode() if target_len or empty_target else None
    at += target_len
    if kind not in (_TEXT, _BINARY) or mode not in (TO_USER, TO_THREAD, TO_CONNECTION, REVOKE):
        raise ValueError("not an ambient websocket envelope")
    payload = raw[at:]
    data: str | bytes = payload.decode() if kind == _TEXT else bytes(payload)
    return Envelope(UserRef(user_id, tenant), mode, target, data)
