"""The CPU engine's OpenAI-compatible server: what ART's loop talks to instead of vLLM.

ART's rollouts go through `model.openai_client()`; on a GPU that is vLLM. On the CPU engine
(hntitles/art/cpu_backend.py) it is this server, on 127.0.0.1 and a port the OS picks, serving the policy
as `<name>@<step>` (the LoRA on) and the base model (the LoRA off):

- `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` with `n`, `temperature`,
  `max_tokens` / `max_completion_tokens`, `stop`, `logprobs` (tokens as `token_id:N`, vLLM's
  `return_tokens_as_token_ids`, which ART reads back) and `seed`; the logprobs are the raw
  model's (temperature 1, as vLLM's), or at the request's temperature when the engine scores
  there (`EngineOptions.score_temperature`, `logprob_temperature`);
- a request it cannot serve gets a 4xx naming the field (`parse_chat_request`), in the OpenAI
  API's error shape; bodies over MAX_BODY_BYTES get a 413;
- one worker thread generates (generation.sample_completions), batching waiting requests that
  share their settings, one prefill per prompt.

    python -m hntitles.art.cpu_backend --recipe recipes/tiny.yaml    # serve the tiny policy, print one completion
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from werkzeug.serving import WSGIRequestHandler, make_server

from hntitles.engines.generation import Completion, sample_completions

MAX_BODY_BYTES = 1 << 20  # a chat request for a title is a few kB; anything bigger is refused
MAX_N = 64
MAX_NEW_TOKENS = 4096
DEFAULT_MAX_TOKENS = 256
MAX_BATCH_ROWS = 64  # completions generated together by one worker pass
GATHER_SECONDS = 0.01  # how long the worker waits for more requests before it starts a batch alone


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------


class RequestError(ValueError):
    """A request the server cannot serve: HTTP status + the field at fault."""

    def __init__(self, status: int, param: str, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.param = status, param
        self.close = close  # the request's body was not read: the connection cannot be reused


def parse_chat_request(body: dict) -> dict:
    """Check a /v1/chat/completions body; return the normalised parameters or raise RequestError.

    Fields are checked in the order below, so a body with several bad fields names the first.

    >>> msgs = [{"role": "user", "content": "A story"}]
    >>> p = parse_chat_request({"model": "m@0", "messages": msgs, "stop": "\\n", "max_tokens": None})
    >>> p["n"], p["temperature"], p["max_tokens"], p["stop"], p["logprobs"], p["seed"]
    (1, 1.0, 256, ('\\n',), False, None)
    >>> try:
    ...     parse_chat_request({"model": "m@0", "messages": msgs, "max_completion_tokens": 0})
    ... except RequestError as e:
    ...     print(e.status, e.param, e)
    400 max_completion_tokens 'max_completion_tokens' must be an integer from 1 to 4096, got 0
    """
    if not isinstance(body, dict):
        raise RequestError(400, "body", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "model", "'model' must be a non-empty string")
    messages = _checked_messages(body.get("messages"))
    n = _checked_count("n", body.get("n", 1), MAX_N)
    temperature = _checked_temperature(body.get("temperature", 1.0))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _checked_count(key, DEFAULT_MAX_TOKENS if body.get(key) is None else body[key], MAX_NEW_TOKENS)
    stop = _checked_stop(body.get("stop") or [])
    logprobs = _checked_logprobs(body)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "seed", f"'seed' must be an integer, got {seed!r}")
    return {"model": model, "messages": messages, "n": n, "temperature": temperature,
            "max_tokens": max_tokens, "stop": stop, "logprobs": logprobs, "seed": seed}


def _checked_messages(messages) -> list[dict]:
    if (not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise RequestError(400, "messages",
                           "'messages' must be a non-empty list of {role, content} with string content")
    return messages


def _checked_count(key: str, value, most: int) -> int:
    """An integer from 1 to `most` (a bool is not one, though Python says it is an int)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise RequestError(400, key, f"'{key}' must be an integer from 1 to {most}, got {value!r}")
    return value


def _checked_temperature(temperature) -> float:
    temperature = 1.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError(400, "temperature", f"'temperature' must be a number from 0 to 2, got {temperature!r}")
    return float(temperature)


def _checked_stop(stop) -> tuple[str, ...]:
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop", "'stop' must be a non-empty string or a list of at most 4 of them")
    return tuple(stop)


def _checked_logprobs(body: dict) -> bool:
    """`logprobs` (a bool); `top_logprobs` is refused: the server returns none."""
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError(400, "logprobs", "'logprobs' must be true or false")
    if body.get("top_logprobs"):
        raise RequestError(400, "top_logprobs",
                           "'top_logprobs' is not supported by this server (use 0 or leave it out)")
    return logprobs


