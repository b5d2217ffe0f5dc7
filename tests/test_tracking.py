"""hntitles/runs/tracking.py and completions.py: a tracker that cannot start fails at start-up naming the flag,
one that fails mid-run loses only its own data, a resumed run logs each step once, one rollout schema."""

from __future__ import annotations

import pytest

from hntitles.runs import completions, settings, tracking


def row(step: int, split: str = "train", reward: float = 0.5) -> dict:
    return {"split": split, "step": step, "reward_mean": reward, "match_rate": 1.0,
            "extra": {"step_seconds": 2.0, "trained_tokens": 10}}


@pytest.mark.parametrize("kind, env, says", [
    ("trackio", {}, "--report_to trackio: trackio 0.43 pins pillow<13"),
    ("wandb", {"WANDB_API_KEY": "", "WANDB_MODE": ""}, "--report_to wandb needs WANDB_API_KEY"),
])
def test_a_tracker_that_cannot_start_names_the_flag(tmp_path, monkeypatch, kind, env, says):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(tracking.TrackerError, match=says):
        tracking.open_tracker(settings.Recipe(report_to=kind), tmp_path / "run", "trl")


def test_an_unwritable_run_directory_names_the_flag(tmp_path):
    (tmp_path / "file").write_text("")  # a run directory under a file: nothing can be written there, root or not
    with pytest.raises(tracking.TrackerError, match="cannot write .* --report_to none"):
        tracking.open_tracker(settings.Recipe(), tmp_path / "file" / "run", "trl")


def test_an_unknown_tracker_is_refused_by_the_recipe():
    with pytest.raises(ValueError, match="unknown report_to 'tensorbord'"):
        settings.Recipe(report_to="tensorbord").check()


def test_a_failure_mid_run_is_counted_never_raised(tmp_path, capsys):
    tracker = tracking.open_tracker(settings.Recipe(), tmp_path, "art", first_step=1)
    tracker.log_row(row(1))
    tracker.writer.close()
    tracker.writer = None  # the writer is gone (a full disk, a closed file): logging fails from here on
    tracker.log_row(row(2))
    tracker.log_row(row(3))
    tracker.close()
    err = capsys.readouterr().err
    assert tracker.failures == 2 and err.count("warning: the tensorboard tracker failed") == 1
    assert "failed 2 time(s)" in err
    assert [s for s, _ in tracking.read_scalars(tmp_path)["hn_train/reward"]] == [1]


def test_a_resumed_run_logs_each_step_once(tmp_path):
    first = tracking.open_tracker(settings.Recipe(), tmp_path, "trl", first_step=1)
    for step in (1, 2, 3):  # steps 2 and 3 were logged, then the run died before checkpointing them
        first.log_row(row(step, reward=0.1))
    first.close()
    second = tracking.open_tracker(settings.Recipe(), tmp_path, "trl", first_step=2)  # resumes after step 1
    for step in (2, 3, 4):
        second.log_row(row(step, reward=0.9))
    second.close()
    scalars = tracking.read_scalars(tmp_path)
    assert scalars["hn_train/reward"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.9)), (3, pytest.approx(0.9)),
                                          (4, pytest.approx(0.9))]
    assert scalars["hn_train/tokens_per_second"][0][1] == pytest.approx(5.0)


def test_rank_other_than_zero_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    tracker = tracking.open_tracker(settings.Recipe(), tmp_path, "trl", first_step=1)
    tracker.log_row(row(1))
    assert tracker.kind == "none" and not (tmp_path / tracking.TRACKER_DIR).exists()


def test_rollout_tables_one_schema_rewritten_whole(tmp_path):
    s = [type("S", (), {"title": t, "reward": r, "rm": r, "matches": True, "length": 2, "copy": 0.0,
                        "trailing": False})() for t, r in (("A b", 1.0), ("C d", 0.0))]
    recs = completions.records(method="trl", step=3, story_ids=["7", "7"], completions=["A b", "C d"], scored=s,
                               advantages=completions.art_advantages([1.0, 0.0], scale=True),
                               tokens=[3, float("nan")], group_size=2)
    completions.write_step(tmp_path, 3, recs)
    completions.write_step(tmp_path, 3, recs)  # a resumed step replaces its file
    back = completions.read_step(tmp_path, 3)
    assert list(back[0]) == list(completions.COLUMNS) and len(back) == 2
    assert [r["advantage"] for r in back] == pytest.approx([1.0, -1.0], rel=1e-5) and back[1]["completion_tokens"] == -1
    assert completions.steps(tmp_path) == [3]
    with pytest.raises(FileNotFoundError, match="has rollout tables for steps 3"):
        completions.read_step(tmp_path, 4)
    with pytest.raises(ValueError, match="2 scored completions but 1 story ids"):
        completions.records(method="trl", step=1, story_ids=["7"], completions=["a", "b"], scored=s,
                            advantages=[0, 0], tokens=[1, 1], group_size=2)
