"""UserExecutionContext: validation, immutability, identity and derivation."""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import pickle

import jwt
import pytest

from ambient import InvalidContextError, UserExecutionContext, UserRef
from ambient._context import MAX_DEPTH

PLACEHOLDERS = ["none", "null", "nil", "undefined", "placeholder", "registry", "default"]
PLACEHOLDERS += ["unknown", "0"]
ID_FIELDS = ["user_id", "thread_id", "run_id", "request_id"]
OPTIONAL_FIELDS = ["tenant_id", "connection_id", "parent_run_id"]


def _make(**overrides: object) -> UserExecutionContext:
    values: dict[str, object] = {
        "user_id": "alice",
        "thread_id": "t-1",
        "run_id": "r-1",
        "request_id": "q-1",
    }
    values.update(overrides)
    return UserExecutionContext(**values)  # type: ignore[arg-type]


class TestValidation:
    @pytest.mark.parametrize("field", ID_FIELDS + OPTIONAL_FIELDS)
    def test_empty_is_refused(self, field: str) -> None:
        """An empty id is refused, naming the field."""
        with pytest.raises(InvalidContextError, match=f"^{field} is invalid: must not be empty"):
            _make(**{field: ""})

    @pytest.mark.parametrize("field", ID_FIELDS + OPTIONAL_FIELDS)
    @pytest.mark.parametrize("value", [" alice", "alice ", "\talice", "alice\n", "\u3000a"])
    def test_whitespace_at_either_end_is_refused(self, field: str, value: str) -> None:
        """Leading or trailing whitespace (any Unicode space) is refused."""
        with pytest.raises(InvalidContextError, match="whitespace") as info:
            _make(**{field: value})
        assert info.value.field == field

    def test_inner_whitespace_is_allowed(self) -> None:
        """Whitespace inside an id is fine."""
        assert _make(user_id="alice smith").user_id == "alice smith"

    @pytest.mark.parametrize("field", ID_FIELDS + OPTIONAL_FIELDS)
    @pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\u2028"])
    def test_control_characters_are_refused(self, field: str, char: str) -> None:
        """Control characters, NUL included, are refused and named by code point."""
        with pytest.raises(InvalidContextError, match=f"U\\+{ord(char):04X}") as info:
            _make(**{field: f"ab{char}cd"})
        assert info.value.field == field

    @pytest.mark.parametrize("field", ID_FIELDS + OPTIONAL_FIELDS)
    @pytest.mark.parametrize(
        ("char", "rule"),
        [
            ("\u200b", "invisible format character"),  # zero-width space
            ("\u200d", "invisible format character"),  # zero-width joiner
            ("\u202e", "invisible format character"),  # right-to-left override
            ("\u2066", "invisible format character"),  # left-to-right isolate
            ("\u2069", "invisible format character"),  # pop directional isolate
            ("\ufeff", "invisible format character"),  # byte order mark
            ("\u00ad", "invisible format character"),  # soft hyphen
            ("\u00a0", "space character"),  # no-break space
            ("\u3000", "space character"),  # ideographic space
            ("\u2009", "space character"),  # thin space
            ("\ud800", "surrogate"),  # a lone surrogate
            ("\u2029", "control character"),  # paragraph separator
            ("\u034f", "invisible character"),  # combining grapheme joiner
            ("\ufe0f", "invisible character"),  # variation selector 16
            ("\U000e0100", "invisible character"),  # variation selector 17
            ("\u3164", "invisible character"),  # Hangul filler
            ("\u115f", "invisible character"),  # Hangul choseong filler
            ("\u1160", "invisible character"),  # Hangul jungseong filler
            ("\uffa0", "invisible character"),  # halfwidth Hangul filler
            ("\u17b4", "invisible character"),  # Khmer inherent vowel
            ("\u17b5", "invisible character"),  # Khmer inherent vowel
            ("\u180b", "invisible character"),  # Mongolian free variation selector
            ("\u180d", "invisible character"),  # Mongolian free variation selector
            ("\u180f", "invisible character"),  # Mongolian free variation selector
            ("\ufe00", "invisible character"),  # variation selector 1
            ("\U000e01ef", "invisible character"),  # variation selector 256
            ("\u2800", "invisible character"),  # Braille pattern blank
            ("\U0001d159", "invisible character"),  # musical symbol null notehead
        ],
    )
    def test_characters_that_hide_or_fake_a_difference_are_refused(
        self, field: str, char: str, rule: str
    ) -> None:
        """Invisible format characters, lone surrogates and spaces other than U+0020 make
        two different ids look the same: refused, naming the rule and the code point."""
        with pytest.raises(InvalidContextError, match=f"{rule} U\\+{ord(char):04X}") as info:
            _make(**{field: f"admin{char}x"})
        assert info.value.field == field
        assert char not in str(info.value)  # shown escaped, never raw

    def test_the_first_offending_character_is_named(self) -> None:
        """A spoofed id at either end is refused too, naming the character found first."""
        with pytest.raises(InvalidContextError, match="U\\+202E"):
            _make(user_id="\u202eadmin\u200b")
        with pytest.raises(InvalidContextError, match="U\\+200B"):
            _make(user_id="admin\u200b")

    @pytest.mark.parametrize(
        "value",
        [
            "José",
            "ユーザー",
            "user-😀",
            "a b",
            "Ωmega-№7",
            "user@example.com",
            "\ue000",  # private use (Co): not refused
            "a\U0010fffeb",  # a noncharacter, unassigned (Cn): not refused
        ],
    )
    def test_ordinary_non_ascii_ids_are_accepted(self, value: str) -> None:
        """Letters, digits, punctuation, symbols and emoji of any script stay valid."""
        assert _make(user_id=value).user_id == value

    @pytest.mark.parametrize("field", ID_FIELDS)
    def test_length_limit(self, field: str) -> None:
        """256 characters are allowed, 257 are not."""
        assert getattr(_make(**{field: "x" * 256}), field) == "x" * 256
        with pytest.raises(InvalidContextError, match="257 characters long"):
            _make(**{field: "x" * 257})

    @pytest.mark.parametrize("placeholder", PLACEHOLDERS)
    @pytest.mark.parametrize("field", ID_FIELDS + OPTIONAL_FIELDS)
    def test_placeholders_in_any_case_are_refused(self, placeholder: str, field: str) -> None:
        """Placeholder values are refused whatever their case."""
        for variant in {placeholder, placeholder.upper(), placeholder.title()}:
            with pytest.raises(InvalidContextError, match="placeholder"):
                _make(**{field: variant})

    @pytest.mark.parametrize(
        ("field", "advice"),
        [
            ("user_id", "pass the real id"),
            ("thread_id", "pass the real id or leave it out to generate one"),
            ("run_id", "pass the real id or leave it out to generate one"),
            ("request_id", "pass the real id or leave it out to generate one"),
            ("tenant_id", "pass the real id or leave it out for none"),
            ("connection_id", "pass the real id or leave it out for none"),
            ("parent_run_id", "pass the real id or leave it out for none"),
        ],
    )
    def test_a_placeholder_is_refused_with_advice_that_fits_its_field(
        self, field: str, advice: str
    ) -> None:
        """Only an id that is generated when left out is said to be: a user id never is (a
        client told to leave its id out gets a 401), and an optional id left out is none."""
        with pytest.raises(InvalidContextError) as info:
            _make(**{field: "null"})
        assert info.value.reason == f"is a placeholder value; {advice}"

    @pytest.mark.parametrize("value", [123, b"alice", None, ["a"], 1.5])
    def test_non_str_is_refused(self, value: object) -> None:
        """Required ids must be str; the message says which type arrived, and nothing of
        the value (bytes may be a credential), not even a "(got None)"."""
        with pytest.raises(InvalidContextError, match="must be a str") as info:
            _make(user_id=value)
        assert str(info.value) == f"user_id is invalid: must be a str, not {type(value).__name__}"

    def test_optional_ids_accept_none(self) -> None:
        """tenant, connection and parent run ids may be None."""
        ctx = _make(tenant_id=None, connection_id=None, parent_run_id=None)
        assert (ctx.tenant_id, ctx.connection_id, ctx.parent_run_id) == (None, None, None)

    def test_error_never_echoes_more_than_64_characters(self) -> None:
        """A long bad value is cut in the message."""
        secret = "s" * 1000 + "\x00"
        with pytest.raises(InvalidContextError) as info:
            _make(user_id=secret)
        assert "s" * 65 not in str(info.value)
        assert "user_id" in str(info.value)

    @pytest.mark.parametrize(
        ("value", "shown"),
        [
            ("x" * 62, repr("x" * 62)),
            ("x" * 63, repr("x" * 63)[:61] + "..."),
            ("x" * 1000, repr("x" * 1000)[:61] + "..."),
        ],
        ids=["64-characters", "65-characters", "1002-characters"],
    )
    def test_an_echoed_value_is_shown_whole_up_to_64_characters_and_cut_beyond(
        self, value: str, shown: str
    ) -> None:
        """The value an error echoes is its repr when that fits in 64 characters, else its
        first 61 characters and "...": 64 characters at most either way."""
        error = InvalidContextError("user_id", "is refused", value)
        assert str(error) == f"user_id is invalid: is refused (got {shown})"
        assert len(shown) <= 64

    def test_error_is_a_value_error(self) -> None:
        """InvalidContextError is a ValueError, so generic handlers catch it."""
        with pytest.raises(ValueError, match="user_id"):
            _make(user_id="")

    @pytest.mark.parametrize("depth", [-1, MAX_DEPTH + 1])
    def test_depth_range(self, depth: int) -> None:
        """depth stays within 0..32."""
        with pytest.raises(InvalidContextError, match="depth"):
            _make(depth=depth)

    @pytest.mark.parametrize("depth", [0, MAX_DEPTH])
    def test_depth_at_either_end_of_the_range_is_taken(self, depth: int) -> None:
        assert _make(depth=depth).depth == depth

    def test_depth_must_be_int(self) -> None:
        """A bool or float depth is refused."""
        with pytest.raises(InvalidContextError, match="depth"):
            _make(depth=True)

    def test_metadata_must_be_a_mapping_with_str_keys(self) -> None:
        """metadata is a mapping with string keys: a list or a str is refused, never made
        into a dict (a list of two-character strings was, and so passed)."""
        with pytest.raises(InvalidContextError, match="metadata"):
            _make(metadata=[("a", 1)])
        # A list of two-character strings would make a dict ({"a": "b"}) if taken for one.
        with pytest.raises(InvalidContextError, match="must be a mapping, not list"):
            _make(metadata=["ab"])
        with pytest.raises(InvalidContextError, match="must be a mapping, not str"):
            UserExecutionContext.create("alice", metadata="ab")  # type: ignore[arg-type]
        with pytest.raises(InvalidContextError, match="keys must be str"):
            _make(metadata={1: "a"})


