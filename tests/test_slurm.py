"""launch/slurm.sbatch under a real one-node Slurm cluster started on this machine.

The script's own decisions are tested with a stand-in for the trainer (seconds);
then the demo config trains on the bundled faces with 1 node and 2 tasks (gloo on
the CPU). Skipped only where the Slurm and munge programs are missing; CI installs
them (.ci/run). The cluster's daemons are stopped by pid even when a test fails.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from slurm_cluster import SlurmCluster, missing_binaries, slurm_cluster
from wandb_records import read_run

from pipeline.signals import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm.sbatch"
DEMO = REPO / "configs" / "demo.yaml"
# 160 faces, batch 8 per process, 2 processes: 10 steps per epoch
SMALL = ["data.image_size=32", "train.epochs=2", "run.log_every_steps=1", "wandb.mode=offline"]
STEPS = 2 * 10
# 1 node, 2 tasks of 1 CPU, no GPU; --time stays far from --signal=USR1@300
ALLOCATION = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
              "--time=15"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
STEP_LINE = re.compile(r"epoch \d+/\d+ step \d+/\d+ \|")


def test_script_requeues_on_the_trainers_exit_code():
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE} " in SBATCH.read_text()


@pytest.fixture(scope="module")
def cluster():
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm not installed (missing {', '.join(missing)}): "
                    "apt-get install slurmctld slurmd slurm-client munge")
    with slurm_cluster() as running:
        yield running


def submit(cluster: SlurmCluster, faces: Path, out: Path) -> tuple[str, Path]:
    """Submit the demo as the sbatch script; return the job id and its output file."""
    output = out / "job.out"
    env = {"PYTHON": sys.executable, "WANDB_DIR": str(out), "WANDB_ERROR_REPORTING": "false",
           "TMPDIR": str(out), "OMP_NUM_THREADS": ""}
    args = [*ALLOCATION, f"--output={output}", str(SBATCH), str(DEMO),
            f"data.train={faces / 'train'}", f"data.eval.val={faces / 'val'}",
            f"run.output_dir={out}", "run.name=slurm", *SMALL]
    job_id = cluster.sbatch(*args, env=env, cwd=REPO)
    return job_id, output


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_line(path: Path, pattern: re.Pattern, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not pattern.search(read(path)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no line matching {pattern.pattern!r} in {path} after "
                               f"{timeout_s} s:\n{read(path)[-3000:]}")
        time.sleep(0.5)


def check_preflight(text: str, job_id: str, node: str, restarts: int) -> None:
    port = 20000 + int(job_id) % 20000
    line = (f"preflight: job {job_id} nodes=1 ({node}) master={node}:{port} world_size=2 "
            f"procs_per_node=2 restarts={restarts}")
    assert line in text, text[-3000:]


# Stands in for pipeline.train to test the script alone: exits 75 on SIGUSR1 or
# SIGTERM as the trainer does after its checkpoint, and 0 when started again.
STAND_IN = """\
import os, signal, sys, time
if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
    sys.exit(0)
stop = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: stop.append(signum))
print("stand-in rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"], "ready", flush=True)
deadline = time.monotonic() + 120
while not stop and time.monotonic() < deadline:
    time.sleep(0.1)
sys.exit(75 if stop else 1)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("scancel", "state", "restarts", "says"),
    [
        # Slurm's warning, to the job's steps: the script requeues the job
        (["--signal=USR1"], "COMPLETED", "1", "requeueing job"),
        # A cancel also reaches the batch shell: the job must stay cancelled
        ([], "CANCELLED", "0", "not requeued from here"),
    ],
)
def test_script_requeues_on_the_warning_but_not_on_a_cancel(
        cluster, tmp_path, scancel, state, restarts, says):
    stand_in = tmp_path / "stand_in"
    stand_in.write_text(f"#!{sys.executable}\n{STAND_IN}")
    stand_in.chmod(0o755)
    output = tmp_path / "job.out"
    job_id = cluster.sbatch(*ALLOCATION, f"--output={output}", str(SBATCH), "config.yaml",
                            env={"PYTHON": str(stand_in)}, cwd=tmp_path)
    wait_for_line(output, re.compile(r"(ready\n.*){2}", re.DOTALL), timeout_s=120)

    cluster.run("scancel", *scancel, job_id)
    info = cluster.wait_for_job(job_id, ENDED, timeout_s=120)
    text = read(output)
    assert (info["JobState"], info["Restarts"]) == (state, restarts), text
    assert says in text
    check_preflight(text, job_id, cluster.node, restarts=0)
    assert "stand-in rank 1 of 2 ready" in text and "stand-in rank 0 of 2 ready" in text


