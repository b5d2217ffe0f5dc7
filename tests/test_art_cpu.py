"""ART's loop on the CPU engine (hntitles/art/cpu_backend.py): the server, logprob fidelity, and train.py
end to end in real processes (a reward server process killed mid-run, SIGTERM, resume, rerun).

The tiny random model cannot write a supported title, so the end-to-end runs use validator
'none' and tests/servers.py's ranking reward server (0.5 x the title's words + 0.01 x its place in
the request): every step trains, and the tests can say so without depending on what the sampler drew.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import finish_trainer, ranking_reward_process, start_trainer

import utils
from hntitles.art import compat as art_compat
from hntitles.art import config as art_config
from hntitles.runs import completions, rundir, runtime, settings, tracking

ROOT = Path(__file__).resolve().parents[1]
train = pytest.importorskip("train")
art = art_compat.import_art()
from hntitles.art import cpu_backend as acb  # noqa: E402  (after import_art: ART's transformers patch undone)
from hntitles.art import cpu_server as art_cpu_server  # noqa: E402

# --------------------------------------------------------------------------------------
# The server, in this process, on the tiny model
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model):
    svc = acb.CpuModelService("t", str(tiny_model), {"peft_args": {"r": 4, "lora_alpha": 8}},
                              str(tmp_path_factory.mktemp("art") / "t"))
    host, port = asyncio.run(svc.start_openai_server(None))
    svc.url = f"http://{host}:{port}"
    yield svc
    svc.close()
    # The server stops with the service: no thread of it outlives the backend.
    assert not [t.name for t in threading.enumerate() if t.name.startswith("art-cpu")]
    with pytest.raises(httpx.TransportError):
        httpx.get(svc.url + "/health", timeout=5)


def chat(service, body: dict | bytes, **kw) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(service.url + "/v1/chat/completions", content=data,
                      headers={"Content-Type": "application/json"}, timeout=120, **kw)


MESSAGES = utils.title_messages("A new compiler for Rust ships today with faster builds.")


@pytest.mark.slow
@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope@0", "messages": MESSAGES}, 404, "model"),                 # a model nobody serves
    ({"model": "t@7", "messages": MESSAGES}, 404, "model"),                    # a step that is not the current one
    ({"model": "t@0", "messages": MESSAGES, "n": 0}, 400, "n"),                # n < 1
    ({"model": "t@0", "messages": MESSAGES, "n": "2"}, 400, "n"),              # n of the wrong type
    ({"model": "t@0", "messages": []}, 400, "messages"),                       # nothing to answer
    ({"model": "t@0", "messages": [{"role": "user"}]}, 400, "messages"),       # a message without content
    ({"model": "t@0", "messages": MESSAGES, "temperature": -1}, 400, "temperature"),
    ({"model": "t@0", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "t@0", "messages": MESSAGES, "max_completion_tokens": 10 ** 9}, 400, "max_completion_tokens"),
    ({"model": "t@0", "messages": MESSAGES, "stop": [1]}, 400, "stop"),
    ({"model": "t@0", "messages": MESSAGES, "top_logprobs": 5}, 400, "top_logprobs"),
    ({"model": "t@0", "messages": MESSAGES, "seed": "x"}, 400, "seed"),
    (b"{not json", 400, "body"),                                                # bad JSON
    (b"[1, 2]", 400, "body"),                                                   # JSON, but not an object
    (b"x" * (art_cpu_server.MAX_BODY_BYTES + 1), 413, "body"),                             # oversized body
])
def test_requests_it_cannot_serve_get_a_4xx_naming_the_field(service, body, status, param):
    resp = chat(service, body)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["param"] == param and error["message"]


@pytest.mark.slow  # the service fixture loads the tiny model
def test_a_content_length_that_is_not_a_number_gets_a_400(service):
    import http.client

    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", "ten")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["param"] == "Content-Length"
    conn.close()


@pytest.mark.slow
def test_models_lists_the_policy_and_the_base(service, tiny_model):
    data = httpx.get(service.url + "/v1/models", timeout=30).json()["data"]
    assert {m["id"]: m["parent"] for m in data} == {str(tiny_model): None, "t@0": str(tiny_model)}
    # train.py's model validator finds the base among them as the one root model
    from hntitles.engines.openai_generator import OpenAIGenerator

    probe = OpenAIGenerator(model="probe", base_url=service.url + "/v1", api_key="x", progress=False)
    assert train.base_model_name(probe) == str(tiny_model)


@pytest.mark.slow
def test_completions_carry_token_ids_logprobs_and_stop(service):
    resp = chat(service, {"model": "t@0", "messages": MESSAGES, "n": 3, "max_tokens": 6, "temperature": 1.0,
                          "logprobs": True, "stop": ["\n"], "seed": 7})
    assert resp.status_code == 200
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for c in body["choices"]:
        tokens = c["logprobs"]["content"]
        assert 1 <= len(tokens) <= 6 and all(t["token"].startswith("token_id:") and t["logprob"] <= 0 for t in tokens)
        assert "\n" not in c["message"]["content"]  # the stop string ends the text and is left out
        assert c["finish_reason"] == ("length" if len(tokens) == 6 else "stop")
    again = chat(service, {"model": "t@0", "messages": MESSAGES, "n": 3, "max_tokens": 6, "temperature": 1.0,
                           "logprobs": True, "stop": ["\n"], "seed": 7}).json()
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in body["choices"]]  # seed repeats
    base = chat(service, {"model": service.base_model, "messages": MESSAGES, "max_completion_tokens": 4,
                          "temperature": 0}).json()
    assert base["choices"][0]["logprobs"] is None and base["usage"]["completion_tokens"] <= 4


@pytest.mark.slow
def test_concurrent_requests_are_all_answered(service):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"model": "t@0", "messages": utils.title_messages(f"Story {i} about databases."), "n": 2,
               "max_tokens": 4, "temperature": 0.0} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda b: chat(service, b), bodies))
    assert all(r.status_code == 200 and len(r.json()["choices"]) == 2 for r in replies)


# --------------------------------------------------------------------------------------
# Fidelity: the trainer's logprobs of a served completion equal the server's
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_greedy_requests_with_their_own_seeds_share_one_batch_and_keep_their_titles(service):
    """A validation sends one greedy request per story, each with its own seed: they run as one batch
    (the seed draws nothing at temperature 0), and each title is the one it gets when sent alone."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"model": "t@0", "messages": utils.title_messages(f"Story {i} about {topic}."), "max_tokens": 6,
               "temperature": 0.0, "seed": 1000 + i}
              for i, topic in enumerate(["databases", "compilers", "a long night of debugging", "GPUs", "Rust",
                                         "the history of Unix and its many descendants", "SQLite", "caches"])]
    alone = [chat(service, b).json()["choices"][0]["message"]["content"] for b in bodies]
    before = service.server.batches
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = [r.json()["choices"][0]["message"]["content"] for r in pool.map(lambda b: chat(service, b), bodies)]
    assert together == alone
    assert service.server.batches - before <= 2  # the first may start alone before the rest arrive


