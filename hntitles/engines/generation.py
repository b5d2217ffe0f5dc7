"""Generation with transformers: each distinct prompt prefilled once, however many completions it gets.

A GRPO group is num_generations copies of one prompt; HF generate prefills every copy. Here:

- `generate_shared_prefix(model, prompt_ids, pad)`: new tokens for every row, one prefill per
  distinct prompt (the KV cache copied out to its rows); the TRL trainer's rollouts use it;
  `generate_passes`: several generate() calls (greedy, then sampled) from one prefill;
- `sample_completions(model, tokenizer, prompts, counts, ...)`: n completions per prompt with the
  raw per-token logprobs an OpenAI-compatible server returns (the ART CPU engine's server);
- `Generator`: what every title writer promises (a local model, an OpenAI-compatible endpoint);
  `stop_token_ids`: the vocabulary ids that end a completion at a stop string;
- `HFGenerator`: a Generator over a local model (evaluation, validation, titles.py);
- `left_pad`, `cut_after_eos` (TRL's completion cut), `cut_at_stop` (the OpenAI API's stop cut).

    python -c "from hntitles.engines import generation, policy; m, t = policy.load_model('models/tiny');
        print(generation.HFGenerator(m, t).generate([[{'role': 'user', 'content': 'hi'}]], 2, 1.0, 5))"
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


def stop_token_ids(tokenizer, stops: Sequence[str]) -> list[int]:
    """Vocabulary ids whose text contains a stop string: generating one ends the completion.

    HF generate and vLLM stop on token ids; a line break hides in many tokens ("\n", "\n\n",
    ".\n", "\r\n", ...), so all of them count.
    """
    return list(_stop_token_ids(tokenizer, tuple(stops))) if stops else []


@functools.lru_cache(maxsize=8)
def _stop_token_ids(tokenizer, stops: tuple[str, ...]) -> tuple[int, ...]:
    # a scan of the whole vocabulary (~0.2 s for 49k tokens): once per tokenizer and stop set,
    # however many generators and validations ask
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, t in enumerate(texts) if any(s in t for s in stops))


class Generator(Protocol):
    """Anything that writes completions for chat prompts (HF model, OpenAI-compatible API)."""

    name: str

    def generate(self, conversations: Sequence[list[dict]], n: int, temperature: float,
                 max_tokens: int, stop: Sequence[str] = ()) -> list[list[str]]:
        """`n` completions per conversation; temperature 0 means greedy; a completion ends after
        the first token that contains a `stop` string (the string is kept in the text)."""
        ...


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int):
    """(ids, attention mask) LongTensors, left-padded as generate() expects for decoder-only models."""
    import torch

    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def generate_shared_prefix(model, prompt_ids: Sequence[Sequence[int]], pad_token_id: int, **generate_kwargs):
    """New tokens for each row of `prompt_ids`, prefilling each distinct prompt only once.

    HF generate (and so TRL's transformers path) prefills every row, and a GRPO group is
    num_generations copies of one prompt. On a CPU the prefill of a ~400-token prompt costs
    ~17 decode steps, so a group of 4 paid ~75% of its generation time for copies. Here the
    distinct prompts are left-padded and run once without their last token, the KV cache is
    copied out to every row, and generate() continues from it: the same sampling and the same
    tokens under greedy decoding (tests/test_fast_backend.py checks both).

    Returns a LongTensor (rows, new tokens), right-padded with pad_token_id by generate().
    """
    (out,) = generate_passes(model, prompt_ids, pad_token_id, [generate_kwargs])
    return out


def generate_passes(model, prompt_ids: Sequence[Sequence[int]], pad_token_id: int, passes: Sequence[dict],
                    rows: Sequence[Sequence[int]] | None = None):
    """generate_shared_prefix for several generate() calls over the same prompts, prefilled once
    for all of them: pass k continues the rows of `rows[k]` (indices into `prompt_ids`; default:
    every row) with the generate kwargs `passes[k]`. An evaluation's greedy and sampled titles of a
    story share one prefill this way (HFGenerator.generate_greedy_and_sampled). Each pass gets
    exactly what generate_shared_prefix would have given it alone: the same cache, and the RNG
    consumed by the passes in order. Returns one LongTensor per pass."""
    import copy

    import torch
    from transformers import DynamicCache

    position = {}  # distinct prompt -> its row in the prefill, first-seen order
    index = torch.tensor([position.setdefault(tuple(p), len(position)) for p in prompt_ids], device=model.device)
    ids, mask = (t.to(model.device) for t in left_pad(list(position), pad_token_id))
    width = ids.shape[1]
    rows = [list(range(len(prompt_ids)))] * len(passes) if rows is None else rows
    kwargs = [{"pad_token_id": pad_token_id, **kw} if "generation_config" not in kw else dict(kw)
              for kw in passes]  # a GenerationConfig carries its own pad id
    picks = [index[torch.tensor(list(r), dtype=torch.long, device=model.device)] for r in rows]
    if width < 2:  # nothing to share
        return [model.generate(input_ids=ids[i], attention_mask=mask[i], **kw)[:, width:]
                for i, kw in zip(picks, kwargs, strict=True)]
    # Positions exactly as generate() derives them from the mask, so the cache matches.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
              past_key_values=cache, use_cache=True, logits_to_keep=1)
    out = []
    for k, (i, kw) in enumerate(zip(picks, kwargs, strict=True)):
        rows_cache = cache if k == len(picks) - 1 else copy.deepcopy(cache)  # generate() grows the one it gets
        rows_cache.reorder_cache(i)  # row r gets the cache of its distinct prompt
        out.append(model.generate(input_ids=ids[i], attention_mask=mask[i], past_key_values=rows_cache, **kw)
                   [:, width:])
    return out


def cut_after_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Token ids up to and including the first EOS (TRL's completion mask, as a list).

    >>> cut_after_eos([5, 6, 2, 0, 0], [2]), cut_after_eos([5, 6], [2])
    ([5, 6, 2], [5, 6])
    """
    for i, t in enumerate(ids):
        if t in eos_ids:
            return list(ids[:i + 1])
    return list(ids)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class RawLogprobs:
    """A logits processor that keeps log-softmax of the logits of every decoding step, divided
    by `temperature` (1 = the raw logits).

    transformers runs user processors before the sampling warpers (temperature, top-k), so at
    temperature 1 these are the model's own probabilities, the ones ART's trainer recomputes
    (vLLM's raw logprobs); at the sampling temperature they are the probabilities the tokens
    were drawn with, the ones TRL's loss scores (`logits / temperature`). Greedy decoding
    (temperature 0) keeps the raw logits.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = float(temperature) if temperature and temperature > 0 else 1.0
        self.steps: list = []

    def __call__(self, input_ids, scores):
        import torch

        logits = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
        self.steps.append(torch.log_softmax(logits, dim=-1))
        return scores


def sample_completions(model, tok, prompts: Sequence[Sequence[int]], counts: Sequence[int], *, adapter: bool,
                       temperature: float, max_tokens: int, stops: Sequence[str], logprobs: bool,
                       seed: int | None = None, logprob_temperature: float = 1.0) -> list[list[Completion]]:
    """`counts[i]` completions of `prompts[i]` (token ids) from a PEFT `model` (its adapter on or
    off), with the per-token logprobs an OpenAI-compatible server returns; one prefill per prompt.

    The logprobs are log-softmax of the logits / `logprob_temperature`: 1 (the default) gives the
    raw model's, as vLLM returns them; the sampling temperature gives the distribution the tokens
    were drawn from (the CPU engine's `score_temperature`). Plain temperature sampling (top-k and
    top-p off, as vLLM's defaults); `seed` makes it repeatable without touching the process's RNG.
    The caller serialises access to `model`.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    eos = [tok.eos_token_id, *stop_token_ids(tok, stops)]
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False}
    config = GenerationConfig(**sampling, max_new_tokens=max_tokens, eos_token_id=list(dict.fromkeys(eos)),
                              pad_token_id=tok.pad_token_id)
    capture = RawLogprobs(logprob_temperature)
    rows = [list(p) for p, c in zip(prompts, counts, strict=True) for _ in range(c)]
    context = contextlib.nullcontext() if adapter else model.disable_adapter()
    with context, torch.no_grad(), torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        new = generate_shared_prefix(model, rows, tok.pad_token_id, generation_config=config,
                                     logits_processor=LogitsProcessorList([capture] if logprobs else []))
    out, k = [], 0
    for count in counts:
        group = []
        for _ in range(count):
            ids = cut_after_eos(new[k].tolist(), set(eos))
            lps = [float(capture.steps[t][k, i]) for t, i in enumerate(ids)] if logprobs else None
            group.append(Completion(ids, lps, cut_at_stop(tok.decode(ids, skip_special_tokens=True), stops),
                                    "stop" if ids and ids[-1] in eos else "length"))
            k += 1
        out.append(group)
    return out


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string (the OpenAI API leaves the stop string out).

    >>> cut_at_stop("A title\\nmore", ["\\n"]), cut_at_stop("no stop", ["\\n"])
    ('A title', 'no stop')
    """
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text


class HFGenerator:
    """utils.Generator over a transformers model (optionally with a PEFT adapter), batched."""

    def __init__(self, model, tokenizer, batch_size: int = 8, name: str = "hf", progress: bool = True):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.progress = progress
        tokenizer.padding_side = "left"  # decoder-only generation pads on the left

    def generate(self, conversations: Sequence[list[dict]], n: int, temperature: float,
                 max_tokens: int, stop: Sequence[str] = ()) -> list[list[str]]:
        (out,) = self._passes(conversations, [(n, temperature)], max_tokens, stop)
        return out

    def generate_greedy_and_sampled(self, conversations: Sequence[list[dict]], n: int, temperature: float,
                                    max_tokens: int, stop: Sequence[str] = ()) -> tuple[list[str], list[list[str]]]:
        """One greedy and `n` sampled completions per conversation from one prefill of its prompt
        (generate_passes): the same titles as generate(n=1, temperature=0) then generate(n, temperature)
        under the same seed, with each prompt prefilled once instead of twice (an evaluation's cost
        on a CPU is mostly prefill)."""
        greedy, sampled = self._passes(conversations, [(1, 0.0), (n, temperature)], max_tokens, stop)
        return [g[0] for g in greedy], sampled

    def _passes(self, conversations: Sequence[list[dict]], passes: list[tuple[int, float]], max_tokens: int,
                stop: Sequence[str]) -> list[list[list[str]]]:
        """Completions per pass (n, temperature), per conversation, in batches of batch_size prompts."""
        from tqdm.auto import tqdm

        desc = " + ".join(f"n={n}{' greedy' if t <= 0 else ''}" for n, t in passes)
        batches = range(0, len(conversations), self.batch_size)
        out: list[list[list[str]]] = [[] for _ in passes]
        was_training = self.model.training
        self.model.eval()
        try:
            for i in tqdm(batches, desc=f"generate {desc}", disable=not self.progress, leave=False):
                for k, texts in enumerate(self._batch(list(conversations[i:i + self.batch_size]), passes,
                                                      max_tokens, stop)):
                    out[k].extend(texts)
        finally:
            self.model.train(was_training)
        return out

    def _batch(self, convs: list[list[dict]], passes: list[tuple[int, float]], max_tokens: int,
               stop: Sequence[str]) -> list[list[list[str]]]:
        import torch

        eos = {}
        if stop:  # EOS or any token holding a stop string ends a row
            eos = {"eos_token_id": [self.tokenizer.eos_token_id, *stop_token_ids(self.tokenizer, stop)]}
        texts = self.tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        kwargs = [dict(max_new_tokens=max_tokens, do_sample=t > 0, temperature=t if t > 0 else None, top_p=None,
                       top_k=None, **eos) for _, t in passes]
        rows = [[j for j in range(len(ids)) for _ in range(n)] for n, _ in passes]
        with torch.inference_mode():
            # All titles of a story, in every pass, share one prefill of its prompt.
            gens = generate_passes(self.model, ids, self.tokenizer.pad_token_id, kwargs, rows)
        out = []
        for (n, _), gen in zip(passes, gens, strict=True):
            decoded = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
            out.append([decoded[j * n:(j + 1) * n] for j in range(len(convs))])
        return out
