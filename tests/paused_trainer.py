"""Run reference_grpo_trainer.py held at a named phase, so a test can signal it there.

    python tests/paused_trainer.py <phase>[@<step>] [trainer flags ...]

Phases: load (before the model loads), step (at the start of step N), validation (at the start
of the validation of step N), save (inside the checkpoint save of step N, after the adapter is
written and before the optimizer and trainer state: where a kill leaves half a checkpoint),
final (before final/ is written). The first time the phase is reached this prints
"[pause] <phase>[@<step>] pid <pid>" and waits, up to 300 s, for a stop signal; the trainer then
goes on as it does after a signal in that phase. The pauses are patched in here, around the
trainer's own functions: the trainer itself has no test hooks. tests/test_faults.py drives it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference_grpo_trainer as rgt  # noqa: E402
from hntitles.engines import fast_backend  # noqa: E402
from hntitles.runs import (
    rundir,  # noqa: E402
    runtime,  # noqa: E402
)

WANTED = ""  # the phase to hold at, from the command line (set by main)
SIGNALLED = threading.Event()  # a stop signal reached the trainer's StopOnSignal
_done: list[str] = []


def pause(phase: str, step: int | None = None) -> None:
    """Hold here the first time `phase` (at `step`) is reached, until a stop signal arrives."""
    if _done or WANTED not in ({phase} if step is None else {phase, f"{phase}@{step}"}):
        return
    _done.append(WANTED)
    print(f"[pause] {WANTED} pid {os.getpid()}", flush=True)
    deadline = time.monotonic() + 300
    while not SIGNALLED.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)  # while loading, the signal raises StartInterrupted right here


def wrap(owner, name: str, before=None, after=None) -> None:
    """Replace owner.name with a call that runs `before(*args)` first and/or `after(*args)` last."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            after(*args, **kwargs)
        return result

    setattr(owner, name, wrapped)


def main() -> int:
    global WANTED
    from transformers import Trainer

    WANTED = sys.argv[1]

    wrap(runtime.StopOnSignal, "_handle", before=lambda *a: SIGNALLED.set())
    wrap(fast_backend, "load_policy", before=lambda *a, **k: pause("load"))
    wrap(rgt.TrainRows, "on_step_begin",
         after=lambda self, args_, state, control, **k: pause("step", state.global_step + 1))
    wrap(rgt.Validate, "validate", before=lambda self, model, step: pause("validation", step))
    wrap(Trainer, "save_model", after=lambda self, output_dir=None, _internal_call=False:
         _internal_call and pause("save", self.state.global_step))
    wrap(rundir, "save_final", before=lambda *a: pause("final"))
    return rgt.cli(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
