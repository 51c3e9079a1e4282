"""ambient.migration: guarding legacy globals, the global-state report, and rollouts."""

from __future__ import annotations

import collections.abc
import copy
import io
import itertools
import json
import logging
import pickle
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import opentelemetry.metrics._internal as metrics_internal
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import ambient.errors
import ambient.migration
from ambient import (
    NoActiveContextError,
    Registry,
    ScopeClosedError,
    UserExecutionContext,
    bind_context,
)
from ambient.migration import (
    GlobalStateError,
    GlobalStateWarning,
    Rollout,
    RolloutMode,
    global_state_report,
    guard_global,
    reset_global_state_report,
    unwrap_global,
)

HERE = str(Path(__file__))


def line_of(marker: str) -> int:
    """The line of this file that carries ``# <marker>``."""
    lines = Path(__file__).read_text().splitlines()
    found = [n for n, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
    assert len(found) == 1, (marker, found)
    return found[0]


def ctx(user: str = "alice", tenant: str | None = None) -> UserExecutionContext:
    return UserExecutionContext.create(user, tenant_id=tenant)


@pytest.fixture(autouse=True)
def _fresh_report() -> Iterator[None]:
    reset_global_state_report()
    yield
    reset_global_state_report()


@pytest.fixture(name="metric_reader")
def fixture_metric_reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryMetricReader]:
    """An SDK meter provider installed as the global one for this test only."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(metrics_internal, "_METER_PROVIDER", provider)
    yield reader
    provider.shutdown()


def counter_values(reader: InMemoryMetricReader, name: str) -> dict[tuple[Any, ...], int]:
    """Sum of a counter per attribute set, across every scope that reported it."""
    values: dict[tuple[Any, ...], int] = {}
    data = reader.get_metrics_data()
    if data is None:
        return values
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    key = tuple(sorted((point.attributes or {}).items()))
                    values[key] = values.get(key, 0) + int(point.value)  # type: ignore[union-attr]
    return values


# -- guard ------------------------------------------------------------------------------------


class Catalog:
    """A legacy singleton with state and the protocols the tests use."""

    def __init__(self) -> None:
        self.items = {"a": 1, "b": 2}
        self.label = "catalog"
        self.entered = 0
        self.exited = 0

    def lookup(self, key: str) -> int:
        return self.items[key]

    def __call__(self, x: int) -> int:
        return x + 1

    def __getitem__(self, key: str) -> int:
        return self.items[key]

    def __setitem__(self, key: str, value: int) -> None:
        self.items[key] = value

    def __delitem__(self, key: str) -> None:
        del self.items[key]

    def __contains__(self, key: object) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.items)

    def __reversed__(self) -> Iterator[str]:
        return reversed(list(self.items))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and other.items == self.items

    def __hash__(self) -> int:
        return 42

    def __str__(self) -> str:
        return "catalog!"

    def __repr__(self) -> str:
        return "<Catalog>"

    def __format__(self, spec: str) -> str:
        return f"catalog:{spec}"

    def __enter__(self) -> Catalog:
        self.entered += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.exited += 1

    async def __aenter__(self) -> str:
        self.entered += 1
        return "async-entered"

    async def __aexit__(self, *exc_info: object) -> None:
        self.exited += 1

    def __aiter__(self) -> AsyncIterator[str]:
        return self._agen()

    async def _agen(self) -> AsyncIterator[str]:
        for key in self.items:
            yield key


class Holder:
    """An application object keeping a guarded global, as legacy services do."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


REPLACEMENT = "await ambient.resolve(Catalog)"
catalog = guard_global(Catalog(), name="catalog", replacement=REPLACEMENT)


@pytest.fixture(name="registry")
def fixture_registry() -> Registry:
    return Registry()


