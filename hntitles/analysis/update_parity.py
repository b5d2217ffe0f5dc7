"""Same batch, same update? One fixed GRPO group through TRL's and ART's own update code, compared.

Two training runs differ in their rollouts as well as in their methods. Here both trainers get
one fixed group (one train story's prompt, num_generations completions sampled once from the
base model at the recipe's temperature with a fixed seed, fixed rewards) from the same LoRA
adapter, `steps` updates in a row, and the adapter deltas are compared step by step: cosine,
relative L2 ||d_art - d_trl|| / ||d_trl||, both norms, per module; the cumulative delta too.

- TRL: the repo's GRPOTrainer class (fast_backend.trainer_class on the CPU backend, with
  trl_config.grpo_config) whose rollout (`_generate_single_turn`) returns the fixed completion
  ids and whose reward function returns the fixed rewards: advantages, logprobs, loss and
  optimizer step are TRL's own.
- ART: ART's LocalBackend with the CPU service (art_cpu_backend.cpu_backend_class with
  art_config's internal_config, train_kwargs and engine_options), fed art.TrajectoryGroups of
  the same completions as the CPU server returns them (art_cpu_server.completion_body:
  `token_id:N` tokens, the logprobs the current policy gives them, so each step is on-policy
  as TRL's is), through `backend.train`: ART's tokenizer, packer, loss_fn, and the engine's step.

Both start from TRL's initial adapter (copied into ART's service) with the recipe's model, lr,
max_grad_norm, loss, beta and LoRA, prompts_per_step 1, and the aligned optimizer (ALIGNED:
torch AdamW, no weight decay, betas 0.9/0.999, one optimizer step per GRPO step, as the demo's
`aligned` setting). Knobs (keyword arguments of compare_updates):
- ArtArgs fields: `score_temperature`, `token_level_loss`, `pack_groups` (default True each: the
  aligned setting's ALIGNED_ART), `scale_rewards`;
- `trl_loss_type`: TRL's loss (default the recipe's, cispo). On-policy (TRL's importance ratio
  is exactly 1 with steps_per_generation 1) 'grpo' has CISPO's gradient with a per-sequence
  mean, ART's own normalisation: with `token_level_loss=False` it isolates that row from the rest;
- `rewards`: 'minilm' (reward_model.MiniLMScorer in this process on the extracted titles),
  'linear' (completion i gets i / (n - 1): fixed, no model), or a list of n numbers.

    python -m hntitles.analysis.update_parity --recipe recipes/cpu.yaml                       # aligned, 3 steps
    python -m hntitles.analysis.update_parity --recipe recipes/cpu.yaml --score_temperature false
    python -m hntitles.analysis.update_parity --recipe recipes/cpu.yaml --token_level_loss false --trl_loss_type grpo
    python -m hntitles.analysis.update_parity --recipe recipes/tiny.yaml --rewards linear --trl_loss_type grpo
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import utils
from hntitles.art import config as art_config
from hntitles.art import cpu_server as art_cpu_server
from hntitles.art.compat import import_art
from hntitles.engines import fast_backend, generation
from hntitles.engines.generation import Completion, sample_completions
from hntitles.runs import settings
from hntitles.trl import config as trl_config

# One optimizer configuration for both: what experiment.SETTINGS["aligned"] sets
# (tests/test_update_parity.py checks it).
ALIGNED = {"optimizer": "adamw", "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
           "optimizer_steps": "per_step"}
ALIGNED_ART = {"pack_groups": True, "score_temperature": True, "token_level_loss": True}  # SETTING_ART_FLAGS
REWARDS = ("minilm", "linear")


@dataclass
class FixedGroup:
    """One prompt, its completions (token ids, text, the logprobs the server returned) and their rewards."""

    story_id: str
    messages: list[dict]
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float]
    logprob_temperature: float  # what the served logprobs divide the logits by


@dataclass
class ParityArgs:
    """hntitles/analysis/update_parity.py's own flags (the recipe's come from settings.Recipe)."""

    steps: int = field(default=3, metadata={"help": "Consecutive updates on the same group."})
    story: int = field(default=0, metadata={"help": "Index of the train story whose prompt is used."})
    rewards: str = field(default="minilm", metadata={"help": "'minilm' or 'linear' (i / (n - 1))."})
    score_temperature: bool = field(default=True, metadata={
        "help": "ART's CPU engine scores tokens at the sampling temperature (ArtArgs.score_temperature)."})
    token_level_loss: bool = field(default=True, metadata={
        "help": "ART's CPU engine weighs every completion token the same (ArtArgs.token_level_loss)."})
    pack_groups: bool = field(default=True, metadata={"help": "ArtArgs.pack_groups."})
    scale_rewards: bool = field(default=True, metadata={"help": "ArtArgs.scale_rewards."})
    trl_loss_type: str = field(default="", metadata={"help": "TRL's loss_type (empty: the recipe's)."})
    threads: int = field(default=0, metadata={"help": "Torch CPU threads (0 = torch's default)."})


def parity_settings(recipe: settings.Recipe, knobs: dict) -> tuple[settings.Recipe, art_config.ArtArgs, str]:
    """(recipe for both, ART's args, TRL's loss type) from the recipe, ALIGNED and the knobs.

    >>> r, a, loss = parity_settings(settings.Recipe(prompts_per_step=4), {"score_temperature": False})
    >>> r.prompts_per_step, r.optimizer_steps, a.pack_groups, a.score_temperature, loss
    (1, 'per_step', True, False, 'cispo')
    """
    art_fields = {f.name for f in dataclasses.fields(art_config.ArtArgs)}
    unknown = sorted(set(knobs) - art_fields - {"trl_loss_type"})
    if unknown:
        raise TypeError(f"unknown knob(s) {unknown}: use ArtArgs fields or trl_loss_type")
    recipe = dataclasses.replace(recipe, prompts_per_step=1, **ALIGNED)
    recipe.check()
    args = art_config.ArtArgs(backend="cpu", **{**ALIGNED_ART, **{k: v for k, v in knobs.items() if k in art_fields}})
    return recipe, args, knobs.get("trl_loss_type") or recipe.loss_type


def compare_updates(recipe: settings.Recipe, steps: int = 3, *, story: int = 0,
                    rewards: str | Sequence[float] = "minilm", **knobs) -> list[dict]:
    """One dict per step: TRL's and ART's updates on the same fixed group from the same adapter.

    Each row: step, cosine and rel_l2 (||d_art - d_trl|| / ||d_trl||) of that step's adapter
    deltas, trl_norm / art_norm, the same for the delta since the start (cum_*), per-module
    cosines (module_cosine, min_module_cosine), each side's grad norm (before clipping),
    entropy and loss as its library logs them, and at step 1 the largest gap between the served
    logprobs and ART's recomputation (served_gap) and the group itself (group: story id, rewards,
    completion lengths, texts). Knobs: see the module docstring.
    """
    recipe, args, trl_loss = parity_settings(recipe, knobs)
    settings.set_seed(recipe.seed)
    backend = fast_backend.Backend("cpu", "cpu", use_vllm=False)
    model, tokenizer = fast_backend.load_policy(backend, recipe, trl_config.TrlArgs())
    group = fixed_group(recipe, args, model, tokenizer, story, rewards)
    initial = adapter_state(model)
    trl_states, trl_logs = trl_updates(recipe, trl_loss, group, model, tokenizer, steps)
    art_states, art_logs = asyncio.run(art_updates(recipe, args, group, initial, steps))
    rows = compare_states(initial, trl_states, art_states)
    for row, t, a in zip(rows, trl_logs, art_logs, strict=True):
        row.update(trl_grad_norm=t.get("grad_norm"), art_grad_norm=a.get("loss/grad_norm"),
                   trl_entropy=t.get("entropy"), art_entropy=a.get("loss/entropy"),
                   trl_loss=t.get("loss"), art_loss=a.get("loss/train"))
    rows[0]["served_gap"] = art_logs[0].get("served_gap")
    rows[0]["group"] = {"story_id": group.story_id, "rewards": group.rewards,
                        "lengths": [len(c.token_ids) for c in group.completions],
                        "titles": [c.text for c in group.completions]}
    return rows


# --------------------------------------------------------------------------------------
# The fixed group
# --------------------------------------------------------------------------------------


def fixed_group(recipe: settings.Recipe, args: art_config.ArtArgs, model, tokenizer, story: int,
                rewards: str | Sequence[float]) -> FixedGroup:
    """num_generations completions of train story `story`, sampled once (seeded) from `model`
    as the CPU server samples them, with the logprobs it returns under `args`, and their rewards."""
    rows, _ = utils.load_split(recipe, recipe.train_split, tokenizer, recipe.max_train_stories)
    row = dict(rows[story])
    messages = utils.title_messages(row["scraped_body"])
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)  # as art_cpu_server tokenizes
    options = art_config.engine_options(recipe, args)
    temperature = art_cpu_server.logprob_temperature(options, recipe.temperature)
    model.eval()
    (completions,) = sample_completions(
        model, tokenizer, [prompt], [recipe.num_generations], adapter=True, temperature=recipe.temperature,
        max_tokens=recipe.max_completion_tokens, stops=utils.stop_strings(recipe), logprobs=True,
        seed=settings.derived_seed(recipe.seed, "update-parity", story), logprob_temperature=temperature)
    return FixedGroup(str(row.get("id")), messages, prompt, completions,
                      group_rewards(rewards, [c.text for c in completions], row), temperature)


def group_rewards(rewards: str | Sequence[float], texts: list[str], row: dict) -> list[float]:
    """The fixed rewards: MiniLM's score of each extracted title, i / (n - 1), or the given list;
    a ValueError when they do not vary (no advantage to learn from).

    >>> group_rewards("linear", ["a", "b", "c"], {})
    [0.0, 0.5, 1.0]
    """
    if rewards == "minilm":
        from hntitles.reward.scorers import MiniLMScorer

        stories = [{"title": utils.extract_title(t)[0], "scraped_body": row["scraped_body"]} for t in texts]
        values = [score for score, _ in MiniLMScorer().score(stories)]
    elif rewards == "linear":
        values = [i / (len(texts) - 1) for i in range(len(texts))]
    elif isinstance(rewards, str):
        raise ValueError(f"rewards {rewards!r}: use one of {REWARDS} or a list of numbers")
    else:
        values = [float(r) for r in rewards]
    if len(values) != len(texts):
        raise ValueError(f"{len(values)} rewards for {len(texts)} completions")
    if max(values) - min(values) <= 1e-9:
        raise ValueError(f"the group's rewards do not vary ({values}): nothing to learn; pick another story or rewards")
    return values


def served_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """What the CPU server returns for these tokens under the current `model` (adapter on):
    log-softmax of the logits / `temperature` (art_cpu_server.logprob_temperature)."""
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def adapter_state(model) -> dict:
    """The LoRA weights by PEFT's adapter-independent names, copied (float32)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().float() for k, v in get_peft_model_state_dict(model).items()}


