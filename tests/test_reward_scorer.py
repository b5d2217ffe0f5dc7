"""The reward server's scorers, without HTTP.

MiniLM (the offline default) on the shipped stories: real titles must beat shuffled titles,
broken titles (shouting, clickbait, run-on) and titles copied from the body, on average and for
at least WIN_RATE of the stories. Measured on data/stories.jsonl (78 stories with a body,
2026-11-21): every variant lost on 100% of stories; mean margins real - variant: shuffled +0.53,
shout +0.32, clickbait +0.48, run-on +0.53, first sentence +0.62, first 12 words +0.58
(real titles average 0.64 on a 0..1 scale); a keyword list also lost on 100% (+0.33), and
"The article discusses <real title>" (the meta term, 2026-11-22) on 100%.

HF: a tiny random sequence-classification model (and a LoRA adapter) built in tmp_path.
"""

from __future__ import annotations

import collections
import json
import math
import re

import pytest

import local_reward as lr
from hntitles.reward import scorers, text_metrics

WIN_RATE = 0.9  # measured 1.0 for every variant; leaves room for new stories without hiding a regression
MIN_MARGIN = 0.1  # measured margins are 0.32..0.62


@pytest.fixture(scope="module")
def minilm():
    return scorers.MiniLMScorer()


@pytest.fixture(scope="module")
def rows(stories_path):
    if not stories_path.exists():
        pytest.fail(f"{stories_path} missing: the shipped stories are part of the repo")
    rows = [json.loads(line) for line in stories_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if (r.get("scraped_body") or "").strip()]
    assert len(rows) >= 30, "too few stories with a body to calibrate on"
    return rows


def story(title: str, row: dict) -> dict:
    return {"title": title, "by": row["by"], "time": row["time"], "url": row.get("url") or "",
            "scraped_body": row["scraped_body"]}


