"""Reward server: scores Hacker News titles for both trainers (Flask; gunicorn in production).

    make reward                                   # Flask, foreground, 127.0.0.1:7000, offline MiniLM scorer
    python local_reward.py --port 7001            # same, another port
    python local_reward.py --scorer hf --rm_model path/or/hub-id [--rm_adapter lora-dir]
    python local_reward.py --prod --workers 2     # gunicorn, the model loaded once per worker
    REWARD_API_KEY=... python local_reward.py --host 0.0.0.0   # anything but loopback needs a key
    python local_reward.py --help                 # every flag

What it scores with is hntitles/reward/scorers.py's (the MiniLM formula, or a trained HF reward model); this
file serves it, in order:
1. Settings: ServerArgs (flags over environment / .env over defaults: REWARD_HOST, REWARD_PORT,
   REWARD_SCORER, REWARD_MODEL, REWARD_ADAPTER, REWARD_API_KEY, REWARD_MAX_BYTES, REWARD_MAX_BATCH,
   REWARD_WORKERS), parse_args, build_scorer.
2. Request validation: parse_story / parse_stories raise BadRequest naming the field.
3. App: create_app (the Flask app; tests inject a scorer), the bearer-token check, the size caps
   (read_json), score_stories (one scoring thread per app) and the three routes.
4. Serving: serve_gunicorn, main (refuses a non-loopback bind without REWARD_API_KEY).

API (JSON):
    GET  /health       -> {"status": "ok", "scorer", "model", "version"}
    POST /score        one story {title, by, time (ISO 8601), scraped_body, url?} -> {"score", "components"}
                       (OpenPipe's original HN client works unchanged); a JSON list -> {"scores", "components"}
    POST /score_batch  {"stories": [...]} -> {"scores": [...], "components": [...]} in order

Bad input gets a 4xx JSON error naming the field ({"error", "field"}), a title or body with no
visible character (empty, whitespace, NUL and other control characters) included: a score for
it would be made up. A missing or wrong bearer token gets a 401, a body or batch over the caps a
413. A scorer crash, or a non-finite score, gets a 500 (a server fault, which utils.RewardClient
retries), never a made-up number.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hmac
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hntitles.analysis.stats import is_finite_number
from hntitles.reward.scorers import HFScorer, MiniLMScorer, Scorer
from hntitles.reward.text_metrics import has_text
from hntitles.runs.settings import MAX_SEQ_TOKENS, load_env

__version__ = "0.1.0"
log = logging.getLogger("local_reward")


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


# Env var -> ServerArgs field. Flags override these (dataclass default < env/.env < flag).
ENV_SETTINGS = {
    "REWARD_HOST": "host",
    "REWARD_PORT": "port",
    "REWARD_SCORER": "scorer",
    "REWARD_MODEL": "rm_model",
    "REWARD_ADAPTER": "rm_adapter",
    "REWARD_MAX_BYTES": "max_bytes",
    "REWARD_MAX_BATCH": "max_batch",
    "REWARD_WORKERS": "workers",
}


@dataclass
class ServerArgs:
    host: str = field(default="127.0.0.1", metadata={
        "help": "Bind address. Anything but loopback requires REWARD_API_KEY."})
    port: int = field(default=7000, metadata={"help": "Port."})
    scorer: str = field(default="minilm", metadata={
        "help": "'minilm' (offline default) or 'hf' (sequence-classification RM).",
                                                    "choices": ["minilm", "hf"]})
    rm_model: str = field(default="", metadata={
        "help": "hf: hub id or folder of the RM; minilm: embedding model folder (default: the shipped MiniLM)."})
    rm_adapter: str = field(default="", metadata={"help": "hf: optional PEFT adapter folder on top of --rm_model."})
    rm_batch_size: int = field(default=16, metadata={"help": "Stories per forward pass."})
    rm_max_length: int = field(default=MAX_SEQ_TOKENS, metadata={
        "help": "hf: truncate serialized stories to this many tokens (and the model's limit)."})
    max_bytes: int = field(default=16 * 1024 * 1024, metadata={"help": "Largest request body in bytes (413 above)."})
    max_batch: int = field(default=256, metadata={"help": "Most stories per request (413 above)."})
    max_title_chars: int = field(default=2000, metadata={
        "help": "Longest accepted title (413 above); long titles are scored low, not refused, below this."})
    prod: bool = field(default=False, metadata={"help": "Serve with gunicorn instead of Flask's development server."})
    workers: int = field(default=1, metadata={"help": "gunicorn worker processes (each loads the model once)."})
    threads: int = field(default=4, metadata={
        "help": "gunicorn threads per worker (keep-alive connections; scoring is serialised)."})
    # 1 by default: beside a trainer on the same cores, spinning OpenMP threads made one request
    # ~15x slower (measured on 2 cores).
    torch_threads: int = field(default=1, metadata={
        "help": "CPU threads per process for scoring (0 = torch's default, all cores); 1 leaves the cores to a "
                "trainer beside it."})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error."})
    # Not a flag on purpose (init=False keeps it out of the parser): a secret on the command line is
    # visible to every user in `ps`. Set REWARD_API_KEY, or assign args.api_key in code.
    api_key: str = field(default="", init=False)


def parse_args(argv: Sequence[str] | None = None) -> ServerArgs:
    """Flags over environment (.env included) over defaults."""
    load_env()  # first: HF_HUB_OFFLINE/HF_TOKEN in .env must be set before transformers reads them
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ServerArgs, description=__doc__.split("\n\n")[0])
    types = {f.name: f.type for f in ServerArgs.__dataclass_fields__.values()}
    defaults: dict[str, Any] = {}
    for env_name, name in ENV_SETTINGS.items():
        if os.environ.get(env_name):
            value = os.environ[env_name]
            if types[name] in ("int", int):
                try:
                    value = int(value)
                except ValueError:
                    raise SystemExit(f"{env_name}={value!r} is not an integer") from None
            defaults[name] = value
    parser.set_defaults(**defaults)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    args.api_key = os.environ.get("REWARD_API_KEY", "")
    return args


def default_args() -> ServerArgs:
    """ServerArgs from the environment only (what create_app() uses when given none)."""
    return parse_args([])


def build_scorer(args: ServerArgs) -> Scorer:
    if args.scorer == "minilm":
        return MiniLMScorer(args.rm_model or None, batch_size=max(args.rm_batch_size, 1) * 4)
    if args.scorer == "hf":
        return HFScorer(args.rm_model, args.rm_adapter, args.rm_batch_size, args.rm_max_length)
    raise ValueError(f"unknown scorer {args.scorer!r}: use 'minilm' or 'hf'")


# --------------------------------------------------------------------------------------
# Request validation
# --------------------------------------------------------------------------------------


class BadRequest(Exception):
    """Client error: becomes {"error", "field"} with a 4xx status."""

    def __init__(self, message: str, field: str, status: int = 422):
        super().__init__(message)
        self.message, self.field, self.status = message, field, status


REQUIRED = ("title", "by", "time", "scraped_body")


def _check_text(value: str, name: str) -> None:
    # json.loads accepts lone surrogates ("\ud800"); tokenizers choke on them -> a 500. Refuse them here.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{name}' is not valid Unicode (lone surrogate)", name) from None


def parse_story(obj: Any, where: str, args: ServerArgs) -> dict:
    """One story in OpenPipe's shape, checked; `where` prefixes field names ("stories[3].")."""
    if not isinstance(obj, dict):
        raise BadRequest(f"a story must be a JSON object, got {type(obj).__name__}", where.rstrip(".") or "request")
    for name in (*REQUIRED, "url"):
        if name not in obj and name != "url":
            raise BadRequest(f"field '{name}' is missing", where + name)
        value = obj.get(name)
        if name == "url" and value is None:
            continue
        if not isinstance(value, str):
            raise BadRequest(f"field '{name}' must be a string, got {type(value).__name__}", where + name)
        _check_text(value, where + name)
    title = obj["title"].strip()
    # Whitespace, control characters (NUL) or zero-width characters only: no text to judge, and any
    # score for it would be made up (MiniLM gave such titles ~0.0 with a 200).
    if not has_text(title):
        raise BadRequest("field 'title' is empty (no visible character)", where + "title")
    if not has_text(obj["scraped_body"]):
        raise BadRequest("field 'scraped_body' is empty (no visible character): a title cannot be judged "
                         "against no article", where + "scraped_body")
    if len(title) > args.max_title_chars:
        raise BadRequest(f"field 'title' is longer than {args.max_title_chars} characters", where + "title", 413)
    try:
        dt.datetime.fromisoformat(obj["time"].strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"field 'time' is not ISO 8601: {obj['time'][:40]!r}", where + "time") from None
    return {"title": title, "by": obj["by"], "time": obj["time"].strip(), "scraped_body": obj["scraped_body"],
            "url": obj.get("url") or ""}


