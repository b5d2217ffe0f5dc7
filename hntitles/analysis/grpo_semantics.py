"""What "GRPO" means in each library as this repo runs it: one table for the README and the demo.

"Same learning rate" is not "same update": the two libraries differ in optimizer, weight decay,
betas, how many optimizer steps one batch makes, how advantages are scaled, what happens to
zero-advantage trajectories, where the KL term goes and how prompts are packed. Each row names
what TRL does, what ART does and the recipe knob that aligns it (or why none can). The facts
were read in the installed packages (trl 1.14.2, transformers 5.17.0, openpipe-art 0.5.18);
`tests/test_semantics.py` checks that every knob named here exists.

    python -m hntitles.analysis.grpo_semantics            # print the table (Markdown)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Difference:
    what: str
    trl: str   # reference_grpo_trainer.py: TRL GRPOTrainer (CPU: transformers; GPU: Unsloth + vLLM)
    art: str   # train.py: ART's loop (CPU engine here; GPU: LocalBackend = Unsloth + vLLM)
    knob: str  # recipe knob(s) that align it, or "none" + why
    knobs: tuple[str, ...] = ()  # field names (settings.Recipe or ArtArgs/TrlArgs) the row relies on


TABLE: tuple[Difference, ...] = (
    Difference(
        "optimizer",
        "transformers' default `adamw_torch_fused` (torch AdamW); Unsloth's GRPOConfig: `adamw_8bit`",
        "LocalBackend: `paged_adamw_8bit` (art/dev/get_model_config.py); the CPU engine: torch AdamW in fp32 "
        "(8-bit optimizers need bitsandbytes on CUDA; it says so when it replaces one)",
        "`optimizer` (`adamw` = torch AdamW on both; TRL gets `optim=adamw_torch`). Reaches TRL, Unsloth, the "
        "CPU engine and LocalBackend (through ART's trainer_args); the CPU engine refuses the 8-bit ones",
        ("optimizer",)),
    Difference(
        "weight decay",
        "0.0 (TrainingArguments); Unsloth's GRPOConfig: 0.001",
        "0.1: LocalBackend sets it on every param group at each `train` call (unsloth/train.py "
        "run_unsloth_rl_training); the CPU engine does the same unless the recipe sets it",
        "`weight_decay`. Reaches TRL, Unsloth and the CPU engine; it cannot reach LocalBackend, which overwrites "
        "the value on every call",
        ("weight_decay",)),
    Difference(
        "Adam betas",
        "0.9 / 0.999", "0.9 / 0.99 (art/dev/get_model_config.py)",
        "`adam_beta1`, `adam_beta2`", ("adam_beta1", "adam_beta2")),
    Difference(
        "optimizer steps per batch",
        "one per generation batch (steps_per_generation 1, no gradient accumulation)",
        "LocalBackend: one per packed row, and it packs one trajectory per row "
        "(`_supports_result_packing = False`): prompts_per_step x num_generations steps per ART step",
        "`optimizer_steps`: `per_step` (TRL's way: the CPU engine averages the rows' gradients, one step) or "
        "`per_sequence` (LocalBackend's). TRL cannot take `per_sequence` and LocalBackend cannot take `per_step`: "
        "both refuse, so `aligned` means `per_step` on TRL and the CPU engine",
        ("optimizer_steps",)),
    Difference(
        "advantage scaling",
        "(r - group mean) / (group std + 1e-4), std with Bessel's correction (`scale_rewards='group'`)",
        "(r - group mean) / (group std + 1e-6), population std (preprocessing/tokenize.py); then every advantage "
        "of the batch is rescaled so that mean |A| x token weight = 1 (preprocessing/pack.py)",
        "`scale_rewards` (ArtArgs; TRL keeps 'group') for the std division. The batch-wide rescale has no knob: "
        "a constant factor per batch (one group: ART's advantages are TRL's x the rewards' sample std / their "
        "mean absolute deviation) that Adam's step does not see, and that clipping removes when both gradients "
        "are above `max_grad_norm`; it shows only when one is above and the other below. One SmolLM2 group "
        "(update_parity): grad norms 0.90 (TRL) vs 1.15 (ART), both clipped to 0.1, and the aligned updates "
        "equal to a relative L2 of 8e-4",
        ("scale_rewards", "max_grad_norm")),
    Difference(
        "zero-advantage trajectories",
        "kept: no gradient, but their tokens count in the loss normaliser",
        "dropped before training (tokenize.py `drop_zero_advantage_trajectories=True`); a step where no "
        "group can teach is skipped untrained (its row says why)",
        "none: ART's packing drops them; the metrics row counts trainable groups",
        ()),
    Difference(
        "loss normalisation",
        "CISPO/DAPO: sum over all completion tokens of the batch / their number",
        "each trajectory's tokens weighted 1 / its length (preprocessing/tokenize.py), summed per row / the row's "
        "assistant tokens (loss.py): a mean of per-trajectory means, packed or not; short completions weigh more "
        "per token",
        "`token_level_loss` (ArtArgs, CPU engine only; LocalBackend refuses it): every completion token of a step "
        "weighs the same, TRL's normalisation; the demo's `aligned` setting sets it. One SmolLM2 group of 8 "
        "(12 to 24 tokens, update_parity): update cosine 0.90 without it (0.93 at step 3), 1.0000 with it; "
        "TRL's `grpo` loss (a per-sequence mean, CISPO's gradient on-policy) matches ART's own weights to 1.0000",
        ("loss_type", "token_level_loss")),
    Difference(
        "logprob temperature",
        "tokens scored at the sampling temperature: log-softmax(logits / temperature) in the loss, the old and "
        "reference logprobs and the entropy (`selective_log_softmax(..., temperature=self.temperature)`)",
        "tokens scored at temperature 1 whatever the sampling temperature: loss.py and unsloth/train.py use the raw "
        "logits, vLLM returns raw logprobs and `Model.litellm_completion_params` pins `temperature: 1` (\"Important "
        "for trainable models\"). At T != 1 the gradient is the T = 1 distribution's, not the sampled one's",
        "`score_temperature` (ArtArgs, CPU engine only; LocalBackend refuses it): the trainer's logprobs and "
        "entropies and the server's rollout logprobs at the sampling temperature, so CISPO's ratio stays 1 "
        "on-policy; the demo's `aligned` setting sets it. One SmolLM2 group at T = 0.7 (update_parity): update "
        "cosine 0.79 without it (0.86 at step 3), 1.0000 with it; 0.75 with neither it nor `token_level_loss`",
        ("score_temperature", "temperature")),
    Difference(
        "entropy metric",
        "`entropy`: mean over completion tokens of the entropy of the distribution each was drawn from (at the "
        "sampling temperature)",
        "`loss/entropy`: loss.py shifts the entropies once more than the logprobs, so it averages the entropy of "
        "the distribution after each completion token (the first token's left out, the one after the last "
        "counted), weighted as the loss weighs tokens, at temperature 1; the CPU engine computes it where loss.py "
        "reads it",
        "`score_temperature` puts it at the sampling temperature; the shift stays (a logged number, not the "
        "update). One SmolLM2 group at T = 0.7: TRL 2.13, ART 3.70 at T = 1 and 1.92 with it",
        ("score_temperature",)),
    Difference(
        "importance-weight cap (CISPO)",
        "clamp(ratio, max=epsilon_high)",
        "clip(ratio, 1 - epsilon, 1 + epsilon_high), defaults 1.0 / 4.0 (loss.py)",
        "`cispo_max_weight` w: TRL epsilon_high = w, ART epsilon = 1 and epsilon_high = w - 1: the same [0, w]",
        ("cispo_max_weight",)),
    Difference(
        "KL placement",
        "beta x k3 KL per token added to the loss (needs the reference model's logprobs)",
        "kl_penalty_coef x (batch mean KL - token KL) added to the advantages (loss.py)",
        "`beta` reaches both, in each library's own form; it is 0 in every shipped recipe, so no KL on either side",
        ("beta",)),
    Difference(
        "learning-rate schedule, clipping",
        "constant lr (set here), clip to max_grad_norm per optimizer step",
        "constant lr, clip to max_grad_norm per optimizer step (so per trajectory under LocalBackend)",
        "`learning_rate`, `max_grad_norm`", ("learning_rate", "max_grad_norm")),
    Difference(
        "prompt packing",
        "every completion is a row with its full left-padded prompt",
        "LocalBackend: one trajectory per row, full prompt each; the CPU engine the same, or with `pack_groups` "
        "ART's packer puts a group's trajectories in one row with the prompt stored once",
        "`pack_groups` (ArtArgs, CPU engine only). The same tokens get the same logprobs; ART's loss divides each "
        "row by its own assistant tokens and its packer weighs a trajectory's tokens 1 / its length (rescaled to "
        "average 1 over the batch): packed, each trajectory counts its mean token term; unpacked (`per_step`), "
        "that x mean length / its length. TRL's token normalisation is `token_level_loss`, packed or not. Under "
        "`per_sequence` a packed row is one optimizer step for several trajectories. The demo's `aligned` setting "
        "packs",
        ("pack_groups",)),
    Difference(
        "generation engine",
        "CPU: transformers `generate` in the trainer (fast_backend); GPU: vLLM (Unsloth's or TRL's)",
        "rollouts through the model's OpenAI-compatible server: the CPU engine serves the current adapter "
        "with transformers (the same shared-prefix generation as TRL's CPU path); LocalBackend with vLLM",
        "same sampling parameters from the recipe (`temperature`, `max_completion_tokens`, `stop_at_newline`); "
        "the engines' samplers differ in RNG, not in distribution",
        ("temperature", "max_completion_tokens", "stop_at_newline")),
    Difference(
        "validator model",
        "`validator: model`: the policy with its adapter disabled (the base model); `embedding`: MiniLM cosine",
        "`validator: model`: the base model through the same server (not the trained adapter); `embedding`: "
        "the same MiniLM (utils.EmbeddingValidator)",
        "`validator`, `validator_threshold`: the same judge on both sides", ("validator", "validator_threshold")),
)


def markdown(table: tuple[Difference, ...] = TABLE) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "/")

    lines = ["| difference | TRL (reference_grpo_trainer.py) | ART (train.py) | recipe knob that aligns it |",
             "|---|---|---|---|"]
    lines += [f"| {d.what} | {cell(d.trl)} | {cell(d.art)} | {cell(d.knob)} |" for d in table]
    return "\n".join(lines)


def main() -> str:
    text = markdown()
    print(text)
    return text


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help; no options
    main()
