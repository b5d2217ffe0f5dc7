"""What both trainers do the same way around training: exit codes, stop signals, argument logging.

- the exit codes (README "Faults"): EXIT_OK, EXIT_USAGE, EXIT_REWARD_SERVER, EXIT_NO_CHECKPOINT,
  EXIT_RUN_DIR_BUSY, EXIT_INTERRUPTED, EXIT_ABORTED;
- `StopOnSignal`: SIGTERM / SIGUSR1 / SIGINT ask the trainer to finish what it is doing, save and
  stop (exit 75); a second signal stops at once (KeyboardInterrupt, exit 130);
- `refuse_signals`: while a trainer loads, a stop signal raises `StartInterrupted` (nothing is being
  written yet, so it stops at once);
- `log_arguments`: every resolved argument object, once, at the start (as open-r1 logs its own);
- `fail`: one line on stderr naming what went wrong and the exit code.

    python -c "from hntitles.runs import runtime; print(runtime.EXIT_INTERRUPTED, runtime.STOP_SIGNALS)"
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
from collections.abc import Iterator

EXIT_OK = 0
EXIT_USAGE = 1  # bad settings or files, a hub id out of reach, a backend this machine cannot run
EXIT_REWARD_SERVER = 3  # the reward server failed (after bounded retries); nothing was scored as 0
EXIT_NO_CHECKPOINT = 65  # sysexits' EX_DATAERR: checkpoints exist and none can be resumed (none was moved)
EXIT_RUN_DIR_BUSY = 73  # sysexits' EX_CANTCREAT: another live process holds the run directory
EXIT_INTERRUPTED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after saving; rerun to resume
EXIT_ABORTED = 130  # a second signal while stopping: exited at once, no new checkpoint

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s)


class StopOnSignal:
    """`with StopOnSignal("[trl]", "saving a checkpoint at the end of this step") as stop:` ... `stop.received`.

    The first SIGTERM / SIGUSR1 / SIGINT is recorded in `received` (its name) and announced; the
    trainer checks it at its next safe point. A second one raises KeyboardInterrupt at once.
    Handlers are installed only from the main thread (the only one Python lets set them) and
    the previous ones come back on exit.
    """

    def __init__(self, prefix: str, plan: str):
        self.prefix, self.plan = prefix, plan
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:
            self.__exit__()
            raise KeyboardInterrupt(f"second signal ({name})")
        self.received = name
        print(f"\n{self.prefix} {name}: {self.plan}, then stopping (exit {EXIT_INTERRUPTED}; send it again to "
              "quit at once)", flush=True)


class StartInterrupted(Exception):
    """A stop signal while loading: nothing is being written yet, so the trainer stops at once."""


@contextlib.contextmanager
def refuse_signals() -> Iterator[None]:
    """SIGTERM / SIGUSR1 / SIGINT raise StartInterrupted until the block ends (a StopOnSignal
    inside it takes over for the training loop); the previous handlers come back after."""
    def refuse(signum, frame):
        raise StartInterrupted(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, refuse) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def log_arguments(prefix: str, **objs) -> None:
    """One line per argument object: `<prefix> <name>: {json}` (dataclasses as their fields).

    >>> log_arguments("[x]", knobs={"lr": 0.1})
    [x] knobs: {"lr": 0.1}
    """
    for name, obj in objs.items():
        values = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
        print(f"{prefix} {name}: {json.dumps(values, default=str)}", flush=True)


def fail(error: object, code: int) -> int:
    """One line on stderr naming what went wrong and the exit code; returns the code.

    >>> import contextlib, io, sys
    >>> with contextlib.redirect_stderr(io.StringIO()) as err:
    ...     fail("no reward server", EXIT_REWARD_SERVER)
    3
    >>> err.getvalue().strip()
    'error: no reward server (exit 3)'
    """
    import sys

    print(f"error: {error} (exit {code})", file=sys.stderr, flush=True)
    return code
