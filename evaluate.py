"""Score a base model or a trained adapter on the val split, the way training validates.

Every story gets one greedy title and `eval_samples` sampled titles; each goes through the
same validator, reward server and reward rule as training. One row in the shared metrics
schema goes to <run_dir>/metrics.jsonl and the titles, beside the originals, to
<run_dir>/eval/<label>.jsonl. Needs the reward server (`make reward`).

    python evaluate.py --recipe recipes/cpu.yaml --label before
    python evaluate.py --recipe recipes/cpu.yaml --adapter runs/trl-cpu/checkpoint-20 --label after
    make eval ARGS="--adapter runs/trl-cpu/checkpoint-20"
    python evaluate.py --generator openai --openai_model gpt-4o-mini --run_name prompted-gpt-4o-mini  # .env: OPENAI_*
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fast_backend
import utils


@dataclass
class EvalArgs:
    adapter: str = field(default="", metadata={"help": "PEFT adapter folder (a checkpoint); empty = the base model."})
    label: str = field(default="eval", metadata={"help": "Name of this evaluation (file eval/<label>.jsonl)."})
    step: int = field(default=0, metadata={"help": "Step recorded in the metrics row."})
    method: str = field(default="eval", metadata={"help": "Method recorded in the metrics row."})
    batch_size: int = field(default=8, metadata={"help": "Stories per generate() call."})
    generator: str = field(default="hf", metadata={"help": "'hf' (recipe model + adapter) or 'openai' (an OpenAI-compatible endpoint, see openai_generator.py)."})
    openai_model: str = field(default="", metadata={"help": "Model for --generator openai (default: OPENAI_MODEL)."})
    openai_base_url: str = field(default="", metadata={"help": "Endpoint for --generator openai (default: OPENAI_BASE_URL)."})


class HFGenerator:
    """utils.Generator over a transformers model (optionally with a PEFT adapter), batched."""

    def __init__(self, model, tokenizer, batch_size: int = 8, name: str = "hf", progress: bool = True):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.progress = progress
        tokenizer.padding_side = "left"  # decoder-only generation pads on the left

    def generate(self, conversations: Sequence[list[dict]], n: int, temperature: float,
                 max_tokens: int, stop: Sequence[str] = ()) -> list[list[str]]:
        import torch
        from tqdm.auto import tqdm

        eos = {}
        if stop:  # EOS or any token holding a stop string ends a row
            eos = {"eos_token_id": [self.tokenizer.eos_token_id, *utils.stop_token_ids(self.tokenizer, stop)]}
        out: list[list[str]] = []
        greedy = temperature <= 0
        batches = range(0, len(conversations), self.batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            for i in tqdm(batches, desc=f"generate n={n}{' greedy' if greedy else ''}", disable=not self.progress, leave=False):
                convs = list(conversations[i:i + self.batch_size])
                texts = self.tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
                ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
                with torch.inference_mode():
                    # The n titles of a story share one prefill of its prompt (fast_backend).
                    gen = fast_backend.generate_shared_prefix(
                        self.model, [p for p in ids for _ in range(n)], self.tokenizer.pad_token_id,
                        max_new_tokens=max_tokens, do_sample=not greedy,
                        temperature=temperature if not greedy else None, top_p=None, top_k=None, **eos)
                texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
                out.extend(texts[j * n:(j + 1) * n] for j in range(len(convs)))
        finally:
            self.model.train(was_training)
        return out


class ModelValidator:
    """The original validator: the base model (adapter disabled) answers True/False."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.unparsed = 0  # answers that were neither True nor False (counted as not supported)

    def __call__(self, bodies: Sequence[str], titles: Sequence[str]) -> list[bool]:
        gen = HFGenerator(self.model, self.tokenizer, self.batch_size, progress=False)
        convs = [utils.validator_messages(b, t) for b, t in zip(bodies, titles, strict=True)]
        disable = getattr(self.model, "disable_adapter", None)
        with disable() if disable else contextlib.nullcontext():
            answers = [a[0] for a in gen.generate(convs, n=1, temperature=0.0, max_tokens=3)]
        parsed = [utils.parse_validator_answer(a) for a in answers]
        self.unparsed += sum(p is None for p in parsed)
        return [bool(p) for p in parsed]


def make_validator(recipe: utils.Recipe, model=None, tokenizer=None):
    """The validator a recipe asks for: 'embedding' (CPU), 'model' (needs the policy) or 'none'."""
    if recipe.validator == "embedding":
        return utils.EmbeddingValidator(recipe.validator_threshold)
    if recipe.validator == "model":
        if model is None:
            raise ValueError("validator 'model' needs the policy model and tokenizer")
        return ModelValidator(model, tokenizer)
    if recipe.validator == "none":
        return None
    raise ValueError(f"unknown validator {recipe.validator!r} (use embedding, model or none)")


