"""The core both trainers share to make a step. Nothing here trains or loads a model at import time.

- prompts: `title_messages` (the article first, the request last), `validator_messages`,
  `parse_validator_answer`, `extract_title` (a completion's first non-empty line, cleaned), `stop_strings`;
- data: `load_stories` (hub id, .jsonl/.parquet file or saved folder), `check_row`, `filter_stories` /
  `FilterReport` (the original example's filters, each counted), `load_split`, `DatasetError`;
- the reward client: `RewardClient` (async, batched, bounded retries on transport errors and 5xx, never on
  4xx), `RewardServerError` (a failure never becomes a reward), `story_for_scoring`;
- validators: `EmbeddingValidator` (cosine of title and body) and `LLMValidator` (the base model answers
  True/False), behind one call: `validator(bodies, titles) -> list[bool]`;
- the reward rule: `combine_reward` (RM score if the title is supported by the body, else 0),
  `score_completions` (completions -> titles -> validator + reward server -> `Scored`);
- the metrics schema: `metrics_row` / `METRICS_KEYS` (one JSONL row for both trainers and evaluation).

    python -c "import utils; print(utils.extract_title('Rust 2.0 ships\\nMore text'))"
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hntitles.analysis import stats
from hntitles.reward.embeddings import Embedder
from hntitles.reward.text_metrics import copy_fraction, has_text, word_count

if TYPE_CHECKING:
    from hntitles.engines import generation
from hntitles.runs.settings import DEFAULT_REWARD_URL, MAX_PROMPT_TOKENS, Recipe, hub_errors

STORY_FIELDS = ("id", "title", "by", "time", "url", "score", "scraped_body")
METRICS_SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------
# Prompts: the title and validator prompts, completion -> title
# --------------------------------------------------------------------------------------


TITLE_SYSTEM_PROMPT = (
    "You are an expert at writing engaging Hacker News titles. Given the text of an article, "
    "write one title that would make readers click while staying accurate. "
    "Reply with the title only: no quotes, no explanation."
)


VALIDATOR_SYSTEM_PROMPT = (
    "You check titles against articles. Given an article and a proposed title, decide whether "
    "every claim the title makes is supported by the article. Answer with one word: True or False."
)


# Repeated after the article: a small model reads a long user turn as text to continue, not as
# a request. On SmolLM2-135M (12 val stories, greedy + 4 samples at T=1, cut at the first line) it
# raised the untrained greedy reward from 0.05 to 0.23 and titles of <= 14 words from 38% to 62%.
TITLE_INSTRUCTION = "Write a Hacker News title for the article above, at most 12 words. Reply with the title only."


def title_messages(body: str) -> list[dict[str, str]]:
    """Chat messages asking for a title for `body`: the article first, the request last."""
    return [
        {"role": "system", "content": TITLE_SYSTEM_PROMPT},
        {"role": "user", "content": f"{body}\n\n{TITLE_INSTRUCTION}"},
    ]


def validator_messages(body: str, title: str) -> list[dict[str, str]]:
    """Chat messages asking whether `title` is supported by `body` (answer True/False)."""
    return [
        {"role": "system", "content": VALIDATOR_SYSTEM_PROMPT},
        {"role": "user", "content": f"<article>\n{body}\n</article>\n\n<title>{title}</title>\n\n"
                                    "Is the title supported? True or False:"},
    ]


def parse_validator_answer(text: str) -> bool | None:
    """True/False from a validator reply; None when it said neither (counted, treated as False).

    >>> parse_validator_answer(" True."), parse_validator_answer("false"), parse_validator_answer("maybe")
    (True, False, None)
    """
    match = re.search(r"\b(true|false)\b", text.strip().lower())
    return None if match is None else match.group(1) == "true"


_TITLE_PREFIX = re.compile(r"^\s*(?:#+\s*|\*\*|title\s*:\s*|hn title\s*:\s*)+", re.IGNORECASE)

_QUOTES = "\"'“”‘’`*"


def _unquote(text: str) -> str:
    """Drop quotes/markdown wrapped around the whole title; keep quotes that belong inside it."""
    prev = None
    while text != prev:
        prev, text = text, text.strip().strip("*`").strip()  # markdown marks are never part of a title
        # '"Rust" vs "Go"' keeps its quotes: the same mark inside means they are not a wrapper.
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES and (
                text[0] not in text[1:-1] or text[0] in "'‘’"):
            text = text[1:-1]
    # A completion cut at the token cap can leave an opening quote without its partner.
    if text and text[0] in _QUOTES and text.count(text[0]) == 1:
        text = text[1:].strip()
    return text


def extract_title(completion: str) -> tuple[str, bool]:
    """The title is the first non-empty line, cleaned; the flag says more text followed it.

    We decide this explicitly because small models often keep writing after the title;
    what follows is not part of the title (recipes may penalise it via trailing_penalty).

    >>> extract_title('"Rust 1.80 ships LazyCell"\\n\\nThis title...')
    ('Rust 1.80 ships LazyCell', True)
    >>> extract_title("Title: A faster grep\\n")
    ('A faster grep', False)
    >>> extract_title('Why I stopped saying "agile"')
    ('Why I stopped saying "agile"', False)
    """
    lines = completion.strip().splitlines()
    if not lines:
        return "", False
    title = _unquote(_TITLE_PREFIX.sub("", lines[0]))
    trailing = any(line.strip() for line in lines[1:])
    return (title if has_text(title) else ""), trailing


# --------------------------------------------------------------------------------------
# Data: a hub id or a local file/folder, checked rows, the original filters
# --------------------------------------------------------------------------------------


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file, row and field."""


