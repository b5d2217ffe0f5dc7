"""Pure functions of utils.py, and parse_args (recipe -> env -> CLI). No model, no server."""

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import textwrap
from collections import OrderedDict

import pytest

import utils
from hntitles.analysis import stats
from hntitles.reward import embeddings, scorers, text_metrics
from hntitles.runs import rundir, settings

# --------------------------------------------------------------------------------------
# Prompts and titles
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, title, trailing", [
    # plain one-line title
    ("Rust 1.80 ships LazyCell", "Rust 1.80 ships LazyCell", False),
    # double quotes around the whole title are not part of it; the explanation after it is trailing text
    ('"Rust 1.80 ships LazyCell"\n\nThis title highlights...', "Rust 1.80 ships LazyCell", True),
    # curly quotes
    ("“A faster grep”", "A faster grep", False),
    # single quotes around a title that contains an apostrophe
    ("'It's here: Postgres 17'", "It's here: Postgres 17", False),
    # quotes inside the title that end it are kept
    ('Why I stopped saying "agile"', 'Why I stopped saying "agile"', False),
    # two quoted words at both ends: not a wrapper, kept as written
    ('"Rust" beats "Go"', '"Rust" beats "Go"', False),
    # an opening quote whose partner was cut off by the token cap
    ('"Unclosed title about compilers', "Unclosed title about compilers", False),
    # "Title:" prefix, any case
    ("Title: A faster grep\n", "A faster grep", False),
    ("TITLE:A faster grep", "A faster grep", False),
    # "HN title:" prefix
    ("HN Title: A faster grep", "A faster grep", False),
    # markdown heading
    ("## A faster grep", "A faster grep", False),
    # markdown bold, with and without a prefix inside
    ("**A faster grep**", "A faster grep", False),
    ("**Title:** A faster grep", "A faster grep", False),
    # inline code marks
    ("`A faster grep`", "A faster grep", False),
    # blank leading lines are skipped; the first non-empty line is the title
    ("\n\n   \nA faster grep\n", "A faster grep", False),
    # trailing whitespace-only lines are not trailing text
    ("A faster grep\n   \n\n", "A faster grep", False),
    # a second non-empty line is trailing text
    ("A faster grep\nIt is faster because...", "A faster grep", True),
    # empty and whitespace-only completions give an empty title
    ("", "", False),
    ("  \n \n", "", False),
    # nothing but quotes
    ('""', "", False),
    # nothing visible: control characters (NUL, escape) or zero-width spaces are no title
    ("\x00\x00", "", False),
    ("\x1b\x00\n", "", False),
    ("\u200b \u200b", "", False),
    # non-ASCII passes through
    ("Zürich trams, 東京 rail", "Zürich trams, 東京 rail", False),
])
def test_extract_title(completion, title, trailing):
    assert utils.extract_title(completion) == (title, trailing)


@pytest.mark.parametrize("text, expected", [
    # lower-cased, punctuation dropped
    ("Hello, World!", ["hello", "world"]),
    # version numbers, C++ and C# stay whole; a sentence-final dot is stripped
    ("Rust 1.80 beats C++ and C#.", ["rust", "1.80", "beats", "c++", "and", "c#"]),
    # apostrophes inside words stay, quotes around words go
    ("Don't 'panic'", ["don't", "panic"]),
    # hyphenated words stay whole; a lone dash is not a word
    ("open-source - fast", ["open-source", "fast"]),
    # non-ASCII letters are word characters
    ("Zürich café", ["zürich", "café"]),
    # nothing
    ("", []),
    ("... --", []),
])
def test_words(text, expected):
    assert text_metrics.words(text) == expected


