"""The Python examples of README.md, docs/frameworks.md and docs/migration.md, as a user
copies them."""

from __future__ import annotations

import ast

import pytest

from tests.documented import python_blocks

DOCUMENTS = ("README.md", "docs/frameworks.md", "docs/migration.md")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_python_block_parses(document: str) -> None:
    """A block marked ``python`` is code a user copies: it parses (an interpreter session
    is marked ``pycon``)."""
    assert python_blocks(document)
    for line, code in python_blocks(document):
        try:
            ast.parse(code)
        except SyntaxError as exc:
            pytest.fail(f"{document}:{line}: a python block that does not parse: {exc.msg}")
