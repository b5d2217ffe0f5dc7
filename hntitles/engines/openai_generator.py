"""Title generator over any OpenAI-compatible chat endpoint (vLLM, a hosted API, `transformers serve`).

A baseline beside the trainers: a prompted (often larger) model gets the same prompts
(utils.title_messages) and goes through the same validator, reward server and reward rule
via `evaluate.py --generator openai`. Credentials come from the environment or `.env`:

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1   # vLLM: `vllm serve Qwen/Qwen2.5-7B-Instruct`
    OPENAI_API_KEY=EMPTY                       # any non-empty value for a server without auth
    OPENAI_MODEL=Qwen/Qwen2.5-7B-Instruct

    python -m hntitles.engines.openai_generator --article data/article.txt --n 3     # smoke check: prints titles
    python evaluate.py --generator openai --openai_model gpt-4o-mini --run_name prompted-gpt-4o-mini
    python titles.py --generator openai --article data/article.txt
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import utils
from hntitles.runs import settings

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAIGeneratorError(RuntimeError):
    """The endpoint could not produce completions; the message is one line meant for a user."""


def _one_line(text: object, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


class OpenAIGenerator:
    """utils.Generator over POST {base_url}/chat/completions with the `openai` client.

    `n` completions per conversation come from the endpoint's `n` parameter; servers that
    return fewer choices (some ignore `n`) are asked again for the rest. Temperature 0
    is greedy. Transport errors, 408/409/429 and 5xx are retried by the client itself
    (`max_retries`, exponential backoff); anything else fails at once, with a one-line
    OpenAIGeneratorError (a failed request never becomes an empty title).
    """

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 max_retries: int = 2, timeout: float = 60.0, concurrency: int = 4, progress: bool = True,
                 seed: int | None = None):
        import openai

        self.model = model or os.environ.get("OPENAI_MODEL", "")
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        if not self.model:
            raise OpenAIGeneratorError("no model for the OpenAI-compatible endpoint: pass --openai_model or set "
                                       "OPENAI_MODEL in .env")
        if not key:
            raise OpenAIGeneratorError(
                f"OPENAI_API_KEY is not set (needed for {self.base_url}): put it in .env "
                "(any non-empty value such as EMPTY for a local server without auth)")
        self.name = f"openai:{self.model}"
        self.max_retries, self.concurrency, self.progress = max_retries, max(1, concurrency), progress
        self.seed = seed  # conversation i of a generate() call is sampled with seed + i (the API's `seed`)
        self.client = openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=timeout)
        self._token_param = "max_tokens"  # switched once if the endpoint only accepts max_completion_tokens
        self._lock = threading.Lock()
        self.usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "empty": 0, "seconds": 0.0}

    # -- one conversation ---------------------------------------------------------------

    def _create(self, messages: list[dict], n: int, temperature: float, max_tokens: int, stop: Sequence[str] = (),
                seed: int | None = None):
        import openai

        param = self._token_param  # read once: another thread may switch it meanwhile
        kwargs = {"model": self.model, "messages": messages, "n": n, "temperature": temperature, param: max_tokens}
        if stop:
            kwargs["stop"] = list(stop)
        if seed is not None:
            kwargs["seed"] = seed
        try:
            return self.client.chat.completions.create(**kwargs)
        except openai.BadRequestError as e:
            # Newer hosted models reject max_tokens in favour of max_completion_tokens; vLLM takes both.
            if param == "max_tokens" and "max_completion_tokens" in str(e.message):
                self._token_param = "max_completion_tokens"
                return self._create(messages, n, temperature, max_tokens, stop, seed)
            raise self._error(e) from None
        except openai.OpenAIError as e:
            raise self._error(e) from None

    def _error(self, e: Exception) -> OpenAIGeneratorError:
        import openai

        where = f"OpenAI-compatible endpoint {self.base_url}"
        if isinstance(e, openai.APITimeoutError):
            return OpenAIGeneratorError(f"{where} timed out after {self.max_retries + 1} attempts")
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e
            return OpenAIGeneratorError(
                f"cannot reach {where} after {self.max_retries + 1} attempts ({type(cause).__name__}: "
                f"{_one_line(cause, 120)}); check OPENAI_BASE_URL and that the server is running")
        if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return OpenAIGeneratorError(f"{where} rejected the API key (HTTP {e.status_code}); check OPENAI_API_KEY: "
                                        f"{_one_line(e.message)}")
        if isinstance(e, openai.NotFoundError):
            return OpenAIGeneratorError(f"{where}: HTTP 404 for model '{self.model}' (check OPENAI_MODEL / "
                                        f"--openai_model and the base URL's /v1): {_one_line(e.message)}")
        if isinstance(e, openai.APIStatusError):
            return OpenAIGeneratorError(f"{where}: HTTP {e.status_code}: {_one_line(e.message)}")
        return OpenAIGeneratorError(f"{where}: {type(e).__name__}: {_one_line(e)}")

    def _complete(self, messages: list[dict], n: int, temperature: float, max_tokens: int,
                  stop: Sequence[str] = (), seed: int | None = None) -> list[str]:
        out: list[str] = []
        # At most n requests: each must return at least one choice or we stop with an error.
        for attempt in range(n):
            again = None if seed is None else seed + 1_000_003 * attempt  # the rest: other draws
            resp = self._create(messages, n - len(out), temperature, max_tokens, stop, again)
            choices = sorted(resp.choices or [], key=lambda c: c.index)
            texts = [(c.message.content or "") if c.message else "" for c in choices][:n - len(out)]
            with self._lock:
                self.usage["requests"] += 1
                self.usage["empty"] += sum(not t for t in texts)
                if resp.usage is not None:
                    self.usage["prompt_tokens"] += resp.usage.prompt_tokens or 0
                    self.usage["completion_tokens"] += resp.usage.completion_tokens or 0
            if not texts:
                raise OpenAIGeneratorError(f"OpenAI-compatible endpoint {self.base_url} returned no choices for model "
                                           f"'{self.model}'")
            out.extend(texts)
            if len(out) >= n:
                break
        return out

    # -- utils.Generator ----------------------------------------------------------------

    def generate(self, conversations: Sequence[list[dict]], n: int, temperature: float,
                 max_tokens: int, stop: Sequence[str] = ()) -> list[list[str]]:
        """`n` completions per conversation, in order; temperature 0 means greedy; `stop` is the
        API's stop list (the endpoint drops the stop string from the text)."""
        from tqdm.auto import tqdm

        if n <= 0:
            return [[] for _ in conversations]
        greedy = temperature <= 0
        results: list[list[str] | None] = [None] * len(conversations)
        t0 = time.perf_counter()
        # Sync client in threads: evaluate_generator calls generate() from inside an event loop.
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = {pool.submit(self._complete, list(c), n, 0.0 if greedy else temperature, max_tokens, stop,
                                   None if self.seed is None else self.seed + i): i
                       for i, c in enumerate(conversations)}
            bar = tqdm(total=len(futures), desc=f"{self.name} n={n}{' greedy' if greedy else ''}",
                       disable=not self.progress, leave=False)
            for future in as_completed(futures):
                results[futures[future]] = future.result()  # the first error stops the rest
                bar.update()
            bar.close()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.usage["seconds"] += time.perf_counter() - t0  # wall clock: requests overlap
        return [r or [] for r in results]

    def usage_summary(self) -> dict:
        """Token counts and completion tokens per wall-clock second so far (for metrics extras)."""
        u = dict(self.usage)
        u["completion_tokens_per_s"] = u["completion_tokens"] / u["seconds"] if u["seconds"] else None
        return u


