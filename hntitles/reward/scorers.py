"""The reward models the reward server scores with: the offline MiniLM formula and a trained HF RM.

local_reward.py serves them; this file is what researchers tune. The MiniLM reward, in [0, 1]:

    score       = relevance x length x style x copy_factor
    relevance   = clip(cosine(MiniLM(title), MiniLM(body)), 0, 1)
    length      = 1 inside LENGTH_BAND (text_metrics.word_count words), else OFF_BAND
    style       = max(0, 1 - sum(STYLE_WEIGHTS[k] x style_terms(title)[k]))
    copy_factor = 1 - COPY_PENALTY x clip((copy - COPY_FREE) / (1 - COPY_FREE), 0, 1)

- `minilm_formula` (pure) and `style_terms` (the HN conventions), `MiniLMScorer` (the offline
  default; its docstring spells out every term);
- `HFScorer`: a sequence-classification reward model (num_labels=1, optionally with a PEFT adapter)
  over `serialize_story`; its score is the logit (OpenPipe's RM regresses log HN score);
- `Scorer`: what the server calls, `score(stories) -> [(score, components)]`.

    python -c "from hntitles.reward import scorers as r;
        print(r.minilm_formula(0.6, 'Rust 1.80 ships LazyCell', 'Rust 1.80 ...'))"
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Protocol

from hntitles.reward.embeddings import Embedder
from hntitles.reward.text_metrics import copy_fraction, word_count
from hntitles.runs.settings import MAX_SEQ_TOKENS

# --------------------------------------------------------------------------------------
# The MiniLM formula and the constants researchers tune
# --------------------------------------------------------------------------------------
# MiniLM reward (minilm_formula; MiniLMScorer's docstring spells out every term):
#   score = relevance x length x style x copy_factor, in [0, 1]
#   relevance   = clip(cosine(MiniLM(title), MiniLM(body)), 0, 1)
#   length      = 1 inside LENGTH_BAND (title_length words), else OFF_BAND
#   style       = max(0, 1 - sum(STYLE_WEIGHTS[k] x style_terms(title)[k]))
#   copy_factor = 1 - COPY_PENALTY x clip((copy - COPY_FREE) / (1 - COPY_FREE), 0, 1)
# The `hf` scorer (HFScorer) replaces all of it with a trained reward model's logit.

LENGTH_BAND = (4, 14)  # words; HN titles are short (the site caps them at 80 characters)
OFF_BAND = 0.25  # relevance multiplier outside the band: the fix that stopped first-sentence copying
COPY_FREE = 0.5  # copy fraction tolerated before the copy factor starts to fall
COPY_PENALTY = 0.9  # share of the score a title that is wholly a body span loses (it keeps 10%)
STYLE_WEIGHTS = {"shout": 0.5, "clickbait": 0.5, "period": 0.15, "run_on": 0.3, "keywords": 0.5, "meta": 0.6}


def title_length(title: str) -> int:
    """Words as a reader counts them (text_metrics.word_count: the metrics' title length is the same count).

    >>> title_length("$14,112 raised in 3.5 days"), title_length("Show HN: a – b")
    (5, 4)
    """
    return word_count(title)


_CLICKBAIT_PHRASES = re.compile(
    r"\b(?:you won'?t believe|won'?t believe|this one (weird )?trick|one weird trick|will blow your mind"
    r"|mind[- ]?blowing"
    r"|what happen(s|ed) next|doctors hate|you need to (know|see)|must[- ]see|shocking|jaw[- ]dropping|insane"
    r"|changes? everything|secret (that|they)|nobody (is )?talking about|you('re| are) doing it wrong"
    r"|like a boss|the truth about|hate (him|her|this)|goes viral)\b",
    re.IGNORECASE,
)
# English function words. Real titles are phrases and nearly always contain one (76 of the 79 shipped
# titles; the rest fall to this fuller list); a list of body keywords ("Graph Node Registers Pointer
# Allocator Time") contains none, yet matches the body's embedding as well as the real title does.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any no every each all both either neither my your our their his her its
i you he she it we they me him us them who whom whose which what where when why how
and or but nor so yet if then than because while though although unless until since as
of to in on at by for with from into onto over under about above below after before between through during
without within against among across behind beyond near off out up down around per via toward towards upon
is are was were be been being am has have had do does did will would can could shall should may might must
not no isn't aren't wasn't weren't don't doesn't didn't won't can't couldn't shouldn't wouldn't
just also only even still again ever never very too more most less least much many few
""".split())

