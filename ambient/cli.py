"""The ``ambient`` command line: ``ambient demo`` and ``ambient check``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import inspect
import json
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from ambient.check import CheckReport, JWTIdentity, PlannedRequest

__all__ = ["main"]

_DEMO = "ambient.demo.app:create_app"
# The tenant id header of a check run without --tenant-header (run_check()'s default).
_TENANT_HEADER = "x-tenant-id"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambient",
        description="Per-request user execution contexts for ASGI applications.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="serve the bundled multi-user agent backend",
        description=(
            "Serve the demo agent backend with uvicorn. Identity is the x-user-id header (and "
            "x-tenant-id, if any) from loopback peers (demo only); set AMBIENT_JWT_SECRET for "
            "HS256 bearer tokens (the tenant in their tenant_id claim). "
            "Traces go to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set."
        ),
    )
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    demo.add_argument("--port", type=_port, default=8000, help="port (default 8000)")

    check = commands.add_parser(
        "check",
        help="drive concurrent simulated users through an app and report isolation problems",
        description=(
            "Drive many concurrent simulated users through an ASGI app in process and report "
            "isolation violations, cleanup completeness, leaks, memory growth and latency. "
            "Exits non-zero on any violation or leak."
        ),
    )
    check.add_argument(
        "app",
        nargs="?",
        default=_DEMO,
        help="the app as module:attr (a function taking no argument is called to build it); "
        "default: the bundled demo",
    )
    check.add_argument(
        "--users", type=_users, default=100, help="simulated users, at most 10000 (100)"
    )
    check.add_argument(
        "--requests",
        type=_requests,
        default=20,
        help="requests per user, at most 10000 and 1000000 in all (20)",
    )
    check.add_argument(
        "--concurrency", type=_positive, default=None, help="users in flight at once (all)"
    )
    check.add_argument(
        "--identity",
        type=_identity,
        default="header:x-user-id",
        help=(
            "how a user presents itself: header:NAME; bearer (the user id itself as the "
            "token, for a resolver of opaque tokens, not a JWT); or jwt (an HS256 JWT with "
            "sub, iat and exp, signed with the secret in the AMBIENT_JWT_SECRET environment "
            "variable, as Authorization: Bearer) (default header:x-user-id)"
        ),
    )
    check.add_argument(
        "--jwt-audience",
        metavar="AUD",
        type=_claim,
        help="with --identity jwt: the tokens' aud claim (none by default)",
    )
    check.add_argument(
        "--jwt-issuer",
        metavar="ISS",
        type=_claim,
        help="with --identity jwt: the tokens' iss claim (none by default)",
    )
    check.add_argument(
        "--jwt-algorithm",
        metavar="ALG",
        choices=_jwt_algorithms(),
        help=(
            "with --identity jwt: the tokens' algorithm; HS256 (the default), HS384 or "
            "HS512 sign with AMBIENT_JWT_SECRET as the shared secret, the RS, PS, ES and "
            "EdDSA ones with it as a PEM private key"
        ),
    )
    check.add_argument(
        "--jwt-key-id",
        metavar="KID",
        type=_claim,
        help="with --identity jwt: the tokens' kid header, for an app verifying them "
        "against a key set (none by default)",
    )
    check.add_argument(
        "--tenants",
        type=_tenants,
        default=0,
        help=(
            "spread the users over this many tenants, each user id used in several of "
            "them (unique only within a tenant), at most one per user (0: users of no "
            "tenant)"
        ),
    )
    check.add_argument(
        "--tenant-header",
        metavar="NAME",
        type=_header,
        help="with --tenants and --identity header: the tenant id's header (x-tenant-id)",
    )
    check.add_argument(
        "--tenant-claim",
        metavar="NAME",
        type=_claim,
        help="with --tenants and --identity jwt: the tenant id's claim (tenant_id)",
    )
    check.add_argument(
        "--request",
        dest="plan",
        action="append",
        type=_request,
        metavar="'METHOD /path [JSON]'",
        help=(
            "a request each user sends ({user} and {tenant} are replaced by its ids); "
            "repeatable; default: GET /"
        ),
    )
    check.add_argument(
        "--websocket",
        metavar="PATH",
        type=_websocket_path,
        help=(
            "a websocket path each user holds open while its requests run, checked for "
            "frames carrying another user's data ({user} and {tenant} are replaced); "
            "default: /events for the demo without --request, none otherwise"
        ),
    )
    check.add_argument(
        "--websocket-send",
        metavar="TEXT",
        help=(
            "a text frame each user sends on its websocket once the app listens on it, for "
            "an app that answers messages ({user} and {tenant} are replaced)"
        ),
    )
    check.add_argument(
        "--growth-requests",
        type=_growth_requests,
        default=1000,
        help="requests in the memory-growth phase, at most 1000000 (1000; 0 skips it)",
    )
    check.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        help="seconds a request or the app's startup may take before it counts as failed (30)",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(refuse=check.error)
    return parser


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        msg = f"must be a whole number, not {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _request(text: str) -> str:
    from ambient.check import parse_request

    try:
        parse_request(text)
    except ValueError as error:  # said by argparse, with the usage and exit status 2
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        msg = f"must be at least 1, not {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _users(text: str) -> int:
    from ambient.check import _MAX_USERS

    return _from_1_to(text, _MAX_USERS)


def _requests(text: str) -> int:
    from ambient.check import _MAX_REQUESTS

    return _from_1_to(text, _MAX_REQUESTS)


def _tenants(text: str) -> int:
    from ambient.check import _MAX_USERS

    return _from_1_to(text, _MAX_USERS, least=0)


def _growth_requests(text: str) -> int:
    from ambient.check import _MAX_TOTAL_REQUESTS

    return _from_1_to(text, _MAX_TOTAL_REQUESTS, least=0)


def _from_1_to(text: str, most: int, *, least: int = 1) -> int:
    value = _whole(text)
    if not least <= value <= most:
        msg = f"must be from {least} to {most}, not {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _port(text: str) -> int:
    return _from_1_to(text, 65535)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"must be a number of seconds, not {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 < value < float("inf"):
        msg = f"must be more than 0 seconds, not {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _identity(text: str) -> tuple[str, str]:
    kind, colon, name = text.partition(":")
    if kind == "header" and name.strip():
        return "header", _header(name.strip())
    if kind in ("bearer", "jwt") and not colon:
        return kind, ""
    # said by argparse, with the usage and exit status 2, as every other bad argument
    msg = f"must be header:NAME, bearer or jwt, not {text!r}"
    raise argparse.ArgumentTypeError(msg)


def _header(text: str) -> str:
    """``text`` when it can name a header; else an argument error (no request of the
    check could carry it, and every user would be reported as refused)."""
    from ambient.middleware.identity import _header_name

    try:
        _header_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _websocket_path(text: str) -> str:
    if not text.startswith("/"):
        msg = f"the path must start with '/', not {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return text


def _jwt_algorithms() -> tuple[str, ...]:
    from ambient.check import JWT_ALGORITHMS

    return JWT_ALGORITHMS


def _claim(text: str) -> str:
    if not text:
        msg = "must not be empty"
        raise argparse.ArgumentTypeError(msg)
    return text


def _jwt_identity(args: argparse.Namespace) -> JWTIdentity:
    """The check's :class:`~ambient.check.JWTIdentity`, its secret taken from the
    environment; an argument error (exit status 2) when there is none to be had."""
    refuse: Callable[[str], NoReturn] = args.refuse
    secret = os.environ.get("AMBIENT_JWT_SECRET")
    algorithm = args.jwt_algorithm or "HS256"
    if not secret:
        unset = "empty" if secret == "" else "not set"
        what = (
            f"the secret the app verifies {algorithm} tokens with"
            if algorithm.startswith("HS")
            else f"the PEM private key whose public key the app verifies {algorithm} tokens with"
        )
        refuse(
            "--identity jwt signs the tokens with the secret in the AMBIENT_JWT_SECRET "
            f"environment variable, which is {unset}: set it to {what}"
        )
    from ambient.check import JWTIdentity

    try:
        return JWTIdentity(
            secret,
            audience=args.jwt_audience,
            issuer=args.jwt_issuer,
            tenant_claim=args.tenant_claim or "tenant_id",
            algorithm=algorithm,
            key_id=args.jwt_key_id,
        )
    except ImportError:
        refuse("--identity jwt needs PyJWT: install ambient-context[jwt]")
    except ValueError as error:  # said without the secret
        hint = ": give the app's with --jwt-algorithm" if "private key, which" in str(error) else ""
        refuse(f"--identity jwt: {error} (AMBIENT_JWT_SECRET){hint}")


def load_app(target: str) -> Any:
    """Import ``module:attr``; call it when it is a factory rather than an ASGI app (the
    result of an ``async def`` factory is still to be awaited)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        msg = f"the app must be given as module:attr, not {target!r}"
        raise SystemExit(msg)
    # As uvicorn does, and kept there: a factory called below, or the app later, may import
    # more modules of the working directory.
    here = os.getcwd()
    if not {"", ".", here} & set(sys.path):
        sys.path.insert(0, here)
    # SystemExit too: a module or factory calling sys.exit() would end the command with its
    # status, 0 often, and no report.
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # noqa: BLE001 - whatever it raises, said in one line
        msg = f"cannot import the app's module {module_name!r}: {_said(error)}"
        raise SystemExit(msg) from None
    try:
        app = getattr(module, attribute)
    except AttributeError:
        msg = f"module {module_name!r} has no attribute {attribute!r}"
        raise SystemExit(msg) from None
    if _is_factory(app):
        try:
            app = app()
        except (Exception, SystemExit) as error:  # noqa: BLE001
            msg = f"the app factory {target} raised {_said(error)}"
            raise SystemExit(msg) from None
    return app


