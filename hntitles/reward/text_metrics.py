"""Text measures of a title: its length, how much of it is copied from the body, how close it is to the
real title, and which template it follows. The reward server, the metrics rows and the reports use them.

- `has_text`: a visible character at all (an empty-looking title or body is no title and no article);
- `word_count`: a title's length as a reader counts it (the reward's length band and `title_len_mean`);
- `words`: lower-cased word tokens for the overlap measures (`copy_fraction`, `title_template`);
- `copy_fraction`: the longest verbatim run of title words found in the body, over the title's words;
- `rouge_l`: ROUGE-L F1 to the story's real title (Google's `rouge-score`; the reward never sees it);
- `title_template`, `template_share`: a title's skeleton, and how much one skeleton dominates.

    python -c "from hntitles.reward import text_metrics as t;
        print(t.rouge_l('Why SQLite uses B-trees', 'Why does SQLite use B-trees?'))"
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence


def has_text(value: str | None) -> bool:
    """True when `value` has a visible character: not only whitespace, control characters
    (NUL, escape), zero-width or other format characters. Such strings are no title and no
    article: the reward server refuses them and the data filters drop them.

    >>> has_text("Rust 1.80"), has_text(" \\n\\t"), has_text("\\x00\\x1b"), has_text("\\u200b"), has_text(None)
    (True, False, False, False, False)
    """
    return bool(value) and any(c.isprintable() and not c.isspace() for c in value)


_WORD = re.compile(r"[\w'’+#.-]+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation stripped: what copy detection and templates compare
    (a title's length is word_count, a reader's count).

    >>> words("Why SQLite's B-trees win.")
    ['why', "sqlite's", 'b-trees', 'win']
    """
    return [w.strip(".'’-").lower() for w in _WORD.findall(text) if w.strip(".'’-")]


def word_count(text: str) -> int:
    """Words as a reader counts them: whitespace tokens with a letter or digit ("$14,112" is one).

    The one title length: the reward's length band and the metrics' title_len_mean both use it.

    >>> word_count("$14,112 raised in 3.5 days"), word_count("Show HN: a — b")
    (5, 4)
    """
    return sum(any(c.isalnum() for c in tok) for tok in text.split())


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imports nltk: only when a report needs it

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two titles (rouge-score's tokenizer: lower case, letters and digits, no stemming).

    A metric the reward never sees: how close a generated title is to the story's real one.

    >>> round(rouge_l("Why SQLite uses B-trees", "Why does SQLite use B-trees?"), 3)
    0.727
    >>> rouge_l("", "A title")
    0.0
    """
    if not candidate.strip() or not reference.strip():
        return 0.0
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


def title_template(title: str) -> str:
    """A title's skeleton: its first word, and for the "X: Y" form the first word after the colon.

    Mode collapse in this task looks like "The Scale: A Smart...", "The Lake: A Time...":
    every title "the …: a …". Plain titles keep only their first word ("why …").

    >>> title_template("The Power Outage: A Hacker News Solution")
    'the …: a …'
    >>> title_template("Why SQLite uses B-trees")
    'why …'
    """
    head, colon, tail = title.partition(":")
    first = (words(head) or [""])[0]
    if colon and words(tail):
        return f"{first} …: {words(tail)[0]} …"
    return f"{first} …" if first else ""


def template_share(titles: Sequence[str]) -> tuple[float, str]:
    """(share of titles with the most common skeleton, that skeleton); (nan, "") for no titles.

    >>> template_share(["Why A", "Why B", "How C"])
    (0.6666666666666666, 'why …')
    """
    keys = [k for k in (title_template(t) for t in titles) if k]
    if not keys:
        return float("nan"), ""
    top, count = Counter(keys).most_common(1)[0]
    return count / len(keys), top


def copy_fraction(title: str, body: str) -> float:
    """Longest run of consecutive title words found verbatim in the body / title words.

    A policy under a plain relevance reward learns to copy the article's first sentence;
    this measures that (1.0 = the whole title is a verbatim body span).

    >>> copy_fraction("a b c d", "x a b c y"), copy_fraction("new words", "old text")
    (0.75, 0.0)
    """
    tw, bw = words(title), words(body)
    if not tw or not bw:
        return 0.0
    # Longest common substring over words, O(len(tw) * len(bw)) with a rolling row.
    best, prev = 0, [0] * (len(bw) + 1)
    for a in tw:
        cur = [0] * (len(bw) + 1)
        for j, b in enumerate(bw, 1):
            if a == b:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best / len(tw)
