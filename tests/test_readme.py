"""The README's code runs as written: every ```python block is executed (CPU, in a temporary working
directory), and the quick start's test command is the one `.ci/run` runs.

A block that cannot run here (needs a GPU, a hub download, a real checkpoint) carries the marker
comment ``<!-- readme-test: skip (reason) -->`` on the line before its opening fence; the reason is
shown as the skip reason.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SKIP_MARKER = re.compile(r"<!--\s*readme-test:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line number, code, skip reason or None)`` of every ```python block of ``text``."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            marker = SKIP_MARKER.search(lines[i - 1]) if i > 0 else None
            reason = (marker.group("reason") or "marked skip") if marker else None
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", reason))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_snippet_runs(line, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)  # snippets write files (opt.pt, out/): never into the checkout
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102 (the point)


def test_ci_runs_exactly_the_readme_test_command():
    text = README.read_text()
    quick = text[text.index("## Quick start") :]
    block = quick[quick.index("```bash") + len("```bash") : quick.index("```", quick.index("```bash") + 7)]
    commands = [
        ln.strip() for ln in block.strip().splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    assert len(commands) == 2, commands  # one command runs the main job, one runs the tests
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[1] in [ln.strip() for ln in ci], (
        f".ci/run does not run the README test command {commands[1]!r}"
    )
    assert "grit-kernels bench e2e" in commands[0]