def parse_stories(items: Any, where: str, args: ServerArgs) -> list[dict]:
    if not isinstance(items, list):
        raise BadRequest(f"'{where}' must be a JSON list of stories, got {type(items).__name__}", where)
    if not items:
        raise BadRequest(f"'{where}' is empty", where)
    if len(items) > args.max_batch:
        raise BadRequest(f"{len(items)} stories in one request; the limit is {args.max_batch} (REWARD_MAX_BATCH)",
                         where, 413)
    return [parse_story(item, f"{where}[{i}].", args) for i, item in enumerate(items)]


# --------------------------------------------------------------------------------------
# App
# --------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(args: ServerArgs) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(args.host) and not args.api_key:
        raise SystemExit(f"refusing to bind {args.host}: set REWARD_API_KEY (clients send it as "
                         "'Authorization: Bearer <key>') or bind 127.0.0.1")


def _checked_score(value: float, where: str) -> float:
    """A scorer's score, or a RuntimeError (a 500 naming the story): never a made-up number."""
    if not is_finite_number(float(value)):
        raise RuntimeError(f"scorer produced a non-finite score ({value}) for {where}")
    return float(value)


# Each app keeps its settings, scorer and scoring thread in app.config / app.extensions, so the
# handlers below are plain module-level functions that read them from flask.current_app.


