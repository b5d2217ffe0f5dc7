"""Shared-prefix GRPO (hntitles/engines/shared_prefix.py, fast_backend.SharedPrefixGRPOTrainer) against TRL's own math.

Every comparison runs TRL's stock `GRPOTrainer._get_per_token_logps_and_entropies` and the
subclass's override on the same trainer, model and batch (real prompts from data/stories.jsonl,
a LoRA whose B matrices are random: with PEFT's B = 0 the lora_A gradients are exactly 0 and
would prove nothing). float64 runs with LlamaRMSNorm computing in float64 (it casts to float32
internally), so both paths are exact to rounding: logprobs within 1e-10, gradients relative L2
<= 1e-10. float32: within 1e-4 (summation order only). Both layouts of per_token_logps run
("cached": the prompt's KV states shared; "packed": one row per group, one forward), the packed
one also under gradient checkpointing (layers recomputed in backward). Whole GRPO steps over
several group-aligned micro-batches give TRL's adapter (float64, within 1e-10). The tiny model
checks every layout, SmolLM2-135M one per dtype (slow suite).

Models and tensors live on TEST_DEVICE (default cpu; gpu_check.py sets TEST_DEVICE=cuda to run
these on a GPU); every test is skipped when torch cannot use that device:

    TEST_DEVICE=cuda python -m pytest tests/test_shared_prefix.py -q
"""

from __future__ import annotations

import copy
import doctest
import json
import os

import pytest

import utils
from hntitles.engines import fast_backend as fb
from hntitles.engines import generation, shared_prefix
from hntitles.engines.fast_backend import Backend
from hntitles.runs import settings

DEVICE = os.environ.get("TEST_DEVICE", "cpu")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (story index of each row, completion length of each row). Rows of one story share a prompt.
SHAPES = {
    # one story x 8 titles of unequal length, one a single token (nothing packed for it)
    "1x8": ([0] * 8, [24, 12, 5, 24, 1, 17, 9, 24]),
    # two stories (prompts of different lengths: left padding) x 4
    "2x4": ([0] * 4 + [1] * 4, [24, 3, 11, 20, 7, 24, 1, 15]),
    # groups of 3 and 5 interleaved (TRL shuffles rows), an all-masked row (mask_truncated_completions)
    "uneven": ([1, 0, 1, 1, 0, 0, 0, 0], [6, 24, 0, 13, 2, 24, 18, 9]),
}
DISTINCT = ([0, 1, 2, 3], [5, 9, 2, 7])  # every prompt different: one prompt pass per row


@pytest.fixture(scope="module", autouse=True)
def on_test_device():
    """Skip the file when torch cannot allocate on TEST_DEVICE (no GPU, a CPU-only torch)."""
    import torch

    try:
        torch.empty(1, device=DEVICE)
    except (RuntimeError, AssertionError) as e:  # AssertionError: "Torch not compiled with CUDA enabled"
        pytest.skip(f"TEST_DEVICE={DEVICE} is not usable here: {e}")


def rmsnorm_in_float64(monkeypatch):
    """LlamaRMSNorm casts to float32 inside; in a float64 test it must stay in float64."""
    import torch
    from transformers.models.llama import modeling_llama

    def forward(self, hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def lora_model(path, dtype="float32", attn="sdpa", seed=0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model.to(DEVICE)


def story_prompts(tok, n=4, chars=600):
    """Chat prompts of the first n shipped stories (bodies cut to `chars` to keep the tests short)."""
    rows = [json.loads(line) for line in (settings.ROOT / "data" / "stories.jsonl").read_text().splitlines()[:n]]
    texts = [tok.apply_chat_template(utils.title_messages(r["scraped_body"][:chars - 37 * i]),
                                     add_generation_prompt=True, tokenize=False) for i, r in enumerate(rows)]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def trainer_for(model, tok, tmp_path, trainer_cls=None, reward=None, prompts=None, **config):
    from datasets import Dataset
    from trl import GRPOConfig

    def constant(completions, **kw):
        return [0.0] * len(completions)

    # TRL turns gradient checkpointing on by default; the repo's trainer turns it off (TrlArgs)
    config = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8,
              "gradient_checkpointing": False, **config}
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=DEVICE == "cpu", bf16=False, report_to="none", **config)
    cls = trainer_cls or fb.shared_prefix_trainer_class()
    ds = Dataset.from_list(prompts or [{"prompt": utils.title_messages("x" * 40)}] * 8)
    return cls(model=model, reward_funcs=[reward or constant], args=args, train_dataset=ds, processing_class=tok)


