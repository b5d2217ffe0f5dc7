"""Score a base model or a trained adapter on the val split, the way training validates.

Every story gets one greedy title and `eval_samples` sampled titles; each goes through the
same validator, reward server and reward rule as training. One row in the shared metrics
schema goes to <run_dir>/metrics.jsonl and the titles, beside the originals, to
<run_dir>/eval/<label>.jsonl. Needs the reward server (`make reward`).

    python evaluate.py --recipe recipes/cpu.yaml --label before
    python evaluate.py --recipe recipes/cpu.yaml --adapter runs/trl-cpu-aligned/final --label after
    make eval ARGS="--adapter runs/trl-cpu-aligned/final"
    python evaluate.py --generator openai --openai_model gpt-4o-mini --run_name prompted-gpt-4o-mini  # .env: OPENAI_*
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import utils
from hntitles.analysis import evaluation
from hntitles.engines import policy
from hntitles.runs import rundir, runtime, settings


@dataclass
class EvalArgs:
    adapter: str = field(default="", metadata={"help": "PEFT adapter folder (a checkpoint); empty = the base model."})
    label: str = field(default="eval", metadata={"help": "Name of this evaluation (file eval/<label>.jsonl)."})
    step: int = field(default=0, metadata={"help": "Step recorded in the metrics row."})
    method: str = field(default="eval", metadata={"help": "Method recorded in the metrics row."})
    batch_size: int = field(default=8, metadata={"help": "Stories per generate() call."})
    generator: str = field(default="hf", metadata={
        "help": "'hf' (recipe model + adapter) or 'openai' (an OpenAI-compatible endpoint, see openai_generator)."})
    openai_model: str = field(default="", metadata={"help": "Model for --generator openai (default: OPENAI_MODEL)."})
    openai_base_url: str = field(default="", metadata={
        "help": "Endpoint for --generator openai (default: OPENAI_BASE_URL)."})


def main(recipe: settings.Recipe, args: EvalArgs) -> evaluation.EvalResult:
    settings.set_seed(recipe.seed)
    if args.generator == "openai":
        return main_openai(recipe, args)
    if args.generator != "hf":
        raise SystemExit(f"unknown --generator {args.generator!r} (use hf or openai)")
    result, path = policy.evaluate_policy(recipe, args.adapter, args.label, args.method, args.step, args.batch_size)
    run_dir = path.parent.parent
    print(f"[{args.label}] {evaluation.eval_summary(result)}")
    for rec in result.records()[:3]:
        print(f"  original: {rec['original']}\n  greedy:   {rec['greedy']['title']}")
    print(f"titles -> {path}; metrics -> {run_dir / rundir.METRICS_FILE}")
    return result


def main_openai(recipe: settings.Recipe, args: EvalArgs) -> evaluation.EvalResult:
    """The same validation with titles from an OpenAI-compatible endpoint (a prompted baseline).

    The recipe's tokenizer still picks the val stories (same length filter, same stories as
    the trained policies); the recipe's model is loaded only if the validator needs it.
    """
    from hntitles.engines.openai_generator import OpenAIGenerator, OpenAIGeneratorError

    if args.adapter:
        raise SystemExit("--adapter applies to --generator hf only")
    try:
        generator = OpenAIGenerator(args.openai_model or None, args.openai_base_url or None)
    except OpenAIGeneratorError as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer, validator = policy.scoring_tools(recipe)
    val, report = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
    print(report.summary())
    timer = rundir.Timer()
    try:
        result = evaluation.score_val(recipe, generator, val, validator)
    except (OpenAIGeneratorError, utils.RewardServerError) as e:
        raise SystemExit(f"error: {e}") from None
    run_dir = rundir.run_dir_for(recipe, "eval")
    usage = generator.usage_summary()
    row = evaluation.eval_metrics_row(result, method="openai" if args.method == "eval" else args.method, step=args.step,
                                 wall_time=timer(), run=run_dir.name,
                                 extra={"label": args.label, "model": generator.model, "generator": "openai",
                                        "base_url": generator.base_url,
                                        "completion_tokens": usage["completion_tokens"],
                                        "tokens_per_s": usage["completion_tokens_per_s"]})
    path = evaluation.write_eval(run_dir, args.label, result, row)
    print(f"[{args.label}] {generator.name}: {evaluation.eval_summary(result)}")
    print(f"titles -> {path}; metrics -> {run_dir / rundir.METRICS_FILE}")
    return result


if __name__ == "__main__":
    t0 = time.time()
    recipe, eval_args = settings.parse_args((settings.Recipe, EvalArgs), "eval", description=__doc__.splitlines()[0])
    try:
        main(recipe, eval_args)
    except (settings.HubUnavailable, utils.RewardServerError) as e:
        raise SystemExit(f"error: {e}") from None
    except rundir.CheckpointError as e:
        print(f"error: {e} (exit {runtime.EXIT_NO_CHECKPOINT})", file=sys.stderr)
        raise SystemExit(runtime.EXIT_NO_CHECKPOINT) from None
    print(f"done in {time.time() - t0:.0f}s")
