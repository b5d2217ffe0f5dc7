"""ART's own training loop on the CPU: LocalBackend with a CPU ModelService (no vLLM, no Unsloth).

OpenPipe ART 0.5.18's `art.local.LocalBackend` does everything that does not touch a GPU
itself and hands the rest to a `ModelService` (`art/local/service.py`): start an
OpenAI-compatible server, and `train(disk_packed_tensors, config, dev_config)`. On a GPU that
service is Unsloth + a vLLM subprocess. `cpu_backend_class()` returns a LocalBackend subclass
whose service is `CpuModelService` below; nothing in the installed package is patched.

    python train.py --recipe recipes/cpu.yaml --backend cpu      # what `make train-art` runs on a CPU
    python -m hntitles.art.cpu_backend --recipe recipes/tiny.yaml         # serve the tiny policy, print one completion

What stays ART's own code (called, not copied): `register` (model.json, trajectory migration),
the `name@step` inference names, the step read from checkpoint folders, `delete_checkpoints`,
`tokenize_trajectory_groups` (advantages, zero-advantage drops, the `token_id:N` rollout ids),
`packed_tensors_from_tokenized_results` (weights, batch-wide advantage scaling, row shuffle),
`build_rl_train_configs`, `loss_fn` (cispo/ppo clipping, KL folded into the advantages),
metric aggregation and `model.log`.

What is ours: the service (a PEFT LoRA model in fp32 on the CPU), the inference server
(hntitles/art/cpu_server.py: /v1/chat/completions and /v1/models on 127.0.0.1, generation through
generation.sample_completions, one prefill per prompt), the per-token logprobs of a
row (log-softmax of the LM head at the completion positions only), and two workarounds for
a CPU install: `_get_service` is overridden (ART's imports `art.megatron`, not installed),
and a model registered here gets ART's own "no WANDB_API_KEY -> no wandb run" answer without
ART importing wandb first (`LocalBackend.train` calls `model._get_wandb_run()`, which imports
wandb before looking at the key; wandb is only in ART's `[backend]` extra).

GPU behaviours reproduced by default (a CPU run predicts a GPU run):
- one trajectory per row, full prompt each (`_supports_result_packing = False`);
- one optimizer step per row (`run_unsloth_rl_training`), learning rate set per row;
- AdamW with ART's trainer defaults (beta1 0.9, beta2 0.99, weight decay 0.1 forced on every
  parameter group as ART does), gradient clipping at trainer_args.max_grad_norm;
- the reference for kl_penalty_coef is the base model (adapter disabled);
- a checkpoint `checkpoints/NNNN/` (PEFT adapter) after every train call, step 0 saved when
  the server starts, the adapter of the newest checkpoint loaded at start;
- rollout logprobs are the raw model's (temperature 1, as vLLM's default raw logprobs).

Where it differs (and why):
- the optimizer is torch AdamW in fp32: ART's `paged_adamw_8bit` (bitsandbytes) needs CUDA;
- checkpoints also hold `optimizer.pt` (the name ART's own Unsloth context uses) and a resumed
  run continues the Adam moments; LocalBackend saves only the adapter, so on a GPU a restarted
  run starts with fresh moments;
- Unsloth's first-call warm-up (the first row fed once more at learning rate 1e-9, which also
  nudges Adam's moments) is not done: it exists to compile kernels;
- rows are cut at their last real token instead of padded to a multiple of 2048 (causal
  attention makes the padding irrelevant to the loss; it only costs time);
- sampling is plain temperature sampling (top-k and top-p off, as vLLM's defaults) from
  transformers' sampler: same distribution as vLLM, not the same random numbers;
- the server holds the current policy (`name@step`) and the base model, not older steps.

Knobs beyond the GPU behaviour (`EngineOptions`, set from the recipe by art_config.engine_options):
- `pack_groups`: ART's packer puts trajectories side by side in one row with a group's prompt
  stored once (the positions and block mask ART's packer records are honoured);
- `optimizer_steps="per_step"`: gradients of all rows of an ART step are averaged and one
  optimizer step is taken (TRL's way), instead of one per row;
- `score_temperature=T` (ArtArgs.score_temperature: the recipe's temperature): tokens scored at
  the sampling temperature, as TRL does: the trainer's logprobs and entropies are log-softmax of
  logits / T, and the server's returned logprobs are at the request's temperature, so CISPO's
  importance ratio stays 1 on-policy. ART's own way (None) scores at temperature 1 whatever the
  sampling temperature;
- `token_level_loss`: every completion token of an optimizer step weighs the same in the loss
  (TRL's cispo/dapo normalisation) instead of ART's 1 / trajectory length; the packer's weights
  are replaced by the assistant mask before loss_fn, and rows count by their completion tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from hntitles.art.compat import import_art
from hntitles.art.cpu_server import InferenceServer

# ART's trainer defaults (art/dev/get_model_config.py, art/unsloth/train.py in 0.5.18): used
# when the model's _internal_config does not set a value. Read from the package, not imported:
# get_model_config imports art.megatron.
ART_PEFT_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "random_state": 3407,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
ART_TRAINER_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.99, "max_grad_norm": 0.1,
                        "optim": "paged_adamw_8bit", "weight_decay": 0.1, "seed": 42}
ART_RL_WEIGHT_DECAY = 0.1  # run_unsloth_rl_training sets it on every param group, whatever the config says
OPTIMIZER_STEPS = ("per_sequence", "per_step")
CPU_OPTIMIZERS = {"paged_adamw_8bit": "torch AdamW (fp32): paged_adamw_8bit needs bitsandbytes on CUDA",
                  "adamw_8bit": "torch AdamW (fp32): adamw_8bit needs bitsandbytes on CUDA",
                  "adamw_torch": "torch AdamW", "adamw": "torch AdamW"}


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass
class EngineOptions:
    """What the CPU engine does beyond LocalBackend's GPU behaviour (defaults: none)."""

    pack_groups: bool = False  # True: ART's packer shares rows (a group's prompt stored once)
    optimizer_steps: str = "per_sequence"  # "per_step": one optimizer step per ART step
    # None: ART's way, tokens scored at temperature 1 (its loss, vLLM's raw logprobs). A temperature T:
    # the trainer scores log-softmax(logits / T) and the server returns logprobs at the request's
    # temperature, as TRL scores them (train.py sets the recipe's sampling temperature).
    score_temperature: float | None = None
    # False: ART's loss weights, each trajectory's tokens 1 / its length (a per-sequence mean). True:
    # every completion token of the step weighs the same (TRL's cispo/dapo: tokens summed / their number).
    token_level_loss: bool = False


