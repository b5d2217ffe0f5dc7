"""Shared-prefix GRPO math: each distinct prompt encoded once per step, in the loss and in rollouts.

A GRPO group is `num_generations` completions of one prompt. TRL's loss pass feeds every row
its own copy of the prompt (G x (P + R) tokens for G completions of R tokens); for a ~400-token
article and ~12-token titles that is 97% prompt. `per_token_logps` computes the same per-token
log-probabilities (and entropies) from P + G x R tokens, in one of two layouts (`LAYOUTS`):

- "cached" (DEFAULT_LAYOUT): the prompt runs once, batch 1, with gradients, and keeps its
  key/value states in a cache; its last hidden state gives the first completion token's logit.
  The group's completions are then packed into one row behind a 4-D block mask (`block_mask`):
  each completion token sees the whole prompt (through the cache) and the earlier tokens of its
  own completion, never another completion's. Autograd carries each completion's gradient back
  through the cached keys/values into the one prompt pass, summed over the group.
- "packed": one row per group, the prompt then the completions, run as a single forward behind
  `packed_mask` (the prompt causal over itself, then block_mask's rows; `flex_mask` is the same
  rule as flex attention's BlockMask). No cache, so transformers' layer checkpointing recomputes
  it as it ran (under gradient checkpointing transformers drops a KV cache, which the cached
  layout needs): the layout Prefix Grouper (arXiv 2506.05433) uses. `layout_for` picks it under
  gradient checkpointing and with flex attention. On the CPU it measured no slower than "cached"
  (forward + backward of one ~430-token story x 8 titles, 1 thread, best / median of 6 on a busy
  2-core box: SmolLM2-135M 4.82 / 5.02 s vs 4.91 / 5.08 s; the tiny model 0.13 / 0.22 vs
  0.21 / 0.24 s); "cached" stays the default because the CPU demo's numbers are computed with it
  to the last digit, and on a GPU its prompt pass runs without a mask (causal: SDPA may pick its
  flash kernel) where a packed row's 4-D mask over ~8k tokens rules flash out; unmeasured there
  yet: `bench/gpu_step.py --attention sdpa,eager,flex_attention` measures both layouts.

Every token keeps the position id TRL gives it (its column in TRL's padded batch: a left-padded
prompt starts after its padding, completion token j sits at prompt width + j), so even the
rotary embeddings' float32 cos/sin tables are the same numbers. tests/test_shared_prefix.py
checks logprobs and LoRA gradients of both layouts, the packed one also under gradient
checkpointing, against TRL's own computation (float64: within 1e-10; float32: within 1e-4,
summation order).

`model_reason` and `group_rows` say what this does not cover (the trainer then runs TRL's own
path and logs why once): multimodal inputs, MoE aux loss, Liger kernels, sliding-window attention,
length-dependent RoPE scaling, attention kernels that take no 4-D mask or BlockMask
(flash-attention), and masks that are not left-padded prompt + right-padded completion.

`group_order` is the trainer's micro-batch side (fast_backend.SharedPrefixMixin._prepare_inputs):
the generation batch permuted by whole groups, so a micro-batch holds whole groups to share.

`merged_lora` is the rollout side: LoRA folded into copies of the base weights while
generating, the original weight tensors put back untouched afterwards.

    python -m pytest tests/test_shared_prefix.py -q          # equivalence on the tiny model
    python -m pytest tests/test_shared_prefix.py -q -m slow  # ... and on SmolLM2-135M
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

ATTENTION = ("sdpa", "eager", "flex_attention")  # kernels that take the block mask (flex: as a BlockMask)
LAYOUTS = ("packed", "cached")
DEFAULT_LAYOUT = "cached"
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
    attn = _attn(model)
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


def group_order(row_permutation: list[int], group_size: int, offset: int = 0) -> list[int]:
    """The batch's rows reordered by whole groups: the groups in the order in which their first
    row appears in `row_permutation`, each group's rows together and in batch order.

    Row i belongs to group (offset + i) // group_size: TRL's batch holds each prompt's
    group_size completions in consecutive rows, and `offset` is where this process's slice
    starts in the global batch (a slice may start or end inside a group: its part stays one
    block). With a uniformly random row permutation (TRL's torch.randperm of the rows, drawn
    the same way) every order of the groups is equally likely.

    >>> group_order([4, 0, 5, 1, 2, 3], 2)
    [4, 5, 0, 1, 2, 3]
    >>> group_order([3, 0, 2, 1], 3, offset=1)  # rows 0-1 end group 0, rows 2-3 start group 1
    [2, 3, 0, 1]
    """
    blocks: dict[int, list[int]] = {}
    for row in sorted(row_permutation):
        blocks.setdefault((offset + row) // group_size, []).append(row)
    seen: dict[int, None] = {}
    for row in row_permutation:
        seen.setdefault((offset + row) // group_size)
    return [row for block in seen for row in blocks[block]]


def layout_for(model) -> str:
    """The layout `per_token_logps` uses for `model`: "packed" under gradient checkpointing (a
    KV cache does not survive it) and with flex attention (a BlockMask over one packed row),
    otherwise DEFAULT_LAYOUT."""
    if getattr(model, "is_gradient_checkpointing", False) and model.training:
        return "packed"
    return "packed" if _attn(model) == "flex_attention" else DEFAULT_LAYOUT


def segments(lengths: list[int], prompt_len: int, device):
    """Segment id of every token of a prompt followed by packed completions: 0 for the prompt,
    i + 1 for completion i.

    >>> segments([2, 1], 2, "cpu").tolist()
    [0, 0, 1, 1, 2]
    """
    import torch

    return torch.repeat_interleave(torch.arange(len(lengths) + 1, device=device),
                                   torch.tensor([prompt_len, *lengths], device=device))


def allowed(seg, first_query: int = 0):
    """(T - first_query, T) bool: query q (q >= first_query) may see key k when k <= q and k is a
    prompt token or a token of q's own completion. The rule of both layouts; flex attention's
    mask_mod (`flex_mask`) is the same expression."""
    import torch

    idx = torch.arange(seg.numel(), device=seg.device)
    q = idx[first_query:]
    return (idx[None, :] <= q[:, None]) & ((seg[None, :] == 0) | (seg[None, :] == seg[q][:, None]))


def _as_mask(allow, dtype):
    """(1, 1, Q, K) from a bool (Q, K): dtype bool as is (True = attend, SDPA); a float dtype: 0 =
    attend, the dtype's minimum = blocked (eager attention adds it to the scores)."""
    import torch

    if dtype == torch.bool:
        return allow[None, None]
    out = torch.zeros(allow.shape, dtype=dtype, device=allow.device)
    return out.masked_fill_(~allow, torch.finfo(dtype).min)[None, None]


