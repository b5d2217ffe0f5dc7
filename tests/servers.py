"""Start the real reward server (local_reward.py) as a subprocess for tests and benches.

    from servers import reward_server_process   # tests/ is on sys.path under pytest
    with reward_server_process() as url:       # free port, MiniLM scorer, offline
        httpx.get(url + "/health")
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0,
                 log_path: Path | None = None, headers: dict | None = None) -> dict:
    """Poll GET /health until it answers 200; fail early (with the server's log) if it exits."""
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"reward server exited with code {proc.returncode} before becoming healthy:\n"
                               f"{_tail(log_path)}")
        try:
            resp = httpx.get(url + "/health", timeout=2.0, headers=headers)
            if resp.status_code == 200:
                return resp.json()
            last = f"HTTP {resp.status_code}"
        except httpx.TransportError as e:
            last = type(e).__name__
        time.sleep(0.2)
    raise TimeoutError(f"reward server at {url} not healthy after {timeout:.0f}s ({last}):\n{_tail(log_path)}")


def _tail(path: Path | None, chars: int = 4000) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return path.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def reward_server_process(port: int | None = None, args: Sequence[str] = (), env: dict | None = None,
                          timeout: float = 120.0) -> Iterator[str]:
    """Run `python local_reward.py --port <port> *args` until the block ends; yield its base URL.

    The server's stdout/stderr go to a temporary file (a pipe nobody reads would fill up and
    block the server); its tail is in the error if the server dies or never becomes healthy.
    """
    port = port or free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    host = "127.0.0.1"
    argv = list(args)
    if "--host" in argv:
        host = argv[argv.index("--host") + 1]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    with tempfile.TemporaryDirectory(prefix="reward-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, str(ROOT / "local_reward.py"), "--port", str(port), *argv],
                                    cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, timeout, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
