"""Experiment tracking for both trainers: one `--report_to`, the same keys at the same steps.

`open_tracker(recipe, run_dir, method)` checks and opens the tracker a run logs to (`recipe.report_to`), before anything heavy loads, or fails at
once with `TrackerError` naming the flag to change (never after hours of training). `Tracker.start(first_step)`,
once the run knows where it resumes, begins logging at that step. Then:

- `Tracker.log_row(row)`: a shared-schema metrics row (`utils.metrics_row`, `evaluation.eval_metrics_row`) as
  scalars under `hn_train/` or `hn_val/`, at the row's step. Both trainers write the same rows, so both methods
  log the same keys at the same steps and overlay in one dashboard.
- `Tracker.log_optimizer(step, values)`: loss, grad norm, learning rate, entropy, KL as each library reports them,
  under the same `hn_train/` names (`OPTIMIZER_KEYS` maps each library's name).
- `Tracker.log_rollouts(step, records)`: the step's rollout table (tensorboard: a markdown text panel; wandb: a
  `wandb.Table`).

Kinds: `tensorboard` (the default: installed, offline, the data in `<run>/tracker/`, `make board` opens it),
`wandb` (optional: `requirements-wandb.txt`; needs `WANDB_API_KEY`, or `WANDB_MODE=offline`; the data in
`<run>/tracker/`, the run id in `<run>/tracker/wandb_id`) and `none`. `trackio` is refused with the reason
(`TRACKIO_REFUSED`). A failure while logging loses only the tracker's data: it is counted (`failures`), said once,
and training goes on. A resumed run appends to the same tracker run: TensorBoard purges what the interrupted run
logged from `first_step` on (`SummaryWriter(purge_step=...)`), W&B resumes the stored run id.

    >>> shared_scalars({"split": "val", "reward_mean": 0.5, "match_rate": 1.0, "extra": {"greedy_reward_mean": 0.4}})
    {'hn_val/reward': 0.5, 'hn_val/match_rate': 1.0, 'hn_val/greedy_reward': 0.4}
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import uuid
from pathlib import Path

from hntitles.runs import costs

REPORT_TO = ("tensorboard", "wandb", "none", "trackio")
TRACKER_DIR = "tracker"  # under the run directory: the tracker's data lives with the run it describes
TRACKIO_REFUSED = ("trackio 0.43 pins pillow<13, and this stack runs pillow 13 (torchvision and the plots use it): "
                   "installing it would downgrade a package the rest of the repo was tested with. Use "
                   "--report_to tensorboard (the default, offline) or wandb")

# The row's fields that become scalars (a row's name -> the dashboard's), then the extras both trainers write.
ROW_KEYS = {"reward_mean": "reward", "reward_std": "reward_std", "rm_mean": "rm", "match_rate": "match_rate",
            "title_len_mean": "title_words", "copy_frac_mean": "copy_frac", "trailing_rate": "trailing_rate"}
EXTRA_KEYS = {"greedy_reward_mean": "greedy_reward", "step_seconds": "step_seconds",
              "step_cpu_seconds": "step_cpu_seconds", "reward_seconds": "reward_seconds",
              "completion_tokens_mean": "completion_tokens", "trained_tokens": "trained_tokens",
              "hit_token_cap": "hit_token_cap"}
# Each library's name for an optimizer statistic (TRL's logs; ART's train metrics) -> the dashboard's.
OPTIMIZER_KEYS = {"loss": "loss", "loss/train": "loss", "grad_norm": "grad_norm", "loss/grad_norm": "grad_norm",
                  "learning_rate": "learning_rate", "loss/learning_rate": "learning_rate",
                  "entropy": "entropy", "loss/entropy": "entropy", "kl": "kl", "loss/kl": "kl"}


class TrackerError(RuntimeError):
    """The tracker cannot start; the message names the flag to change."""


def shared_scalars(row: dict) -> dict[str, float]:
    """A metrics row's finite numbers under `hn_<split>/`, plus tokens per second for a train row."""
    prefix = f"hn_{row['split']}/"
    out = {prefix + name: row[key] for key, name in ROW_KEYS.items() if key in row}
    extra = dict(row.get("extra") or {})
    if row["split"] == "train":  # ART's: the tokens its packer trained on (costs.row_cost's rule)
        extra["trained_tokens"] = costs.row_cost(row, "trained_tokens")
    out.update({prefix + name: extra[key] for key, name in EXTRA_KEYS.items() if extra.get(key) is not None})
    if extra.get("trained_tokens") is not None and extra.get("step_seconds"):
        out[prefix + "tokens_per_second"] = extra["trained_tokens"] / extra["step_seconds"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def optimizer_scalars(values: dict) -> dict[str, float]:
    """A library's optimizer statistics under the shared names (`hn_train/loss`, ...); the rest is left out."""
    return {f"hn_train/{OPTIMIZER_KEYS[k]}": float(v) for k, v in values.items()
            if k in OPTIMIZER_KEYS and isinstance(v, (int, float)) and math.isfinite(v)}


class Tracker:
    """One run's tracker. Every call is guarded: a failure is counted and said once, never raised."""

    kind = "none"

    def __init__(self, label: str = ""):
        self.label, self.failures = label, 0

    def start(self, first_step: int) -> None:
        """Begin logging; `first_step` is the first step this process logs (what an earlier process logged from
        it on is replaced, so a resumed run logs each step once)."""
        self.guard(self._start, first_step)

    def log_row(self, row: dict) -> None:
        self.guard(self._scalars, shared_scalars(row), row["step"])

    def log_optimizer(self, step: int, values: dict) -> None:
        if scalars := optimizer_scalars(values):
            self.guard(self._scalars, scalars, step)

    def log_rollouts(self, step: int, records: list[dict]) -> None:
        if records:
            self.guard(self._table, records, step)

    def close(self) -> None:
        self.guard(self._close)
        if self.failures:
            print(f"{self.label} the {self.kind} tracker failed {self.failures} time(s); its data is incomplete, "
                  "training and metrics.jsonl are not", file=sys.stderr)

    def guard(self, fn, *a, **kw) -> None:
        """fn(*a, **kw), a failure counted (said the first time), never raised: a tracker must not cost a run."""
        try:
            fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 (a tracker must never cost a run)
            self.failures += 1
            if self.failures == 1:
                print(f"{self.label} warning: the {self.kind} tracker failed ({type(e).__name__}: {e}); training "
                      "goes on, later failures are only counted", file=sys.stderr)

    def _start(self, first_step: int) -> None:
        pass

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        pass

    def _table(self, records: list[dict], step: int) -> None:
        pass

    def _close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    kind = "tensorboard"

    def __init__(self, log_dir: Path, label: str = ""):
        super().__init__(label)
        from torch.utils.tensorboard import SummaryWriter  # imported now: a missing tensorboard fails at start-up

        self.log_dir, self.writer_class, self.writer = log_dir, SummaryWriter, None

    def _start(self, first_step):
        # purge_step: what an interrupted run logged from first_step on is dropped when TensorBoard reads the
        # run back, so a resumed run logs each step once, in the same run (the same directory).
        self.writer = self.writer_class(log_dir=str(self.log_dir), purge_step=first_step if first_step > 1 else None)

    def _scalars(self, scalars, step):
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def _table(self, records, step):
        self.writer.add_text("hn_rollouts", markdown_table(records), step)
        self.writer.flush()

    def _close(self):
        if self.writer is not None:
            self.writer.close()


class WandbTracker(Tracker):
    kind = "wandb"

    def __init__(self, log_dir: Path, name: str, config: dict, label: str = ""):
        super().__init__(label)
        import wandb

        id_file = log_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "hn-titles", name=name, id=run_id,
                              resume="allow", dir=str(log_dir), config=config)

    def _scalars(self, scalars, step):
        self.run.log(scalars, step=step)

    def _table(self, records, step):
        columns = list(records[0])
        self.run.log({"hn_rollouts": self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns]
                                                                          for r in records])}, step=step)

    def _close(self):
        self.run.finish()


