"""The main job on a fresh CPU machine: reward server, data check, baseline, GRPO, evaluation, report.

`make demo` runs this after `make setup`. The stages, each timed:

1. reward server: start `local_reward.py` on a free loopback port and wait for GET /health
   (or, with --reward_url, use a server that is already running and healthy). A server the
   demo started is always stopped at the end, also on failure, Ctrl-C or SIGTERM;
2. data: load and filter the train and val splits exactly as a trainer would, and report them;
3. baseline: evaluate the untrained model on val (evaluate.py: greedy + eval_samples sampled
   titles per story, the trainer's validation code) -> runs/base-<recipe> (method "base", step 0);
4. train: `reference_grpo_trainer.py --recipe <recipe>` on CPU, its output streamed and kept
   in <run dir>/demo_train.log -> runs/trl-<recipe>;
5. after: evaluate the trained adapter (the newest checkpoint) the same way: same stories,
   samples per story and seed -> <trl run dir>/demo-eval;
6. report: before/after val reward, the paired difference with a bootstrap 95% interval over
   stories, stories improved, copy fraction, title length, match and trailing rates (so a gain
   made by gaming the reward shows), sample titles beside the originals, the run directories
   and each stage's wall time; printed and written to <trl run dir>/demo_report.md.

A rerun resumes: the trainer continues from the run's last checkpoint (a finished run is not
retrained) and both evaluations are redone. --fresh deletes the demo's two run directories first.

    python demo.py                                       # recipes/cpu.yaml (the 15-minute CPU demo)
    python demo.py --fresh                               # retrain from scratch
    python demo.py --reward_url http://127.0.0.1:7000    # score with an already running `make reward`
    python demo.py --recipe recipes/tiny.yaml --fresh    # every stage in about a minute (learns nothing)
    python demo.py --threads 1                           # on a machine shared with other jobs
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import utils

ROOT = utils.ROOT
TRAINER = ROOT / "reference_grpo_trainer.py"
SERVER = ROOT / "local_reward.py"
REPORT_FILE = "demo_report.md"
AFTER_DIR = "demo-eval"  # <trl run dir>/demo-eval: the demo's evaluation of the final adapter


@dataclass
class DemoArgs:
    recipe: str = field(default="recipes/cpu.yaml", metadata={"help": "Recipe YAML shared by training and evaluation."})
    fresh: bool = field(default=False, metadata={"help": "Delete the demo's run directories first (default: resume)."})
    reward_url: str = field(default="", metadata={
        "help": "Use this already running reward server (must answer /health) instead of starting one."})
    server_args: str = field(default="", metadata={"help": "Extra flags for local_reward.py (e.g. '--rm_path dir')."})
    server_timeout: float = field(default=300.0, metadata={"help": "Seconds to wait for the started server's /health."})
    trainer_args: str = field(default="", metadata={"help": "Extra flags for reference_grpo_trainer.py."})
    threads: int = field(default=0, metadata={
        "help": "Torch CPU threads for evaluation and training (0 = torch's default, one per core). On a machine "
                "busy with other jobs, 1 avoids threads waiting on each other and is often several times faster."})
    show_titles: int = field(default=5, metadata={"help": "Val stories whose titles the report shows."})
    strict: bool = field(default=False, metadata={
        "help": "Exit 1 unless the trained model is measurably better (bootstrap interval above 0)."})


# --------------------------------------------------------------------------------------
# Child processes: the reward server and the trainer
# --------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the demo dies, even by SIGKILL (no orphaned server)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"  # stream the trainer's output as it happens
    return env


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> int | None:
    """SIGTERM, wait `grace` seconds, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerError(RuntimeError):
    """The reward server could not be started or reached."""


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> dict:
    """Poll GET /health until it answers 200; fail fast if the server process exits."""
    import httpx

    deadline, last = time.monotonic() + timeout, "no answer yet"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"reward server exited with code {proc.returncode} before it was healthy; "
                              f"last lines of {log}:\n{_tail(log) if log else ''}")
        try:
            resp = httpx.get(f"{url}/health", timeout=5.0)
            if resp.status_code == 200:
                return resp.json()
            last = f"HTTP {resp.status_code}"
        except httpx.TransportError as e:
            last = type(e).__name__
        time.sleep(0.5)
    raise ServerError(f"reward server at {url} not healthy after {timeout:.0f}s ({last})"
                      + (f"; last lines of {log}:\n{_tail(log)}" if log else ""))


@contextlib.contextmanager
def reward_server(log: Path, timeout: float = 300.0, extra_args: Sequence[str] = (),
                  script: Path = SERVER) -> Iterator[tuple[str, dict]]:
    """Start local_reward.py on a free loopback port; yield (url, health); always stop it."""
    if not script.exists():
        raise ServerError(f"{script} not found")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        # Own session: Ctrl-C reaches the demo only, which then stops the server itself.
        proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), *extra_args],
                                cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        health = wait_healthy(url, timeout, proc, log)
        yield url, health
    finally:
        stop_process(proc, grace=10.0)


