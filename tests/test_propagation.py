"""Signed context tokens: background jobs in another process, and calls between services."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import multiprocessing
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import ambient
from ambient import Registry, UserExecutionContext, bind_context
from ambient.errors import ContextSwitchError, IdentityError, NoActiveContextError
from ambient.integrations.fastapi import CurrentContext
from ambient.integrations.fastapi import install as install_fastapi
from ambient.integrations.propagation import (
    HEADER,
    MAX_TOKEN_LENGTH,
    SECRET_ENV,
    ContextSigner,
    InvalidTokenError,
    async_inject_hook,
    capture,
    inject,
    inject_hook,
    restore,
    signed_context,
    verify,
)
from ambient.integrations.starlette import install
from ambient.middleware import AmbientMiddleware, first_of, trusted_header
from ambient.telemetry import Telemetry
from tests.apps import Ledger
from tests.apps import build_registry as build_counted
from tests.frameworks import worker
from tests.frameworks.common import Memory, Probe, build_registry
from tests.servers import serve
from tests.test_identity import _is_valid, context_app, http_scope, served_or_refused
from tests.test_middleware import ws_scope

SECRET = "s3cret-for-tests-only-0123456789abcdef"
OTHER_SECRET = "another-secret-for-tests-0123456789abcdef"


def context(user: str = "alice", **ids: Any) -> UserExecutionContext:
    ids.setdefault("tenant_id", "acme")
    ids.setdefault("thread_id", "conversation-7")
    ids.setdefault("request_id", "request-42")
    return UserExecutionContext.create(user, **ids)


def ids(ctx: UserExecutionContext) -> tuple[object, ...]:
    """Everything a token carries."""
    return (
        ctx.user_id,
        ctx.tenant_id,
        ctx.thread_id,
        ctx.request_id,
        ctx.run_id,
        ctx.parent_run_id,
        ctx.depth,
    )


def in_the_past(seconds: float) -> ContextSigner:
    """A signer whose clock runs ``seconds`` behind: its tokens are old on arrival."""
    return ContextSigner(SECRET, clock=lambda: time.time() - seconds)


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[2]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]


def reforge(token: str, **changes: Any) -> str:
    """The token with its payload changed and the old signature kept."""
    version, kid, _, mac = token.split(".")
    claims = {**claims_of(token), **changes}
    raw = json.dumps(claims, separators=(",", ":")).encode()
    payload = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return f"{version}.{kid}.{payload}.{mac}"


class TestTokens:
    def test_a_token_carries_the_ids_and_nothing_else(self) -> None:
        """Compact; user, tenant, thread, request, run, parent and depth; no metadata."""
        ctx = context(metadata={"claims": {"email": "alice@example.com"}}).child("plan")
        token = capture(ctx, secret=SECRET, ttl=60)
        assert len(token) < 400
        assert (
            "alice@example.com" not in base64.urlsafe_b64decode(token.split(".")[2] + "==").decode()
        )
        again = verify(token, secret=SECRET)
        assert ids(again) == ids(ctx)
        assert (again.parent_run_id, again.depth, again.metadata) == (ctx.parent_run_id, 1, {})
        claims = claims_of(token)
        assert claims["exp"] - claims["iat"] in (60, 61)

    def test_every_token_captured_verifies(self) -> None:
        """Long ids in several alphabets still make a token the verifier accepts: the
        worker restores the job's context instead of refusing its own token as malformed."""
        ctx = context(
            "ü" * 256,
            tenant_id="ü" * 256,
            thread_id="会" * 256,
            request_id="会" * 256,
        )
        assert ids(verify(capture(ctx, secret=SECRET), secret=SECRET)) == ids(ctx)

    def test_a_context_too_large_for_a_token_is_refused_when_captured(self) -> None:
        """Ids too long to fit in a token are refused where the token is made, saying so,
        never turned into a token every verifier refuses as malformed."""
        ctx = context(
            "😀" * 256,
            tenant_id="😀" * 256,
            thread_id="😀" * 256,
            request_id="😀" * 256,
            run_id="😀" * 256,
        )
        with pytest.raises(ValueError, match="too long to carry in a context token"):
            capture(ctx, secret=SECRET)

    def test_capture_takes_the_bound_context(self) -> None:
        ctx = context()
        with pytest.raises(NoActiveContextError):
            capture(secret=SECRET)
        with bind_context(ctx):
            assert verify(capture(secret=SECRET), secret=SECRET) == ctx

    @pytest.mark.parametrize(
        ("token", "reason"),
        [
            ("", "malformed"),
            ("not a token", "malformed"),
            ("v2.00000000.e30.AAAA", "malformed"),
            ("v1.zz.e30." + "A" * 43, "malformed"),
            ("v1.0000000.e30." + "A" * 43, "malformed"),
            ("v1.00000000.e30." + "A" * 43, "foreign-key"),
            ("v1.00000000.é." + "A" * 43, "malformed"),
            ("v1.00000000." + "A" * 5000 + "." + "A" * 43, "malformed"),
        ],
    )
    def test_malformed_tokens_are_refused(self, token: str, reason: str) -> None:
        with pytest.raises(InvalidTokenError) as refused:
            verify(token, secret=SECRET)
        assert refused.value.reason == reason
        assert refused.value.http_status == 401
        assert token[:20] not in str(refused.value) or not token

    def test_a_token_that_is_not_text_is_malformed(self) -> None:
        """A queue that hands back bytes, or a job without its token: refused as a
        malformed token (401 where it reaches a request), not a TypeError."""
        token = capture(context(), secret=SECRET)
        for bad in (token.encode(), None, 5):
            with pytest.raises(InvalidTokenError) as refused:
                verify(bad, secret=SECRET)  # type: ignore[arg-type]
            assert refused.value.reason == "malformed"

    def test_a_tampered_token_is_refused(self) -> None:
        """Another user, a longer expiry, or a second spelling of the signature."""
        token = capture(context(), secret=SECRET)
        for forged in (
            reforge(token, u="mallory"),
            reforge(token, exp=claims_of(token)["exp"] + 86400),
            token[:-1] + ("A" if token[-1] != "A" else "B"),
        ):
            with pytest.raises(InvalidTokenError) as refused:
                verify(forged, secret=SECRET)
            assert refused.value.reason == "tampered"
            assert "does not match" in str(refused.value)

    def test_a_token_signed_with_another_key_is_refused(self) -> None:
        token = capture(context(), secret=OTHER_SECRET)
        with pytest.raises(InvalidTokenError, match="key this service does not have") as refused:
            verify(token, secret=SECRET)
        assert refused.value.reason == "foreign-key"

    def test_expired_and_future_tokens_are_refused(self) -> None:
        """Past expiry (plus the leeway) a token is refused, also when replayed."""
        expired = in_the_past(120).sign(context(), ttl=30)
        with pytest.raises(InvalidTokenError, match=r"expired (89|9\d) s ago") as refused:
            verify(expired, secret=SECRET)
        assert refused.value.reason == "expired"
        within_leeway = in_the_past(33).sign(context(), ttl=30)
        assert verify(within_leeway, secret=SECRET).user_id == "alice"
        future = ContextSigner(SECRET, clock=lambda: time.time() + 60).sign(context(), ttl=600)
        with pytest.raises(InvalidTokenError) as refused:
            verify(future, secret=SECRET)
        assert refused.value.reason == "not-yet-valid"

    def test_audiences(self) -> None:
        """A token for one audience is refused everywhere else, also where none is set."""
        billing = capture(context(), secret=SECRET, audience="billing")
        assert verify(billing, secret=SECRET, audience="billing").user_id == "alice"
        for audience in ("search", None):
            with pytest.raises(InvalidTokenError) as refused:
                verify(billing, secret=SECRET, audience=audience)
            assert refused.value.reason == "audience"
        with pytest.raises(InvalidTokenError, match="names no audience"):
            verify(capture(context(), secret=SECRET), secret=SECRET, audience="billing")

    def test_key_rotation(self) -> None:
        """Tokens of the previous key verify during rotation, and stop once it is dropped."""
        old = capture(context(), secret=OTHER_SECRET)
        rotating = ContextSigner(SECRET, previous=[OTHER_SECRET])
        assert verify(old, secret=rotating).user_id == "alice"
        assert verify(capture(context(), secret=rotating), secret=SECRET).user_id == "alice"
        with pytest.raises(InvalidTokenError):
            verify(old, secret=SECRET)

    def test_one_previous_key_may_be_given_alone(self) -> None:
        """``previous=old`` is that one key, as ``previous=[old]``: it was read as its
        characters (or bytes), each refused as a secret too short."""
        old = capture(context(), secret=OTHER_SECRET)
        for previous in (OTHER_SECRET, OTHER_SECRET.encode()):
            assert verify(old, secret=ContextSigner(SECRET, previous=previous)).user_id == "alice"

    def test_a_leeway_must_be_finite_seconds(self) -> None:
        """A leeway no expiry check can use is refused when the signer is built: ``inf``
        honoured every expired token, an int past what a float holds failed every
        verification with an OverflowError (a 500 for the request), ``nan`` refused none."""
        for leeway in (-1, math.inf, math.nan, 10**400):
            with pytest.raises(ValueError, match="leeway"):
                ContextSigner(SECRET, leeway=leeway)
        with pytest.raises(TypeError, match="leeway"):
            ContextSigner(SECRET, leeway="5")  # type: ignore[arg-type]
        assert ContextSigner(SECRET, leeway=0).leeway == 0

    def test_the_secret_comes_from_configuration(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(SECRET_ENV, raising=False)
        with pytest.raises(LookupError, match=SECRET_ENV):
            capture(context())
        monkeypatch.setenv(SECRET_ENV, SECRET)
        assert verify(capture(context()), secret=SECRET).user_id == "alice"
        with pytest.raises(ValueError, match="at least 32 bytes"):
            ContextSigner("short")
        with pytest.raises(ValueError, match="at least 32 bytes, not 31"):
            ContextSigner("s" * 31, previous=SECRET)
        with pytest.raises(ValueError, match="at least 32 bytes, not 31"):
            ContextSigner(SECRET, previous=b"s" * 31)
        ContextSigner("s" * 32)
        # a secret read from a config as a number, or none at all: said, naming its type
        for secret in (12345678901234567890123456789012, None, [SECRET]):
            kind = type(secret).__name__
            with pytest.raises(TypeError, match=f"a context secret is str or bytes, not {kind}"):
                ContextSigner(secret)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=f"a context secret is str or bytes, not {kind}"):
                ContextSigner(SECRET, previous=[SECRET, secret])  # type: ignore[list-item]
        # inf and an int past what a float holds: were OverflowErrors
        for ttl in (0, -1.0, math.nan, math.inf, 10**400):
            with pytest.raises(ValueError, match="ttl"):
                capture(context(), ttl=ttl)


