"""wandb as a user meets it: real runs, read back from their `.wandb` files.

Trainings are subprocesses (`python -m pipeline.train`, or torchrun with two gloo
processes) under a timeout, each with a scratch HOME and TMPDIR and no WANDB_*
variable inherited. Nothing contacts a wandb server: runs are offline, and the
online starts point WANDB_BASE_URL at a closed port or a silent server on
127.0.0.1. The charts and the run-file reader are also tested as units.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from wandb_records import BLOCK, read_records, read_run, record_bytes

from pipeline import plots
from pipeline.checkpoint import latest_checkpoint
from pipeline.evaluate import Predictions

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
# 160 faces, batch 32: 5 steps per epoch, log lines after steps 2, 4 and 5
TINY = ["model.arch=resnet18", "data.image_size=32", "data.batch_size=32",
        "train.epochs=1", "run.log_every_steps=2"]
TRAIN_KEYS = {
    "train/loss", "train/lr", "train/epoch", "perf/images_per_s",
    "perf/images_per_s_per_process", "perf/data_wait_pct", "perf/step_s", "perf/memory_gib",
    "data/good_samples", "data/bad_samples", "data/bad_shards", "data/small_images",
}
EVAL_KEYS = {"eval/val/accuracy", "eval/val/ap", "eval/val/roc_auc", "eval/val/num_samples"}
CHARTS = ("eval/val/pr_curve_table", "eval/val/roc_curve_table",
          "eval/val/confusion_matrix_table", "eval/results")
FAKE_KEY = "k" * 40


# --- running trainings ---------------------------------------------------------------


def sandbox_env(root: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without WANDB_* and XDG_*; HOME and TMPDIR under `root`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_"))}
    for name in ("home", "tmp"):
        (root / name).mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), OMP_NUM_THREADS="1")
    return {**env, **extra}


def train_command(faces: Path, out: Path, name: str, *overrides: str,
                  nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "pipeline.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(nproc), "-m", "pipeline.train"]
    return [*launcher, str(DEMO), f"data.train={faces / 'train'}",
            f"data.eval.val={faces / 'val'}", f"run.output_dir={out}", f"run.name={name}",
            *TINY, *overrides]


def run(command: list[str], env: dict[str, str], timeout_s: int = 420):
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def jsonl_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def offline_run(faces_shards, tmp_path_factory):
    """One single-process training with wandb offline, as the tests below read it."""
    root = tmp_path_factory.mktemp("wandb-offline")
    command = train_command(faces_shards, root / "runs", "tiny", "wandb.mode=offline",
                            "wandb.project=proj", "wandb.group=grp", "wandb.tags=[t1]")
    done = run(command, sandbox_env(root))
    assert done.returncode == 0, done.stderr[-4000:]
    return types.SimpleNamespace(root=root, run_dir=root / "runs" / "tiny", log=done.stderr,
                                 faces=faces_shards)


# --- one offline run ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_offline_run_holds_keys_values_and_steps(offline_run):
    (folder,) = offline_runs(offline_run.run_dir)
    wandb_run = read_run(folder)
    steps = [row["_step"] for row in wandb_run.rows]
    assert steps == [2, 4, 5]
    for row in wandb_run.rows:
        assert TRAIN_KEYS <= row.keys(), TRAIN_KEYS - row.keys()
        assert row["train/epoch"] == pytest.approx(row["_step"] / 5)
        assert math.isfinite(row["train/loss"]) and row["train/loss"] > 0
        assert row["perf/images_per_s"] == row["perf/images_per_s_per_process"] > 0
        assert 0 <= row["perf/data_wait_pct"] <= 100 and row["perf/step_s"] > 0
        assert row["perf/memory_gib"] > 0.05  # the resident memory of a torch process
        assert row["data/good_samples"] >= 32 * row["_step"] and row["data/bad_samples"] == 0
    last = wandb_run.rows[-1]
    assert EVAL_KEYS <= last.keys() and last["eval/val/num_samples"] == 40
    for chart in CHARTS:
        assert last[f"{chart}/_type"] == "table-file", chart
    assert last["eval/val/samples/count"] == 16
    # Per-class accuracy is logged per class, beside the set's other numbers
    per_class = last["eval/val/per_class_accuracy/face"]
    assert 0 <= per_class <= 1 and "eval/val/per_class_accuracy/non_face" in last
    assert all(re.fullmatch(r"p\(face\)=\d\.\d\d \| true (face|non_face)", c)
               for c in last["eval/val/samples/captions"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_offline_run_records_names_config_code_and_data(offline_run):
    wandb_run = read_run(offline_runs(offline_run.run_dir)[0])
    assert (wandb_run.project, wandb_run.name, wandb_run.group, wandb_run.tags) == \
        ("proj", "tiny", "grp", ["t1"])
    config = wandb_run.config
    assert config["model"]["arch"] == "resnet18" and config["data"]["image_size"] == 32
    assert config["wandb"]["init_timeout_s"] == 60
    info = config["run_info"]
    assert info["code"]["package"]
    for described, folder in ((info["data"]["train"], "train"),
                              (info["data"]["eval"]["val"], "val")):
        manifest = (offline_run.faces / folder / "manifest.json").read_bytes()
        assert described["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    checkpoint = latest_checkpoint(offline_run.run_dir)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["wandb_run_id"] == wandb_run.run_id


def scalar_rows_by_step(rows: list[dict], step_key: str) -> dict[int, dict]:
    """Rows merged by step, without wandb's `_` keys, `time`, and the charts' parts."""
    merged: dict[int, dict] = {}
    for row in rows:
        media = [key.removesuffix("/_type") for key in row if key.endswith("/_type")]
        merged.setdefault(row[step_key], {}).update({
            k: v for k, v in row.items()
            if not k.startswith("_") and k not in (step_key, "time")
            and not any(k.startswith(m + "/") for m in media)
        })
    return merged


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_metrics_file_matches_what_wandb_received(offline_run):
    wandb_rows = read_run(offline_runs(offline_run.run_dir)[0]).rows
    received = scalar_rows_by_step(wandb_rows, "_step")
    written = scalar_rows_by_step(jsonl_rows(offline_run.run_dir), "step")
    assert written == received
    assert EVAL_KEYS <= written[5].keys()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wandb_files_stay_in_the_run_folder(offline_run):
    home, tmp = offline_run.root / "home", offline_run.root / "tmp"
    assert not (home / ".cache" / "wandb").exists()
    assert not (home / ".config" / "wandb").exists()
    assert not (home / ".netrc").exists()
    # wandb's service keeps a port file and its sockets in TMPDIR while it runs
    assert [p for p in tmp.rglob("*") if p.name.startswith(("wandb", "port-"))] == []
    kept = offline_run.run_dir / "wandb"
    assert (kept / "cache").is_dir()  # wandb's own debug logs went there
    assert f"wandb sync {offline_runs(offline_run.run_dir)[0]}" in offline_run.log


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resumed_training_continues_the_same_run(offline_run, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    shutil.copytree(offline_run.run_dir, run_dir)
    (first,) = offline_runs(run_dir)
    command = train_command(offline_run.faces, tmp_path / "runs", "tiny",
                            "wandb.mode=offline", "train.epochs=2")
    done = run(command, sandbox_env(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed from" in done.stderr

    folders = offline_runs(run_dir)
    assert len(folders) == 2
    before, after = read_run(first), read_run(next(f for f in folders if f != first))
    assert after.run_id == before.run_id
    assert [row["_step"] for row in after.rows] == [7, 9, 10]
    steps = [row["step"] for row in jsonl_rows(run_dir) if "train/loss" in row]
    assert steps == [2, 4, 5, 7, 9, 10]


# --- jobs, terminals and failures -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_job_makes_one_run(faces_shards, tmp_path):
    command = train_command(faces_shards, tmp_path / "runs", "two", "wandb.mode=offline",
                            "data.batch_size=16", nproc=2)
    done = run(command, sandbox_env(tmp_path), timeout_s=540)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "world size 2" in done.stderr
    assert done.stderr.count("wandb offline run") == 1

    (folder,) = offline_runs(tmp_path / "runs" / "two")
    rows = read_run(folder).rows
    assert [row["_step"] for row in rows] == [2, 4, 5]  # 160 / (2 x 16) = 5 steps
    for row in rows:
        assert row["perf/images_per_s"] == pytest.approx(2 * row["perf/images_per_s_per_process"])
        assert row["data/good_samples"] >= 2 * 16 * row["_step"]  # summed over both ranks


def run_in_terminal(command: list[str], env: dict[str, str], timeout_s: float):
    """Run under a pseudo-terminal (stdin, stdout and stderr); (exit code or None, output)."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: exec at once
        os.chdir(REPO)
        os.execve(command[0], command, env)
    output, deadline = bytearray(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([terminal], [], [], 1.0)
        try:
            chunk = os.read(terminal, 65536) if ready else b"-"
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            break
        output += chunk if ready else b""
    finished, status = os.waitpid(pid, os.WNOHANG)
    if not finished:
        deadline_left = max(0.0, deadline - time.monotonic())
        time.sleep(min(deadline_left, 5))
        finished, status = os.waitpid(pid, os.WNOHANG)
    if not finished:
        os.killpg(pid, signal.SIGKILL)  # pty.fork made the child a session leader
        os.waitpid(pid, 0)
        return None, output.decode(errors="replace")
    os.close(terminal)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_prompt_and_no_hang_in_a_terminal_with_mode_unset(faces_shards, tmp_path):
    # The check that a terminal is attached runs in the trainer's own process
    entry = ("import sys; assert sys.stdin.isatty() and sys.stderr.isatty(); "
             "from pipeline.train import main; sys.exit(main(sys.argv[1:]))")
    command = train_command(faces_shards, tmp_path / "runs", "tty", "wandb.mode=auto")
    command = [command[0], "-c", entry, *command[3:]]
    code, output = run_in_terminal(command, sandbox_env(tmp_path), timeout_s=420)
    assert code == 0, output[-4000:]
    assert "wandb offline run" in output
    assert "Enter your choice" not in output and "API key" not in output
    assert len(offline_runs(tmp_path / "runs" / "tty")) == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failed_online_start_falls_back_offline(faces_shards, tmp_path):
    env = sandbox_env(tmp_path, WANDB_API_KEY=FAKE_KEY,
                      WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}")
    command = train_command(faces_shards, tmp_path / "runs", "down", "wandb.mode=online",
                            "wandb.init_timeout_s=5")
    done = run(command, env)
    assert done.returncode == 0, done.stderr[-4000:]
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert sum("could not start online within 5 s" in line for line in warnings) == 1, warnings
    (folder,) = offline_runs(tmp_path / "runs" / "down")
    assert [row["_step"] for row in read_run(folder).rows] == [2, 4, 5]


class SilentServer:
    """Accepts connections on 127.0.0.1 and never answers: a network that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


START = """
import sys, time
from pathlib import Path
from pipeline.config import load_config
from pipeline.log import setup_logging, start_wandb
setup_logging()
config = load_config(None, ["wandb.mode=online", "wandb.init_timeout_s=3"])
began = time.monotonic()
run = start_wandb(config, Path(sys.argv[1]), "silent01")
print(f"started in {time.monotonic() - began:.1f} s", flush=True)
run.log({"x": 1.0}, step=1)
run.finish()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_online_start_against_a_silent_server_is_bounded(tmp_path):
    server = SilentServer()
    try:
        env = sandbox_env(tmp_path, WANDB_API_KEY=FAKE_KEY,
                          WANDB_BASE_URL=f"http://127.0.0.1:{server.port}")
        done = run([sys.executable, "-c", START, str(tmp_path / "run")], env, timeout_s=240)
    finally:
        server.close()
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("could not start online within 3 s") == 1
    seconds = float(re.search(r"started in ([\d.]+) s", done.stdout).group(1))
    assert seconds < 3 + 30  # the timeout, then an offline start (slow on a busy machine)
    assert len(offline_runs(tmp_path / "run")) == 1


BAD_ENV_MODE = """
import sys
from pathlib import Path
from pipeline.config import load_config
from pipeline.log import setup_logging, start_wandb
setup_logging()
run = start_wandb(load_config(None, ["wandb.mode=offline"]), Path(sys.argv[1]), "badenv01")
print("mode", run.settings.mode, flush=True)
run.finish()
"""


@pytest.mark.timeout(120)
def test_a_bad_wandb_mode_in_the_environment_does_not_cost_the_run(tmp_path):
    env = sandbox_env(tmp_path, WANDB_MODE="bogus")
    done = run([sys.executable, "-c", BAD_ENV_MODE, str(tmp_path / "run")], env, timeout_s=100)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WANDB_MODE='bogus' is not a wandb mode" in done.stderr
    assert "mode offline" in done.stdout
    assert len(offline_runs(tmp_path / "run")) == 1


# --- the run-file reader ---------------------------------------------------------------


def write_log(records: list[bytes]) -> bytes:
    """Records in wandb's layout (LevelDB log blocks after a 7-byte header)."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for record in records:
        rest, first = record, True
        while True:
            room = BLOCK - len(out) % BLOCK
            if room < 7:
                out += b"\0" * room
                continue
            piece, rest = rest[: room - 7], rest[room - 7:]
            kind = (1 if not rest else 2) if first else (4 if not rest else 3)
            crc = zlib.crc32(piece, zlib.crc32(bytes([kind])))
            out += struct.pack("<IHB", crc, len(piece), kind) + piece
            first = False
            if not rest:
                break
    return bytes(out)


def test_reader_joins_fragments_across_blocks():
    # Sizes chosen to span blocks and to leave block tails under 7 bytes
    records = [bytes([i % 251]) * size for i, size in
               enumerate([10, 70_000, BLOCK - 7 - 7 - 10 - 3, 5, 40_000, 1])]
    data = write_log(records)
    assert list(record_bytes(data)) == records
    broken = bytearray(data)
    broken[20_000] ^= 0xFF
    with pytest.raises(ValueError, match="checksum"):
        list(record_bytes(bytes(broken)))


def test_reader_refuses_other_files(tmp_path):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b"PK\x03\x04 not a run")
    with pytest.raises(ValueError, match="not a wandb"):
        read_records(path)


# --- charts as units ---------------------------------------------------------------------


def test_curve_points_agree_with_sklearn():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 2000)
    score = np.clip(truth * 0.3 + rng.normal(0.35, 0.25, 2000), 0, 1)
    pr = plots.pr_points(truth, score)
    roc = plots.roc_points(truth, score)
    assert len(pr) == len(roc) == plots.CURVE_POINTS
    precisions = [p for _, p in pr]
    assert precisions == sorted(precisions, reverse=True)  # interpolated: never rises
    area_pr = np.trapezoid([p for _, p in pr], [r for r, _ in pr])
    area_roc = np.trapezoid([t for _, t in roc], [f for f, _ in roc])
    assert area_pr == pytest.approx(average_precision_score(truth, score), abs=0.03)
    assert area_roc == pytest.approx(roc_auc_score(truth, score), abs=0.01)


def binary_predictions() -> Predictions:
    keys = [f"k{i:03d}" for i in range(40)]
    scores = np.linspace(0.05, 0.95, 40, dtype=np.float32)
    labels = (np.arange(40) % 3 == 0).astype(np.float32)[:, None]
    return Predictions(keys, scores[:, None], labels)


def multiclass_predictions(classes: int = 4) -> Predictions:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(classes), 60).astype(np.float32)
    return Predictions([f"k{i:03d}" for i in range(60)], probs, np.arange(60) % classes)


def test_charts_for_binary_and_multiclass_heads():
    results = {"val": {"accuracy": 0.9, "ap": 0.8, "threshold": 0.5, "num_samples": 40,
                       "per_class_accuracy": {"a": 1.0}},
               "test": {"accuracy": 0.7, "ap": None, "num_samples": 60}}
    media = plots.eval_media(results, {"val": binary_predictions()}, ["no", "yes"],
                             "bce_with_logits")
    assert set(media) == {"eval/results", "eval/val/pr_curve", "eval/val/roc_curve",
                          "eval/val/confusion_matrix"}
    table = media["eval/results"]
    assert table.columns == ["set", "accuracy", "ap", "threshold", "num_samples"]
    assert table.data[1] == ["test", 0.7, None, None, 60.0]

    names = ["a", "b", "c", "d"]
    media = plots.eval_media({"val": {"accuracy": 0.3, "num_samples": 60}},
                             {"val": multiclass_predictions()}, names, "cross_entropy")
    assert "eval/val/roc_curve" not in media  # ROC: binary heads only
    matrix = media["eval/val/confusion_matrix"].table
    assert len(matrix.data) == 16 and sum(row[2] for row in matrix.data) == 60
    classes = {row[0] for row in media["eval/val/pr_curve"].table.data}
    assert classes == set(names)


def test_sample_images_carry_the_probabilities_of_their_keys():
    pred = binary_predictions()
    batch = {"image": torch.zeros(3, 3, 8, 8, dtype=torch.uint8),
             "key": ["k039", "k000", "missing"]}
    images = plots.sample_images(batch, pred, ["no", "yes"], "bce_with_logits")
    assert [image._caption for image in images] == \
        ["p(yes)=0.95 | true yes", "p(yes)=0.05 | true yes"]
    assert images[0].image.size == (8, 8)