def _iso(value: Any) -> str:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def check_row(row: dict, where: str) -> dict:
    """Validate one story's fields and normalise `time` to ISO 8601; raise naming the field."""
    for name in STORY_FIELDS:
        if name not in row:
            raise DatasetError(f"{where}: field '{name}' is missing")
    expected = {"title": str, "by": str, "scraped_body": (str, type(None)), "url": (str, type(None))}
    for name, kinds in expected.items():
        if not isinstance(row[name], kinds):
            raise DatasetError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")
    if isinstance(row["score"], bool) or not isinstance(row["score"], (int, float)):
        raise DatasetError(f"{where}: field 'score' must be a number, got {row['score']!r}")
    time_value = _iso(row["time"])
    try:
        dt.datetime.fromisoformat(time_value.replace("Z", "+00:00"))
    except ValueError:
        raise DatasetError(f"{where}: field 'time' is not ISO 8601: {row['time']!r}") from None
    return {**row, "time": time_value, "scraped_body": row["scraped_body"] or "", "url": row["url"] or ""}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}: line {lineno}: expected a JSON object")
            rows.append(check_row(row, f"{path}: line {lineno} (id {row.get('id', '?')})"))
    return rows


def _split_rows(rows: list[dict], split: str, source: str) -> list[dict]:
    if not rows:
        raise DatasetError(f"{source}: no stories in the file")
    if "split" in rows[0]:
        picked = [r for r in rows if r.get("split") == split]
        if not picked:
            found = sorted({str(r.get("split")) for r in rows})
            raise DatasetError(f"{source}: no rows with split '{split}' (found: {found})")
        return picked
    return rows


