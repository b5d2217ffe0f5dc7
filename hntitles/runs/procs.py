"""Child processes started by the demo, the benches and the tests: the reward server and the trainers.

- `reward_server(log)`: start local_reward.py on a free loopback port, wait for GET /health, yield
  (url, health), and always stop it (also on failure, Ctrl-C or SIGTERM; on Linux also if the parent
  dies, via PR_SET_PDEATHSIG);
- `wait_healthy(url, timeout)`: poll a server's /health, failing fast if its process exits;
- `stream(cmd, log)`: run a trainer, copying its output to stdout and to a log; stopped with SIGTERM
  (it saves a checkpoint) and then SIGKILL after a grace period;
- `stop_process`, `free_port`, `child_env`, `set_threads`: the pieces they share.

Quick check (no server started):

    python -c "from hntitles.runs import procs; print(procs.free_port())"
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repo (this file is hntitles/<part>/<module>.py)
SERVER = ROOT / "local_reward.py"




def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the demo dies, even by SIGKILL (no orphaned server)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"  # stream the trainer's output as it happens
    return env


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> int | None:
    """SIGTERM, wait `grace` seconds, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerError(RuntimeError):
    """The reward server could not be started or reached."""


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> dict:
    """Poll GET /health until it answers 200; fail fast if the server process exits."""
    import httpx

    deadline, last = time.monotonic() + timeout, "no answer yet"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"reward server exited with code {proc.returncode} before it was healthy; "
                              f"last lines of {log}:\n{tail(log) if log else ''}")
        try:
            resp = httpx.get(f"{url}/health", timeout=5.0)
            if resp.status_code == 200:
                return resp.json()
            last = f"HTTP {resp.status_code}"
        except httpx.TransportError as e:
            last = type(e).__name__
        time.sleep(0.5)
    raise ServerError(f"reward server at {url} not healthy after {timeout:.0f}s ({last})"
                      + (f"; last lines of {log}:\n{tail(log)}" if log else ""))


@contextlib.contextmanager
def reward_server(log: Path, timeout: float = 300.0, extra_args: Sequence[str] = (),
                  script: Path = SERVER) -> Iterator[tuple[str, dict]]:
    """Start local_reward.py on a free loopback port; yield (url, health); always stop it."""
    if not script.exists():
        raise ServerError(f"{script} not found")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        # Own session: Ctrl-C reaches the demo only, which then stops the server itself.
        proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), *extra_args],
                                cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        health = wait_healthy(url, timeout, proc, log)
        yield url, health
    finally:
        stop_process(proc, grace=10.0)


def stream(cmd: Sequence[str], log: Path, grace: float = 120.0) -> int:
    """Run `cmd`, copying its output to our stdout and to `log`; Ctrl-C/SIGTERM stop it cleanly.

    The trainer saves a checkpoint on SIGTERM, so an interrupted demo resumes where it stopped.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        with log.open("ab") as out:
            # Raw chunks, not lines: tqdm redraws its bar with \r and would otherwise stall.
            while chunk := os.read(proc.stdout.fileno(), 65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                out.write(chunk)
        return proc.wait()
    finally:
        if proc.poll() is None:
            print(f"\nstopping {Path(cmd[1]).name} (SIGTERM: it saves a checkpoint)...", flush=True)
            stop_process(proc, grace=grace)
        proc.stdout.close()


def set_threads(threads: int) -> None:
    """Pin torch's thread count here and in the trainers (read at import: call before torch loads)."""
    if threads > 0:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