class TestImmutability:
    def test_attributes_cannot_be_assigned(self) -> None:
        """The context is frozen."""
        ctx = _make()
        with pytest.raises(dataclasses.FrozenInstanceError):
            ctx.user_id = "mallory"  # type: ignore[misc]

    def test_metadata_cannot_be_mutated_through_the_context(self) -> None:
        """metadata is read-only."""
        ctx = _make(metadata={"plan": "pro"})
        with pytest.raises(TypeError):
            ctx.metadata["plan"] = "free"  # type: ignore[index]

    def test_metadata_is_a_copy_of_the_callers_dict(self) -> None:
        """Changing the dict the caller passed does not change the context."""
        given = {"plan": "pro"}
        ctx = _make(metadata=given)
        given["plan"] = "free"
        given["extra"] = "x"
        assert dict(ctx.metadata) == {"plan": "pro"}


class TestIdentity:
    def test_equal_and_hashable_by_value(self) -> None:
        """Two contexts with the same values are equal and hash alike."""
        a = _make(metadata={"k": "v"})
        b = _make(metadata={"k": "v"})
        assert a == b
        assert hash(a) == hash(b)
        assert len({a, b}) == 1

    def test_differs_by_any_id(self) -> None:
        """Changing any id makes a different context."""
        base = _make()
        for field in ID_FIELDS:
            assert dataclasses.replace(base, **{field: "other"}) != base

    def test_repr_does_not_dump_metadata(self) -> None:
        """repr names the user and run but not the metadata."""
        ctx = _make(metadata={"token": "secret-value"})
        assert "secret-value" not in repr(ctx)
        assert "alice" in repr(ctx)

    def test_repr_names_the_tenant_when_there_is_one(self) -> None:
        """Two users of the same id in two tenants are told apart."""
        assert "tenant_id='acme'" in repr(_make(tenant_id="acme"))
        assert "tenant_id" not in repr(_make())


