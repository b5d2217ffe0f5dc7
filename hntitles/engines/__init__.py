"""Rollouts and engines: who writes the titles, and how the TRL trainer's loss runs on each machine.

- `generation`: transformers generation with one prefill per distinct prompt, the `Generator` protocol, stop ids;
- `fast_backend`: the GPU seam of the TRL trainer (CPU, transformers, Unsloth, TRL's vLLM);
- `shared_prefix`: the shared-prefix loss (each prompt encoded once per group) and merged-LoRA rollouts;
- `policy`: a local policy for evaluation (load it with its adapter, its validator, `evaluate_policy`);
- `openai_generator`: any OpenAI-compatible endpoint as a title generator (baselines, ART's validation);
- `bare_policy`: random-init Qwen2.5-0.5B shapes with a word tokenizer (`make gpu-check-bare`, `make gpu-bench`).
"""
