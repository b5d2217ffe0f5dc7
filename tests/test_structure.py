"""The repo's shape, checked: stage scripts import only the shared core, the shared core has no import
circle, a main flow may be long but nothing else is, and the README's layout table names every module.
Parses source only (no imports, no models): a second each."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Modules several stages use. Everything else at the top level is a stage script (one `make` target or tool).
SHARED = {"settings", "rundir", "runtime", "utils", "text_metrics", "stats", "embeddings", "evaluation",
          "reward_model", "generation", "policy", "procs", "trl_config", "art_config", "art_compat", "fast_backend",
          "shared_prefix", "art_cpu_backend", "art_cpu_server", "openai_generator", "grpo_semantics", "comparison",
          "experiment", "update_parity", "bare_policy"}
MAX_FUNCTION_LINES = 60  # a helper reads at once
MAX_MAIN_LINES = 130  # a stage's main() reads top to bottom under banner comments, like open-r1's grpo.py
MAX_MODULE_LINES = 700


def top_level_modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(ROOT.glob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_shared_core_exists():
    assert SHARED <= set(top_level_modules()), SHARED - set(top_level_modules())


@pytest.mark.parametrize("name", sorted(set(top_level_modules()) - SHARED))
def test_stage_scripts_import_only_shared_modules(name):
    stages = set(top_level_modules()) - SHARED
    wrong = imported_modules(top_level_modules()[name]) & (stages - {name})
    assert not wrong, f"{name}.py imports stage script(s) {sorted(wrong)}: move what they share into {sorted(SHARED)}"


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_modules_import_no_stage_script(name):
    stages = set(top_level_modules()) - SHARED
    assert not imported_modules(top_level_modules()[name]) & stages


def test_the_shared_core_has_no_import_circle():
    graph = {name: imported_modules(top_level_modules()[name]) & SHARED - {name} for name in SHARED}
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


def test_only_a_stage_main_is_long():
    """ruff's C90 (complexity <= 10) checks every function; only a stage script's main() may opt out
    (`noqa: C901`: its branches are the exit codes), and only main() may run past MAX_FUNCTION_LINES."""
    stages = set(top_level_modules()) - SHARED
    problems = []
    for path in [*top_level_modules().values(), *sorted((ROOT / "bench").glob("*.py"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        is_stage = path.stem in stages or path.parent.name == "bench"
        for node, length in functions(path):
            main = node.name == "main" and is_stage and node.col_offset == 0
            if length > (MAX_MAIN_LINES if main else MAX_FUNCTION_LINES):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
            header = " ".join(lines[node.lineno - 1:node.body[0].lineno - 1])
            if "noqa: C901" in header and not main:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} opts out of ruff's C901")
    assert not problems, problems


def test_no_module_is_too_long():
    long = {name: n for name, p in top_level_modules().items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (does each own one concern?): {long}"


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Layout"):].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([\w/]+\.py)`", table))
    missing = {f"{n}.py" for n in top_level_modules()} - listed
    assert not missing, f"README's layout table lacks {sorted(missing)}"
    gone = {p for p in listed if not any((ROOT / d / p).exists() for d in (".", "bench", "tests"))}
    assert not gone, f"README's layout table names files that do not exist: {sorted(gone)}"
