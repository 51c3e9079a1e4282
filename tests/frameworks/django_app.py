"""Django over ASGI: ``get_asgi_application()`` wrapped in the middleware.

Sync views run in a worker thread through asgiref's ``sync_to_async``, which carries the
context and the scope along. Django answers a view's exception itself (a 500), so a Django
middleware answers ambient errors with an HTTP status through ``answer_error``:
problem+json, and the error noted on the request's scope so that its cleanups see it.
Django's ASGI handler does not speak lifespan; ``AmbientMiddleware`` answers it and closes
the registry at shutdown.
"""

from __future__ import annotations

from typing import Any

import django
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.utils.deprecation import MiddlewareMixin

import ambient
from ambient import Registry
from ambient.errors import PoolExhaustedError
from ambient.middleware import AmbientMiddleware, answer_error
from tests.frameworks.common import (
    IDENTITY,
    Ledger,
    Memory,
    Probe,
    build_registry,
    describe,
    describe_sync,
    do_work,
    gate,
    grouped,
    in_thread,
    refuse,
    settled,
)

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="example-app-only-not-a-secret",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
        INSTALLED_APPS=[],
        # CommonMiddleware, as in any Django project, checks the host against ALLOWED_HOSTS.
        MIDDLEWARE=["django.middleware.common.CommonMiddleware", f"{__name__}.ProblemMiddleware"],
        USE_TZ=True,
    )
    django.setup(set_prefix=False)

from django.core.asgi import get_asgi_application


class ProblemMiddleware(MiddlewareMixin):
    """Answers an ambient error that carries an HTTP status with its problem+json body."""

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        answer = answer_error(exception)
        if answer is None:
            return None
        response = HttpResponse(
            answer.body(), status=answer.status, content_type="application/problem+json"
        )
        for name, value in answer.headers:
            response[name.decode()] = value.decode()
        return response


async def whoami(request: HttpRequest) -> JsonResponse:
    probe = await ambient.resolve(Probe)
    memory = await ambient.resolve(Memory)
    overlapped = await gate(request.GET.get("gate"), int(request.GET.get("size", 0)))
    hop = await sync_to_async(in_thread)()
    return JsonResponse(describe(probe, memory, overlapped=overlapped, **hop))


def whoami_sync(request: HttpRequest) -> JsonResponse:
    return JsonResponse(describe_sync())


async def stats(request: HttpRequest) -> JsonResponse:
    return JsonResponse(await settled())


def busy(request: HttpRequest) -> HttpResponse:
    raise PoolExhaustedError("no connection within 0.1 s", retry_after=2)


async def work(request: HttpRequest) -> HttpResponse:
    await do_work(bool(request.GET.get("hang")))
    return HttpResponse("done")


async def grouped_view(request: HttpRequest) -> HttpResponse:
    await grouped()
    return HttpResponse()


async def refused(request: HttpRequest) -> HttpResponse:
    await refuse()


urlpatterns = [
    path("whoami", whoami),
    path("sync", whoami_sync),
    path("stats", stats),
    path("busy", busy),
    path("work", work),
    path("refused", refused),
    path("grouped", grouped_view),
]


def build() -> tuple[Any, Registry, Ledger]:
    registry, ledger = build_registry()
    app = AmbientMiddleware(get_asgi_application(), registry=registry, identity=IDENTITY)
    return app, registry, ledger


app = build()[0]
