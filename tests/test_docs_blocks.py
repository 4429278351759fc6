"""Every ```python block in README.md and docs/*.md runs.

A page's blocks run in order in one namespace, as a reader goes through them (a block may use
what an earlier block of the same page defined), in a fresh temporary directory with no
STEPSOURCE_* variables (so `ss.Engine()` writes ./stepsource.db there). A block may use
`await` at top level (it runs in its own event loop). After a page's blocks, every
`test_*` function they defined that takes no arguments is called too (awaited if async), so
the test examples in the docs pass, not only compile.

A block that cannot run on its own (a fragment of a handler body, code that needs your own
application) is preceded by the line `<!-- docs-test: skip: REASON -->`; the reason is
required and the number of such blocks is kept small (SKIPS_ALLOWED).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!-- docs-test: skip: (?P<reason>[^>]*\S)\s*-->\s*$")
#: how many blocks of all the pages may be skipped (each with its reason)
SKIPS_ALLOWED = 5


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str
    skip: str | None


def blocks(page: Path) -> Iterator[Block]:
    text = page.read_text()
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        yield Block(page, line, match.group(1), skip["reason"] if skip else None)


def _run(block: Block, namespace: dict[str, Any]) -> None:
    name = f"{block.page.relative_to(ROOT)}:{block.line}"
    code = compile(block.code, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if code.co_flags & inspect.CO_COROUTINE:

        async def main() -> None:
            await eval(code, namespace)

        anyio.run(main)
    else:
        exec(code, namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_blocks_of_a_page_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("STEPSOURCE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem}"}
    for block in blocks(page):
        if block.skip is None:
            _run(block, namespace)
    for name, value in list(namespace.items()):
        if name.startswith("test_") and callable(value):
            if inspect.signature(value).parameters:
                continue
            result = value()
            if inspect.iscoroutine(result):

                async def call(awaitable: Any = result) -> None:
                    await awaitable

                anyio.run(call)


def test_skipped_blocks_are_few_and_say_why() -> None:
    skipped = [b for page in PAGES for b in blocks(page) if b.skip is not None]
    assert len(skipped) <= SKIPS_ALLOWED, [(str(b.page), b.line, b.skip) for b in skipped]
    for block in skipped:
        assert len(block.skip or "") >= 20, (block.page, block.line)  # a reason, not a word
    assert sum(1 for page in PAGES for _ in blocks(page)) >= 12  # the blocks are found
