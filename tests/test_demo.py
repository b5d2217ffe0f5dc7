"""demo.py: the paired comparisons, the report on fixture runs of both methods (one failing
mid-run), checkpoints of both layouts, settings, and the reward-server lifecycle; then the whole
demo on recipes/tiny.yaml with both methods.

Expected numbers are computed here from the raw inputs (stats.paired_bootstrap, the fixture
JSONL), not through demo.py's helpers.
"""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import demo
import utils
from hntitles.analysis import comparison, evaluation, experiment, grpo_semantics, stats
from hntitles.runs import costs, procs, rundir, settings
from hntitles.trl import config as trl_config

FIXTURES = Path(__file__).parent / "fixtures" / "runs"


def _scored(reward: float, copy: float = 0.0, title: str = "A title of five words", trailing: bool = False):
    return utils.Scored(title=title, rm=reward, matches=reward > 0, trailing=trailing, reward=reward, copy=copy)


def _result(rewards: list[float], copy: float = 0.0, samples: int = 2, ids=None, titles=None) -> evaluation.EvalResult:
    """An EvalResult whose story i has reward rewards[i] on every title (greedy + samples)."""
    ids = ids or list(range(len(rewards)))
    titles = titles or ["A title of five words"] * len(rewards)
    rows = [{"id": i, "title": f"Original title number {i}", "scraped_body": "body"} for i in ids]
    return evaluation.EvalResult(greedy=[_scored(r, copy, t) for r, t in zip(rewards, titles)],
                            sampled=[[_scored(r, copy, t) for _ in range(samples)] for r, t in zip(rewards, titles)],
                            rows=rows)


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
    cmp = comparison.compare(before_r, after_r)
    assert cmp.significant is significant
    assert cmp.improved == improved and cmp.n == len(BEFORE)
    assert cmp.copy_rose is copy_rose
    expected = stats.paired_bootstrap(after_r.per_story_reward(), before_r.per_story_reward(), seed=0)
    assert (cmp.diff, cmp.lo, cmp.hi) == pytest.approx(expected)


def test_compare_refuses_different_stories():
    with pytest.raises(ValueError, match="different stories"):
        comparison.compare(_result([0.1, 0.2], ids=[1, 2]), _result([0.1, 0.2], ids=[1, 3]))


COLLAPSED = [f"The Thing {i}: A Story of Stuff" for i in range(8)]  # every title "the …: a …"
VARIED = ["Original title number 0", "Why we moved", "Show HN: a grep", "Rust ships", "How SQLite works",
          "Original title number 5", "Ask HN: pipes", "A tiny GPU"]


@pytest.mark.parametrize("titles_before, titles_after, rouge_confirms, collapsed, says", [
    # reward up, titles no closer to the real ones and collapsed onto one template: both flagged
    (VARIED, COLLAPSED, False, True, ["does not show on ROUGE-L", "collapsed toward one template", "`the …: a …`"]),
    # reward up and titles become the real ones: ROUGE-L confirms, nothing flagged
    (COLLAPSED, [f"Original title number {i}" for i in range(8)], True, True, []),
])
def test_verdict_flags_a_gain_the_independent_metrics_do_not_show(titles_before, titles_after, rouge_confirms,
                                                                   collapsed, says):
    cmp = comparison.compare(_result(BEFORE, titles=titles_before),
                             _result([b + 0.1 for b in BEFORE], titles=titles_after))
    assert cmp.significant and cmp.rouge_confirms is rouge_confirms
    text = comparison.verdict(cmp, "TRL", "the untrained model")
    assert text.startswith("**TRL is measurably better than the untrained model**")
    for s in says:
        assert s in text
    if rouge_confirms:
        assert "ROUGE-L" not in text
    # "Original title number i" -> first word "original": the template share is 100% there too
    assert cmp.template_rose is (collapsed and titles_after is COLLAPSED)


EMPTY_SAFETENSORS = (2).to_bytes(8, "little") + b"{}"  # a complete safetensors file that holds no tensor


