"""ART's own training loop on the CPU: LocalBackend with a CPU ModelService (no vLLM, no Unsloth).

OpenPipe ART 0.5.18's `art.local.LocalBackend` does everything that does not touch a GPU
itself and hands the rest to a `ModelService` (`art/local/service.py`): start an
OpenAI-compatible server, and `train(disk_packed_tensors, config, dev_config)`. On a GPU that
service is Unsloth + a vLLM subprocess. `cpu_backend_class()` returns a LocalBackend subclass
whose service is `CpuModelService` below; nothing in the installed package is patched.

    python train.py --recipe recipes/cpu.yaml --backend cpu      # what `make train-art` runs on a CPU
    python art_cpu_backend.py --recipe recipes/tiny.yaml         # serve the tiny policy, print one completion

What stays ART's own code (called, not copied): `register` (model.json, trajectory migration),
the `name@step` inference names, the step read from checkpoint folders, `delete_checkpoints`,
`tokenize_trajectory_groups` (advantages, zero-advantage drops, the `token_id:N` rollout ids),
`packed_tensors_from_tokenized_results` (weights, batch-wide advantage scaling, row shuffle),
`build_rl_train_configs`, `loss_fn` (cispo/ppo clipping, KL folded into the advantages),
metric aggregation and `model.log`.

What is ours: the service (a PEFT LoRA model in fp32 on the CPU), the inference server
(`InferenceServer`: /v1/chat/completions and /v1/models on 127.0.0.1, generation through
`fast_backend.generate_shared_prefix`, one prefill per prompt), the per-token logprobs of a
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

Knobs beyond the GPU behaviour (`EngineOptions`, set from the recipe by train.py):
- `pack_groups`: ART's packer puts trajectories side by side in one row with a group's prompt
  stored once (the positions and block mask ART's packer records are honoured);
- `optimizer_steps="per_step"`: gradients of all rows of an ART step are averaged and one
  optimizer step is taken (TRL's way), instead of one per row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
MAX_BODY_BYTES = 1 << 20  # a chat request for a title is a few kB; anything bigger is refused
MAX_N = 64
MAX_NEW_TOKENS = 4096
DEFAULT_MAX_TOKENS = 256
MAX_BATCH_ROWS = 64  # completions generated together by one worker pass


def import_art():
    """`import art`, undoing its transformers patch where the patch does not fit.

    art/__init__.py replaces transformers.masking_utils._preprocess_mask_arguments with a
    wrapper written for the transformers ART pins (5.2.0: seven arguments, cache_position
    among them). Under the CPU stack's transformers 5.17 (no cache_position) that wrapper
    breaks every later model forward in the process, so there the original is put back; in
    .venv-art it stays.
    """
    import art

    try:
        import inspect

        from art.transformers import patches
        from transformers import masking_utils
    except ImportError:  # no transformers: nothing was patched
        return art
    original = patches._preprocess_mask_arguments
    if (masking_utils._preprocess_mask_arguments is patches._patched_preprocess_mask_arguments
            and "cache_position" not in inspect.signature(original).parameters):
        masking_utils._preprocess_mask_arguments = original
    return art


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass
class EngineOptions:
    """What the CPU engine does beyond LocalBackend's GPU behaviour (defaults: none)."""

    pack_groups: bool = False  # True: ART's packer shares rows (a group's prompt stored once)
    optimizer_steps: str = "per_sequence"  # "per_step": one optimizer step per ART step


