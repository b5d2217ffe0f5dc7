"""demo.py: the report, the paired comparison, checkpoints, and the reward-server lifecycle.

The 15-minute CPU run itself is not a test; these check the pieces it is built from, and that
a server the demo starts is stopped on success, on failure and on SIGTERM.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

import demo
import utils


def _scored(reward: float, copy: float = 0.0, title: str = "A title of five words", trailing: bool = False):
    return utils.Scored(title=title, rm=reward, matches=reward > 0, trailing=trailing, reward=reward, copy=copy)


def _result(rewards: list[float], copy: float = 0.0, samples: int = 2, ids=None) -> utils.EvalResult:
    """An EvalResult whose story i has reward rewards[i] on every title (greedy + samples)."""
    ids = ids or list(range(len(rewards)))
    rows = [{"id": i, "title": f"Original {i}", "scraped_body": "body"} for i in ids]
    return utils.EvalResult(greedy=[_scored(r, copy) for r in rewards],
                            sampled=[[_scored(r, copy) for _ in range(samples)] for r in rewards], rows=rows)


BEFORE = [0.30, 0.25, 0.40, 0.35, 0.20, 0.33, 0.28, 0.31]


@pytest.mark.parametrize("after, copy_after, significant, improved, copy_rose", [
    # every story gains 0.1: the interval sits on +0.1
    ([b + 0.1 for b in BEFORE], 0.0, True, 8, False),
    # nothing changes: no improvement, interval [0, 0] does not exclude 0
    (BEFORE, 0.0, False, 0, False),
    # mixed gains and losses around 0: not significant
    ([b + d for b, d in zip(BEFORE, [0.1, -0.1, 0.05, -0.05, 0.1, -0.1, 0.02, -0.02])], 0.0, False, 4, False),
    # a gain that comes with copying: significant, but the report must flag the copy fraction
    ([b + 0.1 for b in BEFORE], 0.8, True, 8, True),
])
def test_compare(after, copy_after, significant, improved, copy_rose):
    before_r, after_r = _result(BEFORE), _result(after, copy=copy_after)
    cmp = demo.compare(before_r, after_r)
    assert cmp.significant is significant
    assert cmp.improved == improved and cmp.n == len(BEFORE)
    assert cmp.copy_rose is copy_rose
    expected = utils.bootstrap_mean_diff(after_r.per_story_reward(), before_r.per_story_reward(), seed=0)
    assert (cmp.diff, cmp.lo, cmp.hi) == pytest.approx(expected)


def test_compare_refuses_different_stories():
    with pytest.raises(ValueError, match="different stories"):
        demo.compare(_result([0.1, 0.2], ids=[1, 2]), _result([0.1, 0.2], ids=[1, 3]))


def test_report_shows_interval_copy_and_titles(tmp_path):
    before_r, after_r = _result(BEFORE), _result([b + 0.1 for b in BEFORE], copy=0.9)
    cmp = demo.compare(before_r, after_r)
    recipe = utils.Recipe(eval_samples=2)
    text = demo.render_report(cmp, before_r, after_r, recipe=recipe, recipe_path="recipes/cpu.yaml",
                              run_dirs={"trained (TRL)": tmp_path}, stages=[("train", 300.0), ("eval", 60.0)],
                              show_titles=3, machine="Machine: test",
                              trainer_val=[{"step": 10, "reward_mean": 0.345, "copy_frac_mean": 0.1, "title_len_mean": 8.0,
                                            "trailing_rate": 0.5, "extra": {"greedy_reward_mean": 0.4}}])
    assert f"[{cmp.lo:+.3f}, {cmp.hi:+.3f}]" in text and f"{cmp.diff:+.3f}" in text
    assert "8/8 stories improved" in text
    assert "copy fraction rose" in text and "| copy fraction | 0.00 | 0.90 | +0.90 |" in text
    assert text.count("- original:") == 3 and "Original 0" in text
    assert "6.0 min (360 s)" in text  # total of the stages
    assert str(tmp_path) in text and "Machine: test" in text
    assert "| 10 | 0.345 | 0.400 | 0.10 | 8.0 | 50% |" in text  # the trainer's own validations


def test_last_checkpoint(tmp_path):
    for step, adapter in ((5, True), (20, True), (25, False), (100, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if adapter:
            (d / "adapter_config.json").write_text("{}")
    (tmp_path / "checkpoint-final").mkdir()
    # The newest checkpoint with an adapter wins; folders without one (being written) are skipped.
    assert demo.last_checkpoint(tmp_path).name == "checkpoint-20"
    assert demo.last_checkpoint(tmp_path / "checkpoint-final") is None


def test_run_names():
    assert demo.run_names(utils.Recipe(), "recipes/cpu.yaml") == ("base-cpu", "trl-cpu")
    assert demo.run_names(utils.Recipe(run_name="mine"), "recipes/cpu.yaml") == ("base-cpu", "mine")


def test_stop_process_kills_a_child_that_ignores_sigterm():
    proc = subprocess.Popen([sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    t0 = time.monotonic()
    assert demo.stop_process(proc, grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 10


def test_stream_copies_output_and_returns_exit_code(tmp_path):
    log = tmp_path / "out.log"
    code = demo.stream([sys.executable, "-c", "import sys; print('line one'); print('line two'); sys.exit(3)"], log)
    assert code == 3
    assert log.read_text().splitlines() == ["line one", "line two"]


def test_wait_healthy_fails_on_a_dead_url():
    with pytest.raises(demo.ServerError, match="not healthy after 1s"):
        demo.wait_healthy(f"http://127.0.0.1:{demo.free_port()}", timeout=1.0)


@pytest.mark.integration
def test_reward_server_is_stopped_after_use_and_after_an_error(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="boom"), demo.reward_server(log, timeout=120) as (url, health):
        assert health["status"] == "ok"
        assert utils.RewardClient(url).health_sync()["status"] == "ok"
        raise RuntimeError("boom")  # a failing stage must still stop the server
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2.0)


@pytest.mark.integration
def test_reward_server_that_cannot_start_is_reported(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(demo.ServerError, match="exited with code [12] before it was healthy") as err:
        with demo.reward_server(log, timeout=120, extra_args=["--no_such_flag"]):
            pass
    assert "no_such_flag" in str(err.value)  # the log tail names the problem
    with pytest.raises(demo.ServerError, match="not found"):
        with demo.reward_server(log, script=tmp_path / "missing.py"):
            pass


@pytest.mark.integration
def test_sigterm_stops_the_demo_and_its_server(tmp_path, stories_path):
    """The demo started by `make demo`, killed mid-run: its reward server must not outlive it."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"shared:\n  model: models/tiny\n  dataset: {stories_path}\n  max_val_stories: 2\n")
    env = {**os.environ, "RUNS_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "demo.py", "--recipe", str(recipe)], cwd=demo.ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, seen = None, []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("started local_reward.py at "):
                url = line.split()[3]
                break
        assert url, "".join(seen)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        demo.stop_process(proc, grace=5)
    assert proc.returncode != 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2.0)


