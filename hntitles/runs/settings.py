"""Settings: the recipe both trainers read, and how a script gets its arguments.

A run's settings come from, in rising precedence: the dataclass defaults, the recipe YAML's
`shared:` block and the script's own section (`trl:`, `art:`, `eval:`, `check:`, `titles:`),
the environment (`.env` included: MODEL, DATASET, REWARD_URL, RUNS_DIR), then CLI flags.

- `Recipe`: the knobs both trainers share (`Recipe.check` refuses values no trainer understands);
- `parse_args(types, section, argv)`: `--recipe file.yaml` + environment + flags into dataclasses;
  a misspelt section or key is an error naming it and the recipe file;
- the Hub mode: `prepare_env` / `set_hub_mode` / `is_hub_id` (offline for local paths, online for
  hub ids, unless you set HF_HUB_OFFLINE), `hub_errors` / `HubUnavailable` (one line, not a traceback);
- `OPTIMIZERS` and `HF_OPTIM` (the recipe's optimizer names and transformers' names for them),
  `check_optimizer_knobs`, `set_seed`, and the repo's paths and defaults.

    python -c "from hntitles.runs import settings; print(settings.parse_args((settings.Recipe,), 'trl',
        ['--recipe', 'recipes/tiny.yaml']))"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hntitles.runs.tracking import REPORT_TO

ROOT = Path(__file__).resolve().parents[2]  # the repo (this file is hntitles/<part>/<module>.py)
HUB_DATASET = "OpenPipe/hacker-news-scraped-stories-filtered"
DEFAULT_DATASET = str(ROOT / "data" / "stories.jsonl")
DEFAULT_MODEL = str(ROOT / "models" / "smollm2-135m-instruct")
DEFAULT_RECIPE = "recipes/cpu.yaml"  # relative to the repo when not found from the working directory
DEFAULT_REWARD_URL = "http://127.0.0.1:7000"
MAX_SEQ_TOKENS = 8192
MAX_PROMPT_TOKENS = MAX_SEQ_TOKENS - 100  # the original keeps 100 tokens of room for the title




# Environment variables (from the process or .env) that override a Recipe field. The
# order of precedence is: dataclass default < recipe YAML < environment < CLI flag,
# because .env describes the machine (where the model and the server are) while the
# recipe describes the experiment.
ENV_OVERRIDES = {
    "MODEL": "model",
    "DATASET": "dataset",
    "REWARD_URL": "reward_url",
    "RUNS_DIR": "runs_dir",
}


def load_env(path: str | os.PathLike | None = None) -> None:
    """Load `.env` (never overriding variables already set in the process).

    Then, when neither set it: no error reports from weave (installed with openpipe-art, imported
    by TRL when present) to sentry.io; offline they only retried and warned at every trainer's exit;
    and no datasets progress bars.
    """
    from dotenv import load_dotenv

    load_dotenv(path or ROOT / ".env", override=False)
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    # datasets draws a bar for every map/select over a few dozen rows; the stages print what
    # loading kept and dropped instead. Set it to 0 to see them.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

_HUB_MODE_ENV = "HN_HUB_MODE"  # what prepare_env decided (child processes re-decide, not obey)


def is_hub_id(name: str | None) -> bool:
    """'org/name' that is no file or folder here (nor under the repo): something to fetch.

    >>> is_hub_id("Qwen/Qwen2.5-0.5B-Instruct"), is_hub_id("models/tiny"), is_hub_id("/x/y")
    (True, False, False)
    """
    if not name or not _HUB_ID.fullmatch(name):
        return False
    return not (Path(name).exists() or (ROOT / name).exists())


def _recipe_names(argv: Sequence[str] | None, default_recipe: str | None) -> list[str]:
    """Every model/dataset a run may load: recipe sections, MODEL/DATASET, --model/--dataset."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=os.environ.get("RECIPE") or default_recipe)
    for name in ("model", "dataset"):
        pre.add_argument(f"--{name}")
    known, _ = pre.parse_known_args(list(argv) if argv is not None else None)
    names = [known.model, known.dataset, os.environ.get("MODEL"), os.environ.get("DATASET")]
    known.recipe = resolve_recipe_path(known.recipe)
    if known.recipe and Path(known.recipe).exists():
        try:
            sections = read_recipe(known.recipe).values()
        except ValueError:
            sections = []  # parse_args reports a malformed recipe with its own message
        names += [block.get(k) for block in sections for k in ("model", "dataset")]
    return [n for n in names if isinstance(n, str) and n]