def engine_settings(internal_config: dict | None, options: EngineOptions) -> dict:
    """The values the engine really uses, from ART's internal config over ART's defaults.

    >>> s = engine_settings({"trainer_args": {"weight_decay": 0.0}}, EngineOptions())
    >>> s["optimizer"], s["weight_decay"], s["adam_betas"], s["optimizer_steps"]
    ('torch AdamW (fp32): paged_adamw_8bit needs bitsandbytes on CUDA', 0.0, [0.9, 0.99], 'per_sequence')
    """
    if options.optimizer_steps not in OPTIMIZER_STEPS:
        raise ValueError(f"optimizer_steps {options.optimizer_steps!r} is not one of {OPTIMIZER_STEPS}")
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
        steps = len(rows) if self.options.optimizer_steps == "per_sequence" else 1
        groups = [rows[i:i + 1] for i in range(len(rows))] if steps == len(rows) else [rows]
        for chunk in groups:
            metrics = await asyncio.to_thread(self._optimizer_step, chunk, config, _config)
            yield {**metrics, TRAIN_GRADIENT_STEPS_KEY: float(steps)}
        await asyncio.to_thread(self.save_checkpoint, self.step + 1)
        self.step += 1

    def _optimizer_step(self, rows: list[dict], config, _config: dict) -> dict[str, float]:
        """Loss of each row (ART's loss_fn), gradients averaged over `rows`, clip, one AdamW step."""
        import torch

        with self.lock:
            self.model.train()
            try:
                self.optimizer.zero_grad(set_to_none=True)
                sums: dict[str, float] = {}
                for row in rows:
                    loss, parts = row_loss(self.model, row, config, _config)
                    (loss / len(rows)).backward()
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v / len(rows)
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


