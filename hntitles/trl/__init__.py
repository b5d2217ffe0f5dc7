"""TRL's side of the shared recipe.

- `config`: `TrlArgs` (the `trl:` block) and `grpo_config`, the one builder of TRL's `GRPOConfig` that the
  trainer, `gpu_check.py` and the benches call.
"""
