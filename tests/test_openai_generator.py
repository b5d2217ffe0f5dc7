"""openai_generator.OpenAIGenerator against an in-process OpenAI-compatible server, and
`evaluate.py --generator openai` end to end into a run dir that compare.py reads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fake_endpoints import FakeChat, FakeReward, fake_score
from servers import free_port

import utils
from hntitles.engines.openai_generator import OpenAIGenerator, OpenAIGeneratorError
from hntitles.runs import settings

ROOT = Path(__file__).resolve().parents[1]
CONVS = [utils.title_messages("Alpha beta gamma delta."), utils.title_messages("Zeta eta theta iota.")]


def gen(server: FakeChat, **kw) -> OpenAIGenerator:
    kw = {"model": server.model, "base_url": server.base_url, "api_key": "k", "max_retries": 0, "progress": False, **kw}
    return OpenAIGenerator(**kw)


def test_n_choices_in_order_with_the_shared_prompt():
    with FakeChat() as server:
        g = gen(server)
        out = g.generate(CONVS, n=3, temperature=0.7, max_tokens=12)
    assert [len(o) for o in out] == [3, 3]
    assert all(t.endswith("Alpha beta gamma\nextra line") for t in out[0])
    assert all(t.endswith("Zeta eta theta\nextra line") for t in out[1])
    req = server.requests[0]
    assert req["n"] == 3 and req["temperature"] == 0.7 and req["max_tokens"] == 12
    assert req["messages"] in CONVS  # exactly utils.title_messages
    assert g.usage["requests"] == 2 and g.usage["completion_tokens"] == 30


def test_temperature_zero_is_greedy():
    with FakeChat() as server:
        out = gen(server).generate(CONVS, n=1, temperature=0.0, max_tokens=8)
    assert out == [["Greedy Alpha beta gamma"], ["Greedy Zeta eta theta"]]
    assert {r["temperature"] for r in server.requests} == {0.0}


def test_endpoint_that_ignores_n_is_asked_again():
    # e.g. a server that always answers one choice
    with FakeChat(max_choices=1) as server:
        out = gen(server).generate(CONVS[:1], n=3, temperature=1.0, max_tokens=8)
    assert len(out[0]) == 3 and len(set(out[0])) == 3
    assert [r["n"] for r in server.requests] == [3, 2, 1]


def test_endpoint_that_wants_max_completion_tokens():
    with FakeChat(new_token_param=True) as server:
        g = gen(server)
        assert (g.generate(CONVS, n=1, temperature=0.0, max_tokens=8)
                == [["Greedy Alpha beta gamma"], ["Greedy Zeta eta theta"]])
    # the first (concurrent) requests are refused, once each; then the other parameter is used
    old = [r for r in server.requests if "max_tokens" in r]
    new = [r for r in server.requests if r.get("max_completion_tokens") == 8 and "max_tokens" not in r]
    assert 1 <= len(old) <= len(CONVS) and len(new) == len(CONVS)


def test_transient_5xx_is_retried_by_the_client():
    with FakeChat(fail_first=2) as server:
        out = gen(server, max_retries=2).generate(CONVS[:1], n=1, temperature=0.0, max_tokens=8)
    assert out == [["Greedy Alpha beta gamma"]]
    assert len(server.requests) == 3


@pytest.mark.parametrize("setup, kwargs, message", [
    # retries exhausted on 503
    (dict(fail_first=10), dict(max_retries=1), "HTTP 503"),
    # wrong key
    (dict(api_key="right"), dict(api_key="wrong"), "rejected the API key (HTTP 401)"),
    # unknown model
    ({}, dict(model="no-such-model"), "HTTP 404 for model 'no-such-model'"),
])
def test_endpoint_errors_are_one_line(setup, kwargs, message):
    with FakeChat(**setup) as server, pytest.raises(OpenAIGeneratorError) as err:
        gen(server, **kwargs).generate(CONVS, n=1, temperature=0.0, max_tokens=8)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreachable_endpoint():
    g = OpenAIGenerator("m", f"http://127.0.0.1:{free_port()}/v1", api_key="k", max_retries=1, progress=False)
    with pytest.raises(OpenAIGeneratorError, match=r"cannot reach OpenAI-compatible endpoint .* after 2 attempts"):
        g.generate(CONVS, n=1, temperature=0.0, max_tokens=8)


def test_missing_key_and_model(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    with pytest.raises(OpenAIGeneratorError, match="OPENAI_API_KEY is not set"):
        OpenAIGenerator("m", "http://127.0.0.1:1/v1")
    with pytest.raises(OpenAIGeneratorError, match="pass --openai_model or set OPENAI_MODEL"):
        OpenAIGenerator(None, "http://127.0.0.1:1/v1", api_key="k")


def _cli(args, env_extra, stdin=""):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(ROOT),
           # set (even empty) so that a developer's .env cannot fill them in
           "OPENAI_API_KEY": "", "OPENAI_BASE_URL": "", "OPENAI_MODEL": "", **env_extra}
    return subprocess.run([sys.executable, "-m", "hntitles.engines.openai_generator", *args], cwd=ROOT, env=env,
                          input=stdin, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_cli_unreachable_is_one_line_without_traceback():
    env = {"OPENAI_MODEL": "m", "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"}
    out = _cli(["--max_retries", "0"], env, stdin="An article body.")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error: cannot reach OpenAI-compatible endpoint http://127.0.0.1:")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("article, env, message", [
    # no key (set empty so a developer's .env cannot fill it in)
    ("a.txt", {"OPENAI_API_KEY": "", "OPENAI_MODEL": "m"}, "error: OPENAI_API_KEY is not set"),
    # the article file is missing
    ("missing.txt", {"OPENAI_API_KEY": "k", "OPENAI_MODEL": "m"}, "error: cannot read article"),
    # the article is blank
    ("blank.txt", {"OPENAI_API_KEY": "k", "OPENAI_MODEL": "m"}, "is empty"),
])
def test_main_errors(tmp_path, monkeypatch, article, env, message):
    from hntitles.engines.openai_generator import OpenAIArgs, main

    (tmp_path / "a.txt").write_text("An article.")
    (tmp_path / "blank.txt").write_text("  \n")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit, match=message):
        main(OpenAIArgs(article=str(tmp_path / article), openai_base_url="http://127.0.0.1:1/v1"))


@pytest.mark.integration
def test_cli_prints_titles():
    with FakeChat() as server:
        out = _cli(["--n", "2"], {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": server.base_url,
                                  "OPENAI_MODEL": server.model}, stdin="Kernel bypass networking explained.")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["Sample 0 Kernel bypass networking  [+trailing text]",
                                       "Sample 1 Kernel bypass networking  [+trailing text]"]


STORIES = [
    {"id": i, "title": f"Original {i}", "by": "pg", "time": "2024-05-01T12:00:00Z", "url": f"https://ex.com/{i}",
     "score": 100, "scraped_body": body, "split": "val"}
    for i, body in enumerate(["SQLite stores tables as B-trees on disk pages.",
                              "A new Rust release adds async closures.",
                              "Researchers build a tiny GPU in Verilog."])
]


@pytest.mark.slow
def test_evaluate_with_openai_generator_lands_in_compare(tmp_path, monkeypatch, tiny_model):
    import compare
    import evaluate

    data = tmp_path / "stories.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in STORIES))
    with FakeChat(model="big-model") as llm, FakeReward() as reward:
        monkeypatch.setenv("OPENAI_API_KEY", "k")
        recipe = settings.Recipe(model=str(tiny_model), dataset=str(data), min_score=0, max_val_stories=3,
                                 eval_samples=2, validator="none", reward_url=reward.url,
                                 runs_dir=str(tmp_path / "runs"), run_name="prompted-big-model",
                                 max_completion_tokens=10)
        args = evaluate.EvalArgs(generator="openai", openai_model="big-model", openai_base_url=llm.base_url,
                                 label="prompted")
        result = evaluate.main(recipe, args)
    # 3 greedy + 3 x 2 sampled titles, each scored by the reward server under the shared rule
    assert len(result.all_scored()) == 9 and len(reward.scored) == 9
    assert [s.title for s in result.greedy] == ["Greedy SQLite stores tables", "Greedy A new Rust",
                                                "Greedy Researchers build a"]
    assert result.greedy[0].reward == fake_score("Greedy SQLite stores tables")
    # stop_at_newline (the default): the endpoint was asked to stop at "\n", so "extra line" never came
    assert not any(s.trailing for ss in result.sampled for s in ss)
    assert {tuple(r["stop"]) for r in llm.requests} == {("\n",)}
    run = tmp_path / "runs" / "prompted-big-model"
    row = json.loads((run / "metrics.jsonl").read_text())
    assert row["method"] == "openai" and row["extra"]["model"] == "big-model"
    assert row["extra"]["completion_tokens"] == 45 and (run / "eval" / "prompted.jsonl").exists()
    res = compare.main(compare.CompareArgs(out_dir=str(tmp_path / "cmp"), plots=False), [str(run)])
    line = next(ln for ln in res["markdown"].splitlines() if ln.startswith("| prompted-big-model"))
    assert "| openai | big-model |" in line and f"{row['reward_mean']:.3f}" in line


def test_evaluate_openai_errors_exit_cleanly(tmp_path, monkeypatch, tiny_model):
    import evaluate

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    recipe = settings.Recipe(model=str(tiny_model), runs_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="error: OPENAI_API_KEY is not set"):
        evaluate.main(recipe, evaluate.EvalArgs(generator="openai", openai_model="m"))
    with pytest.raises(SystemExit, match="unknown --generator 'vllm'"):
        evaluate.main(recipe, evaluate.EvalArgs(generator="vllm"))


def test_stop_strings_are_sent_only_when_asked():
    with FakeChat() as server:
        gen(server).generate(CONVS[:1], n=1, temperature=0.0, max_tokens=8, stop=("\n",))
        gen(server).generate(CONVS[:1], n=1, temperature=0.0, max_tokens=8)
    assert server.requests[0]["stop"] == ["\n"]
    assert "stop" not in server.requests[1]  # endpoints that reject `stop` still work without it