def signed_claims(claims: object, secret: str = SECRET) -> str:
    """A token whose payload is ``claims`` as they are (bytes: the payload itself), signed
    with ``secret``: what only a holder of the key could make, checked all the same."""
    kid = hmac.new(secret.encode(), b"ambient context key id", hashlib.sha256).hexdigest()[:8]
    raw = (
        claims if isinstance(claims, bytes) else json.dumps(claims, separators=(",", ":")).encode()
    )
    signed = f"v1.{kid}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}"
    mac = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


IDS: dict[str, str] = {"u": "alice", "th": "thread", "r": "run", "q": "request"}


class TestLimits:
    """Where each check starts refusing, on a clock the test holds."""

    def test_a_token_verifies_from_its_signing_to_its_ttl_with_no_leeway(self) -> None:
        """Signed at a fraction of a second, a token verifies at once and until ``ttl``
        seconds later, then never: its ``iat`` is not after the instant it was signed and
        its ``exp`` not before that instant plus ``ttl``."""
        now = 1_900_000_000.5
        signer = ContextSigner(SECRET, clock=lambda: now, leeway=0)
        token = signer.sign(context(), ttl=30)
        assert signer.verify(token).user_id == "alice"
        now += 30
        assert signer.verify(token).user_id == "alice"
        now += 0.5
        assert signer.verify(token).user_id == "alice"
        now += 0.001
        with pytest.raises(InvalidTokenError) as refused:
            signer.verify(token)
        assert refused.value.reason == "expired"

    def test_a_token_from_a_clock_ahead_by_the_leeway_verifies(self) -> None:
        """The leeway covers an issuer whose clock is ahead, to the second: a token issued
        up to ``leeway`` seconds in the future verifies, one issued later does not."""
        now = 1_900_000_000.0
        verifier = ContextSigner(SECRET, clock=lambda: now, leeway=5)
        ahead = ContextSigner(SECRET, clock=lambda: now + 5).sign(context(), ttl=30)
        assert verifier.verify(ahead).user_id == "alice"
        now -= 0.5
        with pytest.raises(InvalidTokenError) as refused:
            verifier.verify(ahead)
        assert refused.value.reason == "not-yet-valid"

    def test_the_largest_context_a_token_carries_verifies(self) -> None:
        """Ids making 3,000 bytes of JSON, a payload of 4,000 characters, are the most a
        token carries: captured and verified, not refused as too long."""
        ctx = context(
            "ü" * 256,
            tenant_id="ü" * 256,
            thread_id="会" * 256,
            run_id="会" * 256,
            request_id="会" * 56 + "ü" + "r" * 199,
        )
        token = capture(ctx, secret=SECRET)
        assert len(token.split(".")[2]) == 4000
        assert ids(verify(token, secret=SECRET)) == ids(ctx)

    def test_a_second_spelling_of_the_signature_is_refused(self) -> None:
        """The last character of a signature has two bits no byte uses: a token whose
        signature differs there decodes to the same bytes, and is refused all the same
        (one token, one spelling)."""
        token = capture(context(), secret=SECRET)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        other = alphabet[alphabet.index(token[-1]) ^ 1]
        respelled = token[:-1] + other
        assert base64.urlsafe_b64decode(respelled.split(".")[3] + "=") == (
            base64.urlsafe_b64decode(token.split(".")[3] + "=")
        )
        with pytest.raises(InvalidTokenError) as refused:
            verify(respelled, secret=SECRET)
        assert refused.value.reason == "tampered"

    @pytest.mark.parametrize("extra", ["A", ".", ".AAAA", "\n"])
    def test_anything_after_the_signature_is_malformed(self, extra: str) -> None:
        """A token with something after its signature is refused as malformed (401), never
        taken for a tampered token or failing as a server error."""
        with pytest.raises(InvalidTokenError) as refused:
            verify(capture(context(), secret=SECRET) + extra, secret=SECRET)
        assert refused.value.reason == "malformed"

    @pytest.mark.parametrize(
        "claims",
        [
            b"not json",
            b"\xff",
            ["u", "alice"],
            "alice",
            {**IDS, "exp": 4_000_000_000},
            {**IDS, "iat": 1_000_000_000},
            {**IDS, "iat": True, "exp": 4_000_000_000},
            {**IDS, "iat": 1_000_000_000, "exp": 4_000_000_000.5},
        ],
    )
    def test_a_signed_payload_without_whole_second_iat_and_exp_is_malformed(
        self, claims: object
    ) -> None:
        """Not JSON, not an object, or without ``iat`` and ``exp`` as whole seconds (a bool
        is not one): refused as malformed, signature or not, never a server error."""
        with pytest.raises(InvalidTokenError) as refused:
            verify(signed_claims(claims), secret=SECRET)
        assert refused.value.reason == "malformed"

    @pytest.mark.parametrize(
        ("claims", "field"),
        [
            ({"u": ""}, "user_id: must not be empty"),
            ({"u": None}, "user_id: must be a str"),
            ({"u": " admin"}, "user_id: must not start or end with whitespace"),
            ({"th": 7}, "thread_id: must be a str"),
            ({"t": ""}, "tenant_id: must not be empty"),
            ({"d": -1}, "depth: must be between"),
            ({"d": 10**6}, "depth: must be between"),
            ({"d": True}, "depth: must be an int"),
            ({"d": None}, "depth: must be an int"),
        ],
    )
    def test_a_signed_payload_carrying_an_invalid_context_is_malformed(
        self, claims: dict[str, object], field: str
    ) -> None:
        """A token signed with the key, in time, whose ids make no valid context (an empty
        user, a depth past the limit): refused as malformed (401) naming the field, never
        a context with such ids, nor a server error; the refusal does not echo the value."""
        now = int(time.time())
        token = signed_claims({**IDS, "iat": now, "exp": now + 30, **claims})
        with pytest.raises(InvalidTokenError) as refused:
            verify(token, secret=SECRET)
        assert refused.value.reason == "malformed"
        assert f"the context token carries an invalid context: {field}" in str(refused.value)
        assert "admin" not in str(refused.value)
        # The same ids, valid, verify: only the invalid one is refused.
        assert verify(signed_claims({**IDS, "iat": now, "exp": now + 30}), secret=SECRET)

    def test_a_token_marks_an_anonymous_callers_context_and_nothing_else(self) -> None:
        """The anonymous mark is the one piece of metadata a token carries: a job restored
        from an anonymous caller's context runs as an anonymous caller's, and a signed-in
        user's context carries no mark. A mark that is not 1 is malformed."""
        anonymous = UserExecutionContext.create("anonymous:1f2e", metadata={"anonymous": True})
        token = capture(anonymous, secret=SECRET)
        assert verify(token, secret=SECRET) == anonymous
        with restore(token, secret=SECRET) as job:
            assert job.metadata == {"anonymous": True, "operation": "job"}
        signed_in = context(metadata={"anonymous": "yes", "claims": {"sub": "alice"}})
        assert "an" not in claims_of(capture(signed_in, secret=SECRET))
        assert verify(capture(signed_in, secret=SECRET), secret=SECRET).metadata == {}
        now = int(time.time())
        for mark in (True, 2, "1", 1.0, None):
            token = signed_claims({**IDS, "iat": now, "exp": now + 30, "an": mark})
            if mark is None:
                assert verify(token, secret=SECRET).metadata == {}
                continue
            with pytest.raises(InvalidTokenError, match="anonymous mark") as refused:
                verify(token, secret=SECRET)
            assert refused.value.reason == "malformed"

    def test_an_empty_secret_variable_is_no_secret(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """``AMBIENT_CONTEXT_SECRET=`` is not set, as its absence is: LookupError, naming
        the variable."""
        monkeypatch.setenv(SECRET_ENV, "")
        with pytest.raises(LookupError, match=SECRET_ENV):
            capture(context())


class TestRestore:
    async def test_restore_opens_a_scope_for_a_child_run(self) -> None:
        """The job runs as a child of the captured run, with its own components."""
        registry, ledger = build_registry()
        ctx = context()
        token = capture(ctx, secret=SECRET)
        async with restore(token, secret=SECRET, registry=registry, operation="email") as job:
            assert ambient.get_current_context() is job
            probe = await ambient.resolve(Probe)
        assert (job.user_id, job.tenant_id, job.thread_id, job.request_id) == (
            "alice",
            "acme",
            "conversation-7",
            "request-42",
        )
        assert job.parent_run_id == ctx.run_id
        assert job.run_id != ctx.run_id
        assert job.depth == 1
        assert job.metadata == {"operation": "email"}
        assert probe.closed
        assert ambient.current_context_or_none() is None
        await registry.aclose()
        assert ledger.problems() == []

    async def test_restore_without_a_registry_only_binds(self) -> None:
        token = capture(context(), secret=SECRET)
        with restore(token, secret=SECRET) as job:
            assert ambient.get_current_context() is job
            assert job.metadata == {"operation": "job"}
            with pytest.raises(NoActiveContextError, match="scope"):
                ambient.resolve_sync(Probe)
        async with restore(token, secret=SECRET) as job:
            assert ambient.get_current_context() is job
        assert ambient.current_context_or_none() is None

    async def test_a_restored_context_in_use_cannot_be_entered_again(self) -> None:
        """One restore() shared by two tasks at once (a fan-out over a job's items) is
        refused for the second with RuntimeError, as a bind_context in use is: it used to
        open a second scope over the first, which was then never closed (its components
        never cleaned, the user's entry never released). One after the other is fine."""
        registry, ledger = build_registry()
        restored = restore(capture(context(), secret=SECRET), secret=SECRET, registry=registry)
        entered = anyio.Event()
        leave = anyio.Event()

        async def first() -> None:
            async with restored:
                await ambient.resolve(Probe)
                entered.set()
                await leave.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await entered.wait()
            with pytest.raises(RuntimeError, match="already in use"):
                async with restored:
                    pass
            leave.set()
        async with restored as job:
            assert ambient.get_current_context() is job
        assert registry.stats().open_scopes == 0
        bound = restore(capture(context(), secret=SECRET), secret=SECRET)
        with bound:
            with pytest.raises(RuntimeError, match="already in use"), bound:
                pass
            assert ambient.current_context_or_none() is bound.context
        assert ambient.current_context_or_none() is None
        await registry.aclose()
        assert ledger.problems() == []

    def test_a_scope_needs_async_with(self) -> None:
        registry, _ = build_registry()
        token = capture(context(), secret=SECRET)
        with (
            pytest.raises(TypeError, match="async with"),
            restore(token, secret=SECRET, registry=registry),
        ):
            pass

    def test_a_bad_token_is_refused_before_anything_is_bound(self) -> None:
        with pytest.raises(InvalidTokenError):
            restore("v1.bad", secret=SECRET)
        assert ambient.current_context_or_none() is None

    async def test_a_restore_whose_scope_could_not_open_can_be_entered_again(self) -> None:
        """``async with restore(token, registry=...)`` refused on entry (another user's
        context is bound here) leaves the restore() free: entered again where it may
        be, it opens its scope, rather than being refused as already in use."""
        registry, ledger = build_registry()
        restored = restore(capture(context("bob"), secret=SECRET), secret=SECRET, registry=registry)
        with bind_context(context("alice")), pytest.raises(ContextSwitchError):
            async with restored:
                pytest.fail("bob's scope opened inside alice's context")
        async with restored as job:
            assert job.user_id == "bob"
            assert (await ambient.resolve(Probe)).user_id == "bob"
        assert registry.stats().open_scopes == 0
        await registry.aclose()
        assert ledger.problems() == []

    def test_restoring_another_users_context_inside_one_needs_allow_switch(self) -> None:
        """Refused on entry, a restore() is still free: entered where it may be, it binds,
        and again once it has left (it was left "in use" by the refusal, and by its own
        ``with`` too)."""
        token = capture(context("bob"), secret=SECRET)
        restored = restore(token, secret=SECRET)
        with bind_context(context("alice")):
            with pytest.raises(ContextSwitchError), restored:
                pass
            with restore(token, secret=SECRET, allow_switch=True) as job:
                assert job.user_id == "bob"
        for _ in range(2):
            with restored as job:
                assert ambient.get_current_context() is job
        assert ambient.current_context_or_none() is None

    async def test_a_scope_for_another_users_context_opens_inside_one_with_allow_switch(
        self,
    ) -> None:
        """``async with restore(token, registry=..., allow_switch=True)`` inside alice's
        context opens bob's scope, as the plain binding does."""
        registry, ledger = build_registry()
        token = capture(context("bob"), secret=SECRET)
        with bind_context(context("alice")):
            async with restore(token, secret=SECRET, registry=registry, allow_switch=True) as job:
                assert job.user_id == "bob"
                assert (await ambient.resolve(Probe)).user_id == "bob"
            assert ambient.get_current_context().user_id == "alice"
        await registry.aclose()
        assert ledger.problems() == []

    def test_a_worker_process_restores_tokens_from_a_queue(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A real multiprocessing worker: five users' jobs run as those users, with their
        components cleaned; tampered, expired and foreign-key tokens are refused."""
        monkeypatch.setenv(SECRET_ENV, SECRET)
        spawn = multiprocessing.get_context("spawn")
        jobs: Any = spawn.Queue()
        results: Any = spawn.Queue()
        captured = []
        for n in range(5):
            ctx = context(f"user-{n}", tenant_id=f"tenant-{n % 2}", request_id=f"request-{n}")
            with bind_context(ctx):
                jobs.put(capture())
            captured.append(ctx)
        jobs.put(reforge(capture(context("alice")), u="admin"))
        jobs.put(in_the_past(7200).sign(context("alice"), ttl=3600))
        jobs.put(capture(context("alice"), secret=OTHER_SECRET))
        jobs.put(None)
        process = spawn.Process(target=worker.run, args=(jobs, results))
        process.start()
        try:
            answers = [results.get(timeout=30) for _ in range(9)]
        finally:
            process.join(timeout=30)
        assert process.exitcode == 0
        for ctx, answer in zip(captured, answers[:5], strict=True):
            assert answer["user"] == answer["probe_user"] == answer["memory_user"] == ctx.user_id
            assert (answer["tenant"], answer["thread"], answer["request"]) == (
                ctx.tenant_id,
                ctx.thread_id,
                ctx.request_id,
            )
            assert answer["parent_run"] == ctx.run_id
            assert answer["run"] != ctx.run_id
            assert (answer["depth"], answer["operation"]) == (1, "send-receipt")
            assert answer["open_probes"] == 0
        assert [answer["refused"] for answer in answers[5:8]] == [
            "tampered",
            "expired",
            "foreign-key",
        ]
        assert answers[8] == {"problems": []}


class TestInject:
    def test_inject_sets_the_token_the_ids_and_the_traceparent(self) -> None:
        provider = TracerProvider()
        ctx = context()
        headers: dict[str, str] = {"X-Request-Id": "stale", "accept": "application/json"}
        with (
            bind_context(ctx),
            provider.get_tracer("test").start_as_current_span("outgoing") as span,
        ):
            inject(headers, secret=SECRET)
        assert verify(headers[HEADER], secret=SECRET) == ctx
        assert headers["x-request-id"] == "request-42"
        assert "X-Request-Id" not in headers
        assert headers["x-thread-id"] == "conversation-7"
        trace_id = format(span.get_span_context().trace_id, "032x")
        assert headers["traceparent"].split("-")[1] == trace_id
        assert headers["accept"] == "application/json"

    @pytest.mark.parametrize("stale", ["X-Thread-Id", "x-thread-id"])
    async def test_an_id_that_cannot_go_in_a_header_takes_a_stale_one_away(
        self, stale: str
    ) -> None:
        """A thread id that is not ASCII travels only in the token; a thread id header the
        headers already held (forwarded from the incoming request) named another thread,
        so the callee refused the call (401, the header contradicts the token). Spelled
        as inject() spells it or not."""
        app, _ = downstream()
        ctx = context(thread_id="café talk")
        headers = {stale: "conversation-7", "x-request-id": "request-1"}
        with bind_context(ctx):
            inject(headers, secret=SECRET, trace=False)
        response = await call_b(app, headers)
        assert response.status_code == 200, response.text
        assert "x-thread-id" not in {name.lower() for name in headers}
        assert (response.json()["thread"], response.json()["request"]) == (
            "café talk",
            "request-42",
        )

    async def test_tokens_live_for_the_ttl_they_are_made_with(self) -> None:
        """capture() makes tokens for an hour by default (a job may wait in its queue),
        inject() and the hooks for the ``ttl`` they are given."""

        def lifetime(token: str) -> int:
            claims = claims_of(token)
            return int(claims["exp"] - claims["iat"])

        hook = inject_hook(hosts="billing.internal", secret=SECRET, ttl=90)
        async_hook = async_inject_hook(hosts="billing.internal", secret=SECRET, ttl=45)
        requests = [httpx.Request("GET", "https://billing.internal/") for _ in range(2)]
        with bind_context(context()):
            assert lifetime(capture(secret=SECRET)) in (3600, 3601)
            assert lifetime(capture(secret=SECRET, ttl=60)) in (60, 61)
            assert lifetime(inject({}, secret=SECRET, ttl=120)[HEADER]) in (120, 121)
            hook(requests[0])
            await async_hook(requests[1])
        assert lifetime(requests[0].headers[HEADER]) in (90, 91)
        assert lifetime(requests[1].headers[HEADER]) in (45, 46)

    def test_inject_outside_a_context_is_an_error(self) -> None:
        with pytest.raises(NoActiveContextError):
            inject({}, secret=SECRET)

    async def test_the_hook_adds_the_context_only_for_allowed_hosts(self) -> None:
        """The token is a credential: a shared client never sends it to other hosts, and
        a request outside any context goes out unchanged."""
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(204)

        hook = async_inject_hook(
            hosts=["billing.internal", "127.0.0.1:8001", "[::1]:9"], secret=SECRET
        )
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(record), event_hooks={"request": [hook]}
        ) as client:
            await client.get("http://billing.internal/")
            with bind_context(context()):
                for url in (
                    "http://billing.internal:8080/x",
                    "http://127.0.0.1:8001/",
                    "http://[::1]:9/",
                    "http://127.0.0.1:8002/",
                    "https://api.example.com/",
                ):
                    await client.get(url)
        sent = [HEADER in request.headers for request in seen]
        assert sent == [False, True, True, True, False, False]

    async def test_a_token_the_app_set_itself_never_goes_to_another_host(self) -> None:
        """Headers forwarded from the incoming request carry the caller's token: on a request
        to a host the hook does not serve, the hook takes it off (whatever its case), while
        the app's other headers go out as they are; to an allowed host it is replaced."""
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(204)

        forwarded = ContextSigner(SECRET).sign(context(), ttl=30)
        hook = async_inject_hook(hosts=["billing.internal"], secret=SECRET)
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(record), event_hooks={"request": [hook]}
        ) as client:
            with bind_context(context("bob")):
                for name in (HEADER, HEADER.upper()):
                    await client.get(
                        "https://api.example.com/", headers={name: forwarded, "x-app": "mine"}
                    )
                await client.get("http://billing.internal/", headers={HEADER: forwarded})
        third_party, third_party_upper, billing = seen
        for request in (third_party, third_party_upper):
            assert HEADER not in request.headers
            assert request.headers["x-app"] == "mine"
        assert verify(billing.headers[HEADER], secret=SECRET).user_id == "bob"

    def test_the_sync_hook(self) -> None:
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(204)

        hook = inject_hook(hosts="billing.internal", secret=SECRET)
        with (
            httpx.Client(
                transport=httpx.MockTransport(record), event_hooks={"request": [hook]}
            ) as client,
            bind_context(context()),
        ):
            client.get("https://billing.internal/")
        assert verify(seen[0].headers[HEADER], secret=SECRET).user_id == "alice"

    def test_hosts_must_be_named(self) -> None:
        with pytest.raises(ValueError, match="at least one host"):
            inject_hook(hosts=[], secret=SECRET)
        for entry in ("billing:http", "billing:\u0668\u0660\u0668\u0661"):
            with pytest.raises(ValueError, match="port"):
                inject_hook(hosts=[entry], secret=SECRET)
        # a typo matching no host the hook could ever see: said rather than kept
        for entry in ("[::1", "[::1]8001", "[]:8001", ":8001"):
            with pytest.raises(ValueError, match="host") as refused:
                inject_hook(hosts=[entry], secret=SECRET)
            assert repr(entry) in str(refused.value)
        # an empty entry (a trailing comma in a config list) or one that is no text: said
        # when the hook is built, never a hook matching no host or every host
        for entry in ("", None, 8001, b"billing.internal"):
            with pytest.raises(ValueError, match="a host is a non-empty str like") as refused:
                inject_hook(hosts=["billing.internal", entry], secret=SECRET)  # type: ignore[list-item]
            assert repr(entry) in str(refused.value)

    @pytest.mark.parametrize("ttl", [0, -1, math.inf, math.nan, 10**400, "30", None, True])
    def test_a_ttl_no_token_can_have_is_refused_when_the_hook_is_built(self, ttl: Any) -> None:
        """A hook given a ttl no token can be signed with built, and every request to its
        hosts then failed inside httpx's send, the application's requests erroring one by
        one: it is said when the hook is built, as a bad host or header is, and capture()
        refuses it alike (a bool is no number of seconds, not 1 s)."""
        error = TypeError if isinstance(ttl, str | bool) or ttl is None else ValueError
        for make in (inject_hook, async_inject_hook):
            with pytest.raises(error, match="ttl must be"):
                make(hosts="billing.internal", secret=SECRET, ttl=ttl)
        with pytest.raises(error, match="ttl must be"):
            capture(context(), secret=SECRET, ttl=ttl)

    @pytest.mark.parametrize("header", ["", "x context", "x-context:", "x-c\r\nx-user-id"])
    def test_a_header_name_no_request_can_carry_is_refused(self, header: str) -> None:
        """httpx would refuse every request the hook touched (or the callee would find no
        token in any): said when the hook is built."""
        with pytest.raises(ValueError, match="header must be a non-empty HTTP token"):
            inject_hook(hosts=["billing.internal"], secret=SECRET, header=header)


INJECTED = (HEADER, "x-request-id", "x-thread-id", "traceparent", "baggage")
"""The headers the hook sets when the app traces and puts ids into baggage."""


class Hops:
    """Hosts served in process, through httpx's own redirect handling: each request is
    noted (host and headers); a path in ``redirects`` is answered 307 to the URL given."""

    def __init__(self, **redirects: str) -> None:
        self.redirects = redirects
        self.received: list[tuple[str, httpx.Headers]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.received.append((request.url.host, request.headers))
        location = self.redirects.get(request.url.path.strip("/"))
        if location is not None:
            return httpx.Response(307, headers={"location": location})
        return httpx.Response(200, text=request.url.host)


@pytest.fixture(name="traced")
async def fixture_traced() -> AsyncIterator[Registry]:
    """A registry whose scopes are traced and put the raw user id and the tenant id into
    baggage: the hook then sets a ``traceparent``, and a ``baggage`` naming the user."""
    registry = Registry(
        telemetry=Telemetry(
            tracer_provider=TracerProvider(),
            span_threshold=0,
            user_id="raw",
            baggage=("user_id", "tenant_id"),
        )
    )
    yield registry
    await registry.aclose()


def hook_for(*hosts: str, **options: Any) -> dict[str, Any]:
    """The arguments of an inject hook for ``hosts``."""
    return {"hosts": hosts, "secret": SECRET, **options}


async def follow(
    sync: bool,
    hops: Hops,
    url: str,
    *hooks: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """GET ``url``, following redirects, with a sync client (in a worker thread, which
    sees this context) or an async one, and their hooks."""
    transport = httpx.MockTransport(hops)
    if sync:

        def sync_get() -> httpx.Response:
            with httpx.Client(
                transport=transport,
                follow_redirects=True,
                event_hooks={"request": [inject_hook(**options) for options in hooks]},
            ) as client:
                return client.get(url, headers=headers)

        return await anyio.to_thread.run_sync(sync_get)
    async with httpx.AsyncClient(
        transport=transport,
        follow_redirects=True,
        event_hooks={"request": [async_inject_hook(**options) for options in hooks]},
    ) as client:
        return await client.get(url, headers=headers)


def injected(headers: httpx.Headers) -> list[str]:
    return [name for name in INJECTED if name in headers]


@pytest.mark.parametrize("sync", [False, True], ids=["async-hook", "sync-hook"])
class TestRedirects:
    async def test_a_redirect_elsewhere_carries_nothing_the_hook_set(
        self, sync: bool, traced: Registry
    ) -> None:
        """An allowed service redirects to a host outside ``hosts``: httpx builds the next
        request from the last one's headers, so the request and thread ids, the
        traceparent and the baggage (here the user's and the tenant's ids) reached the
        third party; only the token was taken off. The hook now takes off all it set; the
        application's other headers follow the redirect, as httpx has them do."""
        hops = Hops(pay="https://api.example.com/next")
        async with traced.open_scope(context()):
            answer = await follow(
                sync,
                hops,
                "http://billing.internal/pay",
                hook_for("billing.internal"),
                headers={"x-client": "mobile"},
            )
        assert answer.text == "api.example.com"
        assert [host for host, _ in hops.received] == ["billing.internal", "api.example.com"]
        [(_, billing), (_, third_party)] = hops.received
        assert injected(billing) == list(INJECTED)
        assert "ambient.user_id=alice" in billing["baggage"]
        assert injected(third_party) == []
        assert third_party["x-client"] == "mobile"

    async def test_the_applications_own_headers_to_another_host_stay(
        self, sync: bool, traced: Registry
    ) -> None:
        """A request the application sends straight to a host outside ``hosts`` keeps the
        ids and trace headers it set itself, even the context's own (a request id given
        to a payment API to match its logs): they are the application's business."""
        hops = Hops()
        ctx = context()
        own = {
            "x-request-id": ctx.request_id,
            "x-thread-id": ctx.thread_id,
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "baggage": "order=17",
        }
        async with traced.open_scope(ctx):
            await follow(
                sync, hops, "https://api.example.com/", hook_for("billing.internal"), headers=own
            )
        [(_, received)] = hops.received
        assert {name: received.get(name) for name in own} == own

    async def test_a_redirect_between_allowed_hosts_carries_the_context(
        self, sync: bool, traced: Registry
    ) -> None:
        """From one allowed host to another the hook sets the context again."""
        hops = Hops(pay="http://ledger.internal/entries")
        ctx = context()
        async with traced.open_scope(ctx):
            await follow(
                sync,
                hops,
                "http://billing.internal/pay",
                hook_for("billing.internal", "ledger.internal"),
            )
        [_, (host, ledger)] = hops.received
        assert host == "ledger.internal"
        assert injected(ledger) == list(INJECTED)
        assert verify(ledger[HEADER], secret=SECRET) == ctx
        assert (ledger["x-request-id"], ledger["x-thread-id"]) == ("request-42", "conversation-7")
        assert "ambient.user_id=alice" in ledger["baggage"]

    async def test_a_redirect_back_to_an_allowed_host_carries_the_context_again(
        self, sync: bool, traced: Registry
    ) -> None:
        """Allowed, allowed, elsewhere, allowed again: the third party gets nothing the
        hook set at either allowed host before it, and the host after it gets it all."""
        hops = Hops(
            a="http://ledger.internal/b",
            b="https://api.example.com/c",
            c="http://billing.internal:8080/d",
        )
        ctx = context()
        async with traced.open_scope(ctx):
            answer = await follow(
                sync,
                hops,
                "http://billing.internal/a",
                hook_for("billing.internal", "ledger.internal"),
            )
        assert answer.text == "billing.internal"
        assert [(host, injected(headers)) for host, headers in hops.received] == [
            ("billing.internal", list(INJECTED)),
            ("ledger.internal", list(INJECTED)),
            ("api.example.com", []),
            ("billing.internal", list(INJECTED)),
        ]
        assert verify(hops.received[-1][1][HEADER], secret=SECRET) == ctx

    async def test_a_hook_leaves_what_another_hook_set_for_its_own_host(
        self, sync: bool, traced: Registry
    ) -> None:
        """Two hooks, for two services, with tokens under two headers: on a redirect from
        the first service to the second, the first hook takes off its token, and leaves
        the ids and trace headers the second one set on that request (whichever runs
        first), though they hold the same values it had set."""
        for order in (1, -1):
            hops = Hops(pay="http://search.internal/find")
            hooks = [
                hook_for("billing.internal"),
                hook_for("search.internal", header="x-search-context"),
            ]
            async with traced.open_scope(context()):
                await follow(sync, hops, "http://billing.internal/pay", *hooks[::order])
            [_, (host, search)] = hops.received
            assert host == "search.internal"
            assert HEADER not in search
            assert "x-search-context" in search
            assert injected(search) == list(INJECTED[1:]), order

    @pytest.mark.parametrize("header", [HEADER, "X-Ambient-Context"])
    async def test_hooks_sharing_the_token_header_leave_each_others_token(
        self, sync: bool, traced: Registry, header: str
    ) -> None:
        """Two hooks on one client, one per service, each signing for its own audience
        under the same header: a hook took the header off every request to a host outside
        its list, so whichever hook ran second took off the token the first had just set
        for its own host, and that service got no token (401) on a direct request as on a
        redirect. Each service now gets the token signed for it, whatever the hooks'
        order, and whatever the case the header is spelled in."""
        for order in (1, -1):
            hooks = [
                hook_for("billing.internal", audience="billing", header=header),
                hook_for("search.internal", audience="search", header=header),
            ][::order]
            hops = Hops(pay="http://search.internal/find")
            async with traced.open_scope(context()):
                await follow(sync, hops, "http://billing.internal/pay", *hooks)
                await follow(sync, hops, "http://search.internal/find", *hooks)
            tokens = [(host, headers.get(HEADER)) for host, headers in hops.received]
            assert [host for host, _ in tokens] == [
                "billing.internal",
                "search.internal",
                "search.internal",
            ], order
            for host, token in tokens:
                assert token is not None, (order, host)
                verify(token, secret=SECRET, audience=host.split(".")[0])


def downstream(
    secret: str = SECRET, *, provider: TracerProvider | None = None, **options: Any
) -> tuple[Any, Registry]:
    """Service B: trusts only signed contexts; answers what its context holds."""
    registry, _ = build_registry()

    async def whoami(request: Request) -> Response:
        ctx = ambient.get_current_context()
        probe = await ambient.resolve(Probe)
        return JSONResponse(
            {
                "user": ctx.user_id,
                "tenant": ctx.tenant_id,
                "thread": ctx.thread_id,
                "request": ctx.request_id,
                "run": ctx.run_id,
                "parent_run": ctx.parent_run_id,
                "depth": ctx.depth,
                "probe_user": probe.user_id,
            }
        )

    app = Starlette(routes=[Route("/whoami", whoami)])
    telemetry = None if provider is None else Telemetry(tracer_provider=provider, span_threshold=0)
    install(app, registry=registry, identity=signed_context(secret, **options), telemetry=telemetry)
    if provider is None:
        return app, registry
    return OpenTelemetryMiddleware(
        app, tracer_provider=provider, exclude_spans=["receive", "send"]
    ), registry


def signed_headers(
    ctx: UserExecutionContext, signer: ContextSigner | str = SECRET
) -> dict[str, str]:
    with bind_context(ctx):
        return dict(inject({}, secret=signer, trace=False))


async def call_b(
    app: Any, headers: dict[str, str], peer: str = "127.0.0.1", port: int = 40000
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(peer, port))
    async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
        return await client.get("/whoami", headers=headers)


class TestSignedContext:
    async def test_the_callee_continues_the_callers_context(self) -> None:
        app, _ = downstream()
        ctx = context()
        response = await call_b(app, signed_headers(ctx))
        body = response.json()
        assert (body["user"], body["tenant"], body["thread"], body["request"]) == (
            "alice",
            "acme",
            "conversation-7",
            "request-42",
        )
        assert (body["parent_run"], body["depth"]) == (ctx.run_id, 1)
        assert body["run"] != ctx.run_id
        assert body["probe_user"] == "alice"

    async def test_an_anonymous_callers_context_reaches_the_callee_as_an_anonymous_one(
        self,
    ) -> None:
        """Service A admits anonymous callers and calls B with the context: B's context is
        an anonymous caller's too, and B issues no websocket ticket for it (its user is the
        one request's). The token carried only ids, and B took the anonymous user for a
        signed-in one: it issued the ticket, which opened a socket as that user."""
        from ambient.middleware import AmbientMiddleware, WebSocketTickets

        tickets = WebSocketTickets()

        async def issue(request: Request) -> Response:
            ctx = ambient.get_current_context()
            try:
                await tickets.issue()
            except IdentityError as refused:
                return JSONResponse({"anonymous": ctx.metadata.get("anonymous")}, refused.status)
            return JSONResponse({"anonymous": ctx.metadata.get("anonymous")})

        service_b = Starlette(routes=[Route("/ticket", issue)])
        install(service_b, registry=Registry(), identity=signed_context(SECRET))

        async def call(request: Request) -> Response:
            transport = httpx.ASGITransport(app=service_b, client=("127.0.0.1", 1))
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                answer = await client.get("/ticket", headers=inject({}, secret=SECRET))
            return JSONResponse(answer.json(), answer.status_code)

        service_a = AmbientMiddleware(
            Starlette(routes=[Route("/call", call)]),
            registry=Registry(),
            identity=lambda scope: None,
            anonymous=True,
        )
        transport = httpx.ASGITransport(app=service_a)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            answer = await client.get("/call")
        assert (answer.status_code, answer.json()) == (401, {"anonymous": True})
        assert len(tickets.store) == 0  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("case", "fragment"),
        [
            ("tampered", "does not match its content"),
            ("expired", "expired"),
            ("foreign key", "key this service does not have"),
            ("untrusted peer", "only from trusted services"),
            # a server's proxy-header handling made a forwarded address the client
            ("peer from proxy headers", "only from trusted services"),
            ("repeated header", "sent 2 times"),
            # the same id twice: was 401 "does not match" (the middleware's own answer: 400)
            ("repeated thread id", "x-thread-id header was sent 2 times"),
            ("repeated request id", "x-request-id header was sent 2 times"),
            ("other thread id", "x-thread-id header does not match"),
            ("garbage", "malformed"),
        ],
    )
    async def test_refusals_are_401_or_400_and_reach_no_handler(
        self, case: str, fragment: str
    ) -> None:
        """A token that fails a check is 401; a header sent twice (the token, the request
        or thread id) is malformed: 400."""
        app, registry = downstream()
        ctx = context()
        headers: Any = signed_headers(ctx)
        peer, port = "127.0.0.1", 40000
        if case == "tampered":
            headers[HEADER] = reforge(headers[HEADER], u="admin")
        elif case == "expired":
            headers = signed_headers(ctx, in_the_past(300))
        elif case == "foreign key":
            headers = signed_headers(ctx, OTHER_SECRET)
        elif case == "untrusted peer":
            peer = "203.0.113.9"
        elif case == "peer from proxy headers":
            headers["x-forwarded-for"] = "127.0.0.1"
            port = 0
        elif case.startswith("repeated"):
            name = {"header": HEADER, "thread id": "x-thread-id", "request id": "x-request-id"}
            repeated = name[case.removeprefix("repeated ")]
            headers = [*headers.items(), (repeated, headers[repeated])]
        elif case == "other thread id":
            headers["x-thread-id"] = "someone-elses-thread"
        else:
            headers[HEADER] = "v1.garbage"
        response = await call_b(app, headers, peer, port)
        assert response.status_code == (400 if case.startswith("repeated") else 401), response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert fragment in response.json()["detail"]
        assert registry.stats().created == 0

    async def test_trusted_networks_and_audience(self) -> None:
        app, _ = downstream(trusted=("10.0.0.0/8",), audience="billing")
        with bind_context(context()):
            headers = dict(inject({}, secret=SECRET, audience="billing", trace=False))
            wrong = dict(inject({}, secret=SECRET, audience="search", trace=False))
        assert (await call_b(app, headers, "10.1.2.3")).status_code == 200
        assert (await call_b(app, headers, "127.0.0.1")).status_code == 401
        assert (await call_b(app, wrong, "10.1.2.3")).status_code == 401
        # Every network given is trusted, and by default both loopbacks.
        app, _ = downstream(trusted=("10.0.0.0/8", "192.168.0.0/16"), audience="billing")
        assert (await call_b(app, headers, "192.168.1.2")).status_code == 200
        app, _ = downstream()
        with bind_context(context()):
            plain = dict(inject({}, secret=SECRET, trace=False))
        for loopback in ("127.0.0.1", "::1"):
            assert (await call_b(app, plain, loopback)).status_code == 200, loopback

    @pytest.mark.parametrize(
        ("option", "name", "field"),
        [
            ("request_id_header", "x-request-id", "request"),
            ("thread_id_header", "x-thread-id", "thread"),
        ],
    )
    async def test_an_id_header_set_to_none_is_neither_sent_nor_checked(
        self, option: str, name: str, field: str
    ) -> None:
        """``inject(..., request_id_header=None)`` sets no request id header and leaves one
        the headers held as it was (the other id header is still set); a callee built with
        the same option does not compare that header with the token, and takes the id from
        the token. A callee checking it refuses the same call (401)."""
        ctx = context()
        with bind_context(ctx):
            headers = inject({name: "someone-elses"}, secret=SECRET, trace=False, **{option: None})
        other = "x-thread-id" if name == "x-request-id" else "x-request-id"
        assert sorted(headers) == sorted([HEADER, name, other])
        assert headers[name] == "someone-elses"
        assert (
            headers[other] == {"x-thread-id": "conversation-7", "x-request-id": "request-42"}[other]
        )
        app, _ = downstream(**{option: None})
        response = await call_b(app, headers)
        assert response.status_code == 200, response.text
        assert (
            response.json()[field] == {"request": "request-42", "thread": "conversation-7"}[field]
        )
        assert response.json()["user"] == "alice"
        checking, _ = downstream()
        refused = await call_b(checking, headers)
        assert refused.status_code == 401
        assert f"the {name} header does not match" in refused.json()["detail"]

    def test_a_service_on_the_unix_socket_is_trusted_only_when_named(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A caller reaching this service through its Unix socket has no address: refused
        (and the log names the "unix" entry, once) unless trusted says "unix"."""
        headers = [(k.encode(), v.encode()) for k, v in signed_headers(context()).items()]
        scope = {"type": "http", "headers": headers, "client": None, "server": None}
        identity = signed_context(SECRET, trusted=("unix",))(scope)
        assert identity is not None
        assert (identity.user_id, identity.tenant_id) == ("alice", "acme")
        refuse = signed_context(SECRET)
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            for _ in range(3):
                with pytest.raises(InvalidTokenError, match="only from trusted services"):
                    refuse(scope)
        assert ["'unix'" in r.getMessage() for r in caplog.records] == [True]

    async def test_the_identity_expires_when_the_token_is_no_longer_honoured(self) -> None:
        """A websocket opened with a signed context is closed when its token would be
        refused: at its ``exp`` plus the verifier's leeway, as the check allows, not
        sooner."""
        now = 1_900_000_000.25
        signer = ContextSigner(SECRET, clock=lambda: now, leeway=7)
        token = signer.sign(context(), ttl=30)
        headers = [(HEADER.encode(), token.encode())]
        scope = {"type": "websocket", "headers": headers, "client": ("127.0.0.1", 1)}
        identity = signed_context(signer)(scope)
        assert identity is not None
        assert identity.expires_at == claims_of(token)["exp"] + 7
        now = claims_of(token)["exp"] + 7
        assert signer.verify(token).user_id == "alice"
        now += 1
        with pytest.raises(InvalidTokenError, match="expired"):
            signer.verify(token)

    async def test_without_the_header_other_resolvers_decide(self) -> None:
        """signed_context answers None without its header, so first_of falls through."""
        resolve = first_of(signed_context(SECRET), trusted_header())
        scope = {"type": "http", "headers": [(b"x-user-id", b"carol")], "client": ("127.0.0.1", 1)}
        identity = await resolve(scope)  # type: ignore[misc]
        assert identity is not None
        assert identity.user_id == "carol"  # type: ignore[union-attr]
        assert signed_context(SECRET)(scope) is None

    @pytest.mark.parametrize("first", ["identity", "propagation"])
    def test_the_resolver_is_found_with_the_other_built_in_resolvers(self, first: str) -> None:
        """``ambient.middleware.identity.signed_context`` is the propagation module's
        resolver, whichever of the two modules a fresh interpreter imports first (they
        import each other), and it resolves a signed context."""
        token = ContextSigner(SECRET).sign(context("dave"), ttl=30)
        code = f"""
import ambient.middleware.identity as identity
import ambient.integrations.propagation as propagation
from ambient.middleware.identity import *
resolver = signed_context({SECRET!r})
headers = [({HEADER!r}.encode(), {token!r}.encode())]
found = resolver({{"type": "http", "client": ("127.0.0.1", 1), "headers": headers}})
print(identity.signed_context is propagation.signed_context, found.user_id, found.tenant_id)
"""
        if first == "propagation":
            code = "import ambient.integrations.propagation\n" + code
        done = subprocess.run(  # noqa: S603 - this interpreter, our own code
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["True", "dave", "acme"]
        with pytest.raises(AttributeError, match="no attribute 'signed_contexts'"):
            import ambient.middleware.identity as identity_module

            identity_module.signed_contexts  # noqa: B018 - the attribute error is the point

    def test_the_secret_is_checked_when_the_resolver_is_built(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv(SECRET_ENV, raising=False)
        with pytest.raises(LookupError):
            signed_context()
        with pytest.raises(ValueError, match="CIDR"):
            signed_context(SECRET, trusted=("not-a-network",))
        assert issubclass(InvalidTokenError, IdentityError)

    @pytest.mark.parametrize("option", ["header", "request_id_header", "thread_id_header"])
    @pytest.mark.parametrize("name", ["", "x context", "x-id:", "x-i\r\nx-user-id"])
    def test_a_header_name_no_request_can_carry_is_refused_when_the_resolver_is_built(
        self, option: str, name: str
    ) -> None:
        """A token header so named is in no request: every caller would be answered as if
        it sent no context; an id header so named would never be compared with the token.
        Refused at start-up, naming the option; ``None`` still turns an id check off."""
        with pytest.raises(ValueError, match=f"{option} must be a non-empty HTTP token"):
            signed_context(SECRET, **{option: name})
        if option != "header":
            assert callable(signed_context(SECRET, **{option: None}))


any_id = st.one_of(
    st.text(min_size=1, max_size=40),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=256),
).filter(_is_valid)
carriers = st.sampled_from(
    [
        "intact",
        "header name in capitals",
        "one character changed",
        "truncated",
        "padded",
        "standard base64",
        "spaces around it",
        "a latin-1 byte after it",
        "twice",
        "oversize",
        "expired",
        "issued in the future",
        "another key",
        "another thread id",
        "the request id twice",
    ]
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    user=any_id,
    tenant=st.none() | any_id,
    thread=any_id,
    request=any_id,
    carrier=carriers,
    where=st.integers(min_value=0),
    websocket=st.booleans(),
)
def test_a_signed_context_is_continued_exactly_when_its_carrier_arrives_intact(
    backend: str,
    user: str,
    tenant: str | None,
    thread: str,
    request: str,
    carrier: str,
    where: int,
    websocket: bool,
) -> None:
    """A context with any valid ids, injected, then its carrier sent as it was, or changed
    on the way (a character, cut short, re-encoded, padded, repeated, oversize, out of its
    time, signed with another key, beside a contradicting id header): the callee's request
    continues the caller's context with the same ids exactly when the carrier arrived
    intact and in time; else it is refused (400 or 401, a websocket 1008) without
    reaching the app, saying neither the token nor the secret."""
    signer = {
        "expired": in_the_past(300),
        "issued in the future": ContextSigner(SECRET, clock=lambda: time.time() + 300),
        "another key": ContextSigner(OTHER_SECRET),
    }.get(carrier, ContextSigner(SECRET))
    ctx = UserExecutionContext.create(user, tenant_id=tenant, thread_id=thread, request_id=request)
    headers = signed_headers(ctx, signer)
    token = headers.pop(HEADER)
    sent = token.encode()
    if carrier == "one character changed":
        at = where % len(token)
        sent = (token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1 :]).encode()
    elif carrier == "truncated":
        sent = token[: where % len(token)].encode()
    elif carrier == "padded":
        sent += b"="
    elif carrier == "standard base64":
        sent = token.replace("-", "+").replace("_", "/").encode()
    elif carrier == "spaces around it":
        sent = b" " + sent + b" "
    elif carrier == "a latin-1 byte after it":
        sent += b"\xe9"
    elif carrier == "oversize":
        sent += b"A" * MAX_TOKEN_LENGTH
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    name = b"X-Ambient-Context" if carrier == "header name in capitals" else HEADER.encode()
    raw += [(name, sent)] * (2 if carrier == "twice" else 1)
    if carrier == "another thread id":
        raw = [(k, v) for k, v in raw if k != b"x-thread-id"] + [(b"x-thread-id", b"other")]
    elif carrier == "the request id twice":
        raw += [(b"x-request-id", request.encode())]
    ledger = Ledger()
    middleware = AmbientMiddleware(
        context_app, registry=build_counted(ledger), identity=signed_context(SECRET)
    )
    scope = (ws_scope if websocket else http_scope)(raw)
    seen, _, status, said = served_or_refused(middleware, ledger, scope, backend)
    assert SECRET not in said
    assert token.rpartition(".")[2] not in said
    intact = (
        carrier in ("intact", "header name in capitals")
        or (carrier == "standard base64" and sent == token.encode())
        or (carrier == "another thread id" and thread == "other")
        # The request id travels in the token alone when it is not ASCII.
        or (carrier == "the request id twice" and not request.isascii())
    )
    assert (seen is not None) == intact, carrier
    if seen is None:
        # A header sent twice is malformed; anything else about a carrier is unauthorized.
        malformed = carrier in ("twice", "the request id twice")
        assert status == (1008 if websocket else 400 if malformed else 401), carrier
    else:
        assert (seen["user"], seen["tenant"], seen["thread_id"], seen["request_id"]) == (
            user,
            tenant,
            thread,
            request,
        )
        assert (seen["parent_run_id"], seen["depth"]) == (ctx.run_id, 1)


class Spans:
    """Every span ended in this test's tracer provider."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def finished(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()


@pytest.fixture(name="spans")
def fixture_spans() -> Iterator[Spans]:
    spans = Spans()
    yield spans
    spans.provider.shutdown()


def _wait_for(condition: Any) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("spans never arrived")
        time.sleep(0.005)


class _Recorder:
    """A service that notes the headers of each request and answers ``answer``."""

    def __init__(self, answer: Response) -> None:
        self.answer = answer
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await self.answer(scope, receive, send)


async def test_a_redirect_to_another_host_does_not_carry_the_token() -> None:
    """An allowed service answers with a redirect to a host outside ``hosts`` (a third
    party, a compromised service's doing): the client follows it, and the token, a
    credential, does not, nor the ids the hook set: httpx keeps every header but
    Authorization across origins, so the hook takes them off. Both over loopback, with
    the async and the sync hook."""
    elsewhere = _Recorder(Response("elsewhere"))
    with serve("uvicorn", elsewhere) as other_url:
        allowed = _Recorder(Response(status_code=302, headers={"location": f"{other_url}/x"}))
        with serve("uvicorn", allowed) as allowed_url:
            hosts = [allowed_url.removeprefix("http://")]
            async with httpx.AsyncClient(
                follow_redirects=True,
                event_hooks={"request": [async_inject_hook(hosts=hosts, secret=SECRET)]},
            ) as client:
                with bind_context(context()):
                    answer = await client.get(f"{allowed_url}/start")

            def sync_call() -> httpx.Response:
                hook = inject_hook(hosts=hosts, secret=SECRET)
                with (
                    httpx.Client(follow_redirects=True, event_hooks={"request": [hook]}) as sync,
                    bind_context(context()),
                ):
                    return sync.get(f"{allowed_url}/start")

            sync_answer = await anyio.to_thread.run_sync(sync_call)
    assert (answer.text, sync_answer.text) == ("elsewhere", "elsewhere")
    assert [HEADER in headers for headers in allowed.headers] == [True, True]
    assert [HEADER in headers for headers in elsewhere.headers] == [False, False]
    for headers in elsewhere.headers:
        assert ("x-request-id" in headers, "x-thread-id" in headers) == (False, False)


async def test_a_thread_id_that_is_not_ascii_reaches_the_callee_in_the_token() -> None:
    """The middleware accepts any text as a thread id (``x-thread-id: café``, UTF-8); httpx
    encodes its headers as ASCII, so putting it in a header failed every call made through
    the hook (UnicodeEncodeError, a 500 for the caller). The token carries it: the callee
    continues the caller's thread either way."""
    b_app, _ = downstream()
    with serve("uvicorn", b_app) as b_url:
        hook = async_inject_hook(hosts=[b_url.removeprefix("http://")], secret=SECRET)
        answers = {}
        async with httpx.AsyncClient(event_hooks={"request": [hook]}) as client:
            for thread in ("plain-thread", "café ☕ talk"):
                with bind_context(context(thread_id=thread, request_id="r-1")):
                    response = await client.get(f"{b_url}/whoami")
                assert response.status_code == 200, response.text
                answers[thread] = (response.json()["thread"], response.json()["request"])
    assert answers == {thread: (thread, "r-1") for thread in ("plain-thread", "café ☕ talk")}


async def test_two_services_one_user_one_trace(spans: Spans) -> None:
    """Service A calls service B with httpx over loopback (both real uvicorn servers, both
    behind opentelemetry-instrumentation-asgi, both with ambient's Telemetry): for 20
    users at once B sees A's user, tenant, thread and request, its run is a child of A's,
    and every call is one trace across both services. A replayed expired token and a
    tampered one are refused by B over the wire."""
    b_app, b_registry = downstream(provider=spans.provider)
    with serve("uvicorn", b_app) as b_url:
        a_registry, _ = build_registry()
        a = FastAPI()
        install_fastapi(
            a,
            registry=a_registry,
            identity=trusted_header(tenant_header="x-tenant-id"),
            telemetry=Telemetry(tracer_provider=spans.provider, span_threshold=0),
        )
        hook = async_inject_hook(hosts=[b_url.removeprefix("http://")], secret=SECRET)

        @a.get("/call")
        async def call(ctx: CurrentContext) -> dict[str, Any]:
            await ambient.resolve(Memory)
            async with httpx.AsyncClient(event_hooks={"request": [hook]}) as client:
                answer = await client.get(f"{b_url}/whoami")
            trace_id = trace.get_current_span().get_span_context().trace_id
            return {
                "a": {"user": ctx.user_id, "run": ctx.run_id, "trace": format(trace_id, "032x")},
                "b": answer.json(),
            }

        a_app = OpenTelemetryMiddleware(
            a, tracer_provider=spans.provider, exclude_spans=["receive", "send"]
        )
        with serve("uvicorn", a_app) as a_url:
            answers: dict[str, Any] = {}

            async def one(client: httpx.AsyncClient, n: int) -> None:
                headers = {
                    "x-user-id": f"user-{n}",
                    "x-tenant-id": f"tenant-{n % 3}",
                    "x-thread-id": f"thread-{n}",
                    "x-request-id": f"request-{n}",
                }
                response = await client.get(f"{a_url}/call", headers=headers)
                assert response.status_code == 200, response.text
                answers[f"user-{n}"] = (headers, response.json())

            async with httpx.AsyncClient(timeout=30) as client:
                async with anyio.create_task_group() as tg:
                    for n in range(20):
                        tg.start_soon(one, client, n)
                replayed = await client.get(
                    f"{b_url}/whoami", headers=signed_headers(context(), in_the_past(120))
                )
                forged = signed_headers(context())
                forged[HEADER] = reforge(forged[HEADER], u="admin")
                tampered = await client.get(f"{b_url}/whoami", headers=forged)

    assert replayed.status_code == 401
    assert "expired" in replayed.json()["detail"]
    assert tampered.status_code == 401
    for user, (sent, body) in answers.items():
        b = body["b"]
        assert (b["user"], b["probe_user"]) == (user, user)
        assert (b["tenant"], b["thread"], b["request"]) == (
            sent["x-tenant-id"],
            sent["x-thread-id"],
            sent["x-request-id"],
        )
        assert (b["parent_run"], b["depth"]) == (body["a"]["run"], 1)
        assert b["run"] != body["a"]["run"]

    await anyio.to_thread.run_sync(
        _wait_for,
        lambda: (
            sum(s.name == "ambient.scope" for s in spans.finished()) >= 40
            and sum(s.kind is SpanKind.SERVER for s in spans.finished()) >= 42
        ),
    )
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans.finished():
        assert span.context is not None
        by_trace.setdefault(span.context.trace_id, []).append(span)
    for _, body in answers.values():
        trace_spans = by_trace[int(body["a"]["trace"], 16)]
        servers = [s for s in trace_spans if s.kind is SpanKind.SERVER]
        scopes = [s for s in trace_spans if s.name == "ambient.scope"]
        assert len(servers) == 2, [s.name for s in trace_spans]
        assert len(scopes) == 2
        a_server = next(s for s in servers if s.parent is None)
        b_server = next(s for s in servers if s.parent is not None)
        a_scope = next(
            s
            for s in scopes
            if s.parent is not None and s.parent.span_id == a_server.context.span_id
        )  # type: ignore[union-attr]
        b_scope = next(s for s in scopes if s is not a_scope)
        # B's server span continues the span that was current in A when it called: A's scope.
        assert b_server.parent.span_id == a_scope.context.span_id  # type: ignore[union-attr]
        assert b_scope.parent.span_id == b_server.context.span_id  # type: ignore[union-attr]
    assert b_registry.stats().open_scopes == 0


def test_restore_checks_the_audience_it_is_given() -> None:
    """A worker restoring with ``audience="jobs"`` takes tokens for that audience only: one
    for another audience, or naming none (a token made for a call to some service), is
    refused before anything is bound."""
    jobs = capture(context(), secret=SECRET, audience="jobs")
    with restore(jobs, secret=SECRET, audience="jobs") as job:
        assert job.user_id == "alice"
    for token in (
        capture(context(), secret=SECRET, audience="billing"),
        capture(context(), secret=SECRET),
    ):
        with pytest.raises(InvalidTokenError) as refused:
            restore(token, secret=SECRET, audience="jobs")
        assert refused.value.reason == "audience"
    assert ambient.current_context_or_none() is None


async def test_a_host_named_with_its_schemes_default_port_gets_the_context() -> None:
    """``hosts=["billing.internal:443"]`` serves ``https://billing.internal/`` (port 443
    unwritten), and not ``http://billing.internal/`` (port 80)."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    hook = async_inject_hook(hosts=["billing.internal:443"], secret=SECRET)
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(record), event_hooks={"request": [hook]}
    ) as client:
        with bind_context(context()):
            await client.get("https://billing.internal/")
            await client.get("http://billing.internal/")
    assert [HEADER in request.headers for request in seen] == [True, False]


def test_inject_without_trace_leaves_the_trace_headers_out() -> None:
    """``trace=False`` adds the token and the ids, and no ``traceparent``, also inside a
    span."""
    provider = TracerProvider()
    with (
        bind_context(context()),
        provider.get_tracer("test").start_as_current_span("outgoing"),
    ):
        headers = inject({}, secret=SECRET, trace=False)
    assert sorted(headers) == sorted([HEADER, "x-request-id", "x-thread-id"])


async def test_hosts_match_in_any_case_and_a_bare_ipv6_address_on_any_port() -> None:
    """``"Billing.Internal"`` names the host httpx spells ``billing.internal``; ``"::1"``
    (no brackets, no port) is that address on any port."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    hook = async_inject_hook(hosts=["Billing.Internal", "::1"], secret=SECRET)
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(record), event_hooks={"request": [hook]}
    ) as client:
        with bind_context(context()):
            for url in ("http://billing.internal/", "http://[::1]:9/", "http://[::2]:9/"):
                await client.get(url)
    assert [HEADER in request.headers for request in seen] == [True, True, False]
