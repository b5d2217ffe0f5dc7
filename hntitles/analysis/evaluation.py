"""Evaluation: the one validation procedure every policy, baseline and trainer goes through.

- `evaluate_generator`: for each story, one greedy title and `samples` sampled ones from any
  utils.Generator, each scored by the shared reward rule (utils.score_completions) -> `EvalResult`;
- `score_val`: the same from sync code, against the recipe's reward server;
- `score_titles`: given titles (the real ones: the reports' reference row) through the same rule;
- `eval_metrics_row`, `write_eval`, `read_eval`: the shared-schema row and eval/<label>.jsonl (the
  titles beside the originals), and back;
- `eval_summary`: one line for logs; `greedy_only`: the greedy part of an evaluation.

    python evaluate.py --recipe recipes/tiny.yaml --label before      # the stage that runs it
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import utils
from hntitles.analysis import stats
from hntitles.engines import generation
from hntitles.reward.text_metrics import rouge_l, template_share
from hntitles.runs import rundir
from hntitles.runs.settings import Recipe


@dataclass
class EvalResult:
    """Validation of one policy on some stories: a greedy title and `samples` sampled ones each."""

    greedy: list[utils.Scored]
    sampled: list[list[utils.Scored]]
    rows: list[dict]

    def per_story_reward(self) -> list[float]:
        """Mean reward per story over greedy + samples (the unit a bootstrap resamples)."""
        return [sum(s.reward for s in [g, *ss]) / (1 + len(ss))
                for g, ss in zip(self.greedy, self.sampled, strict=True)]

    def all_scored(self) -> list[utils.Scored]:
        return [s for g, ss in zip(self.greedy, self.sampled, strict=True) for s in (g, *ss)]

    def per_story_rouge_l(self) -> list[float]:
        """Mean ROUGE-L per story of its titles (greedy + samples) against the story's real title."""
        return [sum(rouge_l(s.title, str(r.get("title") or "")) for s in [g, *ss]) / (1 + len(ss))
                for r, g, ss in zip(self.rows, self.greedy, self.sampled, strict=True)]

    def independent(self) -> dict:
        """Metrics the reward never sees: ROUGE-L to the real titles and how much one template dominates."""
        rouge = self.per_story_rouge_l()
        share, top = template_share([s.title for s in self.all_scored()])
        orig_share, orig_top = template_share([str(r.get("title") or "") for r in self.rows])
        return {"rouge_l_mean": sum(rouge) / len(rouge) if rouge else float("nan"), "story_rouge_l": rouge,
                "template_share": share, "template_top": top,
                "original_template_share": orig_share, "original_template_top": orig_top}

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> EvalResult:
        """The inverse of records(): an evaluation read back from its eval/<label>.jsonl."""
        def scored(d: dict) -> utils.Scored:
            return utils.Scored(**{f.name: d[f.name] for f in dataclasses.fields(utils.Scored) if f.name in d})

        return cls(greedy=[scored(r["greedy"]) for r in records],
                   sampled=[[scored(s) for s in r["samples"]] for r in records],
                   rows=[{"id": r.get("id"), "title": r.get("original")} for r in records])

    def records(self) -> list[dict]:
        """One JSON-able record per story: original title beside what the policy wrote."""
        return [{"id": r.get("id"), "original": r.get("title"), "greedy": dataclasses.asdict(g),
                 "samples": [dataclasses.asdict(s) for s in ss], "story_reward": m}
                for r, g, ss, m in zip(self.rows, self.greedy, self.sampled, self.per_story_reward(), strict=True)]


async def evaluate_generator(generator: generation.Generator, rows: Sequence[dict], client: utils.RewardClient,
                             validator,
                             samples: int, max_tokens: int, temperature: float = 1.0,
                             trailing_penalty: float = 0.0, stop: Sequence[str] = ()) -> EvalResult:
    """The one validation procedure every method and baseline goes through."""
    rows = [dict(r) for r in rows]
    convs = [utils.title_messages(r["scraped_body"]) for r in rows]
    stop = tuple(stop)
    both = getattr(generator, "generate_greedy_and_sampled", None)  # one prefill per story (HFGenerator)
    if samples and both is not None:
        greedy, sampled = both(convs, n=samples, temperature=temperature, max_tokens=max_tokens, stop=stop)
    else:
        greedy = [c[0] for c in generator.generate(convs, n=1, temperature=0.0, max_tokens=max_tokens, stop=stop)]
        sampled = (generator.generate(convs, n=samples, temperature=temperature, max_tokens=max_tokens, stop=stop)
                   if samples else [[] for _ in rows])
    flat_rows = rows + [r for r, cs in zip(rows, sampled, strict=True) for _ in cs]
    flat = greedy + [c for cs in sampled for c in cs]
    scored = await utils.score_completions(client, validator, flat_rows, flat, trailing_penalty)
    g, rest = scored[:len(rows)], scored[len(rows):]
    per_story, i = [], 0
    for cs in sampled:
        per_story.append(rest[i:i + len(cs)])
        i += len(cs)
    return EvalResult(greedy=g, sampled=per_story, rows=rows)


