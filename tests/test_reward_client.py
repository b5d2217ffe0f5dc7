"""utils.RewardClient and utils.score_completions against a real HTTP server that fails on purpose.

The server (http.server on 127.0.0.1, a free port, one thread per connection, keep-alive)
follows a script: one action per request, the last action repeating. It records every
request, so retry counts are checked on the server side, not trusted from the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from dataclasses import dataclass

import pytest
from servers import JsonHandler, free_port, serve

import utils
from hntitles.analysis import evaluation


@dataclass
class Action:
    """What the server does with one request."""

    status: int = 200
    body: object = None  # None: score every story (score = len(title)); str: sent verbatim; else JSON
    delay: float = 0.0   # seconds to wait before answering (timeouts)


def default_reply(path: str, payload: dict) -> dict:
    if path == "/score_batch":
        return {"scores": [float(len(s["title"])) for s in payload["stories"]]}
    if path == "/score":
        return {"score": float(len(payload["title"]))}
    return {"status": "ok", "scorer": "scripted"}


class ScriptedHandler(JsonHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable

    def _serve(self, method):
        server: ScriptedServer = self.server.owner
        payload = self.read_json()
        with server.lock:
            index = len(server.requests)
            server.requests.append({"method": method, "path": self.path, "headers": dict(self.headers),
                                    "json": payload, "client_port": self.client_address[1]})
            action = server.script[min(index, len(server.script) - 1)]
        if action.delay:
            time.sleep(action.delay)
        if action.body is None:
            self.reply(action.status, default_reply(self.path, payload or {}))
        elif isinstance(action.body, str):
            self.reply_raw(action.status, action.body.encode())
        else:
            self.reply(action.status, action.body)  # NaN is written as the bare token NaN, as Python does

    def do_POST(self):
        self._serve("POST")

    def do_GET(self):
        self._serve("GET")


class ScriptedServer:
    def __init__(self):
        self.script: list[Action] = [Action()]
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._stack = contextlib.ExitStack()
        _, self.url = self._stack.enter_context(serve(ScriptedHandler, owner=self))

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    def close(self):
        self._stack.close()


@pytest.fixture
def server():
    srv = ScriptedServer()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def no_key_from_env(monkeypatch):
    monkeypatch.delenv("REWARD_API_KEY", raising=False)


def client_for(server, **kw) -> utils.RewardClient:
    kw = {"retries": 3, "backoff": 0.01, "timeout": 5.0, **kw}
    return utils.RewardClient(server.url if isinstance(server, ScriptedServer) else server, **kw)


def run(client: utils.RewardClient, coro_fn):
    """Run `coro_fn(client)` in a fresh event loop and close the client's connection."""
    async def main():
        try:
            return await coro_fn(client)
        finally:
            await client.aclose()
    return asyncio.run(main())


def stories(n: int) -> list[dict]:
    return [{"title": "t" * (i + 1), "by": "u", "time": "2024-01-01T00:00:00Z", "scraped_body": "b", "url": ""}
            for i in range(n)]


def closed_port() -> int:
    return free_port()  # nobody listens once its probe socket is closed


# --------------------------------------------------------------------------------------
# Retries and failures
# --------------------------------------------------------------------------------------


def test_success_first_try(server):
    client = client_for(server)
    assert client.score_sync(stories(3)) == [1.0, 2.0, 3.0]
    assert server.paths() == ["/score_batch"]
    assert client.stats == {"requests": 1, "retries": 0, "failures": 0}
    assert server.requests[0]["json"] == {"stories": stories(3)}


def test_503_twice_then_success(server):
    server.script = [Action(503, {"error": "warming up"}), Action(503, {"error": "warming up"}), Action()]
    client = client_for(server)
    assert client.score_sync(stories(2)) == [1.0, 2.0]
    assert len(server.requests) == 3
    assert client.stats["retries"] == 2 and client.stats["failures"] == 0


