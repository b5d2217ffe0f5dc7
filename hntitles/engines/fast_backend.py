"""The GPU seam of the TRL trainer: which engine loads the policy, generates rollouts and runs the loss.

The trainer (reference_grpo_trainer.py) only sees a `Backend`, a PEFT-wrapped model, GRPOConfig
overrides and a GRPOTrainer class; everything GPU-only (Unsloth, vLLM) stays behind the names
below. Backends:

- `cpu`: transformers + PEFT on the CPU (fp32, `use_cpu=True`), even if a GPU exists.
- `transformers`: transformers + PEFT on the default device (CUDA if present), HF generate.
- `unsloth`: Unsloth `FastLanguageModel` with `fast_inference=True` (its own colocated vLLM
  engine) and Unsloth's LoRA; GRPOConfig `use_vllm=True`. Needs CUDA + requirements-gpu.txt.
- `trl-vllm`: transformers + PEFT for training, TRL's own vLLM integration for generation
  (`vllm_mode` "colocate" in-process, or "server" = `trl vllm-serve` started separately).
- `auto`: unsloth on a CUDA machine that has it installed, else transformers (cpu without CUDA;
  a recipe with `require_gpu` refuses instead).

A machine whose NVIDIA driver works but whose torch cannot see the GPU (torch 2.13 from PyPI
is built for CUDA 13: driver >= 580) stops every GPU request with both versions; only an
explicit `--backend cpu` trains on its CPU.

Public names, by purpose (nothing heavy is imported until one of them is called):

- choosing the backend: `BACKENDS`, `VLLM_MODES`, `select_backend` (raises `BackendError`
  before anything loads), `Backend` (+ `describe()`, the line the trainer prints), `Machine`
  (`Machine.detect()`; tests build one by hand), `nvidia_driver`, `unusable_gpu_message`;
- before transformers is imported: `import_unsloth_first(argv)`: Unsloth patches
  transformers/TRL/PEFT when it is imported, so the trainer's `__main__` calls it first;
- loading and configuring: `load_policy` (PEFT model + tokenizer), `max_seq_length`,
  `grpo_overrides` (device, precision, vLLM fields of GRPOConfig), `stop_at_tokens` (stop ids
  that end a completion like EOS on every engine);
- plain-transformers generation: `generate_shared_prefix` (one prefill per distinct prompt),
  `left_pad`, `cut_after_eos` (TRL's completion cut);
- the trainer class: `trainer_class(backend)` -> TRL's GRPOTrainer under Unsloth, otherwise
  `shared_prefix_trainer_class()`: GRPOTrainer with `SharedPrefixMixin` in front (each distinct
  prompt encoded once in the loss, also under gradient checkpointing, and in rollouts; loss
  micro-batches cut by whole groups; the math is hntitles/engines/shared_prefix.py's).

Check what this machine would use (no model is loaded), and run the checks of this module:

    python -m hntitles.engines.fast_backend --backend auto
    python -m pytest hntitles/engines/fast_backend.py -q
    python -m pytest tests/test_fast_backend.py tests/test_shared_prefix.py -q
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

BACKENDS = ("auto", "cpu", "transformers", "unsloth", "trl-vllm")
VLLM_MODES = ("colocate", "server")


# --------------------------------------------------------------------------------------
# Choosing the backend
# --------------------------------------------------------------------------------------


class BackendError(RuntimeError):
    """The requested backend cannot run on this machine; the message says what to do."""


@dataclass
class Machine:
    """What the backend choice depends on (injectable so tests can describe any machine)."""

    cuda: bool
    unsloth: bool
    vllm: bool
    gpu_name: str = ""
    driver: str = ""  # NVIDIA driver version from nvidia-smi ("" = no driver found)
    torch_version: str = ""
    torch_cuda: str = ""  # the CUDA version this torch was built for ("" = a CPU build)

    @classmethod
    def detect(cls) -> Machine:
        import torch  # torch only: importing unsloth/vllm here would patch or need a GPU

        cuda = torch.cuda.is_available()
        driver, smi_gpu = nvidia_driver()
        return cls(cuda=cuda, unsloth=importlib.util.find_spec("unsloth") is not None,
                   vllm=importlib.util.find_spec("vllm") is not None,
                   gpu_name=torch.cuda.get_device_name(0) if cuda else smi_gpu,
                   driver=driver, torch_version=torch.__version__, torch_cuda=torch.version.cuda or "")


def nvidia_driver() -> tuple[str, str]:
    """(driver version, first GPU's name) as nvidia-smi reports them; ("", "") without a driver."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return "", ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "", ""
    first = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    driver, _, name = first.partition(",")
    return driver.strip(), name.strip()


def unusable_gpu_message(machine: Machine, why: str) -> str:
    """A GPU this torch cannot use, said with both versions and the ways out."""
    build = f"CUDA {machine.torch_cuda}" if machine.torch_cuda else "a CPU-only build"
    return (f"{why}, but this machine's NVIDIA GPU is unusable from torch: driver {machine.driver} "
            f"({machine.gpu_name or 'GPU'}) with torch {machine.torch_version} ({build}); "
            "torch.cuda.is_available() is False. torch 2.13 from PyPI is built for CUDA 13, which needs "
            "driver >= 580. Update the driver (or run on a node that has one), or install a torch 2.13.0 "
            "built for your driver's CUDA from https://download.pytorch.org/whl/ (unverified here: vllm "
            "0.30 wants PyPI's build); to train on the CPU on purpose pass --backend cpu.")


@dataclass
class Backend:
    name: str  # cpu | transformers | unsloth | trl-vllm
    device: str  # cpu | cuda
    use_vllm: bool
    vllm_mode: str = ""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The one line the trainer prints so nobody wonders what actually runs."""
        if self.name == "unsloth":
            gen = "Unsloth's vLLM (fast_inference)" if self.use_vllm else "Unsloth generate (no vLLM)"
            what = f"Unsloth FastLanguageModel + LoRA on CUDA, generation with {gen}"
        elif self.name == "trl-vllm":
            what = f"transformers + PEFT on CUDA, generation with TRL's vLLM ({self.vllm_mode} mode)"
        elif self.device == "cpu":
            what = ("transformers + PEFT on CPU (fp32), generation with HF generate (one prefill per distinct prompt); "
                    "no Unsloth/vLLM on CPU")
        else:
            what = "transformers + PEFT on CUDA, generation with HF generate (one prefill per distinct prompt)"
        return f"backend {self.name}: {what}" + "".join(f" ({n})" for n in self.notes)


def select_backend(requested: str, use_vllm: bool = True, vllm_mode: str = "colocate",
                   machine: Machine | None = None, require_gpu: bool = False) -> Backend:
    """Resolve `requested` on this machine, or raise BackendError before anything heavy loads.

    `require_gpu` (the GPU recipe sets it) makes `auto` refuse the CPU instead of falling back
    to it; `cpu` stays an explicit choice. `machine` defaults to this one (Machine.detect()).

    >>> gpu = Machine(cuda=True, unsloth=False, vllm=True)
    >>> select_backend("auto", machine=gpu).notes
    ['unsloth is not installed: `make setup-gpu` for fast generation']
    >>> select_backend("trl-vllm", vllm_mode="server", machine=gpu)
    Backend(name='trl-vllm', device='cuda', use_vllm=True, vllm_mode='server', notes=[])
    >>> try:
    ...     select_backend("unsloth", machine=Machine(cuda=False, unsloth=True, vllm=True))
    ... except BackendError as e:
    ...     print(str(e)[:69])
    backend 'unsloth' needs an NVIDIA GPU with CUDA, and this machine has
    """
    _check_choice("backend", requested, BACKENDS)
    _check_choice("vllm_mode", vllm_mode, VLLM_MODES)
    machine = machine or Machine.detect()
    if requested == "cpu":
        return Backend("cpu", "cpu", use_vllm=False)
    _refuse_an_unusable_gpu(requested, machine, require_gpu)
    if requested == "auto":
        return _auto_backend(machine, use_vllm)
    if requested == "unsloth":
        return _unsloth_backend(machine, use_vllm)
    if requested == "trl-vllm":
        return _trl_vllm_backend(machine, use_vllm, vllm_mode)
    return Backend("transformers", "cuda" if machine.cuda else "cpu", use_vllm=False)


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise BackendError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _refuse_an_unusable_gpu(requested: str, machine: Machine, require_gpu: bool) -> None:
    """A GPU request where torch sees no CUDA: the driver/torch mismatch, or (auto) no GPU at all."""
    wants_gpu = requested in ("unsloth", "trl-vllm", "transformers") or require_gpu
    if not machine.cuda and machine.driver and wants_gpu:
        why = (f"backend '{requested}' asks for the GPU" if requested != "auto"
               else "this recipe needs a GPU (require_gpu)")
        raise BackendError(unusable_gpu_message(machine, why))
    if requested == "auto" and require_gpu and not machine.cuda:
        raise BackendError("this recipe needs a GPU (require_gpu) and torch sees none (no NVIDIA driver found). "
                           "Run it on a GPU node, or pass --backend cpu to train on the CPU on purpose "
                           "(slow: recipes/cpu.yaml is sized for a CPU).")


def _auto_backend(machine: Machine, use_vllm: bool) -> Backend:
    """`auto`: the CPU without CUDA, Unsloth when it (and vLLM, if wanted) is installed, else transformers."""
    if not machine.cuda:
        notes = [f"NVIDIA driver {machine.driver} found, but torch {machine.torch_version} cannot use it"] \
            if machine.driver else []
        return Backend("cpu", "cpu", use_vllm=False, notes=notes)
    if machine.unsloth and (machine.vllm or not use_vllm):
        return _unsloth_backend(machine, use_vllm)
    missing = "unsloth" if not machine.unsloth else "vllm"
    return Backend("transformers", "cuda", use_vllm=False,
                   notes=[f"{missing} is not installed: `make setup-gpu` for fast generation"])


def _needs_cuda(requested: str, machine: Machine) -> None:
    if not machine.cuda:
        raise BackendError(
            f"backend '{requested}' needs an NVIDIA GPU with CUDA, and this machine has none "
            "(torch.cuda.is_available() is False). Unsloth and vLLM have no CPU path. "
            "Use --backend auto (or cpu): transformers + PEFT on the CPU.")


def _unsloth_backend(machine: Machine, use_vllm: bool) -> Backend:
    _needs_cuda("unsloth", machine)
    if not machine.unsloth:
        raise BackendError("backend 'unsloth' needs the unsloth package: `make setup-gpu` "
                           "(pip install -r requirements-gpu.txt)")
    if use_vllm and not machine.vllm:
        raise BackendError("backend 'unsloth' with use_vllm needs vllm: `make setup-gpu`, "
                           "or pass --use_vllm false to generate with Unsloth alone")
    return Backend("unsloth", "cuda", use_vllm=use_vllm)


def _trl_vllm_backend(machine: Machine, use_vllm: bool, vllm_mode: str) -> Backend:
    _needs_cuda("trl-vllm", machine)
    if not use_vllm:
        raise BackendError("backend 'trl-vllm' generates with vLLM; drop --use_vllm false or pick 'transformers'")
    if not machine.vllm:
        raise BackendError("backend 'trl-vllm' needs vllm: `make setup-gpu` (pip install -r requirements-gpu.txt)")
    return Backend("trl-vllm", "cuda", use_vllm=True, vllm_mode=vllm_mode)


# --------------------------------------------------------------------------------------
# Loading the policy and configuring GRPOConfig
# --------------------------------------------------------------------------------------


def import_unsloth_first(argv: Sequence[str] | None = None) -> bool:
    """Import unsloth before transformers/TRL/PEFT when the run will use it.

    Unsloth patches those libraries at import time; imported later it warns and some of
    its optimisations are missing. Called from the trainer's `__main__` before arguments
    are parsed (parsing imports transformers), so it only looks at `--backend` on the
    command line: an explicit non-unsloth backend skips it, otherwise it imports unsloth
    when it is installed and CUDA is available (what `auto` would pick).
    """
    from hntitles.runs import (
        settings,  # light: .env and the Hub mode must be set before unsloth imports huggingface_hub
    )

    settings.prepare_env(argv, "recipes/cpu.yaml")  # HF_HOME / HF_TOKEN may exist only in .env
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", default="auto")
    known, _ = pre.parse_known_args(argv)
    if known.backend not in ("auto", "unsloth") or importlib.util.find_spec("unsloth") is None:
        return False
    if "transformers" in sys.modules or "trl" in sys.modules:
        return False  # too late to patch first; select_backend/load_policy still work
    import torch

    if not torch.cuda.is_available():
        return False
    importlib.import_module("unsloth")
    return True


def max_seq_length(recipe) -> int:
    """Prompt cap + completion cap: what Unsloth/vLLM must fit (utils.load_split drops longer prompts)."""
    return int(recipe.max_prompt_tokens) + int(recipe.max_completion_tokens)


def load_policy(backend: Backend, recipe, args):
    """The policy as a PEFT model with the recipe's LoRA, and its tokenizer.

    `recipe` is a settings.Recipe, `args` the trainer's TrlArgs (gpu_memory_utilization,
    load_in_4bit, gradient_checkpointing). The caller hands the returned PeftModel to
    GRPOTrainer without a peft_config.
    """
    from hntitles.runs import settings  # a hub id that cannot be fetched is one line, not a traceback

    if backend.name == "unsloth":
        with settings.hub_errors(recipe.model):
            return _load_unsloth(backend, recipe, args)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with settings.hub_errors(recipe.model):
        tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if backend.device == "cpu":
        dtype = torch.float32  # bf16 matmuls are slower than fp32 on most CPUs, and less exact
    else:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with settings.hub_errors(recipe.model):
        model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=dtype)
    if backend.device == "cuda":
        model = model.to("cuda")
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=list(recipe.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


def _load_unsloth(backend: Backend, recipe, args):
    # Signatures as of unsloth 2026.10 (unsloth/models/loader.py, llama.py):
    # FastLanguageModel.from_pretrained(model_name, max_seq_length, dtype, load_in_4bit, ...,
    #   fast_inference, gpu_memory_utilization, float8_kv_cache, random_state, max_lora_rank)
    # FastLanguageModel.get_peft_model(model, r, target_modules, lora_alpha, lora_dropout, bias,
    #   use_gradient_checkpointing, random_state, ...)
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=recipe.model,
        # Unsloth maps e.g. Qwen/... to its own unsloth/... upload unless told not to: load exactly
        # what the recipe names, the weights TRL, ART's trainer and ART's vLLM see too.
        use_exact_model_name=True,
        max_seq_length=max_seq_length(recipe),
        load_in_4bit=bool(args.load_in_4bit),
        fast_inference=backend.use_vllm,  # Unsloth starts its own vLLM engine on the same GPU
        max_lora_rank=recipe.lora_r,  # vLLM reserves LoRA slots of this rank
        gpu_memory_utilization=args.gpu_memory_utilization,
        random_state=recipe.seed,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=recipe.lora_r,
        target_modules=list(recipe.lora_target_modules),
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        bias="none",
        # "unsloth" = its offloaded checkpointing; False keeps activations (faster, more memory).
        use_gradient_checkpointing="unsloth" if args.gradient_checkpointing else False,
        random_state=recipe.seed,
    )
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def grpo_overrides(backend: Backend, args) -> dict:
    """GRPOConfig fields that depend on the backend (device, precision, generation engine).

    >>> grpo_overrides(Backend("cpu", "cpu", use_vllm=False), args=None)
    {'use_cpu': True, 'bf16': False, 'fp16': False, 'use_vllm': False}
    """
    if backend.device == "cpu":
        return {"use_cpu": True, "bf16": False, "fp16": False, "use_vllm": False}
    import torch

    bf16 = bool(torch.cuda.is_bf16_supported())
    out = {"bf16": bf16, "fp16": not bf16, "use_vllm": backend.use_vllm}
    if backend.name == "unsloth":
        # Unsloth's patched GRPOTrainer generates with model.vllm_engine when use_vllm is set;
        # the gradient-checkpointing choice was made in get_peft_model.
        out["gradient_checkpointing"] = False
    elif backend.name == "trl-vllm":
        out["vllm_mode"] = backend.vllm_mode
        if backend.vllm_mode == "colocate":
            out["vllm_gpu_memory_utilization"] = args.gpu_memory_utilization
        elif args.vllm_server_base_url:
            out["vllm_server_base_url"] = args.vllm_server_base_url
    return out


def stop_at_tokens(backend: Backend, model, config, stop_ids: Sequence[int]) -> None:
    """Make `stop_ids` end a completion like EOS does, before the trainer is built from `config` (a GRPOConfig).

    TRL reads the model's generation_config eos ids when the trainer is built: they stop HF
    generate and cut the completion mask (after the stop token, kept) on every engine. vLLM
    stops on its own SamplingParams, which TRL builds from the config's generation_kwargs.
    """
    if not stop_ids:
        return
    generation = model.generation_config
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    generation.eos_token_id = list(dict.fromkeys([*eos, *stop_ids]))
    if backend.use_vllm:
        config.generation_kwargs = {**(config.generation_kwargs or {}), "stop_token_ids": list(stop_ids)}


# --------------------------------------------------------------------------------------
# The trainer class: TRL's GRPOTrainer with each distinct prompt encoded once
# --------------------------------------------------------------------------------------


# Batch fields of a multimodal step (their rows are images or tiles, not completions)
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "num_images", "num_tiles", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class SharedPrefixMixin:
    """What `shared_prefix_trainer_class` puts in front of TRL's GRPOTrainer (trl 1.14.2):

    - `_get_per_token_logps_and_entropies` (the loss, and the old/reference logprob passes TRL
      runs when steps_per_generation > gradient_accumulation_steps, beta > 0 or under vLLM
      importance sampling): shared_prefix.per_token_logps, each distinct prompt of a micro-batch
      encoded once for its rows ("cached" layout: the prompt's KV states shared by the group;
      "packed" layout under gradient checkpointing or flex attention: one row per group, one
      forward); TRL's own path, with a one-line log, for what it does not cover.
    - `_prepare_inputs`: when the generation batch is cut into several micro-batches
      (steps_per_generation > 1) and the shared-prefix loss will run, the batch is permuted by
      whole groups, not by rows, before TRL's split_tensor_dict: a micro-batch of
      num_generations rows is one group, one prompt encoding (TRL's row shuffle gives a
      micro-batch of 4 rows ~4 prompts and nothing to share). The group order is drawn from
      the same torch.randperm of the rows TRL draws (shared_prefix.group_order), so the RNG
      stream, and with it every later rollout, is TRL's. A micro-batch size that does not fit
      the group size is not refused: a group then continues in the next micro-batch (rows in
      order), its prompt encoded once in each; the same holds for a group that a process
      boundary cuts (per-process rows not a multiple of num_generations). The update is the
      same sum: TRL's cispo/dapo/vespo normalise by the step's token count, grpo/sapo/dr_grpo/
      luspo by equal micro-batch sizes, so which rows share a micro-batch does not matter.
      Where it does (bnpo's per-micro-batch token count, the entropy bonus, top_entropy_quantile),
      and whenever the shared-prefix loss is off, TRL's row shuffle runs (logged once). One
      micro-batch per generation batch keeps TRL's row shuffle too: nothing to group, and the
      CPU recipe's numbers stay TRL's bit for bit.
    - `_generate_single_turn`'s regular path: one prefill per distinct prompt
      (generate_shared_prefix) with the LoRA folded into the weights (shared_prefix.merged_lora).
      vLLM, continuous batching, multimodal and tool calls go to TRL's own code.
      The output contract is TRL's: completion ids cut after the first EOS (kept), logprobs None.

    Only usable as `class X(SharedPrefixMixin, GRPOTrainer)`: `super()` is TRL's trainer and the
    attributes read (use_vllm, accelerator, generation_config, ...) are GRPOTrainer's.
    """

    _shared_prefix_fallbacks: set

    def _prepare_inputs(self, generation_batch):
        if not self._group_aligned():
            return super()._prepare_inputs(generation_batch)
        # TRL's _prepare_inputs (training branch) with the row shuffle replaced by a group shuffle
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = self._group_aligned_split(batch)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _group_aligned(self) -> bool:
        """Whether this training step's generation batch is split by whole groups (class doc)."""
        if not self.model.training or self.args.steps_per_generation == 1:
            return False  # evaluation, or one micro-batch: TRL's own code, bit for bit
        reason = self._shared_prefix_reason(self.accelerator.unwrap_model(self.model), self.aux_loss_enabled, {})
        if not reason and (self.loss_type == "bnpo" or self._entropy_bonus_enabled or self.top_entropy_quantile < 1):
            reason = "the loss depends on which rows share a micro-batch (bnpo, entropy bonus or top_entropy_quantile)"
        if reason:
            self._log_once(f"[trl] micro-batches from TRL's row shuffle ({reason})")
        return not reason

    def _group_aligned_split(self, batch: dict) -> list[dict]:
        """The generation batch permuted by whole groups, then TRL's split into micro-batches."""
        import torch
        from trl.trainer.utils import split_tensor_dict

        from hntitles.engines import shared_prefix

        if any(batch.get(k) is not None for k in MULTIMODAL_KEYS):  # TRL's own shuffle and split, as it is
            from trl.trainer.utils import (
                shuffle_sequence_dict,
                split_pixel_values_by_grid,
                unsplit_pixel_values_by_grid,
            )

            chunks = split_tensor_dict(shuffle_sequence_dict(split_pixel_values_by_grid(batch)),
                                       self.args.steps_per_generation)
            return [unsplit_pixel_values_by_grid(c) for c in chunks]
        rows = len(batch["prompt_ids"])
        offset = self.accelerator.process_index * rows  # where this process's rows start in the global batch
        order = shared_prefix.group_order(torch.randperm(rows).tolist(), self.num_generations, offset)
        index = torch.tensor(order)
        permuted = {k: v if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0)
                    else v[index.to(v.device)] if isinstance(v, torch.Tensor) else [v[i] for i in order]
                    for k, v in batch.items()}
        return split_tensor_dict(permuted, self.args.steps_per_generation)

    def _log_once(self, line: str) -> None:
        seen = self.__dict__.setdefault("_shared_prefix_fallbacks", set())
        if line not in seen:
            seen.add(line)
            print(line)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if (self.use_vllm or self.use_transformers_continuous_batching or images is not None
                or multimodal_fields or has_tool_images):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        return self._shared_prefix_rollouts(prompt_ids), None

    def _shared_prefix_rollouts(self, prompt_ids) -> list[list[int]]:
        """Completion ids of every row: one prefill per distinct prompt, the LoRA merged meanwhile."""
        import torch
        from trl.models import unwrap_model_for_generation

        from hntitles.engines import shared_prefix
        from hntitles.engines.generation import cut_after_eos, generate_shared_prefix

        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                          generation_kwargs=self.generation_kwargs) as model,
              torch.no_grad(),
              self._dist.summon_full_params(self.model_wrapped, recurse=False),
              shared_prefix.merged_lora(model)):
            new = generate_shared_prefix(model, prompt_ids, self._tokenizer.pad_token_id,
                                         generation_config=self.generation_config)
        return [cut_after_eos(row, self.eos_token_ids) for row in new.cpu().tolist()]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **extra):
        unwrapped = self.accelerator.unwrap_model(model)
        groups = self._shared_prefix_groups(unwrapped, input_ids, attention_mask, logits_to_keep,
                                            compute_aux_loss, extra)
        if isinstance(groups, str):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        logps, ents = self._shared_prefix_logps(model, unwrapped, input_ids, attention_mask, logits_to_keep,
                                                groups, compute_entropy)
        return logps, ents, None

    def _shared_prefix_logps(self, model, unwrapped, input_ids, attention_mask, logits_to_keep, groups,
                             compute_entropy):
        """(logprobs, entropies) from shared_prefix.per_token_logps, through the wrapper when there is one."""
        from hntitles.engines import shared_prefix

        kwargs = dict(groups=groups, temperature=self.temperature, compute_entropy=compute_entropy,
                      entropy_requires_grad=self._entropy_bonus_enabled)
        if model is not unwrapped or self.is_fsdp_enabled:
            # DDP/FSDP hooks run around the wrapper's forward: both passes go through one call of it.
            from trl.models.utils import _ForwardRedirection

            return _ForwardRedirection()(model, unwrapped, shared_prefix.per_token_logps, unwrapped,
                                         input_ids, attention_mask, logits_to_keep, **kwargs)
        return shared_prefix.per_token_logps(unwrapped, input_ids, attention_mask, logits_to_keep, **kwargs)

    def _shared_prefix_groups(self, model, input_ids, attention_mask, logits_to_keep, compute_aux_loss, extra):
        """shared_prefix.Group list, or why TRL's own path runs (logged once per reason)."""
        from hntitles.engines import shared_prefix

        groups = (self._shared_prefix_reason(model, compute_aux_loss, extra)
                  or shared_prefix.group_rows(input_ids, attention_mask, logits_to_keep))
        if isinstance(groups, str):
            self._log_once(f"[trl] shared-prefix loss off for this batch ({groups}): TRL's own logprob path")
        return groups

    def _shared_prefix_reason(self, model, compute_aux_loss, extra) -> str | None:
        """Why the shared-prefix loss cannot run for this trainer and model (whatever the batch), or None."""
        from hntitles.engines import shared_prefix

        extras = sorted(k for k, v in extra.items() if v is not None)
        return ("multimodal inputs " + ", ".join(extras) if extras
                else "MoE aux loss" if compute_aux_loss
                else "Liger kernel" if self.use_liger_kernel
                else "the model has no logits_to_keep" if "logits_to_keep" not in self.model_kwarg_keys
                else shared_prefix.model_reason(model))


