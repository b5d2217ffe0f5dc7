"""Model cards for the adapters both trainers save: every checkpoint and final/, filled from the run.

`write(folder, run_dir, method, step)` replaces the card PEFT (an empty template) or TRL (a draft naming
no base model) left in `folder` with one read from the run directory: the base model (its hub id when it
came from the hub, the package it was converted from when it is the offline default), the dataset and its
split sizes, the method and library versions, the recipe's knobs and the optimizer actually used, the
reward (scorer, validator, rule), the steps trained and the run's last validation, and how to load the
adapter with PEFT or with `make titles`. `save_final(run_dir, checkpoint, method, step)` is
`rundir.save_final` plus the card, then the upload the recipe's `push_to_hub` asks for; `push(folder, repo_id)`
uploads an adapter folder with huggingface_hub.

    >>> base_model_line({"model": "Qwen/Qwen2.5-0.5B-Instruct"})
    ('Qwen/Qwen2.5-0.5B-Instruct', '[Qwen/Qwen2.5-0.5B-Instruct](https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct)')
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from hntitles.runs import rundir, settings

CARD = "README.md"
LIBRARIES = {"trl": ("trl", "transformers", "peft", "torch"),
             "art": ("openpipe-art", "transformers", "peft", "torch")}
METHOD_TITLES = {"trl": "TRL's GRPOTrainer", "art": "OpenPipe ART's training loop"}
KNOBS = ("prompts_per_step", "num_generations", "max_completion_tokens", "temperature", "learning_rate",
         "max_grad_norm", "loss_type", "beta", "optimizer", "weight_decay", "adam_beta1", "adam_beta2",
         "optimizer_steps", "lora_r", "lora_alpha", "lora_dropout", "max_steps", "seed")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def base_model_line(recipe: dict) -> tuple[str | None, str]:
    """(the hub id for the card's metadata, or None; how the card names the base model)."""
    model = str(recipe.get("model", ""))
    if settings.is_hub_id(model):
        return model, f"[{model}](https://huggingface.co/{model})"
    source = Path(model) if Path(model).is_absolute() else settings.ROOT / model
    origin = ""
    if (source / "SOURCE.json").exists():
        info = json.loads((source / "SOURCE.json").read_text())
        origin = f", converted from `{info.get('from')}` ({info.get('license')})"
    return None, f"`{rundir.shown(model)}` (a local folder{origin})"


def split_sizes(*splits) -> dict:
    """{split: rows, kept, used} from (utils.FilterReport, the dataset used) pairs, for config.json's `data`."""
    return {report.split: {"rows": report.rows_in, "kept": report.rows_out, "used": len(ds)} for report, ds in splits}


def last_val(rows: list[dict], step: int) -> dict | None:
    val = [r for r in rows if r["split"] == "val" and r["step"] <= step]
    return max(val, key=lambda r: r["step"]) if val else None


def usage(model: str, shown: str) -> list[str]:
    """The card's "Use" section: the adapter loaded with PEFT, and with `make titles`."""
    return [
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({model!r})",
        f"model = PeftModel.from_pretrained(base, {shown!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({model!r})",
        "```",
        "",
        "Ranked candidate titles for an article (with `make reward` running):",
        "",
        "```bash",
        f'make titles ARTICLE=article.txt ARGS="--adapter {shown}"',
        "```",
        "",
    ]


def card_text(run_dir: Path, method: str, step: int, folder: Path) -> str:
    """The card for the adapter in `folder`, trained `step` steps by `method` in `run_dir`."""
    config = rundir.read_config(run_dir)
    recipe = config.get("recipe", {})
    rows, _ = rundir.read_metrics(run_dir) if (run_dir / rundir.METRICS_FILE).exists() else ([], [])
    hub_id, base = base_model_line(recipe)
    data = config.get("data", {})
    splits = ", ".join(f"{name}: {d['used']} stories used ({d['kept']} kept of {d['rows']} rows by the filters)"
                       for name, d in data.items()) or "split sizes not recorded"
    server = config.get("reward_server") or {}
    optimizer = config.get("optimizer_used") or config.get("engine") or {}
    val = last_val(rows, step)
    val_line = (f"step {val['step']}: reward {val['reward_mean']:.3f} ± {val['reward_std']:.3f} over {val['n']} "
                f"titles, {val['match_rate']:.0%} supported by the body, {val['title_len_mean']:.1f} words"
                if val else "no validation yet at this step")
    meta = ["---", "library_name: peft", "pipeline_tag: text-generation", "license: apache-2.0",
            *([f"base_model: {hub_id}"] if hub_id else []),
            "tags:", "- lora", "- grpo", f"- {method}", "- hacker-news-titles", "---", ""]
    shown = rundir.shown(folder)
    lines = [
        f"# {run_dir.name}: a LoRA adapter that writes Hacker News titles",
        "",
        f"Trained with GRPO by {METHOD_TITLES.get(method, method)} for {step} of {recipe.get('max_steps', '?')} "
        f"steps, in the run directory `{rundir.shown(run_dir)}`.",
        "",
        "## Base model and data",
        "",
        f"- Base model: {base}",
        f"- Dataset: `{rundir.shown(recipe.get('dataset', '?'))}` (train split `{recipe.get('train_split')}`, "
        f"val split `{recipe.get('val_split')}`); {splits}",
        "",
        "## Training",
        "",
        f"- Method: {METHOD_TITLES.get(method, method)}; libraries: "
        + ", ".join(f"{p} {version(p)}" for p in LIBRARIES.get(method, ())),
        f"- Recipe: `{rundir.shown(recipe.get('recipe', '?'))}`; "
        + ", ".join(f"{k}={recipe[k]}" for k in KNOBS if k in recipe),
        f"- Optimizer as run: {json.dumps(optimizer, default=str)}",
        "",
        "## Reward",
        "",
        f"- The reward model's score of the title if the validator ({recipe.get('validator', '?')}, threshold "
        f"{recipe.get('validator_threshold', '?')}) finds it supported by the article body, else 0; minus "
        f"{recipe.get('trailing_penalty', 0.0)} when text follows the title line.",
        f"- Scorer: the reward server's `{server.get('scorer', 'not recorded')}` "
        f"({rundir.shown(server.get('model', 'see the run log'))}, version {server.get('version', '?')}).",
        "",
        "## Results",
        "",
        f"- Last validation: {val_line}.",
        "",
    ]
    return "\n".join(meta + lines + usage(str(recipe.get("model", "BASE")), shown))


def write(folder: Path, run_dir: Path, method: str, step: int) -> Path:
    """The card, written atomically into `folder` (over PEFT's or TRL's)."""
    path = Path(folder) / CARD
    tmp = path.with_name(f".{CARD}.{os.getpid()}")
    tmp.write_text(card_text(Path(run_dir), method, step, Path(folder)))
    tmp.replace(path)
    return path


def save_final(run_dir: Path, checkpoint: Path, method: str, step: int) -> Path:
    """final/ from the checkpoint (rundir.save_final), carrying the card of the final step; uploaded to the
    recipe's `push_to_hub` repo when it names one (settings.HubUnavailable, saying final/ is kept, if that fails)."""
    final = rundir.save_final(run_dir, checkpoint)
    write(final, run_dir, method, step)
    config = rundir.read_config(run_dir)
    if repo_id := config.get("recipe", {}).get("push_to_hub"):
        try:
            print(f"[{method}] final/ -> https://huggingface.co/{repo_id}: {push(final, repo_id)}")
        except Exception as e:  # noqa: BLE001 (any failure of the upload: the adapter itself is safe)
            raise settings.HubUnavailable(
                f"{rundir.shown(final)} is saved, but its upload to {repo_id} failed ({type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0][:200]}); retry with `hf upload {repo_id} "
                f"{rundir.shown(final)}` (HF_TOKEN set)") from None
    return final


def push(folder: Path, repo_id: str, private: bool = True) -> str:
    """Upload an adapter folder (its card included) to the Hub as `repo_id`; returns the commit URL.

    Needs a network and HF_TOKEN (or `hf auth login`); the repository is created when missing."""
    from huggingface_hub import HfApi

    if not settings.is_hub_id(repo_id):
        raise ValueError(f"--hub_model_id {repo_id!r}: use <user or org>/<name>")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 commit_message=f"{Path(folder).name} adapter from this repo's GRPO run"))