def stream(cmd: Sequence[str], log: Path, grace: float = 120.0) -> int:
    """Run `cmd`, copying its output to our stdout and to `log`; Ctrl-C/SIGTERM stop it cleanly.

    The trainer saves a checkpoint on SIGTERM, so an interrupted demo resumes where it stopped.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        with log.open("ab") as out:
            # Raw chunks, not lines: tqdm redraws its bar with \r and would otherwise stall.
            while chunk := os.read(proc.stdout.fileno(), 65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                out.write(chunk)
        return proc.wait()
    finally:
        if proc.poll() is None:
            print(f"\nstopping {Path(cmd[1]).name} (SIGTERM: it saves a checkpoint)...", flush=True)
            stop_process(proc, grace=grace)
        proc.stdout.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


def load_recipe(path: str) -> utils.Recipe:
    """The recipe as evaluate.py and the trainers resolve it (YAML + environment)."""
    (recipe,) = utils.parse_args((utils.Recipe,), "eval", ["--recipe", path])
    return recipe


def run_names(recipe: utils.Recipe, recipe_path: str) -> tuple[str, str]:
    """(baseline, trained) run directory names: base-<recipe> and the trainer's own trl-<recipe>."""
    stem = Path(recipe_path).stem
    return f"base-{stem}", recipe.run_name or f"trl-{stem}"


def check_data(recipe: utils.Recipe) -> dict:
    """check_dataset.py's report on both splits; fail if training or validation cannot work."""
    import check_dataset

    report = check_dataset.main(recipe, check_dataset.CheckArgs(samples=0))
    for split, need in ((recipe.train_split, recipe.prompts_per_step), (recipe.val_split, 2)):
        used = report["splits"][split]["used"]
        if used < need:
            raise utils.DatasetError(f"{recipe.dataset}: split '{split}' has {used} usable stories, needs {need}")
    return report


def evaluate_policy(recipe: utils.Recipe, run_name: str, label: str, method: str, step: int, adapter: str = ""):
    """evaluate.py's main on `recipe` into runs/<run_name>: the trainer's validation procedure."""
    import evaluate

    recipe = dataclasses.replace(copy.deepcopy(recipe), run_name=run_name)
    return evaluate.main(recipe, evaluate.EvalArgs(adapter=adapter, label=label, method=method, step=step))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint-N folder holding an adapter."""
    ckpts = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / "adapter_config.json").exists()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Trained vs untrained on the same val stories."""

    before: dict
    after: dict
    diff: float
    lo: float
    hi: float
    improved: int
    worse: int
    n: int

    @property
    def significant(self) -> bool:
        return self.lo > 0

    @property
    def copy_rose(self) -> bool:
        return self.after["copy_frac_mean"] > self.before["copy_frac_mean"] + 1e-9


def summarize(result: utils.EvalResult) -> dict:
    """The shared-schema numbers of one evaluation, plus the greedy-only mean."""
    row = utils.metrics_row(method="", step=0, split="val", scored=result.all_scored(), wall_time=0)
    row["greedy_reward_mean"] = utils.stats(s.reward for s in result.greedy)["mean"]
    return row


def compare(before: utils.EvalResult, after: utils.EvalResult, seed: int = 0) -> Comparison:
    ids_b, ids_a = [r.get("id") for r in before.rows], [r.get("id") for r in after.rows]
    if ids_b != ids_a:
        raise ValueError("before and after were evaluated on different stories; a paired comparison needs the same")
    b, a = before.per_story_reward(), after.per_story_reward()
    diff, lo, hi = utils.bootstrap_mean_diff(a, b, seed=seed)
    return Comparison(before=summarize(before), after=summarize(after), diff=diff, lo=lo, hi=hi,
                      improved=sum(x > y for x, y in zip(a, b)), worse=sum(x < y for x, y in zip(a, b)), n=len(a))


def trainer_val_rows(run_dir: Path) -> list[dict]:
    """The trainer's own validations (one row per step, the last one logged wins)."""
    rows, _ = utils.read_metrics(run_dir)
    by_step = {r["step"]: r for r in rows if r["split"] == "val" and r["method"] == "trl"}
    return [by_step[k] for k in sorted(by_step)]


def _fmt_duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)" if seconds >= 60 else f"{seconds:.0f} s"


