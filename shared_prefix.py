"""Shared-prefix GRPO math: each distinct prompt encoded once per step, in the loss and in rollouts.

A GRPO group is `num_generations` completions of one prompt. TRL's loss pass feeds every row
its own copy of the prompt (G x (P + R) tokens for G completions of R tokens); for a ~400-token
article and ~12-token titles that is 97% prompt. `per_token_logps` computes the same per-token
log-probabilities (and entropies) from P + G x R tokens:

1. the prompt runs once, batch 1, with gradients, and keeps its key/value states in a cache;
   its last hidden state gives the first completion token's logit;
2. the group's completions are packed into one row behind a 4-D block mask: each completion
   token sees the whole prompt (through the cache) and the earlier tokens of its own
   completion, never another completion's; position ids restart for every completion.

Autograd carries each completion's gradient back through the cached keys/values into the one
prompt pass, summed over the group: the standard path's gradient, computed once. Every token
keeps the position id TRL gives it (its column in TRL's padded batch: a left-padded prompt
starts after its padding, completion token j sits at prompt width + j), so even the rotary
embeddings' float32 cos/sin tables are the same numbers. tests/test_shared_prefix.py checks
logprobs and LoRA gradients against TRL's own computation (float64: within 1e-10; float32:
within 1e-4, summation order).

`unsupported_reason` lists what this does not cover (the trainer then runs TRL's own path and
logs why once): multimodal inputs, MoE aux loss, Liger kernels, gradient checkpointing (it
drops the cache), sliding-window attention, length-dependent RoPE scaling, attention kernels that take no 4-D
mask (flash-attention, flex), and masks that are not left-padded prompt + right-padded
completion.

`merged_lora` is the rollout side: LoRA folded into copies of the base weights while
generating, the original weight tensors put back untouched afterwards.

    python -m pytest tests/test_shared_prefix.py -q          # equivalence on the tiny model
    python -m pytest tests/test_shared_prefix.py -q -m slow  # ... and on SmolLM2-135M
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

ATTENTION = ("sdpa", "eager")  # kernels that accept an additive 4-D mask as is
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # frequencies that do not depend on the pass's length


@dataclass
class Group:
    """One distinct prompt of the batch and the rows that share it."""

    prompt: object  # LongTensor (P,): the prompt's tokens without padding
    rows: list[int]  # batch rows with this prompt, in batch order
    lengths: list[int]  # unmasked completion tokens per row


def model_reason(model) -> str | None:
    """Why the model's attention cannot take the shared-prefix layout, or None when it can."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    attn = getattr(config, "_attn_implementation", None)
    if attn not in ATTENTION:
        return f"attention implementation {attn!r} takes no 4-D mask (supported: {', '.join(ATTENTION)})"
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        return "sliding-window / hybrid attention layers"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ROPE_TYPES:
        return f"rope_type {rope.get('rope_type')!r} depends on the sequence length"
    if getattr(model, "is_gradient_checkpointing", False) and model.training:
        return "gradient checkpointing (transformers drops the KV cache under it)"
    return None


def group_rows(input_ids, attention_mask, logits_to_keep: int) -> list[Group] | str:
    """The batch's distinct prompts with their rows, or a string saying why the layout is unsupported.

    Prompts must be left-padded and completions right-padded (TRL's layout); a completion
    row may be empty (all masked, e.g. mask_truncated_completions).
    """
    if input_ids.ndim != 2 or attention_mask is None or attention_mask.shape != input_ids.shape:
        return "inputs are not a 2-D batch with a matching 2-D attention mask"
    if not 0 < logits_to_keep < input_ids.shape[1]:
        return "no prompt columns"
    mask = attention_mask.bool()
    pmask, cmask = mask[:, :-logits_to_keep], mask[:, -logits_to_keep:]
    # left-padded: once a prompt token starts, every later column is a token; right-padded: the reverse
    if (pmask.cummax(dim=1).values != pmask).any() or (cmask.flip(1).cummax(dim=1).values.flip(1) != cmask).any():
        return "attention mask is not left-padded prompt + right-padded completion"
    if not pmask.any(dim=1).all():
        return "an empty prompt"
    lengths = cmask.sum(dim=1).tolist()
    groups: dict[tuple, Group] = {}
    prompts = input_ids[:, :-logits_to_keep]
    for row in range(input_ids.shape[0]):
        prompt = prompts[row][pmask[row]]
        key = tuple(prompt.tolist())
        g = groups.setdefault(key, Group(prompt=prompt, rows=[], lengths=[]))
        g.rows.append(row)
        g.lengths.append(int(lengths[row]))
    return list(groups.values())


