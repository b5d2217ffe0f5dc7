"""Time an evaluation's generation as the recipe sets it now against the evaluation it replaced.

Every evaluation (`make eval`, the demo's baseline and adapters, the study's runs) writes one greedy
and `eval_samples` sampled titles per val story (evaluation.evaluate_generator). On a CPU its cost is
mostly prefill: a ~430-token prompt per story, against at most 24 new tokens. Timed here, on the
recipe's model and val stories:

- before: the first `--before_stories` stories (12) x (1 + `--before_samples` (4)) titles, in two
  passes, greedy then sampled, each prefilling every prompt (what an evaluation did until 2026-12-07);
- now: the recipe's stories (all 16) x (1 + eval_samples (3)) titles, one prefill per story for both
  (HFGenerator.generate_greedy_and_sampled: the same titles as the two passes under the same seed,
  tests/test_fast_backend.py);
- the same two shapes of an in-training curve point (greedy titles only, one pass: more stories cost
  more there, nothing shares a prefill).

Each shape runs `--rounds` times in the order before, now, now, before, ... (a drifting load hits
both alike); printed: the fastest wall time of each and the ratio now / before. Reward scoring is
not timed (the reward server embeds each body once, whatever the number of titles).

    python bench/evaluation.py                      # recipes/cpu.yaml
    python bench/evaluation.py --rounds 3 --threads 1
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils
from hntitles.analysis import experiment
from hntitles.engines import generation, policy
from hntitles.runs import procs, settings


@dataclass
class EvalBenchArgs:
    recipe: str = field(default="recipes/cpu.yaml", metadata={"help": "Recipe: model, val stories, eval_samples."})
    before_stories: int = field(default=12, metadata={"help": "Val stories of the evaluation it replaced."})
    before_samples: int = field(default=4, metadata={"help": "Sampled titles per story of the evaluation it replaced."})
    rounds: int = field(default=2, metadata={"help": "Runs per shape, in the order before, now, now, before, ..."})
    threads: int = field(default=0, metadata={"help": "Torch CPU threads (0 = torch's default); 1 on a busy machine."})


def main(args: EvalBenchArgs) -> dict[str, float]:
    # ---- The recipe's model and val stories
    procs.set_threads(args.threads)
    recipe = experiment.load_recipe(args.recipe)
    model, tokenizer = policy.load_model(recipe.model)
    val, _ = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
    convs = [utils.title_messages(r["scraped_body"]) for r in val]
    old = convs[:args.before_stories]
    gen = generation.HFGenerator(model, tokenizer, 8, progress=False)
    cap, stop, temp = recipe.max_completion_tokens, utils.stop_strings(recipe), recipe.temperature

    def two_passes():
        gen.generate(old, 1, 0.0, cap, stop)
        gen.generate(old, args.before_samples, temp, cap, stop)

    shapes = {
        "evaluation": {
            f"before: {len(old)} x (1 + {args.before_samples}), two passes": two_passes,
            f"now: {len(convs)} x (1 + {recipe.eval_samples}), one prefill":
                lambda: gen.generate_greedy_and_sampled(convs, recipe.eval_samples, temp, cap, stop)},
        "curve point (greedy)": {
            f"before: {len(old)} stories": lambda: gen.generate(old, 1, 0.0, cap, stop),
            f"now: {len(convs)} stories": lambda: gen.generate(convs, 1, 0.0, cap, stop)},
    }

    # ---- Each shape, alternating before and now
    settings.set_seed(recipe.seed)
    gen.generate(convs[:1], 1, 0.0, cap, stop)  # warm-up: the first forward pass allocates
    best: dict[str, float] = {}
    for pair in shapes.values():
        names = list(pair)
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in ([*names, *reversed(names)] * args.rounds)[:2 * args.rounds]:
            t0 = time.perf_counter()
            pair[name]()
            times[name].append(time.perf_counter() - t0)
        best.update({name: min(t) for name, t in times.items()})

    # ---- Fastest of each, now / before
    print(f"evaluation generation ({recipe.model}, {cap} new tokens at most, T={temp}), fastest of {args.rounds}:")
    for shape, pair in shapes.items():
        before, now = list(pair)
        print(f"  {shape}:")
        print(f"    {before:40s} {best[before]:6.1f} s")
        print(f"    {now:40s} {best[now]:6.1f} s   {best[now] / best[before]:.2f}x before")
    return best


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(EvalBenchArgs, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()[0])
