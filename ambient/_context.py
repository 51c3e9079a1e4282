"""The immutable :class:`UserExecutionContext` and the :class:`UserRef` of a user."""

from __future__ import annotations

import copy
import random
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from ambient.errors import InvalidContextError

__all__ = ["MAX_DEPTH", "ReadOnlyDict", "UserExecutionContext", "UserRef", "new_id", "validate_id"]

MAX_DEPTH = 32
# The metadata key that marks an anonymous caller's context (the middleware sets it; a
# scope cleans such a user's USER components when its one request ends).
ANONYMOUS = "anonymous"
_MAX_LEN = 256
# The middleware checks a client's request id (visible ASCII, at most 128 characters, which
# no other rule of validate_id() refuses) against these alone.
_PLACEHOLDERS = frozenset(
    {"none", "null", "nil", "undefined", "placeholder", "registry", "default", "unknown", "0"}
)
# What a placeholder's error advises: only the ids create() (and the middleware) generate
# when left out may be left out "to generate one"; a user id is never generated, and an
# optional id left out is none at all.
_REAL_ID = "is a placeholder value; pass the real id"
_PLACEHOLDER_ADVICE: Final = {
    "thread_id": f"{_REAL_ID} or leave it out to generate one",
    "run_id": f"{_REAL_ID} or leave it out to generate one",
    "request_id": f"{_REAL_ID} or leave it out to generate one",
    "tenant_id": f"{_REAL_ID} or leave it out for none",
    "connection_id": f"{_REAL_ID} or leave it out for none",
    "parent_run_id": f"{_REAL_ID} or leave it out for none",
}
# The characters refused in an id, by Unicode category: controls and the line and paragraph
# separators can split a log line or a header; invisible format characters (zero-width
# spaces, bidi overrides and isolates, the BOM, the soft hyphen), lone surrogates and spaces
# other than U+0020 make two different ids look the same. Private use (Co) and unassigned
# (Cn) code points, the rest of what str.isprintable() calls unprintable, are allowed.
_REFUSED = {
    "Cc": "control character",
    "Zl": "control character",
    "Zp": "control character",
    "Cf": "invisible format character",
    "Cs": "surrogate",
    "Zs": "space character",  # U+0020 never gets here: it is printable
}
# Invisible characters Unicode files elsewhere than under "format" (Cf): the combining
# grapheme joiner, the Hangul fillers, the Khmer inherent vowels, the Mongolian and other
# variation selectors, the blank Braille pattern and the musical null notehead (symbols
# that draw nothing). Each renders as nothing, so "alice" + one of them looks like "alice".
_INVISIBLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180d\u180f\u2800\u3164\ufe00-\ufe0f"
    "\uffa0\U0001d159\U000e0100-\U000e01ef]"
)


class ReadOnlyDict(dict[str, Any]):
    """A ``dict`` nothing can change: a context's metadata, an identity's claims.

    A dict rather than a ``MappingProxyType`` so that what Python and its libraries do with
    a dataclass's dict fields works on a context: ``dataclasses.asdict()`` (which FastAPI's
    ``jsonable_encoder`` calls), ``json.dumps``, ``copy.deepcopy`` and pickling. Changing
    one raises ``TypeError``, as a mapping proxy would.
    """

    __slots__ = ()

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        msg = f"{type(self).__name__} does not support changes; build a new one"
        raise TypeError(msg)

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return (type(self), (dict(self),))

    def __copy__(self) -> ReadOnlyDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ReadOnlyDict:
        return type(self)(copy.deepcopy(dict(self), memo))


_EMPTY: Mapping[str, object] = ReadOnlyDict()
# The module-level generator: seeded from the OS and re-seeded in forked children.
_random_bits = random.getrandbits


def new_id() -> str:
    """Return a fresh random id (128 bits, 32 hex characters): unique, not a secret."""
    # to_bytes().hex() gives the same 32 zero-padded hex digits as f"{n:032x}" at a third of
    # the cost; three of these run per request.
    return _random_bits(128).to_bytes(16, "big").hex()