def block_mask(lengths: list[int], prompt_len: int, dtype, device):
    """(1, 1, T, P + T) mask for completions packed after a cached prompt.

    Row t (a token of completion i) may attend to every prompt column and to the columns of
    completion i up to itself. dtype bool: True = attend (SDPA); a float dtype: 0 = attend,
    the dtype's minimum = blocked (eager attention adds it to the scores).

    >>> import torch
    >>> block_mask([2, 1], 1, torch.bool, "cpu")[0, 0].int().tolist()
    [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    >>> block_mask([1], 1, torch.float32, "cpu")[0, 0].tolist()
    [[0.0, 0.0]]
    """
    import torch

    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))
    t = seg.numel()
    idx = torch.arange(t, device=device)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    allowed = torch.cat([torch.ones(t, prompt_len, dtype=torch.bool, device=device), allowed], dim=1)
    if dtype == torch.bool:
        return allowed[None, None]
    out = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def per_token_logps(model, input_ids, attention_mask, logits_to_keep: int, groups: list[Group], *,
                    temperature: float = 1.0, compute_entropy: bool = False, entropy_requires_grad: bool = True):
    """(logps, entropies or None), both (B, logits_to_keep) like TRL's, zero where the completion is masked.

    `model` is the causal LM TRL would call (PEFT-wrapped or not); `groups` from group_rows.
    Logits go through TRL's own selective_log_softmax(_and_entropy) with its temperature.
    """
    import torch
    from transformers import DynamicCache
    from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

    device = input_ids.device
    completions = input_ids[:, -logits_to_keep:]
    width = input_ids.shape[1] - logits_to_keep  # TRL's prompt columns: its position ids are column indices
    logits_rows, targets, where = [], [], []  # per group: (N, V) logits, (N,) labels, (row, col) of each
    for g in groups:
        if not any(g.lengths):
            continue  # every completion masked: TRL's values there are 0, kept below
        p = g.prompt.shape[0]
        cache = DynamicCache(config=model.config)
        out = model(input_ids=g.prompt[None], position_ids=torch.arange(width - p, width, device=device)[None],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = out.logits[0, -1:]  # the last prompt token predicts each completion's first token
        # completion i feeds its tokens 0..L_i-2: they predict tokens 1..L_i-1
        feed = [max(n - 1, 0) for n in g.lengths]
        parts = [first.expand(sum(1 for n in g.lengths if n), -1)]
        if sum(feed):
            ids = torch.cat([completions[r, :n] for r, n in zip(g.rows, feed, strict=True) if n])[None]
            pos = torch.cat([torch.arange(width, width + n, device=device) for n in feed if n])[None]
            mask = block_mask([n for n in feed if n], p, _mask_dtype(model), device)
            packed = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True).logits[0]
            parts.append(packed)
        logits, labels, cells = _arrange(parts, g, feed, completions)
        logits_rows.append(logits)
        targets.append(labels)
        where += cells
    shape = completions.shape
    if not where:  # nothing unmasked: TRL returns zeros; keep them connected to nothing
        zeros = torch.zeros(shape, device=device)
        return zeros, (zeros.clone() if compute_entropy else None)
    logits = torch.cat(logits_rows)[None]
    labels = torch.cat(targets)[None]
    if compute_entropy:
        logps, ents = selective_log_softmax_and_entropy(logits, labels, entropy_requires_grad=entropy_requires_grad,
                                                        temperature=temperature)
    else:
        logps, ents = selective_log_softmax(logits, labels, temperature=temperature), None
    index = torch.tensor(where, device=device)
    flat = index[:, 0] * shape[1] + index[:, 1]
    out_logps = logps.new_zeros(shape[0] * shape[1]).index_put((flat,), logps[0]).view(shape)
    out_ents = None
    if ents is not None:
        out_ents = ents.new_zeros(shape[0] * shape[1]).index_put((flat,), ents[0]).view(shape)
    return out_logps, out_ents


