"""The metrics the reward never sees: ROUGE-L against the real title (rouge-score), and the top template's share."""

import math

import pytest

import utils
from hntitles.analysis import evaluation
from hntitles.reward import text_metrics


@pytest.mark.parametrize("candidate, reference, expected", [
    ("Why SQLite uses B-trees", "Why SQLite uses B-trees", 1.0),            # identical
    ("why sqlite USES b-trees!", "Why SQLite uses B-trees", 1.0),           # case and punctuation ignored
    # rouge-score's tokens are runs of letters and digits: "B-trees" is "b" "trees"; LCS why sqlite b trees
    ("Why SQLite uses B-trees", "Why does SQLite use B-trees?", 2 * 4 / 5 * 4 / 6 / (4 / 5 + 4 / 6)),
    ("B-trees SQLite why", "Why SQLite uses B-trees", 2 * 2 / 4 * 2 / 5 / (2 / 4 + 2 / 5)),  # order matters: LCS 2
    ("Completely unrelated words", "Why SQLite uses B-trees", 0.0),
    ("", "Why SQLite uses B-trees", 0.0),                                    # empty title scores 0, no error
])
def test_rouge_l(candidate, reference, expected):
    assert text_metrics.rouge_l(candidate, reference) == pytest.approx(expected)


@pytest.mark.parametrize("title, template", [
    ("The Power Outage: A Hacker News Solution", "the …: a …"),
    ("The 14th Century: A New Perspective", "the …: a …"),
    ("Show HN: a faster grep", "show …: a …"),
    ("Why SQLite uses B-trees", "why …"),
    ("Ratio 3:", "ratio …"),        # a colon with nothing after it is not the X: Y form
    ("", ""),
])
def test_title_template(title, template):
    assert text_metrics.title_template(title) == template


def test_template_share_and_evalresult_independent():
    titles = ["The A: A b", "The C: A d", "Why x", "The E: A f"]
    assert text_metrics.template_share(titles) == (0.75, "the …: a …")
    share, top = text_metrics.template_share([])
    assert math.isnan(share) and top == ""
    s = [utils.Scored(title=t, rm=0, matches=True, trailing=False, reward=0) for t in titles]
    result = evaluation.EvalResult(greedy=s[:2], sampled=[[s[2]], [s[3]]],
                              rows=[{"id": 1, "title": "The A: A b"}, {"id": 2, "title": "Something else"}])
    ind = result.independent()
    assert ind["story_rouge_l"] == pytest.approx([(1.0 + 0.0) / 2, 0.0])
    assert ind["template_share"] == 0.75 and ind["original_template_share"] == 0.5
    row = evaluation.eval_metrics_row(result, method="x", step=1, wall_time=0)
    assert row["extra"]["rouge_l_mean"] == pytest.approx(0.25) and row["extra"]["template_top"] == "the …: a …"
