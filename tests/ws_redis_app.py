"""The websocket test app on Redis, for ``python -m uvicorn tests.ws_redis_app:app``.

Configured by ``AMBIENT_WS_REDIS_URL`` and ``AMBIENT_WS_PREFIX`` (the channel prefix, unique
per test so that concurrent test runs sharing one Redis never hear each other).
"""

from __future__ import annotations

import os

from ambient.integrations.websockets import ConnectionHub, RedisBroadcast
from tests.ws_app import build

hub = ConnectionHub(
    RedisBroadcast(
        os.environ["AMBIENT_WS_REDIS_URL"], channel_prefix=os.environ["AMBIENT_WS_PREFIX"]
    )
)
app, ledger, sockets = build(hub)
