"""titles.py with the tiny model (and a fake OpenAI-compatible endpoint) against the real reward server."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fake_endpoints import FakeChat

import titles
import utils
from hntitles.reward import text_metrics
from hntitles.runs import settings

ROOT = Path(__file__).resolve().parents[1]
ARTICLE = ("SQLite stores every table as a B-tree of fixed-size pages. This post walks through how a page is "
           "split when it fills up, why the root page never moves, and what that means for write amplification.")


@pytest.fixture
def article(tmp_path) -> Path:
    path = tmp_path / "article.txt"
    path.write_text(ARTICLE)
    return path


def tiny_recipe(tiny_model, reward_url: str, **over) -> settings.Recipe:
    # the tiny recipe's knobs: embedding validator, 8-token completions; generation not stopped at
    # line breaks, so the trailing-text path (and its penalty) is exercised
    base = dict(model=str(tiny_model), reward_url=reward_url, max_completion_tokens=8, validator="embedding",
                trailing_penalty=0.2, reward_retries=0, stop_at_newline=False)
    return settings.Recipe(**{**base, **over})


def server_rm(url: str, title: str) -> float:
    """What the reward server says about a title for ARTICLE, asked directly (not via titles.py)."""
    story = {"title": title, "by": "anonymous", "time": "2024-05-01T12:00:00Z", "url": "", "scraped_body": ARTICLE}
    return httpx.post(url + "/score", json=story, timeout=60).json()["score"]


@pytest.mark.integration
@pytest.mark.slow
def test_ranked_candidates_with_components(tiny_model, reward_server, article, capsys):
    recipe = tiny_recipe(tiny_model, reward_server)
    ranked = titles.main(recipe, titles.TitlesArgs(article=str(article), n=3, time="2024-05-01T12:00:00Z"))
    out = capsys.readouterr().out
    assert sum(r["count"] for r in ranked) == 4  # the greedy title + 3 samples, duplicates merged
    assert sum(r["greedy"] for r in ranked) == 1
    assert [r["reward"] for r in ranked] == sorted((r["reward"] for r in ranked), reverse=True)
    for r in ranked:
        title, trailing = utils.extract_title(r["completion"])
        assert (r["title"], r["trailing"], r["words"]) == (title, trailing, len(text_metrics.words(title)))
        assert r["rm"] == (pytest.approx(server_rm(reward_server, title), abs=1e-6) if title else 0.0)
        assert r["reward"] == pytest.approx((r["rm"] if r["matches"] else 0.0) - (0.2 if trailing else 0.0))
    assert "reward" in out and "match" in out and "trail" in out
    assert len([ln for ln in out.splitlines() if re.match(r"\s*\d+\s+-?\d+\.\d{3}\s", ln)]) == len(ranked)


@pytest.mark.integration
@pytest.mark.slow
def test_openai_generator_and_json_output(tiny_model, reward_server, article, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with FakeChat(model="big") as llm:
        recipe = tiny_recipe(tiny_model, reward_server)
        args = titles.TitlesArgs(article=str(article), n=2, generator="openai", openai_model="big",
                                 openai_base_url=llm.base_url, json=True)
        ranked = titles.main(recipe, args)
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert lines == json.loads(json.dumps(ranked))
    assert {r["title"] for r in ranked} == {"Greedy SQLite stores every", "Sample 1 SQLite stores every",
                                            "Sample 2 SQLite stores every"}
    sampled = [r for r in ranked if not r["greedy"]]
    assert all(r["trailing"] for r in sampled) and not any(r["trailing"] for r in ranked if r["greedy"])


def test_reads_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("  An article from a pipe.\n"))
    assert titles.read_article("") == "An article from a pipe."


@pytest.mark.parametrize("name, content, message", [
    # no such file
    ("missing.txt", None, "error: article file not found"),
    # only whitespace
    ("blank.txt", " \n\t\n", "is empty"),
])
def test_bad_article(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(SystemExit, match=message):
        titles.main(settings.Recipe(), titles.TitlesArgs(article=str(tmp_path / name)))


def test_reward_server_down_fails_before_loading_a_model(tmp_path, article):
    from servers import free_port

    recipe = settings.Recipe(model=str(tmp_path / "no-model-here"), reward_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit, match=r"error: reward server at http://127.0.0.1:\d+ is unreachable"):
        titles.main(recipe, titles.TitlesArgs(article=str(article)))


@pytest.mark.integration
def test_missing_model(reward_server, tmp_path, article):
    recipe = settings.Recipe(model=str(tmp_path / "no-model-here"), reward_url=reward_server)
    with pytest.raises(SystemExit, match="error: cannot load model .*no-model-here"):
        titles.main(recipe, titles.TitlesArgs(article=str(article)))


def test_bad_time(article):
    with pytest.raises(SystemExit, match="not ISO 8601"):
        titles.main(settings.Recipe(), titles.TitlesArgs(article=str(article), time="yesterday"))


@pytest.mark.integration
def test_cli(reward_server, article):
    # what `make titles ARTICLE=... ARGS=...` runs
    out = subprocess.run([sys.executable, "titles.py", "--recipe", "recipes/tiny.yaml", "--article", str(article),
                          "--reward_url", reward_server, "--n", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "candidates from" in out.stdout and " 1 " in out.stdout
