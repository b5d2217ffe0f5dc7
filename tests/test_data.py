"""Data loading, row checks and the original filters (utils.load_stories/filter_stories/load_split).

Every format is built in tmp_path from a few rows; the filter counts on the shipped
data/stories.jsonl are computed independently of utils (word/byte thresholds that no row
comes near) and compared with what the tokenizer-based filter did.
"""

import datetime as dt
import json

import datasets
import pytest

import utils
from hntitles.runs import settings

NON_ASCII_BODY = "Zürich’s café served 東京-style ramen — naïve “quotes”, emoji 🚋 and Ελληνικά."


def story(i: int, split: str = "train", **overrides) -> dict:
    row = {"id": 1000 + i, "title": f"Story number {i}", "by": f"user{i}",
           "time": f"2024-02-{i % 27 + 1:02d}T10:00:00Z",
           "url": f"https://example.org/{i}", "score": 50 + i, "scraped_body": f"Body of story {i}. " * 20,
           "split": split}
    row.update(overrides)
    return row


def rows_for(n_train: int = 4, n_val: int = 2) -> list[dict]:
    return [story(i, "train") for i in range(n_train)] + [story(100 + i, "val") for i in range(n_val)]


def write_jsonl(path, rows, ensure_ascii=False):
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------


def test_jsonl_with_split_column(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", rows_for(4, 2))
    train, val = utils.load_stories(str(path), "train"), utils.load_stories(str(path), "val")
    assert len(train) == 4 and len(val) == 2
    assert train["id"] == [1000, 1001, 1002, 1003]
    assert set(val["split"]) == {"val"}
    for name in utils.STORY_FIELDS:
        assert name in train.column_names


def test_jsonl_absent_split_names_what_exists(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", rows_for(2, 0))
    with pytest.raises(utils.DatasetError, match=r"no rows with split 'val'.*train"):
        utils.load_stories(str(path), "val")


def test_jsonl_without_split_column_gives_all_rows(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "split"} for r in rows_for(3, 0)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    assert len(utils.load_stories(str(path), "train")) == 3


def test_directory_of_split_files(tmp_path):
    rows = rows_for(3, 2)
    write_jsonl(tmp_path / "train.jsonl", [r for r in rows if r["split"] == "train"])
    write_jsonl(tmp_path / "val.jsonl", [r for r in rows if r["split"] == "val"])
    assert len(utils.load_stories(str(tmp_path), "train")) == 3
    assert utils.load_stories(str(tmp_path), "val")["id"] == [1100, 1101]
    with pytest.raises(utils.DatasetError, match="test"):
        utils.load_stories(str(tmp_path), "test")


def test_parquet_file_with_datetime_time(tmp_path):
    rows = [{**r, "time": dt.datetime(2024, 3, i + 1, 12, 0, 0)} for i, r in enumerate(rows_for(3, 2))]
    rows[0]["scraped_body"] = NON_ASCII_BODY
    path = tmp_path / "s.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    train = utils.load_stories(str(path), "train")
    assert len(train) == 3 and len(utils.load_stories(str(path), "val")) == 2
    assert train["time"][0] == "2024-03-01T12:00:00Z"  # timestamps become ISO 8601 text
    assert train["scraped_body"][0] == NON_ASCII_BODY
    with pytest.raises(utils.DatasetError, match=r"no rows with split 'test'"):
        utils.load_stories(str(path), "test")


def test_directory_of_parquet_split_files(tmp_path):
    datasets.Dataset.from_list(rows_for(2, 0)).to_parquet(str(tmp_path / "train.parquet"))
    assert len(utils.load_stories(str(tmp_path), "train")) == 2


def test_save_to_disk_dataset_dict(tmp_path):
    rows = rows_for(4, 3)
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([r for r in rows if r["split"] == "train"]),
        "val": datasets.Dataset.from_list([r for r in rows if r["split"] == "val"]),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    assert len(utils.load_stories(str(tmp_path / "saved"), "train")) == 4
    assert len(utils.load_stories(str(tmp_path / "saved"), "val")) == 3
    with pytest.raises(utils.DatasetError, match=r"no split 'test'"):
        utils.load_stories(str(tmp_path / "saved"), "test")


def test_save_to_disk_missing_column_names_it(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "by"} for r in rows_for(2, 0)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(utils.DatasetError, match=r"'by'") as err:
        utils.load_stories(str(tmp_path / "saved"), "train")
    assert str(tmp_path / "saved") in str(err.value)


@pytest.mark.parametrize("name, content, match", [
    # a missing file
    ("absent.jsonl", None, "file not found"),
    # an empty file is not a dataset
    ("empty.jsonl", "", "no stories"),
    # a format we do not read
    ("stories.csv", "id,title\n1,a\n", "unsupported dataset file"),
    # a folder with neither split files nor a saved dataset
    ("folder", "__dir__", "not a saved dataset"),
])
def test_unloadable_sources(tmp_path, name, content, match):
    path = tmp_path / name
    if content == "__dir__":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(utils.DatasetError, match=match):
        utils.load_stories(str(path), "train")


# --------------------------------------------------------------------------------------
# Malformed rows: the error names the file, the line and the field
# --------------------------------------------------------------------------------------


def _drop(field_name):
    return lambda r: {k: v for k, v in r.items() if k != field_name}


@pytest.mark.parametrize("line, corrupt, field_name", [
    # a line that is not JSON at all (no field to name)
    (2, lambda r: '{"id": 5, "title": "cut off', None),
    # a JSON value that is not an object
    (2, lambda r: "[1, 2, 3]", None),
    # the body field missing on line 3
    (3, _drop("scraped_body"), "scraped_body"),
    # the title missing on line 1
    (1, _drop("title"), "title"),
    # a score stored as text
    (4, lambda r: {**r, "score": "fifty"}, "score"),
    # a title that is a number
    (2, lambda r: {**r, "title": 123}, "title"),
    # a time that is not ISO 8601
    (3, lambda r: {**r, "time": "last Tuesday"}, "time"),
])
def test_malformed_jsonl(tmp_path, line, corrupt, field_name):
    rows = rows_for(4, 1)
    lines = [json.dumps(r) for r in rows]
    bad = corrupt(rows[line - 1])
    lines[line - 1] = bad if isinstance(bad, str) else json.dumps(bad)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(utils.DatasetError) as err:
        utils.load_stories(str(path), "train")
    message = str(err.value)
    assert str(path) in message and f"line {line}" in message
    if field_name:
        assert f"'{field_name}'" in message


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    rows = rows_for(3, 0)
    text = json.dumps(rows[0]) + "\n\n" + json.dumps(_drop("url")(rows[1])) + "\n"
    (tmp_path / "s.jsonl").write_text(text)
    with pytest.raises(utils.DatasetError, match=r"line 3 .*'url'"):
        utils.load_stories(str(tmp_path / "s.jsonl"), "train")


@pytest.mark.parametrize("ensure_ascii", [
    # raw UTF-8 in the file
    False,
    # \\u escapes in the file
    True,
])
def test_non_ascii_passes_through_intact(tmp_path, ensure_ascii):
    rows = rows_for(2, 0)
    rows[1] = {**rows[1], "title": "Zürich 東京 🚋", "by": "josé", "scraped_body": NON_ASCII_BODY}
    path = write_jsonl(tmp_path / "s.jsonl", rows, ensure_ascii=ensure_ascii)
    ds = utils.load_stories(str(path), "train")
    assert ds[1]["title"] == "Zürich 東京 🚋" and ds[1]["by"] == "josé"
    assert ds[1]["scraped_body"] == NON_ASCII_BODY


# --------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_filter_counts_each_reason_in_order(tmp_path, tiny_tokenizer):
    rows = [
        story(0),                                   # kept
        story(1, score=5),                          # low score
        story(2, score=5, scraped_body=""),         # low score and empty: counted once, under score
        story(3, scraped_body="   \n "),            # whitespace-only body is empty
        story(4, scraped_body=None),                # null body is empty
        story(5, scraped_body="word " * 400),       # too long for the limit below
        story(6, score=20),                         # exactly min_score is kept
        story(7, scraped_body=NON_ASCII_BODY),      # kept, text intact
        story(8, scraped_body="\x00\x01 \x00"),     # control characters only: no text, an empty body
        story(9, title="\x00"),                     # a NUL title: nothing the reward server will score
        story(10, title="  \u200b "),               # blank / zero-width title
    ]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    ds = utils.load_stories(str(path), "train")
    lengths = utils.prompt_token_counts(tiny_tokenizer, [r["scraped_body"] for r in rows[:1] + rows[5:6]])
    limit = (lengths[0] + lengths[1]) // 2  # between a normal story and the long one
    kept, report = utils.filter_stories(ds, tiny_tokenizer, "train", min_score=20, max_prompt_tokens=limit)
    assert report.dropped == {"score < 20": 2, "empty body": 3, "empty title": 2, f"prompt > {limit} tokens": 1}
    assert (report.rows_in, report.rows_out) == (11, 3)
    assert kept["id"] == [1000, 1006, 1007]
    assert kept["scraped_body"][2] == NON_ASCII_BODY
    assert kept["prompt_tokens"] == report.prompt_tokens
    assert len(report.measured_tokens) == 4 and max(report.measured_tokens) == lengths[1]
    assert report.summary() == (f"train: 11 rows -> 3 kept (dropped score < 20: 2, empty body: 3, empty title: 2, "
                                f"prompt > {limit} tokens: 1)")


@pytest.mark.slow
def test_filter_everything_dropped(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [story(0, score=1), story(1, score=2)])
    kept, report = utils.filter_stories(utils.load_stories(str(path), "train"), tiny_tokenizer, "train")
    assert len(kept) == 0 and report.rows_out == 0 and report.dropped["score < 20"] == 2


def _expected_drops(rows, min_score, max_prompt_tokens):
    """Independent of the tokenizer: a prompt has at least one token per whitespace-separated
    word (byte-level BPE never merges across spaces) and at most one per UTF-8 byte, plus the
    template. Rows between the two bounds would be ambiguous; the shipped file has none."""
    template_overhead = 200
    drops = {"score": 0, "empty": 0, "long": 0}
    for r in rows:
        body = r["scraped_body"] or ""
        if r["score"] < min_score:
            drops["score"] += 1
        elif not body.strip():
            drops["empty"] += 1
        elif len(body.split()) > max_prompt_tokens:
            drops["long"] += 1
        else:
            assert len(body.encode()) + template_overhead <= max_prompt_tokens, f"ambiguous length: id {r['id']}"
    return drops


@pytest.fixture(scope="module")
def shipped_rows(stories_path):
    if not stories_path.exists():
        pytest.fail(f"{stories_path} missing (shipped with the repo)")
    return [json.loads(line) for line in stories_path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_shipped_stories_have_the_awkward_rows(shipped_rows):
    ok = [r for r in shipped_rows if r["score"] >= 20]
    # the filters must have something to do: each reason occurs at least once
    assert any(r["score"] < 20 for r in shipped_rows)
    assert any(not (r["scraped_body"] or "").strip() for r in ok)
    assert any(len(r["scraped_body"].split()) > settings.MAX_PROMPT_TOKENS for r in ok)
    assert any(any(ord(c) > 127 for c in r["scraped_body"] + r["title"]) for r in ok)
    assert {r["split"] for r in shipped_rows} == {"train", "val"}


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val"])
def test_filter_shipped_stories(shipped_rows, stories_path, tiny_tokenizer, split):
    rows = [r for r in shipped_rows if r["split"] == split]
    expected = _expected_drops(rows, 20, settings.MAX_PROMPT_TOKENS)
    ds = utils.load_stories(str(stories_path), split)
    assert len(ds) == len(rows)
    kept, report = utils.filter_stories(ds, tiny_tokenizer, split)
    assert report.dropped == {"score < 20": expected["score"], "empty body": expected["empty"], "empty title": 0,
                              f"prompt > {settings.MAX_PROMPT_TOKENS} tokens": expected["long"]}
    assert report.rows_out == len(rows) - sum(expected.values()) == len(kept)
    # what survives is byte-for-byte what the file holds (non-ASCII included)
    by_id = {r["id"]: r for r in rows}
    for r in kept:
        assert r["title"] == by_id[r["id"]]["title"]
        assert r["scraped_body"] == by_id[r["id"]]["scraped_body"]


@pytest.mark.slow
def test_prompt_token_counts_match_one_by_one(shipped_rows, tiny_tokenizer):
    bodies = [r["scraped_body"] for r in shipped_rows if r["scraped_body"]]
    batched = utils.prompt_token_counts(tiny_tokenizer, bodies, batch_size=16)
    one_by_one = [len(tiny_tokenizer.apply_chat_template(utils.title_messages(b), tokenize=True,
                                                         add_generation_prompt=True)["input_ids"]) for b in bodies]
    assert batched == one_by_one
    assert max(batched) > settings.MAX_PROMPT_TOKENS  # the long story really is over the limit


@pytest.mark.slow
@pytest.mark.parametrize("limit, expected_rows", [
    # a cap below what the filters keep
    (2, 2),
    # 0 / None mean all kept rows
    (0, 5),
    (None, 5),
    # a cap above what is there
    (50, 5),
])
def test_load_split_adds_prompt_and_respects_limit(tmp_path, tiny_tokenizer, limit, expected_rows):
    rows = rows_for(5, 1) + [story(9, "train", score=1)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    recipe = settings.Recipe(dataset=str(path))
    ds, report = utils.load_split(recipe, "train", tiny_tokenizer, limit)
    assert len(ds) == expected_rows
    assert report.rows_out == 5 and report.dropped["score < 20"] == 1  # the report is before the cap
    assert ds["id"] == [1000 + i for i in range(expected_rows)]  # the first ones, in file order
    for row in ds:
        assert row["prompt"] == utils.title_messages(row["scraped_body"])
        assert row["prompt_tokens"] > 0


def test_hub_id_goes_to_load_dataset(monkeypatch):
    # The Hub is unreachable here: stand in for datasets.load_dataset, returning what the real
    # OpenPipe dataset holds (time as datetime, extra columns), and check the call and the result.
    calls = []
    rows = [{**{k: v for k, v in story(i).items() if k != "split"}, "time": dt.datetime(2023, 5, i + 1, 9, 30),
             "descendants": 10} for i in range(3)]

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = utils.load_stories(settings.HUB_DATASET, "val")
    assert calls == [(settings.HUB_DATASET, "val")]
    assert ds["time"] == [f"2023-05-0{i + 1}T09:30:00Z" for i in range(3)]
    assert len(ds) == 3 and "descendants" in ds.column_names


def test_hub_id_offline_raises_connection_error():
    # conftest sets HF_HUB_OFFLINE=1: the real call fails fast and says why (check_dataset words it for users)
    with pytest.raises(ConnectionError, match="Couldn't reach"):
        utils.load_stories(settings.HUB_DATASET, "train")
