"""The shared core of the HN-titles GRPO repo, one part per folder (the stage scripts at the repo's top level and
`utils.py`, the core both trainers share to make a step, import it; nothing here imports a stage script):

- `reward`: what the reward server scores with (scorers, embeddings, text metrics);
- `engines`: rollouts and engines (generation, the TRL trainer's GPU seam, the shared-prefix loss, policies,
  OpenAI-compatible endpoints);
- `trl`: TRL's side of the recipe (the one GRPOConfig builder);
- `art`: ART's side of the recipe and ART's loop on the CPU (the config plan, the CPU engine and its server);
- `runs`: settings, the run directory, the runtime both trainers share, child processes;
- `analysis`: evaluation, comparisons, statistics, experiments, the semantics table, the same-update check;
- `uv_flags`: pip's configuration as `uv pip install` flags (run by `make setup`, stdlib only).

Importing the package or any part does no work: every module loads its heavy libraries when it is used.
"""
