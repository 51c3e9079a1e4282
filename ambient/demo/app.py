"""A small multi-user agent backend, written the way ambient wants: no global singletons.

Per request: a ``ToolDispatcher``, an ``AgentInstanceFactory`` and an ``ExecutionEngine``.
Per user: a websocket event stream (``/events``; every run is announced on the user's
sockets only) and a ``ConversationStore`` (in memory, or PostgreSQL when ``AMBIENT_DATABASE_URL`` is
set). Identity: the ``x-user-id`` header (and the tenant's, ``x-tenant-id``, if any) from
loopback peers (demo only), or an HS256 bearer JWT (the tenant in its ``tenant_id`` claim)
when ``AMBIENT_JWT_SECRET`` is set. Traces go to OTLP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import operator
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef
from ambient.check import PlannedRequest
from ambient.integrations.websockets import ConnectionHub, UserWebSocketManager, message_scope
from ambient.middleware import AmbientMiddleware, IdentityResolver, trusted_header
from ambient.telemetry import Telemetry

__all__ = [
    "CHECK_PLAN",
    "CHECK_WEBSOCKET",
    "AgentInstance",
    "AgentInstanceFactory",
    "ConversationStore",
    "ExecutionEngine",
    "ToolDispatcher",
    "build_registry",
    "create_app",
]

logger = logging.getLogger("ambient.demo")

HISTORY_LIMIT = 50
# A run's body: room for a 4,000-character prompt whose every character is escaped (12
# bytes for one outside the BMP, a surrogate pair of \uXXXX).
MAX_BODY = 64 * 1024

# What `ambient check` sends as each simulated user when it checks the demo.
CHECK_PLAN = (
    PlannedRequest(
        "POST", "/agents/triage/runs", '{"prompt": "remember note for {user} {tenant}"}'
    ),
    PlannedRequest("GET", "/history"),
    PlannedRequest("POST", "/agents/research/runs", '{"prompt": "calc (6 + 1) * 6"}'),
    PlannedRequest("GET", "/whoami"),
)
# Held open by each simulated user while its requests run: every run is announced on it.
CHECK_WEBSOCKET = "/events"


class ConversationStore:
    """One user's conversation history (USER lifetime): the last ``HISTORY_LIMIT`` entries,
    in memory (see :class:`PostgresConversationStore` for the database)."""

    def __init__(self, user: UserRef) -> None:
        self.user = user
        self.messages: deque[dict[str, str]] = deque(maxlen=HISTORY_LIMIT)

    async def add(self, thread_id: str, role: str, text: str) -> None:
        self.messages.append({"thread_id": thread_id, "role": role, "text": text})

    async def history(self) -> list[dict[str, str]]:
        return list(self.messages)

    async def notes(self) -> list[str]:
        return [m["text"] for m in self.messages if m["role"] == "note"]

    async def aclose(self) -> None:
        self.messages.clear()


SCHEMA = """
CREATE TABLE IF NOT EXISTS ambient_demo_messages (
    id bigserial PRIMARY KEY,
    tenant text NOT NULL,
    owner text NOT NULL,
    thread_id text NOT NULL,
    role text NOT NULL,
    text text NOT NULL
);
CREATE INDEX IF NOT EXISTS ambient_demo_messages_owner
    ON ambient_demo_messages (tenant, owner, id);
"""
# Rows are always the current user's: the pool sets app.user_id / app.tenant_id for every
# checkout from the bound context (with row-level security they would be enforced too).
_RECENT = (
    "SELECT thread_id, role, text FROM (SELECT id, thread_id, role, text "
    "FROM ambient_demo_messages WHERE tenant = current_setting('app.tenant_id') "
    "AND owner = current_setting('app.user_id') ORDER BY id DESC LIMIT %s) AS recent "
    "ORDER BY id"
)


class PostgresConversationStore(ConversationStore):
    """The same history in PostgreSQL, through the psycopg integration's shared pool."""

    def __init__(self, user: UserRef, db: Any) -> None:
        super().__init__(user)
        self.db = db

    async def add(self, thread_id: str, role: str, text: str) -> None:
        async with self.db.connection() as conn:
            await conn.execute(
                "INSERT INTO ambient_demo_messages (tenant, owner, thread_id, role, text) "
                "VALUES (current_setting('app.tenant_id'), current_setting('app.user_id'), "
                "%s, %s, %s)",
                (thread_id, role, text),
            )

    async def history(self) -> list[dict[str, str]]:
        async with self.db.connection() as conn:
            cursor = await conn.execute(_RECENT, (HISTORY_LIMIT,))
            rows = await cursor.fetchall()
        return [{"thread_id": t, "role": r, "text": x} for t, r, x in rows]

    async def notes(self) -> list[str]:
        return [m["text"] for m in await self.history() if m["role"] == "note"]

    async def aclose(self) -> None:
        return None


