"""What the library's errors say and keep, built directly."""

from __future__ import annotations

from fractions import Fraction

import pytest

from ambient.errors import (
    AmbientError,
    AmbientWarning,
    BroadcastError,
    CleanupError,
    CleanupTimeoutError,
    ContextSwitchError,
    GlobalStateWarning,
    IdentityUnavailableError,
    IncompleteResponseError,
    InvalidTokenError,
    NoActiveContextError,
    PoolExhaustedError,
    ResolutionError,
    RowSecurityError,
    RowSecurityWarning,
    TooManyRequestsError,
)


@pytest.mark.parametrize(
    ("started", "client_gone", "opening", "client_there"),
    [
        (True, True, "the response was cut short: its body never reached its end", False),
        (False, True, "the request got no response: the app returned without answering", False),
        (True, False, "the response was cut short: the app returned before its end", True),
        (False, False, "the request got no response: the app returned without answering", True),
    ],
)
def test_an_unfinished_answer_says_whether_it_had_started_and_whether_the_client_waited(
    started: bool, client_gone: bool, opening: str, client_there: bool
) -> None:
    error = IncompleteResponseError(started=started, client_gone=client_gone)
    assert (error.started, error.client_gone) == (started, client_gone)
    assert str(error).startswith(opening)
    assert ("with the client still there" in str(error)) is client_there


def test_an_unfinished_answer_counts_the_client_gone_unless_told_otherwise() -> None:
    """Built without ``client_gone``, the client is taken as gone: the framework cancelled
    the work of a client that disconnected, which is no error of the app."""
    error = IncompleteResponseError(started=True)
    assert error.client_gone is True
    assert "the client disconnected" in str(error)


def test_row_security_problems_are_a_list_of_their_own_joined_in_the_message() -> None:
    """The problems are kept as a new list (what the caller passed may change later) and
    the message names each, separated by semicolons."""
    given = ["role app is a superuser", "table notes is not forced"]
    error = RowSecurityError(given)
    given.append("added later")
    assert error.problems == ["role app is a superuser", "table notes is not forced"]
    assert str(error) == (
        "row-level security would not protect this connection: "
        "role app is a superuser; table notes is not forced"
    )
    assert RowSecurityError(("one", "two")).problems == ["one", "two"]


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (NoActiveContextError(), LookupError),
        (ResolutionError("no component 'db'"), LookupError),
        (ContextSwitchError("bob over alice"), RuntimeError),
        (CleanupTimeoutError("cleanup of 'db' took over 5 s"), TimeoutError),
        (BroadcastError("redis down"), ConnectionError),
        (CleanupError("1 cleanup failed", [ValueError("tx")]), ExceptionGroup),
    ],
    ids=lambda value: getattr(value, "__name__", type(value).__name__),
)
def test_an_error_is_an_ambient_error_and_the_builtin_of_its_meaning(
    error: AmbientError, builtin: type[Exception]
) -> None:
    """``except AmbientError`` catches every error, and ``except`` of the builtin with the
    same meaning keeps working for code that never heard of ambient."""
    assert isinstance(error, AmbientError)
    assert isinstance(error, builtin)


def test_a_guarded_global_warning_is_an_ambient_warning() -> None:
    """A filter on ``AmbientWarning`` silences or raises every warning of the library."""
    assert issubclass(GlobalStateWarning, AmbientWarning)
    assert issubclass(RowSecurityWarning, AmbientWarning)


def test_a_refused_token_keeps_its_reason_and_is_a_401() -> None:
    error = InvalidTokenError("expired", "the context token expired 3 s ago")
    assert error.reason == "expired"
    assert (error.status, error.http_status) == (401, 401)
    assert str(error) == "the context token expired 3 s ago"