@pytest.mark.parametrize("title, body, expected", [
    # 3 of 4 title words form a verbatim run in the body
    ("a b c d", "x a b c y", 0.75),
    # no shared words
    ("new words", "old text", 0.0),
    # the whole title is a body span (case and punctuation ignored)
    ("The Quick Fox", "the quick, fox jumped", 1.0),
    # shared words that are not consecutive in the body count as runs of 1
    ("a b c", "c x b x a", 1 / 3),
    # longest of two runs wins
    ("a b c d e", "a b x c d e", 3 / 5),
    # empty title or body
    ("", "some body", 0.0),
    ("title", "", 0.0),
])
def test_copy_fraction(title, body, expected):
    assert text_metrics.copy_fraction(title, body) == pytest.approx(expected)


@pytest.mark.parametrize("reply, expected", [
    # plain answers, any case, with punctuation
    ("True", True),
    (" false.", False),
    ("TRUE", True),
    # the first answer counts
    ("True. Though one could argue false", True),
    # embedded in a sentence
    ("The answer is: False", False),
    # neither -> None (counted, treated as not supported)
    ("maybe", None),
    ("", None),
    # substrings of other words are not answers
    ("untrue", None),
    ("falsehood", None),
])
def test_parse_validator_answer(reply, expected):
    assert utils.parse_validator_answer(reply) is expected


@pytest.mark.parametrize("rm, matches, trailing, penalty, expected", [
    # supported title: RM score
    (2.5, True, False, 0.0, 2.5),
    # unsupported title: 0 whatever the RM said
    (2.5, False, False, 0.0, 0.0),
    # negative RM scores pass through when supported
    (-1.0, True, False, 0.0, -1.0),
    # trailing text with a penalty
    (1.0, True, True, 0.25, 0.75),
    # penalty only applies when there is trailing text
    (1.0, True, False, 0.25, 1.0),
    # unsupported and trailing: the penalty still applies (rambling is never free)
    (1.0, False, True, 0.25, -0.25),
])
def test_combine_reward(rm, matches, trailing, penalty, expected):
    assert utils.combine_reward(rm, matches, trailing, penalty) == pytest.approx(expected)


def test_title_and_validator_messages():
    msgs = utils.title_messages("Body text")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1]["content"].startswith("Body text\n\n") and msgs[1]["content"].endswith(utils.TITLE_INSTRUCTION)
    assert "title" in msgs[0]["content"].lower()
    vmsgs = utils.validator_messages("The body", "The title")
    assert "The body" in vmsgs[1]["content"] and "The title" in vmsgs[1]["content"]
    assert "True or False" in vmsgs[1]["content"]


# --------------------------------------------------------------------------------------
# Reward request shapes
# --------------------------------------------------------------------------------------


def test_serialize_story_tags_order_and_date():
    text = scorers.serialize_story("My title", "alice", "2024-03-05T10:11:12Z", "https://x.org/a", "Body here")
    for tag, value in [("title", "My title"), ("submitter", "alice"), ("url", "https://x.org/a"),
                       ("date", "2024-03-05"), ("body", "Body here")]:
        assert f"<{tag}>{value}</{tag}>" in text
    # the title comes before the body, so truncating a long body never cuts the title
    assert text.index("<title>") < text.index("<body>")
    # only the date part of the timestamp
    assert "10:11:12" not in text


@pytest.mark.parametrize("url, time_value, expected_date", [
    # None url becomes empty, datetime object becomes its date
    (None, dt.datetime(2024, 1, 2, 3, 4, 5), "2024-01-02"),
    # ISO string with an offset
    ("", "2023-12-31T23:00:00+00:00", "2023-12-31"),
])
def test_serialize_story_edge_values(url, time_value, expected_date):
    text = scorers.serialize_story("t", "b", time_value, url, "body")
    assert "<url></url>" in text
    assert f"<date>{expected_date}</date>" in text