def row_logprobs(model, row: dict, *, reference: bool = False):
    """log p(token[t+1] | ..t) and the entropy at t, for the positions ART's loss reads.

    Returns full-length [1, L] tensors (zeros where the loss does not look: there the
    shifted assistant mask is 0), as ART's `_calculate_logprobs` would, but the LM head
    runs only on the completion positions (`logits_to_keep` with indices).
    """
    import torch

    tokens = row["tokens"]
    length = tokens.shape[1]
    wanted = row["assistant_mask"][0, 1:].nonzero().flatten()  # predictions of assistant tokens
    mask, positions = attention_for(row)
    kwargs = {"attention_mask": mask, "position_ids": positions} if mask is not None else {}
    context = model.disable_adapter() if reference else contextlib.nullcontext()
    with context, (torch.no_grad() if reference else contextlib.nullcontext()):
        logits = model(input_ids=tokens, logits_to_keep=wanted, use_cache=False, **kwargs).logits[0].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    picked = logp_all.gather(-1, tokens[0, wanted + 1].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zeros = torch.zeros(length, dtype=picked.dtype)
    return (zeros.index_copy(0, wanted, picked)[None],
            zeros.index_copy(0, wanted, entropy.detach())[None])


def row_loss(model, row: dict, config, _config: dict):
    """ART's loss_fn on one row; returns (policy loss, metrics of the row)."""
    from art.loss import loss_fn

    new_logprobs, entropies = row_logprobs(model, row)
    ref_logprobs = row_logprobs(model, row, reference=True)[0] if config.kl_penalty_coef > 0 else None
    loss = loss_fn(row, new_logprobs, ref_logprobs, entropies, _config)
    parts = {"loss/train": float(loss.policy_loss.detach())}
    if loss.entropy is not None:
        parts["loss/entropy"] = float(loss.entropy)
    if loss.kl_policy_ref is not None:
        parts["loss/kl_policy_ref"] = float(loss.kl_policy_ref)
    return loss.policy_loss, parts


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
# Generation: n completions per prompt with raw per-token logprobs
# --------------------------------------------------------------------------------------


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class _RawLogprobs:
    """A logits processor that keeps log-softmax of the raw logits of every decoding step.

    transformers runs user processors before the sampling warpers (temperature, top-k), so
    these are the model's own probabilities, the ones ART's trainer recomputes.
    """

    def __init__(self):
        self.steps: list = []

    def __call__(self, input_ids, scores):
        import torch

        self.steps.append(torch.log_softmax(scores.float(), dim=-1))
        return scores


def generate(service: CpuModelService, prompts: Sequence[Sequence[int]], counts: Sequence[int], *, adapter: bool,
             temperature: float, max_tokens: int, stops: Sequence[str], logprobs: bool,
             seed: int | None = None) -> list[list[Completion]]:
    """`counts[i]` completions of `prompts[i]` (token ids); one prefill per prompt."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    import utils
    from fast_backend import cut_after_eos, generate_shared_prefix

    tok = service.tokenizer
    eos = [tok.eos_token_id, *utils.stop_token_ids(tok, stops)]
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False}
    config = GenerationConfig(**sampling, max_new_tokens=max_tokens, eos_token_id=list(dict.fromkeys(eos)),
                              pad_token_id=tok.pad_token_id)
    capture = _RawLogprobs()
    rows = [list(p) for p, c in zip(prompts, counts, strict=True) for _ in range(c)]
    context = contextlib.nullcontext() if adapter else service.model.disable_adapter()
    with service.lock, context, torch.no_grad(), torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        new = generate_shared_prefix(service.model, rows, tok.pad_token_id, generation_config=config,
                                     logits_processor=LogitsProcessorList([capture] if logprobs else []))
    out, k = [], 0
    for count in counts:
        group = []
        for _ in range(count):
            ids = cut_after_eos(new[k].tolist(), set(eos))
            lps = [float(capture.steps[t][k, i]) for t, i in enumerate(ids)] if logprobs else None
            group.append(Completion(ids, lps, cut_at_stop(tok.decode(ids, skip_special_tokens=True), stops),
                                    "stop" if ids and ids[-1] in eos else "length"))
            k += 1
        out.append(group)
    return out


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string (the OpenAI API leaves the stop string out).

    >>> cut_at_stop("A title\\nmore", ["\\n"]), cut_at_stop("no stop", ["\\n"])
    ('A title', 'no stop')
    """
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text


# --------------------------------------------------------------------------------------
# The OpenAI-compatible server
# --------------------------------------------------------------------------------------


class RequestError(ValueError):
    """A request the server cannot serve: HTTP status + the field at fault."""

    def __init__(self, status: int, param: str, message: str):
        super().__init__(message)
        self.status, self.param = status, param


def parse_chat_request(body: dict) -> dict:
    """Check a /v1/chat/completions body; return the normalised parameters or raise RequestError.

    Fields are checked in the order below, so a body with several bad fields names the first.

    >>> msgs = [{"role": "user", "content": "A story"}]
    >>> p = parse_chat_request({"model": "m@0", "messages": msgs, "stop": "\\n", "max_tokens": None})
    >>> p["n"], p["temperature"], p["max_tokens"], p["stop"], p["logprobs"], p["seed"]
    (1, 1.0, 256, ('\\n',), False, None)
    >>> try:
    ...     parse_chat_request({"model": "m@0", "messages": msgs, "max_completion_tokens": 0})
    ... except RequestError as e:
    ...     print(e.status, e.param, e)
    400 max_completion_tokens 'max_completion_tokens' must be an integer from 1 to 4096, got 0
    """
    if not isinstance(body, dict):
        raise RequestError(400, "body", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "model", "'model' must be a non-empty string")
    messages = _checked_messages(body.get("messages"))
    n = _checked_count("n", body.get("n", 1), MAX_N)
    temperature = _checked_temperature(body.get("temperature", 1.0))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _checked_count(key, DEFAULT_MAX_TOKENS if body.get(key) is None else body[key], MAX_NEW_TOKENS)
    stop = _checked_stop(body.get("stop") or [])
    logprobs = _checked_logprobs(body)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "seed", f"'seed' must be an integer, got {seed!r}")
    return {"model": model, "messages": messages, "n": n, "temperature": temperature,
            "max_tokens": max_tokens, "stop": stop, "logprobs": logprobs, "seed": seed}


