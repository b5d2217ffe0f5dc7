"""The run directory: one per run, one writer, everything a run writes and reads back to resume.

<runs_dir>/<run_name>/ holds config.json, metrics.jsonl (the one schema both trainers write,
utils.metrics_row), eval/, failures.jsonl, the trainer's checkpoints and final/. Here:

- `run_path`, `run_dir_for`, `save_config`, `record_in_config`: where a run writes, and its resolved settings;
  `shown`: a run's path as reports name it (relative to the repo, never the machine's absolute path);
- `RunLock` / `RunDirBusy`: one writer per run directory (flock + holder info);
- `MetricsWriter`, `read_metrics`, `trim_metrics`, `Timer`: the metrics file, read back and cut
  to a resume point; wall time that continues across resumes;
- `checkpoints`, `checkpoint_problem`, `resume_point`: the trainer's checkpoint-N folders, and
  the newest complete one (cut-off ones are moved aside, never resumed);
- `save_final`, `final_complete`: final/, the last checkpoint without its training state,
  swapped in whole;
- `record_failure`: failures.jsonl, one line per reward-server failure.

    python -c "from hntitles.runs import rundir; print(rundir.read_metrics('runs/trl-cpu')[1])"
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import utils
from hntitles.runs.settings import ROOT, Recipe

METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------
# Where a run writes, and its settings
# --------------------------------------------------------------------------------------


def run_path(recipe: Recipe, method: str) -> Path:
    """Where a run writes (not created): <runs_dir>/<method>-<recipe file stem> unless the recipe sets run_name."""
    name = recipe.run_name or f"{method}-{Path(recipe.recipe).stem if recipe.recipe else 'default'}"
    return Path(recipe.runs_dir) / name


def run_dir_for(recipe: Recipe, method: str) -> Path:
    """The one directory a run writes to (created): checkpoints, metrics.jsonl, config.json, logs."""
    path = run_path(recipe, method)
    path.mkdir(parents=True, exist_ok=True)
    return path


def shown(path: str | os.PathLike) -> str:
    """`path` as a report or a committed doc names it: relative to the repo when it lies inside it (`runs/...`),
    so that nothing written names the machine that wrote it; a path elsewhere is the user's own and stays.

    >>> shown(ROOT / "runs" / "trl-cpu-aligned"), shown("runs/base-cpu")
    ('runs/trl-cpu-aligned', 'runs/base-cpu')
    """
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def save_config(run_dir: Path, **objs: Any) -> None:
    """Save the resolved configuration next to the checkpoints (as nanoGPT does)."""
    _write_config(Path(run_dir), {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                  for k, v in objs.items()})


def read_config(run_dir: Path) -> dict:
    """The run's config.json ({} before save_config wrote it)."""
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def record_in_config(run_dir: Path, **entries) -> None:
    """Add entries to the run's config.json (written by save_config at the start)."""
    _write_config(Path(run_dir), {**read_config(run_dir), **entries})


