"""The repo's shape, checked: stage scripts import only the shared core, functions stay short, and the
README's layout table names every module. Parses source only (no imports, no models): a second each."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Modules several stages use. Everything else at the top level is a stage script (one `make` target or tool).
SHARED = {"utils", "policy", "procs", "art_config", "fast_backend", "shared_prefix", "art_cpu_backend",
          "openai_generator", "grpo_semantics"}
MAX_FUNCTION_LINES = 60


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


def test_no_function_is_long():
    long = []
    for path in [*top_level_modules().values(), *sorted((ROOT / "bench").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Layout"):].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([\w/]+\.py)`", table))
    missing = {f"{n}.py" for n in top_level_modules()} - listed
    assert not missing, f"README's layout table lacks {sorted(missing)}"
    gone = {p for p in listed if not any((ROOT / d / p).exists() for d in (".", "bench", "tests"))}
    assert not gone, f"README's layout table names files that do not exist: {sorted(gone)}"