class TestGuardRecords:
    @pytest.mark.parametrize("how", ["-c", "stdin"])
    def test_warns_in_code_whose_module_has_no_source(self, how: str) -> None:
        """Code run by ``python -c``, from stdin or in the interactive interpreter has a
        ``__main__`` whose loader gives no source: the guard handed its globals on to
        ``warnings.warn_explicit()``, which asked that loader for the source, and the
        guarded access raised ``ImportError`` instead of warning."""
        code = (
            "import ambient\n"
            "from ambient.migration import guard_global\n"
            "cache = guard_global({'a': 1}, name='cache')\n"
            "with ambient.bind_context(ambient.UserExecutionContext.create('alice')):\n"
            "    print(cache['a'])\n"
        )
        command = [sys.executable, "-c", code] if how == "-c" else [sys.executable, "-"]
        done = subprocess.run(  # noqa: S603 - this interpreter, our own code
            command,
            input=None if how == "-c" else code,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
        assert ":5: GlobalStateWarning: legacy global 'cache' touched inside a user" in done.stderr

    async def test_warns_once_per_call_site_under_100_concurrent_users(
        self,
        registry: Registry,
        metric_reader: InMemoryMetricReader,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """100 concurrent users touching the global at two call sites produce exactly two
        warnings and two log lines, while the report and the counter count all 200."""
        results: dict[str, tuple[int, bool]] = {}

        async def request(n: int) -> None:
            async with registry.open_scope(ctx(f"user-{n}")):
                await anyio.lowlevel.checkpoint()
                value = catalog.lookup("a")  # site: lookup
                await anyio.lowlevel.checkpoint()
                found = "b" in catalog  # site: contains
                results[f"user-{n}"] = (value, found)

        with (
            caplog.at_level(logging.WARNING, logger="ambient.migration"),
            pytest.warns(GlobalStateWarning) as record,
        ):
            async with anyio.create_task_group() as tg:
                for n in range(100):
                    tg.start_soon(request, n)

        assert results == {f"user-{n}": (1, True) for n in range(100)}
        lookup, contains = line_of("site: lookup"), line_of("site: contains")
        assert sorted((w.filename, w.lineno) for w in record) == [
            (HERE, lookup),
            (HERE, contains),
        ]
        assert all("'catalog'" in str(w.message) and REPLACEMENT in str(w.message) for w in record)
        logged = [r.getMessage() for r in caplog.records if r.name == "ambient.migration"]
        assert len(logged) == 2
        for line in (lookup, contains):
            assert any(f"test_migration.py:{line}" in m and REPLACEMENT in m for m in logged)
        assert all("'catalog'" in m for m in logged)
        assert sorted(
            (r.ambient_global, r.ambient_call_site)
            for r in caplog.records
            if r.name == "ambient.migration"
        ) == [("catalog", f"tests/test_migration.py:{line}") for line in sorted((lookup, contains))]

        report = global_state_report()
        assert report.total == 200
        assert [(a.name, a.lineno, a.count) for a in report.accesses] == [
            ("catalog", lookup, 100),
            ("catalog", contains, 100),
        ]
        assert counter_values(metric_reader, "ambient.global_state.accesses") == {
            (("ambient.global", "catalog"),): 200
        }

    async def test_silent_outside_any_context(self, metric_reader: InMemoryMetricReader) -> None:
        """Start-up code, scripts and threads with no context touch the global freely."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert catalog.lookup("a") == 1
            assert len(catalog) == 2
            assert await anyio.to_thread.run_sync(catalog.lookup, "b") == 2
            assert copy.deepcopy(catalog) == unwrap_global(catalog)
            assert pickle.loads(pickle.dumps(catalog)) == unwrap_global(catalog)  # noqa: S301
        assert caught == []
        assert global_state_report().total == 0
        assert counter_values(metric_reader, "ambient.global_state.accesses") == {}

    async def test_a_bare_bound_context_counts(self) -> None:
        """bind_context (a job, a test) counts like a request: a user's code is running."""
        guard = guard_global(Catalog(), name="bare", mode="off")
        with bind_context(ctx()):
            guard.lookup("a")
        assert global_state_report().by_name() == {"bare": 1}

    async def test_worker_threads_of_a_request_count(self, registry: Registry) -> None:
        """A worker thread started with the request's context (anyio.to_thread copies it)
        counts its accesses; a raw thread with no context does not."""
        guard = guard_global(Catalog(), name="threaded", mode="off")
        raw: list[int] = []
        async with registry.open_scope(ctx()):
            for _ in range(5):
                assert await anyio.to_thread.run_sync(guard.lookup, "a") == 1
            thread = threading.Thread(target=lambda: raw.append(guard.lookup("b")))
            thread.start()
            thread.join()
        assert raw == [2]
        assert global_state_report().by_name() == {"threaded": 5}

    async def test_strict_raises_at_the_call_site(
        self, registry: Registry, metric_reader: InMemoryMetricReader
    ) -> None:
        """mode='strict' raises GlobalStateError naming the global, the site and the
        replacement; the access is still counted; outside a context it works."""
        strict = guard_global(Catalog(), name="strict_catalog", replacement="X()", mode="strict")
        assert strict.lookup("a") == 1
        async with registry.open_scope(ctx()):
            with pytest.raises(GlobalStateError) as caught:
                strict.lookup("a")  # site: strict
        message = str(caught.value)
        assert "'strict_catalog'" in message
        assert f"test_migration.py:{line_of('site: strict')}" in message
        assert "X()" in message
        assert isinstance(caught.value, ambient.errors.AmbientError)
        assert global_state_report().by_name() == {"strict_catalog": 1}
        assert counter_values(metric_reader, "ambient.global_state.accesses") == {
            (("ambient.global", "strict_catalog"),): 1
        }

    async def test_off_only_counts(
        self,
        registry: Registry,
        metric_reader: InMemoryMetricReader,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """mode='off' neither warns nor logs, but counts every access."""
        quiet = guard_global(Catalog(), name="quiet", mode="off")
        with (
            caplog.at_level(logging.DEBUG, logger="ambient.migration"),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            async with registry.open_scope(ctx()):
                for _ in range(3):
                    quiet.lookup("a")
        assert caught == []
        assert [r for r in caplog.records if r.name == "ambient.migration"] == []
        assert global_state_report().by_name() == {"quiet": 3}
        assert counter_values(metric_reader, "ambient.global_state.accesses") == {
            (("ambient.global", "quiet"),): 3
        }

    async def test_a_failing_meter_never_breaks_the_request(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A meter provider that raises is logged once; the access is still counted in the
        report and the request goes on."""

        class Broken(MeterProvider):
            def get_meter(self, *args: Any, **kwargs: Any) -> Any:
                msg = "meter backend down"
                raise RuntimeError(msg)

        monkeypatch.setattr(metrics_internal, "_METER_PROVIDER", Broken())
        monkeypatch.setattr(ambient.migration._counters, "_complained", False)
        guard = guard_global(Catalog(), name="metered", mode="off")
        with caplog.at_level(logging.ERROR, logger="ambient.migration"), bind_context(ctx()):
            assert [guard.lookup("a") for _ in range(3)] == [1, 1, 1]
        failures = [r for r in caplog.records if "recording metric" in r.getMessage()]
        assert len(failures) == 1
        assert global_state_report().by_name() == {"metered": 3}

    async def test_a_removed_working_directory_never_breaks_the_request(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A server whose working directory was removed under it (a release directory
        replaced by a deploy): the call site is named by its full path, where every
        guarded access raised FileNotFoundError from the request, and so did the report."""
        gone = tmp_path / "release"
        gone.mkdir()
        monkeypatch.chdir(gone)
        gone.rmdir()
        guard = guard_global(Catalog(), name="homeless")
        with pytest.warns(GlobalStateWarning), bind_context(ctx()):
            assert [guard.lookup("a") for _ in range(2)] == [1, 1]  # homeless
        report = global_state_report()
        assert [(a.site, a.count) for a in report.accesses] == [
            (f"{HERE}:{line_of('homeless')}", 2)
        ]
        assert "homeless: 2" in str(report)

    async def test_a_site_outside_the_working_directory_is_named_by_its_full_path(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A call site in a file outside the working directory is named by its full path,
        not by a path climbing out of the directory with '..'."""
        monkeypatch.chdir(tmp_path)
        guard = guard_global(Catalog(), name="elsewhere", mode="off")
        with bind_context(ctx()):
            guard.lookup("a")  # elsewhere
        (access,) = global_state_report().accesses
        assert access.site == f"{HERE}:{line_of('elsewhere')}"

    async def test_an_empty_replacement_gives_the_generic_hint(self) -> None:
        """replacement='' names no replacement: the message points at ambient.resolve
        instead of saying 'use  instead'."""
        strict = guard_global(Catalog(), name="hintless", replacement="", mode="strict")
        with bind_context(ctx()), pytest.raises(GlobalStateError) as caught:
            strict.lookup("a")
        assert "Resolve a per-user component" in str(caught.value)
        assert "use  instead" not in str(caught.value)

    async def test_reset_warns_again(self, registry: Registry) -> None:
        """After reset_global_state_report() the next access at a site warns again."""
        guard = guard_global(Catalog(), name="again")
        for _ in range(2):
            with pytest.warns(GlobalStateWarning) as record:
                async with registry.open_scope(ctx()):
                    for _ in range(3):
                        guard.lookup("a")
            assert len(record) == 1
            reset_global_state_report()

    async def test_a_warnings_filter_on_the_calling_module_silences_the_warning(self) -> None:
        """The warning is issued as from the module that touched the global, so a filter
        naming that module (as an application silences one legacy module) applies."""
        guard = guard_global(Catalog(), name="filtered")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            warnings.filterwarnings(
                "ignore", category=GlobalStateWarning, module=re.escape(__name__)
            )
            with bind_context(ctx()):
                guard.lookup("a")
        assert [w.message for w in record] == []
        assert global_state_report().by_name() == {"filtered": 1}

    def test_environment_overrides_the_mode(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """AMBIENT_GUARD_MODE overrides the mode of guards created afterwards."""
        monkeypatch.setenv("AMBIENT_GUARD_MODE", "strict")
        guard = guard_global(Catalog(), name="env", mode="warn")
        with bind_context(ctx()), pytest.raises(GlobalStateError):
            guard.lookup("a")
        monkeypatch.setenv("AMBIENT_GUARD_MODE", " Strict ")
        shouted = guard_global(Catalog(), name="env", mode="off")
        with bind_context(ctx()), pytest.raises(GlobalStateError):
            shouted.lookup("a")
        monkeypatch.setenv("AMBIENT_GUARD_MODE", "loud")
        with pytest.raises(ValueError, match="AMBIENT_GUARD_MODE must be one of"):
            guard_global(Catalog(), name="env")

    def test_arguments_are_checked(self) -> None:
        """An empty name or an unknown mode is refused."""
        with pytest.raises(ValueError, match="non-empty name"):
            guard_global(Catalog(), name=" ")
        with pytest.raises(ValueError, match="mode must be one of warn, strict, off"):
            guard_global(Catalog(), name="x", mode="sometimes")  # type: ignore[arg-type]

    def test_guarding_a_guard_guards_the_object(self) -> None:
        """Guarding a guard wraps the object underneath (accesses are counted once)."""
        inner = Catalog()
        first = guard_global(inner, name="first", mode="off")
        second = guard_global(first, name="second", mode="off")
        assert unwrap_global(second) is inner
        assert unwrap_global(inner) is inner
        with bind_context(ctx()):
            second.lookup("a")
        assert global_state_report().by_name() == {"second": 1}


class TestGuardForwards:
    def test_attributes_methods_and_calls(self) -> None:
        """Attribute get/set/delete, methods and calls reach the guarded object."""
        inner = Catalog()
        guard = guard_global(inner, name="fwd")
        assert guard.lookup("b") == 2
        assert guard(1) == 2
        guard.label = "renamed"
        assert inner.label == "renamed"
        del guard.label
        assert not hasattr(inner, "label")
        with pytest.raises(AttributeError):
            _ = guard.missing  # type: ignore[attr-defined]
        assert vars(guard) is vars(inner)

    def test_dunder_protocols(self) -> None:
        """Containers, truth, equality, hashing, str and format behave as on the object;
        isinstance sees its class; repr is the object's."""
        inner = Catalog()
        guard = guard_global(inner, name="fwd")
        assert isinstance(guard, Catalog)
        assert guard.__class__ is Catalog
        assert guard["a"] == 1
        guard["c"] = 3
        assert inner.items["c"] == 3
        del guard["c"]
        assert "c" not in guard
        assert "a" in guard
        assert len(guard) == 2
        assert list(guard) == ["a", "b"]
        assert list(reversed(guard)) == ["b", "a"]
        assert bool(guard) is True
        assert guard == Catalog()
        assert guard != object()
        assert hash(guard) == 42
        assert {guard: 1}[inner] == 1
        assert str(guard) == "catalog!"
        assert f"{guard:x}" == "catalog:x"
        assert repr(guard) == "<Catalog>"
        assert "lookup" in dir(guard)

    async def test_context_managers_and_async_iteration(self) -> None:
        """with, async with and async for use the object's own methods."""
        inner = Catalog()
        guard = guard_global(inner, name="fwd")
        with guard as entered:
            assert entered is inner
        async with guard as value:
            assert value == "async-entered"
        assert (inner.entered, inner.exited) == (2, 2)
        assert [key async for key in guard] == ["a", "b"]

    def test_missing_protocols_fail_like_the_object(self) -> None:
        """A protocol the object lacks raises TypeError naming the object's type and the
        protocol, as it would without the guard."""
        plain: Any = guard_global(object(), name="plain")
        with (
            pytest.raises(
                TypeError, match="^'object' object does not support the context manager protocol$"
            ),
            plain,
        ):
            pass
        with pytest.raises(TypeError):
            len(plain)
        with pytest.raises(TypeError):
            plain()
        assert bool(plain) is True

    async def test_every_forwarded_use_is_counted_at_its_line(self, registry: Registry) -> None:
        """Each use inside a context is one access, attributed to the line that made it."""
        guard = guard_global(Catalog(), name="lines", mode="off")
        async with registry.open_scope(ctx()):
            guard.lookup("a")  # use: attribute
            guard["a"]  # use: item
            len(guard)  # use: len
            _ = "a" in guard  # use: contains
            with guard:  # use: with
                pass
            async with guard:  # use: async with
                pass
            isinstance(guard, Catalog)
            repr(guard)
            dir(guard)
        counted = {a.lineno: a.count for a in global_state_report().accesses}
        uses = ("attribute", "item", "len", "contains", "with", "async with")
        assert counted == {line_of(f"use: {u}"): 1 for u in uses}

    async def test_copies_and_pickles_are_of_the_object(self, registry: Registry) -> None:
        """copy.copy, copy.deepcopy (of the guard or of an object holding it) and pickling
        used to fail with "'_Guarded' object has no attribute '_ambient_target'" (or a
        PicklingError); they give copies of the object now, counted at the line that
        asked for them."""
        defaults = guard_global({"model": "m", "tools": ["search"]}, name="copies", mode="off")
        holder = Holder(defaults)
        async with registry.open_scope(ctx()):
            private = copy.deepcopy(defaults)  # use: deepcopy
            shallow = copy.copy(defaults)  # use: copy
            held = copy.deepcopy(holder)  # use: deepcopy holder
            pickled = pickle.dumps(holder)  # use: pickle
        unpickled = pickle.loads(pickled)  # noqa: S301 - pickled just above
        private["tools"].append("calc")
        assert unwrap_global(defaults) == {"model": "m", "tools": ["search"]}
        assert shallow == unwrap_global(defaults)
        assert type(shallow) is dict
        assert shallow["tools"] is unwrap_global(defaults)["tools"]
        for copied in (held, unpickled):
            assert type(copied.config) is dict
            assert copied.config == unwrap_global(defaults)
            assert copied.config["tools"] is not unwrap_global(defaults)["tools"]
        counted = {a.lineno: a.count for a in global_state_report().accesses}
        assert counted == {
            line_of(f"use: {u}"): 1 for u in ("deepcopy", "copy", "deepcopy holder", "pickle")
        }

    async def test_a_pickle_by_the_python_pickler_is_counted_at_the_line_that_asked(
        self, registry: Registry
    ) -> None:
        """The pure-Python pickler (the one libraries such as dill extend) reaches the guard
        from frames of the pickle module: the access is still the line that asked for the
        pickle, not a line of pickle's."""
        defaults = guard_global({"model": "m"}, name="python pickle", mode="off")
        buffer = io.BytesIO()
        async with registry.open_scope(ctx()):
            pickle._Pickler(buffer).dump(Holder(defaults))  # use: python pickle
        unpickled = pickle.loads(buffer.getvalue())  # noqa: S301 - pickled just above
        assert type(unpickled.config) is dict
        assert unpickled.config == {"model": "m"}
        counted = {(a.filename, a.lineno): a.count for a in global_state_report().accesses}
        assert counted == {(HERE, line_of("use: python pickle")): 1}

    async def test_a_deep_copy_keeps_what_the_copied_object_shares(
        self, registry: Registry
    ) -> None:
        """An object holding a guarded global and a list that global holds too is
        deep-copied holding one copy of that list in both places, as without the guard:
        the copy of the guarded object is made with the same memo."""
        tools = ["search"]
        defaults = guard_global({"tools": tools}, name="memo", mode="off")
        holder = Holder({"defaults": defaults, "tools": tools})
        async with registry.open_scope(ctx()):
            copied = copy.deepcopy(holder)
        assert copied.config["defaults"]["tools"] is copied.config["tools"]
        assert copied.config["tools"] is not tools
        assert copied.config["tools"] == ["search"]

    async def test_an_object_iterating_both_ways_keeps_both(self, registry: Registry) -> None:
        """The guard of an object that is an iterator and an asynchronous iterator passes
        for both, and next() and anext() both reach it; unwrap_global gives it back."""

        class Both:
            def __init__(self) -> None:
                self.n = 0

            def __iter__(self) -> Both:
                return self

            def __next__(self) -> int:
                self.n += 1
                return self.n

            def __aiter__(self) -> Both:
                return self

            async def __anext__(self) -> int:
                self.n += 10
                return self.n

        inner = Both()
        both = guard_global(inner, name="both", mode="off")
        async with registry.open_scope(ctx()):
            assert next(both) == 1
            assert await anext(both) == 11
        assert isinstance(both, collections.abc.Iterator)
        assert isinstance(both, collections.abc.AsyncIterator)
        assert unwrap_global(both) is inner
        assert global_state_report().by_name() == {"both": 2}

    def test_unwrap_global_unwraps_the_guard_of_an_iterator(self) -> None:
        """unwrap_global gives back a guarded iterator or asynchronous iterator itself,
        and guarding its guard guards it, not the guard."""

        async def numbers() -> AsyncIterator[int]:
            yield 1

        counter = itertools.count()
        stream = numbers()
        for inner in (counter, stream):
            guard = guard_global(inner, name="iterator", mode="off")
            assert unwrap_global(guard) is inner
            assert unwrap_global(guard_global(guard, name="again", mode="off")) is inner

    async def test_next_and_anext_reach_an_iterator(self, registry: Registry) -> None:
        """next() of a guarded iterator used to fail with "'_Guarded' object is not an
        iterator"; next() and anext() reach the iterator now, and only the guard of an
        iterator passes for one."""

        async def numbers() -> AsyncIterator[int]:
            for number in (1, 2):
                yield number

        request_ids = guard_global(itertools.count(1), name="ids", mode="off")
        stream = guard_global(numbers(), name="stream", mode="off")
        async with registry.open_scope(ctx()):
            assert next(request_ids) == 1  # use: next
            assert await anext(stream) == 1  # use: anext
        assert next(request_ids) == 2
        assert [number async for number in stream] == [2]
        assert isinstance(request_ids, collections.abc.Iterator)
        assert isinstance(stream, collections.abc.AsyncIterator)
        assert not isinstance(catalog, collections.abc.Iterator)
        assert not isinstance(catalog, collections.abc.AsyncIterator)
        with pytest.raises(TypeError, match="not an iterator"):
            next(catalog)  # type: ignore[call-overload]
        counted = {a.lineno: a.count for a in global_state_report().accesses}
        assert counted == {line_of("use: next"): 1, line_of("use: anext"): 1}

    def test_json_takes_unwrap_global_as_default(self) -> None:
        """json's C encoder checks the real type, so it refuses a guard; the documented
        way out is default=unwrap_global."""
        config = guard_global({"model": "m"}, name="json", mode="off")
        with pytest.raises(TypeError, match="not JSON serializable"):
            json.dumps({"config": config})
        assert json.dumps({"config": [config]}, default=unwrap_global) == (
            '{"config": [{"model": "m"}]}'
        )


class TestReport:
    async def test_format_and_json(self, registry: Registry) -> None:
        """The report names each global, its replacement and its sites, as text and JSON."""
        other = guard_global(Catalog(), name="another", mode="off")
        quiet = guard_global(Catalog(), name="catalog_quiet", replacement=REPLACEMENT, mode="off")
        async with registry.open_scope(ctx()):
            for _ in range(3):
                quiet.lookup("a")  # report: quiet
            other.lookup("a")  # report: other
        report = global_state_report()
        quiet_site = f"tests/test_migration.py:{line_of('report: quiet')}"
        other_site = f"tests/test_migration.py:{line_of('report: other')}"
        assert report.by_name() == {"another": 1, "catalog_quiet": 3}
        assert report.as_dict() == {
            "total": 4,
            "globals": {
                "another": {"count": 1, "replacement": None, "sites": {other_site: 1}},
                "catalog_quiet": {
                    "count": 3,
                    "replacement": REPLACEMENT,
                    "sites": {quiet_site: 3},
                },
            },
        }
        text = str(report)
        assert text.splitlines()[0] == (
            "Guarded globals touched inside user contexts: 4 access(es), 2 global(s), "
            "2 call site(s)"
        )
        assert f"catalog_quiet: 3  -> {REPLACEMENT}" in text
        assert quiet_site in text
        assert other_site in text

    async def test_a_global_touched_once_names_its_replacement(self, registry: Registry) -> None:
        """The replacement is reported from the first access at a call site on, so a
        global touched only once still says what to use instead."""
        once = guard_global(Catalog(), name="once", replacement=REPLACEMENT, mode="off")
        async with registry.open_scope(ctx()):
            once.lookup("a")
        report = global_state_report()
        assert [(a.name, a.count, a.replacement) for a in report.accesses] == [
            ("once", 1, REPLACEMENT)
        ]
        assert report.as_dict()["globals"]["once"]["replacement"] == REPLACEMENT
        assert f"once: 1  -> {REPLACEMENT}" in str(report)

    async def test_one_global_at_two_sites_adds_up(self, registry: Registry) -> None:
        """A global touched at two call sites counts both, per name and in the JSON."""
        twice = guard_global(Catalog(), name="twice", mode="off")
        async with registry.open_scope(ctx()):
            for _ in range(2):
                twice.lookup("a")  # sites: first
            twice.lookup("b")  # sites: second
        report = global_state_report()
        assert report.by_name() == {"twice": 3}
        entry = report.as_dict()["globals"]["twice"]
        assert entry["count"] == 3
        assert sorted(entry["sites"].values()) == [1, 2]
        assert "twice: 3" in str(report)

    async def test_the_table_lists_globals_by_name_and_sites_by_line(
        self, registry: Registry
    ) -> None:
        """Whatever order the accesses came in, the table names each global once, sorted by
        name, with its replacement when it has one, and its sites by line."""
        beta = guard_global(Catalog(), name="beta", mode="off")
        alpha = guard_global(Catalog(), name="alpha", replacement=REPLACEMENT, mode="off")
        async with registry.open_scope(ctx()):
            for step in ("late", "early"):
                if step == "early":
                    beta.lookup("a")  # table: early
                else:
                    beta.lookup("b")  # table: late
            alpha.lookup("a")  # table: alpha
        report = global_state_report()
        assert [(a.name, a.lineno) for a in report.accesses] == [
            ("alpha", line_of("table: alpha")),
            ("beta", line_of("table: early")),
            ("beta", line_of("table: late")),
        ]
        alpha_site, early_site, late_site = (
            f"tests/test_migration.py:{line_of(marker)}"
            for marker in ("table: alpha", "table: early", "table: late")
        )
        width = max(len(alpha_site), len(early_site), len(late_site))
        assert str(report).splitlines() == [
            "Guarded globals touched inside user contexts: 3 access(es), 2 global(s), "
            "3 call site(s)",
            f"  alpha: 1  -> {REPLACEMENT}",
            f"    {alpha_site:<{width}}  1",
            "  beta: 2",
            f"    {early_site:<{width}}  1",
            f"    {late_site:<{width}}  1",
        ]

    def test_empty_report(self) -> None:
        """With no access the report says so."""
        report = global_state_report()
        assert report.total == 0
        assert report.accesses == ()
        assert str(report) == "No guarded global was touched inside a user context."


# -- rollout ----------------------------------------------------------------------------------


class LegacyEngine:
    """The legacy singleton."""


class ExecutionEngine:
    """The per-request component replacing it; counts creations and cleanups."""

    created = 0
    cleaned = 0

    def __init__(self, context: UserExecutionContext) -> None:
        type(self).created += 1
        self.user_id = context.user_id

    def close(self) -> None:
        type(self).cleaned += 1


LEGACY = LegacyEngine()


class Storage:
    class S3Client:
        """A component class nested in another."""


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Switchable:
    """A factory that fails while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = False
        self.calls = 0

    def __call__(self, context: UserExecutionContext) -> ExecutionEngine:
        self.calls += 1
        if self.failing:
            msg = "engine backend unavailable"
            raise ConnectionError(msg)
        return ExecutionEngine(context)


@pytest.fixture(name="factory")
def fixture_factory() -> Switchable:
    ExecutionEngine.created = ExecutionEngine.cleaned = 0
    return Switchable()


@pytest.fixture(name="engines")
def fixture_engines(factory: Switchable) -> Registry:
    registry = Registry()
    registry.register(ExecutionEngine, factory)
    return registry


async def serve(registry: Registry, rollout: Rollout[Any], user: str) -> Any:
    """One request of ``user`` that resolves through ``rollout``."""
    async with registry.open_scope(ctx(user)):
        return await rollout.resolve()


class TestBucketing:
    def test_stable_and_close_to_the_percentage_over_10000_ids(self) -> None:
        """Over 10,000 user ids each percentage selects within 1 point of its share, the
        same users every time and from a fresh Rollout, and raising it only adds users."""
        ids = [f"user-{n}" for n in range(10_000)]
        previous: set[str] = set()
        for percent in (1, 10, 30, 50, 90):
            rollout = Rollout(ExecutionEngine, legacy=LEGACY, mode="component", percent=percent)
            chosen = {u for u in ids if rollout.includes(u)}
            assert abs(len(chosen) / 100 - percent) <= 1.0, (percent, len(chosen))
            again = Rollout(ExecutionEngine, legacy=LEGACY, mode="component", percent=percent)
            assert {u for u in ids if again.includes(u)} == chosen
            assert previous <= chosen
            previous = chosen
        everyone = Rollout(ExecutionEngine, legacy=LEGACY, percent=100)
        nobody = Rollout(ExecutionEngine, legacy=LEGACY, percent=0)
        assert all(everyone.includes(u) for u in ids)
        assert not any(nobody.includes(u) for u in ids)

    def test_buckets_do_not_depend_on_the_process(self) -> None:
        """The bucket is a fixed function of (salt, tenant, user), not of Python's
        per-process string hash."""
        rollout = Rollout("engine", legacy=LEGACY)
        assert rollout.bucket("alice") == 922
        assert rollout.bucket("alice", "acme") == 7286

    def test_a_percent_between_two_buckets_selects_the_nearer_bucket(self) -> None:
        """A percent is taken to the nearest whole bucket (a hundredth of a percent), so the
        share selected is as close to it as 10,000 buckets allow: a bound less than half a
        bucket above a user's bucket leaves that user out, one more than half above takes
        them in."""
        bucket = Rollout("engine", legacy=LEGACY).bucket("alice")
        below = Rollout("engine", legacy=LEGACY, percent=(bucket + 0.4) / 100)
        above = Rollout("engine", legacy=LEGACY, percent=(bucket + 0.6) / 100)
        assert not below.includes("alice")
        assert above.includes("alice")

    async def test_a_user_in_the_bucket_at_the_threshold_stays_on_legacy(
        self, engines: Registry
    ) -> None:
        """percent selects the buckets below ``percent`` hundredths of 10,000: the user in
        the bucket just at that bound takes the legacy path, as includes() says."""
        bucket = Rollout(ExecutionEngine, legacy=LEGACY).bucket("alice")
        for percent, included in ((bucket / 100, False), ((bucket + 1) / 100, True)):
            rollout: Rollout[Any] = Rollout(
                ExecutionEngine, legacy=LEGACY, mode="component", percent=percent
            )
            assert rollout.includes("alice") is included
            got = await serve(engines, rollout, "alice")
            assert (got is not LEGACY) is included, percent

    def test_salted_by_name(self) -> None:
        """Two rollouts at 30 % pick mostly different users (about 9 % overlap); the same
        salt picks the same users."""
        ids = [f"user-{n}" for n in range(10_000)]
        first = Rollout("engine", legacy=LEGACY, percent=30)
        second = Rollout("bridge", legacy=LEGACY, percent=30)
        together = Rollout("bridge", legacy=LEGACY, percent=30, salt="engine")
        a = {u for u in ids if first.includes(u)}
        b = {u for u in ids if second.includes(u)}
        assert 700 <= len(a & b) <= 1100
        assert {u for u in ids if together.includes(u)} == a

    def test_tenant_is_part_of_the_bucket(self) -> None:
        """The same user id in two tenants is bucketed independently."""
        rollout = Rollout("engine", legacy=LEGACY, percent=50)
        ids = [f"user-{n}" for n in range(1_000)]
        differ = sum(rollout.includes(u, "t1") != rollout.includes(u, "t2") for u in ids)
        assert 350 <= differ <= 650

    async def test_a_request_is_bucketed_with_its_tenant(self, engines: Registry) -> None:
        """A request of a user of a tenant takes the path includes(user, tenant) gives,
        not the one of the same user id without a tenant."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", percent=50
        )
        users = [f"user-{n}" for n in range(100)]
        differ = [u for u in users if rollout.includes(u, "acme") != rollout.includes(u)]
        assert len(differ) >= 20
        for user in differ:
            async with engines.open_scope(ctx(user, "acme")):
                got = await rollout.resolve()
            assert (got is not LEGACY) is rollout.includes(user, "acme"), user

    async def test_a_user_never_flips_between_requests(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """200 concurrent users making 5 requests each at 50 %: each user always takes the
        same path, the one includes() predicts, and gets their own component."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", percent=50
        )
        seen: dict[str, set[str]] = {}

        async def user(n: int) -> None:
            name = f"user-{n}"
            for _ in range(5):
                got = await serve(engines, rollout, name)
                if got is LEGACY:
                    seen.setdefault(name, set()).add("legacy")
                else:
                    assert got.user_id == name
                    seen.setdefault(name, set()).add("component")

        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(user, n)
        assert len(seen) == 200
        for name, paths in seen.items():
            expected = "component" if rollout.includes(name) else "legacy"
            assert paths == {expected}, name
        state = rollout.state()
        on_component = sum(rollout.includes(f"user-{n}") for n in range(200))
        assert 60 <= on_component <= 140
        assert (state.component, state.legacy) == (5 * on_component, 5 * (200 - on_component))
        assert ExecutionEngine.created == ExecutionEngine.cleaned == 5 * on_component


class TestModes:
    async def test_legacy_mode_never_creates_the_component(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """mode='legacy' serves the legacy object to everyone, whatever the percent."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, percent=100)
        for n in range(20):
            assert await serve(engines, rollout, f"user-{n}") is LEGACY
        assert factory.calls == 0
        assert rollout.state().legacy == 20

    async def test_shadow_never_returns_the_component_and_cleans_it(
        self, engines: Registry, metric_reader: InMemoryMetricReader
    ) -> None:
        """In shadow mode 100 concurrent users all get the legacy object, while each of
        their requests created a component that its scope cleaned up."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="shadow")
        got: list[object] = []

        async def user(n: int) -> None:
            async with engines.open_scope(ctx(f"user-{n}")) as scope:
                got.append(await rollout.resolve())
                got.append(await rollout.resolve())
                shadow = await scope.resolve(ExecutionEngine)
                assert shadow.user_id == f"user-{n}"
                assert ExecutionEngine.cleaned < ExecutionEngine.created

        async with anyio.create_task_group() as tg:
            for n in range(100):
                tg.start_soon(user, n)
        assert len(got) == 200
        assert all(g is LEGACY for g in got)
        assert ExecutionEngine.created == ExecutionEngine.cleaned == 100
        state = rollout.state()
        assert (state.shadow, state.component, state.legacy, state.failures) == (100, 0, 0, 0)
        assert counter_values(metric_reader, "ambient.rollout.requests") == {
            (("ambient.rollout", "ExecutionEngine"), ("ambient.rollout.path", "shadow")): 100
        }

    async def test_shadow_failures_are_recorded_not_raised(
        self,
        engines: Registry,
        factory: Switchable,
        metric_reader: InMemoryMetricReader,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A failing shadow component never reaches the request: it gets the legacy
        object; the failure is counted, logged (with a traceback once) and metered."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="shadow")
        factory.failing = True
        with caplog.at_level(logging.WARNING, logger="ambient.migration"):
            for n in range(5):
                assert await serve(engines, rollout, f"user-{n}") is LEGACY
        assert rollout.state().failures == 5
        assert not rollout.state().fallen_back
        failures = [r for r in caplog.records if "shadow path failed" in r.getMessage()]
        assert len(failures) == 5
        assert "engine backend unavailable" in failures[0].getMessage()
        assert [r.exc_info is not None for r in failures] == [True, False, False, False, False]
        assert counter_values(metric_reader, "ambient.rollout.failures") == {
            (("ambient.rollout", "ExecutionEngine"), ("ambient.rollout.path", "shadow")): 5
        }

    @pytest.mark.parametrize("how", ["resolve", "resolve_sync"])
    async def test_a_failed_shadow_is_tried_once_per_request(
        self, engines: Registry, factory: Switchable, how: str
    ) -> None:
        """A request whose shadow component failed gets the legacy object for the rest of
        it without the factory being tried again, and the failure, reported again by the
        application, is counted once."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="shadow")
        factory.failing = True
        async with engines.open_scope(ctx()):
            for _ in range(3):
                if how == "resolve":
                    assert await rollout.resolve() is LEGACY
                else:
                    assert rollout.resolve_sync() is LEGACY
            rollout.record_failure()
        assert factory.calls == 1
        state = rollout.state()
        assert (state.shadow, state.failures, state.window_calls) == (1, 1, 1)

    @pytest.mark.parametrize("how", ["resolve", "resolve_sync"])
    async def test_a_failed_component_is_tried_once_per_request_under_a_rate(
        self, engines: Registry, factory: Switchable, how: str
    ) -> None:
        """With max_error_rate, a request whose component failed is served the legacy
        object for the rest of it, without the factory being tried again."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.5
        )
        factory.failing = True
        async with engines.open_scope(ctx()):
            for _ in range(3):
                if how == "resolve":
                    assert await rollout.resolve() is LEGACY
                else:
                    assert rollout.resolve_sync() is LEGACY
            factory.failing = False
            assert await rollout.resolve() is LEGACY
        assert factory.calls == 1
        assert (rollout.state().failures, rollout.state().window_calls) == (1, 1)

    async def test_a_request_failing_twice_without_a_rate_is_one_failure(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """Without max_error_rate the failure propagates each time the request resolves;
        the request, tried twice and reported by the application too, is one failure."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="component")
        factory.failing = True
        async with engines.open_scope(ctx()):
            for _ in range(2):
                with pytest.raises(ConnectionError):
                    await rollout.resolve()
            rollout.record_failure()
        state = rollout.state()
        assert (state.component, state.failures, state.window_calls) == (1, 1, 1)
        assert state.window_failures == 1

    async def test_component_failure_propagates_without_max_error_rate(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """Without max_error_rate a failing component is the request's error."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="component")
        factory.failing = True
        with pytest.raises(ConnectionError, match="unavailable"):
            await serve(engines, rollout, "alice")
        assert rollout.state().failures == 1
        assert not rollout.state().fallen_back

    async def test_outside_a_context_the_legacy_object(self) -> None:
        """Start-up code and scripts with no context get the legacy object."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="component")
        assert await rollout.resolve() is LEGACY
        assert rollout.resolve_sync() is LEGACY
        assert rollout.state().legacy == 0

    async def test_a_context_without_scope_cannot_get_the_component(self) -> None:
        """bind_context alone has no scope: the component path says so; legacy works."""
        on: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="component")
        off: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="legacy")
        with bind_context(ctx()):
            with pytest.raises(NoActiveContextError, match="scope"):
                await on.resolve()
            assert await off.resolve() is LEGACY

    async def test_resolve_sync_follows_the_same_switch(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """resolve_sync serves the component, shadows it, or falls back like resolve."""
        component: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="component")
        shadow: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="shadow")
        async with engines.open_scope(ctx("alice")) as scope:
            got = component.resolve_sync()
            assert got is scope.resolve_sync(ExecutionEngine)
            assert component.resolve_sync() is got
            assert shadow.resolve_sync() is LEGACY
        factory.failing = True
        guarded: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.5
        )
        async with engines.open_scope(ctx("bob")):
            assert guarded.resolve_sync() is LEGACY
            assert shadow.resolve_sync() is LEGACY
            with pytest.raises(ConnectionError):
                component.resolve_sync()
        assert guarded.state().failures == 1

    async def test_one_request_resolving_from_many_tasks_counts_once(
        self, engines: Registry
    ) -> None:
        """50 tasks of one request resolving at once share one decision and one count."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="component")
        got: list[object] = []
        async with engines.open_scope(ctx()):

            async def one() -> None:
                got.append(await rollout.resolve())

            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(one)
        assert len({id(g) for g in got}) == 1
        assert got[0] is not LEGACY
        assert rollout.state().component == 1
        assert rollout.state().window_calls == 1

    async def test_two_threads_of_one_request_deciding_at_once_count_once(
        self, engines: Registry
    ) -> None:
        """Two worker threads of one request that both find no decision yet, and decide
        together, keep the one stored first: the request is counted once."""
        both_deciding = threading.Barrier(2, timeout=10)

        class Together(Rollout[Any]):
            def bucket(self, user_id: str, tenant_id: str | None = None) -> int:
                both_deciding.wait()  # each thread has looked for a decision and found none
                return super().bucket(user_id, tenant_id)

        rollout = Together(ExecutionEngine, legacy=LEGACY, mode="component")
        got: list[object] = []
        async with engines.open_scope(ctx()):

            async def one() -> None:
                got.append(await anyio.to_thread.run_sync(rollout.resolve_sync))

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one)
                    tg.start_soon(one)
        assert len(got) == 2
        assert LEGACY not in got
        state = rollout.state()
        assert (state.component, state.legacy, state.window_calls) == (1, 0, 1)


class TestFallback:
    async def test_failures_above_the_rate_fall_back_within_one_window(
        self,
        engines: Registry,
        factory: Switchable,
        metric_reader: InMemoryMetricReader,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Half the component requests failing, one a second, against max_error_rate 0.25:
        after the 20th request (20 s into a 60 s window) the switch has fallen back; no
        request saw an error; the fallback shows in state(), an ERROR log and a metric;
        later requests never touch the component until reset()."""
        clock = FakeClock()
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine,
            legacy=LEGACY,
            mode="component",
            max_error_rate=0.25,
            window=60,
            clock=clock,
        )
        served: list[object] = []
        with caplog.at_level(logging.WARNING, logger="ambient.migration"):
            for n in range(20):
                assert not rollout.state().fallen_back, n
                factory.failing = n % 2 == 1
                served.append(await serve(engines, rollout, f"user-{n}"))
                clock.now += 1.0
        state = rollout.state()
        assert state.fallen_back
        assert state.effective_mode == "legacy"
        assert state.mode == "component"
        assert (state.window_calls, state.window_failures, state.fallbacks) == (20, 10, 1)
        assert state.error_rate == 0.5
        assert state.reason is not None
        assert "10 of 20" in state.reason
        assert [s is LEGACY for s in served] == [n % 2 == 1 for n in range(20)]
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "rollout ExecutionEngine fell back to legacy" in errors[0].getMessage()
        assert counter_values(metric_reader, "ambient.rollout.fallbacks") == {
            (("ambient.rollout", "ExecutionEngine"),): 1
        }

        factory.failing = False
        calls = factory.calls
        for n in range(10):
            assert await serve(engines, rollout, f"user-{n}") is LEGACY
        assert factory.calls == calls
        assert repr(rollout) == "<Rollout ExecutionEngine fallen back 100%>"

        rollout.reset()
        state = rollout.state()
        assert (state.fallen_back, state.reason) == (False, None)
        assert (state.window_calls, state.window_failures) == (0, 0)
        assert (await serve(engines, rollout, "user-0")).user_id == "user-0"
        # After a reset the first failure is logged with its traceback again.
        factory.failing = True
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ambient.migration"):
            for n in range(2):
                assert await serve(engines, rollout, f"user-{n}") is LEGACY
        failed = [r for r in caplog.records if "component path failed" in r.getMessage()]
        assert [r.exc_info is not None for r in failed] == [True, False]

    @pytest.mark.parametrize("mode", ["component", "shadow"])
    @pytest.mark.parametrize("decided", ["in the request", "after it"])
    async def test_work_that_outlived_its_request_is_no_component_failure(
        self, engines: Registry, decided: str, mode: RolloutMode
    ) -> None:
        """A task still running after its request's scope closed gets ScopeClosedError from
        the component path, as from any resolution, never the legacy global in its place
        (a shadow hands it the legacy object, as always); and its mistake is not counted
        against the component (enough of them made every user fall back)."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode=mode, max_error_rate=0.25, min_calls=1
        )
        closed = anyio.Event()
        outcome: list[object] = []

        async def late() -> None:
            await closed.wait()
            try:
                outcome.append(await rollout.resolve())
            except ScopeClosedError:
                outcome.append("ScopeClosedError")
            try:
                outcome.append(rollout.resolve_sync())
            except ScopeClosedError:
                outcome.append("ScopeClosedError")

        async with anyio.create_task_group() as service:
            async with engines.open_scope(ctx("alice")):
                if decided == "in the request":
                    await rollout.resolve()
                service.start_soon(late)
            closed.set()
        late_gets = LEGACY if mode == "shadow" else "ScopeClosedError"
        assert outcome == [late_gets, late_gets]
        state = rollout.state()
        assert (state.failures, state.window_failures, state.fallen_back) == (0, 0, False)

    @pytest.mark.parametrize("mode", ["component", "shadow"])
    async def test_work_that_outlived_its_request_resolving_sync_first(
        self, engines: Registry, mode: RolloutMode
    ) -> None:
        """resolve_sync, first of the request after its scope closed, raises
        ScopeClosedError on the component path and gives the legacy object in shadow
        mode, like resolve; nothing is counted against the component."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode=mode, max_error_rate=0.25, min_calls=1
        )
        closed = anyio.Event()
        outcome: list[object] = []

        async def late() -> None:
            await closed.wait()
            try:
                outcome.append(rollout.resolve_sync())
            except ScopeClosedError:
                outcome.append("ScopeClosedError")

        async with anyio.create_task_group() as service:
            async with engines.open_scope(ctx("alice")):
                service.start_soon(late)
            closed.set()
        assert outcome == [LEGACY if mode == "shadow" else "ScopeClosedError"]
        state = rollout.state()
        assert (state.failures, state.window_failures, state.fallen_back) == (0, 0, False)

    @pytest.mark.parametrize(
        ("mode", "change", "late_gets"),
        [
            ("component", ("mode", "legacy"), "ScopeClosedError"),
            ("component", ("percent", 0), "ScopeClosedError"),
            ("component", ("mode", "shadow"), "ScopeClosedError"),
            ("legacy", ("mode", "component"), "legacy"),
            ("shadow", ("mode", "component"), "legacy"),
        ],
    )
    async def test_work_that_outlived_its_request_keeps_its_path_after_a_change(
        self, engines: Registry, mode: RolloutMode, change: tuple[str, Any], late_gets: str
    ) -> None:
        """The switch changed after a request ended, and a task of that request still
        running resolves: it keeps the request's path, as every resolve of the request
        does (a component request's task gets ScopeClosedError, never the legacy global;
        a legacy or shadow one's the legacy object, never ScopeClosedError), and the
        request stays one request of its path in the counts. The request's decision was
        kept in its scope's state, emptied when the scope closed: the late task decided
        again, by the new setting, and counted a second request."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode=mode)
        closed = anyio.Event()
        outcome: list[object] = []

        async def late() -> None:
            await closed.wait()
            for sync in (False, True):
                try:
                    got = rollout.resolve_sync() if sync else await rollout.resolve()
                except ScopeClosedError:
                    got = "ScopeClosedError"
                outcome.append("legacy" if got is LEGACY else got)

        async with anyio.create_task_group() as service:
            async with engines.open_scope(ctx("alice")):
                first = await rollout.resolve()
                assert (first is LEGACY) is (mode != "component")
                service.start_soon(late)
            setattr(rollout, *change)
            closed.set()
        assert outcome == [late_gets, late_gets]
        state = rollout.state()
        assert (state.legacy, state.shadow, state.component) == (
            int(mode == "legacy"),
            int(mode == "shadow"),
            int(mode == "component"),
        )

    async def test_requests_in_flight_failing_after_a_fallback_fall_back_once(
        self, engines: Registry, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Five requests on the component path at once, all failing: the first failure
        falls back; those still in flight count as failures but make no second fallback
        nor a second ERROR log."""
        names = [f"user-{n}" for n in range(5)]
        release, all_waiting = anyio.Event(), anyio.Event()
        waiting: list[str] = []

        async def failing(context: UserExecutionContext) -> ExecutionEngine:
            waiting.append(context.user_id)
            if len(waiting) == len(names):
                all_waiting.set()
            await release.wait()
            msg = "engine backend unavailable"
            raise ConnectionError(msg)

        registry = Registry()
        registry.register(ExecutionEngine, failing)
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.0, min_calls=1
        )
        got: dict[str, object] = {}

        async def user(name: str) -> None:
            got[name] = await serve(registry, rollout, name)

        with caplog.at_level(logging.WARNING, logger="ambient.migration"), anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(user, name)
                await all_waiting.wait()
                release.set()
        assert got == dict.fromkeys(names, LEGACY)
        state = rollout.state()
        assert (state.fallen_back, state.fallbacks, state.failures) == (True, 1, 5)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1

    async def test_concurrent_failures_fall_back_without_errors(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """100 concurrent users against a broken component: nobody gets an exception,
        everybody gets the legacy object, and the switch has fallen back once."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.1
        )
        factory.failing = True
        got: list[object] = []

        async def user(n: int) -> None:
            got.append(await serve(engines, rollout, f"user-{n}"))

        async with anyio.create_task_group() as tg:
            for n in range(100):
                tg.start_soon(user, n)
        assert len(got) == 100
        assert all(g is LEGACY for g in got)
        state = rollout.state()
        assert state.fallen_back
        assert state.fallbacks == 1
        assert 20 <= state.failures <= 100

    async def test_failing_shadows_fall_back_too(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """Shadow failures count in the window: above the rate the switch stops creating
        shadow components, so a broken factory stops costing the requests anything."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="shadow", max_error_rate=0.5
        )
        factory.failing = True
        for n in range(20):
            assert await serve(engines, rollout, f"user-{n}") is LEGACY
        assert rollout.state().fallen_back
        assert factory.calls == 20
        for n in range(5):
            assert await serve(engines, rollout, f"user-{n}") is LEGACY
        assert factory.calls == 20
        assert rollout.state().legacy == 5

    async def test_fewer_than_min_calls_never_fall_back(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """19 failures out of 19 calls are below min_calls=20: no fallback yet."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.1
        )
        factory.failing = True
        for n in range(19):
            assert await serve(engines, rollout, f"user-{n}") is LEGACY
        assert not rollout.state().fallen_back
        assert rollout.state().window_failures == 19

    async def test_failures_slide_out_of_the_window(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """15 failures, a window later 15 more: no window ever held 20 calls."""
        clock = FakeClock()
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine,
            legacy=LEGACY,
            mode="component",
            max_error_rate=0.1,
            window=60,
            clock=clock,
        )
        factory.failing = True
        for _ in range(2):
            for n in range(15):
                await serve(engines, rollout, f"user-{n}")
            assert rollout.state().window_calls == 15
            clock.now += 61
            assert rollout.state().window_calls == 0
        assert not rollout.state().fallen_back
        assert rollout.state().failures == 30

    async def test_the_window_slides_by_twelfths(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """Failures at the start of a 60 s window and successes 55 s later: a minute after
        the failures only they have left the window, and the successes stay counted."""
        clock = FakeClock()
        clock.now = 1_200.0  # the start of a bucket of 5 s
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine,
            legacy=LEGACY,
            mode="component",
            max_error_rate=0.9,
            window=60,
            clock=clock,
        )
        factory.failing = True
        for n in range(3):
            await serve(engines, rollout, f"user-{n}")
        clock.now += 55
        factory.failing = False
        for n in range(4):
            await serve(engines, rollout, f"user-{n}")
        state = rollout.state()
        assert (state.window_calls, state.window_failures) == (7, 3)
        clock.now += 6
        state = rollout.state()
        assert (state.window_calls, state.window_failures) == (4, 0)
        assert state.error_rate == 0.0
        clock.now += 60
        assert (rollout.state().window_calls, rollout.state().window_failures) == (0, 0)

    async def test_a_call_counts_for_eleven_to_twelve_twelfths_of_the_window(
        self, engines: Registry
    ) -> None:
        """Calls at the start and near the end of one 5 s bucket of a 60 s window: both
        are still counted 59.9 s after the first, and both leave together 60 s after it."""
        clock = FakeClock()
        clock.now = 1_205.0  # the start of a bucket of 5 s
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", window=60, clock=clock
        )
        await serve(engines, rollout, "early")
        clock.now = 1_209.9
        await serve(engines, rollout, "late")
        clock.now = 1_264.9
        assert rollout.state().window_calls == 2
        clock.now = 1_265.0
        assert rollout.state().window_calls == 0

    async def test_a_rate_below_the_threshold_keeps_the_component(
        self, engines: Registry, factory: Switchable, metric_reader: InMemoryMetricReader
    ) -> None:
        """One failure in ten against max_error_rate 0.2 never falls back; the failures
        metric counts the ten failures, not the successes."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.2
        )
        for n in range(100):
            factory.failing = n % 10 == 0
            await serve(engines, rollout, f"user-{n}")
        state = rollout.state()
        assert not state.fallen_back
        assert (state.window_calls, state.window_failures) == (100, 10)
        assert counter_values(metric_reader, "ambient.rollout.failures") == {
            (("ambient.rollout", "ExecutionEngine"), ("ambient.rollout.path", "component")): 10
        }

    async def test_a_rate_at_the_threshold_keeps_the_component(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """max_error_rate is the rate the switch tolerates: 2 failures in 4 against 0.5
        keep the component, the next failure (3 in 5) falls back."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.5, min_calls=4
        )
        for n in range(4):
            factory.failing = n % 2 == 1
            await serve(engines, rollout, f"user-{n}")
        state = rollout.state()
        assert (state.window_calls, state.window_failures) == (4, 2)
        assert not state.fallen_back
        factory.failing = True
        assert await serve(engines, rollout, "user-4") is LEGACY
        assert rollout.state().fallen_back

    async def test_the_request_that_completes_min_calls_falls_back_when_it_succeeds(
        self, engines: Registry, factory: Switchable, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Two failures in the first three requests, then a success that makes min_calls
        (4): the window holds 4 requests failing at 0.5, above max_error_rate 0.25, so the
        switch falls back then, as it does when the 4th request is the failure. It went on
        with the component until the next failure came."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.25, min_calls=4
        )
        with caplog.at_level(logging.WARNING, logger="ambient.migration"):
            for n in range(4):
                assert not rollout.state().fallen_back, n
                factory.failing = n in (0, 2)
                await serve(engines, rollout, f"user-{n}")
        state = rollout.state()
        assert (state.window_calls, state.window_failures) == (4, 2)
        assert state.fallen_back
        assert state.reason is not None
        assert "2 of 4" in state.reason
        assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2 + [logging.ERROR]
        assert caplog.records[-1].ambient_rollout == "ExecutionEngine"
        calls = factory.calls
        assert await serve(engines, rollout, "user-4") is LEGACY
        assert factory.calls == calls

    async def test_failures_reported_by_the_application_count(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """record_failure() counts a component that was created but then failed in use."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.5, min_calls=4
        )
        rollout.record_failure()  # outside a request: nothing to count
        for n in range(4):
            async with engines.open_scope(ctx(f"user-{n}")):
                assert await rollout.resolve() is not LEGACY
                rollout.record_failure()
                rollout.record_failure()  # once per request
        assert rollout.state().fallen_back
        assert rollout.state().window_calls == 4
        async with engines.open_scope(ctx("late")):
            assert await rollout.resolve() is LEGACY
            rollout.record_failure()  # on legacy: not the component's failure
        assert rollout.state().failures == 4

    async def test_a_failure_reported_a_window_after_its_request_began_counts_with_it(
        self, engines: Registry
    ) -> None:
        """Two long requests (a stream, a websocket) take the component path, a window
        later a short one succeeds, then the long ones report failures: each counts as a
        call of the window again with its failure, so the window never holds more
        failures than calls and the fallback names 2 failures of 3 requests."""
        clock = FakeClock()
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine,
            legacy=LEGACY,
            mode="component",
            max_error_rate=0.5,
            min_calls=1,
            window=60,
            clock=clock,
        )
        opened = [anyio.Event(), anyio.Event()]
        fail = [anyio.Event(), anyio.Event()]
        reported = [anyio.Event(), anyio.Event()]

        async def long_request(n: int) -> None:
            async with engines.open_scope(ctx(f"long-{n}")):
                assert await rollout.resolve() is not LEGACY
                opened[n].set()
                await fail[n].wait()
                rollout.record_failure()
                reported[n].set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n in range(2):
                    tg.start_soon(long_request, n)
                    await opened[n].wait()
                assert rollout.state().window_calls == 2
                clock.now += 61
                assert await serve(engines, rollout, "short") is not LEGACY
                fail[0].set()
                await reported[0].wait()
                state = rollout.state()
                assert (state.window_calls, state.window_failures) == (2, 1)
                assert not state.fallen_back
                fail[1].set()
        state = rollout.state()
        assert (state.window_calls, state.window_failures) == (3, 2)
        assert state.error_rate <= 1
        assert state.reason is not None
        assert state.reason.startswith("2 of 3 component-path requests failed")
        assert (state.component, state.failures) == (3, 2)

    async def test_a_failure_reported_late_leaves_the_window_with_its_request(
        self, engines: Registry
    ) -> None:
        """A request resolves the component at the start of a 60 s window and reports a
        failure 55 s later: the request counts once, and 6 s later, when its start has left
        the window, its failure still has its call beside it (1 of 1, not 1 of 0)."""
        clock = FakeClock()
        clock.now = 1_200.0  # the start of a bucket of 5 s
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.9, clock=clock
        )
        async with engines.open_scope(ctx("streaming")):
            assert await rollout.resolve() is not LEGACY
            clock.now += 55
            rollout.record_failure()
            state = rollout.state()
            assert (state.window_calls, state.window_failures) == (1, 1)
        clock.now += 6
        state = rollout.state()
        assert (state.window_calls, state.window_failures) == (1, 1)
        assert state.error_rate == 1.0
        clock.now += 60
        assert (rollout.state().window_calls, rollout.state().window_failures) == (0, 0)

    async def test_a_failure_reported_after_a_reset_counts_its_request_again(
        self, engines: Registry
    ) -> None:
        """reset() forgets the window: a request from before it that reports a failure
        after it counts as a call again beside its failure, and moves no call of a request
        made after the reset."""
        clock = FakeClock()
        clock.now = 1_200.0  # the start of a bucket of 5 s
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.9, clock=clock
        )
        opened, fail = anyio.Event(), anyio.Event()

        async def long_request() -> None:
            async with engines.open_scope(ctx("before")):
                assert await rollout.resolve() is not LEGACY
                opened.set()
                await fail.wait()
                rollout.record_failure()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_request)
                await opened.wait()
                rollout.reset()
                assert await serve(engines, rollout, "after") is not LEGACY
                clock.now += 30
                fail.set()
        state = rollout.state()
        assert (state.window_calls, state.window_failures) == (2, 1)
        clock.now += 31
        state = rollout.state()
        assert (state.window_calls, state.window_failures) == (1, 1)

    @pytest.mark.parametrize("made", [True, False], ids=["made", "factory-fails"])
    async def test_a_failure_reported_while_the_component_is_made_counts_one_request(
        self, made: bool
    ) -> None:
        """Another task of the request reports a failure while the first is still making
        the component, which is then made or fails: the request is one call of the window,
        with its one failure, counted once in the failures too."""
        started, release = anyio.Event(), anyio.Event()

        async def slow(context: UserExecutionContext) -> ExecutionEngine:
            started.set()
            await release.wait()
            if not made:
                msg = "engine backend unavailable"
                raise ConnectionError(msg)
            return ExecutionEngine(context)

        registry = Registry()
        registry.register(ExecutionEngine, slow)
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.5
        )

        async def report() -> None:
            await started.wait()
            rollout.record_failure()
            release.set()

        with anyio.fail_after(10):
            async with registry.open_scope(ctx()), anyio.create_task_group() as tg:
                tg.start_soon(report)
                assert (await rollout.resolve() is not LEGACY) is made
        state = rollout.state()
        assert (state.window_calls, state.window_failures) == (1, 1)
        assert (state.component, state.failures) == (1, 1)

    @pytest.mark.parametrize("made", [True, False], ids=["made", "factory-fails"])
    async def test_a_request_retrying_a_cancelled_resolve_counts_the_retry(
        self, made: bool, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A request whose first resolve() was cancelled (a timeout around it) and that
        resolves again counts as the retry went: one call of the window, and when the
        factory fails, a logged failure that can make the switch fall back."""
        first_try = anyio.CancelScope()

        async def factory(context: UserExecutionContext) -> ExecutionEngine:
            if not first_try.cancel_called:
                first_try.cancel()
                await anyio.sleep_forever()
            if not made:
                msg = "engine backend unavailable"
                raise ConnectionError(msg)
            return ExecutionEngine(context)

        registry = Registry()
        registry.register(ExecutionEngine, factory)
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.5, min_calls=1
        )
        with caplog.at_level(logging.WARNING, logger="ambient.migration"):
            async with registry.open_scope(ctx()):
                with first_try:
                    await rollout.resolve()
                assert first_try.cancelled_caught
                assert (await rollout.resolve() is not LEGACY) is made
        state = rollout.state()
        assert (state.component, state.window_calls) == (1, 1)
        assert (state.window_failures, state.failures, state.fallen_back) == (
            (0, 0, False) if made else (1, 1, True)
        )
        failed = [r for r in caplog.records if "the component path failed" in r.getMessage()]
        assert len(failed) == (0 if made else 1)

    @pytest.mark.parametrize("made", [True, False], ids=["made", "factory-fails"])
    async def test_a_request_retrying_a_cancelled_shadow_makes_the_shadow(
        self, made: bool, caplog: pytest.LogCaptureFixture
    ) -> None:
        """In shadow mode a request whose first resolve() was cancelled (a timeout around
        it) before its component was made, and that resolves again, makes the shadow on the
        retry as a first resolve would: the component is created (or its failure logged),
        the request gets the legacy object and counts once. The retry returned the legacy
        object without making the shadow: no comparison for that request."""
        first_try = anyio.CancelScope()
        created: list[str] = []

        async def factory(context: UserExecutionContext) -> ExecutionEngine:
            if not first_try.cancel_called:
                first_try.cancel()
                await anyio.sleep_forever()
            if not made:
                msg = "engine backend unavailable"
                raise ConnectionError(msg)
            created.append(context.user_id)
            return ExecutionEngine(context)

        registry = Registry()
        registry.register(ExecutionEngine, factory)
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="shadow")
        with caplog.at_level(logging.WARNING, logger="ambient.migration"):
            async with registry.open_scope(ctx()):
                with first_try:
                    await rollout.resolve()
                assert first_try.cancelled_caught
                assert await rollout.resolve() is LEGACY
                assert await rollout.resolve() is LEGACY  # made once, counted once
        assert created == (["alice"] if made else [])
        state = rollout.state()
        assert (state.shadow, state.window_calls) == (1, 1)
        assert (state.window_failures, state.failures) == ((0, 0) if made else (1, 1))
        failed = [r for r in caplog.records if "the shadow path failed" in r.getMessage()]
        assert len(failed) == (0 if made else 1)

    async def test_a_task_resolving_while_another_makes_the_shadow_is_not_held_up(
        self,
    ) -> None:
        """In shadow mode the request's other tasks get the legacy object at once while one
        task makes the shadow: the shadow costs them no wait, and it is made once."""
        started, release = anyio.Event(), anyio.Event()
        made: list[str] = []

        async def slow(context: UserExecutionContext) -> ExecutionEngine:
            started.set()
            await release.wait()
            made.append(context.user_id)
            return ExecutionEngine(context)

        registry = Registry()
        registry.register(ExecutionEngine, slow)
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="shadow")
        got: list[object] = []

        async def first() -> None:
            got.append(await rollout.resolve())

        with anyio.fail_after(10):
            async with registry.open_scope(ctx()), anyio.create_task_group() as tg:
                tg.start_soon(first)
                await started.wait()
                assert await rollout.resolve() is LEGACY  # release is not set yet
                release.set()
        assert (got, made) == ([LEGACY], ["alice"])
        state = rollout.state()
        assert (state.shadow, state.window_calls) == (1, 1)

    async def test_tasks_of_a_request_failing_together_log_and_count_one_failure(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Three tasks of one request resolve at once and the component fails for all:
        each gets the legacy object, and the request is one logged failure of one call."""
        release = anyio.Event()
        got: list[object] = []

        async def failing(context: UserExecutionContext) -> ExecutionEngine:
            await release.wait()
            msg = "engine backend unavailable"
            raise ConnectionError(msg)

        registry = Registry()
        registry.register(ExecutionEngine, failing)
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.5
        )

        async def task() -> None:
            got.append(await rollout.resolve())

        with caplog.at_level(logging.WARNING, logger="ambient.migration"), anyio.fail_after(10):
            async with registry.open_scope(ctx()), anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(task)
                await anyio.wait_all_tasks_blocked()
                release.set()
        assert got == [LEGACY] * 3
        state = rollout.state()
        assert (state.component, state.window_calls, state.window_failures) == (1, 1, 1)
        assert state.failures == 1
        failed = [r for r in caplog.records if " path failed " in r.getMessage()]
        assert len(failed) == 1

    async def test_tasks_of_a_request_waiting_on_a_failed_component_get_the_legacy_object(
        self,
    ) -> None:
        """Three tasks of one request resolve at once under a rate; making the component
        fails once, and the registry makes it again for the tasks that waited on that
        attempt: the request is on legacy for good once its first attempt failed, so
        those tasks get the legacy object too, never the component made by the retry
        beside the legacy object of the first (the request mixed the two)."""
        attempts: list[str] = []

        async def flaky(context: UserExecutionContext) -> ExecutionEngine:
            attempts.append(context.user_id)
            await anyio.lowlevel.checkpoint()
            if len(attempts) == 1:
                msg = "engine backend unavailable"
                raise ConnectionError(msg)
            return ExecutionEngine(context)

        registry = Registry()
        registry.register(ExecutionEngine, flaky)
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.5
        )
        got: list[object] = []

        async def task() -> None:
            got.append(await rollout.resolve())

        with anyio.fail_after(10):
            async with registry.open_scope(ctx()), anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(task)
            assert got == [LEGACY] * 3
            async with registry.open_scope(ctx()):
                assert await rollout.resolve() is not LEGACY  # the next request: its own
        state = rollout.state()
        assert (state.component, state.window_calls, state.window_failures) == (2, 2, 1)

    async def test_failures_of_a_shadow_reported_by_the_application_count(
        self, engines: Registry
    ) -> None:
        """record_failure() counts a shadow component that failed in use as it counts a
        component: the shadow is there to find such failures before users get it."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="shadow", max_error_rate=0.5, min_calls=2
        )
        for n in range(2):
            async with engines.open_scope(ctx(f"user-{n}")):
                assert await rollout.resolve() is LEGACY
                rollout.record_failure()
        state = rollout.state()
        assert (state.shadow, state.window_calls, state.window_failures) == (2, 2, 2)
        assert state.failures == 2
        assert state.fallen_back

    async def test_fallbacks_add_up_across_resets(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """A switch that falls back, is reset and falls back again counts two fallbacks and
        every failure; its reason names the window as given, 30.0 s as "30 s"."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine,
            legacy=LEGACY,
            mode="component",
            max_error_rate=0.5,
            min_calls=2,
            window=30.0,
        )
        factory.failing = True
        for round_ in range(2):
            for n in range(2):
                await serve(engines, rollout, f"user-{round_}-{n}")
            state = rollout.state()
            assert state.fallen_back
            assert (state.fallbacks, state.failures) == (round_ + 1, 2 * round_ + 2)
            assert state.reason == (
                "2 of 2 component-path requests failed in the last 30 s, above max_error_rate 0.5"
            )
            rollout.reset()
        assert (rollout.state().fallen_back, rollout.state().fallbacks) == (False, 2)

    async def test_a_rate_and_window_given_as_fractions_fall_back(
        self, engines: Registry, factory: Switchable
    ) -> None:
        """A rate and a window that are Fractions (numbers the constructor takes) fall back
        as floats do: the request whose failure makes the switch fall back is served the
        legacy object, where it got a TypeError from formatting the reason, and the
        reason and state read as for floats."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine,
            legacy=LEGACY,
            mode="component",
            max_error_rate=Fraction(1, 4),
            window=Fraction(30),
            min_calls=1,
        )
        factory.failing = True
        assert await serve(engines, rollout, "alice") is LEGACY
        state = rollout.state()
        assert state.reason == (
            "1 of 1 component-path requests failed in the last 30 s, above max_error_rate 0.25"
        )
        assert (rollout.max_error_rate, rollout.window) == (0.25, 30.0)

    def test_a_reset_without_a_fallback_logs_nothing(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """reset() says it resumes only when there was a fallback to resume from."""
        rollout: Rollout[Any] = Rollout(
            ExecutionEngine, legacy=LEGACY, mode="component", max_error_rate=0.5
        )
        with caplog.at_level(logging.DEBUG, logger="ambient.migration"):
            rollout.reset()
        assert [r.getMessage() for r in caplog.records if r.name == "ambient.migration"] == []


class TestRuntimeChanges:
    async def test_percent_change_affects_new_requests_only(self, engines: Registry) -> None:
        """A request in flight keeps its path when the percent changes; the next request
        of the same user follows the new percent."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="component", percent=0)
        async with engines.open_scope(ctx("alice")):
            assert await rollout.resolve() is LEGACY
            rollout.percent = 100
            async with anyio.create_task_group() as tg:
                # a new request of the same user while the first is still running
                tg.start_soon(self._expect_component, engines, rollout, "alice")
            assert await rollout.resolve() is LEGACY
        async with engines.open_scope(ctx("alice")):
            rollout.percent = 0
            assert await rollout.resolve() is LEGACY
        assert await serve(engines, rollout, "alice") is LEGACY

    @staticmethod
    async def _expect_component(registry: Registry, rollout: Rollout[Any], user: str) -> None:
        async with registry.open_scope(ctx(user), allow_switch=True):
            got = await rollout.resolve()
            assert got is not LEGACY
            assert got.user_id == user

    async def test_mode_change_affects_new_requests_only(self, engines: Registry) -> None:
        """Switching mode at run time leaves requests in flight on their path."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, mode="component")
        async with engines.open_scope(ctx("alice")):
            first = await rollout.resolve()
            assert first is not LEGACY
            rollout.mode = "legacy"
            assert await rollout.resolve() is first
        assert await serve(engines, rollout, "alice") is LEGACY
        rollout.mode = "shadow"
        assert await serve(engines, rollout, "alice") is LEGACY
        assert rollout.state().shadow == 1

    @pytest.mark.parametrize("name", ["执行引擎", "___", " "])
    def test_a_name_with_no_ascii_letter_or_digit_is_refused(self, name: str) -> None:
        """A name that gives no environment variable name (a class named in another
        script, say) is a ValueError saying to pass an ASCII ``name=``: every such rollout
        read the same ``AMBIENT_ROLLOUT__MODE`` and ``_PERCENT``, so one variable set for
        one switched them all. A name with an ASCII letter or digit keeps working."""
        with pytest.raises(ValueError, match="no ASCII letter or digit") as info:
            Rollout(name, legacy=LEGACY)
        assert repr(name) in str(info.value)
        assert Rollout("引擎2", legacy=LEGACY).env_prefix == "AMBIENT_ROLLOUT_2_"

    def test_refused_values_are_echoed_in_at_most_64_characters(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A refused mode, rate, window, minimum of calls, name or environment value is
        named in its error cut to 64 characters, however long it is."""
        long = "x" * 10_000
        big = 10**400
        refusals: list[Callable[[], object]] = [
            lambda: Rollout("x", legacy=LEGACY, mode=long),  # type: ignore[arg-type]
            lambda: Rollout("x", legacy=LEGACY, max_error_rate=big),
            lambda: Rollout("x", legacy=LEGACY, window=-big),
            lambda: Rollout("x", legacy=LEGACY, min_calls=-big),
            lambda: Rollout(ExecutionEngine, legacy=LEGACY, name=[long]),  # type: ignore[arg-type]
            lambda: guard_global(Catalog(), name="x", mode=long),  # type: ignore[arg-type]
            lambda: guard_global(Catalog(), name=[long]),  # type: ignore[arg-type]
        ]
        for refused in refusals:
            with pytest.raises(ValueError, match="must be|needs a non-empty name") as info:
                refused()
            assert len(str(info.value)) < 200, str(info.value)[:300]
        monkeypatch.setenv("AMBIENT_ROLLOUT_X_PERCENT", long)
        with pytest.raises(ValueError, match="AMBIENT_ROLLOUT_X_PERCENT") as info:
            Rollout("x", legacy=LEGACY)
        assert len(str(info.value)) < 200

    def test_a_whole_percent_reads_back_as_a_float(self) -> None:
        """A percent given as a whole number, to the constructor or at run time, is the
        float the attribute is declared as, in the state and its repr too."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, percent=50)
        assert type(rollout.percent) is float
        rollout.percent = 20
        assert type(rollout.percent) is float
        assert "percent=20.0," in repr(rollout.state())

    def test_invalid_changes_are_refused(self) -> None:
        """Unknown modes and percentages outside 0..100 raise and change nothing."""
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, percent=10)
        with pytest.raises(ValueError, match="mode must be one of legacy, shadow, component"):
            rollout.mode = "half"  # type: ignore[assignment]
        with pytest.raises(ValueError, match="from 0 to 100"):
            rollout.percent = 101
        with pytest.raises(TypeError):
            rollout.percent = "50"  # type: ignore[assignment]
        with pytest.raises(TypeError, match="True"):
            rollout.percent = True
        assert (rollout.mode, rollout.percent) == ("legacy", 10)

    def test_constructor_arguments_are_checked(self) -> None:
        """Rates, windows and minimum calls outside their ranges are refused."""
        with pytest.raises(ValueError, match="max_error_rate"):
            Rollout("x", legacy=LEGACY, max_error_rate=1.0)
        with pytest.raises(ValueError, match="window"):
            Rollout("x", legacy=LEGACY, window=0)
        with pytest.raises(ValueError, match="min_calls"):
            Rollout("x", legacy=LEGACY, min_calls=0)
        with pytest.raises(ValueError, match="name"):
            Rollout("x", legacy=LEGACY, name="")

    @pytest.mark.parametrize("window", [5e-324, 1e-310, 1e-7])
    def test_a_window_shorter_than_a_microsecond_is_refused(self, window: float) -> None:
        """A window shorter than a microsecond is refused when the rollout is made: one
        of 5e-324 s has a twelfth of zero, one of 1e-310 s turns a clock reading into
        infinity when divided by its twelfth, and every component-path request failed
        on it (ZeroDivisionError, OverflowError) instead of being served."""
        with pytest.raises(ValueError, match=r"window must be at least 1e-06 seconds"):
            Rollout("x", legacy=LEGACY, window=window)
        assert Rollout("x", legacy=LEGACY, window=1e-6).window == 1e-6


class TestEnvironment:
    def test_variables_override_the_arguments(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """AMBIENT_ROLLOUT_<NAME>_MODE and _PERCENT override the constructor; the name is
        the key's name in upper snake case."""
        monkeypatch.setenv("AMBIENT_ROLLOUT_EXECUTION_ENGINE_MODE", " Shadow ")
        monkeypatch.setenv("AMBIENT_ROLLOUT_EXECUTION_ENGINE_PERCENT", "12.5")
        rollout: Rollout[Any] = Rollout(ExecutionEngine, legacy=LEGACY, percent=100)
        assert rollout.env_prefix == "AMBIENT_ROLLOUT_EXECUTION_ENGINE_"
        assert (rollout.mode, rollout.percent) == ("shadow", 12.5)
        named: Rollout[Any] = Rollout("x", legacy=LEGACY, name="agent-registry.v2")
        assert named.env_prefix == "AMBIENT_ROLLOUT_AGENT_REGISTRY_V2_"
        private: Rollout[Any] = Rollout("x", legacy=LEGACY, name="_engine (v3)")
        assert private.env_prefix == "AMBIENT_ROLLOUT_ENGINE_V3_"

    def test_a_nested_key_class_is_named_with_its_outer_class(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A key class nested in another is named by its qualified name, and a digit
        before a capital starts a word of the variables' name."""

        monkeypatch.setenv("AMBIENT_ROLLOUT_STORAGE_S3_CLIENT_MODE", "component")
        rollout: Rollout[Any] = Rollout(Storage.S3Client, legacy=LEGACY)
        assert rollout.name == "Storage.S3Client"
        assert rollout.env_prefix == "AMBIENT_ROLLOUT_STORAGE_S3_CLIENT_"
        assert rollout.mode == "component"

    def test_invalid_variables_name_themselves(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A bad value fails at start-up with the variable's name in the message."""
        monkeypatch.setenv("AMBIENT_ROLLOUT_EXECUTION_ENGINE_MODE", "on")
        with pytest.raises(ValueError, match="AMBIENT_ROLLOUT_EXECUTION_ENGINE_MODE"):
            Rollout(ExecutionEngine, legacy=LEGACY)
        monkeypatch.delenv("AMBIENT_ROLLOUT_EXECUTION_ENGINE_MODE")
        monkeypatch.setenv("AMBIENT_ROLLOUT_EXECUTION_ENGINE_PERCENT", "half")
        with pytest.raises(ValueError, match="AMBIENT_ROLLOUT_EXECUTION_ENGINE_PERCENT"):
            Rollout(ExecutionEngine, legacy=LEGACY)
        monkeypatch.setenv("AMBIENT_ROLLOUT_EXECUTION_ENGINE_PERCENT", "150")
        with pytest.raises(ValueError, match="AMBIENT_ROLLOUT_EXECUTION_ENGINE_PERCENT"):
            Rollout(ExecutionEngine, legacy=LEGACY)


def test_reexports_the_errors() -> None:
    """The warning and error are ambient.errors' own, re-exported."""
    assert ambient.migration.GlobalStateWarning is ambient.errors.GlobalStateWarning
    assert ambient.migration.GlobalStateError is ambient.errors.GlobalStateError
    names = ambient.migration.__all__
    assert list(names) == sorted(names)
    assert all(hasattr(ambient.migration, n) for n in names)