def _mask_dtype(model):
    """bool for SDPA (any query dtype, also under autocast); for eager attention, which adds the
    mask to its scores, the model's floating dtype."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "_attn_implementation", None) == "sdpa":
        return torch.bool
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _arrange(parts, g: Group, feed: list[int], completions):
    """Order the group's logits as (row, column) cells and pick each cell's label.

    parts[0]: one first-token logit per non-empty completion; parts[1] (if any): the packed
    row's logits, completion after completion, feed[i] positions each.
    """
    import torch

    first, packed = parts[0], (parts[1] if len(parts) > 1 else None)
    chunks, labels, cells = [], [], []
    k, offset = 0, 0
    for r, n, f in zip(g.rows, g.lengths, feed, strict=True):
        if not n:
            continue
        chunks.append(first[k:k + 1])
        k += 1
        if f:
            chunks.append(packed[offset:offset + f])
            offset += f
        labels.append(completions[r, :n])
        cells += [(r, c) for c in range(n)]
    return torch.cat(chunks), torch.cat(labels), cells


# --------------------------------------------------------------------------------------
# Rollouts: LoRA folded into the weights while generating
# --------------------------------------------------------------------------------------


def lora_layers(model) -> list | None:
    """The model's LoRA linear layers when folding them is exact in distribution, else None.

    Only plain `nn.Linear` bases with one active LoRA adapter, no DoRA, and dropout that is
    off (p = 0 or eval mode): with dropout on, generating through the adapter samples a mask,
    and a merged weight would not.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        return None
    for m in layers:
        active = list(m.active_adapters)
        if len(active) != 1 or getattr(m, "merged", False) or getattr(m, "disable_adapters", False):
            return None
        name = active[0]
        if name not in m.lora_A or m.use_dora.get(name, False) or type(m.get_base_layer()) is not torch.nn.Linear:
            return None
        drop = m.lora_dropout[name]
        if m.training and isinstance(drop, torch.nn.Dropout) and drop.p > 0:
            return None
    return layers


@contextlib.contextmanager
def merged_lora(model):
    """Generate with W + scale * B @ A in place of W and the adapter switched off; restore after.

    The sum goes into new tensors: the original weight tensors are put back as they were (an
    in-place merge + unmerge drifts the base weights by ~1e-7 per cycle). Costs one extra copy
    of the adapted weights while it is active. Yields True when it merged, False when the
    model has nothing to merge or folding would not be exact (lora_layers).
    """
    import torch

    layers = lora_layers(model)
    if not layers:
        yield False
        return
    saved = []
    try:
        with torch.no_grad():
            for m in layers:
                name = m.active_adapters[0]
                base = m.get_base_layer()
                delta = m.get_delta_weight(name).to(base.weight.dtype)
                saved.append((m, base, base.weight.data, m.disable_adapters))
                base.weight.data = base.weight.data + delta
                m._disable_adapters = True  # forward = base layer only
        yield True
    finally:
        for m, base, data, disabled in reversed(saved):
            base.weight.data = data
            m._disable_adapters = disabled