def render_report(cmp: Comparison, before: utils.EvalResult, after: utils.EvalResult, *, recipe: utils.Recipe,
                  recipe_path: str, run_dirs: dict[str, Path], stages: Sequence[tuple[str, float]],
                  show_titles: int = 5, machine: str = "", trainer_val: Sequence[dict] = (),
                  cpu: Sequence[float] | None = None) -> str:
    """The demo's report as Markdown (what it prints and writes to demo_report.md)."""
    samples = 1 + recipe.eval_samples
    verdict = ("**Trained is measurably better**: the 95% interval of the paired difference excludes 0."
               if cmp.significant else
               "**Not measurably better**: the 95% interval of the paired difference includes 0 (or is below it).")
    copy_note = ("**The copy fraction rose**: part of the gain may come from copying the article."
                 if cmp.copy_rose else "The copy fraction did not rise.")
    lines = [
        f"# Demo report: {Path(recipe_path).name}",
        "",
        f"Model `{recipe.model}`, {cmp.n} val stories x {samples} titles each (1 greedy + {recipe.eval_samples} "
        f"sampled at T={recipe.temperature}, <= {recipe.max_completion_tokens} tokens), validator `{recipe.validator}`, "
        f"seed {recipe.seed}. " + ("Title = the first line: generation stops at the first line break."
                                   if recipe.stop_at_newline else
                                   f"Title = first non-empty line of the completion; text after it costs "
                                   f"{recipe.trailing_penalty}."),
        "",
        "## Val reward, untrained vs trained",
        "",
        f"Paired difference (trained - untrained) of the mean reward per story: **{cmp.diff:+.3f}**, "
        f"bootstrap 95% interval [{cmp.lo:+.3f}, {cmp.hi:+.3f}] over {cmp.n} stories; "
        f"{cmp.improved}/{cmp.n} stories improved, {cmp.worse} got worse.",
        "",
        verdict + " " + copy_note,
        "",
        "| metric | untrained | trained | change |",
        "|---|---|---|---|",
    ]
    rows = [("reward mean (all titles)", "reward_mean", "{:.3f}"), ("reward std", "reward_std", "{:.3f}"),
            ("reward p5 / median / p95", None, None), ("greedy reward mean", "greedy_reward_mean", "{:.3f}"),
            ("reward-model score mean", "rm_mean", "{:.3f}"), ("match rate (validator)", "match_rate", "{:.0%}"),
            ("copy fraction", "copy_frac_mean", "{:.2f}"), ("title length (words)", "title_len_mean", "{:.1f}"),
            ("trailing-text rate", "trailing_rate", "{:.0%}")]
    for label, key, fmt in rows:
        if key is None:
            b, a = cmp.before, cmp.after
            lines.append(f"| {label} | {b['reward_p5']:.3f} / {b['reward_median']:.3f} / {b['reward_p95']:.3f} "
                         f"| {a['reward_p5']:.3f} / {a['reward_median']:.3f} / {a['reward_p95']:.3f} | |")
            continue
        b, a = cmp.before[key], cmp.after[key]
        lines.append(f"| {label} | {fmt.format(b)} | {fmt.format(a)} | {fmt.replace('{:', '{:+').format(a - b)} |")
    if trainer_val:
        lines += ["", "Validation inside the training run (same code and stories; the sampling RNG is the "
                  "training run's, so the last row differs a little from the evaluation above):", "",
                  "| step | reward mean | greedy reward | copy fraction | title words | trailing |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['reward_mean']:.3f} | {r['extra'].get('greedy_reward_mean', float('nan')):.3f} "
                  f"| {r['copy_frac_mean']:.2f} | {r['title_len_mean']:.1f} | {r['trailing_rate']:.0%} |" for r in trainer_val]
    lines += ["", "## Sample titles (greedy)", ""]
    for rb, ra in list(zip(before.records(), after.records()))[:show_titles]:
        gb, ga = rb["greedy"], ra["greedy"]
        lines += [f"- original:  {rb['original']}",
                  f"  - untrained: {gb['title'] or '(empty)'}  (reward {gb['reward']:.2f}, copy {gb['copy']:.2f})",
                  f"  - trained:   {ga['title'] or '(empty)'}  (reward {ga['reward']:.2f}, copy {ga['copy']:.2f})"]
    lines += ["", "## Runs", ""]
    lines += [f"- {name}: `{path}`" for name, path in run_dirs.items()]
    cpu = list(cpu or [])
    lines += ["", "## Wall time", "", "| stage | wall time | CPU time |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt_duration(sec)} | {f'{cpu[i]:.0f} s' if i < len(cpu) else ''} |"
              for i, (name, sec) in enumerate(stages)]
    lines += [f"| **total** | **{_fmt_duration(sum(sec for _, sec in stages))}** | "
              f"{f'{sum(cpu):.0f} s' if cpu else ''} |", "",
              "CPU time = user + system seconds of the demo and the trainer (not the reward server); on a busy "
              "machine the wall time grows with the load while the CPU time stays roughly the work done.", ""]
    if machine:
        lines += [machine, ""]
    return "\n".join(lines)


