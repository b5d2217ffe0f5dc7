"""A transformers policy on this machine: load it, write titles with it, validate with its base.

Shared by evaluate.py, the TRL trainer's validation, titles.py and the demo, so every local
model is scored by one procedure (utils.score_val) with one validator:

- `load_model(model_id, adapter)`: the model (+ a PEFT adapter folder) and tokenizer, fp32, eval mode
  (fast_backend.load_policy is the other direction: the trainable LoRA policy of a training run);
- `HFGenerator`: utils.Generator over such a model, batched; the n titles of a story share one
  prefill of its prompt (fast_backend.generate_shared_prefix);
- `make_validator(recipe, model, tokenizer)`: the validator the recipe names ('embedding', or
  'model': utils.LLMValidator with the adapter disabled, i.e. the base model answers);
- `evaluate_policy(recipe, ...)`: load, validate on the val split, write <run>/metrics.jsonl and
  <run>/eval/<label>.jsonl (what `make eval` and the demo's evaluations do).

Quick check (loads the tiny model, no server):

    python -c "import policy; m, t = policy.load_model('models/tiny'); print(policy.HFGenerator(m, t).generate([[{'role': 'user', 'content': 'hi'}]], 2, 1.0, 5))"
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import fast_backend
import utils


def load_model(model_id: str, adapter: str = ""):
    """Model (+ adapter) and tokenizer, fp32 on CPU, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with utils.hub_errors(model_id):  # an unreachable hub id is one line saying what to do, not a traceback
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise SystemExit(f"{adapter}: no adapter_config.json (pass a checkpoint folder with a PEFT adapter)")
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


class HFGenerator:
    """utils.Generator over a transformers model (optionally with a PEFT adapter), batched."""

    def __init__(self, model, tokenizer, batch_size: int = 8, name: str = "hf", progress: bool = True):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.progress = progress
        tokenizer.padding_side = "left"  # decoder-only generation pads on the left

    def generate(self, conversations: Sequence[list[dict]], n: int, temperature: float,
                 max_tokens: int, stop: Sequence[str] = ()) -> list[list[str]]:
        from tqdm.auto import tqdm

        greedy = temperature <= 0
        batches = range(0, len(conversations), self.batch_size)
        out: list[list[str]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for i in tqdm(batches, desc=f"generate n={n}{' greedy' if greedy else ''}", disable=not self.progress, leave=False):
                out.extend(self._batch(list(conversations[i:i + self.batch_size]), n, temperature, max_tokens, stop))
        finally:
            self.model.train(was_training)
        return out

    def _batch(self, convs: list[list[dict]], n: int, temperature: float, max_tokens: int,
               stop: Sequence[str]) -> list[list[str]]:
        import torch

        eos = {}
        if stop:  # EOS or any token holding a stop string ends a row
            eos = {"eos_token_id": [self.tokenizer.eos_token_id, *utils.stop_token_ids(self.tokenizer, stop)]}
        greedy = temperature <= 0
        texts = self.tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        with torch.inference_mode():
            # The n titles of a story share one prefill of its prompt (fast_backend).
            gen = fast_backend.generate_shared_prefix(
                self.model, [p for p in ids for _ in range(n)], self.tokenizer.pad_token_id,
                max_new_tokens=max_tokens, do_sample=not greedy,
                temperature=temperature if not greedy else None, top_p=None, top_k=None, **eos)
        texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
        return [texts[j * n:(j + 1) * n] for j in range(len(convs))]


def make_validator(recipe: utils.Recipe, model=None, tokenizer=None, batch_size: int = 8):
    """The validator a recipe asks for: 'embedding' (CPU), 'model' (needs the policy) or 'none'."""
    recipe.check()  # the one place that names the validators: an unknown one fails there
    if recipe.validator == "embedding":
        return utils.EmbeddingValidator(recipe.validator_threshold)
    if recipe.validator == "none":
        return None
    if model is None:
        raise ValueError("validator 'model' needs the policy model and tokenizer")
    generator = HFGenerator(model, tokenizer, batch_size, progress=False)
    # the base model judges: a PEFT policy's adapter is off while it answers
    return utils.LLMValidator(generator, base=getattr(model, "disable_adapter", None))


def evaluate_policy(recipe: utils.Recipe, adapter: str = "", label: str = "eval", method: str = "eval",
                    step: int = 0, batch_size: int = 8) -> tuple[utils.EvalResult, Path]:
    """The recipe's model (+ adapter) validated on its val split, the trainers' way; returns the
    result and where its titles went (<run>/eval/<label>.jsonl; the row goes to <run>/metrics.jsonl).

    Seeded with recipe.seed first: every policy is scored on the same sampled-title draws' seed."""
    utils.set_seed(recipe.seed)
    model, tokenizer = load_model(recipe.model, adapter)
    val, report = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
    print(report.summary())
    validator = make_validator(recipe, model, tokenizer)
    timer = utils.Timer()
    result = utils.score_val(recipe, HFGenerator(model, tokenizer, batch_size), val, validator)
    run_dir = utils.run_dir_for(recipe, "eval")
    row = utils.eval_metrics_row(result, method=method, step=step, wall_time=timer(), run=run_dir.name,
                                 extra={"label": label, "adapter": adapter, "model": recipe.model})
    return result, utils.write_eval(run_dir, label, result, row)