def open_tracker(recipe, run_dir: Path, method: str, first_step: int | None = None) -> Tracker:
    """The recipe's tracker (`recipe.report_to`) for this run, checked and opened now; started at
    `first_step` when given (else call `start(first_step)` before logging). Only the process of
    rank 0 (the `RANK` variable, as accelerate sets it) logs: the others get a silent tracker."""
    if int(os.environ.get("RANK", "0")):
        return Tracker()
    tracker = open_kind(recipe.report_to, Path(run_dir), config={"method": method, **dataclasses.asdict(recipe)},
                        label=f"[{method}]")
    if first_step is not None:
        tracker.start(first_step)
    return tracker


def open_kind(kind: str, run_dir: Path, *, config: dict | None = None, label: str = "") -> Tracker:
    """A tracker of this kind for the run directory, checked and opened now (TrackerError names the flag)."""
    if kind == "none":
        return Tracker(label)
    if kind == "trackio":
        raise TrackerError(f"--report_to trackio: {TRACKIO_REFUSED}")
    if kind not in REPORT_TO:
        raise TrackerError(f"--report_to {kind!r}: choose one of {', '.join(REPORT_TO[:3])}")
    log_dir = run_dir / TRACKER_DIR
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        probe = log_dir / ".write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrackerError(f"--report_to {kind}: cannot write {log_dir} ({e}); fix the directory or pass "
                           "--report_to none") from e
    if kind == "tensorboard":
        return TensorBoardTracker(log_dir, label)
    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        raise TrackerError("--report_to wandb needs WANDB_API_KEY (or WANDB_MODE=offline to log locally); set it in "
                           ".env or pass --report_to tensorboard")
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise TrackerError("--report_to wandb: wandb is not installed (pip install -r requirements-wandb.txt), or "
                           "pass --report_to tensorboard") from e
    try:
        return WandbTracker(log_dir, run_dir.name, config or {}, label)
    except Exception as e:  # noqa: BLE001 (wandb.init's errors: no network, a bad key)
        raise TrackerError(f"--report_to wandb could not start ({type(e).__name__}: {e}); pass --report_to "
                           "tensorboard, or WANDB_MODE=offline") from e


def markdown_table(records: list[dict]) -> str:
    """Records as a markdown table (TensorBoard's text panel renders it); '|' and newlines escaped.

    >>> print(markdown_table([{"story": "7", "title": "A | B"}]))
    | story | title |
    | --- | --- |
    | 7 | A \\| B |
    """
    columns = list(records[0])

    def cell(v) -> str:
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in records]
    return "\n".join(lines)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What a run's TensorBoard data holds, read back as TensorBoard shows it: tag -> [(step, value)].

    TensorBoard's own reader (EventAccumulator) over `<run>/tracker/`, so a resumed run's purged
    steps read as TensorBoard drops them.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / TRACKER_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