@pytest.mark.parametrize("retries", [
    # no retries at all: one attempt
    0,
    # the default budget
    3,
])
def test_always_500_raises_after_budget(server, retries):
    server.script = [Action(500, {"error": "boom"})]
    client = client_for(server, retries=retries)
    with pytest.raises(utils.RewardServerError, match=rf"failed after {retries + 1} attempts.*HTTP 500"):
        client.score_sync(stories(2))
    assert len(server.requests) == retries + 1
    assert client.stats == {"requests": retries + 1, "retries": retries, "failures": 1}


@pytest.mark.parametrize("status", [
    # bad request: the payload is wrong, a retry sends the same wrong payload
    400,
    # validation error naming a field
    422,
    # unauthorised (missing token) is not transient either
    401,
    # too large
    413,
])
def test_4xx_raises_immediately_never_retried(server, status):
    server.script = [Action(status, {"error": "field 'scraped_body' must be a string"})]
    client = client_for(server, retries=3)
    with pytest.raises(utils.RewardServerError, match=rf"HTTP {status}.*scraped_body"):
        client.score_sync(stories(1))
    assert len(server.requests) == 1
    assert client.stats["retries"] == 0 and client.stats["failures"] == 1


def test_connection_refused_raises_after_retries():
    client = client_for(f"http://127.0.0.1:{closed_port()}", retries=2)
    with pytest.raises(utils.RewardServerError, match=r"failed after 3 attempts.*ConnectError"):
        client.score_sync(stories(1))
    assert client.stats == {"requests": 3, "retries": 2, "failures": 1}


@pytest.mark.parametrize("body, match", [
    # not JSON at all (a proxy's error page)
    ("<html>Bad gateway</html>", "non-JSON"),
    # JSON but not the expected object
    ([1.0, 2.0], "bad /score_batch reply"),
    # no scores key
    ({"score": 1.0}, "bad /score_batch reply"),
    # one score for two stories
    ({"scores": [1.0]}, "bad /score_batch reply"),
    # too many scores
    ({"scores": [1.0, 2.0, 3.0]}, "bad /score_batch reply"),
    # NaN is not a score
    ({"scores": [1.0, float("nan")]}, "non-numeric"),
    # infinity is not a score
    ({"scores": [float("inf"), 1.0]}, "non-numeric"),
    # a string is not a score, even a numeric one
    ({"scores": [1.0, "2.5"]}, "non-numeric"),
    # null is not a score
    ({"scores": [None, 1.0]}, "non-numeric"),
    # a bool is not a score
    ({"scores": [True, 1.0]}, "non-numeric"),
])
def test_bad_reply_raises_never_zero(server, body, match):
    server.script = [Action(200, body)]
    client = client_for(server)
    with pytest.raises(utils.RewardServerError, match=match):
        client.score_sync(stories(2))
    assert len(server.requests) == 1  # a malformed 200 is not transient: no retry


def test_slow_reply_times_out_is_retried_then_raises(server):
    server.script = [Action(delay=1.5)]
    client = client_for(server, timeout=0.2, retries=1)
    with pytest.raises(utils.RewardServerError, match=r"failed after 2 attempts.*Timeout"):
        client.score_sync(stories(1))
    assert len(server.requests) == 2


def test_slow_once_then_fast_succeeds(server):
    server.script = [Action(delay=1.5), Action()]
    client = client_for(server, timeout=0.2, retries=2)
    assert client.score_sync(stories(2)) == [1.0, 2.0]
    assert client.stats["retries"] == 1


# --------------------------------------------------------------------------------------
# Batching, connection, auth, single route, health
# --------------------------------------------------------------------------------------


def test_batches_preserve_order_on_one_connection(server):
    client = client_for(server, batch_size=64)
    scores = client.score_sync(stories(150))
    assert scores == [float(i + 1) for i in range(150)]
    assert server.paths() == ["/score_batch"] * 3
    assert [len(r["json"]["stories"]) for r in server.requests] == [64, 64, 22]
    assert len({r["client_port"] for r in server.requests}) == 1  # one pooled keep-alive connection


def test_empty_input_sends_nothing(server):
    assert client_for(server).score_sync([]) == []
    assert server.requests == []


