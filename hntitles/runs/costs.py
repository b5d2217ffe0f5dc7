"""What one training step cost, read from a metrics row both trainers write (utils.metrics_row).

- `COST_KEYS`: where each cost lives in a train row's extras (our own key first, then ART's step metrics);
- `row_cost(row, name)`: one cost of one train row, None when the trainer did not log it.

The reports' cost columns (analysis.comparison.run_cost) and the tracker's tokens per second
(runs.tracking.shared_scalars) read costs through here, so both count ART's trained tokens alike.

    python -c "from hntitles.runs import costs; print(costs.row_cost({'extra': {'skipped': True}}, 'trained_tokens'))"
"""

from __future__ import annotations

import math

# Where each cost lives in a train row's extras: our own key first, then ART's metrics of the
# step (LocalBackend reports gradient steps and the assistant tokens it packed for training).
COST_KEYS = {"optimizer_steps": ("optimizer_steps", "train_metrics/data/step_num_gradient_steps"),
             "trained_tokens": ("trained_tokens", "train_metrics/data/step_trainer_tokens"),
             "step_seconds": ("step_seconds",), "step_cpu_seconds": ("step_cpu_seconds",)}


def _number(x) -> float | None:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def row_cost(row: dict, name: str) -> float | None:
    """One cost of one train row (COST_KEYS), None when the trainer did not log it."""
    extra = row.get("extra") or {}
    if extra.get("skipped") and name in ("optimizer_steps", "trained_tokens"):
        return 0.0  # an ART step whose groups could not teach: skipped untrained
    for key in COST_KEYS[name]:
        section, _, sub = key.partition("/")
        value = (extra.get(section) or {}).get(sub) if sub else extra.get(key)
        if _number(value) is not None:
            return _number(value)
    return None