def test_story_for_scoring_shape_and_iso_time():
    row = {"id": 1, "title": "Original", "by": "bob", "time": dt.datetime(2024, 5, 6, 7, 8, 9),
           "url": None, "score": 50, "scraped_body": "Body"}
    story = utils.story_for_scoring("Candidate", row)
    # OpenPipe's /score request shape, exactly these keys
    assert set(story) == {"title", "by", "time", "scraped_body", "url"}
    assert story["title"] == "Candidate"  # the candidate, not the original title
    assert story["time"] == "2024-05-06T07:08:09Z"  # naive datetimes are UTC
    assert story["url"] == ""
    json.dumps(story)  # JSON-serialisable
    # an aware datetime keeps its offset; a string passes through
    aware = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert utils.story_for_scoring("t", {**row, "time": aware})["time"] == "2024-05-06T07:08:09+02:00"
    assert utils.story_for_scoring("t", {**row, "time": "2024-05-06T07:08:09Z"})["time"] == "2024-05-06T07:08:09Z"


# --------------------------------------------------------------------------------------
# Row checks
# --------------------------------------------------------------------------------------

GOOD_ROW = {"id": 7, "title": "A title", "by": "alice", "time": "2024-01-02T03:04:05Z", "url": "https://x.org",
            "score": 42, "scraped_body": "Body"}


def test_check_row_accepts_and_normalises():
    assert utils.check_row(dict(GOOD_ROW), "f.jsonl: line 1") == GOOD_ROW
    row = utils.check_row({**GOOD_ROW, "url": None, "scraped_body": None, "time": dt.datetime(2024, 1, 2)}, "w")
    assert row["url"] == "" and row["scraped_body"] == ""
    assert row["time"] == "2024-01-02T00:00:00Z"
    # float scores are numbers too (some dumps store them so)
    assert utils.check_row({**GOOD_ROW, "score": 42.0}, "w")["score"] == 42.0