# Describing the article instead of titling it: "The article discusses ...", "This post explains
# ...", "I'm an expert ...". Once copying was closed, this is what a small policy learned first
# under this reward (the validator accepts such lines and they are safely on topic: demo of
# 2026-11-22, "The article discusses ..." in 12/12 trained greedy titles). HN titles never do it.
_META = re.compile(
    r"\b(?:article|post|text|essay|piece|author|writer)\s+(?:(?:also|then|further|mainly|briefly)\s+)?"
    r"(?:discuss|describ|explain|talk|cover|explor|highlight|mention|present|detail|focus|delv|provid|examin"
    r"|outlin|is about|is written)\w*"
    r"|^\W*(?:here(?:'s|’s| is)\b|i(?:'m|’m| am) an? (?:expert|ai|assistant|language model)\b"
    r"|as an? (?:ai|expert|language model)\b|in this (?:article|post|piece|essay)\b"
    r"|(?:an?|the|this) (?:article|post|piece|essay) (?:about|on)\b)",
    re.IGNORECASE,
)

# Emoji and pictographs (not every "symbol": ° in "42°C" or € in prices are fine in a title).
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F\u200D]")


def style_terms(title: str) -> dict[str, float]:
    """Hacker News title conventions, each a penalty in [0, 1] (0 = follows the convention).

    >>> style_terms("Rust 1.80 ships LazyCell")
    {'shout': 0.0, 'clickbait': 0.0, 'period': 0.0, 'run_on': 0.0, 'keywords': 0.0, 'meta': 0.0}
    >>> style_terms("YOU WON'T BELIEVE THIS COMPILER!!")
    {'shout': 1.0, 'clickbait': 1.0, 'period': 0.0, 'run_on': 0.0, 'keywords': 0.0, 'meta': 0.0}
    >>> style_terms("The article discusses a faster grep")["meta"]
    1.0
    """
    tokens = [t.strip("\"'“”‘’()[],:;!?.") for t in title.split()]
    lettered = [re.sub(r"['’]s$", "", t) for t in tokens if sum(c.isalpha() for c in t) >= 2]
    caps = [t for t in lettered if t.isupper()]
    # All-caps words are often acronyms (NASA, GPU, CRISPR); a mostly-caps title, or several long
    # all-caps words, is shouting.
    long_caps = [t for t in caps if sum(c.isalpha() for c in t) >= 5]
    shout = 1.0 if len(lettered) >= 3 and len(caps) / len(lettered) >= 0.6 else min(1.0, max(0, len(long_caps) - 1) / 2)
    bait = 0.0
    if re.search(r"[!?]\s*[!?]", title):  # !!, ?!, !?, ??
        bait += 0.6
    elif "!" in title:
        bait += 0.3
    if _CLICKBAIT_PHRASES.search(title):
        bait += 0.6
    if _EMOJI.search(title):
        bait += 0.6
    if re.search(r"(\.\.\.|…)\s*$", title):
        bait += 0.3
    stripped = title.rstrip()
    period = 1.0 if stripped.endswith(".") and not stripped.endswith("..") else 0.0
    # Run-on: more than one sentence (". Next"), or far past the length band.
    sentences = len(re.findall(r"[.!?;]\s+[A-Z0-9\"“]", stripped))
    run_on = 1.0 if sentences >= 1 or title_length(title) > 20 else 0.0
    # A keyword list, not a phrase: five or more words and not one function word; or a word said 3+ times.
    ws = [w.lower().strip("\"'“”‘’()[],:;!?.") for w in title.split()]
    counts = [ws.count(w) for w in set(ws) if w and w not in FUNCTION_WORDS]
    keywords = 1.0 if (len(ws) >= 5 and not FUNCTION_WORDS.intersection(ws)) or max(counts, default=0) >= 3 else 0.0
    meta = 1.0 if _META.search(title) else 0.0
    return {"shout": float(shout), "clickbait": float(min(1.0, bait)), "period": period, "run_on": run_on,
            "keywords": keywords, "meta": meta}


