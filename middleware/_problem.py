"""RFC 9457 problem details over raw ASGI: refusals the middleware answers itself."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

from ambient.errors import AmbientError, InvalidContextError, _answer_refusal, _readable

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

# RFC 6455: a close frame's reason is at most 123 bytes of UTF-8.
_MAX_REASON = 123
# 1008 policy violation for refusals (a user over max_concurrent_per_user's 429 included),
# 1013 "try again later" for the server's overload, 1011 for any other server error (an
# app's own AmbientError with a 500 or 502 is no policy violation).
_WS_CODES = {503: 1013}
# From this status on, and for 429, the answer is the server's failure or overload: the
# body says the error class's client_detail, never the error's message.
_SERVER_ERROR: Final = 500
_OVERLOAD: Final = 429
# A day: a Retry-After longer than that says nothing a client would act on.
_RETRY_AFTER_MAX: Final = 86_400
_WWW_AUTHENTICATE = b"www-authenticate"

logger = logging.getLogger("ambient.middleware")


class Problem:
    """One problem+json answer: status, type, title, detail and extra headers."""

    __slots__ = ("detail", "headers", "status", "title", "type")

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        type_: str = "about:blank",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type_
        self.headers = headers or []

    @classmethod
    def from_error(cls, error: AmbientError, detail: str | None = None) -> Problem:
        """The answer ``error`` carries (it must have an ``http_status``), with its
        ``Retry-After`` and ``WWW-Authenticate`` headers when it has them.

        Its detail is ``detail`` when given; else the error's message for a refusal of the
        client's request (4xx), and the class's ``client_detail`` for a server error (5xx)
        or an overload (429): the message of such an error is the server's (a backend's
        address, how long it has been down), for its logs and trace, not for the client.
        An :class:`~ambient.errors.InvalidContextError` says its field and reason, never
        the value its message shows; an error whose message cannot be read (its ``str()``
        raises) says its class's ``client_detail``. A value set on the error that no
        answer can carry (a ``retry_after`` of text, a status no error has) is logged and
        replaced by its class's (see :func:`_answer_value`).
        """
        status = _answer_value(error, "http_status") or 500
        if detail is None:
            detail = _detail(error, status)
        headers: list[tuple[bytes, bytes]] = []
        retry_after = _answer_value(error, "retry_after")
        if retry_after is not None:
            # Whatever the error was built with (inf, nan, an int no float holds), it must
            # still be answered, with a header of a sane size.
            try:
                seconds = min(max(1, math.ceil(retry_after)), _RETRY_AFTER_MAX)
            except OverflowError:
                seconds = _RETRY_AFTER_MAX
            except ValueError:
                seconds = 1
            headers.append((b"retry-after", str(seconds).encode()))
        challenge = _answer_value(error, "challenge")
        if challenge is not None:
            headers.append((_WWW_AUTHENTICATE, challenge.encode("ascii")))
        return cls(
            status,
            _answer_value(error, "title"),
            detail,
            type_=_answer_value(error, "problem_type"),
            headers=headers,
        )

    def _challenged(self, challenge: str | None) -> Problem:
        """This problem, with ``challenge`` as its ``WWW-Authenticate`` header when it is a
        401 that has none (RFC 9110: a 401 carries a challenge)."""
        if (
            challenge is None
            or self.status != 401
            or any(name == _WWW_AUTHENTICATE for name, _ in self.headers)
        ):
            return self
        headers = [*self.headers, (_WWW_AUTHENTICATE, challenge.encode("ascii"))]
        return Problem(self.status, self.title, self.detail, type_=self.type, headers=headers)

    def body(self) -> bytes:
        """The JSON document."""
        document = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        return json.dumps(document, ensure_ascii=True).encode()

    async def send_http(self, send: Send, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Answer an HTTP request with this problem."""
        body = self.body()
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            *self.headers,
            *extra,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def deny_websocket(
        self,
        scope: MutableMapping[str, Any],
        receive: Receive,
        send: Send,
        extra: Iterable[tuple[bytes, bytes]] = (),
        *,
        connected: bool = False,
    ) -> None:
        """Refuse a websocket before accepting it.

        With the ``websocket.http.response`` extension the client gets the same HTTP
        problem answer; otherwise the handshake is closed with 1008 (1013 for a 503, 1011
        for another server error) and the detail as reason. ``connected``: the handshake's
        ``websocket.connect`` was already received (by the app), so it is not waited for.
        """
        if not connected:
            message = await receive()
            if message.get("type") != "websocket.connect":
                return  # the client went away before the handshake finished
        if "websocket.http.response" in scope.get("extensions", {}):
            body = self.body()
            headers = [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                *self.headers,
                *extra,
            ]
            await send(
                {"type": "websocket.http.response.start", "status": self.status, "headers": headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
            return
        reason = self.detail.encode()[:_MAX_REASON].decode("utf-8", "ignore")
        await send({"type": "websocket.close", "code": self._websocket_code(), "reason": reason})

    def _websocket_code(self) -> int:
        return _WS_CODES.get(self.status, 1011 if self.status >= 500 else 1008)

    def _websocket_close(self) -> dict[str, Any]:
        """The ``websocket.close`` message that ends an accepted websocket with this
        problem: 1013 "try again later" for the server's overload (503), 1011 for another
        server error, 1008 policy violation otherwise (a 429 included), with the title as
        reason (the detail of a refusal says more than a socket that was served should
        hear)."""
        reason = self.title.encode()[:_MAX_REASON].decode("utf-8", "ignore")
        return {
            "type": "websocket.close",
            "code": self._websocket_code(),
            "reason": reason,
        }


def _answer_value(error: AmbientError, name: str) -> Any:
    """``error``'s ``name`` (an attribute its answer reads), or, when no answer can carry
    it (set on the error, or on its class, after the class was made; a property that
    raises), the nearest value of its class and their bases an answer can carry (the
    class's own, else a base's, as for an attribute not set), with a warning: the request
    is still answered, where the value would fail it without an answer."""
    try:
        value = getattr(error, name)
    except Exception as exc:  # noqa: BLE001 - a property raising: answered all the same
        refusal: Exception | None = exc
    else:
        refusal = _answer_refusal(name, value)
        if refusal is None:
            return value
    fallback = next(
        (
            candidate
            for klass in type(error).__mro__
            if name in vars(klass) and _answer_refusal(name, candidate := vars(klass)[name]) is None
        ),
        getattr(AmbientError, name),
    )
    logger.warning(
        "ambient: the %s of a %s cannot be answered (%s); answered with %r instead",
        name,
        type(error).__name__,
        refusal,
        fallback,
    )
    return fallback


def _carries_status(error: AmbientError) -> bool:
    """Whether ``error`` is an answer to a client: its ``http_status`` is not ``None``.
    One that cannot be read (a property that raises) is answered all the same, logged
    and with the status of its class or nearest base that has one, else a 500, as a
    status no answer carries is (see :func:`_answer_value`), where reading it failed the
    request without its answer."""
    try:
        return error.http_status is not None
    except Exception:  # noqa: BLE001 - a property raising: answered all the same
        return True


def _detail(error: AmbientError, status: int) -> str:
    """The detail of the answer to ``error`` (see :meth:`Problem.from_error`)."""
    if _withholds_detail(status):
        return _client_detail(error)
    if isinstance(error, InvalidContextError):
        # The value may be no input of this client's: an id the app read from its store,
        # another user's.
        return f"{error.field} is invalid: {error.reason}"
    said = _readable(error)
    return _client_detail(error) if said is None else said


def _client_detail(error: AmbientError) -> str:
    """``error``'s ``client_detail`` (see :func:`_answer_value`)."""
    detail: str = _answer_value(error, "client_detail")
    return detail


def _withholds_detail(status: int) -> bool:
    """Whether an answer with ``status`` is the server's failure or overload (5xx, 429),
    whose body says the error class's ``client_detail`` and never the error's message."""
    return status >= _SERVER_ERROR or status == _OVERLOAD