@pytest.mark.parametrize("change, field_name", [
    # each required field missing
    *[({"__drop__": name}, name) for name in utils.STORY_FIELDS],
    # title must be a string
    ({"title": 5}, "title"),
    # None title is not allowed (only body and url may be null)
    ({"title": None}, "title"),
    # by must be a string
    ({"by": ["alice"]}, "by"),
    # body must be a string or null
    ({"scraped_body": 3.5}, "scraped_body"),
    # url must be a string or null
    ({"url": 1}, "url"),
    # score must be a number; a numeric string or a bool is not
    ({"score": "42"}, "score"),
    ({"score": True}, "score"),
    ({"score": None}, "score"),
    # time must parse as ISO 8601
    ({"time": "yesterday"}, "time"),
    ({"time": None}, "time"),
    ({"time": "2024-13-45T00:00:00Z"}, "time"),
])
def test_check_row_errors_name_field_and_row(change, field_name):
    row = dict(GOOD_ROW)
    if "__drop__" in change:
        del row[change["__drop__"]]
    else:
        row.update(change)
    with pytest.raises(utils.DatasetError) as err:
        utils.check_row(row, "stories.jsonl: line 3 (id 7)")
    assert "stories.jsonl: line 3" in str(err.value)
    assert f"'{field_name}'" in str(err.value)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def test_stats_values():
    s = stats.describe([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(3.0)
    assert s["median"] == pytest.approx(3.0)
    assert s["std"] == pytest.approx(math.sqrt(2.0))  # population std
    assert s["p5"] == pytest.approx(1.2) and s["p95"] == pytest.approx(4.8)  # linear interpolation
    # a generator works
    assert stats.describe(x for x in [2.0])["mean"] == 2.0


def test_stats_empty_is_nan_not_zero():
    s = stats.describe([])
    assert s["n"] == 0
    assert all(math.isnan(s[k]) for k in ("mean", "std", "p5", "median", "p95"))


def test_bootstrap_mean_diff_contains_mean_and_is_deterministic():
    before = [0.1, 0.4, 0.2, 0.5, 0.3, 0.2, 0.6, 0.1]
    after = [0.3, 0.5, 0.2, 0.9, 0.4, 0.5, 0.6, 0.4]
    mean, lo, hi = stats.paired_bootstrap(after, before, n_boot=2000, seed=3)
    assert mean == pytest.approx(sum(a - b for a, b in zip(after, before)) / len(after))
    assert lo <= mean <= hi
    assert lo > 0  # every story improved or tied: the interval excludes 0
    assert stats.paired_bootstrap(after, before, n_boot=2000, seed=3) == (mean, lo, hi)
    assert stats.paired_bootstrap(after, before, n_boot=2000, seed=4) != (mean, lo, hi)


def test_bootstrap_no_difference_straddles_zero():
    a = [0.2, 0.8, 0.5, 0.1, 0.9, 0.4]
    b = [0.8, 0.2, 0.5, 0.9, 0.1, 0.4]  # same values, shuffled: mean diff 0
    mean, lo, hi = stats.paired_bootstrap(a, b, n_boot=2000)
    assert mean == pytest.approx(0.0)
    assert lo < 0 < hi


def _scored(reward, title="a b c", rm=1.0, matches=True, trailing=False, copy=0.0):
    return utils.Scored(title=title, rm=rm, matches=matches, trailing=trailing, reward=reward, copy=copy)


def test_metrics_row_keys_and_values():
    scored = [_scored(1.0, title="one two three", rm=1.0, copy=1.0),
              _scored(0.0, title="one", rm=3.0, matches=False, trailing=True)]
    row = utils.metrics_row(method="trl", step=5, split="train", scored=scored, wall_time=12.3456, run="r",
                            extra={"lr": 1e-4})
    assert tuple(row) == utils.METRICS_KEYS
    assert row["schema"] == utils.METRICS_SCHEMA_VERSION
    assert (row["method"], row["step"], row["split"], row["run"]) == ("trl", 5, "train", "r")
    assert row["n"] == 2
    assert row["reward_mean"] == pytest.approx(0.5)
    assert row["rm_mean"] == pytest.approx(2.0)
    assert row["match_rate"] == pytest.approx(0.5)
    assert row["trailing_rate"] == pytest.approx(0.5)
    assert row["title_len_mean"] == pytest.approx(2.0)
    assert row["copy_frac_mean"] == pytest.approx(0.5)
    assert row["wall_time"] == pytest.approx(12.346)
    assert row["extra"] == {"lr": 1e-4}
    dt.datetime.fromisoformat(row["time"])
    json.dumps(row)


def test_metrics_writer_reader_round_trip(tmp_path):
    writer = rundir.MetricsWriter(tmp_path / "run")
    rows = [utils.metrics_row(method="art", step=i, split="train", scored=[_scored(float(i))], wall_time=i)
            for i in range(3)]
    for row in rows:
        writer.write(row)
    read, notes = rundir.read_metrics(tmp_path / "run")  # a run dir works as well as the file
    assert notes == []
    assert [r["step"] for r in read] == [0, 1, 2]
    assert read[2]["reward_mean"] == 2.0 and read[2]["extra"] == {}
    assert rundir.read_metrics(writer.path)[0] == read


def test_metrics_writer_refuses_incomplete_row(tmp_path):
    row = utils.metrics_row(method="x", step=0, split="train", scored=[], wall_time=0)
    del row["reward_mean"]
    with pytest.raises(ValueError, match="reward_mean"):
        rundir.MetricsWriter(tmp_path).write(row)
    assert not (tmp_path / rundir.METRICS_FILE).exists()


def test_read_metrics_partial_line_and_missing_keys_are_notes(tmp_path):
    good = utils.metrics_row(method="trl", step=1, split="val", scored=[_scored(1.0)], wall_time=1)
    lacking = {k: v for k, v in good.items() if k != "match_rate"}
    path = tmp_path / rundir.METRICS_FILE
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(lacking) + "\n" + json.dumps(good)[:25])
    rows, notes = rundir.read_metrics(path)
    assert len(rows) == 1 and rows[0]["step"] == 1
    assert len(notes) == 2
    assert "line 3" in notes[0] and "match_rate" in notes[0]  # blank line 2 is skipped silently
    assert "line 4" in notes[1] and "incomplete" in notes[1]


@pytest.mark.parametrize("line", [
    # a partial line that happens to parse as a number
    "3",
    # a string
    '"x"',
    # null
    "null",
    # a list
    "[1, 2]",
])
def test_read_metrics_non_object_line_is_a_note(tmp_path, line):
    good = utils.metrics_row(method="trl", step=1, split="val", scored=[_scored(1.0)], wall_time=1)
    (tmp_path / rundir.METRICS_FILE).write_text(json.dumps(good) + "\n" + line + "\n")
    rows, notes = rundir.read_metrics(tmp_path)
    assert len(rows) == 1 and len(notes) == 1 and "line 2" in notes[0]


def test_read_metrics_missing_file_is_a_note(tmp_path):
    rows, notes = rundir.read_metrics(tmp_path)
    assert rows == [] and "no metrics yet" in notes[0]


def test_timer_offset(monkeypatch):
    clock = iter([100.0, 103.5])
    monkeypatch.setattr(rundir.time, "perf_counter", lambda: next(clock))
    timer = rundir.Timer(offset=50.0)  # a resumed run continues from its last wall_time
    assert timer() == pytest.approx(53.5)



class LengthEmbedder(embeddings.Embedder):
    """Embedder.encode_cached's bookkeeping without the model: a text's vector is [len(text)]."""

    def __init__(self, cache_size: int):  # no model: only the cache state encode_cached uses
        self.cache_size, self.cache, self.calls = cache_size, OrderedDict(), []

    def encode(self, texts, batch_size=64):
        import torch

        self.calls.append(list(texts))
        return torch.tensor([[float(len(t))] for t in texts])


def test_encode_cached_dedups_keeps_order_and_drops_least_recent():
    e = LengthEmbedder(cache_size=2)
    key = {t: hashlib.sha1(t.encode()).hexdigest() for t in ["aa", "b", "ccc"]}
    assert e.encode_cached(["aa", "b", "aa"]).flatten().tolist() == [2.0, 1.0, 2.0]
    assert e.calls == [["aa", "b"]]  # a repeated text is embedded once
    assert e.encode_cached(["b"]).flatten().tolist() == [1.0] and len(e.calls) == 1  # a hit: no encode
    e.encode_cached(["ccc"])  # third distinct text: "aa" was used least recently ("b" was just read)
    assert list(e.cache) == [key["b"], key["ccc"]]
    e.encode_cached(["aa"])
    assert e.calls[-1] == ["aa"]  # dropped, so embedded again
    # A batch larger than the cache still gets all its rows; only the cache is cut back.
    assert e.encode_cached(["x", "yy", "zzz", "x"]).flatten().tolist() == [1.0, 2.0, 3.0, 1.0]
    assert len(e.cache) == 2

# --------------------------------------------------------------------------------------
# parse_args: dataclass defaults < recipe (shared, then section) < environment < CLI
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class ToolArgs:
    verbose: bool = dataclasses.field(default=False, metadata={"help": "Talk more."})
    label: str = dataclasses.field(default="none", metadata={"help": "A label."})


@pytest.fixture
def clean_env(monkeypatch):
    """No override variables from the caller's shell, and no repo .env, leak into a test."""
    for name in [*settings.ENV_OVERRIDES, "RECIPE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(settings, "load_env", lambda *a, **k: None)


def write_recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_parse_args_merges_shared_and_section(tmp_path, clean_env):
    recipe_path = write_recipe(tmp_path, """
        shared:
          num_generations: 6
          learning_rate: 1.0e-5
        trl:
          num_generations: 8
          label: from-trl
        art:
          num_generations: 2
    """)
    recipe, args = settings.parse_args((settings.Recipe, ToolArgs), "trl", ["--recipe", recipe_path])
    assert recipe.num_generations == 8  # the section beats shared
    assert recipe.learning_rate == 1e-5  # shared applies when the section is silent
    assert args.label == "from-trl"  # recipe keys reach any of the dataclasses
    assert recipe.lora_r == settings.Recipe.lora_r  # untouched fields keep their defaults
    recipe, _ = settings.parse_args((settings.Recipe, ToolArgs), "art", ["--recipe", recipe_path])
    assert recipe.num_generations == 2  # another section, another value


@pytest.mark.parametrize("text, names", [
    # a misspelt shared knob
    ("shared:\n  num_generation: 6\n", ["num_generation", "'shared'"]),
    # a key of another script's section in shared: shared holds only what both trainers read
    ("shared:\n  label: x\n", ["label", "'shared'"]),
    # a misspelt key in the script's own section
    ("trl:\n  verbos: true\n", ["verbos", "'trl'"]),
    # a misspelt section: its keys would otherwise be ignored without a word
    ("shraed:\n  num_generations: 6\n", ["shraed", "unknown section"]),
])
def test_parse_args_unknown_key_or_section_names_it_and_the_file(tmp_path, clean_env, text, names):
    recipe_path = write_recipe(tmp_path, text)
    with pytest.raises(SystemExit) as err:
        settings.parse_args((settings.Recipe, ToolArgs), "trl", ["--recipe", recipe_path])
    assert recipe_path in str(err.value.code) and all(n in str(err.value.code) for n in names), err.value.code


def test_a_misspelt_key_in_another_section_is_left_to_its_script(tmp_path, clean_env):
    # The TRL trainer cannot know the ART trainer's knobs; train.py refuses this one when it reads `art:`.
    recipe_path = write_recipe(tmp_path, "art:\n  pack_group: true\n")
    (recipe, _) = settings.parse_args((settings.Recipe, ToolArgs), "trl", ["--recipe", recipe_path])
    assert recipe.recipe == recipe_path


@pytest.mark.parametrize("env, argv, expected", [
    # recipe only
    ({}, [], "/recipe/model"),
    # the environment beats the recipe
    ({"MODEL": "/env/model"}, [], "/env/model"),
    # a CLI flag beats the environment
    ({"MODEL": "/env/model"}, ["--model", "/cli/model"], "/cli/model"),
    # an empty variable is ignored
    ({"MODEL": ""}, [], "/recipe/model"),
])
def test_parse_args_precedence(tmp_path, clean_env, monkeypatch, env, argv, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    recipe_path = write_recipe(tmp_path, """
        shared:
          model: /recipe/model
    """)
    (recipe,) = settings.parse_args((settings.Recipe,), "trl", ["--recipe", recipe_path, *argv])
    assert recipe.model == expected


def test_parse_args_recipe_from_env_and_cli_types(tmp_path, clean_env, monkeypatch):
    recipe_path = write_recipe(tmp_path, """
        shared:
          max_steps: 7
    """)
    monkeypatch.setenv("RECIPE", recipe_path)
    recipe, args = settings.parse_args((settings.Recipe, ToolArgs), "trl", ["--lora_r", "4", "--verbose", "true"])
    assert recipe.max_steps == 7  # RECIPE names the recipe when --recipe is absent
    assert recipe.lora_r == 4 and isinstance(recipe.lora_r, int)
    assert args.verbose is True


@pytest.mark.parametrize("env_recipe, expected_steps", [
    # RECIPE unset: the script's default recipe
    (None, 7),
    # RECIPE= (empty, as in .env.example): still the default recipe, not "no recipe"
    ("", 7),
    # RECIPE set: that recipe
    ("other", 9),
])
def test_parse_args_default_recipe_and_recipe_env(tmp_path, clean_env, monkeypatch, env_recipe, expected_steps):
    default = write_recipe(tmp_path, "shared:\n  max_steps: 7\n")
    other = tmp_path / "other.yaml"
    other.write_text("shared:\n  max_steps: 9\n")
    if env_recipe is not None:
        monkeypatch.setenv("RECIPE", str(other) if env_recipe else "")
    (recipe,) = settings.parse_args((settings.Recipe,), "trl", [], default_recipe=default)
    assert recipe.max_steps == expected_steps


def test_parse_args_unrecognized_flag_exits(clean_env):
    with pytest.raises(SystemExit):
        settings.parse_args((settings.Recipe,), "trl", ["--no_such_flag", "1"])


def test_parse_args_resolves_repo_paths_from_another_cwd(tmp_path, clean_env, monkeypatch, root):
    monkeypatch.chdir(tmp_path)
    (recipe,) = settings.parse_args((settings.Recipe,), "trl", ["--recipe", str(root / "recipes" / "tiny.yaml")])
    assert recipe.model == str(root / "models" / "tiny")
    assert recipe.dataset == str(root / "data" / "stories.jsonl")
    assert recipe.runs_dir == str(root / "runs")


def test_default_recipe_resolves_against_the_repo_from_another_cwd(tmp_path, clean_env, monkeypatch, root):
    # `cd /tmp && python <repo>/train.py` used to fail: recipe not found: recipes/cpu.yaml
    monkeypatch.chdir(tmp_path)
    (recipe,) = settings.parse_args((settings.Recipe,), "trl", [])
    assert recipe.recipe == str(root / "recipes" / "cpu.yaml") and recipe.max_steps == 20
    (recipe,) = settings.parse_args((settings.Recipe,), "eval", ["--recipe", "recipes/tiny.yaml"])
    assert recipe.recipe == str(root / "recipes" / "tiny.yaml")
    # the run directory is named after the recipe (evaluate.py used to write every recipe to eval-default)
    assert rundir.run_dir_for(dataclasses.replace(recipe, runs_dir=str(tmp_path)), "eval").name == "eval-tiny"


def test_bad_recipe_values_are_refused_once_for_every_script(tmp_path, clean_env):
    for flags, message in ((["--validator", "judge"], "unknown validator"),
                           (["--num_generations", "1"], "num_generations must be >= 2"),
                           (["--optimizer", "adam"], "is not one of")):
        with pytest.raises(SystemExit):
            settings.parse_args((settings.Recipe,), "trl", flags)
        with pytest.raises(ValueError, match=message):
            settings.Recipe(**{flags[0][2:]: int(flags[1]) if flags[1].isdigit() else flags[1]}).check()


def test_a_recipe_built_in_code_meets_the_same_validator_check():
    from hntitles.engines import policy  # no model loads: each case fails or returns before one would be needed

    with pytest.raises(ValueError, match="unknown validator 'judge'"):
        policy.make_validator(settings.Recipe(validator="judge"))
    assert policy.make_validator(settings.Recipe(validator="none")) is None
    with pytest.raises(ValueError, match="needs the policy model"):
        policy.make_validator(settings.Recipe(validator="model"))


def test_parse_args_keeps_hub_ids_and_existing_local_paths(tmp_path, clean_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (recipe,) = settings.parse_args((settings.Recipe,), "trl",
                                    ["--model", "models/mine", "--dataset", settings.HUB_DATASET])
    assert recipe.model == "models/mine"  # exists relative to the cwd: the user's, not the repo's
    assert recipe.dataset == settings.HUB_DATASET  # a hub id is not a path


def test_load_env_fills_unset_variables_only(tmp_path, monkeypatch):
    for name in ("MODEL", "REWARD_URL"):  # register both so monkeypatch restores the caller's state
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.setenv("REWARD_URL", "http://from-shell:1")
    env_file = tmp_path / ".env"
    env_file.write_text("MODEL=/from/dotenv\nREWARD_URL=http://from-dotenv:2\n")
    settings.load_env(env_file)
    import os

    assert os.environ["MODEL"] == "/from/dotenv"
    assert os.environ["REWARD_URL"] == "http://from-shell:1"  # the process environment wins


# --------------------------------------------------------------------------------------
# .env.example documents every variable the code reads
# --------------------------------------------------------------------------------------


def env_vars_read_by(path) -> set[str]:
    """Names in os.environ[...] / .get / getenv / setdefault calls, plus keys of ENV_* dicts."""
    import ast
    import re

    text = path.read_text(encoding="utf-8")
    names = set(re.findall(r"""(?:environ\.get|getenv|environ\.setdefault)\(\s*["']([A-Z][A-Z0-9_]+)["']""", text))
    names |= set(re.findall(r"""environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]""", text))
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                isinstance(t, ast.Name) and t.id.startswith("ENV_") for t in node.targets):
            names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return names


def test_env_example_documents_every_variable(root):
    import re

    documented = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (root / ".env.example").read_text(), re.MULTILINE))
    sources = [*root.glob("*.py"), *(root / "hntitles").rglob("*.py"), *(root / "bench").glob("*.py")]
    read = set().union(*(env_vars_read_by(p) for p in sources))
    assert {"MODEL", "DATASET", "REWARD_URL", "REWARD_API_KEY"} <= read  # the scan finds what we know is there
    # Not settings: RANK is set by torchrun / accelerate for each worker (an empty RANK= in .env
    # would break a single-process run).
    not_settings = {"RANK"}
    assert read - documented - not_settings == set(), "document these in .env.example"


# --------------------------------------------------------------------------------------
# RunLock: one writer per run directory (the cross-process cases are in test_faults.py)
# --------------------------------------------------------------------------------------


def dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])  # not Python: test-fast starts no Python process
    proc.wait()
    return proc.pid  # exited and reaped: no such process (pids are not reused this fast)


