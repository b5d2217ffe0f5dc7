"""Reward server throughput on CPU: one batch request vs single requests, and HTTP overhead.

    python bench/reward_server.py                 # starts its own server (MiniLM) on a free port
    python bench/reward_server.py --prod          # the same against gunicorn (--prod --workers 1)

Ratios are measured in one run (these machines are shared and noisy; absolute times are not
comparable between runs, ratios within one run are). Ratios are medians over --repeats interleaved
repeats; "(scorer)" is the time the server spent inside the scorer (its Server-Timing header), and
"(outside scorer)" the rest of the same request (HTTP, JSON, validation) relative to it: unlike the
in-process comparison, it cannot be skewed by other processes' load between two measurements.

- batch speed-up: 64 single POST /score requests over one kept-alive connection, divided by one
  POST /score_batch of the same 64 stories (goal >= 10x);
- server overhead: one POST /score_batch of 64 stories vs MiniLMScorer.score on the same 64
  stories in this process with the same thread count (goal <= 15%).

Both are measured twice: "cold" (64 different bodies never seen: every body is embedded) and
"grpo" (16 bodies x 4 titles, the bodies already embedded, as in a GRPO step that revisits its
stories: the server caches body embeddings, so only titles are embedded).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


@dataclass
class BenchArgs:
    stories: str = field(default=str(ROOT / "data" / "stories.jsonl"), metadata={"help": "Stories to score (.jsonl)."})
    n: int = field(default=64, metadata={"help": "Stories per batch."})
    repeats: int = field(default=3, metadata={"help": "Repetitions per timing (the median is reported)."})
    prod: bool = field(default=False, metadata={
        "help": "Bench gunicorn (--prod --workers 1) instead of the Flask server."})
    torch_threads: int = field(default=1, metadata={"help": "Threads for scoring, in the server and in process alike."})
    startup_timeout: float = field(default=300.0, metadata={"help": "Seconds to wait for the server's /health."})


def load_rows(path: str) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if (r.get("scraped_body") or "").strip()]


def as_story(row: dict, title: str | None = None, nonce: str = "") -> dict:
    # A nonce appended to the body makes it a body the server has never embedded (a cold cache).
    return {"title": title or row["title"], "by": row["by"], "time": row["time"], "url": row.get("url") or "",
            "scraped_body": row["scraped_body"] + nonce}


def cold_batch(rows: list[dict], n: int, nonce: str) -> list[dict]:
    return [as_story(rows[i % len(rows)], nonce=f" [{nonce}]") for i in range(n)]


def grpo_batch(rows: list[dict], n: int, group: int = 4) -> list[dict]:
    picked = rows[: max(1, n // group)]
    suffixes = ["", ", explained", " (2024)", ": a retrospective"]
    return [as_story(r, title=r["title"] + suffixes[g % len(suffixes)]) for r in picked for g in range(group)][:n]


def timed(fn, stories: list[dict]) -> float:
    start = time.perf_counter()
    fn(stories)
    return time.perf_counter() - start


class ServerClient:
    """POSTs stories to the server; remembers the scorer time of the last batch (its Server-Timing header)."""

    def __init__(self, http):
        self.http = http
        self.last_score_ms = 0.0

    def post_batch(self, stories: list[dict]) -> None:
        r = self.http.post("/score_batch", json={"stories": stories})
        r.raise_for_status()
        assert len(r.json()["scores"]) == len(stories)
        self.last_score_ms = float(r.headers["Server-Timing"].split("dur=")[1])

    def post_singles(self, stories: list[dict]) -> None:
        for s in stories:
            r = self.http.post("/score", json=s)
            r.raise_for_status()


def measure(name: str, make, warm: bool, client: ServerClient, scorer, repeats: int) -> dict[str, float]:
    """One scenario's medians and ratios, keys prefixed with `name`; `make()` gives a fresh batch."""
    if warm:  # embed the bodies once, in the server and here
        client.post_batch(make())
        scorer.score(make())
    # Interleaved repeats: each repeat measures all three back to back, so a burst of load
    # from other processes hits one repeat's ratios rather than one column.
    batch, singles, inproc, in_server = [], [], [], []
    for _ in range(repeats):
        batch.append(timed(client.post_batch, make()))
        in_server.append(client.last_score_ms / 1000)
        singles.append(timed(client.post_singles, make()))
        inproc.append(timed(scorer.score, make()))
    return {
        f"{name}_batch_s": statistics.median(batch),
        f"{name}_singles_s": statistics.median(singles),
        f"{name}_inprocess_s": statistics.median(inproc),
        f"{name}_scorer_in_server_s": statistics.median(in_server),
        f"{name}_batch_speedup": statistics.median(s / b for s, b in zip(singles, batch, strict=True)),
        f"{name}_server_overhead": statistics.median(b / i - 1 for b, i in zip(batch, inproc, strict=True)),
        # The same request's own split (immune to load changing between measurements): everything
        # outside the scorer (HTTP, JSON, validation) over the time inside it.
        f"{name}_http_overhead": statistics.median(b / i - 1 for b, i in zip(batch, in_server, strict=True)),
    }


def print_report(results: dict[str, float], args: BenchArgs) -> None:
    print()
    print(f"{'':6s} {'batch req':>10s} {'(scorer)':>9s} {'singles':>9s} {'in-process':>11s} {'speed-up':>9s} "
          f"{'overhead':>9s} {'(outside scorer)':>17s}")
    for name in ("cold", "grpo"):
        r = {k.removeprefix(name + "_"): v for k, v in results.items() if k.startswith(name)}
        print(f"{name:6s} {r['batch_s']:9.3f}s {r['scorer_in_server_s']:8.3f}s {r['singles_s']:8.3f}s "
              f"{r['inprocess_s']:10.3f}s {r['batch_speedup']:8.1f}x {100 * r['server_overhead']:+8.1f}% "
              f"{100 * r['http_overhead']:+16.1f}%")
    print(f"\n{args.n} stories; batch speed-up goal >= 10x, server overhead goal <= 15%; "
          f"{args.repeats} repeats, medians; {'gunicorn' if args.prod else 'flask'} server.")
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


def main(args: BenchArgs) -> dict:
    import httpx
    import torch
    from servers import reward_server_process

    from hntitles.reward import scorers

    rows = load_rows(args.stories)
    torch.set_num_threads(args.torch_threads)
    print(f"loading the in-process scorer ({args.torch_threads} thread(s)) ...", flush=True)
    scorer = scorers.MiniLMScorer()
    server_args = ["--torch_threads", str(args.torch_threads), "--log_level", "warning"]
    if args.prod:
        server_args += ["--prod", "--workers", "1"]
    print(f"starting the server ({'gunicorn' if args.prod else 'flask'}) ...", flush=True)
    results: dict[str, float] = {}
    with (reward_server_process(args=server_args, timeout=args.startup_timeout) as url,
          httpx.Client(base_url=url, timeout=600) as http):
        client = ServerClient(http)
        client.post_batch(cold_batch(rows, 4, "warm-up"))  # first request pays lazy initialisation
        counter = iter(range(10**6))
        fresh = lambda: cold_batch(rows, args.n, f"run {next(counter)}")  # noqa: E731
        for name, make, warm in (("cold", fresh, False), ("grpo", lambda: grpo_batch(rows, args.n), True)):
            results.update(measure(name, make, warm, client, scorer, args.repeats))
    print_report(results, args)
    return results

if __name__ == "__main__":
    from transformers import HfArgumentParser

    (bench_args,) = HfArgumentParser(BenchArgs, description=__doc__.split("\n\n")[0]).parse_args_into_dataclasses()
    main(bench_args)