def _checked_messages(messages) -> list[dict]:
    if (not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise RequestError(400, "messages", "'messages' must be a non-empty list of {role, content} with string content")
    return messages


def _checked_count(key: str, value, most: int) -> int:
    """An integer from 1 to `most` (a bool is not one, though Python says it is an int)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise RequestError(400, key, f"'{key}' must be an integer from 1 to {most}, got {value!r}")
    return value


def _checked_temperature(temperature) -> float:
    temperature = 1.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError(400, "temperature", f"'temperature' must be a number from 0 to 2, got {temperature!r}")
    return float(temperature)


def _checked_stop(stop) -> tuple[str, ...]:
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop", "'stop' must be a non-empty string or a list of at most 4 of them")
    return tuple(stop)


def _checked_logprobs(body: dict) -> bool:
    """`logprobs` (a bool); `top_logprobs` is refused: the server returns none."""
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError(400, "logprobs", "'logprobs' must be true or false")
    if body.get("top_logprobs"):
        raise RequestError(400, "top_logprobs", "'top_logprobs' is not supported by this server (use 0 or leave it out)")
    return logprobs


@dataclass
class _Job:
    params: dict
    prompt: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Completion] | None = None
    error: RequestError | None = None

    def key(self) -> tuple:
        p = self.params
        return (p["model"], p["temperature"], p["max_tokens"], p["stop"], p["logprobs"], p["seed"])


class InferenceServer:
    """/v1/chat/completions, /v1/models and /health on 127.0.0.1 for one CpuModelService.

    Handler threads check and tokenize requests; one worker thread generates, taking every
    waiting request with the same settings into one batch (one prefill per prompt). Stopped
    by `stop()` (LocalBackend.close -> service.close): no thread outlives the backend.
    """

    def __init__(self, service: CpuModelService):
        self.service = service
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> InferenceServer:
        for target, name in ((self.httpd.serve_forever, "art-cpu-http"), (self._work, "art-cpu-generate")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        print(f"[art-cpu] OpenAI-compatible server on http://127.0.0.1:{self.port}/v1")
        return self

    def stop(self) -> None:
        self._stopping = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()

    def served(self) -> dict[str, bool]:
        """Served model names -> adapter on (the policy) or off (the base model)."""
        return {self.service.base_model: False, f"{self.service.model_name}@{self.service.step}": True}

    def submit(self, params: dict) -> tuple[int, list[Completion]]:
        """(prompt tokens, completions) for a checked request; raises RequestError."""
        if self._stopping:
            raise RequestError(503, "model", "the server is shutting down")
        if params["model"] not in self.served():
            raise RequestError(404, "model", f"model {params['model']!r} is not served here "
                                             f"(served: {sorted(self.served())})")
        tok = self.service.tokenizer
        prompt = tok.apply_chat_template(params["messages"], add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        limit = getattr(self.service.model.config, "max_position_embeddings", 1 << 30)
        if len(prompt) + params["max_tokens"] > limit:
            raise RequestError(400, "messages", f"prompt ({len(prompt)} tokens) + max_tokens exceeds the model's {limit}")
        job = _Job(params, prompt)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return len(prompt), job.result

    def _work(self) -> None:
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else self.jobs.get()
            if job is None:
                break
            batch, rows = [job], job.params["n"]
            while True:  # every request waiting now with the same settings joins the batch
                try:
                    other = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if other is None:
                    pending.append(other)
                    break
                if other.key() == job.key() and rows + other.params["n"] <= MAX_BATCH_ROWS:
                    batch.append(other)
                    rows += other.params["n"]
                else:
                    pending.append(other)
            self._run(batch)
        for job in pending:
            if job is not None:
                job.error = RequestError(503, "model", "the server is shutting down")
                job.done.set()

    def _run(self, batch: list[_Job]) -> None:
        p = batch[0].params
        try:
            adapter = self.served().get(p["model"])
            if adapter is None:  # the policy moved on while the request waited
                raise RequestError(404, "model", f"model {p['model']!r} is no longer served (served: {sorted(self.served())})")
            results = generate(self.service, [j.prompt for j in batch], [j.params["n"] for j in batch],
                               adapter=adapter, temperature=p["temperature"], max_tokens=p["max_tokens"],
                               stops=p["stop"], logprobs=p["logprobs"], seed=p["seed"])
            for job, result in zip(batch, results, strict=True):
                job.result = result
        except RequestError as e:
            for job in batch:
                job.error = e
        except Exception as e:  # a generation failure is the server's fault: 500 with the reason
            for job in batch:
                job.error = RequestError(500, "model", f"generation failed: {type(e).__name__}: {e}")
        finally:
            for job in batch:
                job.done.set()


def completion_body(params: dict, prompt_len: int, completions: list[Completion], tokenizer) -> dict:
    """The OpenAI chat.completion object; logprob tokens as "token_id:N" (vLLM's
    return_tokens_as_token_ids, which ART's tokenizer step reads back)."""
    choices = []
    for i, c in enumerate(completions):
        logprobs = None
        if c.logprobs is not None:
            content = []
            for tid, lp in zip(c.token_ids, c.logprobs, strict=True):
                text = tokenizer.decode([tid])
                content.append({"token": f"token_id:{tid}", "logprob": lp, "bytes": list(text.encode("utf-8")),
                                "top_logprobs": []})
            logprobs = {"content": content}
        choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason, "logprobs": logprobs})
    generated = sum(len(c.token_ids) for c in completions)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": params["model"], "choices": choices,
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": generated, "total_tokens": prompt_len + generated}}


