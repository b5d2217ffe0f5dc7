"""ART's side of the shared recipe, and ART's own loop on a CPU.

- `config`: `ArtArgs` (the `art:` block) and `ArtPlan`, the recipe turned into ART's settings once per run
  (internal config, `backend.train` arguments, the CPU engine's options, the optimizer really used);
- `compat`: `import_art()`, ART 0.5.18 imported so that it leaves transformers 5.17 working;
- `cpu_backend`: ART's `LocalBackend` with a CPU model service (the PEFT model, its checkpoints, ART's loss);
- `cpu_server`: the CPU engine's OpenAI-compatible server (Flask), with `token_id:N` logprobs;
- `preflight`: what `make setup-art` needs (driver, glibc, Python 3.12, download hosts), checked first.
"""
