"""The ``ambient`` command line: each option reaches the app checked as it says, the
defaults are those documented, and what cannot be done is said in one line."""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import warnings
from typing import Any

import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import ambient
from ambient import Registry
from ambient.cli import main
from ambient.middleware import AmbientMiddleware, IdentityResolver
from tests.servers import free_port
from tests.test_check import DEMO_SECRET, _app_module

FEW = ["--users", "4", "--requests", "2", "--growth-requests", "0"]


class Seen:
    """What an app made by :func:`recorder` was sent."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.identities: set[tuple[str, str | None]] = set()
        self.frames: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0


def recorder(identity: IdentityResolver) -> tuple[AmbientMiddleware, Seen]:
    """An app behind ``identity`` that notes the paths, identities and websocket frames it
    is sent, and how many requests it served at once."""
    seen = Seen()

    async def page(request: Request) -> Response:
        context = ambient.get_current_context()
        seen.paths.append(request.url.path)
        seen.identities.add((context.user_id, context.tenant_id))
        seen.in_flight += 1
        seen.most_in_flight = max(seen.most_in_flight, seen.in_flight)
        await anyio.lowlevel.checkpoint()  # another request may come in meanwhile
        seen.in_flight -= 1
        return PlainTextResponse("ok")

    async def events(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                seen.frames.append(await websocket.receive_text())

    inner = Starlette(
        routes=[
            Route("/{path:path}", page, methods=["GET", "POST"]),
            WebSocketRoute("/ws", events),
        ]
    )
    return AmbientMiddleware(inner, registry=Registry(), identity=identity), seen


def _recorded(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, name: str, identity: str
) -> tuple[str, Any]:
    """Module ``name`` whose ``app`` is a :func:`recorder` behind ``identity`` (source);
    returns the target and a function giving the app's :class:`Seen` once it is loaded."""
    _app_module(
        tmp_path,
        monkeypatch,
        name,
        "from ambient.middleware.identity import jwt_bearer, trusted_header\n"
        "from tests.test_cli import recorder\n"
        f"app, seen = recorder({identity})\n",
    )
    return f"{name}:app", lambda: sys.modules[name].seen


def _report(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict[str, Any]]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"ambient {ambient.__version__}\n"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """No command prints the usage and what is missing to stderr and exits with status 2,
    argparse's for a usage error; it printed the help and exited 0, as if it had worked."""
    assert main([]) == 2
    said = capsys.readouterr()
    assert said.out == ""
    assert said.err.startswith("usage: ambient")
    assert "ambient: error: a command is required: check or demo" in said.err


def test_help_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as helped:
        main(["--help"])
    assert helped.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ambient")
    assert "check" in out
    assert "demo" in out


@pytest.mark.parametrize(("argv", "code"), [([], 2), (["--help"], 0), (["--version"], 0)])
def test_the_command_exit_status(argv: list[str], code: int) -> None:
    """What a shell sees from ``python -m ambient``, the ``ambient`` command's code."""
    ran = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "ambient", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == code, ran.stderr
    assert ("usage: ambient" in ran.stderr) is (code == 2)