class TestCreateAndChild:
    def test_create_fills_missing_ids_with_fresh_random_ones(self) -> None:
        """create() generates thread, run and request ids; each call differs."""
        one = UserExecutionContext.create("alice")
        two = UserExecutionContext.create("alice")
        assert one.user_id == two.user_id == "alice"
        assert len({one.run_id, two.run_id, one.thread_id, one.request_id}) == 4
        assert one.thread_id != two.thread_id

    def test_a_generated_id_is_128_random_bits(self) -> None:
        """Every one of a generated id's 32 hex digits is drawn, whichever way it is made:
        a child's run id and one of create()'s given the thread and request ids as those
        of a request. An id with part of it fixed is easier to guess and to run into."""
        parent = UserExecutionContext.create("alice")
        ids = [parent.child("tool").run_id for _ in range(64)]
        ids += [
            UserExecutionContext.create("alice", thread_id="t", request_id="q").run_id
            for _ in range(64)
        ]
        for made in (ids[:64], ids[64:]):
            assert all(len(one) == 32 for one in made)
            assert all(len({one[digit] for one in made}) > 1 for digit in range(32))

    @pytest.mark.parametrize(
        "given",
        [
            {"thread_id": "t"},
            {"request_id": "q"},
            {"run_id": "r"},
            {"thread_id": "t", "request_id": "q"},
        ],
    )
    def test_create_generates_every_id_left_out(self, given: dict[str, str]) -> None:
        """Whichever of the thread, run and request ids are given, each one left out is
        generated: 32 hex characters, distinct from the others. A request id left out
        while a thread id was given came out as None when the generated ids were drawn
        only for a context given neither."""
        context = UserExecutionContext.create("alice", **given)
        made = {field: getattr(context, field) for field in ("thread_id", "run_id", "request_id")}
        for field, value in made.items():
            if field in given:
                assert value == given[field]
            else:
                assert isinstance(value, str)
                assert len(value) == 32
                assert int(value, 16) >= 0
        assert len(set(made.values())) == 3

    def test_create_checks_its_metadata(self) -> None:
        """create()'s metadata is held to the constructor's rules: str keys only."""
        with pytest.raises(InvalidContextError, match="keys must be str"):
            UserExecutionContext.create("alice", metadata={1: "a"})  # type: ignore[dict-item]

    def test_create_keeps_given_ids(self) -> None:
        """Given ids are kept (and validated)."""
        ctx = UserExecutionContext.create(
            "alice", thread_id="t", run_id="r", request_id="q", tenant_id="acme"
        )
        assert (ctx.thread_id, ctx.run_id, ctx.request_id, ctx.tenant_id) == (
            "t",
            "r",
            "q",
            "acme",
        )
        with pytest.raises(InvalidContextError, match="request_id"):
            UserExecutionContext.create("alice", request_id="null")

    @pytest.mark.parametrize(
        "field", ["user_id", "thread_id", "run_id", "request_id", "tenant_id", "connection_id"]
    )
    @pytest.mark.parametrize("bad", ["null", "ab\x00cd", " ab", "ab\u200bcd", "", 42])
    def test_create_validates_every_id_it_is_given(self, field: str, bad: object) -> None:
        """create() builds the context past the constructor's checks, so it checks each id
        itself, by the same rules and naming the field: a run or connection id it left
        unchecked went into the context as given, NUL and placeholders included."""
        ids: dict[str, object] = {"user_id": "alice", field: bad}
        user_id = ids.pop("user_id")
        with pytest.raises(InvalidContextError) as info:
            UserExecutionContext.create(user_id, **ids)  # type: ignore[arg-type]
        assert info.value.field == field

    def test_child_links_to_its_parent(self) -> None:
        """child(): same user/tenant/thread/request, new run, parent link, depth + 1, and
        its own operation, never the one of the parent's it inherits."""
        parent = UserExecutionContext.create(
            "alice", tenant_id="acme", connection_id="ws-1", metadata={"a": 1}
        )
        child = parent.child("search", query="x")
        assert (
            child.user_id,
            child.tenant_id,
            child.thread_id,
            child.request_id,
            child.connection_id,
        ) == (
            parent.user_id,
            parent.tenant_id,
            parent.thread_id,
            parent.request_id,
            "ws-1",
        )
        assert child.run_id != parent.run_id
        assert child.parent_run_id == parent.run_id
        assert child.depth == 1
        assert dict(child.metadata) == {"a": 1, "query": "x", "operation": "search"}
        # What the child is given wins over what it inherits.
        assert dict(parent.child("search", a=2).metadata) == {"a": 2, "operation": "search"}
        # A child's own operation wins over the one its parent was a child for.
        grandchild = child.child("fetch")
        assert grandchild.metadata["operation"] == "fetch"
        assert grandchild.parent_run_id == child.run_id
        assert grandchild.depth == 2

    def test_child_depth_is_limited_to_32(self) -> None:
        """The 33rd nested child is refused."""
        ctx = UserExecutionContext.create("alice")
        for _ in range(MAX_DEPTH):
            ctx = ctx.child("step")
        assert ctx.depth == MAX_DEPTH
        with pytest.raises(InvalidContextError, match="at most 32"):
            ctx.child("step")
        # The deepest child still crosses a process boundary (a job queue, a pool).
        assert pickle.loads(pickle.dumps(ctx)) == ctx  # noqa: S301 - our own bytes

    def test_child_needs_an_operation(self) -> None:
        """The operation name is a non-empty str."""
        with pytest.raises(InvalidContextError, match="operation"):
            UserExecutionContext.create("alice").child("")
        for operation in (42, b"search", ["search"]):
            with pytest.raises(InvalidContextError, match="operation"):
                UserExecutionContext.create("alice").child(operation)  # type: ignore[arg-type]

    def test_log_fields_are_flat_strings_without_metadata(self) -> None:
        """log_fields() gives str values, empty for absent ids, no metadata."""
        ctx = UserExecutionContext.create("alice", metadata={"secret": "x"})
        fields = ctx.log_fields()
        assert fields["user_id"] == "alice"
        assert fields["tenant_id"] == ""
        assert fields["run_id"] == ctx.run_id
        assert all(isinstance(v, str) for v in fields.values())
        assert "secret" not in fields
        assert "x" not in fields.values()

    def test_user_ref(self) -> None:
        """ctx.user is the (user, tenant) pair USER components are keyed by."""
        ctx = UserExecutionContext.create("alice", tenant_id="acme")
        assert ctx.user.user_id == "alice"
        assert ctx.user.tenant_id == "acme"
        # The same value as the constructor's: equal, same hash (it keys USER components),
        # and as frozen.
        assert ctx.user == UserRef("alice", "acme")
        assert hash(ctx.user) == hash(UserRef("alice", "acme"))
        assert UserExecutionContext.create("alice").user == UserRef("alice")
        with pytest.raises(dataclasses.FrozenInstanceError):
            ctx.user.user_id = "mallory"  # type: ignore[misc]