@pytest.fixture(scope="module")
def demo_job(cluster, faces_shards, tmp_path_factory):
    """The demo trained to its end by one uninterrupted job."""
    out = tmp_path_factory.mktemp("demo-job")
    job_id, output = submit(cluster, faces_shards, out)
    info = cluster.wait_for_job(job_id, ENDED, timeout_s=480)
    return SimpleNamespace(job_id=job_id, info=info, text=read(output), run_dir=out / "slurm")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_job_trains_to_completion(cluster, demo_job):
    text, info = demo_job.text, demo_job.info
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"

    check_preflight(text, demo_job.job_id, cluster.node, restarts=0)
    assert "world size 2" in text  # both tasks joined one group, not two of one
    assert "parameters identical on all 2 ranks" in text
    assert "epoch 2/2 step 10/10" in text
    assert (demo_job.run_dir / "eval_results.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_warning_signal_checkpoints_requeues_and_resumes(cluster, faces_shards, demo_job,
                                                         tmp_path):
    job_id, output = submit(cluster, faces_shards, tmp_path)
    wait_for_line(output, STEP_LINE, timeout_s=300)

    # What Slurm sends ahead of the time limit (--signal=USR1@...): to the job's
    # steps, that is the trainers, not the batch shell
    cluster.run("scancel", "--signal=USR1", job_id)
    info = cluster.wait_for_job(job_id, ENDED, timeout_s=480)
    text = read(output)
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", info

    first, _, second = text.partition("requeueing job")
    assert second, text[-4000:]
    check_preflight(first, job_id, cluster.node, restarts=0)
    check_preflight(second, job_id, cluster.node, restarts=1)
    resumed = re.search(r"resumed from .*step (\d+)", second)
    assert resumed and 0 < int(resumed.group(1)) < STEPS, second[-4000:]
    check_one_wandb_run(tmp_path / "slurm", int(resumed.group(1)))

    # Continued, not restarted: the same weights as the uninterrupted job's
    torch.testing.assert_close(final_weights(tmp_path / "slurm"),
                               final_weights(demo_job.run_dir), rtol=0, atol=1e-6)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))


def check_one_wandb_run(run_dir: Path, resumed_step: int) -> None:
    """Both parts of the job logged to one wandb run (an offline folder each, one id),
    the second continuing at the step after the checkpoint."""
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    runs = [read_run(folder) for folder in folders]
    assert len({run.run_id for run in runs}) == 1, [run.run_id for run in runs]
    steps = [row["_step"] for run in runs for row in run.rows if "train/loss" in row]
    assert steps == sorted(set(steps)), steps  # no step logged twice
    assert steps[-1] == STEPS and resumed_step + 1 in steps, steps


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cancel_mid_run_leaves_a_checkpoint(cluster, faces_shards, tmp_path):
    job_id, output = submit(cluster, faces_shards, tmp_path)
    wait_for_line(output, STEP_LINE, timeout_s=300)

    cluster.run("scancel", job_id)  # SIGTERM to everything in the job, as on preemption
    info = cluster.wait_for_job(job_id, ENDED, timeout_s=120)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")
    text = read(output)
    assert "stopped by SIGTERM" in text, text[-4000:]
    assert list((tmp_path / "slurm" / "checkpoints").glob("step-*")), text[-4000:]
