"""TRL's side of the shared recipe: the TRL-only knobs and the one GRPOConfig builder.

The TRL trainer, the GPU check and the benches all build their GRPOConfig here, so a knob
cannot drift between them:

- `TrlArgs`: the `trl:` block of a recipe (backend, vLLM, gradient checkpointing, loss micro-batch, ...);
- `grpo_config(recipe, args, backend, run_dir)`: GRPOConfig from the shared recipe, TrlArgs and
  the backend (fast_backend.grpo_overrides);
- `batch_kwargs`: the batch fields for prompts_per_step x num_generations completions per
  optimizer step, whatever the process count and loss micro-batch;
- `optimizer_kwargs` / `optimizer_used`: the recipe's optimizer knobs as GRPOConfig fields, and
  what the built config really holds (an empty knob shows the engine's default there).

    python -c "from hntitles.trl import config; from hntitles.runs import settings;
        print(config.batch_kwargs(settings.Recipe(), config.TrlArgs(), 1))"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hntitles.engines import fast_backend
from hntitles.runs.settings import HF_OPTIM, Recipe, check_optimizer_knobs


@dataclass
class TrlArgs:
    """TRL-side knobs only (a recipe's `trl:` block); anything shared with the ART trainer lives in settings.Recipe."""

    backend: str = field(default="auto", metadata={
        "help": "auto | cpu | transformers | unsloth | trl-vllm (see hntitles/engines/fast_backend.py)."})
    use_vllm: bool = field(default=True, metadata={
        "help": "On a GPU backend, generate with vLLM (Unsloth's own, or TRL's for trl-vllm)."})
    vllm_mode: str = field(default="colocate", metadata={
        "help": "trl-vllm only: 'colocate' (in-process) or 'server' (`trl vllm-serve`)."})
    vllm_server_base_url: str = field(default="", metadata={
        "help": "trl-vllm server mode: URL of `trl vllm-serve` (default host:port 0.0.0.0:8000)."})
    gpu_memory_utilization: float = field(default=0.6, metadata={
        "help": "GPU memory share for the vLLM engine (Unsloth / colocate)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Unsloth only: QLoRA (4-bit base weights)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in backward; TRL turns it on by default, but on CPU with short completions it "
                "only costs time."})
    steps_per_generation: int = field(default=1, metadata={
        "help": "Optimizer steps per generation batch (1 = fully on-policy)."})
    loss_micro_batch: int = field(default=0, metadata={
        "help": "Completions per loss forward/backward on each process (0 = the whole step at once). Gradients "
                "accumulate to one optimizer step per GRPO step; TRL normalises cispo/dapo by the step's token count, "
                "so the update is the same, in less memory. The micro-batches keep each group whole "
                "(fast_backend.SharedPrefixMixin): num_generations (or a multiple) encodes each prompt once; a size "
                "that does not fit the group size continues a group in the next micro-batch, its prompt encoded "
                "once in each."})
    require_gpu: bool = field(default=False, metadata={
        "help": "Refuse to fall back to the CPU (the GPU recipe sets it); --backend cpu still runs on the CPU on "
                "purpose."})
    logging_steps: int = field(default=1, metadata={
        "help": "TRL logging interval in steps (metrics.jsonl gets every step regardless)."})
    save_total_limit: int = field(default=0, metadata={"help": "Keep only the newest N checkpoints (0 = keep all)."})
    torch_threads: int = field(default=0, metadata={
        "help": "torch intra-op threads (0 = torch's default, one per core). On a machine busy with other jobs, 1 is "
                "often faster (threads spin-wait on decoding's small ops)."})
    resume: bool = field(default=True, metadata={"help": "Continue from the newest checkpoint in the run directory."})
    eval_batch_size: int = field(default=8, metadata={"help": "Val stories per generate() call."})
    show_titles: int = field(default=3, metadata={
        "help": "Val titles printed beside the originals at each validation."})


def grpo_config(recipe: Recipe, args: TrlArgs, backend: fast_backend.Backend, run_dir: Path,
                extra: dict | None = None):
    """GRPOConfig from the shared recipe + TRL knobs (trl 1.14: no max_prompt_length; prompts
    are length-filtered in utils.load_split). `extra` overrides any field (the stop tokens, a check's
    save strategy)."""
    from trl import GRPOConfig

    kwargs = dict(
        output_dir=str(run_dir),
        **batch_kwargs(recipe, args, world_size()),
        num_generations=recipe.num_generations,
        max_completion_length=recipe.max_completion_tokens,
        temperature=recipe.temperature,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type="constant",  # ART's backend.train uses a constant lr too
        warmup_steps=0,
        max_grad_norm=recipe.max_grad_norm,
        loss_type=recipe.loss_type,
        beta=recipe.beta,
        # CISPO clips the detached importance weight; TRL's default cap is epsilon (0.2), ART's is
        # 1 + epsilon_high (5). One shared knob keeps the two methods' updates the same size.
        **({"epsilon_high": recipe.cispo_max_weight} if recipe.loss_type == "cispo" else {}),
        **optimizer_kwargs(recipe),
        max_steps=recipe.max_steps,
        save_strategy="steps",
        save_steps=recipe.save_every,
        save_total_limit=args.save_total_limit or None,
        logging_steps=args.logging_steps,
        # TRL's own integration logs its keys (train/*, eval/*) beside the shared ones (hn_train/*, hn_val/*,
        # hntitles/runs/tracking.py); its rollout tables are the repo's (completions/), so log_completions is off.
        report_to=[recipe.report_to] if recipe.report_to in ("tensorboard", "wandb") else "none",
        gradient_checkpointing=args.gradient_checkpointing,
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=0,
    )
    kwargs.update(fast_backend.grpo_overrides(backend, args))
    kwargs.update(extra or {})
    return GRPOConfig(**kwargs)


def world_size() -> int:
    """Processes training together: what the launcher (accelerate launch, torchrun, mpirun) told
    this process, read the way accelerate reads it. Not PartialState(): building it here would
    fix the device before GRPOConfig's use_cpu is known."""
    from accelerate.utils.environment import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def batch_kwargs(recipe: Recipe, args: TrlArgs, processes: int) -> dict:
    """GRPOConfig batch fields: prompts_per_step x num_generations completions per optimizer
    step in total, shared by `processes`, the loss run args.loss_micro_batch completions at a
    time (0 = all of a process's at once).

    TRL's generation batch is per_device_train_batch_size x processes x steps_per_generation
    completions and it steps the optimizer every gradient_accumulation_steps micro-batches, so
    steps_per_generation = accumulation x args.steps_per_generation optimizer steps per generation.

    A micro-batch size that does not fit num_generations is not refused: the repo's trainer cuts
    the batch by whole groups (fast_backend.SharedPrefixMixin), and a group that a micro-batch
    boundary (or a process boundary) cuts continues in the next one, its prompt encoded once in
    each part; the update is the same sum. Sizes of one group (or whole groups) encode the fewest
    prompts: micro-batches of 4 with groups of 6 encode 16 prompt parts per step, of 6 encode 8.

    >>> batch_kwargs(Recipe(prompts_per_step=8, num_generations=6), TrlArgs(loss_micro_batch=4), 2)
    {'per_device_train_batch_size': 4, 'gradient_accumulation_steps': 6, 'steps_per_generation': 6}
    >>> batch_kwargs(Recipe(prompts_per_step=8, num_generations=6), TrlArgs(loss_micro_batch=4), 1)
    {'per_device_train_batch_size': 4, 'gradient_accumulation_steps': 12, 'steps_per_generation': 12}
    >>> batch_kwargs(Recipe(prompts_per_step=8, num_generations=6), TrlArgs(loss_micro_batch=6), 1)
    {'per_device_train_batch_size': 6, 'gradient_accumulation_steps': 8, 'steps_per_generation': 8}
    """
    completions = recipe.prompts_per_step * recipe.num_generations
    if completions % processes:
        raise ValueError(f"prompts_per_step x num_generations = {completions} completions per step cannot be split "
                         f"evenly over {processes} processes: change prompts_per_step or the process count")
    per_process = completions // processes
    micro = args.loss_micro_batch or per_process
    if micro < 1 or per_process % micro:
        raise ValueError(f"loss_micro_batch {args.loss_micro_batch} must divide the {per_process} completions each "
                         f"of the {processes} process(es) trains on per step")
    accumulate = per_process // micro
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulate,
            "steps_per_generation": accumulate * args.steps_per_generation}