def test_run_lock_is_reentrant_and_released(tmp_path):
    with rundir.RunLock(tmp_path, "trl") as lock:
        holder = json.loads((tmp_path / rundir.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["owner"] == "trl" and holder["started"].endswith("Z")
        with rundir.RunLock(tmp_path, "trl") as inner:  # main() called again in one process (tests)
            assert inner is lock
        assert lock.fd is not None  # still held by the outer block
    assert (tmp_path / rundir.LOCK_FILE).read_text() == ""  # released: nobody to take over from


@pytest.mark.parametrize("kernel_lock, holder, outcome", [
    # Case: the kernel lock is free and the file names a dead process: taken over, said so.
    (True, {"pid": "dead", "host": "here"}, "taken"),
    # Case: the kernel lock is free but the file names a live one (it crashed mid-release): the lock decides.
    (True, {"pid": "self-parent", "host": "here"}, "taken"),
    # Case: no kernel locking on this filesystem: a dead pid on this host is taken over ...
    (False, {"pid": "dead", "host": "here"}, "taken"),
    # ... a live pid on this host is busy ...
    (False, {"pid": "self-parent", "host": "here"}, "busy"),
    # ... and a holder on another host cannot be checked: busy.
    (False, {"pid": "dead", "host": "elsewhere"}, "busy"),
])
def test_run_lock_left_behind(tmp_path, monkeypatch, capsys, kernel_lock, holder, outcome):
    import socket

    pid = dead_pid() if holder["pid"] == "dead" else os.getppid()
    host = socket.gethostname() if holder["host"] == "here" else "node-that-is-not-this-one"
    info = {"pid": pid, "host": host, "owner": "art", "started": "2026-01-01T00:00:00Z"}
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps(info) + "\n")
    if not kernel_lock:
        monkeypatch.setattr(rundir.RunLock, "_flock", lambda self, fd: False)
    if outcome == "busy":
        with pytest.raises(rundir.RunDirBusy,
                           match=f"in use by pid {pid} on {host} \\(art, started 2026-01-01T00:00:00Z\\)"):
            rundir.RunLock(tmp_path, "trl").acquire()
        assert json.loads((tmp_path / rundir.LOCK_FILE).read_text()) == info  # untouched
        return
    with rundir.RunLock(tmp_path, "trl"):
        assert f"taking over the lock left by pid {pid} on {host}" in capsys.readouterr().out
        assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
