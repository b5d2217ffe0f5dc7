"""Time CPU generation: HF generate (one prefill per row) vs one prefill per distinct prompt.

A GRPO group is `num_generations` copies of one prompt, and validation samples several titles
per story. TRL's transformers path and plain `model.generate` prefill every row;
`generation.generate_shared_prefix` (used by the TRL trainer on CPU and by evaluate.py)
prefills each distinct prompt once. Two shapes from the recipe, same model and prompts:

- train: `prompts_per_step` prompts x `num_generations` rows (one GRPO step's rollouts);
- eval: 8 val stories x `eval_samples` rows (one batch of evaluate.py's sampled titles).

Each shape runs `--rounds` times in the order plain, shared, shared, plain, ... (a load that drifts
hits both alike), sampling at the recipe's temperature with `max_completion_tokens` new tokens
and no early stop (so both paths decode the same number of tokens). Printed: the fastest wall
time and the median CPU time of each, and their ratios. One run, ratios.

    python bench/generation.py                       # recipes/cpu.yaml
    python bench/generation.py --threads 1 --rounds 4
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils
from hntitles.engines import generation
from hntitles.runs import procs, settings

EVAL_STORIES = 8  # evaluate.py's default batch of stories


@dataclass
class GenBenchArgs:
    recipe: str = field(default="recipes/cpu.yaml", metadata={"help": "Recipe whose model and shapes are timed."})
    rounds: int = field(default=2, metadata={
        "help": "Runs per path and shape, in the order plain, shared, shared, plain, ..."})
    threads: int = field(default=0, metadata={"help": "Torch CPU threads (0 = torch's default); 1 on a busy machine."})


def plain_generate(model, rows, pad_id: int, **kw):
    """What TRL's transformers path does: left-pad every row and call generate."""
    ids, mask = generation.left_pad(rows, pad_id)
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id, **kw)[:, ids.shape[1]:]


def time_call(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(args: GenBenchArgs) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    procs.set_threads(args.threads)
    recipe = settings.parse_args((settings.Recipe,), "trl", ["--recipe", args.recipe])[0]
    tok = AutoTokenizer.from_pretrained(recipe.model)
    model = AutoModelForCausalLM.from_pretrained(recipe.model).eval()
    val, _ = utils.load_split(recipe, recipe.val_split, tok, EVAL_STORIES)
    prompts = [tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for r in val]
    shapes = {"train": [p for p in prompts[:recipe.prompts_per_step] for _ in range(recipe.num_generations)],
              "eval": [p for p in prompts for _ in range(recipe.eval_samples)]}
    # min_new_tokens = max: both paths decode exactly as many tokens (no early EOS on either).
    kw = dict(max_new_tokens=recipe.max_completion_tokens, min_new_tokens=recipe.max_completion_tokens,
              do_sample=True, temperature=recipe.temperature, top_k=None, top_p=None)
    paths = {"plain": lambda rows: plain_generate(model, rows, tok.pad_token_id, **kw),
             "shared": lambda rows: generation.generate_shared_prefix(model, rows, tok.pad_token_id, **kw)}
    load0 = os.getloadavg()[0]
    with torch.inference_mode():
        paths["shared"](shapes["train"][:2])  # warm-up: allocator, lazy imports
        times = {(s, p): [] for s in shapes for p in paths}
        for shape, rows in shapes.items():
            for i in range(args.rounds):
                for name in (("plain", "shared") if i % 2 == 0 else ("shared", "plain")):
                    times[shape, name].append(time_call(lambda n=name, r=rows: paths[n](r)))
                    print(f"[{shape}] {name}: {times[shape, name][-1][0]:.2f}s wall", flush=True)
    lines = [f"generation on {Path(recipe.model).name}, {recipe.max_completion_tokens} new tokens, "
             f"T={recipe.temperature}; "
             f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load average {load0:.1f} -> "
             f"{os.getloadavg()[0]:.1f}; wall: fastest of {args.rounds}, CPU: median",
             f"{'shape':<34}{'plain wall s':>13}{'shared wall s':>14}{'speedup':>9}{'CPU speedup':>13}"]
    for shape, rows in shapes.items():
        (pw, pc), (sw, sc) = [(min(w for w, _ in times[shape, p]), statistics.median(c for _, c in times[shape, p]))
                              for p in paths]
        label = f"{shape}: {len(set(map(tuple, rows)))} prompts x {len(rows) // len(set(map(tuple, rows)))} rows"
        lines.append(f"{label:<34}{pw:>13.2f}{sw:>14.2f}{pw / sw:>8.2f}x{pc / sc:>12.2f}x")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    from transformers import HfArgumentParser

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(HfArgumentParser(GenBenchArgs, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()[0])
