"""Model cards (hntitles/runs/model_card.py) and `make rollouts` (rollouts.py), on run directories built here.

The cards both trainers really write are checked in tests/test_demo.py's end-to-end run (every checkpoint and
final/ of both methods); these tests pin what a card says and the upload call, without a network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rollouts
import utils
from hntitles.runs import completions, model_card, rundir, settings

ROOT = Path(__file__).resolve().parents[1]


def fake_run(run_dir: Path, method: str, steps: int = 2, stories=("s1", "s2")) -> Path:
    run_dir.mkdir(parents=True)
    recipe = settings.Recipe(model="models/smollm2-135m-instruct", recipe="recipes/cpu.yaml", max_steps=steps)
    rundir.save_config(run_dir, recipe=recipe)
    rundir.record_in_config(run_dir, data={"train": {"rows": 62, "kept": 58, "used": 58},
                                           "val": {"rows": 17, "kept": 16, "used": 12}},
                            reward_server={"scorer": "minilm", "model": "some/model/dir", "version": "0.1.0"},
                            optimizer_used={"optim": "adamw_torch", "weight_decay": 0.0})
    writer = rundir.MetricsWriter(run_dir)
    for step in range(1, steps + 1):
        scored = [utils.Scored(title=f"{method} title {step}.{i}", rm=0.1 * i, matches=i != 2, trailing=False,
                               reward=0.1 * i if i != 2 else 0.0) for i in range(4)]
        writer.write(utils.metrics_row(method=method, step=step, split="val", scored=scored, wall_time=step))
        completions.write_step(run_dir, step, completions.records(
            method=method, step=step, story_ids=[stories[i // 2] for i in range(4)],
            completions=[s.title for s in scored], scored=scored, advantages=[0.5, -0.5, 1.0, -1.0],
            tokens=[5, 6, 7, 8], group_size=2))
    return run_dir


def test_the_card_names_the_base_model_data_recipe_reward_and_last_validation(tmp_path):
    run_dir = fake_run(tmp_path / "trl-x", "trl")
    folder = run_dir / "checkpoint-2"
    folder.mkdir()
    (folder / "README.md").write_text("# Model Card for Model ID\n[More Information Needed]\n")  # PEFT's template
    card = model_card.write(folder, run_dir, "trl", 2).read_text()
    assert "More Information Needed" not in card and "[None]" not in card
    assert "SmolLM2-135M-Instruct" in card  # the offline default names what it was converted from
    assert "train: 58 stories used" in card and "val: 12 stories used" in card
    assert f"trl {model_card.version('trl')}" in card and "transformers" in card
    assert "recipes/cpu.yaml" in card and "learning_rate=" in card and "adamw_torch" in card
    assert "`minilm`" in card and "validator (embedding" in card
    assert "Last validation: step 2" in card and "PeftModel.from_pretrained" in card
    assert 'ARGS="--adapter' in card and "checkpoint-2" in card
    assert card.startswith("---\nlibrary_name: peft") and "base_model:" not in card  # no hub id to name

    # a hub model is named by its id, in the metadata too; an earlier step's card quotes the validation it had
    config = json.loads((run_dir / "config.json").read_text())
    config["recipe"]["model"] = "Qwen/Qwen2.5-0.5B-Instruct"
    (run_dir / "config.json").write_text(json.dumps(config))
    card = model_card.card_text(run_dir, "trl", 1, folder)
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in card and "Last validation: step 1" in card


def test_save_final_copies_the_adapter_without_training_state_and_writes_its_card(tmp_path):
    run_dir = fake_run(tmp_path / "art-x", "art")
    ckpt = run_dir / "art" / "checkpoints" / "0002"
    ckpt.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "README.md"):
        (ckpt / name).write_text("{}")
    final = model_card.save_final(run_dir, ckpt, "art", 2)
    assert sorted(p.name for p in final.iterdir()) == ["README.md", "adapter_config.json",
                                                       "adapter_model.safetensors"]
    assert "OpenPipe ART" in (final / "README.md").read_text()


def test_push_uploads_the_folder_with_its_card(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(
        ("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(
        ("upload", kw["repo_id"], sorted(p.name for p in Path(kw["folder_path"]).iterdir()))) or "commit-url")
    run_dir = fake_run(tmp_path / "trl-x", "trl")
    (run_dir / "final").mkdir()
    model_card.write(run_dir / "final", run_dir, "trl", 2)
    assert model_card.push(run_dir / "final", "me/hn-titles") == "commit-url"
    assert calls == [("create", "me/hn-titles", {"private": True, "exist_ok": True}),
                     ("upload", "me/hn-titles", ["README.md"])]
    with pytest.raises(ValueError, match="hub_model_id"):
        model_card.push(run_dir / "final", "not a hub id")


def test_rollouts_prints_both_methods_step_side_by_side_and_filters_a_story(tmp_path, capsys):
    trl, art = fake_run(tmp_path / "trl-x", "trl"), fake_run(tmp_path / "art-x", "art", stories=("s2", "s3"))
    columns = rollouts.main(rollouts.RolloutArgs(runs=[str(trl), str(art)], step=2, width=160))
    out = capsys.readouterr().out
    assert [len(c) for c in columns] == [1 + 1 + 2 * 3] * 2
    side = next(line for line in out.splitlines() if "trl title 2.3" in line)
    assert "art title 2.3" in side  # the best of each run's second group, on one line
    assert "A-1.00" in side and "0.300 +" in side  # its reward, verdict and advantage

    columns = rollouts.main(rollouts.RolloutArgs(runs=[str(trl), str(art)], step=0, story="s1", width=160))
    assert sum("story s1" in x for x in columns[0]) == 2 and not any("story s2" in x for x in columns[0])
    assert columns[1][1:] == ["step 1: story s1 not in this step", "step 2: story s1 not in this step"]

    with pytest.raises(SystemExit, match="has rollout tables for steps 1, 2"):
        rollouts.main(rollouts.RolloutArgs(runs=[str(trl)], step=7))
    with pytest.raises(SystemExit, match="no rollout tables"):
        rollouts.main(rollouts.RolloutArgs(runs=[str(tmp_path)], step=1))


def test_a_run_with_push_to_hub_uploads_final_and_a_failed_upload_keeps_it(tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploaded.append(
        (kw["repo_id"], (Path(kw["folder_path"]) / "README.md").read_text())) or "commit-url")
    run_dir = fake_run(tmp_path / "trl-x", "trl")
    config = json.loads((run_dir / "config.json").read_text())
    config["recipe"]["push_to_hub"] = "me/hn-titles"
    (run_dir / "config.json").write_text(json.dumps(config))
    ckpt = run_dir / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    final = model_card.save_final(run_dir, ckpt, "trl", 2)
    assert uploaded == [("me/hn-titles", (final / "README.md").read_text())]

    def offline(self, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", offline)
    with pytest.raises(settings.HubUnavailable, match=r"is saved, but its upload to me/hn-titles failed .*hf upload"):
        model_card.save_final(run_dir, ckpt, "trl", 2)
    assert (final / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="push_to_hub"):
        settings.Recipe(push_to_hub="no-slash").check()
