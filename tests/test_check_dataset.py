"""check_dataset.py: the report on the shipped stories, and one-line errors on bad input."""

import json
import os
import subprocess
import sys

import pytest

import check_dataset
import utils
from hntitles.runs import settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No override variables from the caller's shell, and no repo .env, leak into a test."""
    for name in [*settings.ENV_OVERRIDES, "RECIPE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(settings, "load_env", lambda *a, **k: None)


@pytest.fixture
def tiny_recipe(root):
    return str(root / "recipes" / "tiny.yaml")


def expected_counts(stories_path, split):
    """Rows and drops per reason from the file itself (see test_data._expected_drops for the bounds)."""
    rows = [json.loads(line) for line in stories_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == split]
    low = [r for r in rows if r["score"] < 20]
    rest = [r for r in rows if r["score"] >= 20]
    empty = [r for r in rest if not (r["scraped_body"] or "").strip()]
    long = [r for r in rest if len((r["scraped_body"] or "").split()) > settings.MAX_PROMPT_TOKENS]
    blank = {name: sum(r[name] is None or (isinstance(r[name], str) and not r[name].strip()) for r in rows)
             for name in utils.STORY_FIELDS}
    return len(rows), len(low), len(empty), len(long), blank


@pytest.mark.slow  # the tiny model's tokenizer
def test_report_on_shipped_stories(tiny_recipe, stories_path, tmp_path, capsys):
    out_json = tmp_path / "report.json"
    assert check_dataset.cli(["--recipe", tiny_recipe, "--max_train_stories", "0", "--max_val_stories", "3",
                              "--json_out", str(out_json)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    for split, cap in (("train", 0), ("val", 3)):
        n, low, empty, long, blank = expected_counts(stories_path, split)
        kept = n - low - empty - long
        assert f"[{split}] {n} rows" in out
        assert (f"score < 20: {low}, empty body: {empty}, empty title: 0, "
                f"prompt > {settings.MAX_PROMPT_TOKENS} tokens: {long} "
                f"({low + empty + long} in total)") in out
        info = report["splits"][split]
        assert (info["rows"], info["kept"]) == (n, kept)
        assert info["used"] == (min(cap, kept) if cap else kept)
        assert info["prompt_tokens_kept"]["max"] <= settings.MAX_PROMPT_TOKENS
        assert info["empty_fields"] == blank
        assert "empty fields: " + (", ".join(f"{k} {v}" for k, v in blank.items() if v) or "none") in out
    # the over-long story was measured, so the distribution shows it
    assert report["splits"]["train"]["prompt_tokens_measured"]["max"] > settings.MAX_PROMPT_TOKENS
    assert "max_train_stories=0 (all)" in out
    assert "max_val_stories=3 -> trainer gets the first 3 of" in out
    assert report["shared_ids"] == []
    # two sample prompts, rendered with the chat template, bodies cut for display
    assert out.count("--- sample: id") == 2
    assert out.count("<|im_start|>assistant") == 2
    assert "more characters]" in out


def write_rows(path, n=4, split_column=True):
    rows = [{"id": i, "title": f"Title {i}", "by": "u", "time": "2024-01-01T00:00:00Z", "url": "", "score": 30 + i,
             "scraped_body": f"Body {i} " * 30, **({"split": "train" if i else "val"} if split_column else {})}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.slow  # the tiny model's tokenizer
def test_missing_split_column_warns_about_shared_rows(tiny_recipe, tmp_path, capsys):
    write_rows(tmp_path / "s.jsonl", split_column=False)
    assert check_dataset.cli(["--recipe", tiny_recipe, "--dataset", str(tmp_path / "s.jsonl")]) == 0
    assert "WARNING: 4 ids are in both train and val" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    # the hub id goes to datasets.load_dataset; offline, the error says the Hub cannot be reached
    (["--dataset", settings.HUB_DATASET], "cannot reach the Hugging Face Hub"),
    # a model folder that does not exist
    (["--model", "/nonexistent/model"], "cannot load the tokenizer of /nonexistent/model: no such folder"),
    # a hub model id, offline
    (["--model", "someorg/somemodel"], "the Hub is unreachable"),
    # a folder without tokenizer files (the library raises a multi-line ValueError)
    (["--model", "__empty_dir__"], "cannot load the tokenizer of"),
    # a dataset file that is not there
    (["--dataset", "/nonexistent/stories.jsonl"], "/nonexistent/stories.jsonl: file not found"),
    # a recipe that is not there
    (["--recipe", "/nonexistent/recipe.yaml"], "recipe not found"),
])
def test_load_failures_are_one_line(tiny_recipe, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [str(tmp_path) if a == "__empty_dir__" else a for a in argv]
    assert check_dataset.cli(["--recipe", tiny_recipe, *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("check_dataset: error: ") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_dataset.cli(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--dataset" in out and "--samples" in out and "--recipe" in out


@pytest.mark.integration
def test_malformed_file_script_exits_nonzero_without_traceback(root, tiny_recipe, tmp_path):
    lines = (tmp_path / "s.jsonl")
    write_rows(lines, n=5)
    text = lines.read_text().splitlines()
    row = json.loads(text[2])
    del row["scraped_body"]
    text[2] = json.dumps(row)
    lines.write_text("\n".join(text) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(root / "check_dataset.py"), "--recipe", tiny_recipe,
                           "--dataset", str(lines)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"{lines}: line 3" in proc.stderr and "'scraped_body'" in proc.stderr