def trl_batch(tok, prompts, stories, lengths, seed=0):
    """input_ids, attention_mask, completion mask, logits_to_keep in TRL's layout (left/right padding)."""
    import torch
    from trl.trainer.utils import pad

    g = torch.Generator().manual_seed(seed)
    rows = [torch.tensor(prompts[s]) for s in stories]
    comps = [torch.randint(3, tok.vocab_size - 1, (n,), generator=g) for n in lengths]
    pid = pad(rows, padding_value=tok.pad_token_id, padding_side="left")
    pm = pad([torch.ones(len(r), dtype=torch.long) for r in rows], padding_value=0, padding_side="left")
    cid = pad([c if len(c) else torch.tensor([tok.pad_token_id]) for c in comps], padding_value=tok.pad_token_id,
              padding_side="right")
    cm = torch.zeros(cid.shape, dtype=torch.long)
    for i, n in enumerate(lengths):
        cm[i, :n] = 1
    # drawn on the CPU (the same numbers on every device), then moved
    return torch.cat([pid, cid], 1).to(DEVICE), torch.cat([pm, cm], 1).to(DEVICE), cm.to(DEVICE), cid.shape[1]


def logps_and_grads(fn, trainer, batch, seed=1):
    """fn's logprobs and entropies, and the LoRA gradients of a random weighting of the logprobs."""
    import torch

    ids, mask, cmask, keep = batch
    model = trainer.model
    model.zero_grad()
    logps, ents, _ = fn(trainer, model, ids, mask, keep, compute_entropy=True)
    weights = torch.randn(cmask.shape, generator=torch.Generator().manual_seed(seed), dtype=logps.dtype).to(DEVICE)
    (logps * weights * cmask).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), ents.detach(), grads


def rel_l2(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)
    return (num / sum(float((a[k] ** 2).sum()) for k in a)) ** 0.5


