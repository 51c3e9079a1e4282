"""ASGI middleware that gives every request its own ambient scope.

``AmbientMiddleware`` is pure ASGI 3 and works under any ASGI framework; identity resolvers
live in :mod:`ambient.middleware.identity`. A framework's exception handler answers
ambient's errors with :func:`answer_error`, as the middleware would, and notes an error it
answered in a way the middleware cannot read with :func:`note_failure`.
"""

from ambient.middleware._asgi import AmbientMiddleware, answer_error, note_failure
from ambient.middleware._problem import Problem
from ambient.middleware.identity import (
    Identity,
    IdentityResolver,
    first_of,
    scope_user,
    trusted_header,
)
from ambient.middleware.tickets import WebSocketTickets

__all__ = [
    "AmbientMiddleware",
    "Identity",
    "IdentityResolver",
    "Problem",
    "WebSocketTickets",
    "answer_error",
    "first_of",
    "note_failure",
    "scope_user",
    "trusted_header",
]