def load_stories(source: str, split: str):
    """Load one split as a `datasets.Dataset` with the OpenPipe fields, `time` as ISO text.

    `source` is a hub id (needs network), a .jsonl/.json file (a `split` column selects
    rows), a .parquet file, a folder holding `<split>.jsonl` or `<split>.parquet`, or a
    folder written by `Dataset(Dict).save_to_disk`.
    """
    import datasets

    path = Path(source)
    if path.is_dir():
        return _load_folder(path, split)
    if path.suffix in (".jsonl", ".json"):
        if not path.exists():
            raise DatasetError(f"{path}: file not found")
        rows = _split_rows(_read_jsonl(path), split, str(path))
        return datasets.Dataset.from_list(rows)
    if path.suffix == ".parquet":
        return _load_parquet(path, split)
    if path.exists() or source.startswith((".", "/")):
        raise DatasetError(f"{source}: unsupported dataset file (use .jsonl, .parquet or a folder)")
    with hub_errors(source, "dataset"):
        ds = datasets.load_dataset(source, split=split)
    return _checked(ds, source)


def _load_folder(path: Path, split: str):
    """A folder holding <split>.jsonl/.json/.parquet, or one written by save_to_disk."""
    import datasets

    for ext in ("jsonl", "json", "parquet"):
        if (path / f"{split}.{ext}").exists():
            return load_stories(str(path / f"{split}.{ext}"), split)
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not a saved dataset and no {split}.jsonl/.parquet inside") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(f"{path}: no split '{split}' (has {list(ds)})")
        ds = ds[split]
    return _checked(ds, str(path))


def _load_parquet(path: Path, split: str):
    """A .parquet file; a `split` column selects rows, as for .jsonl."""
    import datasets

    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    ds = datasets.Dataset.from_parquet(str(path))
    if "split" in ds.column_names:
        found = sorted(str(s) for s in ds.unique("split"))
        if split not in found:  # as for .jsonl: an absent split is an error, not an empty dataset
            raise DatasetError(f"{path}: no rows with split '{split}' (found: {found})")
        ds = ds.filter(lambda r: r["split"] == split)
    return _checked(ds, str(path))


def _checked(ds, source: str):
    missing = [name for name in STORY_FIELDS if name not in ds.column_names]
    if missing:
        raise DatasetError(f"{source}: field(s) {missing} missing (columns: {ds.column_names})")
    rows = [check_row(row, f"{source}: row {i} (id {row.get('id', '?')})") for i, row in enumerate(ds)]
    if not rows:  # from_list([]) would also drop the columns the filters need
        raise DatasetError(f"{source}: no stories")
    import datasets

    return datasets.Dataset.from_list(rows)


@dataclass
class FilterReport:
    """What the filters did to one split: counts in, dropped per reason, out."""

    split: str
    rows_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rows_out: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    # Prompt tokens of every row the length filter measured (kept or not), for reports.
    measured_tokens: list[int] = field(default_factory=list)

    def summary(self) -> str:
        drops = ", ".join(f"{k}: {v}" for k, v in self.dropped.items()) or "none"
        return f"{self.split}: {self.rows_in} rows -> {self.rows_out} kept (dropped {drops})"


def prompt_token_counts(tokenizer, bodies: Sequence[str], batch_size: int = 64) -> list[int]:
    """Length of each title prompt in tokens, chat template included, in batches."""
    from tqdm.auto import tqdm

    counts: list[int] = []
    # The hub dataset has many thousand long articles: show progress there, not for the shipped 80.
    for i in tqdm(range(0, len(bodies), batch_size), desc="measuring prompts", unit="batch",
                  disable=len(bodies) <= 2048, leave=False):
        convs = [title_messages(b) for b in bodies[i:i + batch_size]]
        texts = tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(texts, add_special_tokens=False)
        counts.extend(len(ids) for ids in enc["input_ids"])
    return counts