def served_group(service, n: int = 3, max_tokens: int = 8, temperature: float = 1.0):
    """A TrajectoryGroup from one served request, rewards i**2 (none at the mean: every trajectory trains)."""
    from openai import OpenAI

    client = OpenAI(base_url=service.url + "/v1", api_key="x")
    resp = client.chat.completions.create(model=f"{service.model_name}@{service.step}", messages=MESSAGES, n=n,
                                          max_tokens=max_tokens, temperature=temperature, logprobs=True, seed=3)
    return art.TrajectoryGroup([art.Trajectory(messages_and_choices=[*MESSAGES, c], reward=float(i * i))
                                for i, c in enumerate(resp.choices)])


def packed_rows(service, groups, pack: bool) -> list[dict]:
    """ART's own tokenization and packing, as LocalBackend._get_packed_tensors does them."""
    from art.preprocessing.pack import packed_tensors_from_tokenized_results
    from art.preprocessing.tokenize import tokenize_trajectory_groups

    results = list(tokenize_trajectory_groups(service.tokenizer, groups, False, True))
    packed = packed_tensors_from_tokenized_results(results, 2048, pad_token_id=service.tokenizer.eos_token_id,
                                                   truncate_long_results=False, pack_results=pack)
    return packed, acb.trimmed_rows(packed)


