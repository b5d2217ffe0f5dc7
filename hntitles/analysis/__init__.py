"""Measuring and comparing the two methods.

- `evaluation`: the one validation procedure (greedy + sampled titles, scored by the shared rule);
- `comparison`: paired comparisons of two evaluations, verdicts, cost per step;
- `stats`: summaries and bootstrap intervals (`scipy.stats.bootstrap`);
- `experiment`: an experiment's stages, shared by the demo and the study;
- `grpo_semantics`: the table of what differs between TRL's and ART's GRPO, with the knob that aligns each;
- `update_parity`: one fixed group through both trainers' own update code: the same update?
"""
