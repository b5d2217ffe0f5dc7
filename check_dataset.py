"""Load the configured dataset and report what a trainer would get from it.

For the train and val splits: rows, empty fields, prompt lengths in tokens (chat template
included, measured with the recipe model's tokenizer), how many rows each filter drops and
why, rows kept against the recipe's caps, and two sample prompts. A dataset that cannot be
loaded or lacks a required field exits non-zero with one line naming the file, row and field.

    python check_dataset.py --recipe recipes/cpu.yaml                 # the shipped stories
    python check_dataset.py --recipe recipes/cpu.yaml --dataset my_stories.parquet
    python check_dataset.py --recipe recipes/gpu.yaml                 # the hub dataset (needs the Hub)
    make check RECIPE=recipes/tiny.yaml ARGS="--samples 1"
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import utils
from hntitles.runs import settings


@dataclass
class CheckArgs:
    samples: int = field(default=2, metadata={"help": "Sample prompts to print (kept train rows first, then val)."})
    sample_chars: int = field(default=300, metadata={"help": "Article characters shown per sample prompt."})
    json_out: str = field(default="", metadata={"help": "Also write the report as JSON to this file."})


class CheckError(RuntimeError):
    """Something other than the rows themselves is wrong (tokenizer, hub access)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """A library's (often multi-line) message as one line, for a one-line error."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise CheckError(f"cannot load the tokenizer of {model}: no such folder (run `make setup` for models/)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:  # hub id offline, folder without tokenizer files, ...
        hint = " (the Hub is unreachable or HF_HUB_OFFLINE=1; set MODEL or --model to a local folder)" \
            if not Path(model).exists() else ""
        raise CheckError(f"cannot load the tokenizer of {model}{hint}: {first_line(e)}") from None
    if not tokenizer.chat_template:
        raise CheckError(f"{model}: tokenizer has no chat template; prompts are measured with it")
    return tokenizer


def load_split(source: str, split: str):
    """utils.load_stories, with hub and reader failures turned into one-line errors."""
    try:
        return utils.load_stories(source, split)
    except utils.DatasetError:
        raise
    except ConnectionError as e:  # datasets raises this both offline and without network
        raise CheckError(f"{source}: cannot reach the Hugging Face Hub ({e}); set DATASET or --dataset "
                         f"to a local .jsonl/.parquet file or folder (default: {settings.DEFAULT_DATASET})") from None
    except (OSError, ValueError) as e:  # unknown hub id or split, unreadable parquet, ...
        raise CheckError(f"{source}: cannot load split '{split}': {type(e).__name__}: {first_line(e)}") from None


def empty_fields(ds) -> dict[str, int]:
    """Per required field, rows whose value is None or blank text."""
    out = {}
    for name in utils.STORY_FIELDS:
        out[name] = sum(v is None or (isinstance(v, str) and not v.strip()) for v in ds[name])
    return out


def distribution(values: list[int]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"n": 0, "p50": 0, "p95": 0, "max": 0}
    p50, p95 = np.percentile(values, [50, 95])
    return {"n": len(values), "p50": float(p50), "p95": float(p95), "max": int(max(values))}


def quiet(fn, *args):
    """Run `fn` without datasets' per-operation progress bars (noise in a report; downloads keep theirs)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return fn(*args)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def check_split(ds, split: str, tokenizer, recipe: settings.Recipe, cap: int) -> tuple[dict, object, list[str]]:
    """Report for one split, the filtered rows (a trainer takes the first `used`) and all ids."""
    ids = [str(i) for i in ds["id"]]
    kept, report = quiet(utils.filter_stories, ds, tokenizer, split, recipe.min_score, recipe.max_prompt_tokens)
    used = min(cap, report.rows_out) if cap else report.rows_out
    info = {
        "split": split,
        "rows": len(ds),
        "empty_fields": empty_fields(ds),
        "duplicate_ids": sorted(i for i, n in Counter(ids).items() if n > 1),
        "prompt_tokens_measured": distribution(report.measured_tokens),
        "prompt_tokens_kept": distribution(report.prompt_tokens),
        "dropped": dict(report.dropped),
        "kept": report.rows_out,
        "cap": cap,
        "used": used,
    }
    return info, kept, ids