def engine_settings(internal_config: dict | None, options: EngineOptions) -> dict:
    """The values the engine really uses, from ART's internal config over ART's defaults.

    >>> s = engine_settings({"trainer_args": {"weight_decay": 0.0}}, EngineOptions())
    >>> s["optimizer"], s["weight_decay"], s["adam_betas"], s["optimizer_steps"], s["logprob_temperature"]
    ('torch AdamW (fp32): paged_adamw_8bit needs bitsandbytes on CUDA', 0.0, [0.9, 0.99], 'per_sequence', 1.0)
    """
    if options.optimizer_steps not in OPTIMIZER_STEPS:
        raise ValueError(f"optimizer_steps {options.optimizer_steps!r} is not one of {OPTIMIZER_STEPS}")
    if options.score_temperature is not None and not options.score_temperature > 0:
        raise ValueError(f"score_temperature must be > 0 (or None: temperature 1), got {options.score_temperature}")
    config = internal_config or {}
    peft = {**ART_PEFT_DEFAULTS, **{k: v for k, v in config.get("peft_args", {}).items() if k in ART_PEFT_DEFAULTS}}
    trainer = {**ART_TRAINER_DEFAULTS, **config.get("trainer_args", {})}
    optim = trainer["optim"]
    if optim not in CPU_OPTIMIZERS:
        raise ValueError(f"optimizer {optim!r} has no CPU equivalent here (use one of {sorted(CPU_OPTIMIZERS)})")
    # ART forces 0.1 on the GPU; a weight_decay written into trainer_args is a deliberate choice.
    decay = config.get("trainer_args", {}).get("weight_decay", ART_RL_WEIGHT_DECAY)
    return {"engine": "art_cpu_backend.CpuModelService (fp32, PEFT LoRA)", "optimizer": CPU_OPTIMIZERS[optim],
            "requested_optim": optim, "weight_decay": float(decay),
            "adam_betas": [float(trainer["adam_beta1"]), float(trainer["adam_beta2"])], "adam_eps": 1e-8,
            "max_grad_norm": float(trainer["max_grad_norm"]), "seed": int(trainer.get("seed", 42)),
            "lora": {k: peft[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "random_state")},
            "pack_groups": options.pack_groups, "optimizer_steps": options.optimizer_steps,
            "logprob_temperature": float(options.score_temperature or 1.0),
            "loss_weights": "token (every completion token the same)" if options.token_level_loss
            else "1 / trajectory length (ART's)",
            "rows": "packed (ART's packer, prompt once per row)" if options.pack_groups else "one trajectory per row"}


