"""The shipped recipes: the long-horizon CPU recipe is the CPU recipe with more steps, nothing else."""
from pathlib import Path

import yaml

from hntitles.analysis import experiment

ROOT = Path(__file__).resolve().parents[1]


def test_long_recipe_is_the_cpu_recipe_with_more_steps():
    short, long = (yaml.safe_load((ROOT / "recipes" / name).read_text()) for name in ("cpu.yaml", "cpu-long.yaml"))
    steps = {name: (r["shared"].pop("max_steps"), r["shared"].pop("eval_every"))
             for name, r in (("short", short), ("long", long))}
    assert steps == {"short": (20, 20), "long": (60, 60)}  # both validate once, at their last step
    assert long == short


def test_long_recipe_runs_do_not_collide_with_the_cpu_recipe_runs():
    names = experiment.run_names("recipes/cpu-long.yaml", "aligned", 43)
    assert set(names.values()).isdisjoint(experiment.run_names("recipes/cpu.yaml", "aligned", 43).values())
    assert names["trl"] == "trl-cpu-long-aligned-s43" and names["base"] == "base-cpu-long"
