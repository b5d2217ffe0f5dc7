"""What a run is, for both trainers alike.

- `settings`: `Recipe` (the knobs both trainers share), `parse_args` (`.env` < recipe < environment < flags),
  the Hub mode, paths and defaults;
- `rundir`: the run directory (one writer, `config.json`, `metrics.jsonl`, checkpoints, `final/`);
- `runtime`: exit codes, stop signals (checkpoint then stop), argument logging;
- `procs`: child processes (the reward server on a free port, trainers streamed to a log);
- `tracking`: the experiment tracker (`--report_to`: TensorBoard by default, W&B optional), the same keys at the
  same steps for both trainers;
- `completions`: the rollout tables (`completions/step-N.parquet`), one schema for both trainers;
- `costs`: what one training step cost, read from a metrics row (the reports and the tracker alike);
- `model_card`: the card in every adapter folder both trainers save, filled from the run.
"""
