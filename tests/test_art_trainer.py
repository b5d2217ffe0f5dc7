"""train.py (the ART loop) on CPU: the real `art` package, a backend double, a fake OpenAI server.

The double stands in for LocalBackend (vLLM + Unsloth, GPU only) and implements what the
loop and ART's TrainableModel call: register, _prepare_backend_for_training,
_model_inference_name, _get_step (from checkpoint folders, like LocalBackend), train,
_delete_checkpoint_files, close. Generation goes over HTTP to tests/fake_openai.py through
the real openai clients; rewards come from a small /score_batch server in this file.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, default_script
from servers import JsonHandler, serve

import utils
from hntitles.art import compat as art_compat
from hntitles.art import config as art_config
from hntitles.runs import rundir, runtime, settings

ROOT = Path(__file__).resolve().parents[1]

train = pytest.importorskip("train")
# Through art_compat.import_art: a bare `import art` would leave ART's transformers patch in place,
# which breaks model forwards under this environment's transformers for the whole session.
art = art_compat.import_art()


# --------------------------------------------------------------------------------------
# Doubles
# --------------------------------------------------------------------------------------


def write_checkpoint(folder: Path) -> None:
    """What LocalBackend saves for a step: a PEFT adapter folder (here one that holds no tensor, but loads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")


class FakeBackend:
    """LocalBackend's surface as 0.5.18 uses it; records every train() call."""

    def __init__(self, fake: FakeOpenAI, path: Path):
        self.fake, self.path = fake, Path(path)
        self.calls: list[tuple[list, dict]] = []
        self.kept: list[list[int]] = []
        self.closed = False

    def _dir(self, model) -> Path:
        return self.path / model.project / "models" / model.name

    def _step(self, model) -> int:
        from art.utils.get_model_step import get_step_from_dir

        return get_step_from_dir(str(self._dir(model)))

    async def register(self, model) -> None:
        model.base_path = str(self.path)  # as LocalBackend.register does
        self._dir(model).mkdir(parents=True, exist_ok=True)

    async def _prepare_backend_for_training(self, model, config=None):
        # LocalBackend saves checkpoint 0 (the fresh adapter) when there is none yet.
        if self._step(model) == 0:
            write_checkpoint(self._dir(model) / "checkpoints" / "0000")
        self.fake.adapters.add(self._model_inference_name(model))
        return self.fake.base_url, "test-key"

    def _model_inference_name(self, model, step=None) -> str:
        return f"{model.name}@{self._step(model) if step is None else step}"

    async def _get_step(self, model) -> int:
        return self._step(model)

    async def train(self, model, trajectory_groups, **kwargs):
        groups = list(trajectory_groups)
        self.calls.append((groups, kwargs))
        step = self._step(model) + 1
        write_checkpoint(self._dir(model) / "checkpoints" / f"{step:04d}")
        self.fake.adapters.add(f"{model.name}@{step}")
        return art.TrainResult(step=step, metrics={"loss/train": 0.25, "loss/grad_norm": 1.5})

    async def _delete_checkpoint_files(self, model, steps_to_keep):
        self.kept.append(sorted(steps_to_keep))
        for d in (self._dir(model) / "checkpoints").iterdir():
            if d.name.isdigit() and int(d.name) not in steps_to_keep:
                shutil.rmtree(d)

    async def close(self) -> None:
        self.closed = True


class RewardStubHandler(JsonHandler):
    def do_GET(self):
        self.reply(200, {"status": "ok"})

    def do_POST(self):
        stub: RewardStub = self.server.owner
        stub.requests += 1
        stories = self.read_json()["stories"]
        if stub.mode == "503":
            return self.reply(503, {"error": "overloaded"})
        if stub.mode == "400":
            return self.reply(400, {"error": "field 'title' is missing"})
        if stub.mode == "short":
            return self.reply(200, {"scores": [1.0]})
        stub.batches.append(stories)
        self.reply(200, {"scores": [0.5 * len(s["title"].split()) for s in stories]})


class RewardStub:
    """POST /score_batch {"stories": [...]} -> {"scores": [0.5 x words in title]}; GET /health.

    `mode` scripts failures: "503" (retried, then fails), "400" (not retried), "short"
    (a reply with the wrong number of scores), "stop" (the server goes away).
    """

    def __init__(self):
        self.mode, self.batches, self.requests = "ok", [], 0
        self._stack = contextlib.ExitStack()
        self.server, self.url = self._stack.enter_context(serve(RewardStubHandler, owner=self))

    def stop(self):  # safe to call twice ("stop" mode stops it mid-test, the fixture again)
        self._stack.close()


@pytest.fixture
def reward():
    stub = RewardStub()
    yield stub
    stub.stop()


@pytest.fixture
def fake():
    server = FakeOpenAI(base_model="base-model").start()
    yield server
    server.stop()


def story(i: int, body: str, split: str) -> dict:
    return {"id": i, "title": f"Original {i}", "by": "pg", "time": "2024-05-01T12:00:00Z",
            "url": f"https://example.com/{i}", "score": 100, "scraped_body": body, "split": split}


def write_stories(path: Path, train_bodies: list[str], val_bodies: list[str]) -> Path:
    rows = [story(i, b, "train") for i, b in enumerate(train_bodies)]
    rows += [story(100 + i, b, "val") for i, b in enumerate(val_bodies)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_recipe(tmp_path: Path, model: Path, reward_url: str, **over) -> settings.Recipe:
    base = dict(model=str(model), dataset=str(tmp_path / "stories.jsonl"), max_train_stories=0, max_val_stories=0,
                prompts_per_step=2, num_generations=3, max_completion_tokens=8, temperature=0.9,
                learning_rate=3e-4, loss_type="cispo", beta=0.04, max_steps=2, eval_every=0, eval_samples=1,
                validator="none", reward_url=reward_url, reward_retries=1, runs_dir=str(tmp_path / "runs"),
                run_name="t", lora_r=4, lora_alpha=8)
    base.update(over)
    return settings.Recipe(**base)


def run(recipe, fake, args=None, expect: int = runtime.EXIT_OK) -> tuple[Path, FakeBackend]:
    holder = {}

    def factory(plan, art_path):
        holder["backend"] = FakeBackend(fake, art_path)
        return holder["backend"]

    code = train.main(recipe, args or art_config.ArtArgs(concurrency=2), backend_factory=factory)
    assert code == expect, code
    return Path(recipe.runs_dir) / recipe.run_name, holder["backend"]


def rows_of(run_dir: Path, split: str) -> list[dict]:
    if not (run_dir / rundir.METRICS_FILE).exists():
        return []
    rows, notes = rundir.read_metrics(run_dir)
    assert not notes
    return [r for r in rows if r["split"] == split]


VARIED = "An article about compilers. " * 3
SAME = "[same] An article where every title is identical. " * 2
ONE = "[one] An article where the server returns one choice. " * 2


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trains_only_on_groups_that_can_teach(tmp_path, tiny_model, fake, reward):
    write_stories(tmp_path / "stories.jsonl", [VARIED + "a", SAME, ONE, VARIED + "b"], [VARIED])
    recipe = make_recipe(tmp_path, tiny_model, reward.url, prompts_per_step=4, max_steps=1)
    run_dir, backend = run(recipe, fake)

    assert len(backend.calls) == 1
    groups, kwargs = backend.calls[0]
    # Only the two varied stories: the [same] group (equal rewards) and the [one] group are dropped.
    assert sorted(g.metadata["story_id"] for g in groups) == ["0", "3"]
    # Loss, learning rate and KL come from the recipe, the loss named explicitly.
    assert kwargs == {"learning_rate": 3e-4, "loss_fn": "cispo", "kl_penalty_coef": 0.04, "scale_rewards": True,
                      "epsilon": 1.0, "epsilon_high": 4.0}
    for g in groups:
        assert len(g.trajectories) == 3
        assert len({t.reward for t in g.trajectories}) == 3
        for t in g.trajectories:
            choice = t.messages_and_choices[-1]
            assert choice.logprobs.content, "the trainable choice carries its logprobs"
            assert [m["role"] for m in t.messages_and_choices[:-1]] == ["system", "user"]
            assert t.reward == pytest.approx(0.5 * t.metrics["length"])  # the stub's RM, validator 'none'
            assert set(t.metrics) >= {"rm", "matches", "length", "copy", "trailing"}
    # Rollouts: one request per story with n = num_generations, logprobs on, the policy's name.
    rollouts = [r for r in fake.chat_requests() if r.get("logprobs")]
    assert len(rollouts) == 4
    assert all(r["model"] == "t@0" and r["n"] == 3 and r["max_tokens"] == 8 and r["temperature"] == 0.9
               for r in rollouts)
    # One batched reward request for all titles of the step (empty titles are never sent).
    assert len(reward.batches[0]) == 3 + 3 + 1 + 3
    (row,) = rows_of(run_dir, "train")
    assert row["extra"]["trainable_groups"] == 2
    assert row["extra"]["dropped_groups"] == {"all rewards equal": 1, "fewer than 2 trajectories": 1}
    assert row["n"] == 10 and row["extra"]["art_step"] == 1 and row["extra"]["loss"] == 0.25


@pytest.mark.slow
def test_skips_step_when_no_group_can_teach(tmp_path, tiny_model, fake, reward):
    write_stories(tmp_path / "stories.jsonl", [SAME, ONE, SAME + "x", ONE + "y"], [VARIED])
    recipe = make_recipe(tmp_path, tiny_model, reward.url, max_steps=3)
    run_dir, backend = run(recipe, fake)

    assert backend.calls == []  # nothing could teach: the backend never trains
    train_rows = rows_of(run_dir, "train")
    assert [r["step"] for r in train_rows] == [1, 2, 3]  # every consumed batch is a step
    for r in train_rows:
        assert r["extra"]["skipped"].startswith("no group can teach")
        assert r["extra"]["trainable_groups"] == 0 and r["extra"]["art_step"] == 0
    state = json.loads((run_dir / "art" / "hn-titles" / "models" / "t" / "state.json").read_text())
    assert state["skipped_steps"] == [1, 2, 3]
    assert [r["step"] for r in rows_of(run_dir, "val")] == [3]  # the final validation still runs


def skip_first_step(prompts_per_step: int):
    """Rollouts of step 1 all get one title (nothing to learn); later ones vary."""
    seen = {"rollouts": 0}

    def script(request: dict) -> list[str]:
        if request.get("logprobs"):
            seen["rollouts"] += 1
            if seen["rollouts"] <= prompts_per_step:
                return ["Same again"] * request["n"]
        return default_script(request)

    return script


@pytest.mark.slow
def test_resume_continues_from_the_models_step(tmp_path, tiny_model, fake, reward):
    bodies = [VARIED + str(i) for i in range(4)]
    write_stories(tmp_path / "stories.jsonl", bodies, [VARIED])
    fake.script = skip_first_step(2)
    run_dir, first = run(make_recipe(tmp_path, tiny_model, reward.url, max_steps=2), fake)
    assert len(first.calls) == 1  # step 1 skipped, step 2 trained (ART step 1)

    fake.script = default_script
    fake.requests.clear()
    run_dir, second = run(make_recipe(tmp_path, tiny_model, reward.url, max_steps=4, eval_every=2), fake)

    assert len(second.calls) == 2  # steps 3 and 4 only
    assert [r for r in fake.chat_requests() if r.get("logprobs")][0]["model"] == "t@1"  # the trained checkpoint
    train_rows = rows_of(run_dir, "train")
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]  # no step twice, none missing
    assert [r["extra"]["art_step"] for r in train_rows] == [0, 1, 2, 3]
    # The batches continue where the first run stopped: the stories in the recipe seed's order, then ART's
    # deterministic epoch shuffle.
    import random

    from art.utils import iterate_dataset

    ids = [str(i) for i in range(4)]
    random.Random(settings.Recipe().seed).shuffle(ids)
    expected = [b.items for b in iterate_dataset(ids, groups_per_step=2, num_epochs=2, use_tqdm=False)]
    assert [r["extra"]["stories"] for r in train_rows] == expected
    # The val at step 2 (end of run 1) is not repeated; run 2 validates at 4.
    assert [r["step"] for r in rows_of(run_dir, "val")] == [2, 4]


@pytest.mark.slow
def test_resume_validates_a_step_that_stopped_before_its_validation(tmp_path, tiny_model, fake, reward, monkeypatch):
    write_stories(tmp_path / "stories.jsonl", [VARIED + str(i) for i in range(4)], [VARIED])
    recipe = make_recipe(tmp_path, tiny_model, reward.url, max_steps=3, eval_every=2)

    class Killed(BaseException):
        """The job was killed after training step 2, before its validation."""

    async def crash(self, step):
        raise Killed
    monkeypatch.setattr(train.Loop, "validate", crash)
    with pytest.raises(Killed):
        run(recipe, fake)
    monkeypatch.undo()
    run_dir, backend = run(recipe, fake)
    assert len(backend.calls) == 1  # only step 3 trains again
    assert [r["step"] for r in rows_of(run_dir, "train")] == [1, 2, 3]
    assert [r["step"] for r in rows_of(run_dir, "val")] == [2, 3]  # step 2's validation caught up first


def titles_by_checkpoint(words: dict[str, int]):
    """Val titles whose length (so reward) depends on the checkpoint being asked."""

    def script(request: dict) -> list[str]:
        if request.get("logprobs") or request["messages"][0]["content"] != utils.TITLE_SYSTEM_PROMPT:
            return default_script(request)
        return [" ".join(["word"] * words.get(request["model"], 1))] * request["n"]

    return script


@pytest.mark.slow
def test_validation_cadence_and_best_checkpoint(tmp_path, tiny_model, fake, reward):
    write_stories(tmp_path / "stories.jsonl", [VARIED + str(i) for i in range(4)], [VARIED + "v1", VARIED + "v2"])
    fake.script = titles_by_checkpoint({"t@2": 6, "t@4": 3, "t@5": 2})
    recipe = make_recipe(tmp_path, tiny_model, reward.url, max_steps=5, eval_every=2, eval_samples=2)
    run_dir, backend = run(recipe, fake)

    val_rows = rows_of(run_dir, "val")
    assert [r["step"] for r in val_rows] == [2, 4, 5]  # every eval_every steps and at the end
    assert [r["reward_mean"] for r in val_rows] == [3.0, 1.5, 1.0]
    assert all(r["n"] == 2 * (1 + 2) for r in val_rows)  # 2 stories x (greedy + 2 samples)
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == [
        "step-00002.jsonl", "step-00004.jsonl", "step-00005.jsonl"]
    greedy = [r for r in fake.chat_requests() if not r.get("logprobs") and r["temperature"] == 0]
    assert len(greedy) == 3 * 2 and all(r["n"] == 1 for r in greedy)
    # ART's delete_checkpoints keeps the latest and the best val/reward (step 2) and nothing else.
    ckpts = run_dir / "art" / "hn-titles" / "models" / "t" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["0002", "0005"]
    assert backend.kept[-1] == [2, 5]
    # Shared schema, method "art", for every row.
    for r in rundir.read_metrics(run_dir)[0]:
        assert tuple(r) == utils.METRICS_KEYS and r["method"] == "art" and r["run"] == "t"


@pytest.mark.slow
@pytest.mark.parametrize("mode", [
    "503",    # the server is overloaded: retried within the bound, then the step fails
    "400",    # the server rejects the request: not retried, the step fails
    "short",  # a reply with the wrong number of scores
    "stop",   # the server went away after the health check
])
def test_reward_server_failures_never_become_rewards(tmp_path, tiny_model, fake, reward, mode):
    write_stories(tmp_path / "stories.jsonl", [VARIED + "a", VARIED + "b"], [VARIED])
    if mode == "stop":
        # The health check at startup passes; then the server dies before the first scores.
        stop_once = {"done": False}

        def script(request):
            if not stop_once["done"]:
                stop_once["done"] = True
                reward.stop()
            return default_script(request)
        fake.script = script
    else:
        reward.mode = mode
    run(make_recipe(tmp_path, tiny_model, reward.url, max_steps=2), fake, expect=runtime.EXIT_REWARD_SERVER)
    run_dir = tmp_path / "runs" / "t"
    assert rows_of(run_dir, "train") == []  # no row: the step did not happen
    model_dir = run_dir / "art" / "hn-titles" / "models" / "t"
    assert not (model_dir / "trajectories").exists()  # nothing scored was logged to ART
    state = json.loads((model_dir / "state.json").read_text()) if (model_dir / "state.json").exists() else {}
    assert "skipped_steps" not in state  # a failure is not a skipped (consumed) step
    if mode == "503":
        assert reward.requests == 2  # reward_retries=1: one retry, then the error


@pytest.mark.slow
def test_generation_failures_are_dropped_and_counted(tmp_path, tiny_model, fake, reward):
    write_stories(tmp_path / "stories.jsonl", [VARIED + "a", "[fail] " + VARIED], [VARIED])
    fake.fail_if = lambda request: "[fail]" in request["messages"][-1]["content"]  # HTTP 500, every retry
    recipe = make_recipe(tmp_path, tiny_model, reward.url, max_steps=1)
    run_dir, backend = run(recipe, fake, art_config.ArtArgs(concurrency=2, max_exceptions=1))
    (row,) = rows_of(run_dir, "train")
    assert row["extra"]["failed_groups"] == 1 and row["extra"]["groups"] == 1
    assert len(backend.calls[0][0]) == 1


@pytest.mark.slow
def test_model_validator_uses_the_base_model(tmp_path, tiny_model, fake, reward):
    write_stories(tmp_path / "stories.jsonl", [VARIED + "a", VARIED + "b"], [VARIED])
    fake.script = lambda req: (["A wrong claim", "A fine supported title"] if req.get("logprobs") and req["n"] == 2
                               else default_script(req))
    recipe = make_recipe(tmp_path, tiny_model, reward.url, max_steps=1, num_generations=2, validator="model")
    run_dir, backend = run(recipe, fake)
    checks = [r for r in fake.chat_requests() if r["messages"][0]["content"] == utils.VALIDATOR_SYSTEM_PROMPT]
    assert checks and all(r["model"] == "base-model" and r["temperature"] == 0 for r in checks)
    for g in backend.calls[0][0]:
        by_title = {t.messages_and_choices[-1].message.content: t for t in g.trajectories}
        assert by_title["A wrong claim"].reward == 0.0 and by_title["A wrong claim"].metrics["matches"] == 0.0
        assert by_title["A fine supported title"].reward == pytest.approx(2.0)


@pytest.mark.integration
def test_end_to_end_with_the_real_reward_server(tmp_path, tiny_model, fake, reward_server, stories_path):
    recipe = make_recipe(tmp_path, tiny_model, reward_server, dataset=str(stories_path), max_train_stories=2,
                         max_val_stories=1, max_steps=1, num_generations=3, validator="embedding", reward_retries=3)
    run_dir, backend = run(recipe, fake)
    train_rows, val_rows = rows_of(run_dir, "train"), rows_of(run_dir, "val")
    assert [r["step"] for r in train_rows] == [1] and [r["step"] for r in val_rows] == [1]
    trajectories = [t for groups, _ in backend.calls for g in groups for t in g.trajectories]
    assert trajectories, "the MiniLM reward separates the scripted titles, so groups can teach"
    for t in trajectories:
        # The real rule: RM score if the embedding validator accepts the title, else 0.
        assert math.isfinite(t.reward)
        assert t.reward == pytest.approx(t.metrics["rm"] if t.metrics["matches"] else 0.0)
    assert len({t.metrics["rm"] for t in trajectories}) > 1
    assert all(r["extra"]["completion_tokens_mean"] > 0 for r in train_rows)


@pytest.mark.slow
def test_importing_art_leaves_transformers_models_working(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    art_compat.import_art()
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert out.logits.shape[:2] == (1, 3)


@pytest.mark.parametrize("lora_r, max_lora_rank", [
    (4, 8),     # below vLLM's smallest rank: 8
    (16, 16),   # an allowed rank stays
    (48, 64),   # rounds up to the next allowed one
])
def test_internal_config_carries_the_recipe(lora_r, max_lora_rank):
    recipe = settings.Recipe(lora_r=lora_r, lora_alpha=32, lora_target_modules=["q_proj", "v_proj"], max_grad_norm=0.3)
    cfg = art_config.internal_config(recipe, art_config.ArtArgs(gpu_memory_utilization=0.6))
    assert cfg["peft_args"]["r"] == lora_r and cfg["peft_args"]["lora_alpha"] == 32
    assert cfg["peft_args"]["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["trainer_args"]["max_grad_norm"] == 0.3
    assert cfg["engine_args"]["gpu_memory_utilization"] == 0.6
    assert cfg["engine_args"]["max_lora_rank"] == max_lora_rank
    assert cfg["init_args"]["max_seq_length"] == settings.MAX_SEQ_TOKENS


@pytest.mark.parametrize("loss, clip", [
    ("cispo", {"epsilon": 1.0, "epsilon_high": 4.0}),  # importance weight clipped to [0, 5], written out
    ("ppo", {}),                                        # ART's PPO defaults (0.2) apply
])
def test_train_kwargs_come_from_the_recipe(loss, clip):
    recipe = settings.Recipe(learning_rate=1e-5, loss_type=loss, beta=0.0)
    assert art_config.train_kwargs(recipe, art_config.ArtArgs(scale_rewards=False)) == {
        "learning_rate": 1e-5, "loss_fn": loss, "kl_penalty_coef": 0.0, "scale_rewards": False, **clip}


@pytest.mark.parametrize("over, message", [
    ({"loss_type": "dapo"}, "not available in ART"),          # TRL-only loss
    ({"num_generations": 1}, "num_generations must be >= 2"),  # no group, no advantage
    ({"validator": "judge"}, "unknown validator"),             # typo
    ({"optimizer": "adamw_8bit"}, "needs bitsandbytes on CUDA"),  # the CPU engine has no 8-bit optimizer
    ({"optimizer": "adam"}, "is not one of"),                   # typo in a shared optimizer knob
])
def test_bad_settings_fail_before_anything_starts(over, message):
    with pytest.raises(ValueError, match=message):
        art_config.check(settings.Recipe(**over), art_config.ArtArgs(backend="cpu"))


@pytest.mark.parametrize("over, args", [
    ({"optimizer_steps": "per_step"}, {}),   # LocalBackend steps once per trajectory
    ({}, {"pack_groups": True}),             # LocalBackend does not pack
    ({}, {"score_temperature": True}),       # LocalBackend scores at temperature 1 (vLLM's raw logprobs)
    ({}, {"token_level_loss": True}),        # LocalBackend weighs a trajectory's tokens 1 / its length
])
def test_cpu_engine_knobs_are_refused_for_the_gpu_backend(over, args):
    with pytest.raises(ValueError, match="only on the CPU engine"):
        art_config.check(settings.Recipe(**over), art_config.ArtArgs(backend="local", **args))


def test_optimizer_knobs_reach_arts_trainer_args_and_the_engine():
    recipe = settings.Recipe(optimizer="adamw", weight_decay=0.0, adam_beta2=0.999)
    cfg = art_config.internal_config(recipe, art_config.ArtArgs())
    assert {k: cfg["trainer_args"][k] for k in ("optim", "weight_decay", "adam_beta2")} == {
        "optim": "adamw_torch", "weight_decay": 0.0, "adam_beta2": 0.999}
    engine = art_config.plan(recipe, art_config.ArtArgs(backend="cpu")).engine
    assert (engine["weight_decay"] == 0.0 and engine["adam_betas"] == [0.9, 0.999]
            and engine["optimizer"] == "torch AdamW")
    default = art_config.plan(settings.Recipe(), art_config.ArtArgs(backend="cpu")).engine  # ART's own values
    assert default["weight_decay"] == 0.1 and default["adam_betas"] == [0.9, 0.99]
    assert default["optimizer_steps"] == "per_sequence" and "paged_adamw_8bit" in default["optimizer"]


def test_score_temperature_reaches_the_engine_and_its_config():
    recipe = settings.Recipe(temperature=0.7)
    cold = art_config.ArtArgs(backend="cpu")
    assert art_config.plan(recipe, cold).engine["logprob_temperature"] == 1.0  # ART's way
    hot = art_config.ArtArgs(backend="cpu", score_temperature=True)
    assert art_config.plan(recipe, hot).engine["logprob_temperature"] == 0.7  # what config.json records
    assert art_config.engine_options(recipe, hot).score_temperature == 0.7
    from hntitles.art import cpu_backend as art_cpu_backend

    with pytest.raises(ValueError, match="score_temperature must be > 0"):
        art_cpu_backend.engine_settings({}, art_cpu_backend.EngineOptions(score_temperature=0.0))


def test_recipe_parsing_reads_shared_and_art_blocks():
    recipe, args = settings.parse_args((settings.Recipe, art_config.ArtArgs), "art",
                                    ["--recipe", str(ROOT / "recipes" / "tiny.yaml"), "--max_exceptions", "2"])
    assert recipe.num_generations == 2 and recipe.loss_type == "cispo"
    assert args.max_exceptions == 2 and recipe.recipe.endswith("tiny.yaml")  # the path names the run directory


@pytest.mark.parametrize("smi, expected", [
    (None, "no NVIDIA driver"),                                               # no driver installed
    ("echo 'No devices were found'; exit 6", "nvidia-smi lists no GPU"),     # driver, no device
    ("echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)'", "sees no CUDA device"),       # a GPU, but this torch is a CPU build
])
def test_gpu_problem_names_what_is_missing(tmp_path, monkeypatch, smi, expected):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if smi is not None:
        (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n")
        (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) if smi is not None else str(tmp_path / "empty"))
    assert expected in train.gpu_problem()


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_local_backend_on_a_cpu_machine_stops_with_the_gpu_message():
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "train.py", "--recipe", "recipes/tiny.yaml", "--backend", "local"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr and "make setup-art" in proc.stderr and "sbatch" in proc.stderr
    assert "--backend cpu" in proc.stderr  # and says what runs here instead
    print(f"exited {proc.returncode} after {time.monotonic() - t0:.1f}s")


@pytest.mark.slow
@pytest.mark.parametrize("max_steps", [
    # ends mid-epoch (4 stories, 2 per step: 2 steps an epoch)
    3,
    # ends on an epoch boundary
    4,
])
def test_rerun_of_a_finished_run_trains_nothing(tmp_path, tiny_model, fake, reward, capsys, max_steps):
    write_stories(tmp_path / "stories.jsonl", [VARIED + str(i) for i in range(4)], [VARIED])
    recipe = make_recipe(tmp_path, tiny_model, reward.url, max_steps=max_steps)
    run_dir, first = run(recipe, fake)
    assert len(first.calls) == max_steps
    capsys.readouterr()
    run_dir, again = run(recipe, fake)
    assert again.calls == [] and f"nothing to do: {max_steps} of max_steps={max_steps}" in capsys.readouterr().out
    assert [r["step"] for r in rows_of(run_dir, "train")] == list(range(1, max_steps + 1))
    assert [r["step"] for r in rows_of(run_dir, "val")] == [max_steps]
    # Raising max_steps continues from the last step.
    run_dir, more = run(make_recipe(tmp_path, tiny_model, reward.url, max_steps=max_steps + 1), fake)
    assert len(more.calls) == 1
    assert [r["step"] for r in rows_of(run_dir, "train")] == list(range(1, max_steps + 2))


@pytest.mark.slow
def test_a_second_writer_on_the_run_dir_stops_at_once(tmp_path, tiny_model, fake, reward, capsys):
    write_stories(tmp_path / "stories.jsonl", [VARIED + str(i) for i in range(4)], [VARIED])
    recipe = make_recipe(tmp_path, tiny_model, reward.url)
    run_dir = Path(recipe.runs_dir) / recipe.run_name
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from hntitles.runs import rundir; "
                               "rundir.RunLock(sys.argv[1], 'trl').acquire(); "
                               "print('held', flush=True); time.sleep(120)", str(run_dir)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train.main(recipe, art_config.ArtArgs(concurrency=2), backend_factory=None) == runtime.EXIT_RUN_DIR_BUSY
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
        assert not (run_dir / rundir.METRICS_FILE).exists() and not (run_dir / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