OPTIMIZER_FIELDS = ("optim", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "learning_rate",
                    "lr_scheduler_type", "max_grad_norm")


def optimizer_used(config) -> dict:
    """What the trainer's optimizer really gets, read from the built GRPOConfig: a knob left empty
    in the recipe shows the engine's own default here (Unsloth's GRPOConfig: adamw_8bit, 0.001)."""
    out = {k: getattr(config, k) for k in OPTIMIZER_FIELDS}
    out["optim"] = str(getattr(out["optim"], "value", out["optim"]))
    out["optimizer_steps"] = "per_step"  # one optimizer step per generation batch (steps_per_generation=1)
    out["engine"] = type(config).__module__ + "." + type(config).__name__
    return out


def optimizer_kwargs(recipe: Recipe) -> dict:
    """GRPOConfig fields for the recipe's optimizer knobs; a knob left empty keeps TRL's default
    (transformers' AdamW, weight decay 0.0, betas 0.9/0.999; Unsloth's GRPOConfig changes the
    optimizer to adamw_8bit and weight decay to 0.001).

    >>> optimizer_kwargs(Recipe(optimizer="adamw", weight_decay=0.1, adam_beta2=0.99))
    {'optim': 'adamw_torch', 'weight_decay': 0.1, 'adam_beta2': 0.99}
    """
    check_optimizer_knobs(recipe)
    if recipe.optimizer_steps == "per_sequence":
        raise ValueError("optimizer_steps 'per_sequence' is not available in the TRL trainer yet "
                         "(TRL takes one optimizer step per generation batch: use 'per_step' or leave it empty)")
    out = {"optim": HF_OPTIM[recipe.optimizer]} if recipe.optimizer else {}
    out.update({k: getattr(recipe, k) for k in ("weight_decay", "adam_beta1", "adam_beta2")
                if getattr(recipe, k) is not None})
    return out
