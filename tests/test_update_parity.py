"""hntitles/analysis/update_parity.py: one fixed group through TRL's and ART's own update code.

The slow tests run both trainers on models/tiny in float32 (a few seconds each): with every
alignment on, the two updates are the same to float noise; with the CPU engine scoring at
temperature 1 (ART's way) while sampling at T != 1, they measurably are not.
"""

from __future__ import annotations

import dataclasses

import pytest

from hntitles.analysis import update_parity
from hntitles.runs import settings


def test_aligned_knobs_are_the_demos_aligned_setting():
    from hntitles.analysis import experiment

    recipe = experiment.load_recipe(str(settings.ROOT / "recipes" / "tiny.yaml"), experiment.SETTINGS["aligned"])
    assert {k: getattr(recipe, k) for k in update_parity.ALIGNED} == update_parity.ALIGNED
    flags = experiment.SETTING_ART_FLAGS["aligned"]
    assert dict(zip(flags[::2], flags[1::2], strict=True)) == {
        f"--{k}": str(v).lower() for k, v in update_parity.ALIGNED_ART.items()}


def test_parity_settings_refuse_an_unknown_knob():
    with pytest.raises(TypeError, match="unknown knob"):
        update_parity.parity_settings(settings.Recipe(), {"score_temprature": True})


def test_raw_logprobs_score_at_their_temperature():
    import torch

    from hntitles.engines.generation import RawLogprobs

    scores = torch.tensor([[2.0, 0.5, -1.0]])
    for temperature, divisor in ((1.0, 1.0), (0.5, 0.5), (0.0, 1.0)):  # 0: greedy keeps the raw logits
        capture = RawLogprobs(temperature)
        assert capture(None, scores) is scores  # the sampler sees the logits unchanged
        assert torch.allclose(capture.steps[0], torch.log_softmax(scores / divisor, dim=-1))


def test_comparison_of_states():
    import torch

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    initial = {key.format("A"): torch.ones(2, 2), key.format("B"): torch.zeros(2, 2)}
    trl = [{key.format("A"): torch.ones(2, 2), key.format("B"): torch.full((2, 2), 0.1)}]
    art = [{key.format("A"): torch.ones(2, 2), key.format("B"): torch.full((2, 2), 0.2)}]
    (row,) = update_parity.compare_states(initial, trl, art)
    assert row["cosine"] == pytest.approx(1.0) and row["rel_l2"] == pytest.approx(1.0)
    assert row["art_norm"] == pytest.approx(2 * row["trl_norm"])
    assert set(row["module_cosine"]) == {"q_proj.lora_B"}  # lora_A did not move: no cosine
    table = update_parity.markdown([row])
    assert table.count("\n") == 2 and "| 1 | 1.0000 | 1.0000 |" in table and "n/a" in table


# --------------------------------------------------------------------------------------
# Both trainers on the tiny model
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_recipe(tiny_model) -> settings.Recipe:
    (recipe,) = settings.parse_args((settings.Recipe,), "shared", ["--recipe", "recipes/tiny.yaml"])
    return dataclasses.replace(recipe, model=str(tiny_model), temperature=0.5, num_generations=4,
                               max_completion_tokens=8, max_grad_norm=0.1)


@pytest.fixture
def uneven_group(monkeypatch):
    """The fixed group with completions cut to 8, 6, 4 and 2 tokens: loss normalisations then differ."""
    real = update_parity.fixed_group

    def cut(*args, **kwargs):
        group = real(*args, **kwargs)
        group.completions = [dataclasses.replace(c, token_ids=c.token_ids[:n], logprobs=c.logprobs[:n])
                             for c, n in zip(group.completions, (8, 6, 4, 2), strict=True)]
        return group

    monkeypatch.setattr(update_parity, "fixed_group", cut)


def run(recipe, **knobs) -> list[dict]:
    rows = update_parity.compare_updates(recipe, 2, rewards="linear", **knobs)
    print(knobs, "\n" + update_parity.markdown(rows))
    assert rows[0]["served_gap"] < 1e-4  # ART is fed what the server returned, recomputed to float noise
    return rows


@pytest.mark.slow
def test_aligned_updates_are_the_same(tiny_recipe, uneven_group):
    """Every alignment on (the demo's `aligned`): TRL's and ART's updates agree to float noise, step
    after step. What remains is the advantage scale (ART divides by mean |A|, TRL by the sample std):
    both gradients are clipped to max_grad_norm and Adam's step does not depend on a constant factor."""
    rows = run(tiny_recipe)
    for r in rows:
        assert r["cosine"] > 0.99999 and r["rel_l2"] < 1e-3 and r["min_module_cosine"] > 0.9999, r
        assert r["art_grad_norm"] != pytest.approx(r["trl_grad_norm"], rel=1e-3)  # the scales differ before clipping


@pytest.mark.slow
def test_each_alignment_matters(tiny_recipe, uneven_group):
    """At T != 1 ART's temperature-1 scoring, and with unequal lengths ART's 1 / length weights, each
    change the update measurably; TRL's per-sequence mean ('grpo', the same gradient on-policy) gives
    back the agreement without token_level_loss: that difference is the normalisation and nothing else."""
    hot = run(tiny_recipe, score_temperature=False)
    weighted = run(tiny_recipe, token_level_loss=False)
    assert hot[0]["rel_l2"] > 1e-2 and weighted[0]["rel_l2"] > 1e-2
    same = run(tiny_recipe, token_level_loss=False, trl_loss_type="grpo")
    assert all(r["cosine"] > 0.99999 and r["rel_l2"] < 1e-3 for r in same)