def validate_id(field_name: str, value: object) -> str:
    """Check one id against ambient's rules and return it.

    Raises:
        InvalidContextError: naming ``field_name`` and the broken rule.
    """
    if type(value) is not str:
        if not isinstance(value, str):
            raise InvalidContextError(
                field_name, f"must be a str, not {type(value).__name__}", echo=False
            )
        # The string itself, not what a subclass's __str__ makes of it: a str-valued Enum
        # member is its value ("alice", not "User.ALICE"), and an override cannot hide
        # what is checked.
        value = str.__str__(value)
    if not value:
        raise InvalidContextError(field_name, "must not be empty", echo=False)
    if len(value) > _MAX_LEN:
        raise InvalidContextError(
            field_name, f"is {len(value)} characters long; the limit is {_MAX_LEN}", value
        )
    if value[0].isspace() or value[-1].isspace():
        raise InvalidContextError(field_name, "must not start or end with whitespace", value)
    if not value.isprintable():
        # Rare: scan only ids that hold something unprintable.
        for char in value:
            if not char.isprintable():
                rule = _REFUSED.get(unicodedata.category(char))
                if rule is not None:
                    raise InvalidContextError(
                        field_name, f"contains the {rule} U+{ord(char):04X}", value
                    )
    if not value.isascii():
        invisible = _INVISIBLE.search(value)
        if invisible is not None:
            code = ord(invisible.group())
            # Not echoed: repr() would show it raw, which is what the rule is against.
            raise InvalidContextError(
                field_name, f"contains the invisible character U+{code:04X}", echo=False
            )
    if value.lower() in _PLACEHOLDERS:
        raise InvalidContextError(field_name, _PLACEHOLDER_ADVICE.get(field_name, _REAL_ID), value)
    return value


def _copy_metadata(metadata: object) -> Mapping[str, object]:
    if not isinstance(metadata, Mapping):
        raise InvalidContextError(
            "metadata", f"must be a mapping, not {type(metadata).__name__}", echo=False
        )
    for key in metadata:
        if not isinstance(key, str):
            raise InvalidContextError(
                "metadata", f"keys must be str, not {type(key).__name__}", echo=False
            )
    # A private copy: neither the caller's dict nor the context can change it later.
    return ReadOnlyDict(metadata)


# Every id field, in the order they are checked, and whether it may be None.
_ID_FIELDS = (
    ("user_id", False),
    ("thread_id", False),
    ("run_id", False),
    ("request_id", False),
    ("tenant_id", True),
    ("connection_id", True),
    ("parent_run_id", True),
)


@dataclass(frozen=True, slots=True)
class UserRef:
    """The user a USER-lifetime component belongs to: ``(user_id, tenant_id)``.

    USER factories receive this instead of a request's context so that no request's ids can
    be baked into an object shared by all of that user's requests.
    """

    user_id: str
    tenant_id: str | None = None