def filter_stories(ds, tokenizer, split: str, min_score: int = 20,
                   max_prompt_tokens: int = MAX_PROMPT_TOKENS):
    """The original example's filters, each counted: score, empty body, prompt length; and an
    empty title (one with no visible character, e.g. NUL), which the reward server refuses."""
    report = FilterReport(split=split, rows_in=len(ds))
    keep_score = [i for i, s in enumerate(ds["score"]) if s >= min_score]
    report.dropped[f"score < {min_score}"] = len(ds) - len(keep_score)
    ds = ds.select(keep_score)
    keep_body = [i for i, b in enumerate(ds["scraped_body"]) if has_text(b)]
    report.dropped["empty body"] = len(ds) - len(keep_body)
    ds = ds.select(keep_body)
    keep_title = [i for i, t in enumerate(ds["title"]) if has_text(t)]
    report.dropped["empty title"] = len(ds) - len(keep_title)
    ds = ds.select(keep_title)
    counts = prompt_token_counts(tokenizer, ds["scraped_body"]) if len(ds) else []
    report.measured_tokens = counts
    keep_len = [i for i, n in enumerate(counts) if n <= max_prompt_tokens]
    report.dropped[f"prompt > {max_prompt_tokens} tokens"] = len(ds) - len(keep_len)
    ds = ds.select(keep_len)
    report.prompt_tokens = [counts[i] for i in keep_len]
    ds = ds.add_column("prompt_tokens", report.prompt_tokens)
    report.rows_out = len(ds)
    return ds, report


def load_split(recipe: Recipe, split: str, tokenizer, limit: int | None = None):
    """Load, filter and cap one split; add the conversational `prompt` column TRL expects."""
    ds, report = filter_stories(load_stories(recipe.dataset, split), tokenizer, split,
                                recipe.min_score, recipe.max_prompt_tokens)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    ds = ds.map(lambda row: {"prompt": title_messages(row["scraped_body"])})
    return ds, report


# --------------------------------------------------------------------------------------
# Reward client: the /score request shape and the async client (failures never become rewards)
# --------------------------------------------------------------------------------------


def story_for_scoring(title: str, row: dict) -> dict:
    """OpenPipe's request shape for /score: the candidate title with the row's metadata."""
    return {"title": title, "by": row.get("by", ""), "time": _iso(row.get("time", "")),
            "scraped_body": row["scraped_body"], "url": row.get("url") or ""}


class RewardServerError(RuntimeError):
    """The reward server could not give a score. Never turned into a reward."""


