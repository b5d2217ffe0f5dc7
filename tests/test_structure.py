"""The repo's shape, checked: the top level holds what a user runs or edits (the stage scripts and utils.py), the
shared core lives in the `hntitles` package, stage scripts import only that core (never each other), the core has
no import circle, a main flow may be long but nothing else is, and docs/design.md names every module.
Parses source only (no imports, no models): a second each."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hntitles"
CORE_TOP = {"utils"}  # the core both trainers share stays at the top level, beside the stage scripts
MAX_TOP_LEVEL = 15  # a newcomer's `ls` shows what they run or edit
MAX_FUNCTION_LINES = 60  # a helper reads at once
MAX_MAIN_LINES = 130  # a stage's main() reads top to bottom under banner comments, like open-r1's grpo.py
MAX_MODULE_LINES = 600


def top_level_modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(ROOT.glob("*.py"))}


def stage_scripts() -> dict[str, Path]:
    return {name: p for name, p in top_level_modules().items() if name not in CORE_TOP}


def package_modules() -> dict[str, Path]:
    """Dotted name -> path of every module in the package (`__init__` files included)."""
    out = {}
    for p in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def core_modules() -> dict[str, Path]:
    return {**package_modules(), **{name: top_level_modules()[name] for name in CORE_TOP}}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, at any depth (lazy imports included), dotted in full;
    `from pkg import mod` counts as `pkg.mod` too, since that is how a submodule is imported."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_top_level_holds_what_a_user_runs():
    assert len(top_level_modules()) <= MAX_TOP_LEVEL, sorted(top_level_modules())
    assert {"utils", "local_reward", "reward_local_test", "check_dataset", "reference_grpo_trainer",
            "train"} <= set(top_level_modules())
    assert (ROOT / PACKAGE / "__init__.py").exists()
    # the package has parts, one folder each, and no module sits loose in it but the setup helper
    parts = {p.name for p in (ROOT / PACKAGE).iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"reward", "engines", "trl", "art", "runs", "analysis"} <= parts, parts


@pytest.mark.parametrize("name", sorted(stage_scripts()))
def test_stage_scripts_import_no_other_stage_script(name):
    wrong = imported_modules(stage_scripts()[name]) & (set(stage_scripts()) - {name})
    assert not wrong, f"{name}.py imports stage script(s) {sorted(wrong)}: move what they share into {PACKAGE}/"


@pytest.mark.parametrize("name", sorted(core_modules()))
def test_the_core_imports_no_stage_script(name):
    wrong = imported_modules(core_modules()[name]) & set(stage_scripts())
    assert not wrong, f"{name} imports stage script(s) {sorted(wrong)}"


def test_the_core_has_no_import_circle():
    core = set(core_modules())
    graph = {name: imported_modules(path) & core - {name} for name, path in core_modules().items()}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (circle := visit(nxt, [*path, node])):
                return circle
        state[node] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            circle = visit(name, [])
            assert circle is None, f"import circle: {' -> '.join(circle)}"


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.end_lineno - node.lineno + 1


def every_module() -> list[Path]:
    return [*top_level_modules().values(), *package_modules().values(), *sorted((ROOT / "bench").glob("*.py"))]


def test_only_a_stage_main_is_long():
    """ruff's C90 (complexity <= 10) checks every function; only a stage script's main() may opt out
    (`noqa: C901`: its branches are the exit codes), and only main() may run past MAX_FUNCTION_LINES."""
    problems = []
    for path in every_module():
        lines = path.read_text(encoding="utf-8").splitlines()
        is_stage = path.stem in stage_scripts() and path.parent == ROOT or path.parent.name == "bench"
        for node, length in functions(path):
            main = node.name == "main" and is_stage and node.col_offset == 0
            if length > (MAX_MAIN_LINES if main else MAX_FUNCTION_LINES):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
            header = " ".join(lines[node.lineno - 1:node.body[0].lineno - 1])
            if "noqa: C901" in header and not main:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} opts out of ruff's C901")
    assert not problems, problems


def test_no_module_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in every_module()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (does each own one concern?): {long}"


def test_every_package_part_says_what_it_owns():
    """Each sub-package's __init__ docstring names its modules: `python -c "help('hntitles.art')"` is a map."""
    for init in sorted((ROOT / PACKAGE).rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert doc, f"{init.relative_to(ROOT)} has no docstring"
        for module in sorted(init.parent.glob("*.py")):
            if module.name != "__init__.py":
                assert f"`{module.stem}`" in doc, f"{init.relative_to(ROOT)} does not name `{module.stem}`"


def test_design_doc_names_every_module():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`([\w/]+\.py)`", text))
    wanted = {f"{n}.py" for n in top_level_modules()} | {
        str(p.relative_to(ROOT)) for p in package_modules().values() if p.name != "__init__.py"}
    missing = wanted - listed
    assert not missing, f"docs/design.md lacks {sorted(missing)}"
    gone = {p for p in listed if not any((ROOT / d / p).exists() for d in (".", "bench", "tests"))}
    assert not gone, f"docs/design.md names files that do not exist: {sorted(gone)}"


# An absolute path of the kind a machine writes into a report: a home, /tmp, /work, /root, /Users, /mnt, /opt, /srv.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:tmp|work|root|home|Users|mnt|opt|srv|var/folders)/[\w.-]+")


@pytest.mark.parametrize("text, found", [
    ("- seed 43, TRL: `runs/trl-cpu-aligned-s43`", False),   # relative to the repo, as reports write it
    ("- seed 43, TRL: `/tmp/m1/runs/trl-cpu-aligned-s43`", True),  # the machine that wrote it
    ("adapter /home/ana/hn/runs/art-cpu/final", True),
    ("see https://example.org/tmp/x and a/tmp/b", False),   # inside a URL or a relative path
])
def test_the_machine_path_rule(text, found):
    assert bool(MACHINE_PATH.search(text)) == found


def test_no_committed_doc_names_the_machine_that_wrote_it():
    """Reports, plots' tables and JSON under docs/ name run directories relative to the repo (rundir.shown)."""
    problems = []
    for path in sorted((ROOT / "docs").rglob("*")):
        if path.is_file() and path.suffix in (".md", ".json", ".txt", ".csv"):
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if m := MACHINE_PATH.search(line):
                    problems.append(f"{path.relative_to(ROOT)}:{lineno}: {m.group(0)}")
    assert not problems, problems