# --------------------------------------------------------------------------------------
# TRL: the repo's GRPOTrainer, its rollout replaced by the fixed group
# --------------------------------------------------------------------------------------


def trl_updates(recipe: settings.Recipe, loss_type: str, group: FixedGroup, model, tokenizer,
                steps: int) -> tuple[list[dict], list[dict]]:
    """`steps` steps of the repo's TRL trainer on the fixed group: the adapter and TRL's log after each."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    backend = fast_backend.Backend("cpu", "cpu", use_vllm=False)
    states: list[dict] = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args_, state, control, model=None, **kw):
            states.append(adapter_state(model))

    with tempfile.TemporaryDirectory(prefix="parity-trl-") as tmp:
        config = trl_config.grpo_config(
            dataclasses.replace(recipe, max_steps=steps, loss_type=loss_type), trl_config.TrlArgs(), backend,
            Path(tmp), {"save_strategy": "no", "disable_tqdm": True})
        fast_backend.stop_at_tokens(backend, model, config,
                                    generation.stop_token_ids(tokenizer, utils.stop_strings(recipe)))
        trainer = fixed_rollout_class(backend, group)(
            model=model, reward_funcs=[fixed_reward(group)], args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"prompt": group.messages}]), callbacks=[Snapshot()])
        trainer.remove_callback(PrinterCallback)  # TRL's log dicts: the rows carry what matters
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return states, logs


def fixed_rollout_class(backend: fast_backend.Backend, group: FixedGroup):
    """fast_backend.trainer_class(backend) whose rollouts are the fixed group's completions."""

    class FixedRollouts(fast_backend.trainer_class(backend)):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            if any(list(p) != group.prompt_ids for p in prompt_ids):
                raise RuntimeError("TRL tokenized the prompt differently from the CPU server: the groups differ")
            if len(prompt_ids) != len(group.completions):
                raise RuntimeError(f"TRL asked for {len(prompt_ids)} rollouts, the group has {len(group.completions)}")
            return [list(c.token_ids) for c in group.completions], None

    return FixedRollouts