def _said(error: BaseException) -> str:
    """``Type: message (file:line)``, the line being where it was raised."""
    said = (
        f"SystemExit({error.code!r})"
        if isinstance(error, SystemExit)
        else f"{type(error).__name__}: {error}"
    )
    if isinstance(error, SyntaxError):  # its message already says where
        return said
    # Left out: the import machinery's frames (frozen ones, and importlib's import_module
    # with this module's own, where a module not found at all is raised).
    machinery = {__file__, importlib.__file__}
    where = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith("<frozen") and frame.filename not in machinery
    ]
    return f"{said} ({where[-1].filename}:{where[-1].lineno})" if where else said


def _asgi_app(app: Any, target: str) -> Any:
    """``app`` when it can be called as an ASGI app; a clear exit otherwise."""
    what = f"{target} gave None" if app is None else f"{target} is {type(app).__name__!r}"
    if inspect.isclass(app):
        what = f"{target} is a class"
    elif callable(app):
        try:
            inspect.signature(app).bind(None, None, None)
        except TypeError:
            what = f"{target} cannot be called with (scope, receive, send)"
        except ValueError:  # no signature to read (a builtin): let the calls tell
            return app
        else:
            return app
    msg = f"{what}: not an ASGI app (nor a factory returning one)"
    raise SystemExit(msg)


