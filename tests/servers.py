"""Servers for tests and benches: the real reward server as a subprocess, and in-process JSON stubs.

    from servers import reward_server_process   # tests/ is on sys.path under pytest
    with reward_server_process() as url:       # free port, MiniLM scorer, offline
        httpx.get(url + "/health")

    class Record(JsonHandler):                 # an HTTP test double is one handler class
        def do_POST(self):
            self.server.owner.append(self.read_json())  # owner: whatever serve() was given
            self.reply(200, {"ok": True})

    seen = []
    with serve(Record, owner=seen) as (server, url):  # threaded, 127.0.0.1, a free port
        httpx.post(url + "/x", json={"a": 1})      # seen == [{"a": 1}]
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hntitles.runs.procs import free_port, wait_healthy  # noqa: E402  (one implementation, shared with the demo)


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


class JsonHandler(BaseHTTPRequestHandler):
    """Base for in-process HTTP test doubles: read a JSON body, answer JSON, log nothing.

    Subclasses write do_GET/do_POST; `self.server.owner` is the object given to `serve`
    (where a stub keeps its knobs and records requests).
    """

    def log_message(self, *args):  # keep test output clean
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # a client that timed out or was stopped hung up: expected in tests
            pass

    def read_json(self, default: Any = None) -> Any:
        """The request body parsed as JSON, or `default` when there is none (raises on bad JSON)."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else default

    def reply_raw(self, status: int, data: bytes, headers: dict | None = None) -> None:
        """Send `data` as an application/json body (tests also send bodies that are not JSON)."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def reply(self, status: int, payload: Any, headers: dict | None = None) -> None:
        self.reply_raw(status, json.dumps(payload).encode(), headers)


@contextlib.contextmanager
def serve(handler_cls: type[BaseHTTPRequestHandler], owner: Any = None) -> Iterator[tuple[ThreadingHTTPServer, str]]:
    """Serve `handler_cls` on 127.0.0.1 (a free port, a thread per connection) until the block ends.

    Yields the server (`server.owner` is `owner`) and its base URL "http://127.0.0.1:<port>".
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)  # daemon threads: a stuck handler cannot hang exit
    server.owner = owner
    # A short poll interval: shutdown() waits up to one interval, once per test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# A reward server that ranks titles, for end-to-end training runs of the tiny random model (which
# cannot write a title the real scorer supports): 0.5 x the title's words + 0.01 x its place in the
# request. Word counts alone tie often (two 8-token completions of a random model: about half of the
# groups of 2 in a measured run), and a step whose groups all tie is skipped untrained; the place term
# makes every two titles of one request differ (two places would have to be 50 apart, and these runs
# send a few titles a request), so a group ties only when both titles are empty (empty titles get 0
# without a request) and every step really trains.
RANKING_REWARD_SCRIPT = """
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def do_GET(self): self._send({"status": "ok"})
    def do_POST(self):
        time.sleep(float(sys.argv[2]))  # a step lasts long enough for the test to act mid-run
        stories = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["stories"]
        self._send({"scores": [0.5 * len(s["title"].split()) + 0.01 * i for i, s in enumerate(stories)]})
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@contextlib.contextmanager
def ranking_reward_process(delay: float = 0.3) -> Iterator[tuple[str, subprocess.Popen]]:
    """The ranking reward server as a process (`delay` s per request): yields (url, process); killed after."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", RANKING_REWARD_SCRIPT, str(port), str(delay)])
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 30, proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def start_trainer(cmd: Sequence[str], log: Path) -> subprocess.Popen:
    """A trainer (or any repo script) as a process, its output in `log`: offline, one torch thread."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish_trainer(proc: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[int, str]:
    """Wait for a process from start_trainer (killed after `timeout`); (exit code, its output)."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, log.read_text(errors="replace")
