"""The README as a user meets it: every Python snippet runs as pasted, every link leads somewhere, and the two
commands CI reads (the demo and the test command) are where .ci/run looks for them.

Each snippet runs on its own, in a fresh namespace (as if pasted into a new interpreter), on data it makes
or a dataset scikit-learn ships; nothing from one snippet is visible to the next.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Pages other work owns and creates; a link to one is checked once it exists.
PENDING_PAGES = set()


def python_snippets(path=README):
    """[(line number, code)] of the ```python blocks of a Markdown file."""
    snippets, code, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if code is None and line.strip() == "```python":
            code, start = [], number + 1
        elif code is not None and line.strip() == "```":
            snippets.append((start, "\n".join(code) + "\n"))
            code = None
        elif code is not None:
            code.append(line)
    return snippets


SNIPPETS = python_snippets()


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("start, code", SNIPPETS, ids=[f"README.md:{start}" for start, _ in SNIPPETS])
def test_snippet_runs_as_pasted(start, code, capsys):
    if "sklearn" in code:
        pytest.importorskip("sklearn")
    namespace = {"__name__": "__main__"}
    exec(compile(code, f"README.md:{start}", "exec"), namespace)  # noqa: S102 - the README's own code
    capsys.readouterr()


def readme_command(marker):
    """The command in the ```bash block after <!-- marker -->, as .ci/run's awk reads it."""
    lines = README.read_text().splitlines()
    at = lines.index(f"<!-- {marker} -->")
    assert lines[at + 1] == "```bash", f"the line after <!-- {marker} --> must open a bash block"
    end = lines.index("```", at + 2)
    return "\n".join(lines[at + 2:end])


def test_demo_and_test_commands_are_marked_and_self_contained():
    demo = readme_command("demo-command")
    assert demo.startswith("python3 -m venv .venv") and ". .venv/bin/activate" in demo
    assert demo.index(". .venv/bin/activate") < demo.index("pip install") < demo.index("examples/demo.py")
    test = readme_command("test-command")
    assert test.startswith("python3 -m venv .venv") and "-m pytest" in test and "'.[test]'" in test


def markdown_files():
    return [README, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_lead_somewhere(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # URLs are not followed here
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        relative = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)
        if relative in PENDING_PAGES and not resolved.exists():
            continue
        assert resolved.exists(), f"{page.name}: link to {target} leads nowhere"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: no heading for #{anchor} in {path}"


def test_readme_stays_a_users_document():
    """About 200 lines, in the order a user needs; developer material lives in docs/."""
    text = README.read_text()
    assert len(text.splitlines()) <= 230
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    order = ["Install", "Try it", "Quickstart", "API", "scikit-learn estimators", "Progress, callbacks and plots",
             "Checkpoints and errors", "Performance"]
    assert [h for h in headings if h in order] == order
    for developer_material in ("Targets not met", "launches per step", "| round |", "fastbp/backends/base.py"):
        assert developer_material not in text
    # fastbp is not on PyPI: extras come from the clone ('.[sklearn]') or a wheel ('fastbp[sklearn] @ file:...')
    assert not re.search(r"pip install '?fastbp(\[[^\]]*\])?'?(?!\s*@)(\s|$)", text)
