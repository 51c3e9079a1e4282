"""An app for granian (which serves from a module path) whose lifespan fails while it serves:
``build_crashing_lifespan`` with its ledger and ambient's error log written, a line each, to
the file ``AMBIENT_TEST_LEDGER`` names (granian runs it in another process)."""

from __future__ import annotations

import logging
import os

from tests.apps import Ledger, build_crashing_lifespan

_PATH = os.environ.get("AMBIENT_TEST_LEDGER", os.devnull)


def _write(line: str) -> None:
    with open(_PATH, "a", encoding="utf-8") as file:
        file.write(line + "\n")


class FileLedger(Ledger):
    """A ledger that also writes what happens, in order, to the file."""

    def create(self, owner: str) -> int:
        number = super().create(owner)
        _write(f"created {number}")
        return number

    def clean(self, number: int) -> None:
        super().clean(number)
        _write(f"cleaned {number}")

    def note(self, what: str, user: str) -> None:
        super().note(what, user)
        _write(f"told {what} {user}")


class _Logged(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        _write(f"logged {record.levelname} {error!r}")


logging.getLogger("ambient.middleware").addHandler(_Logged())

app = build_crashing_lifespan(
    FileLedger(), framework=os.environ.get("AMBIENT_TEST_FRAMEWORK") == "1"
)