def max_logprob_gap(service, rows, temperature: float = 1.0) -> tuple[float, int]:
    import torch

    gap, n = 0.0, 0
    for row in rows:
        new, _ = acb.row_logprobs(service.model, row, reference=False, temperature=temperature)
        with torch.no_grad():
            old = row["logprobs"][0, 1:]  # logprobs[t + 1] was served for the token at t + 1
            mask = row["assistant_mask"][0, 1:]
            gap = max(gap, float((new[0, :-1][mask] - old[mask]).abs().max()))
            n += int(mask.sum())
    return gap, n


@pytest.mark.slow
def test_trainer_logprobs_match_the_servers_before_any_update(service):
    group = served_group(service)
    _, rows = packed_rows(service, [group], pack=False)
    gap, tokens = max_logprob_gap(service, rows)
    assert tokens == sum(len(t.messages_and_choices[-1].logprobs.content) for t in group.trajectories)
    assert gap < 1e-4, f"trainer vs server logprobs differ by {gap:.2e}"
    print(f"tiny: {tokens} completion tokens, max |trainer - server| logprob {gap:.2e}")
    # Packed rows (a group's prompt once, ART's block mask and positions) give the same logprobs.
    _, packed = packed_rows(service, [group], pack=True)
    assert len(packed) == 1 and max_logprob_gap(service, packed)[0] < 1e-4


@pytest.mark.slow
def test_fidelity_when_the_engine_scores_at_the_sampling_temperature(tiny_model, tmp_path):
    """score_temperature: the server returns log-softmax(logits / T) of the request's T and the trainer
    recomputes exactly that (CISPO's ratio is 1 on-policy); at temperature 1 they would differ."""
    svc = acb.CpuModelService("h", str(tiny_model), {"peft_args": {"r": 4, "lora_alpha": 8}}, str(tmp_path / "h"),
                              options=acb.EngineOptions(score_temperature=0.5))
    host, port = asyncio.run(svc.start_openai_server(None))
    svc.url = f"http://{host}:{port}"
    try:
        group = served_group(svc, temperature=0.5)
        for pack in (False, True):
            _, rows = packed_rows(svc, [group], pack=pack)
            gap, tokens = max_logprob_gap(svc, rows, temperature=0.5)
            assert tokens and gap < 1e-4, f"trainer vs server logprobs at T=0.5 differ by {gap:.2e}"
            raw_gap, _ = max_logprob_gap(svc, rows, temperature=1.0)
            assert raw_gap > 1e-2, f"scoring at T=0.5 and at T=1 gave the same logprobs ({raw_gap:.2e})"
        print(f"tiny, T=0.5: {tokens} tokens, max |trainer - server| {gap:.2e} (at T=1: {raw_gap:.2e})")
    finally:
        svc.close()


@pytest.mark.slow
def test_fidelity_on_smollm2(smollm_model, tmp_path):
    svc = acb.CpuModelService("s", str(smollm_model), {"peft_args": {"r": 16, "lora_alpha": 32}}, str(tmp_path / "s"))
    host, port = asyncio.run(svc.start_openai_server(None))
    svc.url = f"http://{host}:{port}"
    try:
        _, rows = packed_rows(svc, [served_group(svc, n=2, max_tokens=12)], pack=False)
        gap, tokens = max_logprob_gap(svc, rows)
        print(f"SmolLM2: {tokens} completion tokens, max |trainer - server| logprob {gap:.2e}")
        assert gap < 1e-4, f"trainer vs server logprobs differ by {gap:.2e}"
    finally:
        svc.close()