class _User(str, enum.Enum):  # noqa: UP042 - the mixin form, whose str() is "_User.ALICE"
    ALICE = "alice"


class _Disguised(str):
    def __str__(self) -> str:
        return "alice"


def test_a_str_subclass_id_is_its_string_whichever_way_the_context_is_built() -> None:
    """A str-valued Enum member is its value, by create() as by the constructor, and the
    context holds a plain str (equal contexts hash alike); a subclass whose __str__ says
    something else cannot slip an invalid id past the checks."""
    ids = {"thread_id": "t", "run_id": "r", "request_id": "q"}
    built = UserExecutionContext(user_id=_User.ALICE, **ids)  # type: ignore[arg-type]
    plain = UserExecutionContext(user_id="alice", **ids)
    created = UserExecutionContext.create(_User.ALICE, tenant_id=_User.ALICE)  # type: ignore[arg-type]
    assert (created.user_id, created.tenant_id, built.user_id) == ("alice", "alice", "alice")
    assert {type(created.user_id), type(created.tenant_id), type(built.user_id)} == {str}
    assert (built == plain, hash(built) == hash(plain)) == (True, True)
    with pytest.raises(InvalidContextError, match="whitespace"):
        UserExecutionContext(user_id=_Disguised(" none\n"), **ids)
    with pytest.raises(InvalidContextError, match="placeholder"):
        UserExecutionContext.create(_Disguised("none"))


