"""Checkpoints and resume: the loader continues an epoch exactly, a checkpoint is
complete or absent, loading never unpickles code, and a killed or signalled
2-process run resumed ends with the weights of a run that was never stopped.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_rank_state,
    load_training,
    rng_state,
    save_checkpoint,
)
from pipeline.config import load_config
from pipeline.data.loader import TrainLoader, batch_order
from pipeline.data.shards import resolve_shards
from pipeline.signals import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def test_batch_order_is_round_robin_over_readers_with_batches_left():
    assert batch_order([3, 1, 2]) == [0, 1, 2, 0, 2, 0]
    assert batch_order([0, 2]) == [1, 1]
    assert batch_order([]) == []


def loader_for(faces: Path, *overrides: str, rank: int = 0, world: int = 1) -> TrainLoader:
    config = load_config(DEMO, ["data.image_size=32", "data.shuffle_buffer=30", *overrides])
    shards = resolve_shards(str(faces / "train"))
    return TrainLoader(config.data, shards, rank=rank, world_size=world, seed=3)


def epoch_batches(loader: TrainLoader, stop_after: int | None = None) -> list[dict]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == stop_after:
            break
    return batches


@pytest.mark.parametrize(
    ("workers", "batch", "stop"),
    [(0, 8, 7), (2, 8, 5), (2, 16, 3)],  # batch 16 on 2 readers: reader 1 tops up
)
def test_a_resumed_epoch_yields_exactly_the_rest(faces_shards, workers, batch, stop):
    overrides = (f"data.num_workers={workers}", f"data.batch_size={batch}")
    whole = loader_for(faces_shards, *overrides)
    whole.set_epoch(2)
    expected = epoch_batches(whole)

    first = loader_for(faces_shards, *overrides)
    first.set_epoch(2)
    head = epoch_batches(first, stop_after=stop)
    position = json.loads(json.dumps(first.position()))  # what a checkpoint keeps
    second = loader_for(faces_shards, *overrides)
    second.resume(position)
    rest = epoch_batches(second)

    got = head + rest
    assert len(got) == len(expected) == whole.steps_per_epoch
    if workers == 0:  # no read-ahead: the running counts go on exactly
        assert second.bad_counts() == whole.bad_counts()
    for mine, theirs in zip(got, expected):
        assert mine["key"] == theirs["key"]
        assert torch.equal(mine["image"], theirs["image"])  # augmentation too
        assert torch.equal(mine["label"], theirs["label"])


def test_a_position_from_another_world_size_is_refused(faces_shards):
    loader = loader_for(faces_shards, rank=1, world=2)
    position = loader.position() | {"world_size": 4}
    with pytest.raises(ValueError, match="4 ranks"):
        loader.resume(position)


# --- checkpoint files -----------------------------------------------------------------


class Holder:
    """A stateful object, as the trainer registers them."""

    def __init__(self, value: float):
        self.value = torch.tensor([value])

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def tiny_checkpoint(step: int, seed: int) -> Checkpoint:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return Checkpoint(model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                      stateful={"holder": Holder(float(seed))},
                      state={"epoch": 1, "step_in_epoch": 3, "global_step": step},
                      rank_state={"epoch": 2, "step": 3, "consumed": [24, 30]})


def test_a_checkpoint_restores_everything_it_holds(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    saved = tiny_checkpoint(step=7, seed=1)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    path = save_checkpoint(acc, tmp_path, saved, "run: {}\n")
    assert path.name == "step-00000007" and latest_checkpoint(tmp_path) == path

    fresh = tiny_checkpoint(step=0, seed=2)
    load_training(path, fresh)
    for a, b in zip(saved.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    opt_a, opt_b = saved.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert torch.equal(opt_a["state"][0]["exp_avg"], opt_b["state"][0]["exp_avg"])
    assert fresh.scheduler.last_epoch == 1
    assert fresh.stateful["holder"].value.item() == 1.0

    torch.manual_seed(999)
    assert load_rank_state(path, 0) == {"epoch": 2, "step": 3, "consumed": [24, 30]}
    assert torch.equal(torch.rand(3), expected_draw)  # RNG states restored


class Payload:
    """Pickled into a file, running it would create `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_runs_code_from_a_checkpoint(tmp_path):
    from accelerate import Accelerator

    path = save_checkpoint(Accelerator(cpu=True), tmp_path, tiny_checkpoint(3, 1), "")
    marker = tmp_path / "code-ran"
    (path / "training.pt").write_bytes(pickle.dumps({"optimizer": Payload(str(marker))}))
    with pytest.raises(pickle.UnpicklingError):
        load_training(path, tiny_checkpoint(0, 2))
    assert not marker.exists()


CRASH_DURING_SAVE = """
import os, signal, sys
from pathlib import Path
import safetensors.torch
from accelerate import Accelerator
sys.path.insert(0, {tests!r})
from test_resume import tiny_checkpoint
import pipeline.checkpoint as ckpt

run = Path({run!r})
acc = Accelerator(cpu=True)
ckpt.save_checkpoint(acc, run, tiny_checkpoint(10, 1), "")

def half_then_die(tensors, path):
    Path(path).write_bytes(b"half a safetensors file")
    os.kill(os.getpid(), signal.SIGKILL)

ckpt.save_file = half_then_die
ckpt.save_checkpoint(acc, run, tiny_checkpoint(20, 2), "")
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    script = CRASH_DURING_SAVE.format(tests=str(REPO / "tests"), run=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120,
                            capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "step-00000020.partial").is_dir()
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000010"

    restored = tiny_checkpoint(0, 5)
    load_training(latest, restored)
    assert restored.stateful["holder"].value.item() == 1.0

    from accelerate import Accelerator

    save_checkpoint(Accelerator(cpu=True), tmp_path, tiny_checkpoint(30, 3), "")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000010", "step-00000030"]  # the crash's part is gone


def test_rng_state_holds_only_tensors_and_plain_values(tmp_path):
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    torch.load(path, weights_only=True)  # raises if anything needs unpickling


# --- 2 processes: stop, resume, compare ----------------------------------------------

# resnet18 at 32 px, 2 ranks x batch 8: 10 steps per epoch, 20 in all, a
# checkpoint every 3 steps so that a stop lands mid-epoch.
RUN_OVERRIDES = ["model.arch=resnet18", "data.image_size=32", "train.epochs=2",
                 "train.checkpoint_every_steps=3",
                 "train.ema_decay=0.9", "run.log_every_steps=1", "wandb.mode=disabled"]


def launch(faces: Path, out: Path, name: str, procs: int = 2) -> subprocess.Popen:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    args = [sys.executable, *(launcher if procs > 1 else []), "-m", "pipeline.train", str(DEMO),
            f"data.train={faces / 'train'}", f"data.eval.val={faces / 'val'}",
            f"run.output_dir={out}", f"run.name={name}", *RUN_OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    log = open(out / f"{name}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout_s: int = 300) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout_s: int = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while latest_checkpoint(run_dir) is None:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def rank_pids(torchrun: subprocess.Popen) -> list[int]:
    pids = subprocess.run(["pgrep", "-f", "-P", str(torchrun.pid), "pipeline.train"],
                          capture_output=True, text=True).stdout.split()
    assert len(pids) == 2, pids
    return [int(pid) for pid in pids]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "step-00000020" / "model.safetensors"))


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def run_log(out: Path, name: str) -> str:
    return "\n".join(p.read_text() for p in sorted(out.glob(f"{name}-*.log")))


def final_ema(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / "step-00000020" / "training.pt"
    ema = torch.load(path, weights_only=True)["stateful"]["ema"]
    return {"updates": torch.tensor(ema["updates"]), **ema["weights"]}


def assert_same_run(out: Path, name: str, reference: dict, reference_losses: dict) -> None:
    weights = final_weights(out / name)
    assert weights.keys() == reference.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(final_ema(out / name), final_ema(out / "whole"), rtol=0,
                               atol=1e-6)
    # The losses after the resume are those of the same batches: same data order
    mine = losses(out / name)
    for step in range(12, 21):
        assert mine[step] == pytest.approx(reference_losses[step], abs=1e-6), step


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_and_signalled_runs_resume_to_the_same_weights(faces_shards, tmp_path):
    whole = launch(faces_shards, tmp_path, "whole")
    assert finish(whole) == 0, run_log(tmp_path, "whole")[-3000:]
    reference, reference_losses = final_weights(tmp_path / "whole"), losses(tmp_path / "whole")

    # kill -9 of every process as soon as a mid-epoch checkpoint exists
    killed = launch(faces_shards, tmp_path, "killed")
    wait_for_checkpoint(tmp_path / "killed", killed)
    for pid in [*rank_pids(killed), killed.pid]:  # torchrun starts ranks in new sessions
        os.kill(pid, signal.SIGKILL)
    killed.wait()
    assert finish(launch(faces_shards, tmp_path, "killed")) == 0
    log = run_log(tmp_path, "killed")
    assert re.search(r"resumed from .*: epoch 1 at step [3-9] of 10", log), log[-3000:]
    assert_same_run(tmp_path, "killed", reference, reference_losses)

    # SIGUSR1 to one rank only: both stop at the same step, save, exit 75
    stopped = launch(faces_shards, tmp_path, "signalled")
    wait_for_checkpoint(tmp_path / "signalled", stopped)
    os.kill(rank_pids(stopped)[1], signal.SIGUSR1)
    assert finish(stopped) != 0
    log = run_log(tmp_path, "signalled")
    assert "stopped by" in log and f"exiting with code {REQUEUE_EXIT_CODE}" in log, log[-3000:]
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in log  # torchrun's report of the ranks
    assert finish(launch(faces_shards, tmp_path, "signalled")) == 0
    assert_same_run(tmp_path, "signalled", reference, reference_losses)


def test_resume_from_another_runs_checkpoint_is_checked(tmp_path):
    from accelerate import Accelerator

    from pipeline.config import ConfigError, save_config
    from pipeline.train import check_resume_compatible, resume_source

    other = load_config(DEMO, [f"run.output_dir={tmp_path}", "run.name=other"])
    save_config(other, tmp_path / "other.yaml")
    path = save_checkpoint(Accelerator(cpu=True), other.run_dir, tiny_checkpoint(4, 1),
                           (tmp_path / "other.yaml").read_text())
    mine = load_config(DEMO, [f"run.output_dir={tmp_path}", f"train.resume_from={path}"])
    assert resume_source(mine, mine.run_dir) == path
    check_resume_compatible(mine, mine.run_dir)  # same config: fine

    changed = load_config(DEMO, [f"run.output_dir={tmp_path}", f"train.resume_from={path}",
                                 "model.num_classes=2", "loss.name=cross_entropy"])
    with pytest.raises(ConfigError, match="model.num_classes: 1 -> 2"):
        check_resume_compatible(changed, changed.run_dir)

    nowhere = load_config(DEMO, [f"run.output_dir={tmp_path}", f"train.resume_from={tmp_path}"])
    with pytest.raises(ConfigError, match="train.resume_from=.* is not a checkpoint folder"):
        resume_source(nowhere, nowhere.run_dir)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_checkpoint_of_two_processes_resumes_on_one(faces_shards, tmp_path):
    stopped = launch(faces_shards, tmp_path, "resized")
    wait_for_checkpoint(tmp_path / "resized", stopped)
    os.kill(rank_pids(stopped)[0], signal.SIGTERM)
    assert finish(stopped) != 0
    state = json.loads((latest_checkpoint(tmp_path / "resized") / "trainer_state.json")
                       .read_text())
    assert state["world_size"] == 2 and state["step_in_epoch"] > 0

    assert finish(launch(faces_shards, tmp_path, "resized", procs=1)) == 0
    log = run_log(tmp_path, "resized")
    assert "written by 2 processes and this run has 1: the interrupted epoch 1 starts " \
        "again from its beginning" in log, log[-3000:]
    # One process: 20 steps an epoch; epoch 1 again from its start, then epoch 2
    end = state["global_step"] + 2 * 20
    assert (tmp_path / "resized" / "checkpoints" / f"step-{end:08d}").is_dir()
    results = json.loads((tmp_path / "resized" / "eval_results.json").read_text())
    assert results["val"]["num_samples"] == 40


class PositionSink:
    """Stands in for the train loader: records the position it is asked to continue."""

    steps_per_epoch = 10

    def __init__(self):
        self.resumed = None

    def resume(self, position):
        self.resumed = position


def fake_trainer(tmp_path: Path):
    from types import SimpleNamespace

    from accelerate import Accelerator

    parts = tiny_checkpoint(step=0, seed=7)
    config = load_config(DEMO, [f"run.output_dir={tmp_path}", "run.name=r"])
    return SimpleNamespace(config=config, accelerator=Accelerator(cpu=True),
                           run_dir=config.run_dir.resolve(), model=parts.model,
                           optimizer=parts.optimizer, scheduler=parts.scheduler,
                           stateful=parts.stateful, train_loader=PositionSink())


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    from accelerate import Accelerator

    from pipeline.config import ConfigError
    from pipeline.train import resume_if_possible

    trainer = fake_trainer(tmp_path)
    for step in (5, 9):
        ckpt = tiny_checkpoint(step=step, seed=step)
        ckpt.state["world_size"] = 1
        save_checkpoint(Accelerator(cpu=True), trainer.run_dir, ckpt, "")
    folder = trainer.run_dir / "checkpoints"
    (folder / "step-00000009" / "model.safetensors").write_bytes(b"cut short")

    state = resume_if_possible(trainer)
    assert state["global_step"] == 5 and trainer.stateful["holder"].value.item() == 5.0
    assert trainer.train_loader.resumed == {"epoch": 2, "step": 3, "consumed": [24, 30]}
    assert "step-00000009 cannot be loaded: SafetensorError" in caplog.text

    marker = tmp_path / "code-ran"
    (folder / "step-00000005" / "training.pt").write_bytes(
        pickle.dumps({"optimizer": Payload(str(marker))}))
    with pytest.raises(ConfigError, match="no checkpoint of .* could be loaded"):
        resume_if_possible(fake_trainer(tmp_path))
    assert "refused unread" in caplog.text and not marker.exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_signals_during_the_stop_still_exit_75(faces_shards, tmp_path):
    proc = launch(faces_shards, tmp_path, "repeat", procs=1)
    wait_for_checkpoint(tmp_path / "repeat", proc)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        os.kill(proc.pid, signal.SIGUSR1)  # again and again, through the save and the exit
        time.sleep(0.05)
    assert finish(proc, 60) == REQUEUE_EXIT_CODE, run_log(tmp_path, "repeat")[-3000:]