def logprob_temperature(options, temperature: float) -> float:
    """What the returned logprobs divide the logits by: 1 (the raw model's, vLLM's default), or the
    request's sampling temperature when the engine scores there (`options.score_temperature` set).

    >>> from types import SimpleNamespace as NS
    >>> logprob_temperature(None, 0.7), logprob_temperature(NS(score_temperature=0.7), 0.7)
    (1.0, 0.7)
    >>> logprob_temperature(NS(score_temperature=0.7), 0.0)  # greedy: the raw logits
    1.0
    """
    return float(temperature) if getattr(options, "score_temperature", None) and temperature > 0 else 1.0


# --------------------------------------------------------------------------------------
# Generation: one worker, requests with the same settings batched
# --------------------------------------------------------------------------------------


@dataclass
class _Job:
    params: dict
    prompt: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Completion] | None = None
    error: RequestError | None = None

    def key(self) -> tuple:
        """Requests with equal keys share a batch. A greedy request's seed draws nothing, so it is not
        part of the key: a validation's greedy titles (one request per story, each with its own seed)
        run as one batch instead of one generation per story."""
        p = self.params
        seed = None if p["temperature"] == 0 else p["seed"]
        return (p["model"], p["temperature"], p["max_tokens"], p["stop"], p["logprobs"], seed)


class QuietHandler(WSGIRequestHandler):
    """werkzeug's request handler without its line per request (it would drown the training log)."""

    def log_request(self, *args, **kwargs):
        pass


class InferenceServer:
    """/v1/chat/completions, /v1/models and /health on 127.0.0.1 for one CPU model service.

    `service` has `model` (a PEFT model), `tokenizer`, `lock` (held while generating),
    `base_model`, `model_name` and `step` (the policy is served as `<model_name>@<step>`), and
    may have `options` (art_cpu_backend.EngineOptions: where the logprobs are scored).
    Flask's handler threads check and tokenize requests; one worker thread generates, taking
    every waiting request with the same settings into one batch (one prefill per prompt).
    Stopped by `stop()` (LocalBackend.close -> service.close): no thread outlives the backend.
    """

    def __init__(self, service):
        self.service = service
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        # port 0: the OS picks a free one
        self.httpd = make_server("127.0.0.1", 0, create_app(self), threaded=True, request_handler=QuietHandler)
        self.port = self.httpd.server_port
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.batches = 0  # generations run (a batch of requests is one)

    def start(self) -> InferenceServer:
        for target, name in ((self.httpd.serve_forever, "art-cpu-http"), (self._work, "art-cpu-generate")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        print(f"[art-cpu] OpenAI-compatible server on http://127.0.0.1:{self.port}/v1")
        return self

    def stop(self) -> None:
        self._stopping = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()

    def served(self) -> dict[str, bool]:
        """Served model names -> adapter on (the policy) or off (the base model)."""
        return {self.service.base_model: False, f"{self.service.model_name}@{self.service.step}": True}

    def submit(self, params: dict) -> tuple[int, list[Completion]]:
        """(prompt tokens, completions) for a checked request; raises RequestError."""
        if self._stopping:
            raise RequestError(503, "model", "the server is shutting down")
        if params["model"] not in self.served():
            raise RequestError(404, "model", f"model {params['model']!r} is not served here "
                                             f"(served: {sorted(self.served())})")
        tok = self.service.tokenizer
        prompt = tok.apply_chat_template(params["messages"], add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        limit = getattr(self.service.model.config, "max_position_embeddings", 1 << 30)
        if len(prompt) + params["max_tokens"] > limit:
            raise RequestError(400, "messages",
                               f"prompt ({len(prompt)} tokens) + max_tokens exceeds the model's {limit}")
        job = _Job(params, prompt)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return len(prompt), job.result

    def _work(self) -> None:
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else self.jobs.get()
            if job is None:
                break
            batch, rows = [job], job.params["n"]
            if self.jobs.empty():  # requests sent together arrive a few ms apart: let them join
                time.sleep(GATHER_SECONDS)
            while True:  # every request waiting now with the same settings joins the batch
                try:
                    other = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if other is None:
                    pending.append(other)
                    break
                if other.key() == job.key() and rows + other.params["n"] <= MAX_BATCH_ROWS:
                    batch.append(other)
                    rows += other.params["n"]
                else:
                    pending.append(other)
            self._run(batch)
        for job in pending:
            if job is not None:
                job.error = RequestError(503, "model", "the server is shutting down")
                job.done.set()

    def _run(self, batch: list[_Job]) -> None:
        p = batch[0].params
        self.batches += 1
        try:
            adapter = self.served().get(p["model"])
            if adapter is None:  # the policy moved on while the request waited
                raise RequestError(404, "model",
                                   f"model {p['model']!r} is no longer served (served: {sorted(self.served())})")
            with self.service.lock:
                results = sample_completions(
                    self.service.model, self.service.tokenizer, [j.prompt for j in batch],
                    [j.params["n"] for j in batch], adapter=adapter, temperature=p["temperature"],
                    max_tokens=p["max_tokens"], stops=p["stop"], logprobs=p["logprobs"], seed=p["seed"],
                    logprob_temperature=logprob_temperature(getattr(self.service, "options", None), p["temperature"]))
            for job, result in zip(batch, results, strict=True):
                job.result = result
        except RequestError as e:
            for job in batch:
                job.error = e
        except Exception as e:  # a generation failure is the server's fault: 500 with the reason
            for job in batch:
                job.error = RequestError(500, "model", f"generation failed: {type(e).__name__}: {e}")
        finally:
            for job in batch:
                job.done.set()


# --------------------------------------------------------------------------------------
# The HTTP side (Flask): routes, replies and errors in the OpenAI API's shape
# --------------------------------------------------------------------------------------


def completion_body(params: dict, prompt_len: int, completions: list[Completion], tokenizer) -> dict:
    """The OpenAI chat.completion object; logprob tokens as "token_id:N" (vLLM's
    return_tokens_as_token_ids, which ART's tokenizer step reads back)."""
    choices = []
    for i, c in enumerate(completions):
        logprobs = None
        if c.logprobs is not None:
            content = []
            for tid, lp in zip(c.token_ids, c.logprobs, strict=True):
                text = tokenizer.decode([tid])
                content.append({"token": f"token_id:{tid}", "logprob": lp, "bytes": list(text.encode("utf-8")),
                                "top_logprobs": []})
            logprobs = {"content": content}
        choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason, "logprobs": logprobs})
    generated = sum(len(c.token_ids) for c in completions)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": params["model"], "choices": choices,
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": generated,
                      "total_tokens": prompt_len + generated}}