async def create_schema(url: str) -> None:
    """Create the demo's table (idempotent)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(SCHEMA)


_OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


# An expression nested deeper than this (a long sum is as deep a tree as nested signs or
# parentheses) is refused before the recursive walk, which would exhaust the stack.
_MAX_DEPTH = 200


def _calculate(expression: str) -> float:
    """Arithmetic on numbers with + - * / and parentheses; nothing else is evaluated."""
    try:
        tree = ast.parse(expression, mode="eval")
    except (RecursionError, MemoryError):
        msg = "the expression is nested too deeply"
        raise ValueError(msg) from None
    pending: list[tuple[ast.AST, int]] = [(tree, 0)]
    while pending:
        node, depth = pending.pop()
        if depth > _MAX_DEPTH:
            msg = f"the expression is longer or deeper than {_MAX_DEPTH} operations"
            raise ValueError(msg)
        pending.extend((child, depth + 1) for child in ast.iter_child_nodes(node))

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return float(_OPERATORS[type(node.op)](walk(node.left), walk(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        msg = "only numbers, + - * / and parentheses"
        raise ValueError(msg)

    return walk(tree)


class ToolDispatcher:
    """The tools an agent may call, bound to the current user's store (REQUEST lifetime)."""

    def __init__(self, ctx: UserExecutionContext, store: ConversationStore) -> None:
        self.ctx = ctx
        self.store = store
        self.calls: list[str] = []

    async def call(self, tool: str, argument: str) -> str:
        self.calls.append(tool)
        if tool == "remember":
            await self.store.add(self.ctx.thread_id, "note", argument)
            return f"noted: {argument}"
        if tool == "recall":
            notes = await self.store.notes()
            return "; ".join(notes) if notes else "nothing noted yet"
        if tool == "calc":
            try:
                return f"{_calculate(argument):g}"
            except (ValueError, SyntaxError, ZeroDivisionError, OverflowError) as exc:
                return f"cannot calculate {argument!r}: {exc}"
        return f"you said: {argument}"

    def close(self) -> None:
        self.calls.clear()


class AgentInstance:
    """One agent run: picks a tool from the prompt and answers."""

    def __init__(self, name: str, ctx: UserExecutionContext, tools: ToolDispatcher) -> None:
        self.name = name
        self.ctx = ctx
        self.tools = tools

    async def run(self, prompt: str) -> str:
        verb, _, rest = prompt.strip().partition(" ")
        tool = verb.lower() if verb.lower() in ("remember", "recall", "calc") else "echo"
        argument = rest if tool != "echo" else prompt
        return await self.tools.call(tool, argument)


class UnknownAgentError(LookupError):
    """No agent has the name a run asked for (the client's mistake: 404)."""


class AgentInstanceFactory:
    """Makes agent instances for the current request (REQUEST lifetime)."""

    AGENTS = ("triage", "research")

    def __init__(self, ctx: UserExecutionContext, tools: ToolDispatcher) -> None:
        self.ctx = ctx
        self.tools = tools
        self.created: list[AgentInstance] = []

    def create(self, name: str) -> AgentInstance:
        if name not in self.AGENTS:
            msg = f"unknown agent {name!r}; try one of {', '.join(self.AGENTS)}"
            raise UnknownAgentError(msg)
        agent = AgentInstance(name, self.ctx.child(f"agent:{name}"), self.tools)
        self.created.append(agent)
        return agent

    def close(self) -> None:
        self.created.clear()