def set_hub_mode(names: Sequence[str]) -> str:
    """Set HF_HUB_OFFLINE for this process from what it will load; returns the mode in words.

    A user's own HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) wins. Otherwise local paths only
    -> offline (nothing is fetched, and nothing waits on a network that may not exist); any hub
    id -> online. huggingface_hub reads the variable when it is imported, so call this first;
    if it was imported already, its constant (and datasets') is updated too.
    """
    hub = [n for n in names if is_hub_id(n)]
    user_set = (os.environ.get(_HUB_MODE_ENV) is None
                and any(os.environ.get(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")))
    if user_set:
        offline = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE", "")).upper() \
            in ("1", "ON", "YES", "TRUE")
        how = "set by you"
    else:
        offline = not hub
        os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
        os.environ[_HUB_MODE_ENV] = "offline" if offline else "online"
        how = f"hub id(s) {hub}" if hub else "local paths only"
    import sys

    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:
            setattr(sys.modules[module], attr, offline)
    return f"{'offline' if offline else 'online'} ({how})"


def prepare_env(argv: Sequence[str] | None = None, default_recipe: str | None = None) -> str:
    """`.env` first, then the Hub mode for the recipe/flags: before anything imports the Hub client."""
    load_env()
    return set_hub_mode(_recipe_names(argv, default_recipe))


class HubUnavailable(ConnectionError):
    """A hub id could not be loaded; the one-line message says how to use a local copy instead.

    A ConnectionError (what datasets raises offline), so existing handlers keep working; the
    trainers' entry points print it as one line.
    """


@contextlib.contextmanager
def hub_errors(name: str, what: str = "model"):
    """Turn a failed Hub download of `name` into one line (no traceback) that names the id and
    the way out; errors for local paths, or of other kinds, pass through unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (filtered just below)
        origin = type(e).__module__.split(".")[0]
        if not is_hub_id(name) or not (isinstance(e, OSError) or origin in ("huggingface_hub", "httpx", "requests")):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        detail = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
        why = f"HF_HUB_OFFLINE=1 and it is not in the local cache ({detail})" if offline else \
            f"the Hugging Face Hub could not be reached or refused it ({detail})"
        field_name = "dataset" if what == "dataset" else "model"
        raise HubUnavailable(
            f"cannot load the {what} {name!r}: {why}. Point the recipe at a local copy instead "
            f"({field_name}: /path/to/copy, or {field_name.upper()}=/path/to/copy, or --{field_name} /path/to/copy; "
            "make one where the Hub is reachable with "
            f"`hf download {name}{' --repo-type dataset' if field_name == 'dataset' else ''} "
            f"--local-dir <dir>`), or set HF_TOKEN in .env for a gated repo.") from None


@dataclass
class Recipe:
    """The knobs both trainers share. One YAML `shared:` block sets them for both.

    `check()` refuses values no trainer understands; parse_args calls it for every script.
    """

    recipe: str = field(default="", metadata={
        "help": "Recipe YAML (sections: shared, trl, art, eval, ...); names the run directory."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id or local folder of the policy."})
    dataset: str = field(default=DEFAULT_DATASET, metadata={
        "help": "Hub id, .jsonl/.parquet file or saved dataset folder."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    val_split: str = field(default="val", metadata={"help": "Split to validate on."})
    max_train_stories: int = field(default=5000, metadata={"help": "Train stories kept after filtering (0 = all)."})
    max_val_stories: int = field(default=100, metadata={"help": "Val stories kept after filtering (0 = all)."})
    min_score: int = field(default=20, metadata={"help": "Drop stories with fewer HN points."})
    max_prompt_tokens: int = field(default=MAX_PROMPT_TOKENS, metadata={
        "help": "Drop longer prompts (chat template included)."})
    prompts_per_step: int = field(default=2, metadata={"help": "Distinct stories per optimizer step."})
    num_generations: int = field(default=4, metadata={"help": "Completions per prompt (the GRPO group)."})
    max_completion_tokens: int = field(default=24, metadata={"help": "Generation cap per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for rollouts."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Optimizer learning rate (same on both sides)."})
    max_grad_norm: float = field(default=0.1, metadata={"help": "Gradient clipping."})
    loss_type: str = field(default="cispo", metadata={"help": "Policy loss; 'cispo' exists in TRL and ART."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (TRL beta, ART kl_penalty_coef)."})
    cispo_max_weight: float = field(default=5.0, metadata={
        "help": "CISPO's cap on the importance weight (TRL epsilon_high; ART 1 + epsilon_high)."})
    # The optimizer knobs: None = each library's own default (the "framework defaults" setting),
    # a value = both trainers use it (the "aligned" setting). What each engine really used is
    # written to the run's config.json.
    optimizer: str | None = field(default=None, metadata={
        "help": "'adamw' (torch AdamW), 'adamw_8bit' or 'paged_adamw_8bit' (bitsandbytes, GPU only); empty = each "
                "library's default."})
    weight_decay: float | None = field(default=None, metadata={
        "help": "AdamW weight decay; empty = each library's default (TRL 0.0, Unsloth 0.001, ART 0.1)."})
    adam_beta1: float | None = field(default=None, metadata={
        "help": "AdamW beta1; empty = each library's default (0.9 everywhere)."})
    adam_beta2: float | None = field(default=None, metadata={
        "help": "AdamW beta2; empty = each library's default (TRL 0.999, ART 0.99)."})
    optimizer_steps: str | None = field(default=None, metadata={
        "help": "'per_step' (one optimizer step per GRPO step, TRL's way) or 'per_sequence' (one per trajectory, ART "
                "LocalBackend's way); empty = each library's default."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Modules that get LoRA adapters."},
    )
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps in total (a resumed run continues to it)."})
    eval_every: int = field(default=50, metadata={"help": "Validate every N steps (0 = only at the end)."})
    eval_samples: int = field(default=4, metadata={"help": "Sampled titles per val story, besides the greedy one."})
    save_every: int = field(default=10, metadata={"help": "Checkpoint every N steps."})
    validator: str = field(default="embedding", metadata={
        "help": "'model' (base model answers True/False), 'embedding' or 'none'."})
    validator_threshold: float = field(default=0.25, metadata={
        "help": "Cosine(title, body) needed by the embedding validator."})
    stop_at_newline: bool = field(default=True, metadata={
        "help": "End every completion at its first line break: the title is the first line, so nothing after it is "
                "generated (saves tokens) and nothing can trail it. False: generate up to the cap and take the "
                "first non-empty line (trailing_penalty then applies)."})
    trailing_penalty: float = field(default=0.0, metadata={
        "help": "Subtracted from the reward when text follows the title line."})
    reward_url: str = field(default=DEFAULT_REWARD_URL, metadata={"help": "Base URL of local_reward.py."})
    reward_timeout: float = field(default=60.0, metadata={"help": "Seconds per reward request."})
    reward_retries: int = field(default=3, metadata={"help": "Retries on connection errors and 5xx."})
    runs_dir: str = field(default=str(ROOT / "runs"), metadata={"help": "Parent of the run directories."})
    run_name: str = field(default="", metadata={"help": "Run directory name (default: <method>-<recipe>)."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    push_to_hub: str = field(default="", metadata={
        "help": "A Hub repo id (<user or org>/<name>): when the run finishes, upload final/ and its model card there "
                "(a private repo, created when missing; needs a network and HF_TOKEN). Empty: keep it local."})
    report_to: str = field(default="tensorboard", metadata={
        "help": "Experiment tracker both trainers log to, the same keys at the same steps: tensorboard (offline, "
                "<run>/tracker/, `make board`), wandb (needs WANDB_API_KEY or WANDB_MODE=offline) or none."})

    def check(self) -> None:
        """Raise ValueError for a value no trainer can use (a typo must not fall back to a default).

        >>> Recipe(validator="judge").check()
        Traceback (most recent call last):
        ...
        ValueError: unknown validator 'judge' (use embedding, model or none)
        """
        if self.validator not in VALIDATORS:
            raise ValueError(f"unknown validator {self.validator!r} "
                             f"(use {', '.join(VALIDATORS[:-1])} or {VALIDATORS[-1]})")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: a group of one has no advantage to learn from")
        if self.prompts_per_step < 1:
            raise ValueError("prompts_per_step must be >= 1")
        if self.push_to_hub and not _HUB_ID.fullmatch(self.push_to_hub):
            raise ValueError(f"push_to_hub {self.push_to_hub!r}: use a Hub repo id, <user or org>/<name>")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"unknown report_to {self.report_to!r} (use {', '.join(REPORT_TO)})")
        check_optimizer_knobs(self)


VALIDATORS = ("embedding", "model", "none")

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")

# The recipe's optimizer names as transformers' `optim` strings: what TRL's GRPOConfig and ART's
# TrainerArgs (Unsloth's GRPOConfig underneath) both take.
HF_OPTIM = {"adamw": "adamw_torch", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}

OPTIMIZER_STEPS = ("per_step", "per_sequence")


def check_optimizer_knobs(recipe: Recipe) -> None:
    """Refuse optimizer knobs no engine understands (a typo must not fall back to a default).

    >>> check_optimizer_knobs(Recipe(optimizer="adam"))  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    ValueError: optimizer 'adam' is not one of ('adamw', 'adamw_8bit', 'paged_adamw_8bit')
        (or empty for each library's default)
    """
    if recipe.optimizer not in (None, *OPTIMIZERS):
        raise ValueError(f"optimizer {recipe.optimizer!r} is not one of {OPTIMIZERS} "
                         "(or empty for each library's default)")
    if recipe.optimizer_steps not in (None, *OPTIMIZER_STEPS):
        raise ValueError(f"optimizer_steps {recipe.optimizer_steps!r} is not one of {OPTIMIZER_STEPS} "
                         "(or empty for each library's default)")
    for name in ("weight_decay", "adam_beta1", "adam_beta2"):
        value = getattr(recipe, name)
        if value is not None and not (0.0 <= value < 1.0 or (name == "weight_decay" and value >= 0)):
            raise ValueError(f"{name} must be in [0, 1), got {value}")


# Every section a recipe may have: `shared` (Recipe) and one per script that reads recipes.
RECIPE_SECTIONS = ("shared", "trl", "art", "eval", "check", "titles")


def read_recipe(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a recipe YAML: top-level sections (RECIPE_SECTIONS) of key: value.

    A section name that is not one of them (a typo such as `shraed:`) is an error naming it:
    its keys would otherwise be ignored without a word.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: a recipe maps section names (shared, trl, art) to key: value blocks")
    unknown = sorted(set(data) - set(RECIPE_SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown} (a recipe has {', '.join(RECIPE_SECTIONS)})")
    return data


def recipe_defaults(path: str, section: str, types: Sequence[type]) -> dict[str, Any]:
    """The `shared:` block and the `<section>:` block of the recipe at `path`, checked: a shared key
    must be a Recipe field and a section key a field of one of `types`; raises ValueError naming
    the key, its section and the file.

    >>> recipe_defaults("recipes/tiny.yaml", "trl", [Recipe])["max_steps"]
    4
    """
    if section not in RECIPE_SECTIONS:
        raise ValueError(f"unknown recipe section {section!r} (use one of {RECIPE_SECTIONS})")
    recipe = read_recipe(resolve_recipe_path(path) or path)
    shared, own = recipe.get("shared", {}), recipe.get(section, {}) if section != "shared" else {}
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
    own_fields = {f.name for t in types for f in dataclasses.fields(t)}
    for block, keys, known in (("shared", shared, recipe_fields), (section, own, own_fields)):
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} in section '{block}'")
    return {**shared, **own}


def resolve_recipe_path(value: str | None) -> str | None:
    """A recipe path as given if it exists from here, else the repo's (so scripts run from any directory).

    >>> resolve_recipe_path("recipes/tiny.yaml") in ("recipes/tiny.yaml", str(ROOT / "recipes" / "tiny.yaml"))
    True
    """
    if value and _maybe_repo_relative(value) and (ROOT / value).exists():
        return str(ROOT / value)
    return value


def parse_args(types: Sequence[type], section: str, argv: Sequence[str] | None = None,
               description: str | None = None, default_recipe: str | None = DEFAULT_RECIPE) -> tuple:
    """Parse `--recipe file.yaml` + environment + CLI flags into instances of `types`.

    The recipe's `shared:` block and its `<section>:` block become defaults (recipe_defaults); an
    unknown section or key is an error naming it and the file (a typo must not silently fall
    back to a default). A Recipe among `types` records the recipe path (it names the run
    directory) and is checked (Recipe.check).
    """
    prepare_env(argv, default_recipe)  # before transformers: huggingface_hub reads HF_HUB_OFFLINE at import
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=os.environ.get("RECIPE") or default_recipe)  # RECIPE= (empty) means unset
    known, rest = pre.parse_known_args(argv)
    known.recipe = resolve_recipe_path(known.recipe)
    try:
        defaults = recipe_defaults(known.recipe, section, types) if known.recipe else {}
    except ValueError as e:
        raise SystemExit(str(e)) from None
    field_names = {f.name for t in types for f in dataclasses.fields(t)}
    for env_name, field_name in ENV_OVERRIDES.items():
        if os.environ.get(env_name) and field_name in field_names:
            defaults[field_name] = os.environ[env_name]
    parser = HfArgumentParser(types, description=description)
    if "recipe" not in field_names:
        parser.add_argument("--recipe", help="Recipe YAML (sections: shared, trl, art).")
    parser.set_defaults(**defaults, recipe=known.recipe)
    *objs, namespace_rest = parser.parse_args_into_dataclasses(args=list(rest), return_remaining_strings=True)
    if namespace_rest:
        parser.error(f"unrecognized arguments: {' '.join(namespace_rest)}")
    # HfArgumentParser appends a Namespace for arguments no dataclass owns (`--recipe`): drop it.
    objs = [obj for obj in objs if not isinstance(obj, argparse.Namespace)]
    for obj in objs:
        _resolve_repo_paths(obj)
        if isinstance(obj, Recipe):
            obj.recipe = known.recipe or ""
            try:
                obj.check()
            except ValueError as e:
                parser.error(str(e))
    return tuple(objs)


def resolve_runs_dir(value: str) -> Path:
    """A relative runs dir that does not exist here means the repo's (as the trainers resolve it).

    >>> resolve_runs_dir("runs") == ROOT / "runs" or Path("runs").exists()
    True
    """
    return ROOT / value if _maybe_repo_relative(value) else Path(value)


def _maybe_repo_relative(value: str) -> bool:
    """A relative path that does not exist from here: it may name something in the repo."""
    return bool(value) and not os.path.isabs(value) and not os.path.exists(value)


def _resolve_repo_paths(obj: Any) -> None:
    """Recipes name repo files relatively (models/tiny); make them work from any directory."""
    for name in ("model", "dataset", "runs_dir"):
        value = getattr(obj, name, None)
        if isinstance(value, str) and _maybe_repo_relative(value):
            candidate = ROOT / value
            if candidate.exists() or name == "runs_dir":
                setattr(obj, name, str(candidate))


def derived_seed(seed: int, *parts: object) -> int:
    """A seed in [0, 2**31) that is a function of `seed` and `parts` alone (a step, an index):
    what a step samples does not depend on what ran before it in the process.

    >>> derived_seed(42, 3, 0) == derived_seed(42, 3, 0) != derived_seed(42, 3, 1)
    True
    """
    import hashlib

    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def set_seed(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
        import torch

        np.random.seed(seed)
        torch.manual_seed(seed)
    except ImportError:  # the reward client side may run without torch
        pass
