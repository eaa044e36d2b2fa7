"""The README's code runs as written: every ```python block of README.md and docs/*.md is executed (CPU,
in a temporary working directory), and the quick start's test command is the one `.ci/run` runs. The
README stays a user's page: at most 200 lines, no project-history words in it or in docs/, and every
relative link of both resolves.

A block that cannot run here (needs a GPU, a hub download, a real checkpoint) carries the marker
comment ``<!-- readme-test: skip (reason) -->`` on the line before its opening fence; the reason is
shown as the skip reason.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
USER_DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
HISTORY_WORDS = re.compile(r"\bwaves?\b|\bstop [0-9]|issue #|issue [0-9]|re-run|\blanded\b|\bsession\b|\bpreviously\b",
                           re.IGNORECASE)
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
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


def _relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


BLOCKS = [(_relative(doc), *block) for doc in USER_DOCS for block in python_blocks(doc.read_text())]


def test_readme_has_python_snippets():
    assert sum(1 for doc, *_ in BLOCKS if doc == "README.md") >= 2


@pytest.mark.parametrize("doc, line, code, skip", BLOCKS, ids=[f"{b[0]}:{b[1]}" for b in BLOCKS])
def test_readme_python_snippet_runs(doc, line, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)  # snippets write files (opt.pt, out/): never into the checkout
    exec(compile(code, f"{doc}:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102 (the point)


def test_readme_is_a_short_users_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("doc", USER_DOCS, ids=_relative)
def test_user_docs_carry_no_project_history(doc):
    hits = [f"{_relative(doc)}:{i}: {ln.strip()}" for i, ln in enumerate(doc.read_text().splitlines(), 1)
            if HISTORY_WORDS.search(ln)]
    assert not hits, "project history belongs in CHANGELOG.md or bench/README.md:\n" + "\n".join(hits)


def _anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors of ``markdown``: lower case, punctuation dropped, spaces to hyphens."""
    headings = (ln.lstrip("#").strip() for ln in markdown.read_text().splitlines() if re.match(r"#{1,6} ", ln))
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", USER_DOCS, ids=_relative)
def test_user_docs_links_resolve(doc):
    missing = []
    for match in LINK.finditer(doc.read_text()):
        path, _, anchor = match.group("target").partition("#")
        if "://" in path or path.startswith("mailto:"):
            continue
        target = (doc.parent / path) if path else doc
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
            missing.append(match.group("target"))
    assert not missing, f"{_relative(doc)} links to missing paths or anchors: {missing}"


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
