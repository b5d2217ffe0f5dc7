"""Start the real reward server (local_reward.py) as a subprocess for tests and benches.

    from servers import reward_server_process   # tests/ is on sys.path under pytest
    with reward_server_process() as url:       # free port, MiniLM scorer, offline
        httpx.get(url + "/health")
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from demo import free_port, wait_healthy  # noqa: E402  (one implementation: the demo's)


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
            wait_healthy(url, timeout, proc, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