@pytest.mark.slow
def test_trimmed_rows_give_the_padded_rows_loss_and_gradients(service):
    """Cutting ART's 2048-token padding and computing the LM head only where the loss looks
    changes nothing: loss, LoRA gradients and the entropy metric equal ART's full-row computation."""
    import torch
    from art.loss import loss_fn

    packed, rows = packed_rows(service, [served_group(service)], pack=False)
    config, dev_config = _configs()
    lora = [p for n, p in service.model.named_parameters() if "lora_" in n]
    saved = [p.detach().clone() for p in lora]
    with torch.no_grad():
        for p in lora:  # PEFT starts lora_B at 0, which would make every lora_A gradient 0
            p.add_(torch.randn_like(p) * 0.05)
    try:
        for i, row in enumerate(rows):
            full = {k: v[i:i + 1] for k, v in packed.items() if hasattr(v, "dim") and v.dim() == 2}
            logits = service.model(input_ids=full["tokens"]).logits.float()
            logp = torch.log_softmax(logits, -1)
            nxt = torch.nn.functional.pad(full["tokens"][:, 1:], (0, 1))
            new = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            entropies = -(logp.exp() * logp).sum(-1).detach()  # ART's _calculate_logprobs: at every position
            art_loss = loss_fn(full, new, None, entropies, dev_config)
            ref = art_loss.policy_loss
            ref_grads = torch.autograd.grad(ref, lora)
            ours, parts = acb.row_loss(service.model, row, config, dev_config)
            grads = torch.autograd.grad(ours, lora)
            assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
            assert parts["loss/entropy"] == pytest.approx(float(art_loss.entropy), rel=1e-5)
            for a, b in zip(grads, ref_grads, strict=True):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    finally:
        with torch.no_grad():
            for p, s in zip(lora, saved, strict=True):
                p.copy_(s)


def _configs():
    from art._backend_training import build_rl_train_configs

    return build_rl_train_configs(learning_rate=1e-3, epsilon=1.0, epsilon_high=4.0)


# --------------------------------------------------------------------------------------
# train.py end to end, real processes
# --------------------------------------------------------------------------------------

def train_cmd(tmp_path: Path, reward_url: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--recipe", str(ROOT / "recipes" / "tiny.yaml"), "--backend", "cpu",
            "--validator", "none", "--reward_url", reward_url, "--reward_retries", "1", "--runs_dir", str(tmp_path),
            "--run_name", "r", "--eval_every", "0", "--eval_samples", "1", "--max_val_stories", "2", *extra]


