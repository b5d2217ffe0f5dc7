"""Check a running reward server from the outside (what a trainer will see).

    make reward &                          # or: python local_reward.py --prod --workers 2
    python reward_local_test.py            # URL from REWARD_URL (.env) or http://127.0.0.1:7000
    python reward_local_test.py --url http://gpu-node-3:7000 --requests 50
    REWARD_API_KEY=... python reward_local_test.py --url http://host:7000

Checks: health, one story (OpenPipe's shape), a batch (same scores as one by one, in order),
a good title outscoring a bad one, bad requests getting a 4xx JSON error naming the field,
and (when REWARD_API_KEY is set) a request without the token getting 401. Prints latency
p50/p95 of single and batch requests. Exits 1 if any check fails, 2 if the server is unreachable.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hntitles.runs import settings

BODY = ("We moved our CI from a hosted service to four self-hosted runners on spare office machines. "
        "Builds got 2.4x faster, our monthly bill fell from $14,112 to $1,870, and flaky tests dropped "
        "because every runner now has the same toolchain. Here is what broke along the way and what we "
        "would do differently.")
GOOD = {"title": "How we cut our CI bill by 87% with self-hosted runners", "by": "polaris_eng",
        "time": "2024-03-14T09:30:00Z", "scraped_body": BODY, "url": "https://polaris.dev/blog/ci"}
BAD_TITLES = ["YOU WON'T BELIEVE WHAT HAPPENED TO OUR CI!!! 🤯",
              "We moved our CI from a hosted service to four self-hosted runners on spare office machines."]


@dataclass
class CheckArgs:
    url: str = field(default="", metadata={
        "help": "Server base URL (default: REWARD_URL from the environment/.env, else http://127.0.0.1:7000)."})
    requests: int = field(default=20, metadata={"help": "Requests timed for the latency percentiles."})
    batch_size: int = field(default=16, metadata={"help": "Stories per timed batch request."})
    timeout: float = field(default=60.0, metadata={"help": "Seconds per request."})


def parse_args(argv: list[str] | None = None) -> CheckArgs:
    from transformers import HfArgumentParser

    settings.load_env()
    (args,) = HfArgumentParser(CheckArgs, description=__doc__.split("\n\n")[0]).parse_args_into_dataclasses(args=argv)
    args.url = (args.url or os.environ.get("REWARD_URL") or settings.DEFAULT_REWARD_URL).rstrip("/")
    return args


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Checker:
    def __init__(self, args: CheckArgs):
        import httpx

        self.args = args
        self.key = os.environ.get("REWARD_API_KEY") or ""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self.http = httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers)
        self.failures: list[str] = []

    def check(self, name: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
            print(f"PASS  {name}: {detail}")
        except Exception as e:  # any failure is reported and counted, then the next check runs
            self.failures.append(name)
            print(f"FAIL  {name}: {type(e).__name__}: {e}")

    def score(self, story: dict) -> float:
        r = self.http.post("/score", json=story)
        assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
        value = r.json()["score"]
        assert isinstance(value, (int, float)) and math.isfinite(value), f"score {value!r} is not a finite number"
        return float(value)

    def health(self) -> str:
        r = self.http.get("/health")
        assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
        body = r.json()
        assert body.get("status") == "ok", body
        return f"scorer={body.get('scorer')} model={body.get('model')} version={body.get('version')}"

    def single(self) -> str:
        return f"score={self.score(GOOD):.4f}"

    def batch(self) -> str:
        stories = [GOOD, *({**GOOD, "title": t} for t in BAD_TITLES)]
        r = self.http.post("/score_batch", json={"stories": stories})
        assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
        scores = r.json()["scores"]
        singles = [self.score(s) for s in stories]
        assert len(scores) == len(stories), f"{len(scores)} scores for {len(stories)} stories"
        assert all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(scores, singles, strict=True)), \
            f"batch {scores} != one by one {singles}"
        return "scores " + ", ".join(f"{s:.4f}" for s in scores) + " (match one-by-one, in order)"

    def good_beats_bad(self) -> str:
        good = self.score(GOOD)
        bad = [self.score({**GOOD, "title": t}) for t in BAD_TITLES]
        assert all(good > b for b in bad), f"good {good:.4f} vs bad {bad}"
        return f"good {good:.4f} > shouting {bad[0]:.4f}, copied sentence {bad[1]:.4f}"

    def bad_requests(self) -> str:
        cases = [("/score", b"{not json", "request"),
                 ("/score", b'{"title": "", "by": "a", "time": "2024-01-01", "scraped_body": "b"}', "title"),
                 ("/score", b'{"title": "t", "by": "a", "time": "tomorrow", "scraped_body": "b"}', "time"),
                 ("/score_batch", b'{"stories": []}', "stories")]
        for path, payload, expected_field in cases:
            r = self.http.post(path, content=payload, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, f"{path} {payload[:40]!r}: HTTP {r.status_code}"
            assert r.json().get("field") == expected_field, f"{path}: {r.text[:200]}"
        assert self.http.get("/health").status_code == 200, "server unhealthy after bad requests"
        return f"{len(cases)} bad requests -> 4xx JSON naming the field; still healthy"

    def auth(self) -> str:
        import httpx

        r = httpx.post(self.args.url + "/score", json=GOOD, timeout=self.args.timeout)
        assert r.status_code == 401, f"no token -> HTTP {r.status_code}, expected 401"
        return "request without the bearer token -> 401"

    def latency(self) -> str:
        single, batch = [], []
        stories = [{**GOOD, "title": f"{GOOD['title']} ({i})"} for i in range(self.args.batch_size)]
        for i in range(self.args.requests):
            t = time.perf_counter()
            self.score({**GOOD, "title": f"Self-hosted CI runners, take {i}"})
            single.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = self.http.post("/score_batch", json={"stories": stories})
            batch.append(time.perf_counter() - t)
            assert r.status_code == 200, f"HTTP {r.status_code}"
        ms = lambda v: f"{1000 * v:.1f} ms"  # noqa: E731
        return (f"single p50 {ms(statistics.median(single))} p95 {ms(percentile(single, 95))}; "
                f"batch of {self.args.batch_size} p50 {ms(statistics.median(batch))} p95 {ms(percentile(batch, 95))} "
                f"({self.args.requests} requests each)")


def main(args: CheckArgs) -> int:
    import httpx

    checker = Checker(args)
    print(f"checking {args.url} (auth {'on' if checker.key else 'off'})")
    try:
        checker.http.get("/health")
    except httpx.TransportError as e:
        print(f"FAIL  unreachable: {type(e).__name__}: {e}; start it with `make reward`")
        return 2
    checker.check("health", checker.health)
    checker.check("single", checker.single)
    checker.check("batch", checker.batch)
    checker.check("good title beats bad", checker.good_beats_bad)
    checker.check("bad requests", checker.bad_requests)
    if checker.key:
        checker.check("auth", checker.auth)
    checker.check("latency", checker.latency)
    checker.http.close()
    if checker.failures:
        print(f"{len(checker.failures)} check(s) failed: {', '.join(checker.failures)}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