# --------------------------------------------------------------------------------------
# The backend: LocalBackend with the CPU service
# --------------------------------------------------------------------------------------


def cpu_backend_class():
    """LocalBackend whose ModelService runs on the CPU (built on first use: `art` loads lazily)."""
    import_art()
    from art.local import LocalBackend

    class CpuBackend(LocalBackend):
        """`art.local.LocalBackend` with `CpuModelService` in place of Unsloth + vLLM."""

        def __init__(self, *, path: str, options: EngineOptions | None = None):
            super().__init__(in_process=True, path=path)
            self.options = options or EngineOptions()
            self._supports_result_packing = self.options.pack_groups  # read by LocalBackend._get_packed_tensors

        async def register(self, model) -> None:
            await super().register(model)
            if model.trainable and "WANDB_API_KEY" not in os.environ:
                # ART's own answer without a key (model._get_wandb_run returns None), minus its
                # unconditional `import wandb`; an instance attribute, the class is untouched.
                object.__setattr__(model, "_get_wandb_run", lambda: None)

        async def _get_service(self, model):
            from art.utils.output_dirs import get_model_dir

            if model.name not in self._services:
                self._services[model.name] = CpuModelService(
                    model_name=model.name, base_model=model.base_model, config=dict(model._internal_config or {}),
                    output_dir=get_model_dir(model=model, art_path=self._path), options=self.options)
            return self._services[model.name]

    return CpuBackend


# --------------------------------------------------------------------------------------
# The service: model, checkpoints, training
# --------------------------------------------------------------------------------------


def _checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"{step:04d}")  # ART's get_step_checkpoint_dir layout


class CpuModelService:
    """ART's ModelService protocol on the CPU: the policy, its optimizer, its server."""

    def __init__(self, model_name: str, base_model: str, config: dict, output_dir: str,
                 options: EngineOptions | None = None):
        self.model_name, self.base_model, self.output_dir = model_name, base_model, output_dir
        self.options = options or EngineOptions()
        self.settings = engine_settings(config, self.options)
        self.lock = threading.RLock()  # generation and training share one model
        self.step = 0
        self.server: InferenceServer | None = None
        self._load()

    def _load(self) -> None:
        import_art()  # before anything imports art: its transformers patch must be undone here
        import torch
        from art.utils.get_model_step import get_step_from_dir
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=torch.float32)
        lora = self.settings["lora"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lora["random_state"])  # the adapter's init, as Unsloth's random_state
            self.model = get_peft_model(base, LoraConfig(
                r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
                target_modules=list(lora["target_modules"]), bias="none", task_type="CAUSAL_LM"))
        self.model.eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=0.0, betas=tuple(self.settings["adam_betas"]),
                                           eps=self.settings["adam_eps"], weight_decay=self.settings["weight_decay"])
        self.step = get_step_from_dir(self.output_dir)
        if os.path.isdir(_checkpoint_dir(self.output_dir, self.step)):
            self._restore(_checkpoint_dir(self.output_dir, self.step))

    def _restore(self, path: str) -> None:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(os.path.join(path, "adapter_model.safetensors")))
        if os.path.exists(os.path.join(path, "optimizer.pt")):
            self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu"))
        print(f"[art-cpu] loaded checkpoint {path}")

    def save_checkpoint(self, step: int) -> str:
        """Adapter + optimizer into checkpoints/NNNN, written aside and renamed into place.

        ART reads the step from the highest numeric folder: a half-written one (a kill during
        the save) must never carry a number, so the files go to `.tmp-NNNN` first.
        """
        import torch

        final = _checkpoint_dir(self.output_dir, step)
        tmp = os.path.join(os.path.dirname(final), f".tmp-{step:04d}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with self.lock:
            self.model.save_pretrained(tmp)
            torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        if os.path.exists(final):  # ART's skip path copies a checkpoint forward; ours replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    # -- ModelService protocol ------------------------------------------------------------

    async def start_openai_server(self, config: dict | None) -> tuple[str, int]:
        """Save step 0 when there is no checkpoint (as UnslothService does) and serve on loopback.

        LocalBackend proposes a port it probed (`server_args.port`); binding port 0 instead
        lets the OS pick one that is free at bind time (no race with other processes).
        """
        if not os.path.isdir(_checkpoint_dir(self.output_dir, self.step)):
            self.save_checkpoint(self.step)
        if self.server is None:
            self.server = InferenceServer(self).start()
        return "127.0.0.1", self.server.port

    async def vllm_engine_is_sleeping(self) -> bool:
        return False

    async def register_lora_for_step(self, step: int, checkpoint_dir: str) -> None:
        """LocalBackend's skip path copied the checkpoint forward: serve it under the new step."""
        self.step = step

    async def train(self, disk_packed_tensors: dict, config, _config: dict, verbose: bool = False):
        """Yield one metrics dict per optimizer step, then save checkpoint step + 1."""
        from art.metrics_taxonomy import TRAIN_GRADIENT_STEPS_KEY
        from art.preprocessing.pack import packed_tensors_from_dir

        unsupported = [k for k in ("precalculate_logprobs", "kl_ref_adapter_path") if _config.get(k)]
        if unsupported:
            raise NotImplementedError(f"the CPU engine does not implement {unsupported}")
        rows = trimmed_rows(packed_tensors_from_dir(**disk_packed_tensors))
        if self.options.token_level_loss:
            for row in rows:  # in place of the packer's 1 / trajectory length (its advantage rescale stays)
                row["weights"] = row["assistant_mask"].to(row["weights"].dtype)
        steps = len(rows) if self.options.optimizer_steps == "per_sequence" else 1
        groups = [rows[i:i + 1] for i in range(len(rows))] if steps == len(rows) else [rows]
        for chunk in groups:
            metrics = await asyncio.to_thread(self._optimizer_step, chunk, config, _config)
            yield {**metrics, TRAIN_GRADIENT_STEPS_KEY: float(steps)}
        await asyncio.to_thread(self.save_checkpoint, self.step + 1)
        self.step += 1

    def _optimizer_step(self, rows: list[dict], config, _config: dict) -> dict[str, float]:
        """Loss of each row (ART's loss_fn), gradients averaged over `rows` (row_shares), clip, one AdamW step."""
        import torch

        with self.lock:
            self.model.train()
            try:
                self.optimizer.zero_grad(set_to_none=True)
                sums: dict[str, float] = {}
                for row, share in zip(rows, row_shares(rows, self.options.token_level_loss), strict=True):
                    loss, parts = row_loss(self.model, row, config, _config, self.options.score_temperature or 1.0)
                    (loss * share).backward()
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v * share
                lr = config.learning_rate * lr_multiplier(rows, _config)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.settings["max_grad_norm"])
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            finally:
                self.model.eval()
        return {**sums, "loss/grad_norm": float(grad_norm), "loss/learning_rate": lr}

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