def fixed_reward(group: FixedGroup):
    """A TRL reward function that returns the group's rewards (the completions must be the group's)."""
    expected = [list(c.token_ids) for c in group.completions]

    def fixed_rewards(prompts, completions, completion_ids=None, **kw):
        if completion_ids is not None and [list(c) for c in completion_ids] != expected:
            raise RuntimeError("TRL scored completions that are not the fixed group's")
        return list(group.rewards)

    return fixed_rewards


# --------------------------------------------------------------------------------------
# ART: LocalBackend with the CPU service, fed the group as the server returns it
# --------------------------------------------------------------------------------------


async def art_updates(recipe: settings.Recipe, args: art_config.ArtArgs, group: FixedGroup, initial: dict,
                      steps: int) -> tuple[list[dict], list[dict]]:
    """`steps` calls of ART's `backend.train` on the group from adapter `initial`: the adapter and ART's
    metrics after each."""
    from hntitles.art.cpu_backend import cpu_backend_class

    art = import_art()
    from peft import set_peft_model_state_dict

    states, logs = [], []
    plan = art_config.plan(recipe, args)
    with tempfile.TemporaryDirectory(prefix="parity-art-") as tmp:
        backend = cpu_backend_class()(path=tmp, options=plan.engine_options)
        model = art.TrainableModel(name="parity", project="parity", base_model=recipe.model, base_path=tmp,
                                   _internal_config=plan.internal_config)
        try:
            await model.register(backend)
            service = await backend._get_service(model)
            set_peft_model_state_dict(service.model, initial)
            for step in range(steps):
                trajectories, gap = served_trajectories(art, group, service, first=step == 0)
                result = await backend.train(model, [trajectories], **plan.train_kwargs)
                states.append(adapter_state(service.model))
                logs.append({**result.metrics, "served_gap": gap})
        finally:
            await backend.close()
    return states, logs


