"""local_reward.py behaviour: the HTTP contract, every bad input, auth, settings, and a real process.

Flask's test client covers the contract on one module-scoped app (MiniLM loaded once); the
process tests start `python local_reward.py` on a free port (tests/servers.py) and talk HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import pytest

import local_reward as lr
import utils
from hntitles.reward import embeddings, scorers

BODY = ("The Rust team released Rust 1.80 today. The release stabilises LazyCell and LazyLock, "
        "two types for lazily initialised values, and adds exclusive ranges to patterns.")
STORY = {"title": "Rust 1.80 stabilises LazyCell and LazyLock", "by": "steveklabnik",
         "time": "2024-07-25T15:00:00Z", "scraped_body": BODY, "url": "https://blog.rust-lang.org/"}
LIMITS = {"max_bytes": 64 * 1024, "max_batch": 8, "max_title_chars": 300}


def with_(**changes) -> dict:
    return {**STORY, **changes}


def without(name: str) -> dict:
    return {k: v for k, v in STORY.items() if k != name}


@pytest.fixture(scope="module")
def scorer():
    return scorers.MiniLMScorer()


@pytest.fixture(scope="module")
def app(scorer):
    return lr.create_app(lr.ServerArgs(**LIMITS), scorer=scorer)


@pytest.fixture
def client(app):
    return app.test_client()


# ---- the contract ----


@pytest.mark.slow
def test_health(client):
    reply = client.get("/health")
    assert reply.status_code == 200
    body = reply.get_json()
    assert body["status"] == "ok" and body["scorer"] == "minilm"
    assert body["model"] == embeddings.minilm_path() and body["version"].startswith(lr.__version__)


@pytest.mark.slow
def test_score_openpipe_shape(client):
    # Exactly what OpenPipe's original HN example sends: the five fields, read ["score"].
    reply = client.post("/score", json=STORY)
    assert reply.status_code == 200
    body = reply.get_json()
    assert isinstance(body["score"], float) and 0.0 < body["score"] <= 1.0
    assert {"relevance", "style", "copy", "length"} <= set(body["components"])
    assert reply.headers["Server-Timing"].startswith("score;dur=")  # model time, apart from HTTP overhead


@pytest.mark.slow
@pytest.mark.parametrize("change", [
    # url is optional
    {"url": None},
    # ... and may be left out
    "drop-url",
    # extra fields (id, score) are ignored
    {"id": 1, "score": 99},
    # an ISO time with an offset
    {"time": "2024-07-25T17:00:00+02:00"},
    # a date alone is ISO 8601 too
    {"time": "2024-07-25"},
    # a body with one visible character is text, however short
    {"scraped_body": "x"},
])
def test_score_accepts(client, change):
    story = without("url") if change == "drop-url" else with_(**change)
    reply = client.post("/score", json=story)
    assert reply.status_code == 200, reply.get_json()


@pytest.mark.slow
def test_batch_routes_keep_order_and_match_single(client):
    stories = [STORY, with_(title="YOU WON'T BELIEVE THIS RELEASE!!"), with_(title=BODY),
               with_(title="A bakery in Lyon switches to sourdough")]
    singles = [client.post("/score", json=s).get_json()["score"] for s in stories]
    batch = client.post("/score_batch", json={"stories": stories}).get_json()
    listed = client.post("/score", json=stories).get_json()
    assert batch["scores"] == pytest.approx(singles, abs=1e-5)
    assert listed["scores"] == pytest.approx(singles, abs=1e-5)
    assert len(batch["components"]) == 4
    assert singles[0] == max(singles)  # the real title beats shouting, copying and an unrelated title


def rejects(client, path: str, data: bytes | str, status: int, field: str):
    reply = client.post(path, data=data, content_type="application/json")
    assert reply.status_code == status, (reply.status_code, reply.get_data(as_text=True)[:300])
    body = reply.get_json()
    assert body is not None, "error replies are JSON"
    assert body["field"] == field and body["error"]
    assert client.get("/health").status_code == 200  # still serving


def dumps(obj) -> str:
    return json.dumps(obj)


BAD_SCORE = [
    # not JSON at all
    ("{bad", 400, "request"),
    # JSON, but not an object or a list
    ("null", 400, "request"),
    # a bare string
    ('"a title"', 400, "request"),
    # a number
    ("42", 400, "request"),
    # JSON nested deeper than the parser's stack (a RecursionError, not a ValueError)
    ("[" * 30000 + "]" * 30000, 400, "request"),
    # invalid UTF-8 bytes
    (b'{"title": "\xff\xfe"}', 400, "request"),
    # each required field missing
    (dumps(without("title")), 422, "title"),
    (dumps(without("by")), 422, "by"),
    (dumps(without("time")), 422, "time"),
    (dumps(without("scraped_body")), 422, "scraped_body"),
    # mistyped fields
    (dumps(with_(title=5)), 422, "title"),
    (dumps(with_(title=None)), 422, "title"),
    (dumps(with_(by=["x"])), 422, "by"),
    (dumps(with_(scraped_body={"text": "x"})), 422, "scraped_body"),
    (dumps(with_(url=7)), 422, "url"),
    (dumps(with_(time=1721919600)), 422, "time"),
    # empty and blank titles
    (dumps(with_(title="")), 422, "title"),
    (dumps(with_(title="   \n")), 422, "title"),
    # titles with no visible character: control characters (NUL), a zero-width space; scoring them
    # would make up a number (the MiniLM scorer gave ~0.0 here before they were refused)
    (dumps(with_(title="\x00")), 422, "title"),
    (dumps(with_(title="\x00\x01\x1f \x7f")), 422, "title"),
    (dumps(with_(title="\u200b\u200b")), 422, "title"),
    # an empty, whitespace-only or control-character body: nothing to judge a title against
    (dumps(with_(scraped_body="")), 422, "scraped_body"),
    (dumps(with_(scraped_body=" \n\t  ")), 422, "scraped_body"),
    (dumps(with_(scraped_body="\x00\x00")), 422, "scraped_body"),
    # times that are not ISO 8601
    (dumps(with_(time="yesterday")), 422, "time"),
    (dumps(with_(time="25/07/2024")), 422, "time"),
    # a lone surrogate (valid JSON, invalid Unicode; tokenizers would crash on it)
    ('{"title": "\\ud800 x", "by": "a", "time": "2024-01-01", "scraped_body": "b"}', 422, "title"),
    # a title longer than max_title_chars
    (dumps(with_(title="word " * 100)), 413, "title"),
    # a request body larger than max_bytes (REWARD_MAX_BYTES)
    (dumps(with_(scraped_body="x" * (LIMITS["max_bytes"] + 1))), 413, "request"),
    # a list on /score: empty
    ("[]", 422, "stories"),
    # a list with something that is not a story
    (dumps([STORY, "not a story"]), 422, "stories[1]"),
    # a list whose first story lacks a field
    (dumps([without("by")]), 422, "stories[0].by"),
    # a list larger than max_batch (REWARD_MAX_BATCH)
    (dumps([STORY] * (LIMITS["max_batch"] + 1)), 413, "stories"),
]


@pytest.mark.slow
@pytest.mark.parametrize("data, status, field", BAD_SCORE)
def test_score_rejects(client, data, status, field):
    rejects(client, "/score", data, status, field)


BAD_BATCH = [
    # not JSON
    ("{", 400, "request"),
    # a list instead of {"stories": [...]}
    (dumps([STORY]), 400, "request"),
    # no stories key
    (dumps({"story": [STORY]}), 422, "stories"),
    # stories is not a list
    (dumps({"stories": STORY}), 422, "stories"),
    # stories is null
    (dumps({"stories": None}), 422, "stories"),
    # an empty batch
    (dumps({"stories": []}), 422, "stories"),
    # one story more than max_batch
    (dumps({"stories": [STORY] * (LIMITS["max_batch"] + 1)}), 413, "stories"),
    # a bad time in the third story names that story
    (dumps({"stories": [STORY, STORY, with_(time="soon")]}), 422, "stories[2].time"),
    # a number where a story should be
    (dumps({"stories": [STORY, 3]}), 422, "stories[1]"),
    # a blank body in the second story names that story's field
    (dumps({"stories": [STORY, with_(scraped_body="  ")]}), 422, "stories[1].scraped_body"),
    # a NUL-only title likewise
    (dumps({"stories": [with_(title="\x00"), STORY]}), 422, "stories[0].title"),
    # an oversized request
    (dumps({"stories": [with_(scraped_body="y" * LIMITS["max_bytes"])]}), 413, "request"),
]


@pytest.mark.slow
@pytest.mark.parametrize("data, status, field", BAD_BATCH)
def test_score_batch_rejects(client, data, status, field):
    rejects(client, "/score_batch", data, status, field)


@pytest.mark.slow
@pytest.mark.parametrize("method, path, status", [
    # GET on a POST route
    ("get", "/score", 405),
    # an unknown route
    ("post", "/nope", 404),
])
def test_routing_errors_are_json(client, method, path, status):
    reply = getattr(client, method)(path)
    assert reply.status_code == status and reply.get_json()["field"] == "request"


class BrokenScorer:
    kind, model, version = "broken", "none", "0"

    def __init__(self, result):
        self.result = result

    def score(self, stories):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize("result", [
    # the scorer crashes: a server fault (5xx, the client retries), not the client's
    RuntimeError("CUDA out of memory"),
    # a NaN score is never sent as a reward
    [(float("nan"), {})],
    # a scorer returning the wrong number of scores
    [],
])
def test_scorer_faults_are_500_json(result):
    client = lr.create_app(lr.ServerArgs(), scorer=BrokenScorer(result)).test_client()
    reply = client.post("/score", json=STORY)
    assert reply.status_code == 500 and reply.get_json()["field"] == "server"
    assert client.get("/health").status_code == 200


# ---- auth and exposure ----


@pytest.fixture(scope="module")
def keyed_client(scorer):
    args = lr.ServerArgs(host="0.0.0.0")
    args.api_key = "s3cret-token"
    return lr.create_app(args, scorer=scorer).test_client()


@pytest.mark.slow
@pytest.mark.parametrize("headers, status", [
    # no Authorization header
    ({}, 401),
    # the wrong token
    ({"Authorization": "Bearer wrong"}, 401),
    # the right token under another scheme
    ({"Authorization": "Basic s3cret-token"}, 401),
    # a prefix of the right token
    ({"Authorization": "Bearer s3cret"}, 401),
    # the right token
    ({"Authorization": "Bearer s3cret-token"}, 200),
    # the scheme is case-insensitive (RFC 7235)
    ({"Authorization": "bearer s3cret-token"}, 200),
])
def test_bearer_token(keyed_client, headers, status):
    for path, payload in (("/score", STORY), ("/score_batch", {"stories": [STORY]})):
        reply = keyed_client.post(path, json=payload, headers=headers)
        assert reply.status_code == status, path
        if status == 401:
            assert reply.get_json()["field"] == "Authorization"
    assert keyed_client.get("/health").status_code == 200  # health stays open for probes


@pytest.mark.parametrize("host, key, refused", [
    # loopback needs no key
    ("127.0.0.1", "", False),
    ("localhost", "", False),
    ("::1", "", False),
    # every other address does
    ("0.0.0.0", "", True),
    ("192.168.1.20", "", True),
    ("::", "", True),
    # ... and is allowed with one
    ("0.0.0.0", "k", False),
])
def test_exposure_rule(host, key, refused):
    args = lr.ServerArgs(host=host)
    args.api_key = key
    if refused:
        with pytest.raises(SystemExit, match="REWARD_API_KEY"):
            lr.check_exposure(args)
    else:
        lr.check_exposure(args)


@pytest.mark.integration
def test_cli_refuses_public_bind_without_key(root):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "REWARD_API_KEY": ""}
    proc = subprocess.run([sys.executable, str(root / "local_reward.py"), "--host", "0.0.0.0", "--port", "1"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "REWARD_API_KEY" in proc.stderr


def test_settings_env_then_flags(monkeypatch):
    monkeypatch.setenv("REWARD_PORT", "7123")
    monkeypatch.setenv("REWARD_MAX_BATCH", "5")
    monkeypatch.setenv("REWARD_SCORER", "hf")
    monkeypatch.setenv("REWARD_API_KEY", "abc")
    args = lr.parse_args(["--scorer", "minilm", "--max_bytes", "1000"])
    assert (args.port, args.max_batch, args.scorer, args.max_bytes, args.api_key) == (7123, 5, "minilm", 1000, "abc")
    assert args.host == "127.0.0.1"


# ---- the real process over HTTP ----


def concurrent_clients(url: str, n_clients: int = 16, per_client: int = 4) -> list[str]:
    """n_clients threads, each with its own connection, alternating /score and /score_batch."""
    errors: list[str] = []

    def work(k: int):
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(per_client):
                try:
                    if i % 2:
                        r = http.post("/score_batch",
                                      json={"stories": [with_(title=f"Rust news number {k} {j}") for j in range(4)]})
                        ok = r.status_code == 200 and len(r.json()["scores"]) == 4
                    else:
                        r = http.post("/score", json=with_(title=f"Rust 1.80 is out, client {k}"))
                        ok = r.status_code == 200 and isinstance(r.json()["score"], float)
                    if not ok:
                        errors.append(f"client {k}: HTTP {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"client {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return errors


@pytest.mark.integration
def test_real_server_over_http(reward_server):
    url = reward_server
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok"
    # The original client's shape over real HTTP.
    reply = httpx.post(url + "/score", json=STORY)
    assert reply.status_code == 200 and isinstance(reply.json()["score"], float)
    # Bad input over HTTP: JSON 4xx, and the server keeps serving.
    bad = httpx.post(url + "/score", content=b"{oops", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["field"] == "request"
    # Chunked upload (no Content-Length) past the size cap is still a JSON 413.
    huge = (b'{"title": "t", "by": "a", "time": "2024-01-01", "scraped_body": "' + b"x" * (1 << 20))
    reply = httpx.post(url + "/score", content=iter([huge] * 20), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and reply.json()["field"] == "request"
    assert concurrent_clients(url) == []
    # The trainers' client against the same server.
    client = utils.RewardClient(url, retries=0)
    scores = client.score_sync([STORY, with_(title="CLICK HERE!!! 🤯")])
    assert scores[0] > scores[1]
    assert client.stats["failures"] == 0
    assert httpx.get(url + "/health").status_code == 200


@pytest.mark.integration
@pytest.mark.slow
def test_prod_server_gunicorn_with_key():
    from servers import reward_server_process

    key = "prod-test-key"
    with reward_server_process(args=["--prod", "--workers", "2"], env={"REWARD_API_KEY": key}) as url:
        assert httpx.post(url + "/score", json=STORY).status_code == 401
        client = utils.RewardClient(url, api_key=key, retries=0)
        assert client.health_sync()["scorer"] == "minilm"
        assert len(client.score_sync([STORY] * 3)) == 3
        reply = httpx.post(url + "/score", json=without("title"), headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 422 and reply.json()["field"] == "title"