# --------------------------------------------------------------------------------------
# Training math: rows of ART's packed tensors -> logprobs -> ART's loss_fn
# --------------------------------------------------------------------------------------


def trimmed_rows(packed: dict) -> list[dict]:
    """Each row of ART's packed tensors cut at its last real token (group id -1 is padding).

    Padding sits after every real token and attention is causal, so the loss of a row does
    not depend on it; LocalBackend pads to a multiple of 2048, which on a CPU is pure cost.
    """
    rows = []
    for i in range(packed["tokens"].shape[0]):
        real = (packed["group_ids"][i] != -1).nonzero()
        length = int(real[-1]) + 1 if len(real) else 0
        if length:
            rows.append({k: v[i:i + 1, :length].clone() for k, v in packed.items()
                         if hasattr(v, "dim") and v.dim() == 2})
    return rows


def attention_for(row: dict):
    """(attention mask, position ids) for one row: plain causal, or ART's packed block mask.

    ART's unsloth/train.py `calculate_mask`: token i sees token j <= i when j is in its own
    segment or j is the prompt its segment continues (parent_ids[i] == group_ids[j]).
    """
    import torch

    group, parent, positions = row["group_ids"][0], row["parent_ids"][0], row["input_pos"][0]
    length = group.shape[0]
    if bool((positions == torch.arange(length)).all()):
        return None, None  # one trajectory (positions never restart): the block mask is the causal one
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal & ((group[:, None] == group[None, :]) | (parent[:, None] == group[None, :]))
    return mask[None, None], positions[None]


