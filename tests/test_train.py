"""The trainer end to end: bad input stops early; real runs on the bundled faces.

Training runs start `python -m pipeline.train` (or torchrun) as a subprocess, as a
user would, each under a timeout so a hang fails instead of blocking.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import prune_checkpoints
from pipeline.config import ConfigError, load_config, save_config
from pipeline.data.shards import resolve_shards
from pipeline.losses import HeadLoss
from pipeline.model import build_model
from pipeline.train import check_resume_compatible, preflight
from pipeline.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def run(args: list[str], cwd: Path, timeout_s: int, env: dict | None = None):
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout_s)


def train_args(faces: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", str(DEMO),
            f"data.train={faces / 'train'}", f"data.eval.val={faces / 'val'}",
            f"run.output_dir={out}", *overrides]


# --- bad input: one message naming the key, exit code 2, nothing written ---------


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["optim.lrr=0.1"], ["optim.lrr", "did you mean 'optim.lr'"]),
        (["model.num_classes=two"], ["model.num_classes", "'two'"]),
        (["data.train=/nonexistent/shards"], ["data.train", "/nonexistent/shards"]),
        (["data.train={faces}/train/nothing-*.tar"], ["data.train", "matches no shard"]),
        (["loss.name=cross_entropy", "model.num_classes=1"],
         ["model.num_classes=1", "loss.name=bce_with_logits"]),
        (["model.num_classes=3", "loss.name=cross_entropy"],
         ["model.num_classes=3", "set model.num_classes=2"]),
    ],
)
def test_bad_input_stops_before_heavy_work(faces_shards, tmp_path, caplog, overrides, needles):
    overrides = [o.replace("{faces}", str(faces_shards)) for o in overrides]
    args = train_args(faces_shards, tmp_path, "run.name=bad", *overrides)[3:]
    assert train_main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    for needle in needles:
        assert needle in errors[0]
    assert not (tmp_path / "bad").exists()


def test_shard_folder_without_manifest_is_refused(faces_shards, tmp_path, caplog):
    half = tmp_path / "half"
    half.mkdir()
    for tar in sorted((faces_shards / "train").glob("*.tar")):
        (half / tar.name).write_bytes(tar.read_bytes())
    assert train_main(train_args(faces_shards, tmp_path, f"data.train={half}")[3:]) == 2
    assert "not a finished shard set" in caplog.text


def test_command_line_error_exits_2_without_traceback(faces_shards, tmp_path):
    result = run(train_args(faces_shards, tmp_path, "optim.lrr=0.1"), REPO, 120)
    assert result.returncode == 2
    assert "did you mean 'optim.lr'" in result.stderr
    assert "Traceback" not in result.stderr


def fake_finished_run(run_dir: Path, config) -> None:
    save_config(config, run_dir / "config.yaml")
    (run_dir / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step-00000010\n")


def test_resume_with_another_config_is_refused_with_the_differences(tmp_path):
    config = load_config(DEMO, [f"run.output_dir={tmp_path}"])
    fake_finished_run(config.run_dir, config)
    check_resume_compatible(config, config.run_dir)  # same config: fine
    changed = load_config(DEMO, [f"run.output_dir={tmp_path}", "model.arch=resnet18",
                                 "optim.lr=0.1", "train.epochs=9", "eval.threshold=0.3"])
    with pytest.raises(ConfigError, match="cannot resume") as err:
        check_resume_compatible(changed, changed.run_dir)
    message = str(err.value)
    assert "model.arch: 'resnet50' -> 'resnet18'" in message
    assert "optim.lr: 0.001 -> 0.1" in message
    assert "train.epochs" not in message and "eval.threshold" not in message


def test_a_first_batch_mismatch_is_reported_with_both_shapes(faces_shards):
    config = load_config(DEMO, ["model.arch=resnet18", "data.image_size=32"])
    shards = resolve_shards(str(faces_shards / "train"))
    model = build_model(config.model.model_copy(update={"num_classes": 3}))
    with pytest.raises(ConfigError, match=r"images \(2, 3, 32, 32\), labels \(2,\)") as err:
        preflight(config, shards, model, HeadLoss("bce_with_logits", 1))
    assert "(2, 3)" in str(err.value) and "(2, 1)" in str(err.value)


def test_only_the_newest_checkpoints_and_the_best_are_kept(tmp_path):
    for step in range(10, 60, 10):
        (tmp_path / f"step-{step:08d}").mkdir()
    (tmp_path / "step-00000060.partial").mkdir()  # left by a crash
    (tmp_path / "latest").write_text("step-00000050\n")
    (tmp_path / "best").write_text("step-00000020\n")
    prune_checkpoints(tmp_path, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["best", "latest", "step-00000020", "step-00000040", "step-00000050"]


# --- real training ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(650)
@pytest.mark.parametrize(
    ("loss", "num_classes"),
    [("bce_with_logits", 1), ("bce", 1), ("cross_entropy", 2)],
)
def test_seed_combinations_learn_the_faces(faces_shards, tmp_path, loss, num_classes):
    overrides = [f"loss.name={loss}", f"model.num_classes={num_classes}", "run.name=combo",
                 "data.image_size=40", "data.batch_size=16", "train.epochs=6",
                 "wandb.mode=disabled"]
    result = run(train_args(faces_shards, tmp_path, *overrides), REPO, 600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "combo" / "eval_results.json").read_text())["val"]
    assert metrics["num_samples"] == 40
    assert metrics["accuracy"] >= 0.90, metrics
    assert metrics["roc_auc"] >= 0.95, metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_on_two_processes(tmp_path):
    """The demo's steps as `make demo` runs them, in a scratch folder."""
    shard = [sys.executable, "-m", "pipeline", "shard", "embedded:faces", "--out",
             str(tmp_path / "faces"), "--val-fraction", "0.2", "--maxcount", "32"]
    assert run(shard, REPO, 120).returncode == 0

    launch = ["bash", str(REPO / "launch" / "torchrun.sh"), str(DEMO),
              f"data.train={tmp_path / 'faces' / 'train'}",
              f"data.eval.val={tmp_path / 'faces' / 'val'}", f"run.output_dir={tmp_path}"]
    env = {"NPROC": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    trained = run(launch, REPO, 540, env)
    assert trained.returncode == 0, trained.stderr[-4000:]
    log = trained.stderr
    assert "world size 2" in log
    assert "parameters identical on all 2 ranks" in log

    run_dir = tmp_path / "demo"
    check_run_folder(run_dir)
    command = [sys.executable, "-m", "pipeline", "eval", "--run-dir", str(run_dir)]
    evaluated = run(command, REPO, 120)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads((run_dir / "eval-step-00000050.json").read_text())["val"]
    assert metrics["num_samples"] == 40
    assert metrics["accuracy"] >= 0.90
    assert re.search(r"val\s+40\s+0\.9\d+", evaluated.stderr)

    faces = tmp_path / "faces"
    two_sets = [*command, "--set", f"held_out={faces / 'val'}", "--set",
                f"seen={faces / 'train'}"]
    assert run(two_sets, REPO, 180).returncode == 0
    table = (run_dir / "eval-step-00000050-held_out-seen.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in table[1:]] == ["held_out", "seen"]


def check_run_folder(run_dir: Path) -> None:
    """The resolved config, one offline wandb run, metrics and the last 2 checkpoints."""
    assert (run_dir / "config.yaml").is_file()
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, wandb_runs  # one run per job, not one per process
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "train/loss" in line]
    assert steps == sorted(steps) and steps[-1] == 50  # 5 epochs x 10 steps per rank
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # train.keep_checkpoints: 2; named by the global step of the end of epochs 4 and 5
    assert names == ["latest", "step-00000040", "step-00000050"]
    weights = load_file(str(run_dir / "checkpoints" / "step-00000050" / "model.safetensors"))
    assert weights["fc.weight"].shape == torch.Size([1, 2048])


def test_eval_scalars_spread_per_class_values():
    from pipeline.train import scalars

    metrics = {"accuracy": 0.9, "per_class_accuracy": {"cat": 1.0, "dog": 0.8, "owl": None},
               "confusion": [[1, 0], [0, 1]], "num_samples": 40}
    assert scalars(metrics) == [("accuracy", 0.9), ("per_class_accuracy/cat", 1.0),
                                ("per_class_accuracy/dog", 0.8), ("num_samples", 40)]