@pytest.mark.parametrize("api_key, env_key, expected", [
    # explicit key
    ("s3cret", None, "Bearer s3cret"),
    # key from REWARD_API_KEY
    (None, "from-env", "Bearer from-env"),
    # an explicit key beats the environment
    ("explicit", "from-env", "Bearer explicit"),
    # no key: no header at all
    (None, None, None),
])
def test_bearer_token(server, monkeypatch, api_key, env_key, expected):
    if env_key:
        monkeypatch.setenv("REWARD_API_KEY", env_key)
    client_for(server, api_key=api_key).score_sync(stories(1))
    headers = {k.lower(): v for k, v in server.requests[0]["headers"].items()}
    assert headers.get("authorization") == expected


def test_score_one_uses_score_route(server):
    client = client_for(server)
    story = stories(3)[2]
    assert run(client, lambda c: c.score_one(story)) == 3.0
    assert server.paths() == ["/score"] and server.requests[0]["json"] == story


@pytest.mark.parametrize("body", [
    # missing score
    {},
    # NaN score
    {"score": float("nan")},
    # text score
    {"score": "high"},
])
def test_score_one_bad_reply_raises(server, body):
    server.script = [Action(200, body)]
    with pytest.raises(utils.RewardServerError, match="non-numeric"):
        run(client_for(server), lambda c: c.score_one(stories(1)[0]))


def test_health(server):
    client = client_for(server)
    assert client.health_sync() == {"status": "ok", "scorer": "scripted"}
    assert server.requests[0]["method"] == "GET" and server.paths() == ["/health"]