def compare(trainer, batch, tol_logp, tol_grad):
    """Stock vs shared-prefix on one batch; asserts the shared path ran and matched."""
    from trl import GRPOTrainer

    calls = []
    original = shared_prefix.per_token_logps

    def spy(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    stock = logps_and_grads(GRPOTrainer._get_per_token_logps_and_entropies, trainer, batch)
    shared_prefix.per_token_logps = spy
    try:
        ours = logps_and_grads(type(trainer)._get_per_token_logps_and_entropies, trainer, batch)
    finally:
        shared_prefix.per_token_logps = original
    assert calls, "the shared-prefix path did not run"
    cmask = batch[2].bool()
    assert (ours[0][~cmask] == 0).all() and (ours[1][~cmask] == 0).all()  # TRL's zeros where masked
    assert (stock[0] - ours[0])[cmask].abs().max() <= tol_logp
    assert (stock[1] - ours[1])[cmask].abs().max() <= max(tol_logp, 1e-10) * 10  # entropies: sums over the vocab
    lora_a = [k for k in stock[2] if "lora_A" in k]
    assert any(stock[2][k].abs().max() > 0 for k in lora_a)  # the gradients tested are not trivially zero
    assert rel_l2(stock[2], ours[2]) <= tol_grad
    return stock, ours


# --------------------------------------------------------------------------------------
# Fast suite: the tiny model
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return tiny_model, tok, story_prompts(tok)


def checkpointed(trainer, monkeypatch):
    """Gradient checkpointing on (as TRL turns it on: the model in training mode); returns a list that
    counts decoder-layer forwards, so a test can see the layers ran again in backward."""
    from transformers.models.llama import modeling_llama

    calls = []
    original = modeling_llama.LlamaDecoderLayer.forward

    def forward(self, *a, **kw):
        calls.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", forward)
    trainer.model.gradient_checkpointing_enable()
    trainer.model.train()
    assert shared_prefix.layout_for(trainer.model) == "packed"
    return calls


def layer_passes(trainer, batch) -> int:
    """Decoder-layer forwards of compare() under checkpointing: TRL's one batched forward, then ours,
    one per group with a completion token; each layer runs again in backward."""
    ids, mask, _, keep = batch
    groups = [g for g in shared_prefix.group_rows(ids, mask, keep) if any(g.lengths)]
    return 2 * trainer.model.config.num_hidden_layers * (1 + len(groups))


# (layout, gradient checkpointing): the cached layout cannot run under checkpointing (no KV cache)
VARIANTS = [("cached", False), ("packed", False), ("packed", True)]


@pytest.mark.slow
@pytest.mark.parametrize("layout, checkpointing", VARIANTS, ids=["cached", "packed", "packed-checkpointed"])
@pytest.mark.parametrize("shape", [*SHAPES, "distinct"])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_tiny_logps_and_grads_match_trl(tiny_setup, tmp_path, monkeypatch, shape, dtype, tol, layout,
                                        checkpointing):
    path, tok, prompts = tiny_setup
    if dtype == "float64":
        rmsnorm_in_float64(monkeypatch)
    trainer = trainer_for(lora_model(path, dtype), tok, tmp_path)
    monkeypatch.setattr(shared_prefix, "DEFAULT_LAYOUT", layout)
    calls = checkpointed(trainer, monkeypatch) if checkpointing else None
    stories, lengths = SHAPES.get(shape, DISTINCT)
    batch = trl_batch(tok, prompts, stories, lengths)
    compare(trainer, batch, tol, tol)
    if checkpointing:
        assert len(calls) == layer_passes(trainer, batch)


def test_block_mask_and_doctests():
    assert doctest.testmod(shared_prefix).failed == 0
    import torch

    m = shared_prefix.block_mask([1, 2], 2, torch.float64, DEVICE)[0, 0]
    # prompt columns open to all; completion 2's second token sees its first, not completion 1
    assert (m == 0).tolist() == [[True, True, True, False, False], [True, True, False, True, False],
                                 [True, True, False, True, True]]
    assert m.min() == torch.finfo(torch.float64).min


def test_packed_mask_and_flex_mask_are_one_rule():
    """The packed layout's 4-D mask, and flex attention's BlockMask from the same rule, give the same
    attention output as the rule written out by hand (flex run uncompiled: forward only, any device)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    lengths, p = [3, 1, 5], 7
    m = shared_prefix.packed_mask(lengths, p, torch.bool, DEVICE)[0, 0]
    seg = [0] * p + [1] * 3 + [2] + [3] * 5
    by_hand = [[k <= q and (seg[k] == 0 or seg[k] == seg[q]) for k in range(len(seg))] for q in range(len(seg))]
    assert m.tolist() == by_hand
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, len(seg), 8, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3))
    expected = sdpa(q, k, v, attn_mask=m)
    flex = flex_attention(q, k, v, block_mask=shared_prefix.flex_mask(lengths, p, DEVICE))
    assert (flex - expected).abs().max() < 1e-12
    eager = shared_prefix.packed_mask(lengths, p, torch.float64, DEVICE)  # eager attention's additive form
    assert (sdpa(q, k, v, attn_mask=eager) - expected).abs().max() < 1e-12


@pytest.mark.slow
def test_flex_attention_runs_the_packed_layout(tiny_setup, tmp_path):
    """Flex attention through the trainer (a BlockMask over one packed row) against TRL's own path."""
    if DEVICE == "cpu":
        pytest.skip("FlexAttention has no backward on the CPU (torch 2.13); gpu_check's shared-prefix check runs "
                    "this file with TEST_DEVICE=cuda")
    path, tok, prompts = tiny_setup
    trainer = trainer_for(lora_model(path, attn="flex_attention"), tok, tmp_path)
    assert shared_prefix.model_reason(trainer.model) is None and shared_prefix.layout_for(trainer.model) == "packed"
    for shape in ("uneven", "1x8"):
        compare(trainer, trl_batch(tok, prompts, *SHAPES[shape]), 1e-4, 1e-4)


@pytest.mark.parametrize("mask, keep, reason", [
    # a prompt padded on the right: not TRL's layout
    ([[1, 1, 0, 1, 1]], 2, "not left-padded"),
    # a completion with a hole in it
    ([[1, 1, 1, 0, 1]], 2, "not left-padded"),
    # no prompt columns at all
    ([[1, 1, 1, 1, 1]], 5, "no prompt columns"),
    # an empty prompt
    ([[0, 0, 0, 1, 1]], 2, "empty prompt"),
])
def test_group_rows_refuses_other_layouts(mask, keep, reason):
    import torch

    m = torch.tensor(mask, device=DEVICE)
    assert reason in shared_prefix.group_rows(torch.ones_like(m), m, keep)


def test_group_rows_groups_by_prompt_tokens_not_padding():
    import torch

    # rows 0 and 2 share a prompt (same tokens, same padding); row 1 differs; row 3 = row 1
    ids = torch.tensor([[0, 5, 6, 9], [7, 5, 6, 9], [0, 5, 6, 8], [7, 5, 6, 8]], device=DEVICE)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1]], device=DEVICE)
    groups = shared_prefix.group_rows(ids, mask, 1)
    assert [(g.prompt.tolist(), g.rows, g.lengths) for g in groups] == [([5, 6], [0, 2], [1, 0]),
                                                                         ([7, 5, 6], [1, 3], [1, 1])]