def load_policy(model_id: str, adapter: str = ""):
    """Model (+ adapter) and tokenizer, fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise SystemExit(f"{adapter}: no adapter_config.json (pass a checkpoint folder with a PEFT adapter)")
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def write_eval(run_dir: Path, label: str, result: utils.EvalResult, row: dict) -> Path:
    utils.MetricsWriter(run_dir).write(row)
    path = Path(run_dir) / "eval" / f"{label}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in result.records():
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def summary(result: utils.EvalResult) -> str:
    scored = result.all_scored()
    r = utils.stats(s.reward for s in scored)
    n = max(len(scored), 1)
    return (f"reward {r['mean']:.3f} ± {r['std']:.3f} (p5 {r['p5']:.3f}, median {r['median']:.3f}, "
            f"p95 {r['p95']:.3f}) over {len(result.rows)} stories x {n // max(len(result.rows), 1)} titles; "
            f"match {sum(s.matches for s in scored) / n:.0%}, words {sum(s.length for s in scored) / n:.1f}, "
            f"copy {sum(s.copy for s in scored) / n:.2f}, trailing {sum(s.trailing for s in scored) / n:.0%}")


def score_val(recipe: utils.Recipe, generator, val, validator) -> utils.EvalResult:
    """The shared validation (utils.evaluate_generator) against the recipe's reward server."""
    client = utils.RewardClient(recipe.reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)

    async def run():
        try:
            await client.health()
            return await utils.evaluate_generator(
                generator, list(val), client, validator, recipe.eval_samples,
                recipe.max_completion_tokens, recipe.temperature, recipe.trailing_penalty, utils.stop_strings(recipe))
        finally:
            await client.aclose()

    return asyncio.run(run())


def main(recipe: utils.Recipe, args: EvalArgs) -> utils.EvalResult:
    utils.set_seed(recipe.seed)
    if args.generator == "openai":
        return main_openai(recipe, args)
    if args.generator != "hf":
        raise SystemExit(f"unknown --generator {args.generator!r} (use hf or openai)")
    model, tokenizer = load_policy(recipe.model, args.adapter)
    val, report = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
    print(report.summary())
    validator = make_validator(recipe, model, tokenizer)
    timer = utils.Timer()
    result = score_val(recipe, HFGenerator(model, tokenizer, args.batch_size), val, validator)
    run_dir = utils.run_dir_for(recipe, "eval")
    row = utils.eval_metrics_row(result, method=args.method, step=args.step, wall_time=timer(),
                                 run=run_dir.name, extra={"label": args.label, "adapter": args.adapter,
                                                          "model": recipe.model})
    path = write_eval(run_dir, args.label, result, row)
    print(f"[{args.label}] {summary(result)}")
    for rec in result.records()[:3]:
        print(f"  original: {rec['original']}\n  greedy:   {rec['greedy']['title']}")
    print(f"titles -> {path}; metrics -> {run_dir / utils.METRICS_FILE}")
    return result


def main_openai(recipe: utils.Recipe, args: EvalArgs) -> utils.EvalResult:
    """The same validation with titles from an OpenAI-compatible endpoint (a prompted baseline).

    The recipe's tokenizer still picks the val stories (same length filter, same stories as
    the trained policies); the recipe's model is loaded only if the validator needs it.
    """
    from openai_generator import OpenAIGenerator, OpenAIGeneratorError

    if args.adapter:
        raise SystemExit("--adapter applies to --generator hf only")
    try:
        generator = OpenAIGenerator(args.openai_model or None, args.openai_base_url or None)
    except OpenAIGeneratorError as e:
        raise SystemExit(f"error: {e}") from None
    if recipe.validator == "model":
        model, tokenizer = load_policy(recipe.model)
    else:
        from transformers import AutoTokenizer

        model, tokenizer = None, AutoTokenizer.from_pretrained(recipe.model)
    val, report = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
    print(report.summary())
    validator = make_validator(recipe, model, tokenizer)
    timer = utils.Timer()
    try:
        result = score_val(recipe, generator, val, validator)
    except (OpenAIGeneratorError, utils.RewardServerError) as e:
        raise SystemExit(f"error: {e}") from None
    run_dir = utils.run_dir_for(recipe, "eval")
    usage = generator.usage_summary()
    row = utils.eval_metrics_row(result, method="openai" if args.method == "eval" else args.method, step=args.step,
                                 wall_time=timer(), run=run_dir.name,
                                 extra={"label": args.label, "model": generator.model, "generator": "openai",
                                        "base_url": generator.base_url,
                                        "completion_tokens": usage["completion_tokens"],
                                        "tokens_per_s": usage["completion_tokens_per_s"]})
    path = write_eval(run_dir, args.label, result, row)
    print(f"[{args.label}] {generator.name}: {summary(result)}")
    print(f"titles -> {path}; metrics -> {run_dir / utils.METRICS_FILE}")
    return result


if __name__ == "__main__":
    t0 = time.time()
    recipe, eval_args = utils.parse_args((utils.Recipe, EvalArgs), "eval", description=__doc__.splitlines()[0],
                                         default_recipe="recipes/cpu.yaml")
    main(recipe, eval_args)
    print(f"done in {time.time() - t0:.0f}s")