def format_split(info: dict, cap_name: str) -> str:
    empty = ", ".join(f"{k} {v}" for k, v in info["empty_fields"].items() if v) or "none"
    m, k = info["prompt_tokens_measured"], info["prompt_tokens_kept"]
    dropped = ", ".join(f"{reason}: {n}" for reason, n in info["dropped"].items())
    cap = info["cap"]
    if not cap:
        capped = f"{cap_name}=0 (all) -> trainer gets {info['used']}"
    elif cap < info["kept"]:
        capped = f"{cap_name}={cap} -> trainer gets the first {info['used']} of {info['kept']}"
    else:
        capped = f"{cap_name}={cap} -> trainer gets all {info['used']} (fewer than the cap)"
    lines = [
        f"[{info['split']}] {info['rows']} rows",
        f"  empty fields: {empty}",
        f"  prompt tokens, chat template included ({m['n']} measured): "
        f"p50 {m['p50']:.0f}, p95 {m['p95']:.0f}, max {m['max']}",
        f"  prompt tokens of kept rows ({k['n']}): p50 {k['p50']:.0f}, p95 {k['p95']:.0f}, max {k['max']}",
        f"  dropped (filters in this order): {dropped} ({info['rows'] - info['kept']} in total)",
        f"  kept {info['kept']} of {info['rows']}; {capped}",
    ]
    if info["duplicate_ids"]:
        lines.append(f"  WARNING: duplicate ids in this split: {info['duplicate_ids'][:10]}")
    return "\n".join(lines)


def sample_prompt(tokenizer, row: dict, chars: int) -> str:
    """The exact chat-template text the policy sees, with the article cut for display."""
    body = row["scraped_body"]
    cut = body[:chars].rsplit(" ", 1)[0] if len(body) > chars else body  # at a word boundary
    shown = cut if cut == body else f"{cut.rstrip()} [... {len(body) - len(cut)} more characters]"
    text = tokenizer.apply_chat_template(utils.title_messages(shown), tokenize=False, add_generation_prompt=True)
    return (f"--- sample: id {row['id']}, original title: {row['title']!r}, "
            f"{row['prompt_tokens']} prompt tokens ---\n{text}")


def main(recipe: settings.Recipe, args: CheckArgs) -> dict:
    """Print the report and return it as a dict. Raises DatasetError/CheckError on bad input."""
    print(f"dataset: {recipe.dataset}\ntokenizer: {recipe.model}\n"
          f"filters: score >= {recipe.min_score}, non-empty body, non-empty title, "
          f"prompt <= {recipe.max_prompt_tokens} tokens (chat template included)\n")
    report: dict = {"dataset": recipe.dataset, "model": recipe.model, "splits": {}}
    samples, ids = [], {}
    caps = ((recipe.train_split, recipe.max_train_stories, "max_train_stories"),
            (recipe.val_split, recipe.max_val_stories, "max_val_stories"))
    # Every row is checked before the (slower) tokenizer loads: a broken file fails fast.
    loaded = {split: load_split(recipe.dataset, split) for split, _, _ in caps}
    tokenizer = load_tokenizer(recipe.model)
    for split, cap, cap_name in caps:
        info, kept, ids[split] = check_split(loaded[split], split, tokenizer, recipe, cap)
        report["splits"][split] = info
        samples.extend(kept[i] for i in range(min(info["used"], args.samples - len(samples))))
        print(format_split(info, cap_name))
    shared = sorted(set(ids[recipe.train_split]) & set(ids[recipe.val_split]))
    report["shared_ids"] = shared
    if shared:
        # A file without a `split` column gives every row to both splits: val would measure training data.
        print(f"WARNING: {len(shared)} ids are in both {recipe.train_split} and {recipe.val_split} "
              f"(e.g. {shared[:5]}); add a `split` column or separate files")
    for row in samples:
        print("\n" + sample_prompt(tokenizer, row, args.sample_chars))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        print(f"\nreport -> {args.json_out}")
    return report


def cli(argv: list[str] | None = None) -> int:
    """Parse arguments, run, and turn expected failures into one line on stderr (exit 1)."""
    try:
        recipe, args = settings.parse_args((settings.Recipe, CheckArgs), "check", argv,
                                           description=__doc__.splitlines()[0])
        main(recipe, args)
    except (utils.DatasetError, CheckError, FileNotFoundError) as e:
        print(f"check_dataset: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