@pytest.mark.slow
def test_unsupported_setups_fall_back_to_trl_with_one_log_line(tiny_setup, tmp_path, capsys):
    import torch
    from trl import GRPOTrainer

    path, tok, prompts = tiny_setup
    trainer = trainer_for(lora_model(path, attn="eager"), tok, tmp_path)
    batch = trl_batch(tok, prompts, *SHAPES["2x4"])
    ids, mask, _, keep = batch
    bad = mask.clone()
    bad[:, 0] = 1  # a prompt "token" before the padding: not a left-padded layout
    for _ in range(2):
        ours = trainer._get_per_token_logps_and_entropies(trainer.model, ids, bad, keep)[0]
    stock = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, bad, keep)[0]
    assert torch.equal(ours, stock)  # TRL's own path: bit-identical
    assert capsys.readouterr().out.count("shared-prefix loss off for this batch (attention mask is not") == 1
    # kernels without 4-D masks are refused up front; gradient checkpointing is not (the packed layout)
    trainer.model.config._attn_implementation = "flash_attention_2"
    assert "takes no 4-D mask" in shared_prefix.model_reason(trainer.model)
    trainer.model.config._attn_implementation = "sdpa"
    assert shared_prefix.layout_for(trainer.model) == shared_prefix.DEFAULT_LAYOUT
    trainer.model.gradient_checkpointing_enable()
    trainer.model.train()
    assert shared_prefix.model_reason(trainer.model) is None and shared_prefix.layout_for(trainer.model) == "packed"


@pytest.mark.slow
def test_device_branches_bf16_eager_and_wrapped_model(tiny_setup, tmp_path, monkeypatch):
    """What runs on CUDA, forced on the CPU: a bf16 model (boolean mask for SDPA), eager attention
    (an additive mask in the model's dtype), and a DDP-style wrapper (both passes through one
    call of the wrapper's forward). Every tensor the path makes follows the input's device."""
    import torch

    path, tok, prompts = tiny_setup
    batch = trl_batch(tok, prompts, *SHAPES["uneven"])
    for attn in ("sdpa", "eager"):
        trainer = trainer_for(lora_model(path, "bfloat16", attn), tok, tmp_path)
        assert shared_prefix._mask_dtype(trainer.model) == (torch.bool if attn == "sdpa" else torch.bfloat16)
        for layout in shared_prefix.LAYOUTS:
            monkeypatch.setattr(shared_prefix, "DEFAULT_LAYOUT", layout)
            compare(trainer, batch, 0.1, 0.05)  # bf16: two roundings of ~4e-3 each, not more

    class Wrapper(torch.nn.Module):  # what DDP does to the model: the trainer sees the wrapper
        def __init__(self, inner):
            super().__init__()
            self.module = inner
            self.calls = 0

        def forward(self, *a, **kw):
            self.calls += 1
            return self.module(*a, **kw)

    trainer = trainer_for(lora_model(path), tok, tmp_path)
    inner = trainer.model
    wrapper = Wrapper(inner)
    monkeypatch.setattr(trainer.accelerator, "unwrap_model", lambda m, **kw: inner)
    ids, mask, cmask, keep = batch
    logps = trainer._get_per_token_logps_and_entropies(wrapper, ids, mask, keep)[0]
    assert wrapper.calls == 1  # one wrapper forward for the prompt pass and the packed pass together
    from trl import GRPOTrainer

    stock = GRPOTrainer._get_per_token_logps_and_entropies(trainer, inner, ids, mask, keep)[0]
    assert (logps - stock)[cmask.bool()].abs().max() <= 1e-4