def _write_config(run_dir: Path, payload: dict) -> None:
    path = run_dir / "config.json"
    tmp = path.with_name(f".config.json.{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)  # a signal mid-write leaves the previous config.json, never half of one


# --------------------------------------------------------------------------------------
# One writer per run directory
# --------------------------------------------------------------------------------------


LOCK_FILE = "run.lock"

class RunDirBusy(RuntimeError):
    """Another live process holds the run directory; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """Exclusive hold on a run directory: `with RunLock(run_dir, "trl"): ...`, or `.acquire()`
    (released at process exit).

    `<run_dir>/run.lock` is never deleted (deleting it would let two processes lock two
    different files); the holder keeps a `flock` on it and writes who it is (pid, host,
    start time, command) into it, and empties it on release. A second process finds the
    flock taken and stops with RunDirBusy naming the holder. The kernel drops the flock when
    the holder dies, however it dies (SIGKILL, OOM): the next process takes the directory
    over and logs whose lock it was.

    Shared filesystems: NFSv4 (and v3 with lockd) implement flock as a whole-file POSIX lock
    held by the client; if a client machine dies, its lock lasts until the server's lease
    runs out (~90 s). Where the filesystem has no locking (`nolock` mounts, some Lustre /
    FUSE setups, flock fails with ENOLCK/EOPNOTSUPP) the file's content decides: a holder
    on this host whose pid is gone is taken over, a live one or one on another host is
    busy (delete run.lock by hand once that job is really gone); two starts within the
    same instant can then both pass. Re-entrant within one process (in-process tests call
    main() again on the same run directory). In a multi-process launch (RANK set by
    torchrun / accelerate) only rank 0 locks; if it stops as busy, the launcher stops the rest.
    """

    _held: dict[str, RunLock] = {}  # resolved lock path -> the lock this process holds

    def __init__(self, run_dir: str | os.PathLike, owner: str = "run"):
        self.path = Path(run_dir).resolve() / LOCK_FILE
        self.owner = owner
        self.fd: int | None = None
        self.depth = 0
        self._registered = False

    def info(self) -> dict:
        import socket
        import sys

        return {"pid": os.getpid(), "host": socket.gethostname(), "owner": self.owner,
                "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                "argv": sys.argv[:12]}

    def acquire(self) -> RunLock:
        if int(os.environ.get("RANK") or 0) != 0:
            return self  # torchrun / accelerate workers: rank 0 holds the directory for its job
        held = RunLock._held.get(str(self.path))
        if held is not None:
            held.depth += 1
            return held
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = self._flock(fd)
            previous = self._read(fd)
            self._check_previous(previous, locked)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.info()) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.depth = fd, 1
        RunLock._held[str(self.path)] = self
        if not self._registered:
            import atexit

            atexit.register(self._release_all)
            self._registered = True
        return self

    def _flock(self, fd: int) -> bool:
        """True when the kernel lock is ours, False where the filesystem cannot lock; busy raises."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(self._busy_message(self._read(fd))) from None
        except OSError:  # ENOLCK / EOPNOTSUPP: no locking on this mount; the content decides
            return False
        return True

    def _check_previous(self, previous: dict | None, locked: bool) -> None:
        if not previous:
            return
        import socket

        same_host = previous.get("host") == socket.gethostname()
        pid = int(previous.get("pid") or 0)
        alive = _pid_alive(pid) if same_host else None
        if not locked and alive is not False:
            raise RunDirBusy(self._busy_message(previous))
        why = "no longer running" if alive is False else "no longer holding it"
        print(f"[lock] {self.path.parent}: taking over the lock left by pid {pid} on {previous.get('host')} "
              f"(started {previous.get('started')}), {why}", flush=True)

    @staticmethod
    def _read(fd: int) -> dict | None:
        raw = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
        try:
            value = json.loads(raw) if raw else None
        except json.JSONDecodeError:  # a holder killed while writing its own line
            return None
        return value if isinstance(value, dict) else None

    def _busy_message(self, holder: dict | None) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')} "
               f"({holder.get('owner')}, started {holder.get('started')})"
               if holder else "another process (no holder information yet)")
        return (f"run directory {self.path.parent} is in use by {who}; one run directory has one writer. "
                f"Wait for it to finish or stop it, or pick another --run_name (lock: {self.path})")

    def release(self) -> None:
        if self.fd is None:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        RunLock._held.pop(str(self.path), None)
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file: released cleanly, nobody to take over from
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def _release_all(self) -> None:
        self.depth = min(self.depth, 1)
        self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        lock = RunLock._held.get(str(self.path), self)
        lock.release()



# --------------------------------------------------------------------------------------
# The metrics file
# --------------------------------------------------------------------------------------