def minilm_formula(cosine: float, title: str, body: str) -> tuple[float, dict[str, float]]:
    """The MiniLM reward for one title, from its cosine to the body. Pure; documented in MiniLMScorer.

    >>> body = "Rust 1.80 was released today. It ships LazyCell and LazyLock, two types for lazy initialisation."
    >>> score, parts = minilm_formula(0.62, "Rust 1.80 ships LazyCell", body)
    >>> round(score, 4), parts["length"], parts["style"], parts["copy_factor"]
    (0.62, 1.0, 1.0, 1.0)
    >>> copied = "Rust 1.80 was released today. It ships LazyCell and LazyLock, two types for lazy initialisation"
    >>> score, parts = minilm_formula(0.9, copied, body)  # a 15-word body span of two sentences
    >>> round(score, 5), parts["length"], parts["style"], round(parts["copy_factor"], 2)  # 0.9 x 0.25 x 0.7 x 0.1
    (0.01575, 0.25, 0.7, 0.1)
    """
    n = title_length(title)
    length = 1.0 if LENGTH_BAND[0] <= n <= LENGTH_BAND[1] else OFF_BAND
    terms = style_terms(title)
    style = max(0.0, 1.0 - sum(STYLE_WEIGHTS[k] * v for k, v in terms.items()))
    copy = copy_fraction(title, body)
    copy_factor = 1.0 - COPY_PENALTY * min(1.0, max(0.0, (copy - COPY_FREE) / (1.0 - COPY_FREE)))
    relevance = min(1.0, max(0.0, cosine)) if body.strip() else 0.0
    score = relevance * length * style * copy_factor
    return score, {"relevance": relevance, "length": length, "style": style, "copy": copy,
                   "copy_factor": copy_factor, "words": float(n), **terms}


# --------------------------------------------------------------------------------------
# The scorers
# --------------------------------------------------------------------------------------


def serialize_story(title: str, by: str, time: str, url: str, body: str) -> str:
    """The text a sequence-classification reward model reads: tagged fields, title first.

    The title comes before the body so that truncating a long body never cuts the title.
    """
    date = str(time)[:10]
    return (
        f"<title>{title}</title>\n<submitter>{by}</submitter>\n<url>{url or ''}</url>\n"
        f"<date>{date}</date>\n<body>{body}</body>"
    )



class Scorer(Protocol):
    kind: str
    model: str
    version: str

    def score(self, stories: Sequence[dict]) -> list[tuple[float, dict[str, float]]]:
        """(score, components) per story, in order."""
        ...