def machine_note(load_before: tuple[float, ...]) -> str:
    load_after = os.getloadavg()
    return (f"Machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} at the start and "
            f"{load_after[0]:.1f} at the end (1-min); `make setup` time is not included. "
            f"Finished {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}.")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the trainer): a load-independent cost."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


class Stages:
    """Wall and CPU time per stage, printed as each one starts and ends."""

    def __init__(self, total: int):
        self.total, self.done, self.cpu = total, [], []

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"\n=== [{len(self.done) + 1}/{self.total}] {name} ===", flush=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.done.append((name, time.perf_counter() - t0))
            self.cpu.append(cpu_seconds() - c0)
            print(f"=== {name}: {self.done[-1][1]:.0f}s (CPU {self.cpu[-1]:.0f}s) ===", flush=True)


def set_threads(threads: int) -> None:
    """Pin torch's thread count here and in the trainer (read at import: call before torch loads)."""
    if threads > 0:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def main(args: DemoArgs) -> Comparison:
    utils.load_env()
    set_threads(args.threads)
    recipe = load_recipe(args.recipe)
    base_name, train_name = run_names(recipe, args.recipe)
    base_dir, train_dir = Path(recipe.runs_dir) / base_name, Path(recipe.runs_dir) / train_name
    if args.fresh:
        for d in (base_dir, train_dir):
            shutil.rmtree(d, ignore_errors=True)
    # The baseline is recomputed on every run, so its old rows would only duplicate step 0.
    shutil.rmtree(base_dir, ignore_errors=True)
    train_dir.mkdir(parents=True, exist_ok=True)
    load0, stages = os.getloadavg(), Stages(5)

    with contextlib.ExitStack() as stack:
        with stages("reward server"):
            if args.reward_url:
                url = args.reward_url.rstrip("/")
                health = wait_healthy(url, timeout=10.0)
                print(f"using the running server at {url}: {health}")
            else:
                log = train_dir / "demo_reward_server.log"
                url, health = stack.enter_context(
                    reward_server(log, args.server_timeout, shlex.split(args.server_args)))
                print(f"started local_reward.py at {url} (log {log}): {health}")
        recipe.reward_url = url

        with stages("data check"):
            check_data(recipe)

        with stages("evaluate untrained (baseline)"):
            before = evaluate_policy(recipe, base_name, "before", "base", 0)

        with stages("train (TRL GRPO, CPU)"):
            if not TRAINER.exists():
                raise SystemExit(f"{TRAINER} not found")
            cmd = [sys.executable, str(TRAINER), "--recipe", args.recipe, "--reward_url", url,
                   *shlex.split(args.trainer_args)]
            print("$ " + shlex.join(cmd), flush=True)
            code = stream(cmd, train_dir / "demo_train.log")
            if code != 0:
                why = {3: "the reward server failed; no reward was made up",
                       75: "interrupted; a checkpoint was saved, rerun to resume"}.get(code, "see the log")
                raise SystemExit(f"training failed (exit {code}: {why}); log: {train_dir / 'demo_train.log'}")
            ckpt = last_checkpoint(train_dir)
            if ckpt is None:
                raise SystemExit(f"training finished but {train_dir} holds no checkpoint-N with an adapter")
            step = int(ckpt.name.split("-")[-1])

        with stages("evaluate trained"):
            # Its own run dir inside the training run: the trainer already logged a val row at this
            # step in runs/trl-*/metrics.jsonl, and a second one there would read as a resumed step.
            shutil.rmtree(train_dir / AFTER_DIR, ignore_errors=True)  # redone on every run, like the baseline
            after = evaluate_policy(recipe, f"{train_name}/{AFTER_DIR}", "after", "trl", step, adapter=str(ckpt))

    cmp = compare(before, after)
    text = render_report(cmp, before, after, recipe=recipe, recipe_path=args.recipe,
                         run_dirs={"untrained (baseline)": base_dir, "trained (TRL)": train_dir, "adapter": ckpt,
                                   "evaluation of the adapter": train_dir / AFTER_DIR},
                         stages=stages.done, show_titles=args.show_titles, machine=machine_note(load0),
                         trainer_val=trainer_val_rows(train_dir), cpu=stages.cpu)
    (train_dir / REPORT_FILE).write_text(text + "\n", encoding="utf-8")
    print("\n" + text)
    print(f"report -> {train_dir / REPORT_FILE}")
    if args.strict and not cmp.significant:
        raise SystemExit(1)
    return cmp


if __name__ == "__main__":
    from transformers import HfArgumentParser

    signal.signal(signal.SIGTERM, _raise_interrupt)  # so every `finally` (server stop) runs on SIGTERM too
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(HfArgumentParser(DemoArgs, description=__doc__.splitlines()[0]).parse_args_into_dataclasses()[0])