@pytest.mark.slow
@pytest.mark.integration
def test_demo_end_to_end_on_the_tiny_recipe_then_resume(tmp_path, monkeypatch, capsys):
    """Every stage for real on models/tiny (a random 2-layer model: it learns nothing, the pipeline is the test)."""
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    args = demo.DemoArgs(recipe=str(demo.ROOT / "recipes" / "tiny.yaml"), fresh=True, show_titles=2)
    recipe = demo.load_recipe(args.recipe)
    cmp = demo.main(args)
    out = capsys.readouterr().out
    base, trained = tmp_path / "base-tiny", tmp_path / "trl-tiny"
    report = (trained / demo.REPORT_FILE).read_text()
    assert "Paired difference" in report and f"over {cmp.n} stories" in report and cmp.n == recipe.max_val_stories
    base_rows, _ = utils.read_metrics(base)
    assert [(r["method"], r["step"], r["split"]) for r in base_rows] == [("base", 0, "val")]
    after_rows, _ = utils.read_metrics(trained / demo.AFTER_DIR)
    assert [(r["method"], r["step"]) for r in after_rows] == [("trl", recipe.max_steps)]
    assert (trained / "demo_train.log").read_text().strip()  # the trainer's output was kept
    url = next(line.split()[3] for line in out.splitlines() if line.startswith("started local_reward.py at "))
    with pytest.raises(httpx.TransportError):  # stopped after a successful run too
        httpx.get(f"{url}/health", timeout=2.0)

    # A rerun without --fresh resumes: nothing is retrained, the baseline is redone (still one row).
    train_rows = [r for r in utils.read_metrics(trained)[0] if r["split"] == "train"]
    demo.main(dataclasses.replace(args, fresh=False))
    assert [r for r in utils.read_metrics(trained)[0] if r["split"] == "train"] == train_rows
    assert len(utils.read_metrics(base)[0]) == 1
    assert len(utils.read_metrics(trained / demo.AFTER_DIR)[0]) == 1
