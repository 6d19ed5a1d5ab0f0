"""Training features: accumulation, EMA, non-finite loss, SyncBatchNorm, channels_last,
torch.compile, the plateau schedule and early stopping.

Unit tests drive the real `train_step` on a tiny conv net (tests/features_support.py)
and compare with plain PyTorch written out in the test; one test starts two gloo
ranks; one trains the faces end to end with every option on.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from features_support import (
    bare,
    batches,
    make_trainer,
    run_epoch,
    sgd_reference,
    tiny_model,
)
from torch import nn

from pipeline.accumulation import ends_group, group_size, optimizer_steps_per_epoch
from pipeline.config import ConfigError, load_config
from pipeline.ema import EMA
from pipeline.losses import HeadLoss
from pipeline.nonfinite import NonFiniteLossError
from pipeline.runtime import sync_batchnorm
from pipeline.schedule import Monitor, PlateauLR, apply_verdict, build_scheduler
from pipeline.train import main as train_main
from pipeline.train import train_step

REPO = Path(__file__).resolve().parents[1]
SUPPORT = Path(__file__).with_name("features_support.py")


def copy_of(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def assert_same_params(model: nn.Module, reference: nn.Module, atol: float = 1e-6) -> None:
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=atol)


# --- gradient accumulation ------------------------------------------------------------


def test_accumulation_groups_follow_the_written_rule():
    # S = 10 micro-batches, k = 4: groups of 4, 4 and the remaining 2
    assert optimizer_steps_per_epoch(10, 4) == 3
    assert [group_size(i, 10, 4) for i in range(1, 11)] == [4] * 8 + [2] * 2
    assert [i for i in range(1, 11) if ends_group(i, 10, 4)] == [4, 8, 10]
    assert optimizer_steps_per_epoch(12, 4) == 3 and optimizer_steps_per_epoch(7, 1) == 7
    # k larger than the epoch: one short group
    assert optimizer_steps_per_epoch(3, 5) == 1
    assert [group_size(i, 3, 5) for i in (1, 2, 3)] == [3, 3, 3]


def test_accumulation_counts_optimizer_steps_with_a_remainder(tmp_path):
    start = tiny_model()
    trainer = make_trainer(copy_of(start), 10, ["train.grad_accum_steps=4", "train.epochs=2"])
    steps_taken = []
    trainer.optimizer.optimizer.register_step_post_hook(lambda *_: steps_taken.append(1))
    data = batches(10)

    stepped = run_epoch(trainer, data)

    assert stepped == [False] * 3 + [True] + [False] * 3 + [True, False, True]
    assert len(steps_taken) == 3 and trainer.state["global_step"] == 3
    assert trainer.scheduler.last_epoch == 3  # the LR schedule counts optimizer steps
    # The short last group is the mean over its own 2 micro-batches
    reference = sgd_reference(start, [data[0:4], data[4:8], data[8:10]])
    assert_same_params(bare(trainer), reference)


def test_accumulating_k_micro_batches_equals_one_big_batch():
    start = tiny_model()
    data = batches(3, size=4)
    accumulated = make_trainer(copy_of(start), 3, ["train.grad_accum_steps=3"])
    run_epoch(accumulated, data)
    one_batch = make_trainer(copy_of(start), 1)
    big = {key: torch.cat([b[key] for b in data]) for key in ("image", "label")}
    run_epoch(one_batch, [big])

    assert_same_params(bare(accumulated), bare(one_batch))
    assert_same_params(bare(accumulated), sgd_reference(start, [data]))
    moved = max((p - q).abs().max().item()
                for p, q in zip(bare(accumulated).parameters(), start.parameters()))
    assert moved > 1e-4  # the step did something


def test_the_total_schedule_is_sized_in_optimizer_steps():
    config = load_config(None, ["optim.warmup_fraction=0.5", "optim.lr=1.0"])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    # 3 epochs of ceil(10 / 4) = 3 steps: warmup int(0.5 * 9) = 4 steps
    scheduler = build_scheduler(config, optimizer, 3 * optimizer_steps_per_epoch(10, 4))
    lrs = []
    for _ in range(9):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # cosine from step 4 to 9: progress (s - 4) / 5
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * p / 5)) for p in range(5)])


# --- EMA --------------------------------------------------------------------------------


def test_ema_moves_parameters_and_copies_buffers():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(7.0)
    ema.update(model)
    assert ema.module[0].weight.item() == 2.0  # 0.5 * 1 + 0.5 * 3
    assert ema.module[1].running_mean.item() == 7.0
    with torch.no_grad():
        model[0].weight.fill_(5.0)
    ema.update(model)
    assert ema.module[0].weight.item() == 3.5  # 0.5 * 2 + 0.5 * 5
    assert not ema.module.training and not ema.module[0].weight.requires_grad


def test_ema_follows_each_optimizer_step_and_its_state_loads_weights_only(tmp_path):
    start = tiny_model()
    trainer = make_trainer(copy_of(start), 4, ["train.ema_decay=0.75",
                                               "train.grad_accum_steps=2"])
    data = batches(4)
    run_epoch(trainer, data)
    # By hand: e1 = 0.75 w0 + 0.25 w1, e2 = 0.75 e1 + 0.25 w2, w_i after step i
    w1 = sgd_reference(start, [data[:2]])
    w2 = sgd_reference(start, [data[:2], data[2:]])
    for e, w0, a, b in zip(trainer.ema.module.parameters(), start.parameters(),
                           w1.parameters(), w2.parameters(), strict=True):
        expected = 0.75 * (0.75 * w0 + 0.25 * a) + 0.25 * b
        torch.testing.assert_close(e, expected.detach(), rtol=0, atol=1e-6)
    assert trainer.ema.updates == 2

    torch.save(trainer.ema.state_dict(), tmp_path / "ema.pt")
    fresh = EMA(tiny_model(seed=5), 0.75)
    fresh.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert fresh.updates == 2
    assert_same_params(fresh.module, trainer.ema.module, atol=0)


# --- non-finite loss ----------------------------------------------------------------------


def poison(batch: dict) -> dict:
    image = batch["image"].clone()
    image[0, 0, 0, 0] = float("nan")
    return {**batch, "image": image}


def test_a_nan_batch_is_skipped_counted_and_leaves_batchnorm_clean():
    start = tiny_model(batchnorm=True)
    trainer = make_trainer(copy_of(start), 3, ["train.on_nonfinite_loss=skip"])
    data = batches(3)
    stepped = run_epoch(trainer, [data[0], poison(data[1]), data[2]])

    assert stepped == [True, True, True] and trainer.state["global_step"] == 3
    assert trainer.nonfinite.skipped == 1 and trainer.nonfinite.consecutive == 0
    # As if the poisoned batch had never been seen: weights and BatchNorm statistics
    reference = sgd_reference(start, [[data[0]], [data[2]]])
    assert_same_params(bare(trainer), reference)
    for ours, theirs in zip(bare(trainer).buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert trainer.nonfinite.state_dict() == {"skipped": 1, "consecutive": 0}
    # A second epoch: the saved buffers are reused, and a skip still restores them
    stepped = run_epoch_from(trainer, [poison(data[0]), data[1], data[2]])
    reference = sgd_reference(reference, [[data[1]], [data[2]]])
    assert_same_params(bare(trainer), reference)
    for ours, theirs in zip(bare(trainer).buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert trainer.nonfinite.skipped == 2


def run_epoch_from(trainer, data):
    trainer.state["epoch"] += 1
    return run_epoch(trainer, data)


def test_a_nan_loss_stops_the_run_with_the_step_the_value_and_what_to_try():
    start = tiny_model()
    trainer = make_trainer(copy_of(start), 2, ["train.on_nonfinite_loss=stop"])
    data = batches(2)
    run_epoch(trainer, data[:1])
    with pytest.raises(NonFiniteLossError) as err:
        train_step(trainer, poison(data[1]), 2)
    message = str(err.value)
    assert "optimizer step 2 (epoch 1, micro-batch 2)" in message
    assert "rank 0: nan" in message
    assert "optim.lr" in message and "train.on_nonfinite_loss=skip" in message
    assert_same_params(bare(trainer), sgd_reference(start, [data[:1]]))


def test_too_many_skips_in_a_row_stop_the_run():
    trainer = make_trainer(tiny_model(), 3, ["train.max_consecutive_nonfinite=2"])
    data = [poison(b) for b in batches(3)]
    run_epoch(trainer, data[:2])
    assert trainer.nonfinite.skipped == 2
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train_step(trainer, data[2], 3)


class NaNLoss(HeadLoss):
    """The configured loss, made NaN: what a diverged run computes."""

    def forward(self, logits_BK: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(logits_BK, labels) * float("nan")


def test_the_trainer_stops_on_a_nan_loss_with_one_message(faces_shards, tmp_path, caplog,
                                                          monkeypatch):
    import pipeline.train

    monkeypatch.setattr(pipeline.train, "build_loss",
                        lambda *_args, **_kw: NaNLoss("bce_with_logits", 1))
    args = [str(REPO / "configs" / "demo.yaml"), f"data.train={faces_shards / 'train'}",
            f"data.eval.val={faces_shards / 'val'}", f"run.output_dir={tmp_path}",
            "model.arch=resnet18", "data.image_size=32", "data.num_workers=0",
            "train.on_nonfinite_loss=stop", "wandb.mode=disabled"]
    assert train_main(args) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert errors[0].startswith("non-finite loss at optimizer step 1 (epoch 1, micro-batch 1)")
    assert "(rank 0: nan)" in errors[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_nan_on_one_rank_skips_the_step_on_both(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), str(SUPPORT), str(tmp_path)]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"two ranks hung:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world"] == 2
        assert report["stepped"] == [False, True] * 4
        assert report["skipped"] == 1 and report["global_step"] == 4
        assert report["diff"] < 1e-6, report  # steps 2-4 = plain SGD on both ranks' mean
        assert report["buffers_finite"]
    assert reports[0]["checksum"] == reports[1]["checksum"]


# --- SyncBatchNorm, channels_last, compile -------------------------------------------------


def test_sync_batchnorm_is_refused_on_cpu_ranks_and_off_for_one_process():
    model = tiny_model(batchnorm=True)
    with pytest.raises(ConfigError, match="model.sync_batchnorm=true needs GPUs"):
        sync_batchnorm(model, True, world_size=2, on_gpu=False)
    assert sync_batchnorm(model, True, world_size=1, on_gpu=False) is model
    converted = sync_batchnorm(model, True, world_size=2, on_gpu=True)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    assert sync_batchnorm(tiny_model(batchnorm=True), False, 2, on_gpu=True)[1].__class__ \
        is nn.BatchNorm2d


def test_channels_last_trains_like_the_default_layout():
    start = tiny_model(batchnorm=True)
    data = batches(3)
    nhwc = make_trainer(copy_of(start), 3, ["train.channels_last=true"])
    nchw = make_trainer(copy_of(start), 3)
    run_epoch(nhwc, data)
    run_epoch(nchw, data)
    assert bare(nhwc)[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_params(bare(nhwc), bare(nchw), atol=1e-5)


def has_cxx_compiler() -> bool:
    return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor on the CPU needs a C++ compiler")
def test_compile_trains_like_eager_on_cpu():
    start = tiny_model(batchnorm=True)
    data = batches(3)
    compiled = make_trainer(copy_of(start), 3, ["train.compile=true"])
    eager = make_trainer(copy_of(start), 3)
    run_epoch(compiled, data)
    run_epoch(eager, data)
    assert getattr(bare(compiled), "_compiled_call_impl", None) is not None
    assert_same_params(bare(compiled), bare(eager), atol=1e-5)


# --- monitor, plateau schedule, early stopping ------------------------------------------------


def test_monitor_max_with_plateau_and_early_stopping_by_hand():
    monitor = Monitor("val/ap", "max", 0.0, early_stop_patience=3, plateau_patience=2)
    values = [0.50, 0.60, 0.60, 0.55, 0.70, 0.65, 0.69, 0.70]
    verdicts = [monitor.update(v) for v in values]
    assert [v.new_best for v in verdicts] == [True, True, False, False, True, False, False, False]
    # 2 evals without a change at evals 4 and 7; 3 without a new best at eval 8
    assert [i + 1 for i, v in enumerate(verdicts) if v.drop_lr] == [4, 7]
    assert [v.stop_reason is not None for v in verdicts] == [False] * 7 + [True]
    assert "val/ap has not improved on 0.7 for 3 evaluations" in verdicts[-1].stop_reason
    assert monitor.best == 0.70 and not monitor.last_was_best


def test_monitor_min_with_a_min_delta_and_a_nan_by_hand(tmp_path):
    monitor = Monitor("val/loss", "min", 0.01, early_stop_patience=2)
    verdicts = [monitor.update(v) for v in [1.0, 0.995, 0.98, float("nan"), 0.975]]
    # 0.995 is not below 1.0 - 0.01; 0.98 is; nan never improves; 0.975 not below 0.97
    assert [v.new_best for v in verdicts] == [True, False, True, False, False]
    assert [v.drop_lr for v in verdicts] == [False] * 5
    assert verdicts[3].stop_reason is None and verdicts[4].stop_reason is not None
    state = monitor.state_dict()
    torch.save(state, tmp_path / "monitor.pt")
    again = Monitor("val/loss", "min", 0.01, early_stop_patience=2)
    again.load_state_dict(torch.load(tmp_path / "monitor.pt", weights_only=True))
    assert again.state_dict() == state and again.best == 0.98


def test_plateau_lr_drops_at_once_and_stops_below_min_lr(tmp_path):
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = PlateauLR(optimizer, warmup_steps=2)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(2):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs == [0.5, 1.0, 1.0]

    monitor = Monitor("val/ap", plateau_patience=1)
    monitor.update(0.9)
    apply_verdict(monitor.update(0.8), monitor, scheduler, min_lr=0.05)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # before the next step
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1) and monitor.stop_reason is None
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1)
    apply_verdict(monitor.update(0.8), monitor, scheduler, min_lr=0.05)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.01)
    assert "optim.min_lr=0.05" in monitor.stop_reason

    torch.save(scheduler.state_dict(), tmp_path / "sched.pt")
    fresh = PlateauLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 2)
    fresh.load_state_dict(torch.load(tmp_path / "sched.pt", weights_only=True))
    fresh.optimizer.step()
    fresh.step()
    assert fresh.drops == 2 and fresh.get_last_lr()[0] == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optim.schedule=plateau"], "optim.schedule=plateau watch train.monitor"),
        (["train.early_stop_patience=3"], "train.early_stop_patience=3 watch train.monitor"),
        (["train.monitor=test/ap"], "eval sets: ['val']"),
        (["train.monitor=val"], "must be <eval set>/<metric>"),
        (["train.monitor=val_ema/ap"], "eval sets: ['val']"),
    ],
)
def test_monitor_options_are_checked_when_the_config_loads(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.eval.val=/shards/val", *overrides])
    assert needle in str(err.value)
    ok = ["train.monitor=val_ema/ap", "train.ema_decay=0.99", "optim.schedule=plateau"]
    assert load_config(None, ["data.eval.val=/shards/val", *ok]).train.monitor == "val_ema/ap"


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_faces_with_accumulation_ema_plateau_and_early_stopping(faces_shards, tmp_path):
    # min_delta 10 makes every evaluation after the first "no better": eval 2 drops the
    # LR (plateau_patience 1), eval 3 drops it again and early stopping (patience 2) ends
    # the run after epoch 3 of 5
    overrides = [
        "run.name=feat", "model.arch=resnet18", "data.image_size=32", "data.batch_size=16",
        "train.epochs=5", "train.grad_accum_steps=3", "train.ema_decay=0.5",
        "train.channels_last=true", "optim.schedule=plateau", "optim.plateau_patience=1",
        "optim.warmup_fraction=0", "optim.lr=0.001", "optim.min_lr=1e-6",
        "train.monitor=val/accuracy", "train.monitor_min_delta=10",
        "train.early_stop_patience=2", "wandb.mode=disabled", "run.log_every_steps=1",
    ]
    args = [sys.executable, "-m", "pipeline.train", str(REPO / "configs" / "demo.yaml"),
            f"data.train={faces_shards / 'train'}", f"data.eval.val={faces_shards / 'val'}",
            f"run.output_dir={tmp_path}", *overrides]
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=540)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stopping after epoch 3: val/accuracy has not improved on" in result.stderr
    assert "by more than 10 for 2 evaluations" in result.stderr

    run_dir = tmp_path / "feat"
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert set(results) == {"val", "val_ema"} and results["val_ema"]["num_samples"] == 40
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/lr" in line]
    # 160 samples / 16 = 10 micro-batches per epoch, groups 3 + 3 + 3 + 1: 4 steps
    assert train[-1]["step"] == 12
    lr_by_epoch = {math.ceil(line["train/epoch"]): line["train/lr"] for line in train}
    assert lr_by_epoch == pytest.approx({1: 1e-3, 2: 1e-3, 3: 1e-4})
    assert all(line["train/nonfinite_steps"] == 0 for line in train)
    assert any("eval/val_ema/accuracy" in line for line in lines)
    folder = run_dir / "checkpoints"
    assert (folder / "latest").read_text().strip() == "step-00000012"
    # Only the first evaluation was a best; it is kept beside the newest two
    assert (folder / "best").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in folder.glob("step-*")) == \
        ["step-00000004", "step-00000008", "step-00000012"]

