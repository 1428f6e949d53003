"""Every ```python block of README.md and docs/*.md runs.

The blocks of one page run in order in one namespace (a page may build on its
earlier blocks), in a fresh interpreter per page. A block that is not meant to
run on its own (a fragment of a train step, a sketch of a user's code) says so
on the line before its fence with the comment ``<!-- no-run: why -->``, which
neither GitHub nor Sphinx renders.
"""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python[ \t]*\n(?P<code>.*?)\n```", re.S)
NO_RUN = "<!-- no-run"


def blocks(page):
    """(runs, code) of each python block of a page."""
    text = "\n" + page.read_text()
    return [(NO_RUN not in m["before"], m["code"]) for m in BLOCK.finditer(text)]


def test_the_convention_is_findable():
    found = [b for page in PAGES for b in blocks(page)]
    assert any(runs for runs, _ in found), "no python block found in README/docs"


@pytest.mark.slow
@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(r for r, _ in blocks(p))], ids=lambda p: p.name
)
def test_page_code_blocks_run(page, tmp_path):
    code = "\n\n".join(c for runs, c in blocks(page) if runs)
    script = tmp_path / f"{page.stem}_blocks.py"
    script.write_text(code)
    env_path = str(ROOT)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": env_path},
    )
    assert result.returncode == 0, (
        f"{page.name}'s python blocks failed (mark a block that "
        f"is not meant to run with {NO_RUN}: why -->):\n"
        f"{result.stderr[-3000:]}"
    )