def _is_factory(obj: Any) -> bool:
    """A plain function that takes no required argument builds the app; an ASGI app takes
    three."""
    if not inspect.isfunction(obj):
        return False
    required = [
        p
        for p in inspect.signature(obj).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return not required


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from ambient import __version__

        sys.stdout.write(f"ambient {__version__}\n")
        return 0
    if args.command == "demo":
        try:
            return _demo(args.host, args.port)
        except KeyboardInterrupt:  # while the demo imports or builds its app
            sys.stderr.write("ambient demo: interrupted\n")
            return 130
    if args.command == "check":
        try:
            return _check(args)
        except KeyboardInterrupt:  # while the app imports or builds, or during the check
            sys.stderr.write("ambient check: interrupted; no report\n")
            if args.json:  # still JSON for whoever parses it
                said = {"app": _name(args.app), "ok": False, "error": "interrupted; no report"}
                sys.stdout.write(json.dumps(said, indent=2, sort_keys=True) + "\n")
            return 130
    # No command is a usage error, said as argparse says every other one: the usage and the
    # error on stderr, exit status 2 (a script that ran ``ambient`` by mistake does not pass).
    parser.print_usage(sys.stderr)
    sys.stderr.write("ambient: error: a command is required: check or demo (see ambient --help)\n")
    return 2


def _demo(host: str, port: int) -> int:
    import uvicorn

    from ambient.demo.app import create_app

    # Bound before the banner: a port in use is said instead of URLs that would not answer.
    with _listen(host, port) as listening:
        flush = _configure_tracing("ambient-demo")
        base = f"http://{_address(host, port)}"
        sys.stdout.write(
            "ambient demo: a multi-user agent backend. Try two users:\n"
            f"  curl -s -H 'x-user-id: alice' -d '{{\"prompt\": \"remember buy milk\"}}' "
            f"{base}/agents/triage/runs\n"
            f"  curl -s -H 'x-user-id: bob' {base}/history\n"
            "Identity comes from the x-user-id header (x-tenant-id for a tenant) of loopback "
            "clients: for demos only.\n"
        )
        app = create_app()
        served = app if flush is None else _flushed_at_shutdown(app, flush)
        server = uvicorn.Server(uvicorn.Config(served, host=host, port=port, log_level="info"))
        # Said by uvicorn itself only for a socket it bound (as it does for its workers).
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on %s (Press CTRL+C to quit)", base
        )
        # As uvicorn.run(): Ctrl-C is a clean end (the server has shut down gracefully, then
        # raises it again), a server that never started a failure.
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[listening])
    return 0 if server.started else 3


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` as uvicorn binds one for its workers, or a clear exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, TypeError) as error:  # TypeError: a host name it cannot encode
        sock.close()
        if isinstance(error, TypeError):
            said = f"not a host name: {error}"
        elif error.errno == errno.EADDRINUSE:
            said = "the address is in use (another server? choose another --port)"
        else:
            said = error.strerror or str(error)
        msg = f"ambient demo: cannot listen on {_address(host, port)}: {said}"
        raise SystemExit(msg) from None
    return sock


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _flushed_at_shutdown(app: Any, flush: Callable[[], None]) -> Any:
    """``app``, flushing the telemetry once its lifespan shutdown is done: uvicorn ends the
    process with the signal it got (SIGTERM) after its graceful shutdown, so nothing after
    ``uvicorn.run()``, nor an ``atexit`` hook, would run."""

    async def flushed(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def send_then_flush(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                import anyio.to_thread

                await anyio.to_thread.run_sync(flush)  # the exporters post over HTTP
            await send(message)

        await app(scope, receive, send_then_flush)

    return flushed


def _configure_tracing(service: str) -> Callable[[], None] | None:
    """Install the OTLP exporters when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; return what
    flushes and stops them."""
    import os

    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    try:
        from ambient.integrations.otel import configure_tracing
    except ImportError:
        sys.stderr.write("OTEL_EXPORTER_OTLP_ENDPOINT is set but the otlp extra is missing\n")
        return None
    return configure_tracing(service).shutdown


def _check_tenants(args: argparse.Namespace) -> None:
    """Refuse tenant options that do not fit the rest (said by argparse, exit status 2)."""
    kind = args.identity[0]
    if args.tenants > args.users:
        args.refuse(f"--tenants {args.tenants} is more than --users {args.users}")
    if args.tenants and kind == "bearer":
        args.refuse(
            "--tenants needs --identity header:NAME or jwt: an opaque bearer token is the "
            "user id alone"
        )
    if args.tenant_header is not None and (not args.tenants or kind != "header"):
        args.refuse("--tenant-header is for --tenants with --identity header:NAME")
    if args.tenant_claim is not None and (not args.tenants or kind != "jwt"):
        args.refuse("--tenant-claim is for --tenants with --identity jwt")
    tenant_header = args.tenant_header or _TENANT_HEADER
    if args.tenants and kind == "header" and tenant_header.lower() == args.identity[1].lower():
        # Both ids would go out in one header, and the app would read one of them for both.
        args.refuse(
            f"--identity header:{args.identity[1]} is the tenant id's header too: give the "
            "tenant id another with --tenant-header NAME"
        )
    named = [("--request", text) for text in args.plan or ()]
    named += [("--websocket", args.websocket)] if args.websocket else []
    sends = args.websocket_send
    named += [("--websocket-send", sends)] if sends is not None else []
    for option, text in named:
        if not args.tenants and "{tenant}" in text:
            args.refuse(
                f"{option} {text!r} names {{tenant}}: give --tenants N (without tenants it "
                "would be empty)"
            )


def _check(args: argparse.Namespace) -> int:
    from ambient.check import _MAX_TOTAL_REQUESTS, parse_request

    total = args.users * args.requests
    if total > _MAX_TOTAL_REQUESTS:  # said by argparse, with the usage and exit status 2
        args.refuse(
            f"--users {args.users} and --requests {args.requests} make {total} requests; "
            f"at most {_MAX_TOTAL_REQUESTS} in all"
        )
    _check_tenants(args)
    identity: tuple[str, str] | JWTIdentity = args.identity
    if args.identity[0] == "jwt":
        identity = _jwt_identity(args)
    else:
        jwt_options = {
            "--jwt-audience": args.jwt_audience is not None,
            "--jwt-issuer": args.jwt_issuer is not None,
            "--jwt-algorithm": args.jwt_algorithm is not None,
            "--jwt-key-id": args.jwt_key_id is not None,
        }
        given = [option for option, set_ in jwt_options.items() if set_]
        if given:
            args.refuse(f"{' and '.join(given)}: for --identity jwt only")
    websocket = args.websocket
    if args.plan:
        plan = [parse_request(text) for text in args.plan]
    elif args.app == _DEMO:
        from ambient.demo.app import CHECK_PLAN, CHECK_WEBSOCKET

        plan = list(CHECK_PLAN)
        websocket = websocket or CHECK_WEBSOCKET
    else:
        plan = [parse_request("GET /")]
    if args.websocket_send is not None and websocket is None:
        args.refuse("--websocket-send is sent on the socket of --websocket PATH")
    # With --json, stdout holds the report alone: what the app prints goes to stderr.
    printed = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with printed:
            report = _load_and_run(args, identity, plan, websocket)
    except SystemExit as refused:
        if args.json and isinstance(refused.code, str):
            # An app that cannot be loaded or started: still JSON for whoever parses it.
            said = {"app": _name(args.app), "ok": False, "error": refused.code}
            sys.stdout.write(json.dumps(said, indent=2, sort_keys=True) + "\n")
        raise
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
    else:
        _render(report, sys.stdout)
    return 0 if report.ok else 1


def _load_and_run(
    args: argparse.Namespace,
    identity: tuple[str, str] | JWTIdentity,
    plan: list[PlannedRequest],
    websocket: str | None,
) -> CheckReport:
    import anyio

    from ambient.check import _StartupError, run_check

    app = load_app(args.app)
    if not inspect.isawaitable(app):
        app = _asgi_app(app, args.app)
    name = _name(args.app)

    async def run(progress: Callable[[int, int], None] | None) -> CheckReport:
        # An ``async def create_app()`` is awaited on the loop the check then runs the app
        # on (what it makes may belong to that loop).
        target = app
        if inspect.isawaitable(app):
            try:
                built = await app
            except (Exception, SystemExit) as error:  # noqa: BLE001
                msg = f"the app factory {args.app} raised {_said(error)}"
                raise SystemExit(msg) from None
            target = _asgi_app(built, args.app)
        return await run_check(
            target,
            name=name,
            users=args.users,
            requests=args.requests,
            concurrency=args.concurrency,
            identity=identity,
            plan=plan,
            growth_requests=args.growth_requests,
            progress=progress,
            time_limit=args.timeout,
            tenants=args.tenants,
            tenant_header=args.tenant_header or _TENANT_HEADER,
            websocket=websocket,
            websocket_send=args.websocket_send,
        )

    try:
        with _progress(args.users * args.requests, quiet=args.json) as progress:
            report: CheckReport = anyio.run(run, progress)
    except _StartupError as error:
        raise SystemExit(str(error)) from None
    return report


def _name(target: str) -> str:
    """How the report names the app."""
    return "the bundled demo" if target == _DEMO else target


class _progress:  # noqa: N801 - used like a function
    """A live progress bar (rich when installed, plain lines otherwise)."""

    def __init__(self, total: int, *, quiet: bool) -> None:
        self.total = total
        self.quiet = quiet
        self._bar: Any = None
        self._task: Any = None
        self._shown = -1

    def __enter__(self) -> Callable[[int, int], None] | None:
        if self.quiet:
            return None
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
        except ImportError:
            return self._plain
        self._bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
        )
        self._bar.__enter__()
        self._task = self._bar.add_task("requests", total=self.total)
        return self._rich

    def _rich(self, done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            self._bar.update(self._task, completed=done)

    def _plain(self, done: int, total: int) -> None:
        tenth = done * 10 // total
        if tenth != self._shown:
            self._shown = tenth
            sys.stderr.write(f"  {done}/{total} requests\n")

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _counted(number: int, thing: str) -> str:
    return f"{number} {thing}" if number == 1 else f"{number} {thing}s"


def _rows(report: Any) -> list[tuple[str, str, str]]:
    latency = report.latency_ms
    created, cleaned = report.components_created, report.components_cleaned
    if report.requests and report.tokens_refused == report.requests:
        # No request reached the app: there was nothing to find (the failed requests say why).
        isolation = ("isolation", "not tested", "the app refused every token (401)")
    else:
        isolation = (
            "isolation",
            _verdict(report.isolation),
            _counted(report.users, "user")
            + (f" in {_counted(report.tenants, 'tenant')}" if report.tenants else "")
            + (", no data of another" if not report.isolation else ", data crossed users"),
        )
    sockets = (
        f", {_counted(report.websockets, 'websocket')} "
        f"({_counted(report.websocket_frames, 'frame')})"
        if report.websockets
        else ""
    )
    growth = report.memory_growth_kib_per_1k
    memory = (
        "memory growth not measured (--growth-requests 0)"
        if growth is None
        else f"memory {growth:.1f} KiB per 1,000 requests after warm-up"
    )
    rows = [
        isolation,
        (
            "failed requests",
            _verdict(report.failed_requests),
            f"{_counted(report.requests, 'request')}{sockets}",
        ),
        (
            "cleanup",
            _verdict(report.cleanup),
            f"{created} created, {cleaned} cleaned, {report.scopes} scopes",
        ),
        (
            "leaks",
            _verdict(report.leaks),
            ("no scope or component alive after the run; " if not report.leaks else "") + memory,
        ),
        (
            "latency",
            "",
            f"p50 {latency.get('p50', 0):.2f} ms, p95 {latency.get('p95', 0):.2f} "
            f"ms, p99 {latency.get('p99', 0):.2f} ms",
        ),
        ("throughput", "", f"{report.throughput_rps:,.0f} requests/s in process"),
    ]
    if report.middleware_overhead_us is not None:
        rows.append(
            ("middleware overhead", "", f"{report.middleware_overhead_us:.1f} µs per request")
        )
    accesses = report.global_state_accesses
    rows.append(
        (
            "global state",
            "",
            f"{accesses.get('total', 0)} guarded global accesses"
            if accesses
            else "no guarded global accessed",
        )
    )
    return rows


def _verdict(findings: list[str]) -> str:
    if not findings:
        return "ok"
    count = 0
    for line in findings:
        # A row may join several lists, each cut short with a "... and N more" of its own.
        more = line.removeprefix("... and ").removesuffix(" more")
        count += int(more) if line.startswith("... and ") and more.isdigit() else 1
    return f"{count} problem(s)"


def _render(report: Any, out: IO[str]) -> None:
    rows = _rows(report)
    title = f"ambient check: {report.app}"
    verdict = "PASSED" if report.ok else "FAILED"
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        out.write(f"{title}\n")
        for name, status, detail in rows:
            out.write(f"  {name:<20} {status:<14} {detail}\n")
        for line in report.violations:
            out.write(f"  - {line}\n")
        out.write(f"{verdict}\n")
        return
    console = Console(file=out, width=110)
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for name, status, detail in rows:
        style = "green" if status == "ok" else "red" if status else ""
        shown = f"[{style}]{status}[/]" if style else escape(status)
        table.add_row(escape(name), shown, escape(detail))
    console.print(table)
    for line in report.violations:
        # The app's own words (an error's text) may hold brackets rich would read as markup.
        console.print(f"  [red]-[/] {escape(line)}", highlight=False)
    console.print(f"[bold {'green' if report.ok else 'red'}]{verdict}[/]")
