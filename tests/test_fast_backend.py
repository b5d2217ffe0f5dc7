"""fast_backend: backend selection, the CPU fail-fast, and the Unsloth wiring against a fake `unsloth`.

Unsloth and vLLM need CUDA (and their install replaces torch), so the GPU path is tested
with a stand-in module that records every call; the code around it is the real code.
"""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import types

import pytest

import utils
from hntitles.engines import fast_backend as fb
from hntitles.engines import generation
from hntitles.engines.fast_backend import Backend, BackendError, Machine
from hntitles.runs import settings

GPU = Machine(cuda=True, unsloth=True, vllm=True)
GPU_BARE = Machine(cuda=True, unsloth=False, vllm=False)
GPU_NO_VLLM = Machine(cuda=True, unsloth=True, vllm=False)
GPU_VLLM_ONLY = Machine(cuda=True, unsloth=False, vllm=True)
CPU = Machine(cuda=False, unsloth=False, vllm=False)
CPU_WITH_UNSLOTH = Machine(cuda=False, unsloth=True, vllm=True)


@pytest.mark.parametrize("requested, machine, use_vllm, expected", [
    # auto on a CPU box: plain transformers + PEFT on the CPU.
    ("auto", CPU, True, ("cpu", "cpu", False)),
    # auto on a CPU box where unsloth happens to be installed: still CPU (it cannot run).
    ("auto", CPU_WITH_UNSLOTH, True, ("cpu", "cpu", False)),
    # auto on a GPU with unsloth + vllm: Unsloth with its vLLM engine.
    ("auto", GPU, True, ("unsloth", "cuda", True)),
    # auto on a GPU with unsloth but no vllm, generation without vLLM requested: Unsloth alone.
    ("auto", GPU_NO_VLLM, False, ("unsloth", "cuda", False)),
    # auto on a GPU with unsloth but no vllm and vLLM wanted: plain transformers (with a note).
    ("auto", GPU_NO_VLLM, True, ("transformers", "cuda", False)),
    # auto on a bare GPU: transformers + PEFT on CUDA.
    ("auto", GPU_BARE, True, ("transformers", "cuda", False)),
    # cpu forces the CPU even on a GPU machine.
    ("cpu", GPU, True, ("cpu", "cpu", False)),
    # transformers uses whatever device exists.
    ("transformers", CPU, True, ("transformers", "cpu", False)),
    ("transformers", GPU, True, ("transformers", "cuda", False)),
    # explicit unsloth without vLLM.
    ("unsloth", GPU_NO_VLLM, False, ("unsloth", "cuda", False)),
    # TRL's own vLLM on a GPU without unsloth.
    ("trl-vllm", GPU_VLLM_ONLY, True, ("trl-vllm", "cuda", True)),
])
def test_select_backend(requested, machine, use_vllm, expected):
    backend = fb.select_backend(requested, use_vllm=use_vllm, machine=machine)
    assert (backend.name, backend.device, backend.use_vllm) == expected


@pytest.mark.parametrize("requested, machine, kwargs, message", [
    # The CPU fail-fast: Unsloth needs CUDA, said plainly, with the way out.
    ("unsloth", CPU_WITH_UNSLOTH, {}, "backend 'unsloth' needs an NVIDIA GPU with CUDA"),
    ("trl-vllm", CPU_WITH_UNSLOTH, {}, "backend 'trl-vllm' needs an NVIDIA GPU with CUDA"),
    # A GPU without the packages: how to install them.
    ("unsloth", GPU_BARE, {}, "make setup-gpu"),
    ("unsloth", GPU_NO_VLLM, {}, "--use_vllm false"),
    ("trl-vllm", GPU_BARE, {}, "needs vllm"),
    ("trl-vllm", GPU, {"use_vllm": False}, "generates with vLLM"),
    # Typos are errors, not a silent default.
    ("unslot", GPU, {}, "unknown backend 'unslot'"),
    ("trl-vllm", GPU, {"vllm_mode": "remote"}, "unknown vllm_mode 'remote'"),
])
def test_select_backend_errors(requested, machine, kwargs, message):
    with pytest.raises(BackendError, match=message.replace("(", r"\(")):
        fb.select_backend(requested, machine=machine, **kwargs)


def test_this_cpu_machine_says_what_runs():
    backend = fb.select_backend("auto")  # the real machine: no CUDA here
    assert backend.describe() == ("backend cpu: transformers + PEFT on CPU (fp32), generation with HF generate "
                                  "(one prefill per distinct prompt); no Unsloth/vLLM on CPU")
    with pytest.raises(BackendError, match="needs an NVIDIA GPU with CUDA"):
        fb.select_backend("unsloth")