def _error(message: str, field: str, status: int):
    """The one error shape: {"error", "field"} with `status`."""
    from flask import jsonify

    return jsonify({"error": message, "field": field}), status


def _on_bad_request(e: BadRequest):
    return _error(e.message, e.field, e.status)


def _on_http_error(e):
    """Werkzeug's errors (404, 405, 413, ...) in the same JSON shape."""
    from flask import current_app

    if e.code == 413:
        max_bytes = current_app.config["REWARD_ARGS"].max_bytes
        return _error(f"request body larger than {max_bytes} bytes (REWARD_MAX_BYTES)", "request", 413)
    return _error(e.description or e.name, "request", e.code or 400)


def _on_server_fault(e: Exception):
    log.exception("scoring failed")
    return _error(f"internal error: {type(e).__name__}: {e}"[:500], "server", 500)


def _authorize():
    """Before each request: a bearer token equal to REWARD_API_KEY, when one is set (/health is open)."""
    from flask import current_app, request

    api_key = current_app.config["REWARD_API_KEY"]
    if not api_key or request.path == "/health":
        return None
    header = request.headers.get("Authorization", "")
    token = header[7:].encode("utf-8") if header[:7].lower() == "bearer " else b""
    if not hmac.compare_digest(token, api_key):
        resp, status = _error("missing or wrong bearer token", "Authorization", 401)
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp, status
    return None


def _server_timing(resp):
    # Standard Server-Timing header: time inside the scorer, so clients can tell model time from overhead.
    from flask import g

    if "score_ms" in g:
        resp.headers["Server-Timing"] = f"score;dur={g.score_ms:.1f}"
    return resp


def read_json() -> Any:
    """The request body as JSON, under the size cap; a BadRequest (400) when it is not JSON."""
    from flask import current_app, request
    from werkzeug.exceptions import RequestEntityTooLarge

    max_bytes = current_app.config["REWARD_ARGS"].max_bytes
    raw = request.get_data(cache=False)  # raises 413 when Content-Length is past MAX_CONTENT_LENGTH
    if request.content_length is None and len(raw) >= max_bytes:
        # A chunked upload is cut at the cap rather than refused; refuse it here, not as bad JSON.
        raise RequestEntityTooLarge()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON ({e})"[:300], "request", 400) from None
    except RecursionError:  # "[[[[...]]]]" nested deeper than the parser's stack
        raise BadRequest("request body is nested too deeply", "request", 400) from None


def _timed_score(scorer: Scorer, stories: list[dict]) -> tuple[list, float]:
    start = time.perf_counter()
    return scorer.score(stories), 1000 * (time.perf_counter() - start)


def score_stories(stories: list[dict]) -> tuple[list[float], list[dict]]:
    """Scores and components of checked stories, on the app's scoring thread; a RuntimeError (500)
    when the scorer returns the wrong count or a non-finite score (never a made-up number)."""
    from flask import current_app, g

    scorer = current_app.config["SCORER"]
    results, g.score_ms = current_app.extensions["local_reward.scoring"].submit(_timed_score, scorer, stories).result()
    if len(results) != len(stories):
        raise RuntimeError(f"scorer returned {len(results)} scores for {len(stories)} stories")
    return [_checked_score(s, f"story {i}") for i, (s, _) in enumerate(results)], [c for _, c in results]


def health():
    """GET /health."""
    from flask import current_app, jsonify

    scorer = current_app.config["SCORER"]
    return jsonify({"status": "ok", "scorer": scorer.kind, "model": scorer.model,
                    "version": f"{__version__}/{scorer.version}"})


def score():
    """POST /score: one story -> {"score", "components"}; a list -> {"scores", "components"}."""
    from flask import current_app, jsonify

    args = current_app.config["REWARD_ARGS"]
    payload = read_json()
    if isinstance(payload, list):
        scores, comps = score_stories(parse_stories(payload, "stories", args))
        return jsonify({"scores": scores, "components": comps})
    if not isinstance(payload, dict):
        raise BadRequest(f"expected a story object or a list of stories, got {type(payload).__name__}", "request", 400)
    scores, comps = score_stories([parse_story(payload, "", args)])
    return jsonify({"score": scores[0], "components": comps[0]})