def write_adapter(folder: Path, complete: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(EMPTY_SAFETENSORS if complete else EMPTY_SAFETENSORS[:9])


def test_find_checkpoint_both_layouts(tmp_path, capsys):
    for step, adapter in ((5, True), (20, True), (25, False), (100, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if adapter:
            write_adapter(d)
    write_adapter(tmp_path / "checkpoint-30", complete=False)  # cut short: passed over, said
    (tmp_path / "checkpoint-final").mkdir()
    # The newest checkpoint with an adapter that loads wins; folders without one (being written) are skipped.
    assert experiment.find_checkpoint(tmp_path).name == "checkpoint-20"
    assert "passing over" in capsys.readouterr().out
    assert experiment.find_checkpoint(tmp_path / "checkpoint-final") is None
    # ART: <run>/art/<project>/models/<name>/checkpoints/NNNN; the demo's own eval folder never counts
    art = tmp_path / "art-run"
    for step in ("0003", "0012"):
        write_adapter(art / "art" / "p" / "models" / "m" / "checkpoints" / step)
    write_adapter(art / experiment.AFTER_DIR / "checkpoint-99")
    assert experiment.find_checkpoint(art).name == "0012"


def test_run_names_settings_and_methods():
    assert experiment.run_names("recipes/cpu.yaml") == {"base": "base-cpu", "demo": "demo-cpu", "study": "study-cpu",
                                                        "trl": "trl-cpu", "art": "art-cpu"}
    # a training seed other than the recipe's gets runs of its own; the baseline and report folders do not
    seeded = experiment.run_names("recipes/cpu.yaml", "aligned", seed=43)
    assert seeded["trl"] == "trl-cpu-aligned-s43" and seeded["art"] == "art-cpu-aligned-s43"
    assert seeded["base"] == "base-cpu" and seeded["demo"] == "demo-cpu-aligned"
    aligned = experiment.run_names("recipes/cpu.yaml", "aligned")
    assert aligned["trl"] == "trl-cpu-aligned" and aligned["art"] == "art-cpu-aligned"
    assert aligned["base"] == "base-cpu"  # the untrained model does not depend on the optimizer
    assert experiment.parse_methods("trl, art") == ["trl", "art"] and experiment.parse_methods("art") == ["art"]
    for bad in ("", "trl,ppo", "trl,trl"):
        with pytest.raises(SystemExit, match="--methods"):
            experiment.parse_methods(bad)


def test_aligned_setting_reaches_the_recipe_and_both_trainers_flags():
    recipe = experiment.load_recipe(str(experiment.ROOT / "recipes" / "tiny.yaml"), experiment.SETTINGS["aligned"])
    assert (recipe.optimizer, recipe.weight_decay, recipe.adam_beta1, recipe.adam_beta2, recipe.optimizer_steps) == (
        "adamw", 0.0, 0.9, 0.999, "per_step")
    defaults = experiment.load_recipe(str(experiment.ROOT / "recipes" / "tiny.yaml"), experiment.SETTINGS["defaults"])
    assert (defaults.optimizer, defaults.weight_decay, defaults.optimizer_steps) == (None, None, None)

    assert trl_config.optimizer_kwargs(recipe) == {"optim": "adamw_torch", "weight_decay": 0.0,
                                                               "adam_beta1": 0.9, "adam_beta2": 0.999}


@pytest.mark.parametrize("max_steps, points, expected", [
    (20, 4, ["--eval_every", "5", "--eval_samples", "0"]),   # 4 greedy-only validations
    (4, 4, ["--eval_every", "1", "--eval_samples", "0"]),
    (10, 3, ["--eval_every", "4", "--eval_samples", "0"]),   # 4, 8 and the end (10)
    (20, 0, []),                                             # 0: the recipe's own validations
])
def test_curve_flags(max_steps, points, expected):
    assert experiment.curve_flags(settings.Recipe(max_steps=max_steps), points) == expected


def test_greedy_only_view_and_curve_baseline_row(tmp_path):
    full = _result([0.1, 0.5, 0.3], samples=3)
    full.sampled[0][0] = _scored(0.9)  # a sample differs from the greedy title
    greedy = evaluation.greedy_only(full)
    assert greedy.per_story_reward() == [0.1, 0.5, 0.3]
    experiment.write_curve_baseline(tmp_path, full)
    (row,), _ = rundir.read_metrics(tmp_path)
    assert row["n"] == 3 and row["extra"]["stories"] == 3 and row["extra"]["label"] == experiment.CURVE_LABEL
    assert row["reward_mean"] == pytest.approx(0.3)


def _fixture_run(tmp_path: Path, name: str, method: str) -> experiment.MethodRun:
    import shutil

    shutil.copytree(FIXTURES / name, tmp_path / name)
    return experiment.MethodRun(experiment.METHODS[method], tmp_path / name)


def _summary(tmp_path, art_fails: bool) -> demo.Summary:
    """Both methods on the fixture runs; ART's run is cut mid-way when art_fails."""
    trl, art = _fixture_run(tmp_path, "trl-tiny", "trl"), _fixture_run(tmp_path, "art-tiny", "art")
    trl.step, trl.result, trl.train_wall, trl.train_cpu = 6, _result([b + 0.1 for b in BEFORE]), 130.0, 160.0
    art.step, art.train_wall, art.train_cpu = 6, 95.0, 120.0
    if art_fails:
        art.step, art.code = 2, 3
        art.error = "training failed at step 2 of 6 (exit 3: the reward server failed; no reward was made up)"
    else:
        art.result = _result([b + 0.05 for b in BEFORE])
    s = demo.Summary(recipe=settings.Recipe(eval_samples=2, max_steps=6), recipe_path="recipes/tiny.yaml",
                     setting="defaults", before=_result(BEFORE), runs=[trl, art],
                     stages=[("train TRL", 130.0), ("train ART", 95.0)], cpu=[160.0, 120.0], machine="Machine: test")
    return demo.compute(s)


def gain_text(g: tuple[float, float, float]) -> str:
    return f"{g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}]"


def test_report_of_both_methods(tmp_path):
    s = _summary(tmp_path, art_fails=False)
    text = demo.render_report(s, show_titles=3)
    gain = stats.paired_bootstrap([b + 0.1 for b in BEFORE], BEFORE, seed=0)
    diff = stats.paired_bootstrap([b + 0.05 for b in BEFORE], [b + 0.1 for b in BEFORE], seed=0)
    assert f"**{gain[0]:+.3f} [{gain[1]:+.3f}, {gain[2]:+.3f}]**" in text
    assert "| **ART - TRL** |" in text and f"**{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]**" in text
    assert "ART is measurably worse than TRL" in text
    # cost per step from the fixture train rows (means over steps 1..6)
    trl_rows = [json.loads(x) for x in (FIXTURES / "trl-tiny" / "metrics.jsonl").read_text().splitlines()]
    trl_train = [r for r in trl_rows if r["split"] == "train"]
    sec = sum(r["extra"]["step_seconds"] for r in trl_train) / len(trl_train)
    tok = sum(r["extra"]["trained_tokens"] for r in trl_train) / len(trl_train)
    vals = sum(r["split"] == "val" for r in trl_rows)
    assert (f"| TRL GRPOTrainer | 6 | {sec:.1f} | 28.5 | 1.0 | {tok:.0f} | {vals} x, 0 s | "
            "2.2 min (130 s), CPU 160 s |") in text
    assert "| ART loop (CPU engine) | 6 | 12.0 | 20.0 | 6.0 | 108 |" in text
    assert "| original | untrained | TRL | ART |" in text and text.count("| Original title number") == 3
    assert "ROUGE-L to the real title (not in the reward)" in text and "top template's share" in text
    assert grpo_semantics.markdown() in text and "Setting: **framework defaults" in text
    assert "## Failed" not in text and demo.exit_code(s, strict=False) == 0
    decision = text[text.index("## Which method should I use?"):]  # the report closes with it
    assert f"- **This run's gain** (one training seed): TRL {gain_text(gain)}; ART " in decision
    assert f"TRL {sec:.1f} s wall" in decision and "one seed decides nothing; `make study` trains 3 seeds" in decision


def test_reference_rows_give_each_gain_as_a_share_of_the_gap_to_the_real_titles(tmp_path):
    s = _summary(tmp_path, art_fails=False)
    s.refs = {"reference": _result([b + 0.4 for b in BEFORE], samples=0)}
    text = demo.render_report(s, show_titles=0)
    assert "| untrained model | 0.302 |" in text and "| real Hacker News titles | 0.703 |" in text
    assert "Gap from the untrained model to the real titles: +0.400. TRL GRPOTrainer +0.100 = 25% of it; " \
           "ART loop (CPU engine) +0.050 = 12% of it." in text
    assert "| prompted endpoint (optional) | not run: set `OPENAI_*`" in text
    assert "TRL +0.100 [" in text and "], 25% of the gap to the real titles (+0.400)" in text
    s.refs = {"reference": _result([b - 0.1 for b in BEFORE], samples=0), "openai": _result(BEFORE, samples=0)}
    text = demo.render_report(s, show_titles=0)
    assert "already scores 0.100 above the real titles" in text and "| prompted endpoint (optional) | 0.302 |" in text


def test_report_when_one_method_fails_mid_run(tmp_path):
    s = _summary(tmp_path, art_fails=True)
    text = demo.render_report(s, show_titles=2)  # no crash
    assert "| ART loop (CPU engine) | 2 | **failed** (see below) |" in text
    assert "## Failed" in text and "training failed at step 2 of 6 (exit 3: the reward server failed" in text
    assert "ART vs TRL: not compared (a method did not finish)" in text and "ART - TRL" not in text
    assert "| original | untrained | TRL |" in text  # only what finished is shown side by side
    assert set(s.gains) == {"trl"} and s.art_vs_trl is None
    assert demo.exit_code(s, strict=False) == 1


@pytest.mark.parametrize("extra, name, expected", [
    ({"optimizer_steps": 1, "trained_tokens": 96}, "trained_tokens", 96.0),              # TRL's own keys
    ({"train_metrics": {"data/step_num_gradient_steps": 8.0}}, "optimizer_steps", 8.0),  # ART's step metrics
    ({"train_metrics": {"data/step_trainer_tokens": 70.0}}, "trained_tokens", 70.0),
    ({"skipped": "no group can teach", "step_seconds": 3.0}, "optimizer_steps", 0.0),   # skipped: nothing trained
    ({"skipped": "no group can teach", "step_seconds": 3.0}, "step_seconds", 3.0),      # ... but it took time
    ({}, "step_cpu_seconds", None),                                                      # not logged: n/a
])
def test_row_cost(extra, name, expected):
    assert costs.row_cost({"extra": extra}, name) == expected


@pytest.mark.integration
def test_train_method_records_a_failure_mid_run(tmp_path):
    """A trainer that logs two steps and then dies: the demo records how far it got and why."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(
        "import sys, utils\n"
        "from hntitles.runs import rundir\n"
        "run = sys.argv[sys.argv.index('--run_name') + 1]\n"
        f"w = rundir.MetricsWriter({str(tmp_path)!r} + '/' + run)\n"
        "for step in (1, 2):\n"
        "    w.write(utils.metrics_row(method='art', step=step, split='train', scored=[], wall_time=step))\n"
        "print('error: reward server at http://x unreachable', flush=True)\n"
        "sys.exit(3)\n")
    mr = experiment.MethodRun(experiment.Method("art", "ART", str(script)), tmp_path / "art-x")
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(experiment.ROOT) + (os.pathsep + env_path if env_path else "")
    try:
        experiment.train_method(mr, "recipes/tiny.yaml", "http://127.0.0.1:1", [], max_steps=4)
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert mr.code == 3 and mr.step == 2 and mr.checkpoint is None
    assert mr.error.startswith("training failed at step 2 of 4 (exit 3: the reward server failed")
    assert experiment.exit_reason(-9).startswith("killed by SIGKILL (out of memory?")
    assert experiment.exit_reason(-15) == "killed by SIGTERM" and experiment.exit_reason(1) == ""
    missing = experiment.MethodRun(experiment.Method("art", "ART", str(tmp_path / "nope.py")), tmp_path / "art-y")
    experiment.train_method(missing, "recipes/tiny.yaml", "http://127.0.0.1:1", [], max_steps=4)
    assert missing.code == 127 and "nope.py not found" in missing.error


@pytest.mark.integration
def test_stop_process_kills_a_child_that_ignores_sigterm():
    proc = subprocess.Popen([sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    t0 = time.monotonic()
    assert procs.stop_process(proc, grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 10


@pytest.mark.integration
def test_stream_copies_output_and_returns_exit_code(tmp_path):
    log = tmp_path / "out.log"
    code = procs.stream([sys.executable, "-c", "import sys; print('line one'); print('line two'); sys.exit(3)"], log)
    assert code == 3
    assert log.read_text().splitlines() == ["line one", "line two"]


def test_wait_healthy_fails_on_a_dead_url():
    with pytest.raises(procs.ServerError, match="not healthy after 1s"):
        procs.wait_healthy(f"http://127.0.0.1:{procs.free_port()}", timeout=1.0)


@pytest.mark.integration
def test_reward_server_is_stopped_after_use_and_after_an_error(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="boom"), procs.reward_server(log, timeout=120) as (url, health):
        assert health["status"] == "ok"
        assert utils.RewardClient(url).health_sync()["status"] == "ok"
        raise RuntimeError("boom")  # a failing stage must still stop the server
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2.0)


@pytest.mark.integration
def test_reward_server_that_cannot_start_is_reported(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(procs.ServerError, match="exited with code [12] before it was healthy") as err:
        with procs.reward_server(log, timeout=120, extra_args=["--no_such_flag"]):
            pass
    assert "no_such_flag" in str(err.value)  # the log tail names the problem
    with pytest.raises(procs.ServerError, match="not found"):
        with procs.reward_server(log, script=tmp_path / "missing.py"):
            pass


@pytest.mark.integration
def test_sigterm_stops_the_demo_and_its_server(tmp_path, stories_path):
    """The demo started by `make demo`, killed mid-run: its reward server must not outlive it."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"shared:\n  model: models/tiny\n  dataset: {stories_path}\n  max_val_stories: 2\n")
    env = {**os.environ, "RUNS_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "demo.py", "--recipe", str(recipe)], cwd=experiment.ROOT, env=env,
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
        procs.stop_process(proc, grace=5)
    assert proc.returncode != 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2.0)


METHODS_E2E = "trl,art"  # ART: train.py --backend cpu


@pytest.mark.slow
@pytest.mark.integration
def test_demo_end_to_end_on_the_tiny_recipe_then_resume(tmp_path, monkeypatch, capsys):
    """Every stage for real on models/tiny (a random 2-layer model: it learns nothing, the pipeline is the test)."""
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    args = demo.DemoArgs(recipe=str(experiment.ROOT / "recipes" / "tiny.yaml"), methods=METHODS_E2E, fresh=True,
                         show_titles=2, threads=1)
    recipe = experiment.load_recipe(args.recipe)
    s = demo.main(args)
    out = capsys.readouterr().out
    assert not s.failed, [mr.error for mr in s.failed]
    report = s.report_path.read_text()
    assert "## Gains" in report and f"of {recipe.max_val_stories} |" in report
    assert (s.report_path.parent / "compare.png").read_bytes()[:4] == b"\x89PNG"
    base_rows, _ = rundir.read_metrics(tmp_path / "base-tiny")
    assert [(r["method"], r["step"], r["extra"]["label"]) for r in base_rows] == [
        ("base", 0, "before"), ("base", 0, experiment.CURVE_LABEL), ("reference", 0, experiment.REFERENCE_LABEL)]
    real = evaluation.read_eval(tmp_path / "base-tiny", experiment.REFERENCE_LABEL)  # the real titles, scored
    assert [g.title for g in real.greedy] == [r["title"] for r in real.rows]
    assert len(real.rows) == recipe.max_val_stories
    assert "| real Hacker News titles |" in report and "| prompted endpoint (optional) | not run" in report
    for mr in s.runs:
        rows, _ = rundir.read_metrics(mr.run_dir)
        val = [r for r in rows if r["split"] == "val"]
        # the curve: curve_points greedy-only validations, every ceil(max_steps / curve_points) steps, and the last
        every = math.ceil(recipe.max_steps / args.curve_points)
        assert [r["step"] for r in val] == sorted({*range(every, recipe.max_steps + 1, every), recipe.max_steps})
        assert all(r["n"] == r["extra"]["stories"] for r in val) and "rouge_l_mean" in val[-1]["extra"]
        after, _ = rundir.read_metrics(mr.run_dir / experiment.AFTER_DIR)
        assert [(r["method"], r["step"], r["n"]) for r in after] == [
            (mr.method.name, recipe.max_steps, recipe.max_val_stories * (1 + recipe.eval_samples))]
        assert (mr.run_dir / "demo_train.log").read_text().strip()
    if len(s.runs) == 2:
        assert s.art_vs_trl is not None and "| **ART - TRL** |" in report
        both_methods_watched_alike(s.runs)
    for mr in s.runs:  # the quiet console: the tokenizer warning is stopped at its source
        assert "clean_up_tokenization_spaces" not in (mr.run_dir / "demo_train.log").read_text() + out
        every_adapter_has_a_card(mr.run_dir)
    url = next(line.split()[3] for line in out.splitlines() if line.startswith("started local_reward.py at "))
    with pytest.raises(httpx.TransportError):  # stopped after a successful run too
        httpx.get(f"{url}/health", timeout=2.0)

    # A rerun without --fresh resumes: nothing is retrained, the evaluations are redone (one row each).
    train_rows = {mr.method.name: [r for r in rundir.read_metrics(mr.run_dir)[0] if r["split"] == "train"]
                  for mr in s.runs}
    titles = [(tmp_path / "base-tiny" / "eval" / "before.jsonl").read_text(),
              *[(mr.run_dir / experiment.AFTER_DIR / "eval" / "after.jsonl").read_text() for mr in s.runs]]
    s2 = demo.main(dataclasses.replace(args, fresh=False))
    assert not s2.failed
    # every evaluation is seeded: the redone ones write the same titles (sampled ones included) and rewards
    assert titles == [(tmp_path / "base-tiny" / "eval" / "before.jsonl").read_text(),
                      *[(mr.run_dir / experiment.AFTER_DIR / "eval" / "after.jsonl").read_text() for mr in s2.runs]]
    for mr in s2.runs:
        assert [r for r in rundir.read_metrics(mr.run_dir)[0] if r["split"] == "train"] == train_rows[mr.method.name]
        assert len(rundir.read_metrics(mr.run_dir / experiment.AFTER_DIR)[0]) == 1
    assert len(rundir.read_metrics(tmp_path / "base-tiny")[0]) == 3
    study_on_the_demos_runs(tmp_path, args, s2, train_rows)


def both_methods_watched_alike(runs) -> None:
    """One dashboard for both: the same hn_* keys at the same steps in each run's stored TensorBoard data,
    and rollout tables in one schema for every step."""
    import pyarrow.parquet as pq

    from hntitles.runs import completions, tracking

    stored = {mr.method.name: {tag: [step for step, _ in points] for tag, points in
                               tracking.read_scalars(mr.run_dir).items() if tag.startswith("hn_")} for mr in runs}
    # The optimizer's statistics exist where a library took a step: TRL steps on a batch whose advantages are all 0,
    # ART skips it (no group can teach), so ART's loss curve has a gap there. Every other key: the same steps.
    optimizer = {f"hn_train/{name}" for name in tracking.OPTIMIZER_KEYS.values()}
    trl, art = ({k: v for k, v in stored[m].items() if k not in optimizer} for m in ("trl", "art"))
    assert {"hn_train/reward", "hn_val/reward", "hn_train/step_seconds", "hn_train/trained_tokens"} <= set(trl)
    assert set(trl) == set(art), set(trl) ^ set(art)
    assert trl == art
    assert stored["trl"]["hn_train/loss"] == trl["hn_train/reward"]
    art_dir = next(mr.run_dir for mr in runs if mr.method.name == "art")
    trained = [r["step"] for r in rundir.read_metrics(art_dir)[0] if r["split"] == "train"
               and not r["extra"].get("skipped")]
    assert all(stored["art"][k] == trained for k in optimizer & set(stored["art"])), (trained, stored["art"])
    for mr in runs:
        assert completions.steps(mr.run_dir) == list(range(1, len(trl["hn_train/reward"]) + 1))
        tables = [completions.read_step(mr.run_dir, step) for step in completions.steps(mr.run_dir)]
        assert all(list(rec) == list(completions.COLUMNS) and rec["method"] == mr.method.name
                   for table in tables for rec in table)
    schemas = [pq.read_schema(completions.step_path(mr.run_dir, 1)) for mr in runs]
    assert schemas[0].equals(schemas[1], check_metadata=False)


def every_adapter_has_a_card(run_dir: Path) -> None:
    """Every adapter folder (each checkpoint, final/) carries the run's card, not a placeholder."""
    folders = [p.parent for p in run_dir.rglob("adapter_config.json")]
    assert run_dir / "final" in folders and len(folders) >= 2
    for folder in folders:
        card = (folder / "README.md").read_text()
        assert "[None]" not in card and "More Information Needed" not in card, folder
        assert "## Reward" in card and "Last validation: " in card and "make titles" in card, folder
        assert "PeftModel.from_pretrained" in card and "models/tiny" in card, folder
    assert "Last validation: step" in (run_dir / "final" / "README.md").read_text()


def study_on_the_demos_runs(tmp_path: Path, args, demo_summary, demo_train_rows) -> None:
    """`make study` after `make demo`: killed while it trains the second seed, then run again. The recipe's
    seed is the demo's run (reused: nothing retrained, its evaluation read back, the demo's numbers); the
    second seed trains runs of its own, which differ; the report and the seed spread the demo then quotes."""
    import study

    docs = tmp_path / "docs"
    argv = [sys.executable, "study.py", "--recipe", args.recipe, "--methods", METHODS_E2E, "--seeds", "2",
            "--threads", "1", "--docs_dir", str(docs), "--parity_steps", "0"]  # parity: tests/test_study.py
    env = {**os.environ, "RUNS_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=experiment.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seeded = tmp_path / "trl-tiny-aligned-s43"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (
            (seeded / rundir.METRICS_FILE).exists() and rundir.read_metrics(seeded)[0]):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # a killed study: its trainer checkpoints, the study stops
    out = proc.communicate(timeout=300)[0].decode(errors="replace")
    assert proc.returncode != 0, out[-3000:]

    result = study.main(study.StudyArgs(recipe=args.recipe, methods=METHODS_E2E, seeds=2, threads=1,
                                        docs_dir=str(docs), parity_steps=0))
    assert not result.failed, [mr.error for _, mr in result.failed]
    steps = lambda mr: [r["step"] for r in rundir.read_metrics(mr.run_dir)[0] if r["split"] == "train"]  # noqa: E731
    for mr in result.runs[42]:  # the demo's runs: nothing retrained
        assert [r for r in rundir.read_metrics(mr.run_dir)[0] if r["split"] == "train"] == demo_train_rows[
            mr.method.name]
    for mr in result.runs[43]:  # resumed where the kill left it: every step once
        assert steps(mr) == list(range(1, len(steps(mr)) + 1)) == list(range(1, 5))
    summary = study.summarize(result)
    for method in ("trl", "art"):  # --seeds 1 of a study is the demo: the same numbers
        mine, theirs = summary[method].per_seed[42], demo_summary.gains[method]
        assert (mine.diff, mine.lo, mine.hi) == (theirs.diff, theirs.lo, theirs.hi)
        # another training seed trains another run: another LoRA init at least (the tiny model's titles all
        # score 0 under the real reward, so there is no gradient to tell the runs apart by)
        from safetensors.torch import load_file

        adapters = [load_file(str(mr.checkpoint / "adapter_model.safetensors"))
                    for s in (42, 43) for mr in result.runs[s] if mr.method.name == method]
        assert any(not (adapters[0][k] == adapters[1][k]).all() for k in adapters[0])
    report = (tmp_path / "study-tiny-aligned" / study.REPORT_FILE).read_text()
    assert "**ART - TRL over 2 seeds x 4 stories: " in report and "| 43 |" in report
    for mr in result.runs[42]:  # the reused runs show what they cost when they trained, marked reused
        took = comparison.fmt_duration(experiment.recorded_train_seconds(mr.run_dir, mr.method.name))
        stage = f"seed 42: train {mr.method.title} (reused: its time when it trained)"
        assert f"| {stage} | {took} | not recorded" in report
    assert "| real Hacker News titles |" in report and "## Power (ART - TRL)" in report
    study.main(study.StudyArgs(recipe=args.recipe, methods=METHODS_E2E, seeds=2, threads=1, docs_dir=str(docs),
                               parity_steps=0, report_only=True))  # again from disk: the stage times kept
    again = (tmp_path / "study-tiny-aligned" / study.REPORT_FILE).read_text()
    assert again.split("## Runs and time")[1].split("Machine:")[0] == report.split("## Runs and time")[1].split(
        "Machine:")[0]
    spread = json.loads((docs / "study-tiny-aligned.json").read_text())
    assert spread["seeds"] == [42, 43] and spread["commit"] and spread["art-trl"]["line"] in report
    quoted = demo.main(dataclasses.replace(args, fresh=False, report_only=True, docs_dir=str(docs)))
    assert "The latest study (2 seeds [42, 43]" in quoted.report_path.read_text()


@pytest.mark.integration  # the plot is drawn by compare.py in its own process
def test_report_only_rebuilds_from_disk(tmp_path, monkeypatch):
    """--report_only: the evaluations read back (records -> EvalResult) give the same comparison."""
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    before, after = _result(BEFORE), _result([b + 0.1 for b in BEFORE])
    assert evaluation.EvalResult.from_records(after.records()).per_story_reward() == after.per_story_reward()
    for run_dir, label, res in ((tmp_path / "base-tiny", "before", before),
                                (tmp_path / "trl-tiny" / experiment.AFTER_DIR, "after", after)):
        (run_dir / "eval").mkdir(parents=True)
        (run_dir / "eval" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res.records()))
    s = demo.main(demo.DemoArgs(recipe=str(experiment.ROOT / "recipes" / "tiny.yaml"), report_only=True,
                                setting="defaults"))  # run names without the -aligned tag
    gain = stats.paired_bootstrap(after.per_story_reward(), before.per_story_reward(), seed=0)
    assert (s.gains["trl"].diff, s.gains["trl"].lo) == pytest.approx(gain[:2])
    assert [mr.method.name for mr in s.failed] == ["art"] and "no evaluation at" in s.failed[0].error
    assert s.report_path == tmp_path / "demo-tiny" / demo.REPORT_FILE and "## Failed" in s.report_path.read_text()