class ExecutionEngine:
    """Runs an agent for the current user and records the exchange (REQUEST lifetime)."""

    def __init__(
        self,
        ctx: UserExecutionContext,
        agents: AgentInstanceFactory,
        store: ConversationStore,
        events: UserWebSocketManager,
    ) -> None:
        self.ctx = ctx
        self.agents = agents
        self.store = store
        self.events = events

    async def run(self, agent_name: str, prompt: str) -> dict[str, Any]:
        agent = self.agents.create(agent_name)
        run = {"agent": agent_name, "run_id": agent.ctx.run_id, "thread_id": self.ctx.thread_id}
        # Events reach only this user's sockets: the manager takes the user from the context.
        await self.events.broadcast_user({"type": "run.started", **run})
        await self.store.add(self.ctx.thread_id, "user", prompt)
        answer = await agent.run(prompt)
        await self.store.add(self.ctx.thread_id, "agent", answer)
        await self.events.broadcast_user({"type": "run.done", "answer": answer, **run})
        logger.info("agent %s answered user %s", agent_name, self.ctx.user_id)
        return {
            "user": self.ctx.user_id,
            "thread_id": self.ctx.thread_id,
            "run_id": agent.ctx.run_id,
            "agent": agent_name,
            "answer": answer,
            "tools": list(self.agents.tools.calls),
        }


def build_registry(
    *, telemetry: ambient.Observer | None = None, database_url: str | None = None
) -> Registry:
    """The demo's components: history in memory, or in PostgreSQL at ``database_url``."""
    registry = Registry(telemetry=telemetry)
    db: Any = None
    if database_url:
        from ambient.integrations.psycopg import SharedPool

        # Demo tables have no row-level security policies; the queries filter by the
        # settings the pool sets from the context.
        db = SharedPool(database_url, max_size=10, per_user_limit=5, timeout=10, rls_check="off")
        db.install(registry)

    async def store(user: UserRef) -> AsyncIterator[ConversationStore]:
        conversation = (
            ConversationStore(user) if db is None else PostgresConversationStore(user, db)
        )
        try:
            yield conversation
        finally:
            await conversation.aclose()

    async def tools(ctx: UserExecutionContext) -> ToolDispatcher:
        return ToolDispatcher(ctx, await ambient.resolve(ConversationStore))

    async def agents(ctx: UserExecutionContext) -> AgentInstanceFactory:
        return AgentInstanceFactory(ctx, await ambient.resolve(ToolDispatcher))

    async def engine(ctx: UserExecutionContext) -> ExecutionEngine:
        return ExecutionEngine(
            ctx,
            await ambient.resolve(AgentInstanceFactory),
            await ambient.resolve(ConversationStore),
            await ambient.resolve(UserWebSocketManager),
        )

    registry.register(ConversationStore, store, lifetime=Lifetime.USER, idle_ttl=600)
    registry.register(ToolDispatcher, tools)
    registry.register(AgentInstanceFactory, agents)
    registry.register(ExecutionEngine, engine)
    ConnectionHub().install(registry)
    return registry


async def whoami(request: Request) -> Response:
    ctx = ambient.get_current_context()
    return JSONResponse(
        {
            "user": ctx.user_id,
            "tenant": ctx.tenant_id,
            "thread_id": ctx.thread_id,
            "request_id": ctx.request_id,
        }
    )


async def run_agent(request: Request) -> Response:
    body = await _body(request)
    if body is None:
        return _problem(413, f"the body must be at most {MAX_BODY} bytes")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested deeply
        return _problem(400, 'the body must be JSON like {"prompt": "calc 1 + 2"}')
    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 4000:
        return _problem(400, "'prompt' must be a non-empty string of at most 4000 characters")
    problem = _unstorable(prompt)
    if problem:
        return _problem(400, problem)
    engine = await ambient.resolve(ExecutionEngine)
    try:
        result = await engine.run(request.path_params["agent"], prompt)
    except UnknownAgentError as exc:
        # Only that: another LookupError (a KeyError in a component) is a bug, the
        # server's 500, and its text is not the client's to read.
        return _problem(404, str(exc))
    return JSONResponse(result)