@pytest.mark.integration
def test_cli_fails_fast_for_unsloth_on_cpu():
    proc = subprocess.run([sys.executable, "-m", "hntitles.engines.fast_backend", "--backend", "unsloth"],
                          cwd=settings.ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "needs an NVIDIA GPU with CUDA" in proc.stderr and "cuda=False" in proc.stdout


# --------------------------------------------------------------------------------------
# The Unsloth wiring, against a recording fake
# --------------------------------------------------------------------------------------


class FakeTokenizer:
    pad_token = None
    eos_token = "<|im_end|>"


class FakeFastLanguageModel:
    calls: list = []

    @classmethod
    def from_pretrained(cls, **kwargs):
        cls.calls.append(("from_pretrained", kwargs))
        return types.SimpleNamespace(kind="base"), FakeTokenizer()

    @classmethod
    def get_peft_model(cls, model, **kwargs):
        cls.calls.append(("get_peft_model", kwargs))
        return types.SimpleNamespace(kind="peft", base=model)


@pytest.fixture
def fake_unsloth(monkeypatch):
    module = types.ModuleType("unsloth")
    module.__spec__ = importlib.machinery.ModuleSpec("unsloth", loader=None)
    module.FastLanguageModel = FakeFastLanguageModel
    FakeFastLanguageModel.calls = []
    monkeypatch.setitem(sys.modules, "unsloth", module)
    return FakeFastLanguageModel


@pytest.mark.parametrize("use_vllm, four_bit, checkpointing", [
    # The GPU recipe's default: vLLM generation, 16-bit LoRA, no gradient checkpointing.
    (True, False, False),
    # QLoRA with Unsloth's offloaded gradient checkpointing, no vLLM.
    (False, True, True),
])
def test_unsloth_load_policy_wiring(fake_unsloth, use_vllm, four_bit, checkpointing):
    recipe = settings.Recipe(model="Qwen/Qwen2.5-0.5B-Instruct", lora_r=8, lora_alpha=16, lora_dropout=0.05,
                          lora_target_modules=["q_proj", "v_proj"], max_prompt_tokens=8092,
                          max_completion_tokens=100, seed=7)
    args = types.SimpleNamespace(load_in_4bit=four_bit, gpu_memory_utilization=0.55,
                                 gradient_checkpointing=checkpointing)
    model, tokenizer = fb.load_policy(Backend("unsloth", "cuda", use_vllm=use_vllm), recipe, args)
    assert [name for name, _ in fake_unsloth.calls] == ["from_pretrained", "get_peft_model"]
    assert fake_unsloth.calls[0][1] == {
        "model_name": "Qwen/Qwen2.5-0.5B-Instruct", "use_exact_model_name": True, "max_seq_length": 8192,
        "load_in_4bit": four_bit, "fast_inference": use_vllm, "max_lora_rank": 8, "gpu_memory_utilization": 0.55,
        "random_state": 7}
    assert fake_unsloth.calls[1][1] == {
        "r": 8, "target_modules": ["q_proj", "v_proj"], "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none",
        "use_gradient_checkpointing": "unsloth" if checkpointing else False, "random_state": 7}
    assert model.kind == "peft" and model.base.kind == "base"  # the PEFT model goes to GRPOTrainer
    assert tokenizer.pad_token == "<|im_end|>"  # batched generation needs a pad token


@pytest.mark.parametrize("backend, args, expected", [
    # CPU: fp32 on the CPU, no vLLM.
    (Backend("cpu", "cpu", False), {}, {"use_cpu": True, "bf16": False, "fp16": False, "use_vllm": False}),
    # Unsloth: its vLLM engine via use_vllm; checkpointing was decided in get_peft_model.
    (Backend("unsloth", "cuda", True), {}, {"bf16": True, "fp16": False, "use_vllm": True,
                                            "gradient_checkpointing": False}),
    # TRL vLLM colocated: shares the GPU at the given memory share.
    (Backend("trl-vllm", "cuda", True, "colocate"), {"gpu_memory_utilization": 0.4},
     {"bf16": True, "fp16": False, "use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.4}),
    # TRL vLLM server: a `trl vllm-serve` somewhere else.
    (Backend("trl-vllm", "cuda", True, "server"), {"vllm_server_base_url": "http://gpu2:8000"},
     {"bf16": True, "fp16": False, "use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://gpu2:8000"}),
])
def test_grpo_overrides(monkeypatch, backend, args, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    ns = types.SimpleNamespace(**{"gpu_memory_utilization": 0.6, "vllm_server_base_url": "", **args})
    assert fb.grpo_overrides(backend, ns) == expected


def test_import_unsloth_first(fake_unsloth, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # An explicit non-Unsloth backend never imports it.
    assert fb.import_unsloth_first(["--backend", "cpu"]) is False
    # Once transformers is loaded it is too late to patch it first: skip, do not half-patch.
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    assert fb.import_unsloth_first([]) is False
    # Before transformers/trl, on a CUDA machine with unsloth installed: imported first.
    monkeypatch.delitem(sys.modules, "transformers")
    monkeypatch.delitem(sys.modules, "trl", raising=False)
    assert fb.import_unsloth_first(["--recipe", "recipes/gpu.yaml"]) is True


# --------------------------------------------------------------------------------------
# One prefill per distinct prompt (the CPU generation path of training and evaluation)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(smollm_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_model)
    model = AutoModelForCausalLM.from_pretrained(smollm_model).eval()
    bodies = ["Researchers found that a decades-old sorting routine in the C library had a quadratic worst "
              "case that attackers could trigger with crafted input.",
              "We rewrote our build system in a weekend and cut CI times from forty minutes to six."]
    prompts = [tok.apply_chat_template(utils.title_messages(b), add_generation_prompt=True, tokenize=False)
               for b in bodies]
    return model, tok, [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


@pytest.mark.slow
def test_shared_prefix_greedy_equals_plain_generate(smollm):
    import torch

    model, tok, ids = smollm
    rows = [ids[0]] * 3 + [ids[1]] * 2  # unequal groups, prompts of different lengths (left padding)
    assert len(ids[0]) != len(ids[1])
    with torch.no_grad():
        shared = generation.generate_shared_prefix(model, rows, tok.pad_token_id, max_new_tokens=12, do_sample=False)
        tok.padding_side = "left"
        enc = tok.pad({"input_ids": rows}, return_tensors="pt")
        plain = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(shared, plain[:, enc["input_ids"].shape[1]:])


@pytest.mark.slow
def test_shared_prefix_sampling_is_per_row(smollm):
    import torch

    model, tok, ids = smollm
    torch.manual_seed(0)
    with torch.no_grad():
        out = generation.generate_shared_prefix(model, [ids[0]] * 4, tok.pad_token_id, max_new_tokens=8,
                                        do_sample=True, temperature=1.0, top_k=None, top_p=None)
    assert out.shape[0] == 4
    assert len({tuple(r) for r in out.tolist()}) > 1  # the rows share a prefill, not their samples


def test_cut_after_eos_matches_trl_mask():
    assert generation.cut_after_eos([7, 2, 2, 2], [2]) == [7, 2]
    assert generation.cut_after_eos([7, 8, 9], [2, 3]) == [7, 8, 9]
    assert generation.cut_after_eos([3, 9], [2, 3]) == [3]


def test_trainer_class_per_backend():
    from trl import GRPOTrainer

    cpu = fb.trainer_class(Backend("cpu", "cpu", use_vllm=False))
    assert issubclass(cpu, GRPOTrainer) and cpu is not GRPOTrainer
    # trl-vllm: TRL's vLLM generation, the shared-prefix loss; only Unsloth keeps TRL's class
    assert fb.trainer_class(Backend("trl-vllm", "cuda", use_vllm=True, vllm_mode="colocate")) is not GRPOTrainer
    assert fb.trainer_class(Backend("unsloth", "cuda", use_vllm=True)) is GRPOTrainer


@pytest.mark.slow
def test_stop_token_ids_are_every_token_with_a_line_break(smollm):
    _, tok, _ = smollm
    ids = generation.stop_token_ids(tok, ("\n",))
    assert tok.convert_tokens_to_ids(tok.tokenize("\n"))[0] in ids
    assert all("\n" in tok.decode([i]) for i in ids) and len(ids) > 10  # "\n\n", ".\n", "\r\n", ...
    assert generation.stop_token_ids(tok, ()) == []


def test_stop_at_tokens_sets_eos_for_every_engine():
    from transformers import GenerationConfig

    class Model:
        generation_config = GenerationConfig(eos_token_id=2)

    class Config:  # the GRPOConfig field vLLM's stop ids go to
        generation_kwargs = None

    cpu, vllm = Model(), Model()
    vllm.generation_config = GenerationConfig(eos_token_id=[2, 7])
    cpu_config, vllm_config = Config(), Config()
    vllm_config.generation_kwargs = {"top_k": 5}  # kept: the stop ids are added beside what the config had
    fb.stop_at_tokens(Backend("cpu", "cpu", use_vllm=False), cpu, cpu_config, [11, 12])
    assert cpu.generation_config.eos_token_id == [2, 11, 12] and cpu_config.generation_kwargs is None
    fb.stop_at_tokens(Backend("trl-vllm", "cuda", use_vllm=True, vllm_mode="colocate"), vllm, vllm_config, [7, 11])
    assert vllm_config.generation_kwargs == {"top_k": 5, "stop_token_ids": [7, 11]}
    assert vllm.generation_config.eos_token_id == [2, 7, 11]
    untouched, config = Model(), Config()
    untouched.generation_config = GenerationConfig(eos_token_id=2)
    fb.stop_at_tokens(Backend("cpu", "cpu", use_vllm=False), untouched, config, [])
    assert untouched.generation_config.eos_token_id == 2 and config.generation_kwargs is None


@pytest.mark.slow
def test_hf_generator_stops_at_the_first_line_break(smollm):

    model, tok, _ = smollm
    convs = [utils.title_messages("We rewrote our build system in a weekend and cut CI times from forty minutes "
                                  "to six. Here is what we changed and what we would not do again.")]
    import torch

    torch.manual_seed(0)
    g = generation.HFGenerator(model, tok, progress=False)
    stopped = g.generate(convs, n=6, temperature=1.0, max_tokens=40, stop=("\n",))[0]
    torch.manual_seed(0)
    free = g.generate(convs, n=6, temperature=1.0, max_tokens=40)[0]
    for text in stopped:  # nothing after the first line break
        assert "\n" not in text.rstrip("\n"), text
    # the same samples up to the first break: stopping changes where they end, not what they say
    for s, f in zip(stopped, free, strict=True):
        assert f.startswith(s.rstrip("\n")), (s, f)


@pytest.mark.slow
def test_greedy_and_sampled_from_one_prefill_equal_two_passes(smollm):
    """An evaluation's greedy and sampled titles from one prefill per story are the titles of the
    two separate passes under the same seed, batch boundaries and a repeated prompt included."""
    import torch

    model, tok, _ = smollm
    bodies = ["Researchers found that a decades-old sorting routine in the C library had a quadratic worst case.",
              "We rewrote our build system in a weekend and cut CI times from forty minutes to six.",
              "A new open-source database stores time series in columnar files on object storage."]
    convs = [utils.title_messages(b) for b in bodies + bodies[:1]]  # 4 stories: two batches of 3, one repeated
    g = generation.HFGenerator(model, tok, batch_size=3, progress=False)
    kw = dict(n=3, temperature=0.8, max_tokens=10, stop=("\n",))
    torch.manual_seed(7)
    greedy = [c[0] for c in g.generate(convs, n=1, temperature=0.0, max_tokens=10, stop=("\n",))]
    sampled = g.generate(convs, **kw)
    torch.manual_seed(7)
    both = g.generate_greedy_and_sampled(convs, **kw)
    assert both == (greedy, sampled)
    assert greedy[0] == greedy[3] and len({t for s in sampled for t in s}) > 3  # greedy repeats; samples differ


def test_evaluation_uses_one_prefill_when_the_generator_offers_it():
    """evaluate_generator asks a generator with generate_greedy_and_sampled for both at once, and any
    other generator (an endpoint) for two passes; a greedy-only evaluation is one pass either way."""
    import asyncio

    from hntitles.analysis import evaluation

    calls = []

    class Plain:
        name = "plain"

        def generate(self, convs, n, temperature, max_tokens, stop=()):
            calls.append(("generate", n, temperature))
            return [[f"t{i}-{j}" for j in range(n)] for i in range(len(convs))]

    class Both(Plain):
        def generate_greedy_and_sampled(self, convs, n, temperature, max_tokens, stop=()):
            calls.append(("both", n, temperature))
            return [f"t{i}-0" for i in range(len(convs))], [[f"t{i}-{j}" for j in range(n)] for i in range(len(convs))]

    class Client:
        async def score(self, stories):
            return [0.5] * len(stories)

    async def score_completions(client, validator, rows, titles, penalty):
        return [utils.Scored(title=t, rm=0.5, matches=True, trailing=False, reward=0.5) for t in titles]

    rows = [{"scraped_body": "a body", "title": "real"}] * 2
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, "score_completions", score_completions)
        for gen, samples in ((Plain(), 2), (Both(), 2), (Both(), 0)):
            calls.clear()
            r = asyncio.run(evaluation.evaluate_generator(gen, rows, Client(), None, samples, 8, 0.7))
            results[(gen.name, type(gen).__name__, samples)] = (list(calls), [s.title for s in r.greedy],
                                                                 [[s.title for s in ss] for ss in r.sampled])
    assert results[("plain", "Plain", 2)][0] == [("generate", 1, 0.0), ("generate", 2, 0.7)]
    assert results[("plain", "Both", 2)][0] == [("both", 2, 0.7)]
    assert results[("plain", "Both", 0)][0] == [("generate", 1, 0.0)]
    assert results[("plain", "Plain", 2)][1:] == results[("plain", "Both", 2)][1:]
