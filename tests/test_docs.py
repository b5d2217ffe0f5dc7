"""The README is a user guide and docs/ holds the rest, checked: its sections come in a newcomer's order, the
quick start is the two commands CI runs, every `make` target and every repo file it or docs/ names exists, and
docs/index.md links every page. Reads text only: well under a second."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250
# A newcomer's order: what it is, what it found, how to start, what to run, how to adapt it, how to read it.
SECTIONS = ["Latest result", "Quick start", "Stages", "Your own data, model, reward model, GPU or cluster",
            "The recipe and the shared knobs", "Reading the report", "Exit codes and troubleshooting", "Glossary"]


def guides() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {t for line in text.splitlines() if (m := re.match(r"^([\w-]+(?: [\w-]+)*):(?!=)", line))
            for t in m.group(1).split()}


def test_readme_reads_as_a_user_guide():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES, "measurements and semantics belong in docs/"
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert [h for h in headings if h in SECTIONS] == SECTIONS, headings
    assert "docs/index.md" in text


def test_quick_start_is_the_two_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert any(re.search(r"\bmake test\b(?!-)", line) for line in ci), ci


@pytest.mark.parametrize("path", guides(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_make_target_named_exists(path):
    named = set(re.findall(r"`make ([a-z][\w-]*)", path.read_text(encoding="utf-8")))
    assert not named - make_targets(), f"{path.name} names targets the Makefile lacks: {sorted(named - make_targets())}"


# A repo file a guide names in backticks: a path with a folder, or a script; a bare report name is a run's output.
REPO_PATH = re.compile(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|md|yaml|json|sbatch|sh|txt|png))`")


@pytest.mark.parametrize("path", [README, ROOT / "docs" / "index.md", ROOT / "docs" / "design.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repo_file_named_exists(path):
    missing = []
    for name in REPO_PATH.findall(path.read_text(encoding="utf-8")):
        if name.startswith("runs/") or ("/" not in name and not name.endswith(".py")):
            continue  # what a run writes (runs/..., a report's or config's bare file name)
        if not any((base / name).exists() for base in (ROOT, ROOT / "docs", ROOT / "tests", ROOT / "bench")):
            missing.append(name)
    assert not missing, f"{path.name} names files that do not exist: {missing}"


def test_docs_index_links_every_page():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md", "demo_report.md", "compare.md"}
    assert pages <= linked, f"docs/index.md does not link {sorted(pages - linked)}"
    assert linked <= {p.name for p in (ROOT / "docs").glob("*.md")}, "docs/index.md links a page that is gone"
