"""Every python example in README.md and docs/ runs as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    pytest.param(code, id=f"{page.name}:{n}")
    for page in PAGES
    for n, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
    if not code.startswith("# outline")  # an outline names the runnable example it abbreviates
]


@pytest.mark.parametrize("code", BLOCKS)
def test_example_runs(code, capsys):
    exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out.strip(), "every example prints what it shows"
