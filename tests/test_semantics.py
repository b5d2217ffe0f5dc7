"""hntitles/analysis/grpo_semantics.py: every knob the table names exists where the trainers read it, and the
library facts it states still hold in the installed packages (a version bump that changes one
fails here instead of leaving docs/semantics.md wrong)."""

import dataclasses
from pathlib import Path

import pytest

from hntitles.analysis import grpo_semantics
from hntitles.art import config as art_config
from hntitles.runs import settings
from hntitles.trl import config as trl_config


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_named_knob_exists():

    known = _fields(settings.Recipe) | _fields(art_config.ArtArgs) | _fields(trl_config.TrlArgs)
    named = {k for row in grpo_semantics.TABLE for k in row.knobs}
    assert named and named <= known, named - known
    # the table covers every difference the comparison must name
    whats = {row.what for row in grpo_semantics.TABLE}
    for must in ("optimizer", "weight decay", "Adam betas", "optimizer steps per batch", "advantage scaling",
                 "zero-advantage trajectories", "importance-weight cap (CISPO)", "KL placement", "prompt packing",
                 "generation engine", "validator model", "loss normalisation", "logprob temperature", "entropy metric"):
        assert must in whats


def _source(module: str) -> str:
    import importlib.util

    return Path(importlib.util.find_spec(module).origin).read_text()


@pytest.mark.parametrize("module, needle", [
    # ART LocalBackend: paged AdamW 8-bit, beta2 0.99, weight decay 0.1 in its trainer defaults
    ("art.dev.get_model_config", 'optim="paged_adamw_8bit"'),
    ("art.dev.get_model_config", "adam_beta2=0.99"),
    # ... and weight decay forced on every RL train call; one trajectory per packed row
    ("art.unsloth.train", 'param_group["weight_decay"] = 0.1'),
    ("art.unsloth.train", 'for offset in range(0, packed_tensors["tokens"].shape[0]):'),
    ("art.local.backend", "self._supports_result_packing = False"),
    # advantages: group std + 1e-6, zero-advantage trajectories dropped, then rescaled batch-wide
    ("art.preprocessing.tokenize", "advantage /= reward_std + 1e-6"),
    ("art.preprocessing.tokenize", "drop_zero_advantage_trajectories: bool = True"),
    ("art.preprocessing.pack", "advantages_tensor[assistant_mask_tensor].abs()"),
    # KL folded into the advantages; CISPO clip with two bounds
    ("art.loss", "advantages = advantages + kl_penalty"),
    ("art.loss", "torch.clip(prob_ratio.detach(), 1 - epsilon, 1 + epsilon_high)"),
    # TRL: group std + 1e-4, CISPO cap at epsilon_high, KL as a loss term
    ("trl.trainer.grpo_trainer", "advantages = advantages / (std_rewards + 1e-4)"),
    ("trl.trainer.grpo_trainer", "torch.clamp(coef_1, max=self.epsilon_high)"),
    ("trl.trainer.grpo_trainer", "per_token_loss = per_token_loss + self.beta * per_token_kl"),
    # transformers' optimizer defaults under TRL
    ("transformers.training_args", 'default_optim = "adamw_torch_fused"'),
    # loss normalisation: ART weighs each trajectory's tokens 1 / its length
    ("art.preprocessing.tokenize", "weight = 1 / ("),
    # logprob temperature: TRL divides the logits by its (sampling) temperature in the loss ...
    ("trl.trainer.grpo_trainer", "logits, completion_ids, temperature=self.temperature"),
    ("trl.trainer.utils", "logits = logits / temperature"),
    # ... ART scores raw logits (no temperature in its loss or its logprob kernel; test below) and pins 1
    ("art.unsloth.train", "chunk_logsumexp = torch.logsumexp(chunk_logits, dim=-1)"),
    ("art.model", '"temperature": 1,  # Important for trainable models'),
    # entropy metric: TRL's mean over the completion tokens; ART's loss shifts the entropies once more
    ("trl.trainer.grpo_trainer", 'self._metrics[mode]["entropy"].append(global_masked_mean(entropies))'),
    ("art.loss", "shifted_entropies = shift_tensor(entropies, 0.0)"),
])
def test_library_facts_still_hold(module, needle):
    assert needle in _source(module), f"{module} changed: re-check grpo_semantics.TABLE"


def test_art_scores_tokens_at_temperature_1():
    """Nothing in ART's loss or in its GPU trainer's logprob code divides by a temperature."""
    assert "temperature" not in _source("art.loss")
    train = _source("art.unsloth.train")
    kernel = train[train.index("def _calculate_logprobs("):train.index("def gc_and_empty_cuda_cache(")]
    assert "temperature" not in kernel and "temperature" not in train[train.index("def calculate_logprobs("):]


def test_markdown_has_one_row_per_difference():
    text = grpo_semantics.markdown()
    assert len(text.splitlines()) == 2 + len(grpo_semantics.TABLE)
    lines = text.splitlines()
    assert all(row.count(" | ") == 3 for row in lines[:1] + lines[2:])  # no stray pipes inside cells


def test_the_semantics_doc_carries_the_table():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "semantics.md").read_text(encoding="utf-8")
    assert grpo_semantics.markdown() in readme, (
        "docs/semantics.md is out of date: paste `python -m hntitles.analysis.grpo_semantics`")