def test_a_str_subclass_user_id_the_middleware_has_seen_is_its_string() -> None:
    """The middleware checks a user id it has seen before from a memo: a str subclass
    equal to one in it (a str-valued Enum member a resolver returns) is still made its
    plain string, as a user id never seen is."""
    from ambient._context import request_context

    assert request_context("alice", "acme", None, None, None, None).user_id == "alice"
    again = request_context(_User.ALICE, _User.ALICE, None, None, None, None)
    assert type(again.user_id) is str
    assert f"{again.user_id}" == "alice"
    # A tenant id the memo holds too (a tenant is remembered as a user is).
    assert type(again.tenant_id) is str
    assert f"{again.tenant_id}" == "alice"


@pytest.mark.parametrize("field", ["user_id", "tenant_id", "thread_id"])
@pytest.mark.parametrize("bad", ["null", "ab\x00cd", "ab\u200bcd", 42])
def test_the_middlewares_context_checks_the_ids_a_client_sent(field: str, bad: object) -> None:
    """The middleware builds a request's context from the user, tenant and thread ids a
    client's identity and headers carry, past the constructor's checks: each is refused
    as create() refuses it, naming the field, seen before or not. A thread id went into
    the context unchecked when the check was left out."""
    from ambient._context import request_context

    ids: dict[str, object] = {"user_id": "alice", "tenant_id": "acme", "thread_id": "t-1"}
    request_context(*ids.values(), None, None, None)  # type: ignore[arg-type]
    ids[field] = bad
    with pytest.raises(InvalidContextError) as info:
        request_context(*ids.values(), None, None, None)  # type: ignore[arg-type]
    assert info.value.field == field


