"""Rollout tables: every training step's completions in one schema for both trainers.

`<run>/completions/step-NNNNN.parquet` holds one row per completion of the step (`COLUMNS`): its story and
place in the group, the completion and its title, the reward and its components, the validator's verdict, the
advantage the trainer used and the completion's tokens. The TRL trainer fills it from its reward function and
`GRPOTrainer`'s own advantages; the ART loop from its scored trajectory groups, the advantage by ART's formula
(`art_advantages`, ART 0.5.18's `preprocessing/tokenize.py`: population std, before its batch-wide rescale). A
resumed step rewrites its file whole (written to a temporary name, then renamed), so no step holds rows twice.

    >>> [round(a, 3) for a in art_advantages([1.0, 0.0], scale=True)]
    [1.0, -1.0]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

COMPLETIONS_DIR = "completions"
# column -> pyarrow type name; the order is the file's
COLUMNS = {"method": "string", "step": "int64", "story_id": "string", "group": "int64", "sample": "int64",
           "completion": "string", "title": "string", "reward": "float64", "rm": "float64", "supported": "bool_",
           "title_words": "int64", "copy_frac": "float64", "trailing": "bool_", "advantage": "float64",
           "completion_tokens": "int64"}


def step_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / COMPLETIONS_DIR / f"step-{int(step):05d}.parquet"


def records(*, method: str, step: int, story_ids: Sequence[str], completions: Sequence[str], scored: Sequence,
            advantages: Sequence[float], tokens: Sequence[float], group_size: int) -> list[dict]:
    """One record per completion, in generation order (group = index // group_size)."""
    n = len(scored)
    if not (len(story_ids) == len(completions) == len(advantages) == len(tokens) == n):
        raise ValueError(f"step {step}: {n} scored completions but {len(story_ids)} story ids, {len(completions)} "
                         f"texts, {len(advantages)} advantages, {len(tokens)} token counts")
    return [{"method": method, "step": int(step), "story_id": str(story_ids[i]), "group": i // group_size,
             "sample": i % group_size, "completion": completions[i], "title": s.title, "reward": float(s.reward),
             "rm": float(s.rm), "supported": bool(s.matches), "title_words": int(s.length),
             "copy_frac": float(s.copy), "trailing": bool(s.trailing), "advantage": float(advantages[i]),
             "completion_tokens": -1 if math.isnan(float(tokens[i])) else int(tokens[i])}
            for i, s in enumerate(scored)]


def write_step(run_dir: Path, step: int, rows: list[dict]) -> Path:
    """The step's table, whole (an earlier file of the same step, from an interrupted run, is replaced)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS.items()])
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=schema)
    path = step_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_step(run_dir: Path, step: int) -> list[dict]:
    """The step's rows; FileNotFoundError names the steps the run has when this one is missing."""
    import pyarrow.parquet as pq

    path = step_path(run_dir, step)
    if not path.exists():
        have = steps(run_dir)
        raise FileNotFoundError(f"{path} does not exist; {Path(run_dir).name} has rollout tables for "
                                f"{'steps ' + ', '.join(map(str, have)) if have else 'no step'}")
    return pq.read_table(path).to_pylist()


def steps(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / COMPLETIONS_DIR
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.parquet")) if folder.exists() else []


def art_advantages(rewards: Sequence[float], scale: bool) -> list[float]:
    """ART 0.5.18's group advantage: reward - group mean, over (population std + 1e-6) when `scale`."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / (std + 1e-6) if scale else r - mean for r in rewards]