@pytest.mark.slow
def test_old_and_ref_logprob_passes_use_the_shared_path(tiny_setup, tmp_path, monkeypatch):
    """beta > 0 (reference pass, adapter disabled) and steps_per_generation > 1 (old-policy pass)
    go through the override too: with and without gradients."""
    import torch

    path, tok, _ = tiny_setup
    seen = []
    original = shared_prefix.per_token_logps

    def spy(*a, **kw):
        seen.append(torch.is_grad_enabled())
        return original(*a, **kw)

    monkeypatch.setattr(shared_prefix, "per_token_logps", spy)
    trainer = trainer_for(lora_model(path), tok, tmp_path, beta=0.1, steps_per_generation=2, max_steps=1,
                          per_device_train_batch_size=4, num_generations=4)
    trainer.train()
    assert seen.count(False) >= 2 and seen.count(True) >= 1  # old + ref without grad, the loss with
    assert not getattr(trainer, "_shared_prefix_fallbacks", set())


def test_trainer_class_per_backend():
    from trl import GRPOTrainer

    for backend in (Backend("cpu", "cpu", False), Backend("transformers", "cuda", False),
                    Backend("trl-vllm", "cuda", True, "colocate")):
        cls = fb.trainer_class(backend)
        assert issubclass(cls, GRPOTrainer) and cls is not GRPOTrainer, backend
    # Unsloth patches TRL's class and ships its own shared-prefix loss (PrefixGrouper)
    assert fb.trainer_class(Backend("unsloth", "cuda", True)) is GRPOTrainer