def test_health_failures():
    client = client_for(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(utils.RewardServerError, match="unreachable.*make reward"):
        client.health_sync()


def test_health_unhealthy_status(server):
    server.script = [Action(503, {"status": "loading"})]
    with pytest.raises(utils.RewardServerError, match="HTTP 503"):
        client_for(server).health_sync()


def test_client_survives_a_new_event_loop(server):
    # TRL calls async reward functions from its own loop; each loop gets its own connection.
    client = client_for(server)
    assert client.score_sync(stories(1)) == [1.0]
    assert client.score_sync(stories(2)) == [1.0, 2.0]


# --------------------------------------------------------------------------------------
# score_completions: validator + reward server + the rule
# --------------------------------------------------------------------------------------


class StubValidator:
    """Supported unless the title contains 'unsupported'; records what it was asked."""

    def __init__(self):
        self.calls = []

    def __call__(self, bodies, titles):
        self.calls.append((list(bodies), list(titles)))
        return ["unsupported" not in t for t in titles]


ROWS = [{"id": i, "title": f"Original {i}", "by": f"user{i}", "time": f"2024-06-0{i + 1}T08:00:00Z",
         "url": f"https://example.org/{i}", "score": 100, "scraped_body": f"Body {i} about compilers"}
        for i in range(4)]


def test_score_completions_rule(server):
    validator = StubValidator()
    completions = ["Good title\nThis title is good because", "  \n", "An unsupported claim", '"Fine one"']
    client = client_for(server)
    scored = run(client, lambda c: utils.score_completions(c, validator, ROWS, completions, trailing_penalty=0.5))
    # one batch request, without the empty title, in the OpenPipe shape with the candidate titles
    assert server.paths() == ["/score_batch"]
    sent = server.requests[0]["json"]["stories"]
    assert sent == [utils.story_for_scoring(t, ROWS[i]) for i, t in
                    [(0, "Good title"), (2, "An unsupported claim"), (3, "Fine one")]]
    assert validator.calls == [([r["scraped_body"] for r in ROWS],
                                ["Good title", "", "An unsupported claim", "Fine one"])]
    good, empty, unsupported, fine = scored
    # supported, trailing text: RM score minus the penalty
    assert (good.title, good.rm, good.matches, good.trailing) == ("Good title", 10.0, True, True)
    assert good.reward == pytest.approx(9.5)
    # empty title: 0 by the rule, no RM score asked for
    assert (empty.title, empty.rm, empty.matches, empty.reward) == ("", 0.0, False, 0.0)
    # unsupported: the RM scored it, the rule gives 0
    assert unsupported.rm == 20.0 and not unsupported.matches and unsupported.reward == 0.0
    # supported, quotes stripped
    assert (fine.title, fine.reward) == ("Fine one", 8.0)
    assert all(math.isfinite(s.reward) for s in scored)


def test_score_completions_without_validator(server):
    scored = run(client_for(server), lambda c: utils.score_completions(c, None, ROWS[:2], ["Abc", ""]))
    assert [s.matches for s in scored] == [True, False]
    assert [s.reward for s in scored] == [3.0, 0.0]


def test_score_completions_all_empty_sends_nothing(server):
    scored = run(client_for(server),
                 lambda c: utils.score_completions(c, StubValidator(), ROWS[:3], ["", "\n", "\x00"]))
    assert server.requests == []  # a NUL-only title is no title either: the server would refuse it
    assert [s.reward for s in scored] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("action", [
    # the server keeps failing
    Action(500, {"error": "boom"}),
    # the server rejects the batch
    Action(422, {"error": "bad"}),
    # the server answers garbage
    Action(200, {"scores": [float("nan")] * 3}),
])
def test_score_completions_failure_propagates(server, action):
    server.script = [action]
    completions = ["Title one", "Title two", "Title three"]
    client = client_for(server, retries=1)
    with pytest.raises(utils.RewardServerError):
        run(client, lambda c: utils.score_completions(c, StubValidator(), ROWS[:3], completions))
    assert client.stats["failures"] == 1  # the step failed once, and it is counted


# --------------------------------------------------------------------------------------
# evaluate_generator: the one validation procedure (stub generator, real HTTP server)
# --------------------------------------------------------------------------------------


class StubGenerator:
    """Greedy: 'Greedy <i>'; sampled: 'Sample <i>.<j>' (story 1's first sample is unsupported)."""

    name = "stub"

    def __init__(self):
        self.calls = []

    def generate(self, conversations, n, temperature, max_tokens, stop=()):
        self.calls.append((len(conversations), n, temperature, max_tokens))
        ids = [int(c[1]["content"].split()[1]) for c in conversations]  # "Body <i> about compilers"
        if temperature == 0:
            return [[f"Greedy {i}"] for i in ids]
        return [[("unsupported " if (i, j) == (1, 0) else "") + f"Sample {i}.{j}" for j in range(n)] for i in ids]


def test_evaluate_generator_structure_and_rewards(server):
    gen, client = StubGenerator(), client_for(server)
    result = run(client, lambda c: evaluation.evaluate_generator(gen, ROWS[:2], c, StubValidator(), samples=2,
                                                            max_tokens=16, temperature=0.7))
    # one greedy call (temperature 0) and one sampled call, for all stories at once
    assert gen.calls == [(2, 1, 0.0, 16), (2, 2, 0.7, 16)]
    assert [s.title for s in result.greedy] == ["Greedy 0", "Greedy 1"]
    assert [[s.title for s in ss] for ss in result.sampled] == [["Sample 0.0", "Sample 0.1"],
                                                                ["unsupported Sample 1.0", "Sample 1.1"]]
    # every title scored in one batch request, rewards = len(title) when supported
    assert server.paths() == ["/score_batch"] and len(server.requests[0]["json"]["stories"]) == 6
    assert result.per_story_reward() == pytest.approx([(8 + 10 + 10) / 3, (8 + 0 + 10) / 3])
    row = evaluation.eval_metrics_row(result, method="eval", step=3, wall_time=1.0, run="r")
    assert tuple(row) == utils.METRICS_KEYS
    assert row["n"] == 6 and row["split"] == "val"
    assert row["extra"]["greedy_reward_mean"] == pytest.approx(8.0)
    assert row["extra"]["stories"] == 2
    records = result.records()
    assert [r["original"] for r in records] == ["Original 0", "Original 1"]
    json.dumps(records)