def shared_prefix_trainer_class():
    """GRPOTrainer that encodes each distinct prompt once, in the loss and in plain-transformers rollouts.

    A new subclass of TRL's GRPOTrainer with `SharedPrefixMixin` in front of it; built here, not
    at import, because importing trl loads transformers and torch (seconds).
    """
    from trl import GRPOTrainer

    class SharedPrefixGRPOTrainer(SharedPrefixMixin, GRPOTrainer):
        __doc__ = SharedPrefixMixin.__doc__

    return SharedPrefixGRPOTrainer


def trainer_class(backend: Backend):
    """The GRPOTrainer class for `backend`: TRL's own under Unsloth (which patches it in place
    and ships its own shared-prefix loss, PrefixGrouper), the shared-prefix subclass otherwise
    (cpu, transformers, trl-vllm: there its generation is TRL's vLLM path, its loss ours)."""
    if backend.name == "unsloth":
        from trl import GRPOTrainer

        return GRPOTrainer
    return shared_prefix_trainer_class()


def main(argv: Sequence[str] | None = None) -> None:
    """Print what this machine has and the backend `--backend` resolves to (no model is loaded)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--vllm_mode", default="colocate", choices=VLLM_MODES)
    cli = parser.parse_args(argv)
    machine = Machine.detect()
    print(f"machine: cuda={machine.cuda} {machine.gpu_name} unsloth={machine.unsloth} vllm={machine.vllm}")
    try:
        print(select_backend(cli.backend, vllm_mode=cli.vllm_mode, machine=machine).describe())
    except BackendError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
