"""Write candidate titles for one article with a base model + adapter and rank them by reward.

Each candidate (the greedy title and `n` sampled ones) goes through the recipe's validator
and the reward server under the shared reward rule, exactly as in training, and is printed
with its components: reward, reward-model score, supported by the body or not, words,
copied fraction and trailing text. Needs the reward server (`make reward`).

    python titles.py --article article.txt --adapter runs/trl-cpu-aligned/final
    cat article.txt | python titles.py --n 16 --json
    python titles.py --article article.txt --generator openai --openai_model gpt-4o-mini
    make titles ARTICLE=article.txt ARGS="--adapter runs/trl-cpu-aligned/final"
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from dataclasses import dataclass, field

import utils
from hntitles.engines import generation
from hntitles.engines.openai_generator import OpenAIGeneratorError
from hntitles.runs import settings


@dataclass
class TitlesArgs:
    article: str = field(default="", metadata={"help": "Text file with the article body ('' or '-' = stdin)."})
    adapter: str = field(default="", metadata={"help": "PEFT adapter folder (a checkpoint); empty = the base model."})
    n: int = field(default=8, metadata={"help": "Sampled candidates (at the recipe's temperature)."})
    greedy: bool = field(default=True, metadata={"help": "Also write the greedy title (--no_greedy to skip)."})
    generator: str = field(default="hf", metadata={
        "help": "'hf' (recipe model + adapter) or 'openai' (OpenAI-compatible endpoint)."})
    openai_model: str = field(default="", metadata={"help": "Model for --generator openai (default: OPENAI_MODEL)."})
    openai_base_url: str = field(default="", metadata={
        "help": "Endpoint for --generator openai (default: OPENAI_BASE_URL)."})
    by: str = field(default="anonymous", metadata={"help": "Submitter the reward model sees."})
    url: str = field(default="", metadata={"help": "Article URL the reward model sees."})
    time: str = field(default="", metadata={"help": "Submission time (ISO 8601) the reward model sees; default now."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object per candidate instead of a table."})


def read_article(path: str) -> str:
    if path in ("", "-"):
        if sys.stdin is None or sys.stdin.isatty():
            raise SystemExit("error: pass --article FILE (make titles ARTICLE=file) or pipe the article on stdin")
        body, where = sys.stdin.read(), "stdin"
    else:
        try:
            with open(path, encoding="utf-8") as f:
                body = f.read()
        except FileNotFoundError:
            raise SystemExit(f"error: article file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read article {path}: {e}") from None
        where = path
    if not body.strip():
        raise SystemExit(f"error: the article ({where}) is empty")
    return body.strip()


def make_generator(recipe: settings.Recipe, args: TitlesArgs):
    """(generator, model, tokenizer): the model is loaded only when something needs it."""
    from hntitles.engines import policy

    if args.generator == "openai":
        from hntitles.engines.openai_generator import OpenAIGenerator

        if args.adapter:
            raise SystemExit("error: --adapter applies to --generator hf only")
        try:
            gen = OpenAIGenerator(args.openai_model or None, args.openai_base_url or None, progress=False)
        except OpenAIGeneratorError as e:
            raise SystemExit(f"error: {e}") from None
        model, tokenizer = policy.load_model(recipe.model) if recipe.validator == "model" else (None, None)
        return gen, model, tokenizer
    if args.generator != "hf":
        raise SystemExit(f"error: unknown --generator {args.generator!r} (use hf or openai)")
    try:
        model, tokenizer = policy.load_model(recipe.model, args.adapter)
    except OSError as e:  # no such folder / hub id unreachable offline
        raise SystemExit(f"error: cannot load model {recipe.model}: {' '.join(str(e).split())[:300]}") from None
    return generation.HFGenerator(model, tokenizer, progress=False), model, tokenizer


def check_length(tokenizer, body: str, limit: int) -> None:
    n = utils.prompt_token_counts(tokenizer, [body])[0]
    if n > limit:
        raise SystemExit(f"error: the prompt is {n} tokens, over the recipe's max_prompt_tokens={limit} "
                         "(training dropped such articles); shorten the article")


def generate(generator, body: str, args: TitlesArgs, recipe: settings.Recipe) -> list[tuple[str, str]]:
    """(completion, source) pairs: the greedy one first, then the samples."""
    conv = [utils.title_messages(body)]
    out = []
    kw = {"max_tokens": recipe.max_completion_tokens, "stop": utils.stop_strings(recipe)}
    if args.greedy:
        out += [(c, "greedy") for c in generator.generate(conv, n=1, temperature=0.0, **kw)[0]]
    if args.n > 0:
        out += [(c, "sampled") for c in generator.generate(conv, n=args.n, temperature=recipe.temperature, **kw)[0]]
    return out


def score(recipe: settings.Recipe, validator, story: dict, completions: list[tuple[str, str]]) -> list[dict]:
    """Score each distinct (title, trailing) once; rank by reward, then RM score."""
    groups: dict[tuple[str, bool], dict] = {}
    for text, source in completions:
        key = utils.extract_title(text)
        g = groups.setdefault(key, {"completion": text, "sources": []})
        g["sources"].append(source)
    client = utils.RewardClient(recipe.reward_url, timeout=recipe.reward_timeout, retries=recipe.reward_retries)

    async def run():
        try:
            return await utils.score_completions(client, validator, [story] * len(groups),
                                                 [g["completion"] for g in groups.values()], recipe.trailing_penalty)
        finally:
            await client.aclose()

    scored = asyncio.run(run())
    rows = [{"title": s.title, "reward": s.reward, "rm": s.rm, "matches": s.matches, "words": s.length,
             "copy": s.copy, "trailing": s.trailing, "count": len(g["sources"]), "greedy": "greedy" in g["sources"],
             "completion": g["completion"]}
            for s, g in zip(scored, groups.values(), strict=True)]
    return sorted(rows, key=lambda r: (-r["reward"], -r["rm"]))


def render(ranked: list[dict]) -> str:
    lines = [f"{'#':>2}  {'reward':>7}  {'rm':>7}  {'match':>5}  {'words':>5}  {'copy':>4}  {'trail':>5}  title"]
    for i, r in enumerate(ranked, 1):
        tags = [t for t in ("greedy" if r["greedy"] else "", f"x{r['count']}" if r["count"] > 1 else "") if t]
        lines.append(f"{i:>2}  {r['reward']:>7.3f}  {r['rm']:>7.3f}  {'yes' if r['matches'] else 'no':>5}  "
                     f"{r['words']:>5}  {r['copy']:>4.2f}  {'yes' if r['trailing'] else 'no':>5}  "
                     f"{r['title'] or '(empty)'}{'  (' + ', '.join(tags) + ')' if tags else ''}")
    return "\n".join(lines)


def main(recipe: settings.Recipe, args: TitlesArgs) -> list[dict]:
    from hntitles.engines import policy

    body = read_article(args.article)
    if args.time:
        try:
            dt.datetime.fromisoformat(args.time.replace("Z", "+00:00"))
        except ValueError:
            raise SystemExit(f"error: --time {args.time!r} is not ISO 8601 (e.g. 2024-05-01T12:00:00Z)") from None
    settings.set_seed(recipe.seed)
    try:  # fail before loading a model when the server is down
        utils.RewardClient(recipe.reward_url, timeout=recipe.reward_timeout).health_sync()
    except utils.RewardServerError as e:
        raise SystemExit(f"error: {e}") from None
    generator, model, tokenizer = make_generator(recipe, args)
    if tokenizer is not None and args.generator == "hf":
        check_length(tokenizer, body, recipe.max_prompt_tokens)
    story = {"title": "", "by": args.by, "url": args.url, "scraped_body": body,
             "time": args.time or dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")}
    try:
        completions = generate(generator, body, args, recipe)
        validator = policy.make_validator(recipe, model, tokenizer)
        ranked = score(recipe, validator, story, completions)
    except (utils.RewardServerError, OpenAIGeneratorError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        for r in ranked:
            print(json.dumps(r, ensure_ascii=False))
    else:
        source = (generator.name if args.generator == "openai"
                  else recipe.model + (f" + {args.adapter}" if args.adapter else ""))
        print(f"{len(completions)} candidates from {source}; validator {recipe.validator}; "
              f"reward server {recipe.reward_url}\n")
        print(render(ranked))
    return ranked


if __name__ == "__main__":
    recipe_, args_ = settings.parse_args((settings.Recipe, TitlesArgs), "titles", description=__doc__.splitlines()[0])
    main(recipe_, args_)