def score_titles(recipe: Recipe, rows: Sequence[dict], titles: Sequence[str], validator) -> EvalResult:
    """Given titles (one per story, e.g. the real Hacker News ones) through the same validator,
    reward server and reward rule as every policy's: the reference row of a report."""
    async def work(client):
        scored = await utils.score_completions(client, validator, list(rows), list(titles), recipe.trailing_penalty)
        return EvalResult(greedy=scored, sampled=[[] for _ in rows], rows=[dict(r) for r in rows])

    return scored_with_server(recipe, work)


def eval_metrics_row(result: EvalResult, *, method: str, step: int, wall_time: float, run: str = "",
                     split: str = "val", extra: dict | None = None) -> dict:
    """Shared-schema row for a validation: stats over all titles; in extras the greedy mean, the
    per-story rewards (for bootstrap intervals) and the independent metrics (EvalResult.independent)."""
    greedy = stats.describe(s.reward for s in result.greedy)
    return utils.metrics_row(method=method, step=step, split=split, scored=result.all_scored(), wall_time=wall_time,
                       run=run, extra={"greedy_reward_mean": greedy["mean"], "stories": len(result.rows),
                                       "story_reward": result.per_story_reward(), **result.independent(),
                                       **(extra or {})})


def scored_with_server(recipe: Recipe, work) -> EvalResult:
    """`await work(client)` from sync code with a reward client on the recipe's server (checked by /health
    first, closed after): the one place evaluations open and close their client."""
    client = utils.RewardClient(recipe.reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)

    async def run():
        try:
            await client.health()
            return await work(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


def score_val(recipe: Recipe, generator: generation.Generator, val: Sequence[dict], validator) -> EvalResult:
    """The shared validation (evaluate_generator) against the recipe's reward server, from sync code."""
    return scored_with_server(recipe, lambda client: evaluate_generator(
        generator, list(val), client, validator, recipe.eval_samples, recipe.max_completion_tokens,
        recipe.temperature, recipe.trailing_penalty, utils.stop_strings(recipe)))


def write_eval(run_dir: str | os.PathLike, label: str, result: EvalResult, row: dict) -> Path:
    """The metrics row to <run_dir>/metrics.jsonl and the titles, beside the originals, to eval/<label>.jsonl."""
    rundir.MetricsWriter(run_dir).write(row)
    path = Path(run_dir) / "eval" / f"{label}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in result.records():
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def eval_summary(result: EvalResult) -> str:
    """One line: reward stats over all titles, match rate, title words, copy fraction, trailing text."""
    scored = result.all_scored()
    r = stats.describe(s.reward for s in scored)
    n = max(len(scored), 1)
    return (f"reward {r['mean']:.3f} ± {r['std']:.3f} (p5 {r['p5']:.3f}, median {r['median']:.3f}, "
            f"p95 {r['p95']:.3f}) over {len(result.rows)} stories x {n // max(len(result.rows), 1)} titles; "
            f"match {sum(s.matches for s in scored) / n:.0%}, words {sum(s.length for s in scored) / n:.1f}, "
            f"copy {sum(s.copy for s in scored) / n:.2f}, trailing {sum(s.trailing for s in scored) / n:.0%}")


def read_eval(run_dir: str | os.PathLike, label: str) -> EvalResult | None:
    """The evaluation written by write_eval to <run_dir>/eval/<label>.jsonl, or None when there is none."""
    path = Path(run_dir) / "eval" / f"{label}.jsonl"
    if not path.exists():
        return None
    return EvalResult.from_records([json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x])


def greedy_only(result: EvalResult) -> EvalResult:
    """The greedy part of an evaluation: what a greedy-only validation of the same policy scores."""
    return EvalResult(greedy=list(result.greedy), sampled=[[] for _ in result.rows], rows=list(result.rows))