async def history(request: Request) -> Response:
    store = await ambient.resolve(ConversationStore)
    ctx = ambient.get_current_context()
    return JSONResponse({"user": ctx.user_id, "messages": await store.history()})


async def events(websocket: WebSocket) -> None:
    """The user's event stream; a text frame sent on it is a prompt for the triage agent
    (one it cannot store is answered with a ``run.refused`` event on this socket)."""
    manager = await ambient.resolve(UserWebSocketManager)
    async with manager.connect(websocket) as connection:
        ctx = ambient.get_current_context()
        await connection.send({"type": "ready", "user": ctx.user_id, "thread_id": ctx.thread_id})
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            prompt = message.get("text")
            if prompt is None:
                # receive_text() fails on a binary frame, ending the socket with an error.
                detail = "a prompt must be sent as a text frame, not a binary one"
                await connection.send({"type": "run.refused", "detail": detail})
                continue
            prompt = prompt[:4000] or "hello"
            problem = _unstorable(prompt)
            if problem:
                await connection.send({"type": "run.refused", "detail": problem})
                continue
            async with message_scope("prompt"):
                engine = await ambient.resolve(ExecutionEngine)
                await engine.run("triage", prompt)


async def index(request: Request) -> Response:
    return JSONResponse(
        {
            "service": "ambient demo agent backend",
            "routes": [
                "GET /whoami",
                "POST /agents/{triage|research}/runs",
                "GET /history",
                "WS /events",
            ],
        }
    )


async def _body(request: Request) -> bytes | None:
    """The request's body, or ``None`` once it is longer than ``MAX_BODY`` (read no further:
    a body of any length was read whole into memory before its prompt was refused)."""
    chunks: list[bytes] = []
    size = 0
    async with contextlib.aclosing(request.stream()) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > MAX_BODY:
                return None
            chunks.append(chunk)
    return b"".join(chunks)


def _unstorable(prompt: str) -> str | None:
    """Why a prompt cannot be stored and answered as text, or None when it can."""
    # JSON can carry both ("\u0000", a lone "\ud800"): PostgreSQL text refuses NUL, and
    # a lone surrogate cannot be encoded, neither in the database nor in the answer.
    if "\x00" in prompt:
        return "'prompt' must not contain NUL characters"
    try:
        prompt.encode()
    except UnicodeEncodeError:
        return "'prompt' must be valid Unicode text (no unpaired surrogates)"
    return None


def _problem(status: int, detail: str) -> Response:
    return JSONResponse(
        {
            "type": "about:blank",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
        },
        status_code=status,
        media_type="application/problem+json",
    )


def _identity() -> IdentityResolver:
    secret = os.environ.get("AMBIENT_JWT_SECRET")
    if secret:
        from ambient.middleware.identity import jwt_bearer

        return jwt_bearer(secret, algorithms=["HS256"], tenant_claim="tenant_id")
    return trusted_header("x-user-id", tenant_header="x-tenant-id")


def create_app(
    *, registry: Registry | None = None, database_url: str | None = None
) -> AmbientMiddleware:
    """The demo app: Starlette routes behind AmbientMiddleware.

    Args:
        registry: The components (default: :func:`build_registry`).
        database_url: PostgreSQL for the conversation history (default: the
            ``AMBIENT_DATABASE_URL`` environment variable; in memory when unset).
    """
    url = database_url if database_url is not None else os.environ.get("AMBIENT_DATABASE_URL")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if url:
            await create_schema(url)
        yield

    if registry is None:
        # Telemetry() finds the SDK that `ambient demo` configured from OTEL_EXPORTER_OTLP_*
        # (and costs next to nothing when there is none).
        registry = build_registry(telemetry=Telemetry(), database_url=url)
    inner = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", index),
            Route("/whoami", whoami),
            Route("/agents/{agent}/runs", run_agent, methods=["POST"]),
            Route("/history", history),
            WebSocketRoute("/events", events),
        ],
    )
    return AmbientMiddleware(
        inner,
        registry=registry,
        identity=_identity(),
        max_concurrent_per_user=50,
    )