def served_trajectories(art, group: FixedGroup, service, first: bool):
    """The group as an art.TrajectoryGroup of served choices, with the logprobs the server gives
    them now: the sampled ones at the first step (and their largest gap to a recomputation),
    the current policy's afterwards (each step on-policy, as TRL's)."""
    from openai.types.chat import ChatCompletion

    service.model.eval()
    completions, gap = [], 0.0
    for c in group.completions:
        now = served_logprobs(service.model, group.prompt_ids, list(c.token_ids), group.logprob_temperature)
        gap = max([gap, *(abs(a - b) for a, b in zip(now, c.logprobs or [], strict=True))])
        completions.append(c if first else dataclasses.replace(c, logprobs=now))
    body = art_cpu_server.completion_body({"model": f"{service.model_name}@{service.step}"}, len(group.prompt_ids),
                                          completions, service.tokenizer)
    choices = ChatCompletion.model_validate(body).choices
    trajectories = [art.Trajectory(messages_and_choices=[*group.messages, choice], reward=reward)
                    for choice, reward in zip(choices, group.rewards, strict=True)]
    return art.TrajectoryGroup(trajectories), (gap if first else None)


# --------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------


def compare_states(initial: dict, trl_states: list[dict], art_states: list[dict]) -> list[dict]:
    """Per step: cosine, relative L2 and norms of the two updates, of the deltas since the start,
    and per module (q_proj, ..., lora_A / lora_B, over all layers)."""
    rows = []
    for k, (trl, art) in enumerate(zip(trl_states, art_states, strict=True)):
        before_trl, before_art = (initial, initial) if k == 0 else (trl_states[k - 1], art_states[k - 1])
        d_trl, d_art = _delta(trl, before_trl), _delta(art, before_art)
        cos, rel, n_trl, n_art = vector_stats(_flat(d_trl), _flat(d_art))
        cum = vector_stats(_flat(_delta(trl, initial)), _flat(_delta(art, initial)))
        modules = {}
        for name in sorted({module_of(key) for key in d_trl}):
            keys = [key for key in d_trl if module_of(key) == name]
            mod = vector_stats(_flat(d_trl, keys), _flat(d_art, keys))
            if mod[2] > 0 and mod[3] > 0:  # lora_A does not move at step 1 (lora_B starts at 0)
                modules[name] = mod[0]
        rows.append({"step": k + 1, "cosine": cos, "rel_l2": rel, "trl_norm": n_trl, "art_norm": n_art,
                     "cum_cosine": cum[0], "cum_rel_l2": cum[1], "module_cosine": modules,
                     "min_module_cosine": min(modules.values(), default=math.nan)})
    return rows


