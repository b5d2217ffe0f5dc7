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