def score_batch():
    """POST /score_batch: {"stories": [...]} -> {"scores", "components"} in order."""
    from flask import current_app, jsonify

    payload = read_json()
    if not isinstance(payload, dict):
        raise BadRequest(f'expected {{"stories": [...]}}, got {type(payload).__name__}', "request", 400)
    if "stories" not in payload:
        raise BadRequest("field 'stories' is missing", "stories")
    scores, comps = score_stories(parse_stories(payload["stories"], "stories", current_app.config["REWARD_ARGS"]))
    return jsonify({"scores": scores, "components": comps})


def register_routes(app) -> None:
    """Error handlers, the auth check, the timing header and the three routes."""
    from werkzeug.exceptions import HTTPException

    app.register_error_handler(BadRequest, _on_bad_request)
    app.register_error_handler(HTTPException, _on_http_error)
    app.register_error_handler(Exception, _on_server_fault)
    app.before_request(_authorize)
    app.after_request(_server_timing)
    app.get("/health")(health)
    app.post("/score")(score)
    app.post("/score_batch")(score_batch)


def create_app(args: ServerArgs | None = None, scorer: Scorer | None = None):
    """The Flask app. Builds the scorer from `args` unless one is passed (tests inject theirs)."""
    from flask import Flask

    args = args or default_args()
    app = Flask("local_reward")
    app.config["MAX_CONTENT_LENGTH"] = args.max_bytes
    app.config["REWARD_ARGS"] = args
    app.config["SCORER"] = scorer or build_scorer(args)
    app.config["REWARD_API_KEY"] = args.api_key.encode("utf-8")
    # One long-lived scoring thread: tokenizers and models are not safe to call from several threads
    # at once, and a thread that has scored before is faster (measured ~5-10% over a new thread per
    # request, which is what Flask's threaded server would otherwise give the model).
    app.extensions["local_reward.scoring"] = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="scorer")
    register_routes(app)
    return app


# --------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------


def serve_gunicorn(args: ServerArgs) -> None:
    """gunicorn with `workers` processes; each builds its own app (and model) after the fork.

    No preload: torch's thread pools and the tokenizer's Rust threads are not fork-safe, so the
    master never imports them; each worker loads the model once in its own process.
    """
    from gunicorn.app.base import BaseApplication

    # Nested on purpose: gunicorn is imported only to serve (it takes ~0.3 s and needs fcntl, so
    # POSIX only), and the class is created once, in the master, never pickled.
    class RewardApplication(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("worker_class", "gthread")  # keep-alive connections (sync workers close each one)
            self.cfg.set("threads", args.threads)
            self.cfg.set("timeout", 300)  # a cold first batch on a CPU can take a while
            self.cfg.set("keepalive", 30)
            self.cfg.set("preload_app", False)
            self.cfg.set("loglevel", args.log_level)
            self.cfg.set("accesslog", "-")
            self.cfg.set("limit_request_field_size", 16384)
            if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 24: one shared ~/.gunicorn socket otherwise
                self.cfg.set("control_socket_disable", True)

        def load(self):  # called in each worker after the fork
            set_torch_threads(args.torch_threads, args.workers)
            return create_app(args)

    RewardApplication().run()


def set_torch_threads(threads: int, workers: int = 1) -> None:
    """Intra-op threads for this process; 0 splits the cores between the workers."""
    import torch

    torch.set_num_threads(threads if threads > 0 else max(1, (os.cpu_count() or 1) // max(1, workers)))


def main(args: ServerArgs) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_exposure(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.scorer not in ("minilm", "hf"):
        raise SystemExit(f"unknown --scorer {args.scorer!r}: use 'minilm' or 'hf'")
    if args.scorer == "hf" and not args.rm_model:  # checked here too: under gunicorn a worker would fail to boot
        raise SystemExit("--scorer hf needs --rm_model (or REWARD_MODEL): a hub id or a local folder")
    if args.prod:
        serve_gunicorn(args)
        return
    set_torch_threads(args.torch_threads)
    app = create_app(args)
    health = app.test_client().get("/health").get_json()
    log.info("serving %s on http://%s:%d (auth %s)", health, args.host, args.port, "on" if args.api_key else "off")
    # threaded: concurrent clients queue for the scoring thread instead of on the socket; HTTP/1.1 keep-alive.
    app.run(host=args.host, port=args.port, threaded=True, debug=False, use_reloader=False)


if __name__ == "__main__":
    try:
        main(parse_args(sys.argv[1:]))
    except ValueError as e:  # configuration errors (bad model path, no head): a message, not a traceback
        raise SystemExit(f"local_reward.py: {e}") from None