@dataclass(frozen=True, slots=True, weakref_slot=True)
class UserExecutionContext:
    """Who a piece of work runs for, and which run it belongs to.

    Immutable and validated on construction: every id is a ``str`` of 1-256 characters with
    no whitespace at either end, no control or invisible characters (no zero-width or bidi
    characters, no space but U+0020) and no placeholder value such as ``"none"`` or
    ``"default"``. Build one with :meth:`create` to fill missing ids.

    Attributes:
        user_id: The user the work runs for.
        thread_id: The conversation thread.
        run_id: This run (one request, one agent run, one sub-operation).
        request_id: The request that started the work.
        tenant_id: The tenant, when the application has tenants.
        connection_id: The websocket connection, when there is one.
        parent_run_id: The run this one was spawned from (see :meth:`child`).
        depth: How many :meth:`child` steps separate this run from the request (max 32).
        metadata: Read-only copy of the metadata given at construction.
    """

    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    tenant_id: str | None = None
    connection_id: str | None = None
    parent_run_id: str | None = None
    depth: int = 0
    metadata: Mapping[str, object] = field(default_factory=lambda: _EMPTY, hash=False)

    def __post_init__(self) -> None:
        for name, optional in _ID_FIELDS:
            value = getattr(self, name)
            if value is None and optional:
                continue
            checked = validate_id(name, value)
            if checked is not value:
                # A str subclass (an Enum member, say) is kept as the plain string checked:
                # equal contexts then hash alike, and nothing but str reaches a key.
                object.__setattr__(self, name, checked)
        depth = self.depth
        if type(depth) is not int:
            raise InvalidContextError(
                "depth", f"must be an int, not {type(depth).__name__}", echo=False
            )
        if not 0 <= depth <= MAX_DEPTH:
            raise InvalidContextError("depth", f"must be between 0 and {MAX_DEPTH}", depth)
        if self.metadata is not _EMPTY:
            object.__setattr__(self, "metadata", _copy_metadata(self.metadata))

    @classmethod
    def create(
        cls,
        user_id: str,
        *,
        thread_id: str | None = None,
        run_id: str | None = None,
        request_id: str | None = None,
        tenant_id: str | None = None,
        connection_id: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> UserExecutionContext:
        """Build a context for ``user_id``, generating every id that is not given.

        Generated ids are 32 random hex characters: unique, but identifiers rather than
        secrets (never use one as a credential).

        Raises:
            InvalidContextError: when a given id breaks a rule.
        """
        # Validated in the order of the parameters, so the first bad one is the one named.
        return _assemble(
            validate_id("user_id", user_id),
            None if thread_id is None else validate_id("thread_id", thread_id),
            None if run_id is None else validate_id("run_id", run_id),
            None if request_id is None else validate_id("request_id", request_id),
            None if tenant_id is None else validate_id("tenant_id", tenant_id),
            None if connection_id is None else validate_id("connection_id", connection_id),
            metadata,
        )

    def child(self, operation: str, **metadata: object) -> UserExecutionContext:
        """Return the context of a sub-operation (a sub-agent, a tool call, one message).

        Same user, tenant, thread, request and connection; a new ``run_id`` whose parent is
        this run; ``depth + 1``; metadata merged with ``operation``.

        Raises:
            InvalidContextError: when the new depth would exceed 32, or ``operation`` is not
                a non-empty ``str``.
        """
        if not isinstance(operation, str) or not operation:
            raise InvalidContextError("operation", "must be a non-empty str", operation)
        if self.depth >= MAX_DEPTH:
            raise InvalidContextError(
                "depth",
                f"child contexts nest at most {MAX_DEPTH} deep; a sub-agent is probably "
                "recursing without end",
                self.depth + 1,
            )
        merged: dict[str, object] = {**self.metadata, **metadata, "operation": operation}
        # Every id comes from this valid context and keyword names are str: nothing to check
        # again (an agent may spawn a child per tool call).
        return _assemble(
            self.user_id,
            self.thread_id,
            None,
            self.request_id,
            self.tenant_id,
            self.connection_id,
            merged,
            self.run_id,
            self.depth + 1,
        )

    @property
    def user(self) -> UserRef:
        """The :class:`UserRef` of this context's user."""
        # Built past the frozen dataclass's __init__: this runs for every scope that uses a
        # USER component and for every event an observer sees.
        ref = object.__new__(UserRef)
        _set_ref_user_id(ref, self.user_id)
        _set_ref_tenant_id(ref, self.tenant_id)
        return ref

    def log_fields(self) -> dict[str, str]:
        """Flat string fields for log records; absent ids are empty strings, no metadata."""
        return {
            "user_id": self.user_id,
            "tenant_id": self.tenant_id or "",
            "thread_id": self.thread_id,
            "run_id": self.run_id,
            "request_id": self.request_id,
            "connection_id": self.connection_id or "",
            "parent_run_id": self.parent_run_id or "",
            "depth": str(self.depth),
        }

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickle and deepcopy (a process pool, a job queue) cannot take the read-only view
        # of the metadata: hand them a plain dict, which the constructor copies again.
        return (
            UserExecutionContext,
            (
                self.user_id,
                self.thread_id,
                self.run_id,
                self.request_id,
                self.tenant_id,
                self.connection_id,
                self.parent_run_id,
                self.depth,
                dict(self.metadata),
            ),
        )

    def __repr__(self) -> str:
        tenant = f", tenant_id={self.tenant_id!r}" if self.tenant_id is not None else ""
        return (
            f"UserExecutionContext(user_id={self.user_id!r}{tenant}, "
            f"thread_id={self.thread_id!r}, run_id={self.run_id!r}, depth={self.depth})"
        )


class _DraftContext(UserExecutionContext):
    """A context being assembled: the same slots, written by plain attribute stores, then
    made a :class:`UserExecutionContext` (the layouts match, so its class can be swapped).

    A store through a slot's descriptor (``__set__``) or ``object.__setattr__`` builds an
    argument tuple per call: nine of them cost more than the rest of the assembly.
    """

    __slots__ = ()
    # Both: a frozen __delattr__ left in place would keep every store on the slow path.
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__
    # Made by calling the class, with nothing to initialise: object.__new__(cls) costs more,
    # through a wrapper that builds an argument tuple.
    __init__ = object.__init__


def _assemble(
    user_id: str,
    thread_id: str | None,
    run_id: str | None,
    request_id: str | None,
    tenant_id: str | None,
    connection_id: str | None,
    metadata: Mapping[str, object] | None,
    parent_run_id: str | None = None,
    depth: int = 0,
) -> UserExecutionContext:
    """A new context from ids that are valid already, generating the missing ones.

    Runs once per request.
    """
    draft: Any = _DraftContext()
    draft.user_id = user_id
    if thread_id is None or request_id is None:
        # The ids a request needs, from one draw: a third of the cost of three.
        ids = _random_bits(384).to_bytes(48, "big").hex()
        draft.thread_id = ids[:32] if thread_id is None else thread_id
        draft.run_id = ids[32:64] if run_id is None else run_id
        draft.request_id = ids[64:] if request_id is None else request_id
    else:
        draft.thread_id = thread_id
        draft.run_id = new_id() if run_id is None else run_id
        draft.request_id = request_id
    draft.tenant_id = tenant_id
    draft.connection_id = connection_id
    draft.parent_run_id = parent_run_id
    draft.depth = depth
    draft.metadata = _EMPTY if metadata is None else _copy_metadata(metadata)
    draft.__class__ = UserExecutionContext
    made: UserExecutionContext = draft
    return made


# Ids of users and tenants found valid, for request_context(): whether a str is a valid id
# depends on nothing else (not on its field), and a server sees the same users and tenants
# again and again. Bounded: emptied when full.
_VALID_IDS: dict[str, None] = {}
_MAX_VALID_IDS = 4096


def _valid_remembered(field_name: str, value: str) -> str:
    """``validate_id(field_name, value)``, remembered in :data:`_VALID_IDS` when valid."""
    value = validate_id(field_name, value)
    if len(_VALID_IDS) >= _MAX_VALID_IDS:
        _VALID_IDS.clear()
    _VALID_IDS[value] = None
    return value


def request_context(
    user_id: str,
    tenant_id: str | None,
    thread_id: str | None,
    request_id: str | None,
    connection_id: str | None,
    metadata: Mapping[str, object] | None,
) -> UserExecutionContext:
    """:meth:`UserExecutionContext.create` for the middleware: positional, trusting the
    ``request_id`` and ``connection_id`` it has validated or generated, and checking a user
    or tenant id it has seen before from a bounded memo. Not for generated user ids
    (anonymous users): each would take a place in the memo."""
    if type(user_id) is not str or user_id not in _VALID_IDS:
        user_id = _valid_remembered("user_id", user_id)
    # In the order of create()'s parameters, so the first bad one is the one named. Thread
    # ids are not remembered: there are as many as conversations.
    if thread_id is not None:
        thread_id = validate_id("thread_id", thread_id)
    if tenant_id is not None and (type(tenant_id) is not str or tenant_id not in _VALID_IDS):
        tenant_id = _valid_remembered("tenant_id", tenant_id)
    return _assemble(user_id, thread_id, None, request_id, tenant_id, connection_id, metadata)


_set_ref_user_id = UserRef.__dict__["user_id"].__set__
_set_ref_tenant_id = UserRef.__dict__["tenant_id"].__set__
