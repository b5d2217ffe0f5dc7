"""In-process HTTP test doubles on 127.0.0.1 (stdlib http.server, one thread each) for
hntitles/engines/openai_generator.py, evaluate.py --generator openai and titles.py.

- FakeChat: POST /v1/chat/completions with `n` choices (an OpenAI-compatible endpoint);
  knobs to cap the choices, fail with 503 first, demand a key, or refuse `max_tokens` (as
  OpenAI does for newer models). Records every request.
- FakeReward: POST /score_batch {"stories": [...]} -> {"scores": [...]}, POST /score and
  GET /health (the reward server's protocol) with a deterministic score.
"""

from __future__ import annotations

import contextlib
import threading

from fake_openai import apply_stop
from servers import JsonHandler, serve


class _Server:
    """Context manager running `handler` (which reads its knobs from `self.server.owner`)."""

    handler: type[JsonHandler]

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self.httpd, self.url = self._stack.enter_context(serve(self.handler, owner=self))
        return self

    def __exit__(self, *exc):
        self._stack.close()


class _ChatHandler(JsonHandler):
    def do_POST(self):
        owner: FakeChat = self.server.owner
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        if owner.api_key and self.headers.get("Authorization") != f"Bearer {owner.api_key}":
            return self.reply(401, {"error": {"message": "Incorrect API key provided",
                                              "type": "invalid_request_error"}})
        req = self.read_json({})
        with owner.lock:
            owner.requests.append(req)
            if owner.fail_first > 0:
                owner.fail_first -= 1
                # retry-after-ms keeps the client's backoff short in tests
                return self.reply(503, {"error": {"message": "overloaded"}}, {"retry-after-ms": "10"})
        if owner.new_token_param and "max_tokens" in req:  # as OpenAI answers for its newer models
            return self.reply(400, {"error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this "
                           "model. Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error", "param": "max_tokens"}})
        if req.get("model") != owner.model:
            return self.reply(404, {"error": {"message": f"The model `{req.get('model')}` does not exist."}})
        n = int(req.get("n") or 1)
        returned = min(n, owner.max_choices)
        user = next(m["content"] for m in req["messages"] if m["role"] == "user")
        topic = " ".join(user.split()[:3])
        greedy = float(req.get("temperature", 1.0)) == 0.0
        with owner.lock:
            first, owner.counter = owner.counter, owner.counter + returned
        choices = [{"index": i, "finish_reason": "stop",
                    "message": {"role": "assistant",
                                "content": apply_stop(f"Greedy {topic}" if greedy
                                                      else f"Sample {first + i} {topic}\nextra line",
                                                      req.get("stop"))}}
                   for i in range(returned)]
        self.reply(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": owner.model,
                          "choices": choices,
                          "usage": {"prompt_tokens": 10, "completion_tokens": 5 * returned,
                                    "total_tokens": 10 + 5 * returned}})


class FakeChat(_Server):
    """An OpenAI-compatible chat endpoint; `base_url` is what a client is given."""

    handler = _ChatHandler

    def __init__(self, model: str = "fake-model", api_key: str = "", max_choices: int = 1000, fail_first: int = 0,
                 new_token_param: bool = False):
        self.model, self.api_key, self.max_choices, self.fail_first = model, api_key, max_choices, fail_first
        self.new_token_param = new_token_param  # reject max_tokens, want max_completion_tokens
        self.requests: list[dict] = []
        self.counter = 0
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


def fake_score(title: str) -> float:
    """Deterministic stand-in for the reward model: longer titles score higher."""
    return round(0.1 * len(title.split()) + 0.01 * len(title), 4)


class _RewardHandler(JsonHandler):
    def do_GET(self):
        if self.path == "/health":
            return self.reply(200, {"status": "ok", "model": "fake"})
        self.reply(404, {"error": "not found"})

    def do_POST(self):
        owner: FakeReward = self.server.owner
        req = self.read_json({})
        if self.path == "/score_batch":
            stories = req.get("stories")
            if not isinstance(stories, list):
                return self.reply(400, {"error": "field 'stories' must be a list"})
            owner.scored.extend(stories)
            return self.reply(200, {"scores": [fake_score(s["title"]) for s in stories]})
        if self.path == "/score":
            owner.scored.append(req)
            return self.reply(200, {"score": fake_score(req["title"])})
        self.reply(404, {"error": "not found"})


class FakeReward(_Server):
    handler = _RewardHandler

    def __init__(self):
        self.scored: list[dict] = []