class _ChatHandler(BaseHTTPRequestHandler):
    """The HTTP side of an InferenceServer (`inference`, set by `_handler_class`); every error
    is a JSON body {"error": {message, type, param, code}} in the OpenAI API's shape."""

    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections
    inference: InferenceServer

    def log_message(self, *args):  # one line per request would drown the training log
        pass

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError) -> None:
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        self._reply(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.status}})

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            return self._reply(200, {"status": "ok", "served": sorted(self.inference.served())})
        if path == "/v1/models":
            base = self.inference.service.base_model
            data = [{"id": name, "object": "model", "owned_by": "art-cpu", "root": base,
                     "parent": base if adapter else None} for name, adapter in self.inference.served().items()]
            return self._reply(200, {"object": "list", "data": data})
        self._error(RequestError(404, "path", f"no route GET {path}"))

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            params = parse_chat_request(self._json_body(path))
            prompt_len, completions = self.inference.submit(params)
            self._reply(200, completion_body(params, prompt_len, completions, self.inference.service.tokenizer))
        except RequestError as e:
            self._error(e)

    def _json_body(self, path: str):
        """The parsed JSON body of a POST to the chat route. The body is read off the connection
        before the route is checked, so a keep-alive connection stays in step."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True  # where this body ends is unknown: the connection cannot be reused
            raise RequestError(400, "Content-Length", "the Content-Length header must be an integer") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise RequestError(413, "body", f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
        raw = self.rfile.read(length) if length > 0 else b""
        if path != "/v1/chat/completions":
            raise RequestError(404, "path", f"no route POST {path}")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RequestError(400, "body", f"the request body is not valid JSON ({e})") from None


def _handler_class(server: InferenceServer) -> type[_ChatHandler]:
    """The handler class ThreadingHTTPServer instantiates per request, bound to `server`."""
    return type("Handler", (_ChatHandler,), {"inference": server})


# --------------------------------------------------------------------------------------
# Smoke check
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Load the recipe's model, serve it, print one completion with its logprobs."""
    import argparse
    import tempfile

    from openai import OpenAI

    import utils

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    cli = parser.parse_args(argv)
    (recipe,) = utils.parse_args((utils.Recipe,), "art", ["--recipe", cli.recipe])
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