def test_the_check_defaults(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without options: 100 users of 20 requests each, ``GET /``, identified by the
    x-user-id header, then the memory phase's 1,000 requests (after as many to warm up);
    the report names the app as given."""
    target, seen = _recorded(tmp_path, monkeypatch, "defaults_for_cli", "trusted_header()")
    code, report = _report(capsys, ["check", target])
    assert code == 0, report
    assert (report["app"], report["users"], report["requests"]) == (target, 100, 2000)
    assert report["memory_growth_kib_per_1k"] is not None
    assert len(seen().paths) == 2000 + 2 * 1000
    assert set(seen().paths) == {"/"}
    assert len(seen().identities) == 100


def test_the_demo_is_named_so_in_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _report(capsys, ["check", *FEW])
    assert code == 0, report
    assert report["app"] == "the bundled demo"


def test_concurrency_bounds_the_users_in_flight(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target, seen = _recorded(tmp_path, monkeypatch, "concurrency_for_cli", "trusted_header()")
    options = ["check", target, "--users", "6", "--requests", "3", "--growth-requests", "0"]
    code, report = _report(capsys, options)
    assert code == 0, report
    assert seen().most_in_flight > 2  # every user at once by default
    monkeypatch.delitem(sys.modules, "concurrency_for_cli")
    code, report = _report(capsys, [*options, "--concurrency", "2"])
    assert code == 0, report
    assert seen().most_in_flight == 2


def test_an_identity_header_named_with_spaces_around_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target, seen = _recorded(tmp_path, monkeypatch, "spaced_for_cli", "trusted_header('x-api')")
    code, report = _report(capsys, ["check", target, *FEW, "--identity", "header: x-api "])
    assert code == 0, report
    assert len(seen().identities) == 4


def test_the_tenant_header_and_tenant_paths_reach_the_app(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target, seen = _recorded(
        tmp_path, monkeypatch, "tenants_for_cli", "trusted_header(tenant_header='x-org')"
    )
    argv = ["check", target, *FEW, "--tenants", "2", "--tenant-header", "x-org"]
    code, report = _report(capsys, [*argv, "--request", "GET /t/{tenant}/u/{user}"])
    assert code == 0, report
    identities = seen().identities
    assert (
        {tenant for _, tenant in identities}
        == {path.split("/")[2] for path in seen().paths}
        == {tenant for _, tenant in identities if tenant}
    )
    assert len({tenant for _, tenant in identities}) == 2
    assert {f"/t/{tenant}/u/{user}" for user, tenant in identities} == set(seen().paths)


@pytest.mark.parametrize(
    ("options", "resolver"),
    [
        (
            ["--jwt-audience", "api", "--jwt-issuer", "i1"],
            f"jwt_bearer({DEMO_SECRET!r}, algorithms=['HS256'], audience='api', issuer='i1')",
        ),
        (
            ["--jwt-key-id", "k1"],
            "jwt_bearer({'keys': [{'kty': 'oct', 'kid': 'k1', 'alg': 'HS256', 'k': "
            f"{base64.urlsafe_b64encode(DEMO_SECRET.encode()).rstrip(b'=').decode()!r}"
            "}]}, algorithms=['HS256'])",
        ),
        (
            ["--tenants", "2", "--tenant-claim", "org"],
            f"jwt_bearer({DEMO_SECRET!r}, algorithms=['HS256'], tenant_claim='org')",
        ),
    ],
    ids=["audience-issuer", "key-id", "tenant-claim"],
)
def test_the_jwt_options_are_in_the_tokens(
    options: list[str],
    resolver: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An app that requires the claim or header the option gives accepts every token."""
    monkeypatch.setenv("AMBIENT_JWT_SECRET", DEMO_SECRET)
    name = f"jwt_{options[0][2:].replace('-', '_')}_for_cli"
    target, seen = _recorded(tmp_path, monkeypatch, name, resolver)
    code, report = _report(capsys, ["check", target, *FEW, "--identity", "jwt", *options])
    assert code == 0, report
    assert report["tokens_refused"] == 0
    assert len(seen().identities) == 4
    if "--tenants" in options:
        assert len({tenant for _, tenant in seen().identities if tenant}) == 2


def test_the_websocket_options_reach_the_app(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target, seen = _recorded(tmp_path, monkeypatch, "websocket_for_cli", "trusted_header()")
    argv = ["check", target, *FEW, "--websocket", "/ws", "--websocket-send", "hello {user}"]
    code, report = _report(capsys, argv)
    assert code == 0, report
    assert report["websockets"] == 4
    assert sorted(seen().frames) == sorted(f"hello {user}" for user, _ in seen().identities)


def test_the_demos_websocket_may_be_sent_to_or_replaced(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The demo's own plan holds its /events socket open: --websocket-send needs no
    --websocket for it, and --websocket replaces it."""
    code, report = _report(capsys, ["check", *FEW, "--websocket-send", "hello"])
    assert code == 0, report
    assert report["websockets"] == 4
    code, report = _report(capsys, ["check", *FEW, "--websocket", "/no-such-socket"])
    assert code == 1
    assert report["websockets"] == 4
    assert report["failed_requests"]
    assert all("WS /no-such-socket" in line for line in report["failed_requests"])


def test_the_table_of_a_passing_check(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target, _ = _recorded(tmp_path, monkeypatch, "table_for_cli", "trusted_header()")
    assert main(["check", target, *FEW]) == 0
    table = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "isolation ok 4 users, no data of another" in table
    assert "failed requests ok 8 requests cleanup" in table  # no websocket, none said
    assert "µs per request" in table
    assert "no guarded global accessed" in table
    assert table.endswith("PASSED")
    assert main(["check", target, *FEW, "--websocket", "/ws"]) == 0
    table = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "8 requests, 4 websockets (0 frames)" in table


@pytest.mark.parametrize(
    ("wrong", "said"),
    [
        (["--timeout", "inf"], "--timeout: must be more than 0 seconds, not inf"),
        (["--concurrency", "0"], "--concurrency: must be at least 1, not 0"),
        (
            ["--tenants", "2", "--identity", "jwt", "--tenant-header", "x-org"],
            "--tenant-header is for --tenants with --identity header:NAME",
        ),
        (["--users", "2", "--tenants", "3"], "--tenants 3 is more than --users 2"),
        (
            ["--identity", "bearer", "--jwt-algorithm", "HS256"],
            "--jwt-algorithm: for --identity jwt only",
        ),
        (
            ["--identity", "jwt", "--tenant-claim", "org"],
            "--tenant-claim is for --tenants with --identity jwt",
        ),
        (
            ["--tenants", "2", "--identity", "header:X-Tenant-Id"],
            "--identity header:X-Tenant-Id is the tenant id's header too: give the tenant id "
            "another with --tenant-header NAME",
        ),
        (
            ["--tenants", "2", "--identity", "header:x-org", "--tenant-header", "X-Org"],
            "--identity header:x-org is the tenant id's header too",
        ),
        (
            ["--request", "GET /", "--websocket-send", "hello"],
            "--websocket-send is sent on the socket of --websocket PATH",
        ),
    ],
)
def test_refused_options(wrong: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["check", *wrong])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "usage: ambient check" in err
    assert said in err


def test_a_missing_secret_is_said_for_the_algorithm(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AMBIENT_JWT_SECRET", raising=False)
    with pytest.raises(SystemExit) as refused:
        main(["check", "--identity", "jwt", "--jwt-algorithm", "HS384"])
    assert refused.value.code == 2
    assert "set it to the secret the app verifies HS384 tokens with" in capsys.readouterr().err


def test_positional_only_asgi_app_is_not_taken_for_a_factory(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _app_module(
        tmp_path,
        monkeypatch,
        "positional_for_cli",
        "from tests.test_cli import recorder\n"
        "from ambient.middleware import trusted_header\n"
        "inner, seen = recorder(trusted_header())\n"
        "async def app(scope, receive, send, /):\n"
        "    await inner(scope, receive, send)\n",
    )
    code, report = _report(capsys, ["check", "positional_for_cli:app", *FEW])
    assert code == 0, report


def test_a_factory_whose_parameters_all_have_defaults_is_called(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _app_module(
        tmp_path,
        monkeypatch,
        "defaulted_factory_for_cli",
        "from tests.test_cli import recorder\n"
        "from ambient.middleware import trusted_header\n"
        "def create_app(debug=False):\n"
        "    return recorder(trusted_header())[0]\n",
    )
    code, report = _report(capsys, ["check", "defaulted_factory_for_cli:create_app", *FEW])
    assert code == 0, report


def test_an_app_without_a_signature_is_called_as_it_is(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A builtin has no signature to look at: the check calls it and says what failed."""
    _app_module(tmp_path, monkeypatch, "builtin_for_cli", "app = max\n")
    code, report = _report(capsys, ["check", "builtin_for_cli:app", *FEW])
    assert code == 1
    assert all("TypeError" in line for line in report["failed_requests"])


def test_an_import_error_says_where_it_was_raised(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _app_module(
        tmp_path,
        monkeypatch,
        "raises_for_cli",
        "def configure():\n    raise RuntimeError('no config')\n\nconfigure()\n",
    )
    with pytest.raises(SystemExit) as refused:
        main(["check", "raises_for_cli:app", *FEW])
    assert refused.value.code == (
        "cannot import the app's module 'raises_for_cli': RuntimeError: no config "
        f"({tmp_path / 'raises_for_cli.py'}:2)"
    )
    _app_module(tmp_path, monkeypatch, "syntax_for_cli", "x = (\n")
    with pytest.raises(SystemExit) as refused:
        main(["check", "syntax_for_cli:app", *FEW])
    assert isinstance(refused.value.code, str)
    # Python's own message says where, once.
    assert refused.value.code.startswith("cannot import the app's module 'syntax_for_cli': ")
    assert refused.value.code.endswith("(syntax_for_cli.py, line 1)")
    _app_module(tmp_path, monkeypatch, "imports_syntax_for_cli", "import syntax_for_cli\n")
    with pytest.raises(SystemExit) as refused:
        main(["check", "imports_syntax_for_cli:app", *FEW])
    assert isinstance(refused.value.code, str)
    assert refused.value.code.endswith("was never closed (syntax_for_cli.py, line 1)")


def test_the_demo_port_and_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """Parsed before anything is bound: a host no socket takes says so with the port."""
    for port, shown in ([], "8000"), (["--port", "65535"], "65535"), (["--port", "1"], "1"):
        with pytest.raises(SystemExit) as exited:
            main(["demo", "--host", "local\x00host", *port])
        assert str(exited.value).startswith(
            f"ambient demo: cannot listen on local\x00host:{shown}:"
        )
    assert capsys.readouterr().out == ""


def test_the_demo_on_an_ipv6_address_in_use() -> None:
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            main(["demo", "--host", "::1", "--port", str(port)])
    assert str(exited.value) == (
        f"ambient demo: cannot listen on [::1]:{port}: the address is in use "
        "(another server? choose another --port)"
    )


def test_the_demo_closes_the_socket_it_could_not_bind() -> None:
    def refused() -> None:
        with pytest.raises(SystemExit):
            main(["demo", "--host", "local\x00host"])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        refused()
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_a_demo_whose_startup_fails_exits_non_zero() -> None:
    """The demo's database cannot be reached: uvicorn never starts serving, and the
    command exits with status 3 rather than 0."""
    result = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "ambient", "demo", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "AMBIENT_DATABASE_URL": "postgresql://127.0.0.1:1/x"},
    )
    assert result.returncode == 3, result.stderr


def test_a_module_not_found_is_said_without_the_import_machinerys_line(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ambient check typo:app`` said where importlib raised the error (a line of the
    standard library's ``importlib/__init__.py``), not anything of the user's; a module
    importing a package that is missing is said with its own line."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        main(["check", "no_such_module_for_cli:app", *FEW])
    assert refused.value.code == (
        "cannot import the app's module 'no_such_module_for_cli': "
        "ModuleNotFoundError: No module named 'no_such_module_for_cli'"
    )
    _app_module(tmp_path, monkeypatch, "imports_missing_for_cli", "import no_such_package_x\n")
    with pytest.raises(SystemExit) as refused:
        main(["check", "imports_missing_for_cli:app", *FEW])
    assert refused.value.code == (
        "cannot import the app's module 'imports_missing_for_cli': ModuleNotFoundError: "
        f"No module named 'no_such_package_x' ({tmp_path / 'imports_missing_for_cli.py'}:1)"
    )


def test_without_rich_the_progress_and_table_are_plain_lines(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without rich installed: the progress as lines on stderr, the table as lines on
    stdout; with ``--json`` no progress at all, stdout the report alone."""
    for name in ("rich", "rich.console", "rich.markup", "rich.progress", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import` of it then refuses
    target, _ = _recorded(tmp_path, monkeypatch, "plain_for_cli", "trusted_header()")
    assert main(["check", target, *FEW]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[-1] == "  8/8 requests"
    lines = out.splitlines()
    assert lines[0] == f"ambient check: {target}"
    assert lines[1].split() == ["isolation", "ok", "4", "users,", "no", "data", "of", "another"]
    assert lines[-1] == "PASSED"
    assert main(["check", target, *FEW, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is True
    assert err == ""


def test_without_rich_the_progress_is_a_line_a_tenth(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("rich", "rich.console", "rich.markup", "rich.progress", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)
    target, _ = _recorded(tmp_path, monkeypatch, "tenths_for_cli", "trusted_header()")
    argv = ["check", target, "--users", "4", "--requests", "10", "--growth-requests", "0"]
    assert main(argv) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"  {done}/40 requests" for done in (1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40)
    ]


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_the_table_of_a_failing_check(
    rich: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Leaks are not said to be none, a memory growth and an overhead of exactly 0.0 are
    shown as measured, and every violation is listed under the table."""
    from ambient.check import CheckReport
    from ambient.cli import _render

    if not rich:
        for name in ("rich", "rich.console", "rich.markup", "rich.progress", "rich.table"):
            monkeypatch.setitem(sys.modules, name, None)
    leaks = ["Notes: 2 instance(s) still alive after their scope closed", "a scope leaked"]
    report = CheckReport(
        app="leaky:app",
        users=2,
        requests=4,
        leaks=leaks,
        memory_growth_kib_per_1k=0.0,
        middleware_overhead_us=0.0,
    )
    _render(report, sys.stdout)
    out = capsys.readouterr().out
    table = " ".join(out.replace("│", " ").split())
    assert "leaks 2 problem(s) memory 0.0 KiB per 1,000 requests after warm-up" in table
    assert "0.0 µs per request" in table
    assert [line.strip() for line in out.splitlines() if line.strip().startswith("-")] == [
        f"- {line}" for line in leaks
    ]
    assert table.endswith("FAILED")


def test_json_names_the_demo_that_could_not_start(capsys: pytest.CaptureFixture[str]) -> None:
    """A startup that cannot answer within the time limit (a nanosecond): the JSON names
    the demo as the report of a check of it would."""
    with pytest.raises(SystemExit) as refused:
        main(["check", *FEW, "--timeout", "1e-9", "--json"])
    assert refused.value.code == "the app's startup did not answer within 1e-09 s"
    said = json.loads(capsys.readouterr().out)
    assert said == {"app": "the bundled demo", "ok": False, "error": refused.value.code}


@pytest.mark.parametrize(
    ("source", "target", "said"),
    [
        (
            "import sys\nsys.exit()\n",
            "app",
            "cannot import the app's module '{name}': SystemExit(None) ({path}:2)",
        ),
        (
            "import sys\ndef create_app():\n    sys.exit(0)\n",
            "create_app",
            "the app factory {name}:create_app raised SystemExit(0) ({path}:3)",
        ),
        (
            "import sys\nasync def create_app():\n    sys.exit(0)\n",
            "create_app",
            "the app factory {name}:create_app raised SystemExit(0) ({path}:3)",
        ),
    ],
    ids=["module", "factory", "async-factory"],
)
def test_an_app_exiting_while_it_is_built_is_said_and_fails(
    source: str,
    target: str,
    said: str,
    request: pytest.FixtureRequest,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A module or factory calling ``sys.exit()`` ended the command with its status, 0,
    and no report; it is said in one line (in the JSON too) and the command fails."""
    name = f"exits_{request.node.callspec.id.replace('-', '_')}_for_cli"
    _app_module(tmp_path, monkeypatch, name, source)
    with pytest.raises(SystemExit) as refused:
        main(["check", f"{name}:{target}", *FEW, "--json"])
    assert refused.value.code == said.format(name=name, path=tmp_path / f"{name}.py")
    assert json.loads(capsys.readouterr().out) == {
        "app": f"{name}:{target}",
        "ok": False,
        "error": refused.value.code,
    }


def test_an_app_exiting_in_its_lifespan_or_a_request_is_taken_as_a_server_takes_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sys.exit()`` in the app ended the check with a traceback and status 0: in its
    lifespan it is an app without lifespan support, in a request or on a websocket a
    failure of that request, as a server such as uvicorn takes it."""
    _app_module(
        tmp_path,
        monkeypatch,
        "exits_running_for_cli",
        "import sys\n"
        "from ambient.middleware import trusted_header\n"
        "from tests.test_cli import recorder\n"
        "inner, seen = recorder(trusted_header())\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] == 'lifespan' or scope['path'] == '/exit':\n"
        "        sys.exit(0)\n"
        "    await inner(scope, receive, send)\n",
    )
    code, report = _report(capsys, ["check", "exits_running_for_cli:app", *FEW])
    assert code == 0, report
    argv = ["check", "exits_running_for_cli:app", *FEW, "--request", "GET /exit"]
    code, report = _report(capsys, [*argv, "--websocket", "/exit"])
    assert code == 1
    failed = report["failed_requests"]
    assert len(failed) == 8 + 4
    assert sum(line.endswith("HTTP 500 'SystemExit: 0'") for line in failed) == 8
    assert sum(line.endswith("the app raised SystemExit: 0") for line in failed) == 4
