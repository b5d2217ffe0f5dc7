"""A policy with no Hub and no model files: random-init Qwen2.5-0.5B shapes, a word tokenizer, long prompts.

What `gpu_check.py --bare` and `bench/gpu_step.py` run on a bare CUDA box (torch + transformers
+ peft + trl, no internet), and on a CPU with `tiny`:

- `bare_policy(recipe, device, tiny=False, attn=None)`: Qwen2.5-0.5B-Instruct's architecture
  (configs/qwen2.5-0.5b-instruct.json; `tiny`: 2 layers, hidden 64) with random weights and the
  recipe's LoRA, as a PEFT model, and `word_tokenizer`'s tokenizer;
- `word_tokenizer(vocab_size)`: a word-level ChatML tokenizer built on the spot from the shipped
  stories (`tokenizers` comes with transformers);
- `prompts(tokenizer, count, prompt_tokens)`: title prompts whose articles are stories repeated
  up to about `prompt_tokens` tokens;
- `length_reward`: a fixed reward with variance inside a group (no reward server);
- `SHAPES`: the step shapes (prompts, generations, prompt tokens, new tokens, loss micro-batch),
  "recipe" being recipes/gpu.yaml's.

    python -c "from hntitles.engines import bare_policy as b; from hntitles.runs import settings;
        print(b.bare_policy(settings.Recipe(), 'cpu', tiny=True)[0])"
"""

from __future__ import annotations

import json
from pathlib import Path

import utils

ROOT = Path(__file__).resolve().parents[2]  # the repo (this file is hntitles/<part>/<module>.py)
QWEN_CONFIG = ROOT / "configs" / "qwen2.5-0.5b-instruct.json"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 4096}
SHAPES = {  # prompts, generations, prompt tokens, new tokens, loss micro-batch (one group: the shared-prefix loss)
    "recipe": (8, 6, 8092, 100, 6),  # recipes/gpu.yaml's step (see the arithmetic there)
    "small": (2, 4, 512, 32, 4),
    "tiny": (2, 2, 24, 4, 2),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bare_policy(recipe, device: str, tiny: bool = False, attn: str | None = None):
    """Random-init Qwen2.5-0.5B (or a 2-layer slice with `tiny`) + the recipe's LoRA (a
    settings.Recipe), and a word-level ChatML tokenizer built from the shipped stories: no Hub,
    no model files. float32 on the CPU, bfloat16 on a GPU; `attn` an attn_implementation
    (transformers' default when None)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    values = json.loads(QWEN_CONFIG.read_text())
    values.pop("architectures", None)
    values.pop("torch_dtype", None)
    if tiny:
        values.update(TINY)
    tokenizer = word_tokenizer(values["vocab_size"])
    values.update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**values), dtype=dtype,
                                             **({"attn_implementation": attn} if attn else {})).to(device)
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=list(recipe.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


def word_tokenizer(vocab_size: int):
    """A WordLevel tokenizer over the shipped stories' words (`tokenizers` comes with transformers)."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    text = (ROOT / "data" / "stories.jsonl").read_text(encoding="utf-8")
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))[:max(vocab_size - len(specials), 0)]
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # whitespace separates tokens and is dropped, so decode (which joins with spaces) and encode agree
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def prompts(tokenizer, count: int, prompt_tokens: int) -> list[dict]:
    """`count` title prompts whose articles are stories repeated up to about `prompt_tokens` tokens."""
    stories = [json.loads(line) for line in (ROOT / "data" / "stories.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for i in range(count):
        body = stories[i % len(stories)]["scraped_body"] or "An article."
        while len(tokenizer(body)["input_ids"]) < prompt_tokens - 80:  # room for the template and instruction
            body = body + "\n\n" + body
        ids = tokenizer(body)["input_ids"][:max(prompt_tokens - 80, 8)]
        rows.append({"prompt": utils.title_messages(tokenizer.decode(ids))})
    return rows


def length_reward(completions, **_) -> list[float]:
    """A fixed reward with variance inside a group (so the loss is not zero): the text's length."""
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) / 100 for c in completions]
