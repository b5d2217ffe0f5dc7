"""An in-process OpenAI-compatible chat server for tests (stands in for ART's vLLM).

It speaks the subset of the API that train.py uses, in the real shapes, so the real
`openai` clients (sync and async) talk to it over HTTP on 127.0.0.1:

- `GET /v1/models`: the base model (no `parent`) and every served LoRA name (`parent` =
  the base), as vLLM lists them;
- `POST /v1/chat/completions`: `n` choices, each with `logprobs.content` per token when
  `logprobs` is true; `max_tokens` truncates (finish_reason "length"); unknown models get
  vLLM's 404.

What it writes comes from a script: `script(request) -> list[str]` (one text per choice;
fewer than `n` is allowed). The default script is deterministic and reads tags in the
article body, so a test can plan which groups have equal rewards:

- `[same]` in the body: every completion is the same title;
- `[one]`: a single choice whatever `n` is;
- otherwise choice i is a title of i + 2 words (distinct lengths, distinct rewards);
- validator prompts get "True", or "False" when the title contains the word "wrong".

    with FakeOpenAI(base_model="models/tiny") as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="x")
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable

from servers import JsonHandler, serve

import utils

WORDS = ["Rust", "compiler", "ships", "faster", "builds", "for", "large", "crates", "today", "again"]


def default_script(request: dict) -> list[str]:
    """Deterministic completions (see the module docstring)."""
    messages = request.get("messages", [])
    system = messages[0].get("content", "") if messages else ""
    user = messages[-1].get("content", "") if messages else ""
    n = int(request.get("n") or 1)
    if system == utils.VALIDATOR_SYSTEM_PROMPT:
        title = re.search(r"<title>(.*?)</title>", user, re.S)
        return ["False" if title and "wrong" in title.group(1).lower() else "True"] * n
    if "[same]" in user:
        return ["One title for all"] * n
    if "[one]" in user:
        return ["Only one title here"]
    return [" ".join(WORDS[:i + 2]) for i in range(n)]


def apply_stop(text: str, stop) -> str:
    """The text up to the first stop string, which is dropped (as OpenAI and vLLM do)."""
    for s in [stop] if isinstance(stop, str) else stop or []:
        text = text.split(s, 1)[0]
    return text


def _tokens(text: str) -> list[str]:
    """Whitespace-attached pieces, like BPE tokens (their concatenation is the text)."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


class FakeOpenAI:
    """Threaded HTTP server; `requests` records every request body (for assertions)."""

    def __init__(self, base_model: str = "base", script: Callable[[dict], list[str]] | None = None,
                 api_key: str | None = None):
        self.base_model = base_model
        self.script = script or default_script
        self.api_key = api_key
        self.adapters: set[str] = set()  # served LoRA names (the test backend adds name@step)
        self.requests: list[dict] = []
        self.fail_if: Callable[[dict], bool] = lambda request: False  # requests answered with HTTP 500
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()
        self.base_url = ""  # "http://127.0.0.1:<port>/v1" once started

    def start(self) -> FakeOpenAI:
        _, url = self._stack.enter_context(serve(_Handler, owner=self))
        self.base_url = url + "/v1"
        return self

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def chat_requests(self, model: str | None = None) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if model is None or r.get("model") == model]

    def completion(self, request: dict) -> tuple[int, dict]:
        model = request.get("model")
        if model != self.base_model and model not in self.adapters:
            return 404, {"object": "error", "type": "NotFoundError", "code": 404,
                         "message": f"The model `{model}` does not exist."}
        with self._lock:
            self.requests.append(request)
            if self.fail_if(request):
                return 500, {"object": "error", "type": "InternalServerError", "code": 500,
                             "message": "scripted failure"}
        max_tokens = request.get("max_tokens") or request.get("max_completion_tokens") or 1 << 30
        choices, completion_tokens = [], 0
        for i, text in enumerate(self.script(request)):
            text = apply_stop(text, request.get("stop"))
            pieces = _tokens(text)
            finish = "length" if len(pieces) > max_tokens else "stop"
            pieces = pieces[:max_tokens]
            completion_tokens += len(pieces)
            choice = {"index": i, "finish_reason": finish,
                      "message": {"role": "assistant", "content": "".join(pieces)}, "logprobs": None}
            if request.get("logprobs"):
                choice["logprobs"] = {"content": [
                    {"token": p, "logprob": -0.1 * (j + 1), "bytes": list(p.encode()), "top_logprobs": []}
                    for j, p in enumerate(pieces)]}
            choices.append(choice)
        prompt_tokens = sum(len(_tokens(str(m.get("content", "")))) for m in request.get("messages", []))
        return 200, {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                     "model": model, "choices": choices,
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}}

    def models(self) -> dict:
        data = [{"id": self.base_model, "object": "model", "created": 0, "owned_by": "fake", "root": self.base_model,
                 "parent": None}]
        data += [{"id": name, "object": "model", "created": 0, "owned_by": "fake", "root": name,
                  "parent": self.base_model} for name in sorted(self.adapters)]
        return {"object": "list", "data": data}


class _Handler(JsonHandler):
    def _authorized(self) -> bool:
        fake: FakeOpenAI = self.server.owner
        if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
            self.reply(401, {"error": {"message": "bad api key"}})
            return False
        return True

    def do_GET(self):
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            self.reply(200, self.server.owner.models())
        else:
            self.reply(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        if not self._authorized():
            return
        try:
            request = self.read_json({})
        except json.JSONDecodeError:
            self.reply(400, {"error": {"message": "body is not JSON"}})
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.reply(404, {"error": {"message": f"no route {self.path}"}})
            return
        self.reply(*self.server.owner.completion(request))
