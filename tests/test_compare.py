"""compare.py on fixture runs of both trainers, a baseline and a run that is still writing.

Expected numbers are computed here from the raw JSONL, not through compare.py's helpers.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import compare
import utils
from hntitles.runs import settings

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
RUNS = ["trl-tiny", "art-tiny", "base-tiny", "partial-tiny"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def raw_rows(run: str) -> list[dict]:
    rows = []
    for line in (FIXTURES / run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def table_cells(markdown: str) -> dict[str, dict[str, str]]:
    """The first markdown table (the run table) as {run: {column: cell}}."""
    lines = markdown.split("| Run |", 1)[1].split("\n\n", 1)[0].splitlines()
    lines[0] = "| Run |" + lines[0]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(head, cells, strict=True))
            for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return compare.main(compare.CompareArgs(out_dir=str(out), n_boot=500), [str(FIXTURES / r) for r in RUNS])


@pytest.mark.parametrize("run", ["trl-tiny", "art-tiny", "base-tiny"])
def test_table_numbers(result, run):
    cells = table_cells(result["markdown"])[run]
    rows = raw_rows(run)
    val = sorted((r for r in rows if r["split"] == "val"), key=lambda r: r["step"])
    best, final = max(val, key=lambda r: r["reward_mean"]), val[-1]
    assert cells["Method"] == rows[0]["method"]
    assert cells["Model"] == "smollm2-135m-instruct"
    assert cells["Recipe"] == "tiny"
    assert cells["Steps"] == str(max(r["step"] for r in rows))
    for column, row in (("Best val reward", best), ("Final val reward", final)):
        mean, lo, hi, step = _parse_reward(cells[column])
        assert mean == pytest.approx(row["reward_mean"], abs=5e-4)
        assert step == row["step"]
        story = row["extra"]["story_reward"]
        # A 95% bootstrap interval of the mean lies inside the data and around the mean.
        assert min(story) - 1e-3 <= lo <= sum(story) / len(story) <= hi <= max(story) + 1e-3
    assert cells["Match rate"] == f"{final['match_rate']:.0%}"
    assert cells["Title words"] == f"{final['title_len_mean']:.1f}"
    trained = [r for r in rows if r["split"] == "train"]
    if trained:
        last = max(rows, key=lambda r: r["wall_time"])
        assert float(cells["Steps/h"]) == pytest.approx(last["step"] / last["wall_time"] * 3600, abs=0.05)
    else:
        assert cells["Steps/h"] == "n/a"  # a baseline did not train
    timed = [r for r in trained if "step_seconds" in r["extra"]]
    tokens = sum(r["extra"]["completion_tokens_mean"] * r["n"] for r in timed)
    assert cells["Tokens/s"] == (f"{tokens / sum(r['extra']['step_seconds'] for r in timed):.1f}" if timed else "n/a")


def _parse_reward(cell: str) -> tuple[float, float, float, int]:
    # "0.724 [0.648, 0.844] @6"
    mean, rest = cell.split(" [", 1)
    interval, step = rest.split("] @")
    lo, hi = (float(x) for x in interval.split(", "))
    return float(mean), lo, hi, int(step)


def test_best_is_not_final_when_the_run_got_worse(result):
    cells = table_cells(result["markdown"])["art-tiny"]
    assert cells["Best val reward"].endswith("@3") and cells["Final val reward"].endswith("@6")


def test_partial_run_gets_notes_not_numbers(result):
    cells = table_cells(result["markdown"])["partial-tiny"]
    assert cells["Best val reward"] == cells["Final val reward"] == cells["Match rate"] == "n/a"
    assert cells["Steps"] == "2"  # the truncated third line is not counted
    notes = result["markdown"].split("## Notes", 1)[1]
    assert "partial-tiny/metrics.jsonl: line 3 is incomplete or not JSON; skipped" in notes
    assert "partial-tiny: no validation yet (2 train rows up to step 2)" in notes


def test_example_titles_side_by_side(result):
    section = result["markdown"].split("## Greedy titles", 1)[1].split("\n\n")[1]
    lines = section.splitlines()
    assert lines[0] == "| Original | trl-tiny | base-tiny |"  # run order; art-tiny and partial-tiny saved no titles
    records = {run: [json.loads(ln) for ln in (FIXTURES / run / "eval" / name).read_text().splitlines()]
               for run, name in (("base-tiny", "before.jsonl"), ("trl-tiny", "step-00006.jsonl"))}
    assert len(lines) == 2 + 4  # --examples default
    for line, base, trl in zip(lines[2:], records["base-tiny"], records["trl-tiny"]):
        assert line == (f"| {base['original']} | {trl['greedy']['title']} ({trl['greedy']['reward']:.2f}) | "
                        f"{base['greedy']['title']} ({base['greedy']['reward']:.2f}) |")


def test_recipe_difference_is_reported(result):
    assert "`learning_rate`: trl-tiny=0.0002, art-tiny=1e-05" in result["markdown"]


def test_pngs_are_real_images(result):
    names = {p.name for p in result["pngs"]}
    assert {"compare.png", "val_reward_step.png", "val_reward_time.png", "match_rate_step.png",
            "title_len_step.png"} <= names
    for path in result["pngs"]:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, path
    assert (result["out_dir"] / "compare.md").read_text() == result["markdown"]
    assert "![comparison](compare.png)" in result["markdown"]


def test_compare_png_only(tmp_path):
    res = compare.main(compare.CompareArgs(out_dir=str(tmp_path), panels=False, n_boot=100),
                       [str(FIXTURES / "trl-tiny")])
    assert [p.name for p in res["pngs"]] == ["compare.png"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "compare.md", "compare.png"]


def _write(path: Path, rows: list[dict], tail: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _row(split: str, step: int, **over) -> dict:
    scored = [utils.Scored("A title", 1.0, True, False, 1.0)]
    return {**utils.metrics_row(method="trl", step=step, split=split, scored=scored, wall_time=10.0 * step), **over}


@pytest.mark.parametrize("make, note", [
    # metrics.jsonl exists but nothing was written yet
    (lambda d: _write(d, []), "metrics.jsonl is empty (run just started?)"),
    # the trainer saved its config but no metrics yet
    (lambda d: (d.mkdir(parents=True), (d / "config.json").write_text("{}")), "metrics.jsonl: no metrics yet"),
    # a path that is not a run
    (lambda d: None, "no such run directory"),
    # only train rows so far
    (lambda d: _write(d, [_row("train", 1), _row("train", 2)]), "no validation yet (2 train rows up to step 2)"),
    # a validation that scored nothing (NaN stats)
    (lambda d: _write(d, [_row("val", 0, n=0, reward_mean=float("nan"))]), "val row at step 0 scored no titles"),
    # a row from another schema
    (lambda d: _write(d, [{"step": 1}]), "line 1 lacks"),
    # a resumed run that logged step 2 again
    (lambda d: _write(d, [_row("train", 1), _row("train", 2), _row("train", 2)]),
     "train step 2 logged 2 times (a resumed run?); the last row is used"),
    # the trainer's final validation, then the demo's evaluation of the same checkpoint
    (lambda d: _write(d, [_row("train", 2), _row("val", 2), _row("val", 2, extra={"label": "demo-after"})]),
     "val step 2 validated 2 times (labels: -, demo-after;"),
    # a row whose step is not an integer
    (lambda d: _write(d, [_row("train", 1), {**_row("train", 1), "step": "2"}]), "1 row(s) with a non-integer step"),
    # a config.json cut mid-write
    (lambda d: (_write(d, [_row("val", 0)]), (d / "config.json").write_text('{"recipe": {')),
     "config.json: unreadable"),
], ids=["empty-metrics", "config-only", "missing-dir", "train-only", "nan-val", "foreign-row", "resumed", "revalidated",
        "bad-step", "cut-config"])
def test_runs_in_progress_give_notes(tmp_path, make, note):
    run = tmp_path / "runs" / "r1"
    make(run)
    res = compare.main(compare.CompareArgs(out_dir=str(tmp_path / "out"), plots=False),
                       [str(run), str(FIXTURES / "base-tiny")])
    assert note in res["markdown"]
    assert "base-tiny" in table_cells(res["markdown"])


def test_default_finds_every_run_and_skips_its_own_output(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURES, runs, ignore=shutil.ignore_patterns("*.py"))
    args = compare.CompareArgs(runs_dir=str(runs), plots=False)
    compare.main(args)
    res = compare.main(args)  # a second time: runs/compare now exists and is not a run
    assert sorted(table_cells(res["markdown"])) == sorted(RUNS)
    assert (runs / "compare" / "compare.md").exists()



# Each place RUNS_DIR can come from holds a different fixture run, so the table says which was read.
SOURCE_RUN = {"shell": "trl-tiny", "dotenv": "art-tiny", "flag": "base-tiny"}


@pytest.mark.parametrize("sources, expected", [
    # RUNS_DIR set only in .env, which parse() loads after `import compare`
    (["dotenv"], "dotenv"),
    # set in the process environment after import
    (["shell"], "shell"),
    # the process environment wins over .env (load_env never overrides)
    (["shell", "dotenv"], "shell"),
    # --runs_dir wins over both
    (["shell", "dotenv", "flag"], "flag"),
])
def test_runs_dir_is_read_after_dotenv_is_loaded(tmp_path, monkeypatch, sources, expected):
    dirs = {name: tmp_path / name for name in SOURCE_RUN}
    for name, run in SOURCE_RUN.items():
        shutil.copytree(FIXTURES / run, dirs[name] / run)
    monkeypatch.setenv("RUNS_DIR", "placeholder")  # registered, so monkeypatch also removes what load_env sets
    monkeypatch.delenv("RUNS_DIR")
    if "shell" in sources:
        monkeypatch.setenv("RUNS_DIR", str(dirs["shell"]))
    env_file = tmp_path / ".env"
    env_file.write_text(f"RUNS_DIR={dirs['dotenv']}\n" if "dotenv" in sources else "")
    real_load_env = settings.load_env
    monkeypatch.setattr(settings, "load_env", lambda path=None: real_load_env(path or env_file))  # not the repo's .env
    args, paths = compare.parse(["--no_plots", *(["--runs_dir", str(dirs["flag"])] if "flag" in sources else [])])
    res = compare.main(args, paths)
    assert list(table_cells(res["markdown"])) == [SOURCE_RUN[expected]]
    assert res["out_dir"] == dirs[expected] / "compare"

def test_relative_runs_dir_is_the_repos_from_anywhere(tmp_path, monkeypatch):
    # as the trainers resolve it: a relative runs_dir that does not exist here is under the repo
    monkeypatch.chdir(tmp_path)
    rel = FIXTURES.relative_to(settings.ROOT)
    res = compare.main(compare.CompareArgs(runs_dir=str(rel), out_dir=str(tmp_path / "out"), plots=False))
    assert sorted(table_cells(res["markdown"])) == sorted(RUNS)


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no runs found under"):
        compare.main(compare.CompareArgs(runs_dir=str(tmp_path / "nothing")))


@pytest.mark.parametrize("rows, expected", [
    # two methods in one folder
    ([_row("val", 0, method="base"), _row("val", 0, method="eval")], ["eval-cpu (base)", "eval-cpu (eval)"]),
    # evaluate.py --label before, then --label after (same method, both at step 0)
    ([_row("val", 0, method="eval", extra={"label": "before"}),
      _row("val", 0, method="eval", extra={"label": "after"})],
     ["eval-cpu (eval: after)", "eval-cpu (eval: before)"]),
    # one label: a single series
    ([_row("val", 0, method="eval", extra={"label": "x"})], ["eval-cpu"]),
])
def test_one_folder_with_several_series(tmp_path, rows, expected):
    run = tmp_path / "eval-cpu"
    _write(run, rows)
    res = compare.main(compare.CompareArgs(out_dir=str(tmp_path / "out"), plots=False), [str(run)])
    assert sorted(table_cells(res["markdown"])) == expected
    assert "the last row is used" not in res["markdown"]


@pytest.mark.integration
def test_cli_positional_runs(tmp_path):
    out = subprocess.run([sys.executable, "compare.py", str(FIXTURES / "trl-tiny"), str(FIXTURES / "base-tiny"),
                          "--out_dir", str(tmp_path), "--no_plots"],
                         cwd=Path(compare.__file__).parent, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert sorted(table_cells(out.stdout)) == ["base-tiny", "trl-tiny"]
    assert not math.isnan(float(table_cells(out.stdout)["trl-tiny"]["Tokens/s"]))