def create_app(inference: InferenceServer):
    """The Flask app of an InferenceServer: three routes, every error as {"error": {message, type, param, code}}."""
    from flask import Flask
    from werkzeug.exceptions import HTTPException

    app = Flask("art_cpu_server")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # werkzeug answers 413 before the body is read
    app.extensions["inference"] = inference
    app.register_error_handler(RequestError, _error)
    app.register_error_handler(HTTPException, _http_error)
    app.get("/health")(health)
    app.get("/v1/models")(models)
    app.post("/v1/chat/completions")(chat_completions)
    return app


def _inference() -> InferenceServer:
    from flask import current_app

    return current_app.extensions["inference"]


def _error(e: RequestError):
    from flask import jsonify

    kind = "invalid_request_error" if e.status < 500 else "server_error"
    resp = jsonify({"error": {"message": str(e), "type": kind, "param": e.param, "code": e.status}})
    resp.status_code = e.status
    if e.close:
        resp.headers["Connection"] = "close"  # where the unread body ends is unknown: not parsed as a request
    return resp


def _http_error(e):
    """Werkzeug's own errors (404, 405, 413) in the same shape."""
    from flask import request

    if e.code == 413:
        return _error(RequestError(413, "body", f"request body exceeds {MAX_BODY_BYTES} bytes", close=True))
    return _error(RequestError(e.code or 400, "path", f"no route {request.method} {request.path} ({e.name})"))


def health():
    """GET /health."""
    from flask import jsonify

    return jsonify({"status": "ok", "served": sorted(_inference().served())})


def models():
    """GET /v1/models: the policy (`parent` = the base model) and the base model (no parent)."""
    from flask import jsonify

    inference = _inference()
    base = inference.service.base_model
    data = [{"id": name, "object": "model", "owned_by": "art-cpu", "root": base, "parent": base if adapter else None}
            for name, adapter in inference.served().items()]
    return jsonify({"object": "list", "data": data})


def chat_completions():
    """POST /v1/chat/completions."""
    from flask import jsonify, request

    length = request.headers.get("Content-Length")
    if length is not None and not length.strip().isdigit():
        raise RequestError(400, "Content-Length", "the Content-Length header must be an integer", close=True)
    raw = request.get_data(cache=False)  # 413 past MAX_CONTENT_LENGTH
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise RequestError(400, "body", f"the request body is not valid JSON ({e})") from None
    params = parse_chat_request(body)
    inference = _inference()
    prompt_len, completions = inference.submit(params)
    return jsonify(completion_body(params, prompt_len, completions, inference.service.tokenizer))
