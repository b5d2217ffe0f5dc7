"""Print the rollouts of one training step of several runs side by side (one column per run).

Both trainers write every step's completions to `<run>/completions/step-NNNNN.parquet` in one schema
(hntitles/runs/completions.py). This reads them back: for each run, the step's groups (one per story), each
completion's title with its reward, RM score, validator verdict and advantage, best first.

    python rollouts.py runs/trl-cpu-aligned runs/art-cpu-aligned --step 1
    python rollouts.py runs/trl-cpu-aligned runs/art-cpu-aligned --step 20 --story 4321
    python rollouts.py runs/trl-cpu-aligned runs/art-cpu-aligned --step 0 --story 4321   # every step it was in
    make rollouts RUNS="runs/trl-cpu-aligned runs/art-cpu-aligned" STEP=20
"""

from __future__ import annotations

import itertools
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hntitles.runs import completions, rundir


@dataclass
class RolloutArgs:
    runs: list[str] = field(default_factory=list, metadata={"help": "Run directories (one column each)."})
    step: int = field(default=1, metadata={"help": "Training step to show; 0 = every step (with --story)."})
    story: str = field(default="", metadata={"help": "Show only this story id's group."})
    width: int = field(default=0, metadata={"help": "Total width in characters (default: the terminal's)."})
    max_chars: int = field(default=0, metadata={
        "help": "Characters of each title shown (default: what the column fits)."})


def column(run_dir: Path, steps: list[int], story: str, width: int) -> list[str]:
    """One run's lines: a header, then per step and story the group's completions, best first."""
    name = rundir.shown(run_dir)
    lines = [(name if len(name) <= width else run_dir.name)[:width]]
    for step in steps:
        rows = [r for r in completions.read_step(run_dir, step) if not story or r["story_id"] == story]
        if not rows:
            lines += [f"step {step}: story {story} not in this step"[:width]]
            continue
        lines += [f"step {step} ({rows[0]['method']}): {len(rows)} completions"[:width]]
        for story_id, group in itertools.groupby(sorted(rows, key=lambda r: (r["group"], -r["reward"])),
                                                 key=lambda r: (r["group"], r["story_id"])):
            group = list(group)
            mean = sum(r["reward"] for r in group) / len(group)
            lines.append(f"  story {story_id[1]}  mean reward {mean:.3f}"[:width])
            for r in group:
                head = f"  {r['reward']:5.3f} {'+' if r['supported'] else 'x'} A{r['advantage']:+.2f} "
                lines.append((head + (r["title"] or "(no title)").replace("\n", " "))[:width])
    return lines


def main(args: RolloutArgs) -> list[list[str]]:
    """The columns printed side by side; SystemExit naming what is missing."""
    if not args.runs:
        raise SystemExit("rollouts: name one or more run directories (make rollouts RUNS=\"runs/a runs/b\")")
    run_dirs = [Path(r) for r in args.runs]
    for run_dir in run_dirs:
        if not completions.steps(run_dir):
            raise SystemExit(f"rollouts: {run_dir} has no rollout tables ({run_dir}/completions/step-*.parquet); "
                             "train it first (make train-trl / make train-art / make demo)")
    if args.step == 0 and not args.story:
        raise SystemExit("rollouts: --step 0 (every step) needs --story")

    # ---- Each run's column, the same step(s)
    total = args.width or shutil.get_terminal_size((160, 40)).columns
    width = args.max_chars or max(30, (total - 3 * (len(run_dirs) - 1)) // len(run_dirs))
    columns = []
    for run_dir in run_dirs:
        steps = completions.steps(run_dir) if args.step == 0 else [args.step]
        try:
            columns.append(column(run_dir, steps, args.story, width))
        except FileNotFoundError as e:
            raise SystemExit(f"rollouts: {e}") from None

    # ---- Side by side
    for cells in itertools.zip_longest(*columns, fillvalue=""):
        print(" | ".join(c.ljust(width) for c in cells).rstrip())
    print("\nreward, + supported by the body (x: not, reward 0), A = advantage the trainer used")
    return columns


if __name__ == "__main__":
    from transformers import HfArgumentParser

    parser = HfArgumentParser(RolloutArgs, description=__doc__.splitlines()[0])
    sys.exit(main(parser.parse_args_into_dataclasses()[0]) and 0)