def one_step_adapters(path, tok, tmp_path, dtype, updated=False):
    """The LoRA weights after one whole GRPO step, TRL's GRPOTrainer vs the subclass, same seed:
    the relative L2 difference of the updates (or, with `updated`, of the updated adapters)."""
    from trl import GRPOTrainer

    base = lora_model(path, dtype)
    out = {}
    for name, cls in (("stock", GRPOTrainer), ("shared", fb.shared_prefix_trainer_class())):
        completions = []

        def reward(completion_ids=None, _seen=completions, **kw):
            _seen.append([tuple(c) for c in completion_ids])
            return [float(sum(c) % 7) for c in completion_ids]  # varies within a group: advantages != 0

        model = copy.deepcopy(base)
        trainer = trainer_for(model, tok, tmp_path / name, trainer_cls=cls, reward=reward, max_steps=1,
                              learning_rate=1e-3, loss_type="cispo", epsilon_high=5.0, max_grad_norm=0.1,
                              temperature=0.7, seed=3, save_strategy="no")
        trainer.train()
        out[name] = ({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, completions)
    before = {k: v.detach() for k, v in base.named_parameters() if v.requires_grad}
    (stock, gen_stock), (shared, gen_shared) = out["stock"], out["shared"]
    assert gen_stock == gen_shared  # same rollouts (merged-LoRA generation samples the same tokens)
    delta_stock = {k: stock[k] - before[k] for k in stock}
    delta_shared = {k: shared[k] - before[k] for k in stock}
    assert max(float(v.abs().max()) for v in delta_stock.values()) > 0  # the step changed the adapter
    return rel_l2(stock, shared) if updated else rel_l2(delta_stock, delta_shared)


@pytest.mark.slow
def test_tiny_whole_grpo_step_same_adapter(tiny_setup, tmp_path, monkeypatch):
    path, tok, _ = tiny_setup
    rmsnorm_in_float64(monkeypatch)
    assert one_step_adapters(path, tok, tmp_path, "float64") <= 1e-10


def micro_batch_step(path, tok, tmp_path, cls, micro: int, **config):
    """One GRPO step of 3 story prompts x 4 completions in micro-batches of `micro` rows (plain SGD:
    the update is lr x gradient). Returns the updated LoRA weights, the rollouts, and per loss
    micro-batch (prompt, completion, advantage) of each row, in row order."""
    model = lora_model(path, "float64")
    rows = json.loads((settings.ROOT / "data" / "stories.jsonl").read_text().splitlines()[0])["scraped_body"]
    prompts = [{"prompt": utils.title_messages(rows[i * 80:i * 80 + 150])} for i in range(3)]
    completions, micro_batches = [], []

    def reward(completion_ids=None, **kw):
        completions.append([tuple(c) for c in completion_ids])
        return [float(sum(c) % 7) for c in completion_ids]  # varies within a group: advantages != 0

    steps = 12 // micro
    config = {"loss_type": "cispo", "epsilon_high": 5.0, **config}
    trainer = trainer_for(model, tok, tmp_path, trainer_cls=cls, reward=reward, prompts=prompts, max_steps=1,
                          per_device_train_batch_size=micro, gradient_accumulation_steps=steps,
                          steps_per_generation=steps, num_generations=4, learning_rate=1e-2, optim="sgd",
                          max_grad_norm=1e9, temperature=0.7, seed=4, save_strategy="no", **config)
    compute_loss = trainer._compute_loss

    def spy(model, inputs):
        ids, mask = inputs["prompt_ids"], inputs["prompt_mask"].bool()
        comp, cmask = inputs["completion_ids"], inputs["completion_mask"].bool()
        micro_batches.append([(tuple(ids[r][mask[r]].tolist()), tuple(comp[r][cmask[r]].tolist()),
                               float(inputs["advantages"][r])) for r in range(ids.shape[0])])
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, completions, micro_batches


def runs(prompts: list) -> list:
    """Consecutive equal entries collapsed: [a, a, b, b, a] -> [a, b, a]."""
    return [p for i, p in enumerate(prompts) if i == 0 or p != prompts[i - 1]]


@pytest.mark.slow
@pytest.mark.parametrize("micro, config, per_micro_batch", [
    (4, {}, [1, 1, 1]),  # a micro-batch is one group: one prompt encoding each
    (6, {}, [2, 2]),  # 6 does not fit groups of 4: the middle group continues in the next micro-batch
    (4, {"gradient_checkpointing": True}, [1, 1, 1]),  # the packed layout, layers recomputed in backward
], ids=["one-group", "split-group", "checkpointed"])
def test_tiny_step_over_group_aligned_micro_batches_same_adapter(tiny_setup, tmp_path, monkeypatch, micro, config,
                                                                 per_micro_batch):
    """One whole GRPO step (cispo, several micro-batches accumulated) by TRL's GRPOTrainer (row
    shuffle, TRL's logprob path) and by the subclass (group shuffle, shared-prefix loss): the same
    rollouts and the same adapter, float64 within 1e-10."""
    from trl import GRPOTrainer

    path, tok, _ = tiny_setup
    rmsnorm_in_float64(monkeypatch)
    before = {k: v.detach() for k, v in lora_model(path, "float64").named_parameters() if v.requires_grad}
    stock, gen_stock, stock_micro = micro_batch_step(path, tok, tmp_path / "stock", GRPOTrainer, micro, **config)
    cls = fb.shared_prefix_trainer_class()
    ours, gen_ours, ours_micro = micro_batch_step(path, tok, tmp_path / "ours", cls, micro, **config)
    assert gen_stock == gen_ours  # the same rollouts
    prompts = [[row[0] for row in m] for m in ours_micro]
    assert [len(set(m)) for m in prompts] == per_micro_batch  # distinct prompts per loss micro-batch
    assert all(len(runs(m)) == len(set(m)) for m in prompts)  # each group's rows together
    # TRL's row shuffle cut the groups into more pieces: more prompt encodings than ours
    assert sum(len(runs([row[0] for row in m])) for m in stock_micro) > sum(len(runs(m)) for m in prompts)
    # the groups were moved (not left in generation order), and every field moved with its row
    assert [row[1] for m in ours_micro for row in m] != list(gen_ours[0])
    assert sorted(row for m in ours_micro for row in m) == sorted(row for m in stock_micro for row in m)
    assert max(float((stock[k] - before[k]).abs().max()) for k in stock) > 1e-6  # the step moved the adapter
    delta_stock = {k: stock[k] - before[k] for k in stock}
    delta_ours = {k: ours[k] - before[k] for k in stock}
    assert rel_l2(delta_stock, delta_ours) <= 1e-10


@pytest.mark.slow
def test_partition_dependent_losses_keep_trls_row_shuffle(tiny_setup, tmp_path, monkeypatch, capsys):
    """bnpo divides each micro-batch by its own token count: which rows share a micro-batch changes
    the update, so TRL's row shuffle stays (said once) and the step is still TRL's."""
    from trl import GRPOTrainer

    path, tok, _ = tiny_setup
    rmsnorm_in_float64(monkeypatch)
    bnpo = {"loss_type": "bnpo", "epsilon_high": 0.2}
    stock, _, stock_micro = micro_batch_step(path, tok, tmp_path / "stock", GRPOTrainer, 4, **bnpo)
    ours, _, ours_micro = micro_batch_step(path, tok, tmp_path / "ours", fb.shared_prefix_trainer_class(), 4, **bnpo)
    assert ours_micro == stock_micro  # the same rows in the same micro-batches
    assert capsys.readouterr().out.count("micro-batches from TRL's row shuffle (the loss depends on which rows") == 1
    assert rel_l2(stock, ours) <= 1e-10


def test_group_order_keeps_groups_whole_and_draws_every_order():
    import torch

    torch.manual_seed(0)
    orders = set()
    for _ in range(300):
        order = shared_prefix.group_order(torch.randperm(12).tolist(), 4)
        assert sorted(order) == list(range(12))
        # three blocks of 4, each one group's rows in order
        assert all(order[i:i + 4] == list(range(order[i], order[i] + 4)) and order[i] % 4 == 0 for i in (0, 4, 8))
        orders.add(tuple(order[::4]))
    assert len(orders) == 6  # all 3! orders of the groups
    # a process whose 6 rows start at global row 6 (groups of 4): rows 0-1 end group 1, rows 2-5 are group 2
    for _ in range(20):
        order = shared_prefix.group_order(torch.randperm(6).tolist(), 4, offset=6)
        assert order in ([0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 0, 1])


def test_group_aligned_split_per_process():
    """What each of 2 processes does with its 6 rows of a 12-row batch (3 groups of 4): whole blocks
    in micro-batches of 3, the scalar num_items_in_batch left as is, every field moved alike."""
    import types

    import torch

    for process in (0, 1):
        fake = types.SimpleNamespace(accelerator=types.SimpleNamespace(process_index=process), num_generations=4,
                                     args=types.SimpleNamespace(steps_per_generation=2))
        rows = torch.arange(6) + 6 * process  # global row numbers
        batch = {"prompt_ids": (rows // 4)[:, None].repeat(1, 3), "advantages": rows.double(),
                 "num_items_in_batch": torch.tensor(7.0), "old_per_token_logps": None}
        chunks = fb.SharedPrefixMixin._group_aligned_split(fake, batch)
        assert len(chunks) == 2 and all(c["num_items_in_batch"] == 7 and c["old_per_token_logps"] is None
                                        for c in chunks)
        got = torch.cat([c["advantages"] for c in chunks]).long()
        assert sorted(got.tolist()) == rows.tolist()
        assert torch.equal(torch.cat([c["prompt_ids"][:, 0] for c in chunks]), got // 4)  # fields moved together
        blocks = runs((got // 4).tolist())
        assert len(blocks) == len(set(blocks))  # each group's rows together, in order inside it
        assert all((got[1:] - got[:-1])[(got // 4)[1:] == (got // 4)[:-1]] == 1)


@pytest.mark.slow
def test_merged_lora_generation_is_token_identical_and_restores_weights(tiny_setup):
    import torch

    path, tok, prompts = tiny_setup
    model = lora_model(path)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = [prompts[0]] * 3 + [prompts[1]] * 2
    kw = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        plain = generation.generate_shared_prefix(model, rows, tok.pad_token_id, **kw)
        with shared_prefix.merged_lora(model) as merged:
            fused = generation.generate_shared_prefix(model, rows, tok.pad_token_id, **kw)
    assert merged and torch.equal(plain, fused)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact: no merge/unmerge drift
    # LoRA dropout active in training mode: folding would change the sampling, so it is not done
    model.train()
    for m in model.modules():
        if hasattr(m, "lora_dropout") and "default" in getattr(m, "lora_dropout", {}):
            m.lora_dropout["default"] = torch.nn.Dropout(0.1)
    with shared_prefix.merged_lora(model) as merged:
        assert merged is False


# --------------------------------------------------------------------------------------
# Slow suite: SmolLM2-135M
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_setup(smollm_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_model)
    return smollm_model, tok, story_prompts(tok, chars=200)  # short: float64 activations of 8 rows add up


# One layout per dtype on the real model: test_tiny_logps_and_grads_match_trl runs every layout in both
# dtypes on the same architecture (Llama, grouped KV heads, 2 layers); this adds SmolLM2's 30 layers
# and trained weights. All three layouts in both dtypes took ~290 s on 2 cores; these two take ~70 s.
@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol, shape, checkpointing", [
    ("float64", 1e-10, "uneven", False),  # exact math on the hardest layout: interleaved groups, an all-masked row
    ("float32", 1e-4, "1x8", False),      # the training dtype on the recipes' layout: one story x 8 titles
    # the packed layout under gradient checkpointing (layers recomputed): float64 on one story x 4 titles
    # (one a single token), float32 on the interleaved groups: 12 + 11 s on 2 cores (load average ~2.7)
    ("float64", 1e-10, "1x4", True),
    ("float32", 1e-4, "uneven", True),
])
def test_smollm_logps_and_grads_match_trl(smol_setup, tmp_path, monkeypatch, dtype, tol, shape, checkpointing):
    path, tok, prompts = smol_setup
    if dtype == "float64":
        rmsnorm_in_float64(monkeypatch)
    trainer = trainer_for(lora_model(path, dtype), tok, tmp_path)
    calls = checkpointed(trainer, monkeypatch) if checkpointing else None
    stories, lengths = {**SHAPES, "1x4": ([0] * 4, [24, 5, 1, 17])}[shape]
    batch = trl_batch(tok, prompts, stories, lengths)
    compare(trainer, batch, tol, tol)
    if checkpointing:
        assert len(calls) == layer_passes(trainer, batch)


@pytest.mark.slow
def test_smollm_whole_grpo_step_same_adapter(smol_setup, tmp_path):
    path, tok, _ = smol_setup
    # The updated adapter, as the issue asks. The update itself differs by ~2-3e-4 relative L2 in
    # float32 (measured): summation-order noise in a short step's small gradients. The math is
    # exact: test_tiny_whole_grpo_step_same_adapter compares the updates in float64 to 1e-10.
    assert one_step_adapters(path, tok, tmp_path, "float32", updated=True) <= 1e-4


@pytest.mark.slow
def test_smollm_merged_lora_greedy_is_token_identical(smol_setup):
    import torch

    path, tok, prompts = smol_setup
    model = lora_model(path)
    rows = [prompts[0]] * 2 + [prompts[1]] * 2
    with torch.no_grad():
        plain = generation.generate_shared_prefix(model, rows, tok.pad_token_id, max_new_tokens=16, do_sample=False)
        with shared_prefix.merged_lora(model):
            fused = generation.generate_shared_prefix(model, rows, tok.pad_token_id, max_new_tokens=16, do_sample=False)
    assert torch.equal(plain, fused)