def first_sentence(body: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", " ".join(body.split()))
    return m.group(1) if m else body[:200]


def run_on(title: str, body: str) -> str:
    # The real title rambling on into a 40-word sentence (body words, but not a verbatim span).
    return " ".join([*title.split(), "and", *body.split()[1::3]][:40])


VARIANTS = {
    # another story's real title: fluent and well-formed, but about something else
    "shuffled": lambda i, rows: rows[(i + len(rows) // 2) % len(rows)]["title"],
    # the real title shouted
    "shout": lambda i, rows: rows[i]["title"].upper(),
    # the real title dressed up as clickbait
    "clickbait": lambda i, rows: f"You won't believe this: {rows[i]['title']}!!",
    # the real title as a 40-word run-on sentence
    "run_on": lambda i, rows: run_on(rows[i]["title"], rows[i]["scraped_body"]),
    # the article's first sentence: the hack a SmolLM2-135M policy found within ~25 GRPO steps under
    # a reward without the copy penalty and length gate (5 of 12 greedy val titles >= 80% body text)
    "first_sentence": lambda i, rows: first_sentence(rows[i]["scraped_body"]),
    # a verbatim copy that fits the length band: the body's first 12 words
    "first_12_words": lambda i, rows: " ".join(rows[i]["scraped_body"].split()[:12]),
    # the body's 10 most frequent content words: as close to the body in embedding space as a real
    # title (before the keywords term such lists won on half the stories); the likely next hack
    "keyword_list": lambda i, rows: keyword_list(rows[i]["scraped_body"]),
    # describing the article instead of titling it: what the demo's policy learned before the meta term
    "meta": lambda i, rows: "The article discusses " + rows[i]["title"][:1].lower() + rows[i]["title"][1:],
}
# Known soft spot: a keyword list salted with one function word escapes the keywords term; such
# lists (a 75-word stop list) still lost on 62/78 stories (mean margin +0.18), against 39/78 before it.


def keyword_list(body: str, k: int = 10) -> str:
    counts = collections.Counter(w for w in text_metrics.words(body)
                                 if w not in scorers.FUNCTION_WORDS and len(w) > 2)
    return " ".join(w for w, _ in counts.most_common(k)).title()


@pytest.fixture(scope="module")
def real_scores(minilm, rows):
    return [s for s, _ in minilm.score([story(r["title"], r) for r in rows])]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_real_titles_beat_variant(minilm, rows, real_scores, variant):
    make = VARIANTS[variant]
    fake = [s for s, _ in minilm.score([story(make(i, rows), r) for i, r in enumerate(rows)])]
    margin = sum(real_scores) / len(rows) - sum(fake) / len(rows)
    wins = sum(a > b for a, b in zip(real_scores, fake, strict=True)) / len(rows)
    print(f"{variant}: margin {margin:+.3f}, real wins {wins:.0%} of {len(rows)}")
    assert margin >= MIN_MARGIN, f"{variant}: mean margin {margin:.3f}"
    assert wins >= WIN_RATE, f"{variant}: real title wins only {wins:.0%}"


@pytest.mark.slow
def test_scores_in_range_and_deterministic(minilm, rows, real_scores):
    assert all(0.0 <= s <= 1.0 for s in real_scores)
    again = [s for s, _ in minilm.score([story(r["title"], r) for r in rows])]
    assert again == pytest.approx(real_scores, abs=1e-6)


@pytest.mark.slow
def test_batch_equals_single(minilm, rows):
    batch = [story(r["title"], r) for r in rows[:8]]
    saved = dict(minilm.embedder.cache)
    minilm.embedder.cache.clear()  # compute the bodies in this batch, not reuse earlier vectors
    together = [s for s, _ in minilm.score(batch)]
    alone = []
    for s in batch:
        minilm.embedder.cache.clear()
        alone.append(minilm.score([s])[0][0])
    minilm.embedder.cache.update(saved)
    assert together == pytest.approx(alone, abs=1e-5)


@pytest.mark.slow
def test_components_recompose_the_score(minilm, rows):
    score, c = minilm.score([story(rows[0]["title"], rows[0])])[0]
    assert set(c) >= {"relevance", "style", "copy", "length"}
    assert score == pytest.approx(c["relevance"] * c["length"] * c["style"] * c["copy_factor"])


@pytest.mark.slow
def test_empty_body_scores_zero(minilm):
    # Nothing to be relevant to: relevance is 0 by definition, not the cosine to an empty string.
    score, c = minilm.score([{"title": "A perfectly good title here", "scraped_body": "  "}])[0]
    assert score == 0.0 and c["relevance"] == 0.0


@pytest.mark.parametrize("title, expected", [
    # a normal HN title: no penalty
    ("Rust 1.80 ships LazyCell and LazyLock", {"shout": 0, "clickbait": 0, "period": 0, "run_on": 0}),
    # acronyms are not shouting (one long one is tolerated too)
    ("NASA and ESA test CRISPR on the ISS", {"shout": 0}),
    # a title in capitals shouts
    ("THE NEW WAY TO RUN SERVERS", {"shout": 1}),
    # one long all-caps word beyond the first: half a shout
    ("SQLITE versus POSTGRES for small apps", {"shout": 0.5}),
    # two beyond the first: a full shout
    ("Why SQLITE and POSTGRES and ORACLE differ", {"shout": 1}),
    # doubled punctuation is clickbait
    ("My compiler is done!!", {"clickbait": 0.6}),
    # a single exclamation mark is a mild penalty
    ("My compiler is done!", {"clickbait": 0.3}),
    # ?! as well
    ("Is this the end of SQL?!", {"clickbait": 0.6}),
    # stock clickbait phrases
    ("This one weird trick speeds up Python", {"clickbait": 0.6}),
    # phrase + punctuation + emoji saturate at 1
    ("You won't believe this compiler!! 🤯", {"clickbait": 1.0}),
    # emoji alone
    ("Shipping our new database 🚀", {"clickbait": 0.6}),
    # a degree sign is not an emoji
    ("Yeast grows at 42°C after CRISPR screen", {"clickbait": 0, "shout": 0}),
    # a trailing ellipsis teases
    ("What we learned from the outage...", {"clickbait": 0.3, "period": 0}),
    # HN titles do not end with a period
    ("We rewrote our backend in Go.", {"period": 1}),
    # two sentences are a run-on
    ("We rewrote it. It was faster", {"run_on": 1}),
    # an abbreviation mid-title is not a sentence break
    ("Notes on v1.2 of the spec", {"run_on": 0}),
    # a keyword list: five words, no function word
    ("Graph Registers Allocator Pointer Node", {"keywords": 1}),
    # a content word said three times
    ("Rust and Rust or Rust", {"keywords": 1}),
    # a real phrase without articles still has a preposition
    ("Superconductor paper retracted after failed replications", {"keywords": 0}),
    # short titles are not judged as keyword lists
    ("Rust ships LazyCell", {"keywords": 0}),
    # describing the article instead of titling it
    ("The article discusses a faster grep", {"meta": 1}),
    ("This post also explains how we cut CI time", {"meta": 1}),
    ("An article about medieval negative numbers", {"meta": 1}),
    ("I'm an expert at writing Hacker News titles", {"meta": 1}),
    ("Here's a rewritten version of the title", {"meta": 1}),
    # ... but a real title may start with I'm, or name a post office
    ("I'm stepping down as maintainer of fastcsv", {"meta": 0}),
    ("The Post Office Horizon scandal explained", {"meta": 0}),
])
def test_style_terms(title, expected):
    terms = scorers.style_terms(title)
    for key, value in expected.items():
        assert terms[key] == pytest.approx(value), (title, terms)


@pytest.mark.parametrize("title, body, expected", [
    # in-band, clean, original wording: score is the relevance
    ("Rust ships LazyCell today", "x", {"length": 1.0, "style": 1.0, "copy_factor": 1.0}),
    # too short: relevance x 0.25
    ("Rust", "x", {"length": 0.25}),
    # 15 words: relevance x 0.25
    (" ".join(["word"] * 15), "x", {"length": 0.25}),
    # a verbatim body span keeps 10%
    ("the team released rust today", "yesterday the team released rust today",
     {"copy": 1.0, "copy_factor": pytest.approx(0.1)}),
    # half the words in one run is still free
    ("the team ships a fast grep", "the team ships", {"copy": 0.5, "copy_factor": 1.0}),
])
def test_formula_terms(title, body, expected):
    score, c = scorers.minilm_formula(0.6, title, body)
    for key, value in expected.items():
        assert c[key] == value, (key, c)
    assert score == pytest.approx(0.6 * c["length"] * c["style"] * c["copy_factor"])


# ---- HF sequence-classification scorer, on a tiny random model built here ----


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, tiny_tokenizer):
    """A 2-layer random LlamaForSequenceClassification (num_labels=1) + a LoRA adapter, saved to disk."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("rm")
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                      pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(root / "rm")
    tiny_tokenizer.save_pretrained(root / "rm")
    base = LlamaForSequenceClassification.from_pretrained(root / "rm")
    # init_lora_weights=False: non-zero B, so the adapter visibly changes the scores.
    peft_model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(root / "lora")
    return root / "rm", root / "lora"


HF_STORIES = [
    {"title": "Rust 1.80 ships LazyCell", "by": "a", "time": "2024-07-25T10:00:00Z", "url": "https://x.dev",
     "scraped_body": "The Rust team released Rust 1.80 today. " * 200},  # far past the 256-token limit: truncated
    {"title": "Show HN: a tiny grep", "by": "b", "time": "2024-01-02", "url": "", "scraped_body": "I wrote a grep."},
    # a one-word body (an empty one is refused with a 422 naming scraped_body: tests/test_local_reward.py)
    {"title": "Ask HN: on-call?", "by": "c", "time": "2023-05-06T07:08:09+02:00", "url": "",
     "scraped_body": "On-call?"},
]


@pytest.mark.slow
def test_hf_scorer_matches_a_direct_forward_pass(tiny_rm):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, _ = tiny_rm
    scorer = scorers.HFScorer(str(path))
    assert scorer.max_length == 256  # min(flag 8192, the model's max_position_embeddings)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    s = HF_STORIES[1]
    text = scorers.serialize_story(s["title"], s["by"], s["time"], s["url"], s["scraped_body"])
    with torch.inference_mode():
        expected = model(**tok(text, return_tensors="pt")).logits[0, 0].item()
    assert scorer.score([s])[0][0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("use_adapter", [
    # the plain RM
    False,
    # the RM with a LoRA adapter on top
    True,
])
def test_hf_scorer_batch_equals_single_and_is_deterministic(tiny_rm, use_adapter):
    path, lora = tiny_rm
    scorer = scorers.HFScorer(str(path), str(lora) if use_adapter else "", batch_size=2)
    batch = [s for s, _ in scorer.score(HF_STORIES)]
    single = [scorer.score([s])[0][0] for s in HF_STORIES]
    assert all(math.isfinite(s) for s in batch)
    assert batch == pytest.approx(single, abs=1e-5)
    assert [s for s, _ in scorer.score(HF_STORIES)] == pytest.approx(batch, abs=1e-6)


@pytest.mark.slow
def test_hf_adapter_changes_scores(tiny_rm):
    path, lora = tiny_rm
    base = [s for s, _ in scorers.HFScorer(str(path)).score(HF_STORIES)]
    adapted = scorers.HFScorer(str(path), str(lora))
    assert "lora" in adapted.model
    assert [s for s, _ in adapted.score(HF_STORIES)] != pytest.approx(base, abs=1e-4)


@pytest.mark.slow
def test_hf_refuses_a_model_without_a_trained_head(tiny_model):
    # models/tiny is a causal LM: as a classifier its head would be random, its scores noise.
    with pytest.raises(ValueError, match="no trained classification head"):
        scorers.HFScorer(str(tiny_model))


@pytest.mark.slow
def test_hf_scorer_behind_the_app(tiny_rm):
    path, _ = tiny_rm
    app = lr.create_app(lr.ServerArgs(scorer="hf", rm_model=str(path)))
    client = app.test_client()
    assert client.get("/health").get_json()["scorer"] == "hf"
    reply = client.post("/score_batch", json={"stories": HF_STORIES}).get_json()
    assert len(reply["scores"]) == 3 and set(reply["components"][0]) == {"rm"}
