"""Faults on real processes: reruns of finished runs, a double start, a stale lock, and
SIGTERM / SIGUSR1 / SIGKILL at each phase of a TRL run (loading, a step, a validation, a
checkpoint save, the final save), on models/tiny with the real reward server.

Each trainer is a `python reference_grpo_trainer.py` process. To signal it inside a phase the
test starts it through tests/paused_trainer.py, which holds it at that phase (patched around
the trainer's own functions: the trainer has no test hooks), waits for its "[pause] ..." line,
then signals it: the signal lands inside that phase every time.
recipes/tiny.yaml has 8 train stories and 2 per step: an epoch is 4 steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hntitles.runs import rundir, runtime

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXIT_INTERRUPTED = runtime.EXIT_INTERRUPTED


class Trainer:
    """One reference_grpo_trainer.py process on <tmp>/run, its output in a log file."""

    def __init__(self, tmp: Path, url: str, *flags: str, pause: str = "", name: str = "trainer"):
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        script = ([str(ROOT / "tests" / "paused_trainer.py"), pause] if pause
                  else [str(ROOT / "reference_grpo_trainer.py")])
        argv = [sys.executable, *script, "--recipe", str(ROOT / "recipes" / "tiny.yaml"),
                "--runs_dir", str(tmp), "--run_name", "run", "--reward_url", url, "--validator", "none",
                "--eval_every", "0", "--torch_threads", "1", *flags]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, line: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.text():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {line!r}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {line!r} within {timeout}s:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout}s:\n{self.text()[-3000:]}") from None


def run(tmp: Path, url: str, *flags: str, pause: str = "", sig: int | None = None, name: str = "trainer"
        ) -> tuple[int, str]:
    """Run one trainer to its end; with `pause`, send `sig` once it holds at that phase."""
    t = Trainer(tmp, url, *flags, pause=pause, name=name)
    if pause:
        t.wait_for(f"[pause] {pause}")
        t.signal(sig)
    return t.wait(), t.text()


def steps(run_dir: Path, split: str = "train") -> list[int]:
    rows, notes = rundir.read_metrics(run_dir)
    assert not notes, notes
    return [r["step"] for r in rows if r["split"] == split]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if "checkpoint-" in p.name)


def state_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def test_rerun_of_a_finished_run_trains_nothing(reward_server, tmp_path):
    run_dir = tmp_path / "run"
    # Case: max_steps ends mid-epoch (2 of 4 steps). TRL's loop took one more step on every
    # rerun here: 2 -> 3 -> 4, each with a metrics row and a checkpoint.
    code, out = run(tmp_path, reward_server, "--max_steps", "2")
    assert code == 0 and steps(run_dir) == [1, 2] and steps(run_dir, "val") == [2], out[-2000:]
    code, out = run(tmp_path, reward_server, "--max_steps", "2")
    assert code == 0 and "nothing to do" in out and "finished at step 2 (max_steps=2)" in out, out[-2000:]
    assert steps(run_dir) == [1, 2] and checkpoint_names(run_dir) == ["checkpoint-2"]
    # Raising max_steps continues from the last step, to an epoch boundary (step 4 = epoch 1.0).
    code, out = run(tmp_path, reward_server, "--max_steps", "4")
    assert code == 0 and "resuming from" in out, out[-2000:]
    assert steps(run_dir) == [1, 2, 3, 4] and steps(run_dir, "val") == [2, 4]
    rows = rundir.read_metrics(run_dir)[0]
    assert [r["extra"]["epoch"] for r in rows if r["split"] == "train"] == [0.25, 0.5, 0.75, 1.0]
    assert checkpoint_names(run_dir) == ["checkpoint-2", "checkpoint-4"]
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    # The case max_steps on an epoch boundary (the rerun trains nothing either) is the last run of
    # test_one_writer_and_a_signal_at_every_phase (max_steps 4 = one epoch): one trainer process less.


# A checkpoint every step (a resume keeps the first run's save interval: transformers restores it
# from trainer_state.json), a validation every 2.
PHASE_FLAGS = ("--max_steps", "4", "--save_every", "1", "--eval_every", "2")


def test_one_writer_and_a_signal_at_every_phase(reward_server, tmp_path):
    """One run directory taken through every phase in turn: each part starts where the last one stopped."""
    run_dir = tmp_path / "run"
    second_start_refused_then_sigterm_while_loading(tmp_path, reward_server)
    signals_in_a_step_a_validation_and_a_save(tmp_path, reward_server)
    killed_pid = sigkill_during_a_save(tmp_path, reward_server)
    takeover_then_sigterm_in_the_last_step(tmp_path, reward_server, killed_pid)
    sigterm_during_the_final_save(tmp_path, reward_server)

    # And now there is nothing left to do (max_steps 4 ends on an epoch boundary): nothing is written.
    checkpoints, final = checkpoint_names(run_dir), (run_dir / "final" / "adapter_model.safetensors").read_bytes()
    code, out = run(tmp_path, reward_server, *PHASE_FLAGS)
    assert code == 0 and "nothing to do" in out, out[-2000:]
    assert steps(run_dir) == [1, 2, 3, 4]
    assert (checkpoint_names(run_dir) == checkpoints
            and (run_dir / "final" / "adapter_model.safetensors").read_bytes() == final)


def second_start_refused_then_sigterm_while_loading(tmp_path: Path, url: str) -> None:
    """Loading: a second start on the same run directory stops at once and names the holder."""
    run_dir = tmp_path / "run"
    first = Trainer(tmp_path, url, *PHASE_FLAGS, pause="load", name="first")
    first.wait_for("[pause] load")
    code, out = run(tmp_path, url, *PHASE_FLAGS, name="second")
    assert code == runtime.EXIT_RUN_DIR_BUSY, out[-2000:]
    assert f"is in use by pid {first.proc.pid} on {socket.gethostname()} (trl, started 20" in out
    assert first.proc.poll() is None  # refused while the holder still runs
    # ... and SIGTERM while the holder loads its model: a clean stop, nothing half-written.
    first.signal(signal.SIGTERM)
    assert first.wait() == EXIT_INTERRUPTED
    assert "SIGTERM outside the training loop (while loading)" in first.text()
    assert checkpoint_names(run_dir) == [] and (run_dir / rundir.LOCK_FILE).read_text() == ""  # released


def signals_in_a_step_a_validation_and_a_save(tmp_path: Path, url: str) -> None:
    run_dir = tmp_path / "run"
    # A step: SIGUSR1 (Slurm's warning) -> that step's checkpoint, exit 75.
    code, out = run(tmp_path, url, *PHASE_FLAGS, pause="step@1", sig=signal.SIGUSR1)
    assert code == EXIT_INTERRUPTED and "SIGUSR1: saving a checkpoint" in out, out[-2000:]
    assert checkpoint_names(run_dir) == ["checkpoint-1"] and state_step(run_dir / "checkpoint-1") == 1
    assert steps(run_dir) == [1]

    # A validation (step 2): it finishes, then the checkpoint of step 2 and no step 3.
    code, out = run(tmp_path, url, *PHASE_FLAGS, pause="validation@2", sig=signal.SIGTERM)
    assert code == EXIT_INTERRUPTED, out[-2000:]
    assert steps(run_dir) == [1, 2] and steps(run_dir, "val") == [2]
    assert checkpoint_names(run_dir) == ["checkpoint-1", "checkpoint-2"]

    # A checkpoint save: it finishes, and the run stops right after it.
    code, out = run(tmp_path, url, *PHASE_FLAGS, pause="save@3", sig=signal.SIGTERM)
    assert code == EXIT_INTERRUPTED, out[-2000:]
    assert state_step(run_dir / "checkpoint-3") == 3 and steps(run_dir) == [1, 2, 3]  # no step 4


def sigkill_during_a_save(tmp_path: Path, url: str) -> int:
    """A checkpoint save killed outright (SIGKILL: a second signal or Slurm's KILL after the grace
    time): checkpoint-4 has its adapter but no optimizer or trainer state. Returns the dead pid."""
    killed = Trainer(tmp_path, url, *PHASE_FLAGS, pause="save@4", name="killed")
    killed.wait_for("[pause] save@4")
    killed.signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    half = tmp_path / "run" / "checkpoint-4"
    assert (half / "adapter_model.safetensors").exists() and not (half / "trainer_state.json").exists()
    return killed.proc.pid


def takeover_then_sigterm_in_the_last_step(tmp_path: Path, url: str, killed_pid: int) -> None:
    """The rerun takes the dead process's lock over, sets the half checkpoint aside, resumes from
    step 3; a SIGTERM in the last step stops it before the final validation (exit 75)."""
    run_dir = tmp_path / "run"
    code, out = run(tmp_path, url, *PHASE_FLAGS, pause="step@4", sig=signal.SIGTERM)
    assert code == EXIT_INTERRUPTED, out[-2000:]
    assert f"taking over the lock left by pid {killed_pid}" in out
    assert "checkpoint-4 cannot be resumed from (no optimizer.pt" in out and "checkpoint-3 (step 3)" in out
    names = checkpoint_names(run_dir)
    assert names[:4] == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert names[4].startswith("incomplete-checkpoint-4-") and len(names) == 5
    assert state_step(run_dir / "checkpoint-4") == 4
    assert steps(run_dir) == [1, 2, 3, 4] and steps(run_dir, "val") == [2] and not (run_dir / "final").exists()


def sigterm_during_the_final_save(tmp_path: Path, url: str) -> None:
    """The final save: training is done, so the rerun trains nothing, validates step 4, and a
    SIGTERM during the final save lets it finish whole (the run is complete: exit 0)."""
    run_dir = tmp_path / "run"
    code, out = run(tmp_path, url, *PHASE_FLAGS, pause="final", sig=signal.SIGTERM)
    assert code == 0 and "finishing the run, no training" in out, out[-2000:]
    assert "arrived after the last step: the run is complete" in out
    assert steps(run_dir) == [1, 2, 3, 4] and steps(run_dir, "val") == [2, 4]
    final = run_dir / "final"
    assert ((final / "adapter_model.safetensors").read_bytes()
            == (run_dir / "checkpoint-4" / "adapter_model.safetensors").read_bytes())
    assert not (final / "optimizer.pt").exists() and not (run_dir / "final.tmp").exists()
