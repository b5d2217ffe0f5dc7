"""Resumes you can trust, on real processes for both trainers: a run SIGKILLed mid-run and resumed with
the same command ends where the uninterrupted run ends (the same steps, rewards and final adapter, bit
for bit on the CPU); a checkpoint cut short is set aside and the run resumes from the one before; when
no checkpoint can be resumed the trainer stops with one line (exit 65) and moves nothing.

The tiny model on recipes/tiny.yaml (2 stories x 2 titles a step), validator none, and the ranking
reward server (tests/servers.py), so every step trains. One sequence of runs per trainer:
uninterrupted to step 4; killed after step 2 and resumed to 4 (compared); the newest checkpoint cut
in half and the run continued to step 5; every checkpoint cut, and the refusal.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from servers import finish_trainer, ranking_reward_process, start_trainer

from hntitles.runs import rundir, runtime

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The numbers a step produced (not its timings): equal here means the same titles got the same rewards.
SAME = ("step", "split", "n", "reward_mean", "reward_std", "reward_p5", "reward_median", "reward_p95", "rm_mean",
        "match_rate", "title_len_mean", "copy_frac_mean", "trailing_rate")


def command(trainer: str, tmp: Path, url: str, name: str, *extra: str) -> list[str]:
    common = ["--recipe", str(ROOT / "recipes" / "tiny.yaml"), "--runs_dir", str(tmp), "--run_name", name,
              "--reward_url", url, "--reward_retries", "1", "--validator", "none", "--eval_every", "0",
              "--eval_samples", "1", "--max_val_stories", "2"]
    if trainer == "trl":
        return [sys.executable, str(ROOT / "reference_grpo_trainer.py"), *common, "--save_every", "1",
                "--torch_threads", "1", *extra]
    # keep_best false: every checkpoint stays, so there is an older one to fall back to
    return [sys.executable, str(ROOT / "train.py"), *common, "--backend", "cpu", "--keep_best", "false", *extra]


def run(cmd: list[str], log: Path) -> tuple[int, str]:
    return finish_trainer(start_trainer(cmd, log), log)


def rows(run_dir: Path, split: str = "train") -> list[dict]:
    found, notes = rundir.read_metrics(run_dir)
    assert not notes, notes
    return [r for r in found if r["split"] == split]


def numbers(run_dir: Path) -> list[tuple]:
    return [tuple(r[k] for k in SAME) for r in rows(run_dir) + rows(run_dir, "val")]


def checkpoint_folders(trainer: str, run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (TRL's checkpoint-N, the CPU engine's checkpoints/NNNN)."""
    if trainer == "trl":
        return [p for _, p in sorted(rundir.checkpoints(run_dir))]
    folder = run_dir / "art" / "hn-titles" / "models" / run_dir.name / "checkpoints"
    return sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def final_adapter(trainer: str, run_dir: Path) -> dict:
    from safetensors.torch import load_file

    folder = run_dir / "final" if trainer == "trl" else checkpoint_folders(trainer, run_dir)[-1]
    return load_file(str(folder / "adapter_model.safetensors"))


def kill_after_step(cmd: list[str], run_dir: Path, step: int, log: Path) -> None:
    """Start `cmd`, SIGKILL it as soon as the metrics row of `step` is written."""
    proc = start_trainer(cmd, log)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (run_dir / rundir.METRICS_FILE).exists() and any(r["step"] >= step for r in rows(run_dir)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    code, text = finish_trainer(proc, log)
    assert code == -signal.SIGKILL, f"not killed mid-run (exit {code}):\n{text[-3000:]}"


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("trainer", ["trl", "art"])
def test_a_killed_run_resumes_to_the_uninterrupted_run_and_a_bad_checkpoint_is_caught(tmp_path, trainer):
    with ranking_reward_process(delay=0.05) as (url, _):
        # Uninterrupted, 4 steps.
        code, out = run(command(trainer, tmp_path, url, "whole", "--max_steps", "4"), tmp_path / "whole.log")
        assert code == 0, out[-3000:]
        whole = tmp_path / "whole"

        # SIGKILL right after step 2's row (mid-save or just after it), then the same command again.
        cut = tmp_path / "cut"
        kill_after_step(command(trainer, tmp_path, url, "cut", "--max_steps", "4"), cut, 2, tmp_path / "kill.log")
        code, out = run(command(trainer, tmp_path, url, "cut", "--max_steps", "4"), tmp_path / "resume.log")
        assert code == 0, out[-3000:]
        assert [r["step"] for r in rows(cut)] == [1, 2, 3, 4]  # each step logged once
        assert numbers(cut) == numbers(whole)  # the same rewards, step by step, and the same final validation
        a, b = final_adapter(trainer, whole), final_adapter(trainer, cut)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit

        # The newest checkpoint cut in half (a full disk, a dying node): set aside, named in one line, and the
        # run continues from the one before; the step after it is trained again, every step logged once.
        newest = checkpoint_folders(trainer, cut)[-1]
        cut_in_half(newest / "adapter_model.safetensors")
        code, out = run(command(trainer, tmp_path, url, "cut", "--max_steps", "5"), tmp_path / "truncated.log")
        assert code == 0, out[-3000:]
        assert f"[resume] {newest} cannot be resumed from (adapter_model.safetensors is cut off" in out, out[-3000:]
        assert [p.name for p in newest.parent.iterdir() if p.name.startswith(f"incomplete-{newest.name}-")]
        assert [r["step"] for r in rows(cut)] == [1, 2, 3, 4, 5]

        # Every checkpoint cut: one line naming the run directory and what to do, exit 65, nothing moved.
        for folder in checkpoint_folders(trainer, cut):
            cut_in_half(folder / "adapter_model.safetensors")
        before = sorted(p.name for p in checkpoint_folders(trainer, cut))
        code, out = run(command(trainer, tmp_path, url, "cut", "--max_steps", "6"), tmp_path / "refused.log")
    assert code == runtime.EXIT_NO_CHECKPOINT, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(cut) in errors[0] and "none can be resumed" in errors[0], out[-3000:]
    assert "Move them aside" in errors[0] and f"(exit {runtime.EXIT_NO_CHECKPOINT})" in errors[0]
    assert sorted(p.name for p in checkpoint_folders(trainer, cut)) == before
    assert [r["step"] for r in rows(cut)] == [1, 2, 3, 4, 5]


def test_a_final_adapter_cut_short_is_caught_before_it_is_loaded(tmp_path):
    """What the demo and `make eval` load: a final/ that does not load is named, not half-read."""
    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (final / "adapter_model.safetensors").write_bytes((64).to_bytes(8, "little") + b"{}")
    assert "adapter_model.safetensors is cut off" in rundir.adapter_problem(final)
    assert not rundir.final_complete(tmp_path)  # the trainer redoes final/ from its last checkpoint
    from hntitles.engines import policy

    with pytest.raises(rundir.CheckpointError, match="cannot be loaded .*adapter_model.safetensors is cut off"):
        policy.load_model(str(ROOT / "models" / "tiny"), adapter=str(final))