def row_logprobs(model, row: dict, *, reference: bool = False, temperature: float = 1.0):
    """log p(token[t+1] | ..t) and the entropy at t, where ART's loss reads them.

    Returns full-length [1, L] tensors (zeros where the loss does not look), as ART's
    `_calculate_logprobs` would, but the LM head runs only where the loss looks (`logits_to_keep`
    with indices): the logprobs at the predictions of assistant tokens, the entropies there and
    one position further (ART's loss_fn shifts the entropies once more than the logprobs, so its
    entropy metric reads the distribution after each assistant token, the last one's included).
    `temperature` 1 is ART's (raw logits); T scores log-softmax(logits / T), TRL's `selective_log_softmax`.
    """
    import torch

    tokens = row["tokens"]
    length = tokens.shape[1]
    wanted = row["assistant_mask"][0, 1:].nonzero().flatten()  # predictions of assistant tokens
    keep = torch.unique(torch.cat([wanted, (wanted + 1).clamp(max=length - 1)]))  # sorted
    mask, positions = attention_for(row)
    kwargs = {"attention_mask": mask, "position_ids": positions} if mask is not None else {}
    context = model.disable_adapter() if reference else contextlib.nullcontext()
    with context, (torch.no_grad() if reference else contextlib.nullcontext()):
        logits = model(input_ids=tokens, logits_to_keep=keep, use_cache=False, **kwargs).logits[0].float()
    logp_all = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    at_wanted = torch.searchsorted(keep, wanted)
    picked = logp_all[at_wanted].gather(-1, tokens[0, wanted + 1].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zeros = torch.zeros(length, dtype=picked.dtype)
    return (zeros.index_copy(0, wanted, picked)[None],
            zeros.index_copy(0, keep, entropy.detach())[None])


def row_loss(model, row: dict, config, _config: dict, temperature: float = 1.0):
    """ART's loss_fn on one row, tokens scored at `temperature`; returns (policy loss, metrics of the row)."""
    from art.loss import loss_fn

    new_logprobs, entropies = row_logprobs(model, row, temperature=temperature)
    ref_logprobs = (row_logprobs(model, row, reference=True, temperature=temperature)[0]
                    if config.kl_penalty_coef > 0 else None)
    loss = loss_fn(row, new_logprobs, ref_logprobs, entropies, _config)
    parts = {"loss/train": float(loss.policy_loss.detach())}
    if loss.entropy is not None:
        parts["loss/entropy"] = float(loss.entropy)
    if loss.kl_policy_ref is not None:
        parts["loss/kl_policy_ref"] = float(loss.kl_policy_ref)
    return loss.policy_loss, parts


def row_shares(rows: list[dict], token_level: bool) -> list[float]:
    """What each row's loss (a mean over its own completion tokens) counts in the step: 1 / rows, or
    with `token_level` its share of the step's completion tokens (the step's loss is then a mean
    over all of them, TRL's normalisation)."""
    if not token_level:
        return [1.0 / len(rows)] * len(rows)
    tokens = [float(r["assistant_mask"][0, 1:].sum()) for r in rows]  # what loss_fn divides each row by
    return [t / sum(tokens) for t in tokens]


def lr_multiplier(rows: list[dict], _config: dict) -> float:
    """ART's num_trajectories_learning_rate_multiplier: (trajectories) ** power, 1 by default."""
    import torch

    power = _config.get("num_trajectories_learning_rate_multiplier_power", 0.0)
    if not power:
        return 1.0
    group = torch.cat([r["group_ids"][0] for r in rows])
    parent = torch.cat([r["parent_ids"][0] for r in rows])
    return float((torch.unique(group).numel() - torch.unique(parent).numel()) ** power)


# --------------------------------------------------------------------------------------
# Smoke check
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Load the recipe's model, serve it, print one completion with its logprobs."""
    import argparse
    import tempfile

    from openai import OpenAI

    import utils
    from hntitles.runs import settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    cli = parser.parse_args(argv)
    (recipe,) = settings.parse_args((settings.Recipe,), "art", ["--recipe", cli.recipe])
    with tempfile.TemporaryDirectory() as tmp:
        service = CpuModelService("smoke", recipe.model, {}, tmp)
        host, port = asyncio.run(service.start_openai_server(None))
        try:
            client = OpenAI(base_url=f"http://{host}:{port}/v1", api_key="none")
            resp = client.chat.completions.create(
                model="smoke@0", messages=utils.title_messages("A new compiler for Rust ships today."),
                max_tokens=recipe.max_completion_tokens, temperature=recipe.temperature, logprobs=True,
                stop=list(utils.stop_strings(recipe)) or None)
            choice = resp.choices[0]
            print(f"{choice.message.content!r} ({choice.finish_reason}); logprobs "
                  f"{[round(t.logprob, 3) for t in choice.logprobs.content]}")
        finally:
            service.close()


if __name__ == "__main__":
    main()