def test_the_memo_of_valid_user_ids_stays_bounded() -> None:
    """The user and tenant ids the middleware found valid are remembered for their next
    request, at most a bounded number of them: a server seeing ever new users (ten
    thousand here) would otherwise grow the memo without end."""
    from ambient._context import _MAX_VALID_IDS, _VALID_IDS, request_context

    for n in range(10_000):
        made = request_context(f"user-{n}", f"tenant-{n % 7}", None, None, None, None)
        assert made.user_id == f"user-{n}"
        assert len(_VALID_IDS) <= _MAX_VALID_IDS
    assert "user-9999" in _VALID_IDS


def test_a_context_survives_pickle_and_deepcopy() -> None:
    """A process pool or a job queue pickles what it is given: a context goes through,
    metadata and all, and comes back equal, still read-only, and sharing nothing mutable
    with the original."""
    original = UserExecutionContext.create("alice", tenant_id="acme", metadata={"k": [1]})
    child = original.child("tool")
    for context in (original, child):
        for copied in (pickle.loads(pickle.dumps(context)), copy.deepcopy(context)):  # noqa: S301 - our own bytes
            assert copied == context
            assert (copied.parent_run_id, copied.depth) == (context.parent_run_id, context.depth)
            assert dict(copied.metadata) == dict(context.metadata)
            assert copied.metadata["k"] is not context.metadata["k"]
            with pytest.raises(TypeError):
                copied.metadata["k"] = 2  # type: ignore[index]
    # The metadata deep-copied alone is a deep copy too, and as read-only: a copy sharing
    # the list with the context would let a change to the copy reach the context.
    deep = copy.deepcopy(original.metadata)
    assert type(deep) is type(original.metadata)
    assert deep == original.metadata
    deep["k"].append(2)
    assert original.metadata["k"] == [1]


def test_a_contexts_fields_serialise_as_a_dataclasss_do() -> None:
    """``dataclasses.asdict()`` (what FastAPI's ``jsonable_encoder`` and many loggers call
    on a dataclass), ``json.dumps`` of that, pickling and copies work on a context whose
    metadata holds an identity's claims; the metadata stays read-only, nested claims too.
    The read-only view they used to be could not be copied: ``asdict`` raised TypeError,
    and a context with claims could not be pickled."""
    from fastapi.encoders import jsonable_encoder

    from ambient.middleware.identity import jwt_bearer

    claims = {"sub": "alice", "roles": ["admin"], "exp": 1_900_000_000}
    token = jwt.encode(claims, "k" * 32, algorithm="HS256")
    identity = jwt_bearer("k" * 32, algorithms=["HS256"])(
        {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}
    )
    assert identity is not None
    context = UserExecutionContext.create(
        "alice", tenant_id="acme", metadata={"claims": identity.claims, "k": [1]}
    )
    expected = {
        "user_id": "alice",
        "tenant_id": "acme",
        "metadata": {"claims": claims, "k": [1]},
    }
    for encoded in (dataclasses.asdict(context), jsonable_encoder(context)):
        assert {key: encoded[key] for key in expected} == expected
        assert encoded["run_id"] == context.run_id
        assert json.loads(json.dumps(encoded))["metadata"] == expected["metadata"]
    for copied in (pickle.loads(pickle.dumps(context)), copy.deepcopy(context)):  # noqa: S301 - our own bytes
        assert copied == context
        assert copied.metadata["claims"] == claims
        with pytest.raises(TypeError):
            copied.metadata["k"] = 2  # type: ignore[index]
    assert copy.copy(context.metadata) is context.metadata
    for change in (
        lambda m: m.update(k=2),
        lambda m: m.pop("k"),
        lambda m: m.setdefault("new", 1),
        lambda m: m.clear(),
        lambda m: m.popitem(),
        lambda m: m.__delitem__("k"),
        lambda m: m.__ior__({"k": 2}),
    ):
        with pytest.raises(TypeError, match="does not support changes"):
            change(context.metadata)
    assert context.metadata["k"] == [1]
