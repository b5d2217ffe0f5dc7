"""TRL's side of the shared recipe.

- `config`: `TrlArgs` (the `trl:` block) and `grpo_config`, the one builder of TRL's `GRPOConfig` that the
  trainer, `gpu_check.py` and the benches call;
- `trainer`: the run's GRPOTrainer class (resumable on a multi-process CPU run, handing its advantages to the
  rollout tables) and TRL's tracker callback, guarded, writing into the run's tracker.
"""
