"""The TRL trainer's GRPOTrainer: the backend's class, able to resume a multi-process CPU run,
writing the run's model card into every checkpoint, and handing each generation batch's advantages
to the run's rollout tables; TRL's tracker callback,
guarded and writing into the run's tracker.

    from hntitles.trl.trainer import attach_run, trainer_class
"""

from __future__ import annotations

from pathlib import Path

from hntitles.engines import fast_backend
from hntitles.runs import model_card, tracking


def attach_run(trainer, reward_log, tracker: tracking.Tracker) -> None:
    """The trainer's outputs go to the run: each generation batch's advantages to `reward_log`
    (RunTrainer hands them over; the rollout tables read them), and TRL's own integration (its
    train/* and eval/* keys) into the run's tracker, guarded.

    transformers builds its TensorBoardCallback / WandbCallback from report_to; it is swapped
    for one that writes with the tracker's writer (TensorBoard: the same event file; W&B: the
    run the tracker started), whose failures the tracker counts instead of raising, and that
    leaves closing to the tracker (after the final validation, which logs after on_train_end).

    The console keeps transformers' progress bar but not the dict of every log it prints under
    it (30 keys a step): those keys go to the tracker and metrics.jsonl, and the run prints its
    own one-line validation summaries.
    """
    from transformers import ProgressCallback, TrainerCallback
    from transformers.integrations import TensorBoardCallback, WandbCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, *a, **kw):
            pass

    trainer.hn_reward_log = reward_log
    if any(type(c) is ProgressCallback for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress())
    library = {"tensorboard": TensorBoardCallback, "wandb": WandbCallback}.get(tracker.kind)
    if library is None:
        return
    trainer.remove_callback(library)
    inner = library(tb_writer=tracker.writer) if tracker.kind == "tensorboard" else library()

    class Guarded(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            tracker.guard(inner.on_train_begin, *a, **kw)

        def on_log(self, *a, **kw):
            tracker.guard(inner.on_log, *a, **kw)

    Guarded.__name__ = Guarded.__qualname__ = library.__name__
    trainer.add_callback(Guarded())


class CardedCheckpoints:
    """Checkpoints and the output directory carry the run's model card (model_card.write), not TRL's
    draft (it names no base model) nor PEFT's empty template."""

    def create_model_card(self, *args, **kwargs):
        """TRL writes its draft into the output directory before each checkpoint: the run's card instead."""
        if self.is_world_process_zero():
            model_card.write(Path(self.args.output_dir), Path(self.args.output_dir), "trl",
                             self.state.global_step)

    def _save_checkpoint(self, model, trial):
        """The checkpoint, then its card over the empty template PEFT saved with it."""
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            model_card.write(folder, Path(self.args.output_dir), "trl", self.state.global_step)


def trainer_class(backend: fast_backend.Backend):
    """The backend's GRPOTrainer class (fast_backend.trainer_class), able to resume a
    multi-process CPU run.

    transformers 5.17 loads the optimizer state with map_location=args.device when
    world_size > 1, and on the CPU that device is `cpu:<rank>`, which torch.load cannot map
    ("don't know how to restore data location ... cpu:0"). Every CPU tensor lives in one
    memory, so the load is told plain "cpu"; GPU runs are untouched.
    """
    import torch

    base = fast_backend.trainer_class(backend)

    class RunTrainer(CardedCheckpoints, base):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            log = getattr(self, "hn_reward_log", None)  # this process's advantages, in generation order
            if log is not None and output.get("advantages") is not None:
                log.advantages.extend(output["advantages"].detach().float().cpu().tolist())
            return output

        def _load_optimizer_and_scheduler(self, checkpoint):
            device = self.args.device
            if checkpoint is None or device.type != "cpu" or device.index is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            load = torch.load

            def cpu_load(*a, map_location=None, **kw):
                if isinstance(map_location, torch.device) and map_location.type == "cpu":
                    map_location = "cpu"
                return load(*a, map_location=map_location, **kw)

            torch.load = cpu_load
            try:
                return super()._load_optimizer_and_scheduler(checkpoint)
            finally:
                torch.load = load

    RunTrainer.__name__ = RunTrainer.__qualname__ = base.__name__
    return RunTrainer