class MetricsWriter:
    """Appends rows to <run_dir>/metrics.jsonl, one flushed line each (readable while running)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        missing = [k for k in utils.METRICS_KEYS if k not in row]
        if missing:
            raise ValueError(f"metrics row lacks {missing}")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False, default=float) + "\n")
            f.flush()


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """Rows of a metrics.jsonl (file or run dir) and notes about lines that were skipped.

    A run that is still writing may end in a partial line; that is a note, not an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows, notes = [], []
    if not path.exists():
        return rows, [f"{path}: no metrics yet"]
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            notes.append(f"{path}: line {lineno} is incomplete or not JSON; skipped")
            continue
        if not isinstance(row, dict):  # e.g. a line cut down to a bare number
            notes.append(f"{path}: line {lineno} is not a JSON object; skipped")
            continue
        missing = [k for k in utils.METRICS_KEYS if k not in row]
        if missing:
            notes.append(f"{path}: line {lineno} lacks {missing}; skipped")
            continue
        rows.append(row)
    return rows, notes


class Timer:
    """Wall time that survives resumes: starts from the last logged wall_time."""

    def __init__(self, offset: float = 0.0):
        self.offset, self.start = offset, time.perf_counter()

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.start


def trim_metrics(run_dir: Path, keep_until: int, method: str) -> tuple[float, set[int], int]:
    """Keep metrics rows up to the resume step (later ones will be redone).

    Returns (wall-time offset, steps `method` already validated, rows dropped).
    """
    path = run_dir / METRICS_FILE
    if not path.exists():
        return 0.0, set(), 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a partial line from a killed run
            continue
        if int(row.get("step", 0)) <= keep_until:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
    rows = [json.loads(line) for line in kept]
    offset = max((float(r.get("wall_time", 0.0)) for r in rows), default=0.0)
    val_done = {int(r["step"]) for r in rows if r.get("split") == "val" and r.get("method") == method}
    return offset, val_done, dropped


def record_failure(run_dir: Path, step: int, error: Exception, stats: dict) -> int:
    """Append the failure to failures.jsonl; return how many this run directory has seen."""
    path = run_dir / "failures.jsonl"
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step,
                            "error": str(error)[:500], "client": stats}) + "\n")
    return sum(1 for line in path.read_text().splitlines() if line.strip())


# --------------------------------------------------------------------------------------
# Checkpoints and final/
# --------------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint or adapter folder cannot be used; the message names it, why, and what to do."""


class NoIntactCheckpoint(CheckpointError):
    """A run directory has checkpoints and none of them can be resumed."""


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what a PEFT adapter folder needs


def adapter_problem(path: Path) -> str | None:
    """Why the PEFT adapter in `path` cannot be loaded (its two files, whatever else the folder holds), or None."""
    if not path.is_dir():
        return "no such folder"
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    return f"no {', '.join(missing)}" if missing else next(
        (p for p in (file_problem(path / name) for name in ADAPTER_FILES) if p), None)


def file_problem(path: Path) -> str | None:
    """Why the checkpoint file `path` cannot be loaded, or None.

    The load check, by format: a .safetensors file must hold its whole header and every tensor
    the header names (a file cut short by a full disk or a dying node does not); a torch
    .pt/.pth/.bin file (a zip archive) must open and pass every member's CRC; a .json file must
    parse. Other files are not checked.

    >>> import tempfile
    >>> bad = Path(tempfile.mkdtemp()) / "adapter_model.safetensors"
    >>> _ = bad.write_bytes((16).to_bytes(8, "little") + b"{}")  # a header of 16 bytes, 2 written
    >>> file_problem(bad)
    'adapter_model.safetensors is cut off (its header needs 24 bytes, the file has 10)'
    """
    import zipfile

    name = path.name
    try:
        if name.endswith(".safetensors"):
            return _safetensors_problem(path)
        if name.endswith((".pt", ".pth", ".bin")):
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
            return f"{name} is damaged ({damaged} fails its CRC)" if damaged else None
        if name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
    except zipfile.BadZipFile:
        return f"{name} is cut off or not a torch file (no zip directory)"
    except (ValueError, UnicodeDecodeError):
        return f"{name} is cut off (not valid JSON)"
    except OSError as e:
        return f"{name} cannot be read ({e.strerror or e})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is cut off ({size} bytes, no header)"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"{path.name} is cut off (its header needs {8 + n} bytes, the file has {size})"
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is cut off (its tensors need {8 + n + end} bytes, the file has {size})"
    return None