class MiniLMScorer:
    """Offline default: score = relevance x length x style x copy_factor, in [0, 1].

    - relevance = clip(cosine(MiniLM(title), MiniLM(body)), 0, 1); 0 for an empty body
      (all-MiniLM-L6-v2, mean pooled, body truncated to 256 tokens).
    - length = 1 if 4 <= title_length(title) <= 14 else 0.25 (whitespace tokens with a letter or digit).
    - style = max(0, 1 - 0.5 shout - 0.5 clickbait - 0.15 period - 0.3 run_on - 0.5 keywords - 0.6 meta), each term in
      [0, 1] (see style_terms): shout = 1 if >= 60% of the (>= 3) words are ALL CAPS, else
      0.5 per long (>= 5 letters) all-caps word beyond the first (acronyms pass); clickbait = sum,
      capped at 1, of: doubled !/? (!!, ?!) 0.6 or a lone ! 0.3, a bait phrase ("you won't believe",
      "this one trick", ...) 0.6, emoji 0.6, a trailing ellipsis 0.3; period = 1 for a trailing ".";
      run_on = 1 for more than one sentence or > 20 words; keywords = 1 for a keyword list (>= 5
      words and no English function word such as of/in/the/is/after, or a content word used 3+ times);
      meta = 1 when the title describes the article instead of titling it ("The article discusses",
      "This post explains", "I'm an ...", "Here's ...").
    - copy_factor = 1 - 0.9 clip((copy - 0.5) / 0.5, 0, 1), copy = text_metrics.copy_fraction(title, body)
      (longest verbatim word run shared with the body / title words): a title that is a body span
      keeps at most 10% of its score. This and the length gate are what stopped a policy copying
      the first sentence (measured on SmolLM2-135M: without them, within ~25 GRPO steps 5 of 12
      greedy val titles were >= 80% verbatim body text).

    Deterministic (no sampling; eval mode). Body embeddings are cached (GRPO scores many titles
    per body), and bodies are deduplicated and length-sorted inside a batch.
    """

    kind = "minilm"
    version = "minilm-hn-v1"

    def __init__(self, path: str | None = None, batch_size: int = 64, cache_size: int = 4096):
        self.embedder = Embedder(path or None, cache_size=cache_size)
        self.model = self.embedder.path
        self.batch_size = batch_size

    def score(self, stories: Sequence[dict]) -> list[tuple[float, dict[str, float]]]:
        titles = [s["title"] for s in stories]
        bodies = [s["scraped_body"] for s in stories]
        vectors = self.embedder.encode(titles, batch_size=self.batch_size)
        cos = (vectors * self.embedder.encode_cached(bodies, batch_size=self.batch_size)).sum(-1).tolist()
        return [minilm_formula(c, t, b) for c, t, b in zip(cos, titles, bodies, strict=True)]


class HFScorer:
    """A sequence-classification reward model (num_labels=1) over serialize_story.

    Loaded once; optional PEFT adapter; batched forward passes under torch.inference_mode;
    stories truncated at min(rm_max_length, the model's limit) tokens (the title comes first
    in the serialization, so truncation only ever cuts the body). The score is the raw logit
    (the original RM regresses log HN score).
    """

    kind = "hf"
    version = "hf-seqcls-v1"

    def __init__(self, model: str, adapter: str = "", batch_size: int = 16, max_length: int = MAX_SEQ_TOKENS):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not model:
            raise ValueError("--scorer hf needs --rm_model (or REWARD_MODEL): a hub id or a local folder")
        self.model = model + (f"+{adapter}" if adapter else "")
        self.batch_size = batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(adapter if adapter and _has_tokenizer(adapter) else model)
        if self.tokenizer.pad_token is None:  # decoder-only RMs (Llama/Qwen) often ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        net, info = AutoModelForSequenceClassification.from_pretrained(
            model, num_labels=1, dtype=dtype, output_loading_info=True)
        if info.get("missing_keys") and not adapter:
            # A base LM loaded as a classifier gets a random head: its "scores" would be noise.
            raise ValueError(f"{model} has no trained classification head "
                             f"(missing {sorted(info['missing_keys'])[:4]}); "
                             "pass a trained reward model or an adapter that carries the head")
        if net.config.num_labels != 1:
            raise ValueError(f"{model}: num_labels={net.config.num_labels}, a reward model needs exactly 1")
        net.config.pad_token_id = self.tokenizer.pad_token_id
        if adapter:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, adapter)
        self.net = net.to(self.device).eval()
        limits = [max_length, getattr(net.config, "max_position_embeddings", None) or max_length]
        if self.tokenizer.model_max_length and self.tokenizer.model_max_length < 10**9:
            limits.append(self.tokenizer.model_max_length)
        self.max_length = min(limits)

    def score(self, stories: Sequence[dict]) -> list[tuple[float, dict[str, float]]]:
        import torch

        texts = [serialize_story(s["title"], s["by"], s["time"], s["url"], s["scraped_body"]) for s in stories]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch together
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for i in range(0, len(order), self.batch_size):
                idx = order[i:i + self.batch_size]
                enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.net(**enc).logits[:, 0].float().tolist()
                for j, v in zip(idx, logits, strict=True):
                    scores[j] = v
        return [(s, {"rm": s}) for s in scores]


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in ("tokenizer.json", "tokenizer_config.json"))