def vector_stats(trl, art) -> tuple[float, float, float, float]:
    """(cosine, ||art - trl|| / ||trl||, ||trl||, ||art||); nan where a norm is 0."""
    n_trl, n_art = float(trl.norm()), float(art.norm())
    cos = float(trl @ art) / (n_trl * n_art) if n_trl and n_art else math.nan
    rel = float((art - trl).norm()) / n_trl if n_trl else math.nan
    return cos, rel, n_trl, n_art


def module_of(key: str) -> str:
    """'q_proj.lora_B' from PEFT's 'base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight'.

    >>> module_of("base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight")
    'q_proj.lora_B'
    """
    parts = key.split(".")
    return ".".join(parts[-3:-1])


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def _flat(delta: dict, keys: Sequence[str] | None = None):
    import torch

    return torch.cat([delta[k].flatten().double() for k in (keys if keys is not None else sorted(delta))])


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (numbers rounded for reading; the dicts keep them whole)."""
    def num(value, spec: str = ".4f") -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    lines = ["| step | cosine | rel. L2 | norm TRL | norm ART | cumulative cosine | cumulative rel. L2 | "
             "min module cosine | grad norm TRL / ART | entropy TRL / ART |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['step']} | {num(r['cosine'])} | {num(r['rel_l2'])} | {num(r['trl_norm'], '.3e')} | "
            f"{num(r['art_norm'], '.3e')} | {num(r['cum_cosine'])} | {num(r['cum_rel_l2'])} | "
            f"{num(r['min_module_cosine'])} | {num(r.get('trl_grad_norm'), '.3f')} / "
            f"{num(r.get('art_grad_norm'), '.3f')} | {num(r.get('trl_entropy'), '.3f')} / "
            f"{num(r.get('art_entropy'), '.3f')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Parse `--recipe` + ParityArgs flags, compare, print the table."""
    from hntitles.runs import procs

    recipe, cli = settings.parse_args((settings.Recipe, ParityArgs), "shared", argv,
                                      description=__doc__.splitlines()[0])
    procs.set_threads(cli.threads)
    knobs = {"score_temperature": cli.score_temperature, "token_level_loss": cli.token_level_loss,
             "pack_groups": cli.pack_groups, "scale_rewards": cli.scale_rewards, "trl_loss_type": cli.trl_loss_type}
    rows = compare_updates(recipe, cli.steps, story=cli.story, rewards=cli.rewards, **knobs)
    print(f"{Path(recipe.model).name}, T={recipe.temperature}, {recipe.num_generations} completions, "
          f"knobs {knobs}, rewards {cli.rewards}")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
