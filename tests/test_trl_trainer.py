"""reference_grpo_trainer.py: real GRPO steps on the tiny model against the real reward server.

Everything that imports TRL lives in this one module (importing it costs ~6 s per process).
The end-to-end runs call `cli()` in-process, the same entry point as `make train-trl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from servers import JsonHandler, serve

import reference_grpo_trainer as rgt
import utils
from hntitles.runs import completions as rollout_tables
from hntitles.runs import rundir, runtime, settings, tracking
from hntitles.trl import config as trl_config

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


class FlakyRewardHandler(JsonHandler):
    def do_GET(self):
        self.reply(200, {"status": "ok"})

    def do_POST(self):
        outer: FlakyRewardServer = self.server.owner
        payload = self.read_json()
        if outer.batches >= outer.ok_batches:
            outer.failed += 1
            self.reply(503, {"error": "overloaded"})
            return
        outer.batches += 1
        # Deterministic: longer titles up to 8 words score higher.
        self.reply(200, {"scores": [min(len(s["title"].split()), 8) / 8 for s in payload["stories"]]})


class FlakyRewardServer:
    """A local reward server that scores `ok_batches` batches, then answers 503 forever.

    Stands in for a reward server that dies mid-run; /health keeps answering 200 so the
    trainer gets past its start-up check and fails inside a GRPO step.
    """

    def __init__(self, ok_batches: int):
        self.ok_batches, self.batches, self.failed = ok_batches, 0, 0
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        _, self.url = self._stack.enter_context(serve(FlakyRewardHandler, owner=self))
        return self

    def __exit__(self, *exc):
        self._stack.close()


def tiny_argv(runs_dir: Path, url: str, *extra: str) -> list[str]:
    return ["--recipe", str(settings.ROOT / "recipes" / "tiny.yaml"), "--runs_dir", str(runs_dir),
            "--run_name", "run", "--reward_url", url, *extra]


def metric_steps(run_dir: Path, split: str) -> list[int]:
    rows, notes = rundir.read_metrics(run_dir)
    assert not notes, notes
    return [r["step"] for r in rows if r["split"] == split]


def rows_like(n: int) -> dict:
    """Dataset columns as TRL hands them to reward functions (one entry per completion)."""
    body = "Rust 1.80 ships LazyCell and LazyLock in the standard library, replacing once_cell for most users."
    return {"title": ["Rust 1.80 released"] * n, "by": ["alice"] * n, "time": ["2024-07-25T12:00:00Z"] * n,
            "url": ["https://blog.rust-lang.org"] * n, "scraped_body": [body] * n}


def completions(*texts: str) -> list:
    return [[{"role": "assistant", "content": t}] for t in texts]


# --------------------------------------------------------------------------------------
# The reward function
# --------------------------------------------------------------------------------------


def test_reward_func_scores_the_batch_with_the_real_server(reward_server):
    client = utils.RewardClient(reward_server)
    log = rgt.RewardLog()
    fn = rgt.make_reward_func(client, None, settings.Recipe(trailing_penalty=0.5, max_completion_tokens=3), log)
    metrics: dict[str, float] = {}
    texts = ["Rust ships LazyCell", "Title: Rust ships LazyLock\nand more text", "   "]

    async def run():
        try:
            return await fn(prompts=[[]] * 3, completions=completions(*texts), completion_ids=[[1, 2, 3], [1], [1, 2]],
                            log_metric=metrics.__setitem__, log_extra=lambda *a: None, **rows_like(3))
        finally:
            await client.aclose()

    rewards = asyncio.run(run())
    assert fn.__name__ == "hn_reward"  # TRL's metric key rewards/hn_reward/mean
    row = {k: v[0] for k, v in rows_like(1).items()}
    expected_rm = utils.RewardClient(reward_server).score_sync(
        [utils.story_for_scoring(t, row) for t in ("Rust ships LazyCell", "Rust ships LazyLock")])
    # Case 1: a clean title gets the server's score (no validator: a non-empty title counts as supported).
    assert rewards[0] == pytest.approx(expected_rm[0])
    # Case 2: "Title:" is stripped, the trailing text is penalised by trailing_penalty.
    assert rewards[1] == pytest.approx(expected_rm[1] - 0.5)
    # Case 3: an empty completion has no title: reward 0 by the rule, and it is not sent.
    assert rewards[2] == 0.0
    assert client.stats == {"requests": 1, "retries": 0, "failures": 0}  # one batched request
    assert [s.title for s in log.pending] == ["Rust ships LazyCell", "Rust ships LazyLock", ""]
    assert metrics["hn/trailing_rate"] == pytest.approx(1 / 3)
    assert metrics["hn/hit_token_cap"] == pytest.approx(1 / 3)  # only the 3-token completion hit the cap
    assert {"hn/rm", "hn/match_rate", "hn/title_words", "hn/copy_frac"} <= set(metrics)


def test_reward_func_raises_when_the_server_fails_and_scores_nothing():
    log = rgt.RewardLog()
    with FlakyRewardServer(ok_batches=0) as server:
        client = utils.RewardClient(server.url, retries=2, backoff=0.01)
        fn = rgt.make_reward_func(client, None, settings.Recipe(trailing_penalty=0.0, max_completion_tokens=8), log)

        async def run():
            try:
                return await fn(prompts=[[]] * 2, completions=completions("A", "B"), completion_ids=[[1], [1]],
                                **rows_like(2))
            finally:
                await client.aclose()

        with pytest.raises(utils.RewardServerError, match="failed after 3 attempts"):
            asyncio.run(run())
    assert server.failed == 3  # first try + 2 retries, then it gives up
    assert log.failures == 1 and log.pending == []  # counted, and no reward was produced


# --------------------------------------------------------------------------------------
# Configuration and run-directory bookkeeping
# --------------------------------------------------------------------------------------


def test_grpo_config_follows_the_recipe(tmp_path):
    from hntitles.engines import fast_backend

    recipe = settings.Recipe(prompts_per_step=3, num_generations=4, max_completion_tokens=17, learning_rate=3e-4,
                          max_grad_norm=0.2, loss_type="cispo", beta=0.01, max_steps=7, save_every=5, seed=3)
    args = trl_config.TrlArgs()
    config = trl_config.grpo_config(recipe, args, fast_backend.Backend("cpu", "cpu", use_vllm=False), tmp_path)
    assert config.per_device_train_batch_size == 12  # completions per step = prompts x generations
    assert config.generation_batch_size == 12 and config.num_generations == 4
    assert (config.max_completion_length, config.learning_rate, config.max_grad_norm) == (17, 3e-4, 0.2)
    assert (config.loss_type, config.beta, config.max_steps, config.save_steps, config.seed) == ("cispo", 0.01, 7, 5, 3)
    assert config.lr_scheduler_type == "constant"
    # CISPO's weight cap comes from the shared recipe (ART gets 1 + epsilon_high = the same cap);
    # TRL's own default would be epsilon = 0.2, five times smaller updates than ART's.
    assert config.epsilon_high == recipe.cispo_max_weight == 5.0
    assert config.use_cpu and not config.bf16 and not config.use_vllm
    assert config.gradient_checkpointing is False  # TRL's default is True; measured slower on CPU
    assert config.report_to == ["tensorboard"]  # the recipe's tracker (the default); TRL's callback is swapped
    none = trl_config.grpo_config(dataclasses.replace(recipe, report_to="none"), args,
                                  fast_backend.Backend("cpu", "cpu", use_vllm=False), tmp_path)
    assert none.report_to in ([], "none", ["none"])


@pytest.mark.parametrize("lines, keep_until, kept_steps, offset, val_done, dropped", [
    # Case: resume at step 2: rows of steps 3+ are redone, so they go.
    ([(1, "train", 1.0), (2, "train", 2.0), (2, "val", 2.5), (3, "train", 3.0)], 2, [1, 2, 2], 2.5, {2}, 1),
    # Case: no checkpoint (keep_until 0): everything goes, the clock restarts.
    ([(1, "train", 1.0)], 0, [], 0.0, set(), 1),
    # Case: a partial last line from a killed process is dropped, not fatal.
    ([(1, "train", 1.0), "partial"], 1, [1], 1.0, set(), 1),
])
def test_trim_metrics(tmp_path, lines, keep_until, kept_steps, offset, val_done, dropped):
    writer = rundir.MetricsWriter(tmp_path)
    for line in lines:
        if line == "partial":
            with writer.path.open("a") as f:
                f.write('{"schema": 1, "st')
            continue
        step, split, wall = line
        writer.write(utils.metrics_row(method="trl", step=step, split=split, scored=[], wall_time=wall))
    got = rundir.trim_metrics(tmp_path, keep_until, "trl")
    assert got == (offset, val_done, dropped)
    assert [r["step"] for r in rundir.read_metrics(tmp_path)[0]] == kept_steps


def test_fails_fast_without_a_reward_server(tmp_path, capsys):
    from servers import free_port

    code = rgt.cli(tiny_argv(tmp_path, f"http://127.0.0.1:{free_port()}", "--reward_retries", "0"))
    assert code == runtime.EXIT_REWARD_SERVER
    assert "reward server not usable" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_unsloth_backend_on_cpu_fails_fast(tmp_path, capsys, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model was loaded before the backend check")

    monkeypatch.setattr(rgt.fast_backend, "load_policy", no_model)  # fail fast = before anything heavy
    code = rgt.cli(tiny_argv(tmp_path, "http://127.0.0.1:9", "--backend", "unsloth"))
    assert code == runtime.EXIT_USAGE
    err = capsys.readouterr().err
    assert "needs an NVIDIA GPU with CUDA" in err and "--backend auto" in err


# --------------------------------------------------------------------------------------
# End to end: real GRPO steps on models/tiny with the real reward server
# --------------------------------------------------------------------------------------


def lora_b_norm(checkpoint: Path) -> float:
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    return sum(float(v.abs().sum()) for k, v in weights.items() if "lora_B" in k)


def test_two_steps_then_sigterm_then_resume(tiny_model, reward_server, tmp_path, capsys):
    """2 steps; a resumed run stopped by SIGTERM mid-run; a rerun to the end: steps continue, none repeat."""
    # validator none: reward = RM score, so groups have variance and the adapter really moves.
    argv = tiny_argv(tmp_path, reward_server, "--validator", "none")
    run_dir = tmp_path / "run"
    assert rgt.cli([*argv, "--max_steps", "2"]) == runtime.EXIT_OK
    assert (run_dir / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert lora_b_norm(run_dir / "checkpoint-2") > 0  # LoRA B starts at zero: two steps changed it
    assert metric_steps(run_dir, "train") == [1, 2] and metric_steps(run_dir, "val") == [2]
    assert (run_dir / "final" / "adapter_config.json").exists() and (run_dir / "eval" / "step-00002.jsonl").exists()
    out = capsys.readouterr().out
    assert "backend cpu: transformers + PEFT on CPU" in out and "[val step 2]" in out and "original:" in out

    # Resume towards 40 steps, no periodic saves; SIGTERM (what Slurm or `kill` sends) after step 3.
    fired = threading.Event()

    def kill_after_step_3():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and 3 not in metric_steps_safe(run_dir):
            time.sleep(0.02)
        fired.set()
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=kill_after_step_3, daemon=True)
    watcher.start()
    code = rgt.cli([*argv, "--max_steps", "40", "--save_every", "100", "--eval_every", "0"])
    watcher.join(timeout=5)
    assert fired.is_set() and code == runtime.EXIT_INTERRUPTED
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-2 (step 2)" in out and "SIGTERM: saving a checkpoint" in out
    stopped_at = max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert 3 <= stopped_at < 40  # the signal, not save_every or max_steps, made this checkpoint
    state = json.loads((run_dir / f"checkpoint-{stopped_at}" / "trainer_state.json").read_text())
    assert state["global_step"] == stopped_at
    assert metric_steps(run_dir, "train") == list(range(1, stopped_at + 1))

    # Rerun to two steps past the interruption: the step count and the clock continue, nothing repeats;
    # this run's --save_every wins over the resumed checkpoint's 100 (transformers restores that one).
    end = stopped_at + 2
    assert rgt.cli([*argv, "--max_steps", str(end), "--eval_every", "0", "--save_every", "1"]) == runtime.EXIT_OK
    assert (run_dir / f"checkpoint-{stopped_at + 1}" / "adapter_model.safetensors").exists()
    assert metric_steps(run_dir, "train") == list(range(1, end + 1))
    assert metric_steps(run_dir, "val") == [2, end]  # end: the final validation
    rows = rundir.read_metrics(run_dir)[0]
    walls = [r["wall_time"] for r in rows]
    assert walls == sorted(walls)
    train = [r for r in rows if r["split"] == "train"]
    assert all(r["method"] == "trl" and r["n"] == 4 and set(r) == set(utils.METRICS_KEYS) for r in train)
    assert all(r["extra"]["step_seconds"] > 0 and r["extra"]["completion_tokens_mean"] > 0 for r in train)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"]["num_generations"] == 2 and config["recipe"]["max_steps"] == end
    # what the optimizer really got (empty recipe knobs: TRL's defaults), and the batch it trained on
    assert config["optimizer_used"]["weight_decay"] == 0.0 and config["optimizer_used"]["adam_beta2"] == 0.999
    assert config["optimizer_used"]["optimizer_steps"] == "per_step"
    assert config["batch"]["per_device_train_batch_size"] == 4 and config["batch"]["world_size"] == 1

    # The tracker (TensorBoard, the default) and the rollout tables followed the resumes: each step once.
    scalars = tracking.read_scalars(run_dir)
    assert [s for s, _ in scalars["hn_train/reward"]] == list(range(1, end + 1))
    assert [s for s, _ in scalars["hn_val/reward"]] == [2, end]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, end + 1))  # TRL's own integration, same file
    assert {"hn_train/loss", "hn_train/grad_norm", "hn_train/learning_rate", "hn_train/entropy"} <= set(scalars)
    assert rollout_tables.steps(run_dir) == list(range(1, end + 1))
    table = rollout_tables.read_step(run_dir, end)
    assert len(table) == 4 and {r["method"] for r in table} == {"trl"} and all(r["story_id"] for r in table)
    assert sum(r["reward"] for r in table) / 4 == pytest.approx(train[-1]["reward_mean"])
    # GRPO's advantages: reward minus its group's mean (TRL scales by the group std; the sign survives)
    for g in (0, 1):
        group = [r for r in table if r["group"] == g]
        mean = sum(r["reward"] for r in group) / len(group)
        assert all((r["advantage"] > 0) == (r["reward"] > mean) for r in group if abs(r["reward"] - mean) > 1e-6)


def metric_steps_safe(run_dir: Path) -> list[int]:
    try:
        return [r["step"] for r in rundir.read_metrics(run_dir)[0] if r["split"] == "train"]
    except OSError:
        return []


def test_reward_server_failing_mid_run_stops_training_loudly(tiny_model, tmp_path, capsys):
    # The server scores step 1's batch, then answers 503 forever: step 2 must fail, not score 0.
    with FlakyRewardServer(ok_batches=1) as server:
        code = rgt.cli(tiny_argv(tmp_path, server.url, "--validator", "none", "--reward_retries", "1",
                                 "--max_steps", "3", "--eval_every", "0"))
    assert code == runtime.EXIT_REWARD_SERVER
    err = capsys.readouterr().err
    assert "the reward server failed during step 2" in err and "no reward was made up" in err
    assert "1 failure(s) recorded" in err and "HTTP 503" in err
    run_dir = tmp_path / "run"
    assert metric_steps(run_dir, "train") == [1]  # step 2 never produced a row
    failures = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and failures[0]["step"] == 2 and failures[0]["client"]["failures"] == 1
    assert server.failed == 2  # first try + 1 retry
    assert not (run_dir / "final").exists()