def wait_for_train_row(run_dir: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if rows_of(run_dir, "train"):
            return
        time.sleep(0.2)
    raise AssertionError(f"no train row appeared (exit {proc.poll()})")


def rows_of(run_dir: Path, split: str) -> list[dict]:
    rows, _ = rundir.read_metrics(run_dir)
    return [r for r in rows if r["split"] == split]


def checkpoints(run_dir: Path) -> list[int]:
    folder = run_dir / "art" / "hn-titles" / "models" / "r" / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_75_then_the_rerun_continues(tmp_path):
    """cispo, ART's defaults: SIGTERM after the first row -> exit 75; the rerun trains the
    remaining steps once each; a third run of the finished run trains nothing."""
    run_dir = tmp_path / "r"
    with ranking_reward_process() as (url, _):
        proc = start_trainer(train_cmd(tmp_path, url, "--max_steps", "4"), tmp_path / "1.log")
        wait_for_train_row(run_dir, proc)
        proc.send_signal(signal.SIGTERM)
        code, log = finish_trainer(proc, tmp_path / "1.log")
        assert code == 75, log[-3000:]
        done = [r["step"] for r in rows_of(run_dir, "train")]
        assert done == list(range(1, len(done) + 1)) and len(done) < 4
        assert checkpoints(run_dir)[-1] == rows_of(run_dir, "train")[-1]["extra"]["art_step"]

        second = start_trainer(train_cmd(tmp_path, url, "--max_steps", "4"), tmp_path / "2.log")
        code, log = finish_trainer(second, tmp_path / "2.log")
        assert code == 0, log[-3000:]
        rows = rows_of(run_dir, "train")
        assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step's row exactly once
        # ART's step counts trained steps: a step none of whose groups can teach is skipped untrained and
        # keeps the step before it. With this reward server only a step of all-empty titles can be skipped.
        trained = [not r["extra"].get("skipped") for r in rows]
        art_steps = list(itertools.accumulate(int(t) for t in trained))
        assert [r["extra"]["art_step"] for r in rows] == art_steps and checkpoints(run_dir)[-1] == art_steps[-1]
        assert sum(trained) >= 3 and all(r["method"] == "art" for r in rows)
        assert all(r["extra"]["train_metrics"]["loss/grad_norm"] > 0 for r, t in zip(rows, trained, strict=True) if t)
        assert [r["step"] for r in rows_of(run_dir, "val")] == [4]
        config = json.loads((run_dir / "config.json").read_text())
        assert config["engine"]["optimizer_steps"] == "per_sequence" and config["engine"]["weight_decay"] == 0.1
        assert config["art"]["backend"] == "cpu"

        # The tracker (TensorBoard, the default) and the rollout tables followed the resume: each step once.
        scalars = tracking.read_scalars(run_dir)
        assert [s for s, _ in scalars["hn_train/reward"]] == [1, 2, 3, 4]
        assert [s for s, _ in scalars["hn_val/reward"]] == [4]
        assert [s for s, _ in scalars["hn_train/grad_norm"]] == [r["step"] for r, t in zip(rows, trained) if t]
        assert completions.steps(run_dir) == [1, 2, 3, 4]
        table = completions.read_step(run_dir, 4)
        assert len(table) == rows[-1]["n"] and {r["method"] for r in table} == {"art"}
        assert sum(r["reward"] for r in table) / len(table) == pytest.approx(rows[-1]["reward_mean"])
        for g in {r["group"] for r in table}:  # ART's advantage: the group's rewards, centred and scaled
            group = [r for r in table if r["group"] == g]
            assert [r["advantage"] for r in group] == pytest.approx(
                completions.art_advantages([r["reward"] for r in group], scale=True))

        # A finished run: nothing trains, nothing is written (in this process: no second model-loading subprocess).
        before = (run_dir / rundir.METRICS_FILE).read_text()
        recipe, args = settings.parse_args((settings.Recipe, art_config.ArtArgs), "art",
                                           train_cmd(tmp_path, url, "--max_steps", "4")[2:])
        assert train.main(recipe, args) == runtime.EXIT_OK
        assert (run_dir / rundir.METRICS_FILE).read_text() == before and checkpoints(run_dir)[-1] == art_steps[-1]


@pytest.mark.slow
def test_reward_server_killed_mid_run_stops_the_step_and_the_rerun_resumes(tmp_path):
    """ppo, packed rows, one optimizer step per ART step, tokens scored at T=0.8 with token-level
    weights (the aligned setting's ART knobs): the reward server process dies mid-run -> the step
    is not trained, exit 3 with the error; a rerun resumes at that step."""
    run_dir = tmp_path / "r"
    knobs = ("--loss_type", "ppo", "--pack_groups", "true", "--optimizer_steps", "per_step", "--max_steps", "6",
             "--temperature", "0.8", "--score_temperature", "true", "--token_level_loss", "true")
    with ranking_reward_process() as (url, server):
        proc = start_trainer(train_cmd(tmp_path, url, *knobs), tmp_path / "1.log")
        wait_for_train_row(run_dir, proc)
        server.kill()
        code, log = finish_trainer(proc, tmp_path / "1.log")
    assert code == 3, log[-3000:]
    assert "reward server failed" in log and "make reward" in log
    rows = rows_of(run_dir, "train")
    trained = [r["step"] for r in rows]
    assert trained == list(range(1, len(trained) + 1)) and len(trained) < 6
    # the failing step left no checkpoint (ART's step counts the steps that trained; a rare skip keeps it)
    assert checkpoints(run_dir)[-1] == sum(not r["extra"].get("skipped") for r in rows)
    with ranking_reward_process() as (url, _):
        code, log = finish_trainer(start_trainer(train_cmd(tmp_path, url, *knobs), tmp_path / "2.log"),
                                   tmp_path / "2.log")
    assert code == 0, log[-3000:]
    rows = rows_of(run_dir, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert sum(not r["extra"].get("skipped") for r in rows) >= 5  # a skip needs every title of a step empty
    assert all(r["extra"]["train_metrics"]["data/step_num_gradient_steps"] == 1.0  # per_step
               for r in rows if not r["extra"].get("skipped"))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["engine"]["pack_groups"] is True and config["train_kwargs"]["loss_fn"] == "ppo"
    assert config["engine"]["logprob_temperature"] == 0.8 and config["engine"]["loss_weights"].startswith("token")


@pytest.mark.slow  # the tiny model's tokenizer
def test_unreachable_reward_server_says_to_start_it(tmp_path, capsys):
    from servers import free_port

    argv = train_cmd(tmp_path, f"http://127.0.0.1:{free_port()}", "--max_steps", "1")[2:]
    assert train.cli(argv) == runtime.EXIT_REWARD_SERVER  # before any model loads
    assert "make reward" in capsys.readouterr().err
    assert not (tmp_path / "r" / rundir.METRICS_FILE).exists()
