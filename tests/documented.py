"""The code blocks of the project's documents, for the tests that run them as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def documented_code(document: str, after: str) -> str:
    """The first Python block of ``document`` (a path from the repository root) that
    follows the text ``after``."""
    text = (ROOT / document).read_text()
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return text[start : text.index("```", start)]


def python_blocks(document: str) -> list[tuple[int, str]]:
    """Every Python block of ``document``, with the line its code starts on."""
    text = (ROOT / document).read_text()
    return [
        (text.count("\n", 0, match.start(2)) + 1, match.group(2))
        for match in _BLOCK.finditer(text)
        if match.group(1) == "python"
    ]