class RewardClient:
    """Async client for local_reward.py: batched, one pooled connection, bounded retries.

    Connection errors, timeouts and 5xx are retried with exponential backoff up to
    `retries` times; 4xx and malformed replies are not (retrying cannot fix them). Past
    that it raises RewardServerError: a missing score must fail the step, not become 0.0.
    """

    def __init__(self, url: str = DEFAULT_REWARD_URL, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, batch_size: int = 64):
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("REWARD_API_KEY") or None
        self.timeout, self.retries, self.backoff, self.batch_size = timeout, retries, backoff, batch_size
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self._clients: dict[int, Any] = {}  # one httpx client per event loop (TRL runs its own)

    def _client(self):
        import httpx

        loop_id = id(asyncio.get_running_loop())
        if loop_id not in self._clients:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._clients[loop_id] = httpx.AsyncClient(
                base_url=self.url, timeout=self.timeout, headers=headers,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        return self._clients[loop_id]

    async def _post(self, path: str, payload: dict) -> dict:
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            self.stats["requests"] += 1
            try:
                resp = await self._client().post(path, json=payload)
            except httpx.TransportError as e:  # connect/read errors and timeouts
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                self.stats["failures"] += 1
                raise RewardServerError(f"{self.url}{path} rejected the request: HTTP {resp.status_code}: "
                                        f"{resp.text[:300]}")
            try:
                return resp.json()
            except ValueError:
                self.stats["failures"] += 1
                raise RewardServerError(f"{self.url}{path} replied with non-JSON: {resp.text[:200]!r}") from None
        self.stats["failures"] += 1
        raise RewardServerError(f"{self.url}{path} failed after {self.retries + 1} attempts: {last}")

    async def score(self, stories: Sequence[dict]) -> list[float]:
        """Scores for `stories` (OpenPipe shape), in order, via POST /score_batch."""
        out: list[float] = []
        for i in range(0, len(stories), self.batch_size):
            chunk = list(stories[i:i + self.batch_size])
            reply = await self._post("/score_batch", {"stories": chunk})
            scores = reply.get("scores") if isinstance(reply, dict) else None
            if not isinstance(scores, list) or len(scores) != len(chunk):
                self.stats["failures"] += 1
                raise RewardServerError(f"bad /score_batch reply for {len(chunk)} stories: {str(reply)[:200]}")
            out.extend(self._score(s) for s in scores)
        return out

    async def score_one(self, story: dict) -> float:
        """One story via POST /score (the original example's route)."""
        reply = await self._post("/score", story)
        return self._score(reply.get("score") if isinstance(reply, dict) else None)

    def _score(self, value: Any) -> float:
        """A score from the server's reply, or RewardServerError (counted like every other failed request):
        a bad reply never becomes a reward."""
        if not stats.is_finite_number(value):
            self.stats["failures"] += 1
            raise RewardServerError(f"reward server returned a non-numeric score: {value!r}")
        return float(value)

    async def health(self) -> dict:
        import httpx

        try:
            resp = await self._client().get("/health")
        except httpx.TransportError as e:
            raise RewardServerError(f"reward server at {self.url} is unreachable ({type(e).__name__}); "
                                    "start it with `make reward`") from None
        if resp.status_code != 200:
            raise RewardServerError(f"{self.url}/health: HTTP {resp.status_code}")
        return resp.json()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    def score_sync(self, stories: Sequence[dict]) -> list[float]:
        """Blocking convenience wrappers (scripts and tests), each on its own event loop."""
        return asyncio.run(self._closing(self.score(stories)))

    def health_sync(self) -> dict:
        return asyncio.run(self._closing(self.health()))

    async def _closing(self, call):
        try:
            return await call
        finally:
            await self.aclose()


# --------------------------------------------------------------------------------------
# Validators: is a title supported by its body?
# --------------------------------------------------------------------------------------


class EmbeddingValidator:
    """CPU stand-in for the LLM validator: supported iff cosine(title, body) >= threshold."""

    def __init__(self, threshold: float = 0.25, embedder: Embedder | None = None):
        self.threshold = threshold
        self.embedder = embedder or Embedder()

    def __call__(self, bodies: Sequence[str], titles: Sequence[str]) -> list[bool]:
        if not titles:
            return []
        sims = (self.embedder.encode(titles) * self.embedder.encode_cached(bodies)).sum(-1).tolist()
        return [bool(t.strip()) and s >= self.threshold for t, s in zip(titles, sims, strict=True)]


class LLMValidator:
    """The original validator: the base model answers True/False to VALIDATOR_SYSTEM_PROMPT, greedily.

    `generator` is any Generator (a local model, or the trainer's inference server serving the
    base model); `base` is a context manager factory that makes it the base model while it
    answers (a PEFT model's `disable_adapter`), or None when the generator already is the base.
    """

    def __init__(self, generator: generation.Generator, base=None):
        self.generator, self.base = generator, base
        self.unparsed = 0  # answers that were neither True nor False (counted, treated as not supported)

    def __call__(self, bodies: Sequence[str], titles: Sequence[str]) -> list[bool]:
        convs = [validator_messages(b, t) for b, t in zip(bodies, titles, strict=True)]
        with self.base() if self.base is not None else contextlib.nullcontext():
            answers = [a[0] for a in self.generator.generate(convs, n=1, temperature=0.0, max_tokens=3)]
        parsed = [parse_validator_answer(a) for a in answers]
        self.unparsed += sum(p is None for p in parsed)
        return [bool(p) for p in parsed]


# --------------------------------------------------------------------------------------
# The reward rule, and what ends a title
# --------------------------------------------------------------------------------------


def combine_reward(rm: float, matches: bool, trailing: bool = False, trailing_penalty: float = 0.0) -> float:
    """The shared reward rule: RM score if the title is supported by the body, else 0.

    >>> combine_reward(2.5, True), combine_reward(2.5, False), combine_reward(1.0, True, True, 0.25)
    (2.5, 0.0, 0.75)
    """
    return (rm if matches else 0.0) - (trailing_penalty if trailing else 0.0)


@dataclass
class Scored:
    """One scored title: what the reward rule saw and gave."""

    title: str
    rm: float
    matches: bool
    trailing: bool
    reward: float
    copy: float = 0.0

    @property
    def length(self) -> int:
        return word_count(self.title)


async def score_completions(client: RewardClient, validator, rows: Sequence[dict], completions: Sequence[str],
                            trailing_penalty: float = 0.0) -> list[Scored]:
    """Completions -> titles -> validator + reward model -> the shared reward rule.

    `rows[i]` is the story `completions[i]` was written for. `validator(bodies, titles)`
    returns one bool per title (None means no validator: every title counts as supported).
    Reward-server failures propagate as RewardServerError; they never become a score.
    """
    pairs = [extract_title(c) for c in completions]
    titles = [t for t, _ in pairs]
    bodies = [r["scraped_body"] for r in rows]
    matches = validator(bodies, titles) if validator is not None else [bool(t) for t in titles]
    # An empty title is nothing the RM can judge; it gets 0 by the rule, no request needed.
    ask = [i for i, t in enumerate(titles) if t]
    rm_scores = [0.0] * len(titles)
    for i, s in zip(ask, await client.score([story_for_scoring(titles[i], rows[i]) for i in ask]), strict=True):
        rm_scores[i] = s
    return [Scored(title=t, rm=rm, matches=bool(m and t), trailing=tr,
                   reward=combine_reward(rm, bool(m and t), tr, trailing_penalty), copy=copy_fraction(t, b))
            for (t, tr), rm, m, b in zip(pairs, rm_scores, matches, bodies, strict=True)]


STOP_AT_NEWLINE = ("\n",)  # the stop strings of recipe.stop_at_newline


def stop_strings(recipe: Recipe) -> tuple[str, ...]:
    """What ends a completion besides EOS and the token cap, per the recipe."""
    return STOP_AT_NEWLINE if recipe.stop_at_newline else ()


# --------------------------------------------------------------------------------------
# Metrics: the one JSONL row schema both trainers and evaluation write
# --------------------------------------------------------------------------------------


def metrics_row(*, method: str, step: int, split: str, scored: Sequence[Scored], wall_time: float,
                run: str = "", extra: dict | None = None) -> dict:
    """One row of the shared schema. Both trainers and evaluation write exactly these keys."""
    r = stats.describe(s.reward for s in scored)
    n = max(len(scored), 1)
    return {
        "schema": METRICS_SCHEMA_VERSION,
        "method": method,
        "run": run,
        "step": int(step),
        "split": split,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_time": round(float(wall_time), 3),
        "n": r["n"],
        "reward_mean": r["mean"], "reward_std": r["std"], "reward_p5": r["p5"],
        "reward_median": r["median"], "reward_p95": r["p95"],
        "rm_mean": stats.describe(s.rm for s in scored)["mean"],
        "match_rate": sum(s.matches for s in scored) / n,
        "title_len_mean": sum(s.length for s in scored) / n,
        "copy_frac_mean": sum(s.copy for s in scored) / n,
        "trailing_rate": sum(s.trailing for s in scored) / n,
        "extra": extra or {},
    }


# The keys metrics_row writes, in order (tests/test_reward_client.py checks a real row against it).
METRICS_KEYS = ("schema", "method", "run", "step", "split", "time", "wall_time", "n", "reward_mean", "reward_std",
                "reward_p5", "reward_median", "reward_p95", "rm_mean", "match_rate", "title_len_mean",
                "copy_frac_mean", "trailing_rate", "extra")
