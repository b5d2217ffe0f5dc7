"""Time an in-training validation's generation: ART's loop through its CPU engine's server against TRL's.

A validation during training writes one greedy title per val story (the demo's curve points). Both
trainers hand the same stories to evaluation.evaluate_generator; only the generator differs:

- trl: the TRL trainer's in-process HFGenerator (batches of 8 stories, one `generate` each);
- art: ART's path, the OpenAI-compatible client (hntitles/engines/openai_generator.py, one request
  per story, each with its own seed, 16 in flight) against the CPU engine's server
  (hntitles/art/cpu_server.py), which batches waiting greedy requests into one generation;
- art, one request at a time: the same client and server with one request in flight, i.e. one
  generation per story: what the server did before greedy requests with different seeds could
  share a batch (their seeds made every request a batch of its own).

Same model (the recipe's, with a fresh LoRA), same prompts, same `max_completion_tokens` and stop
strings. Each path runs `--rounds` times in the order trl, art, art, trl, ... (a drifting load hits
both alike); printed: the fastest wall time of each path and its ratio to TRL's. Reward scoring is
the same call in both trainers and is not timed here.

    python bench/validation.py                   # recipes/cpu.yaml's val stories
    python bench/validation.py --rounds 4 --threads 1
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils
from hntitles.analysis import experiment
from hntitles.engines import generation
from hntitles.runs import procs


@dataclass
class ValBenchArgs:
    recipe: str = field(default="recipes/cpu.yaml", metadata={"help": "Recipe: model, val stories, caps."})
    rounds: int = field(default=2, metadata={"help": "Runs per path, in the order trl, art, art, trl, ..."})
    threads: int = field(default=0, metadata={"help": "Torch CPU threads (0 = torch's default); 1 on a busy machine."})


def main(args: ValBenchArgs) -> dict[str, float]:
    from hntitles.art import compat

    # ---- The recipe's model served by ART's CPU engine, and the val prompts
    procs.set_threads(args.threads)
    recipe = experiment.load_recipe(args.recipe)
    compat.import_art()
    from hntitles.art import cpu_backend
    from hntitles.engines.openai_generator import OpenAIGenerator

    service = cpu_backend.CpuModelService("bench", recipe.model, {"peft_args": {
        "r": recipe.lora_r, "lora_alpha": recipe.lora_alpha, "target_modules": list(recipe.lora_target_modules)}},
        tempfile.mkdtemp(prefix="bench-val-"))
    host, port = asyncio.run(service.start_openai_server(None))
    val, _ = utils.load_split(recipe, recipe.val_split, service.tokenizer, recipe.max_val_stories)
    conversations = [r["prompt"] for r in val]
    stop = utils.stop_strings(recipe)

    # ---- The three generators over the same policy
    served = f"{service.model_name}@{service.step}"
    url = f"http://{host}:{port}/v1"
    paths = {
        "trl": generation.HFGenerator(service.model, service.tokenizer, 8, progress=False),
        "art": OpenAIGenerator(served, url, "EMPTY", concurrency=16, progress=False, seed=7),
        "art, one request at a time": OpenAIGenerator(served, url, "EMPTY", concurrency=1, progress=False, seed=7),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    order = [*paths, *reversed(paths)] * args.rounds
    try:
        for name in order[:len(paths) * args.rounds]:
            t0 = time.perf_counter()
            paths[name].generate(conversations, 1, 0.0, recipe.max_completion_tokens, stop)
            times[name].append(time.perf_counter() - t0)
    finally:
        service.close()

    # ---- Fastest of each, as a ratio of TRL's
    best = {name: min(t) for name, t in times.items()}
    print(f"greedy validation of {len(conversations)} val stories ({recipe.model}, {recipe.max_completion_tokens} "
          f"new tokens at most), fastest of {args.rounds}:")
    for name, sec in best.items():
        print(f"  {name:28s} {sec:6.1f} s   {sec / best['trl']:.2f}x TRL")
    return best


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(ValBenchArgs, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()[0])