@pytest.mark.parametrize(
    "error_class",
    [IdentityUnavailableError, TooManyRequestsError, PoolExhaustedError, BroadcastError],
)
@pytest.mark.parametrize("retry_after", ["5", b"5", True, [5]], ids=repr)
def test_a_retry_after_of_no_number_is_refused_where_the_error_is_made(
    error_class: type[AmbientError], retry_after: object
) -> None:
    """A number of seconds read from a setting as text (or a bool, ``True`` is no second)
    is a TypeError naming ``retry_after`` where the error is raised, not one of
    ``math.ceil`` while the middleware writes its answer, which leaves the request with
    none at all."""
    with pytest.raises(TypeError, match=r"^retry_after must be a number of seconds, not "):
        error_class("down", retry_after=retry_after)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "error_class",
    [IdentityUnavailableError, TooManyRequestsError, PoolExhaustedError, BroadcastError],
)
@pytest.mark.parametrize("retry_after", [0, 2, 2.5, Fraction(3, 2), -1.0, float("nan"), 10**400])
def test_a_retry_after_is_kept_as_it_was_given(
    error_class: type[AmbientError], retry_after: object
) -> None:
    """Any real number is kept as given: the answer rounds it and bounds it to between a
    second and a day."""
    error = error_class("down", retry_after=retry_after)  # type: ignore[call-arg]
    assert error.retry_after is retry_after


def _subclass(name: str, **attributes: object) -> type[AmbientError]:
    return type(name, (AmbientError,), attributes)


@pytest.mark.parametrize(
    ("attribute", "value", "refusal", "says"),
    [
        ("http_status", "503", TypeError, "an int from 400 to 599 or None, not '503'"),
        ("http_status", 503.0, TypeError, "an int from 400 to 599 or None, not 503.0"),
        ("http_status", True, TypeError, "an int from 400 to 599 or None, not True"),
        ("http_status", 200, ValueError, "an int from 400 to 599 or None, not 200"),
        ("http_status", 399, ValueError, "an int from 400 to 599 or None, not 399"),
        ("http_status", 600, ValueError, "an int from 400 to 599 or None, not 600"),
        ("retry_after", "5", TypeError, "a number of seconds or None, not '5'"),
        ("retry_after", True, TypeError, "a number of seconds or None, not True"),
        ("challenge", b"Bearer", TypeError, "a str or None, not b'Bearer'"),
        ("challenge", "Bearer réalm", ValueError, "printable ASCII (a header)"),
        ("challenge", 'Bearer\r\nSet-Cookie: a="1"', ValueError, "printable ASCII (a header)"),
        ("challenge", " ", ValueError, "printable ASCII (a header)"),
        ("client_detail", None, TypeError, "a str, not None"),
        ("client_detail", b"try later", TypeError, "a str, not b'try later'"),
        ("title", 7, TypeError, "a str, not 7"),
        ("title", "Stale \ud800", ValueError, "text UTF-8 holds"),
        ("problem_type", None, TypeError, "a str, not None"),
    ],
)
def test_a_subclass_value_no_answer_can_carry_is_refused_when_the_class_is_made(
    attribute: str, value: object, refusal: type[Exception], says: str
) -> None:
    """An app's own error class setting an answer's attribute to what no answer can carry
    (what the constructors refuse as an argument: a retry_after of text, a challenge no
    header holds; a status no error has; a title of no text) is refused where the class is
    written, naming it and the attribute, not where the middleware writes its answer,
    which left the request with a bare 500 or no answer at all."""
    with pytest.raises(refusal, match=rf"^QuotaError\.{attribute} must be ") as info:
        _subclass("QuotaError", **{"http_status": 503, attribute: value})
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("http_status", 400),
        ("http_status", 599),
        ("http_status", None),
        ("retry_after", 0),
        ("retry_after", 2.5),
        ("retry_after", Fraction(3, 2)),
        ("retry_after", float("nan")),
        ("retry_after", None),
        ("challenge", 'Bearer realm="api"'),
        ("challenge", None),
        ("client_detail", "réessayez plus tard"),
        ("title", ""),
    ],
)
def test_a_subclass_value_an_answer_carries_is_taken(attribute: str, value: object) -> None:
    """What the constructors take is taken on the class (any real retry_after: the answer
    bounds it; text in any script in the body)."""
    made = _subclass("QuotaError", **{attribute: value})
    assert getattr(made, attribute) is value


def test_a_subclass_computing_a_value_and_a_subclass_of_a_subclass_are_taken() -> None:
    """A property is read (and checked) when the error is answered; a subclass of a
    library error, or of an app's, inherits values already checked."""

    class ComputedError(AmbientError):
        @property
        def http_status(self) -> int:  # type: ignore[override]
            return 503

    class PoolFullError(PoolExhaustedError):
        title = "Pool full"

    assert (ComputedError().http_status, PoolFullError("x").retry_after) == (503, 1.0)
