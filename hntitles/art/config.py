"""ART's side of the shared recipe: ART-only knobs (ArtArgs) and the recipe turned into ART's settings, once.

`plan(recipe, args)` is the one translation: train.py builds an `ArtPlan` at the top of its main and carries it
(the model's internal config, `backend.train`'s arguments, the CPU engine's options, the optimizer really used);
gpu_check.py, update_parity and the benches build theirs the same way, so nothing drifts. Its pieces:

- `ArtArgs`: the `art:` block of a recipe (backend, packing, vLLM memory, validation knobs);
- `check(recipe, args)`: refuses what ART cannot honour, naming the knob;
- `internal_config(recipe, args)`: TrainableModel's `_internal_config` (LoRA, clipping, memory, optimizer);
- `optimizer_args(recipe)`, `local_backend_optimizer(recipe)`: the optimizer knobs as ART's
  TrainerArgs, and what LocalBackend really uses (refusing what it cannot honour);
- `train_kwargs(recipe, args)`: the keyword arguments of `backend.train` (loss, clip bounds, KL, lr);
- `engine_options(recipe, args)`: the CPU engine's knobs (cpu_backend.EngineOptions).

    python -c "from hntitles.art import config; from hntitles.runs import settings;
        print(config.train_kwargs(settings.Recipe(), config.ArtArgs()))"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hntitles.art.compat import import_art
from hntitles.runs.settings import HF_OPTIM, MAX_SEQ_TOKENS, Recipe, check_optimizer_knobs

ART_LOSSES = ("cispo", "ppo")  # what LocalBackend.train(loss_fn=...) accepts in 0.5.18
BACKENDS = ("auto", "local", "cpu")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


@dataclass
class ArtArgs:
    """ART-only knobs (`art:` block of a recipe). Shared knobs live in settings.Recipe."""

    project: str = field(default="hn-titles", metadata={"help": "ART project (folder under the run's art/ directory)."})
    model_name: str = field(default="", metadata={"help": "ART model name (default: the run directory's name)."})
    backend: str = field(default="auto", metadata={
        "help": "'cpu' (ART's loop on the CPU engine, cpu_backend), 'local' (ART's LocalBackend: vLLM + Unsloth "
                "on this node's GPU) or 'auto' (local with a usable GPU and ART's GPU extra installed, else cpu)."})
    pack_groups: bool = field(default=False, metadata={
        "help": "CPU engine: ART's packer shares rows, a group's prompt stored once (LocalBackend on a GPU: one "
                "trajectory per row)."})
    gpu_memory_utilization: float = field(default=0.75, metadata={
        "help": "vLLM's share of GPU memory (the original example used 0.75)."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "Load the base model in 4 bit (ART's default is True; False matches the TRL side)."})
    max_exceptions: float = field(default=0, metadata={
        "help": "Rollout groups allowed to fail per step (count, or a fraction < 1); failed groups are dropped and "
                "counted."})
    keep_best: bool = field(default=True, metadata={
        "help": "After each validation keep only the best (val/reward) and latest checkpoints."})
    validator_model: str = field(default="", metadata={
        "help": "Served name of the base model for validator=model (default: the server's root model from "
                "/v1/models)."})
    concurrency: int = field(default=16, metadata={"help": "Parallel requests for validation and the model validator."})
    request_timeout: float = field(default=600.0, metadata={"help": "Seconds per inference request."})
    scale_rewards: bool = field(default=True, metadata={
        "help": "Divide advantages by the group's reward std (TRL's scale_rewards='group')."})
    score_temperature: bool = field(default=False, metadata={
        "help": "CPU engine: score tokens at the recipe's sampling temperature (log-softmax of logits / T), as TRL's "
                "loss does, in the trainer and in the server's rollout logprobs; ART (and LocalBackend on a GPU) "
                "scores them at temperature 1."})
    token_level_loss: bool = field(default=False, metadata={
        "help": "CPU engine: every completion token of a step weighs the same in the loss (TRL's cispo/dapo "
                "normalisation) instead of ART's 1 / trajectory length (a per-sequence mean)."})


def internal_config(recipe: Recipe, args: ArtArgs) -> dict:
    """ART's `_internal_config` for TrainableModel: where 0.5.18 takes LoRA, clipping and memory.

    art.dev.get_model_config merges these over its defaults (LoRA r=8 alpha=16, max_grad_norm
    0.1, 4-bit, max_seq_length 32768) before building the Unsloth model and the vLLM engine.
    """
    import_art()
    from art import dev

    return dev.InternalModelConfig(
        # use_exact_model_name: Unsloth would load its own unsloth/... copy of a Qwen/... id otherwise
        init_args=dev.InitArgs(max_seq_length=MAX_SEQ_TOKENS, load_in_4bit=args.load_in_4bit,
                               use_exact_model_name=True),
        engine_args=dev.EngineArgs(
            gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=MAX_SEQ_TOKENS,
            max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= recipe.lora_r), recipe.lora_r)),
        peft_args=dev.PeftArgs(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                               target_modules=list(recipe.lora_target_modules), random_state=recipe.seed),
        trainer_args=dev.TrainerArgs(max_grad_norm=recipe.max_grad_norm, seed=recipe.seed, **optimizer_args(recipe)),
    )


def optimizer_args(recipe: Recipe) -> dict:
    """ART TrainerArgs for the recipe's optimizer knobs; an empty knob keeps ART's default
    (paged_adamw_8bit, betas 0.9/0.99; weight decay 0.1, which ART's GPU trainer forces anyway).

    >>> optimizer_args(Recipe(optimizer="adamw", adam_beta2=0.999))
    {'optim': 'adamw_torch', 'adam_beta2': 0.999}
    """
    check_optimizer_knobs(recipe)
    out = {"optim": HF_OPTIM[recipe.optimizer]} if recipe.optimizer else {}
    out.update({k: getattr(recipe, k) for k in ("weight_decay", "adam_beta1", "adam_beta2")
                if getattr(recipe, k) is not None})
    return out


# What ART 0.5.18's LocalBackend trains with (art/dev/get_model_config.py defaults, and
# art/unsloth/train.py run_unsloth_rl_training, which sets every param group's weight decay to
# 0.1 before each train call, whatever trainer_args say).
LOCAL_BACKEND_OPTIMIZER = {"optim": "paged_adamw_8bit", "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.99,
                           "optimizer_steps": "per_sequence"}


def local_backend_optimizer(recipe: Recipe) -> tuple[dict, dict]:
    """(trainer_args for the recipe's optimizer knobs, the optimizer LocalBackend really uses); a
    ValueError for what LocalBackend cannot honour.

    optim and the betas reach Unsloth's GRPOConfig through `_internal_config.trainer_args`.
    Weight decay and the step granularity cannot: 0.5.18 overwrites the decay with 0.1 on
    every train call and takes one optimizer step per trajectory, so a recipe asking for
    anything else is refused rather than silently ignored.
    """
    if recipe.weight_decay is not None and recipe.weight_decay != LOCAL_BACKEND_OPTIMIZER["weight_decay"]:
        raise ValueError(f"weight_decay {recipe.weight_decay} cannot reach ART 0.5.18's LocalBackend: it sets weight "
                         "decay 0.1 before every train call (art/unsloth/train.py). Set weight_decay: 0.1 in the "
                         "recipe (both trainers then use it) or leave it empty (each library's default).")
    if recipe.optimizer_steps == "per_step":
        raise ValueError("optimizer_steps 'per_step' is not available with ART 0.5.18's LocalBackend: it takes one "
                         "optimizer step per trajectory ('per_sequence'); use that, leave it empty, or use "
                         "--backend cpu (per_step exists only on the CPU engine)")
    trainer_args = optimizer_args(recipe)
    used = {**LOCAL_BACKEND_OPTIMIZER, **trainer_args, "weight_decay": LOCAL_BACKEND_OPTIMIZER["weight_decay"],
            "learning_rate": recipe.learning_rate, "max_grad_norm": recipe.max_grad_norm,
            "engine": "art.local.LocalBackend (openpipe-art 0.5.18)"}
    return trainer_args, used


def train_kwargs(recipe: Recipe, args: ArtArgs) -> dict:
    """Keyword arguments of backend.train: the loss is explicit (ART defaults to cispo, TRL to dapo).

    For cispo ART clips the detached importance weight to [1 - epsilon, 1 + epsilon_high];
    TRL 1.14 clamps it to at most its epsilon_high. The bounds are written out (they equal
    ART's defaults, 1.0 and 4.0, for the default cispo_max_weight 5) so the weight's range,
    [0, recipe.cispo_max_weight], is the same as TRL's.
    """
    kwargs = {"learning_rate": recipe.learning_rate, "loss_fn": recipe.loss_type,
              "kl_penalty_coef": recipe.beta, "scale_rewards": args.scale_rewards}
    if recipe.loss_type == "cispo":
        kwargs.update(epsilon=1.0, epsilon_high=recipe.cispo_max_weight - 1.0)
    return kwargs


def engine_options(recipe: Recipe, args: ArtArgs):
    """The CPU engine's knobs (cpu_backend.EngineOptions): ART's GPU behaviour unless the recipe asks otherwise.

    >>> engine_options(Recipe(temperature=0.7), ArtArgs(score_temperature=True)).score_temperature
    0.7
    """
    from hntitles.art.cpu_backend import EngineOptions

    return EngineOptions(pack_groups=args.pack_groups, optimizer_steps=recipe.optimizer_steps or "per_sequence",
                         score_temperature=recipe.temperature if args.score_temperature else None,
                         token_level_loss=args.token_level_loss)


# --------------------------------------------------------------------------------------
# The plan: the recipe turned into ART's settings once per run
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtPlan:
    """Everything ART reads from the recipe, built once (`plan`): the rest of a run carries this object."""

    backend: str  # "cpu" (the CPU engine) or "local" (LocalBackend on a GPU), resolved
    internal_config: dict  # TrainableModel(_internal_config=...)
    train_kwargs: dict  # backend.train(model, groups, **train_kwargs)
    engine_options: Any  # cpu_backend.EngineOptions on the CPU engine, None under LocalBackend
    engine: dict  # what trains, with the values it really uses (config.json, printed once)


def check(recipe: Recipe, args: ArtArgs) -> None:
    """Refuse settings ART cannot honour before anything starts (ValueError naming the knob); `args.backend`
    is 'cpu' or 'local' (train.resolve_backend decides 'auto', which needs the machine)."""
    if recipe.loss_type not in ART_LOSSES:
        raise ValueError(f"loss_type {recipe.loss_type!r} is not available in ART 0.5.18 (use one of {ART_LOSSES}; "
                         "'cispo' exists in both TRL and ART)")
    recipe.check()  # what every trainer refuses (parse_args checks it too; a Recipe may be built in code)
    if args.backend not in BACKENDS:
        raise ValueError(f"unknown backend {args.backend!r} (supported: {', '.join(BACKENDS)})")
    if args.backend == "local":
        local_backend_optimizer(recipe)  # refuses optimizer knobs LocalBackend cannot honour
        for knob, why in (("pack_groups", "ART's LocalBackend puts one trajectory in each row"),
                          ("score_temperature", "ART's LocalBackend scores tokens at temperature 1 (its loss and "
                                                "vLLM's raw logprobs)"),
                          ("token_level_loss", "ART's LocalBackend weighs each trajectory's tokens 1 / its length")):
            if getattr(args, knob):
                raise ValueError(f"{knob} exists only on the CPU engine (--backend cpu): {why}")
    if args.backend == "cpu" and recipe.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        raise ValueError(f"optimizer {recipe.optimizer!r} needs bitsandbytes on CUDA; on the CPU engine use 'adamw' "
                         "(or leave it empty: ART's default, replaced by torch AdamW on the CPU and said so)")


def plan(recipe: Recipe, args: ArtArgs) -> ArtPlan:
    """The recipe as ART's settings, checked (`check`), for the backend `args.backend` names ('cpu' or 'local').

    >>> p = plan(Recipe(temperature=0.7), ArtArgs(backend="cpu", score_temperature=True))
    >>> p.train_kwargs["loss_fn"], p.engine_options.score_temperature, p.engine["logprob_temperature"]
    ('cispo', 0.7, 0.7)
    """
    check(recipe, args)
    config = internal_config(recipe, args)
    if args.backend == "cpu":
        from hntitles.art.cpu_backend import engine_settings

        options = engine_options(recipe, args)
        engine = engine_settings(config, options)
    else:
        options, engine = None, {**local_backend_optimizer(recipe)[1], "rows": "one trajectory per row"}
    return ArtPlan(backend=args.backend, internal_config=config, train_kwargs=train_kwargs(recipe, args),
                   engine_options=options, engine=engine)