def block_mask(lengths: list[int], prompt_len: int, dtype, device):
    """(1, 1, T, P + T) mask for completions packed after a cached prompt (the "cached" layout).

    Row t (a token of completion i) may attend to every prompt column and to the columns of
    completion i up to itself.

    >>> import torch
    >>> block_mask([2, 1], 1, torch.bool, "cpu")[0, 0].int().tolist()
    [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    >>> block_mask([1], 1, torch.float32, "cpu")[0, 0].tolist()
    [[0.0, 0.0]]
    """
    return _as_mask(allowed(segments(lengths, prompt_len, device), prompt_len), dtype)


def packed_mask(lengths: list[int], prompt_len: int, dtype, device):
    """(1, 1, P + T, P + T) mask of one packed row (the "packed" layout): the prompt causal over
    itself, then block_mask's rows.

    >>> import torch
    >>> packed_mask([1, 1], 2, torch.bool, "cpu")[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    """
    return _as_mask(allowed(segments(lengths, prompt_len, device)), dtype)


def flex_mask(lengths: list[int], prompt_len: int, device):
    """packed_mask as flex attention's BlockMask (the same rule as `allowed`, as a mask_mod)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segments(lengths, prompt_len, device)
    t = seg.numel()

    def mask_mod(b, h, q, k):
        return (k <= q) & ((seg[k] == 0) | (seg[k] == seg[q]))

    return create_block_mask(mask_mod, None, None, t, t, device=str(device))


def per_token_logps(model, input_ids, attention_mask, logits_to_keep: int, groups: list[Group], *,
                    temperature: float = 1.0, compute_entropy: bool = False, entropy_requires_grad: bool = True,
                    layout: str | None = None):
    """(logps, entropies or None), both (B, logits_to_keep) like TRL's, zero where the completion is masked.

    `model` is the causal LM TRL would call (PEFT-wrapped or not); `groups` from group_rows;
    `layout` one of LAYOUTS (default: layout_for(model)). Logits go through TRL's own
    selective_log_softmax(_and_entropy) with its temperature.
    """
    layout = layout or layout_for(model)
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    encode = _packed_group if layout == "packed" else _cached_group
    completions = input_ids[:, -logits_to_keep:]
    width = input_ids.shape[1] - logits_to_keep  # TRL's prompt columns: its position ids are column indices
    logits_rows, targets, where = [], [], []  # per group: (N, V) logits, (N,) labels, (row, col) of each
    for g in groups:
        if not any(g.lengths):
            continue  # every completion masked: TRL's values there are 0, kept below
        # completion i feeds its tokens 0..L_i-2: they predict tokens 1..L_i-1
        feed = [max(n - 1, 0) for n in g.lengths]
        first, packed = encode(model, g, feed, completions, width)
        first = first.expand(sum(1 for n in g.lengths if n), -1)  # one row per non-empty completion
        logits, labels, cells = _arrange(first, packed, g, feed, completions)
        logits_rows.append(logits)
        targets.append(labels)
        where += cells
    return _scatter(logits_rows, targets, where, completions.shape, input_ids.device, temperature,
                    compute_entropy, entropy_requires_grad)


def _cached_group(model, g: Group, feed: list[int], completions, width: int):
    """The "cached" layout: the prompt once with its KV states in a cache, then the group's
    completions in one packed row behind block_mask, reading that cache. Returns (the last prompt
    token's logits (1, V), the packed tokens' logits (sum(feed), V) or None)."""
    import torch
    from transformers import DynamicCache

    device = completions.device
    p = g.prompt.shape[0]
    cache = DynamicCache(config=model.config)
    out = model(input_ids=g.prompt[None], position_ids=torch.arange(width - p, width, device=device)[None],
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    first = out.logits[0, -1:]  # the last prompt token predicts each completion's first token
    kept = [n for n in feed if n]
    if not kept:
        return first, None
    ids = torch.cat([completions[r, :n] for r, n in zip(g.rows, feed, strict=True) if n])[None]
    pos = torch.cat([torch.arange(width, width + n, device=device) for n in kept])[None]
    mask = block_mask(kept, p, _mask_dtype(model), device)
    return first, model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True).logits[0]


def _packed_group(model, g: Group, feed: list[int], completions, width: int):
    """The "packed" layout: one row, the prompt then the group's completions, one forward behind
    packed_mask (flex_mask under flex attention). No cache: layer checkpointing recomputes the
    row the way it ran. Returns what _cached_group returns."""
    import torch

    device = completions.device
    p = g.prompt.shape[0]
    kept = [n for n in feed if n]
    ids = torch.cat([g.prompt, *(completions[r, :n] for r, n in zip(g.rows, feed, strict=True) if n)])[None]
    pos = torch.cat([torch.arange(width - p, width, device=device),
                     *(torch.arange(width, width + n, device=device) for n in kept)])[None]
    kind = _mask_dtype(model)
    mask = flex_mask(kept, p, device) if kind == "flex" else packed_mask(kept, p, kind, device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                   logits_to_keep=sum(kept) + 1).logits[0]
    return logits[:1], (logits[1:] if kept else None)


def _scatter(logits_rows, targets, where, shape, device, temperature, compute_entropy, entropy_requires_grad):
    """TRL's selective log-softmax over every kept logit, put back at its (row, column)."""
    import torch
    from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

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


def _attn(model) -> str | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "_attn_implementation", None)


def _mask_dtype(model):
    """bool for SDPA (any query dtype, also under autocast); "flex" for flex attention (a
    BlockMask); for eager attention, which adds the mask to its scores, the model's floating dtype."""
    import torch

    attn = _attn(model)
    if attn == "sdpa":
        return torch.bool
    if attn == "flex_attention":
        return "flex"
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _arrange(first, packed, g: Group, feed: list[int], completions):
    """Order the group's logits as (row, column) cells and pick each cell's label.

    first: the last prompt token's logits expanded to one row per non-empty completion (its first
    cell); packed (if any): the packed tokens' logits, completion after completion, feed[i] each.
    """
    import torch

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