@dataclass
class OpenAIArgs:
    article: str = field(default="", metadata={"help": "Text file with the article body ('' or '-' = stdin)."})
    openai_model: str = field(default="", metadata={"help": "Model name (default: OPENAI_MODEL)."})
    openai_base_url: str = field(default="", metadata={
        "help": f"Endpoint base URL (default: OPENAI_BASE_URL, else {DEFAULT_BASE_URL})."})
    n: int = field(default=3, metadata={"help": "Completions to ask for."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    max_tokens: int = field(default=24, metadata={"help": "Generation cap per completion."})
    max_retries: int = field(default=2, metadata={"help": "Client retries on connection errors, 429 and 5xx."})
    timeout: float = field(default=60.0, metadata={"help": "Seconds per request."})


def main(args: OpenAIArgs) -> list[str]:
    """Smoke check of an endpoint: print `n` titles for one article."""
    settings.load_env()
    if args.article in ("", "-"):
        if sys.stdin.isatty():
            raise SystemExit("error: pass --article FILE or pipe the article on stdin")
        body = sys.stdin.read()
    else:
        try:
            body = open(args.article, encoding="utf-8").read()
        except OSError as e:
            raise SystemExit(f"error: cannot read article {args.article}: {e.strerror}") from None
    if not body.strip():
        raise SystemExit(f"error: article {args.article or '(stdin)'} is empty")
    try:
        gen = OpenAIGenerator(args.openai_model or None, args.openai_base_url or None,
                              max_retries=args.max_retries, timeout=args.timeout, progress=False)
        texts = gen.generate([utils.title_messages(body)], n=args.n, temperature=args.temperature,
                             max_tokens=args.max_tokens)[0]
    except OpenAIGeneratorError as e:
        raise SystemExit(f"error: {e}") from None
    for text in texts:
        title, trailing = utils.extract_title(text)
        print(f"{title}{'  [+trailing text]' if trailing else ''}")
    u = gen.usage_summary()
    print(f"{u['requests']} request(s), {u['completion_tokens']} completion tokens, {u['seconds']:.1f}s",
          file=sys.stderr)
    return texts


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (cli_args,) = HfArgumentParser(OpenAIArgs, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()
    main(cli_args)
