"""A transformers policy on this machine: load it, write titles with it, validate with its base.

Shared by evaluate.py, the TRL trainer's validation, titles.py and the demo, so every local
model is scored by one procedure (evaluation.score_val) with one validator:

- `load_model(model_id, adapter)`: the model (+ a PEFT adapter folder) and tokenizer, fp32, eval mode
  (fast_backend.load_policy is the other direction: the trainable LoRA policy of a training run);
- `make_validator(recipe, model, tokenizer)`: the validator the recipe names ('embedding', or
  'model': utils.LLMValidator with the adapter disabled, i.e. the base model answers);
- `scoring_tools(recipe)`: the val tokenizer and the validator, loading the model only if the validator needs it;
- `evaluate_reference(recipe)`: the val stories' real titles through the same validator and reward
  (<run>/eval/reference.jsonl: the reports' reference row);
- `evaluate_policy(recipe, ...)`: load, validate on the val split with generation.HFGenerator,
  write <run>/metrics.jsonl and <run>/eval/<label>.jsonl (what `make eval` and the demo's
  evaluations do).

Quick check (loads the tiny model, no server):

    python -c "from hntitles.engines import policy; m, t = policy.load_model('models/tiny');
        print(type(m).__name__, len(t))"
"""

from __future__ import annotations

from pathlib import Path

import utils
from hntitles.analysis import evaluation
from hntitles.engines.generation import HFGenerator
from hntitles.runs import rundir, settings


def load_model(model_id: str, adapter: str = ""):
    """Model (+ adapter) and tokenizer, fp32 on CPU, in eval mode; an adapter that does not load
    (rundir.adapter_problem) is a CheckpointError naming it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with settings.hub_errors(model_id):  # an unreachable hub id is one line saying what to do, not a traceback
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter:
        from peft import PeftModel

        if problem := rundir.adapter_problem(Path(adapter)):
            raise rundir.CheckpointError(f"the adapter in {adapter} cannot be loaded ({problem}); pass a checkpoint "
                                         "folder that holds an intact PEFT adapter")
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def make_validator(recipe: settings.Recipe, model=None, tokenizer=None, batch_size: int = 8):
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


def evaluate_policy(recipe: settings.Recipe, adapter: str = "", label: str = "eval", method: str = "eval",
                    step: int = 0, batch_size: int = 8) -> tuple[evaluation.EvalResult, Path]:
    """The recipe's model (+ adapter) validated on its val split, the trainers' way; returns the
    result and where its titles went (<run>/eval/<label>.jsonl; the row goes to <run>/metrics.jsonl).

    Seeded with recipe.seed first: every policy is scored on the same sampled-title draws' seed."""
    settings.set_seed(recipe.seed)
    model, tokenizer = load_model(recipe.model, adapter)
    val, report = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
    print(report.summary())
    validator = make_validator(recipe, model, tokenizer)
    timer = rundir.Timer()
    result = evaluation.score_val(recipe, HFGenerator(model, tokenizer, batch_size), val, validator)
    run_dir = rundir.run_dir_for(recipe, "eval")
    row = evaluation.eval_metrics_row(result, method=method, step=step, wall_time=timer(), run=run_dir.name,
                                 extra={"label": label, "adapter": adapter, "model": recipe.model})
    return result, evaluation.write_eval(run_dir, label, result, row)


def scoring_tools(recipe: settings.Recipe):
    """(tokenizer, validator) for scoring titles that come from elsewhere: the recipe's tokenizer picks
    the val stories (the same length filter as for the trained policies); its model is loaded only
    if the validator needs it."""
    if recipe.validator == "model":
        model, tokenizer = load_model(recipe.model)
    else:
        from transformers import AutoTokenizer

        with settings.hub_errors(recipe.model):
            model, tokenizer = None, AutoTokenizer.from_pretrained(recipe.model)
    return tokenizer, make_validator(recipe, model, tokenizer)


def evaluate_reference(recipe: settings.Recipe, label: str = "reference") -> evaluation.EvalResult:
    """The val stories' real titles scored like every policy's (validator, reward server, reward rule):
    what a good title scores on this reward. Written to <run>/eval/<label>.jsonl with its metrics row."""
    tokenizer, validator = scoring_tools(recipe)
    val, _ = utils.load_split(recipe, recipe.val_split, tokenizer, recipe.max_val_stories)
    timer = rundir.Timer()
    result = evaluation.score_titles(recipe, val, [str(r["title"]) for r in val], validator)
    run_dir = rundir.run_dir_for(recipe, "eval")
    row = evaluation.eval_metrics_row(result, method="reference", step=0, wall_time=timer(), run=run_dir.name,
                                      extra={"label": label, "titles": "the real Hacker News titles"})
    evaluation.write_eval(run_dir, label, result, row)
    return result