def folder_problem(path: Path, required: tuple[str, ...] = ()) -> str | None:
    """Why the checkpoint folder `path` cannot be loaded, or None: a required file is missing, or
    a file fails its load check (file_problem)."""
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        return f"no {', '.join(missing)}"
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if problem := file_problem(file):
            return problem
    return None


def set_aside(path: Path, problem: str, kind: str = "incomplete") -> Path:
    """Move a checkpoint that cannot be resumed out of every resume's and rotation's sight
    (`<kind>-<name>-<time>` beside it), with one log line naming it and why."""
    aside = path.with_name(f"{kind}-{path.name}-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(aside)
    print(f"[resume] {path} cannot be resumed from ({problem}): moved to {aside.name}", flush=True)
    return aside


def newest_intact(found: list[tuple[int, Path]], problem_of, run_dir: Path) -> tuple[int, Path] | None:
    """The newest of `found` ((step, folder), newest first) that `problem_of(folder)` passes; the
    newer ones are set aside. None when there is nothing to resume; NoIntactCheckpoint when
    there are checkpoints and none passes (they are left where they are: never a silent restart
    from scratch)."""
    problems = {}
    for step, path in found:
        problems[path] = problem_of(path)
        if problems[path] is None:
            for newer, _ in ((p, s) for s, p in found if s > step):
                set_aside(newer, problems[newer])
            return step, path
    if found:
        listed = "; ".join(f"{p.name}: {problems[p]}" for _, p in found)
        raise NoIntactCheckpoint(
            f"{run_dir} has checkpoints but none can be resumed ({listed}). Move them aside (or delete the run "
            "directory) to start this run again from step 0, or pick another --run_name")
    return None


# What a checkpoint needs to resume from. transformers writes trainer_state.json last, after the
# adapter, optimizer, scheduler and RNG state: a process killed while saving leaves a folder without
# it (or with a cut-off one).
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` (checkpoint-N) cannot be resumed from, or None when it is complete and loads."""
    if problem := folder_problem(path, CHECKPOINT_FILES):
        return problem
    try:
        step = json.loads((path / "trainer_state.json").read_text())["global_step"]
    except (KeyError, TypeError):
        return "trainer_state.json has no global_step"
    if f"checkpoint-{step}" != path.name:
        return f"trainer_state.json says step {step}"
    return None


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """checkpoint-N folders, newest first."""
    found = [(int(p.name.split("-")[1]), p) for p in run_dir.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, reverse=True)


def resume_point(run_dir: Path, resume: bool) -> tuple[str | None, int]:
    """(newest complete checkpoint folder or None, its step). Refuses to silently overwrite a
    resumable run. Newer checkpoints that cannot be resumed (a kill during a save, a file cut
    short) are set aside, where neither a resume nor TRL's rotation sees them; NoIntactCheckpoint
    when none can be."""
    found = checkpoints(run_dir) if run_dir.exists() else []
    if found and not resume:
        raise SystemExit(f"{run_dir} already has {found[0][1].name}; resume (the default) or choose "
                         "another --run_name (refusing to mix two runs in one directory)")
    intact = newest_intact(found, checkpoint_problem, run_dir)
    return (str(intact[1]), intact[0]) if intact else (None, 0)


# The run's adapter for `make eval`: the last checkpoint's files without the training state.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "rng_state")


def final_complete(run_dir: Path) -> bool:
    """final/ is there and loads (a cut-off one is redone from the last checkpoint)."""
    return adapter_problem(run_dir / "final") is None


def save_final(run_dir: Path, checkpoint: Path) -> Path:
    """final/ = the last checkpoint minus its training state, swapped in whole: a signal or a
    kill during the copy leaves the previous final/ (or none), never half of one."""
    final, tmp, old = run_dir / "final", run_dir / "final.tmp", run_dir / "final.old"
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    tmp.mkdir()
    for src in checkpoint.iterdir():
        if src.is_file() and not src.name.startswith(TRAINING_STATE):
            shutil.copy2(src, tmp / src.name)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
