"""One config under every launcher, a two-node world on one machine, and the traps refused.

Each run is a real launcher started as a user would, on the bundled faces at
32 px for one epoch, each under a timeout so a hang fails instead of blocking.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from torch import distributed as dist

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
ONE_NODE = REPO / "launch" / "accelerate" / "one_node.yaml"
MULTI_NODE = REPO / "launch" / "accelerate" / "multi_node.yaml"
BIN = Path(sys.executable).parent
CHECKSUM = re.compile(r"parameters identical on all (\d+) ranks \(checksum (\S+)\)")

# Launcher variables a test's own environment must not pass on to the runs
LAUNCH_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
               "TORCHELASTIC_USE_AGENT_STORE")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_KEYS}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_ERROR_REPORTING": "false", **extra}


def trainer_args(faces: Path, out: Path, name: str) -> list[str]:
    """The one config and its overrides, whatever starts the trainer."""
    return ["-m", "pipeline.train", str(DEMO), f"data.train={faces / 'train'}",
            f"data.eval.val={faces / 'val'}", f"run.output_dir={out}", f"run.name={name}",
            "data.image_size=32", "data.batch_size=16", "train.epochs=1", "wandb.mode=disabled"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], timeout_s: int, env: dict[str, str] | None = None):
    return subprocess.run(command, cwd=REPO, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout_s)


def run_together(commands: list[list[str]], timeout_s: int,
                 env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Start all commands at once and wait for all; none outlives the test."""
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    try:
        outputs = [p.communicate(timeout=timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return [subprocess.CompletedProcess(c, p.returncode, out, err)
            for c, p, (out, err) in zip(commands, procs, outputs)]


def finished(result: subprocess.CompletedProcess, world: int) -> str:
    """Check a successful run of `world` processes in the trainer's log; its checksum."""
    log = result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"world size {world}, rank 0" in log
    ranks, checksum = CHECKSUM.search(log).groups()
    assert int(ranks) == world
    return checksum


def launch_commands(faces: Path, out: Path) -> dict[str, list[str]]:
    return {
        "python": [sys.executable, *trainer_args(faces, out, "python")],
        "torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                     *trainer_args(faces, out, "torchrun")],
        "accelerate": [str(BIN / "accelerate"), "launch", "--config_file", str(ONE_NODE),
                       "--num_processes", "2", *trainer_args(faces, out, "accelerate")],
    }


@pytest.fixture(scope="module")
def launch_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launchers")


@pytest.fixture(scope="module")
def launched(faces_shards, launch_dir) -> dict[str, subprocess.CompletedProcess]:
    """The same config run by `python -m`, torchrun and accelerate launch, one after another."""
    env = clean_env(HF_HOME=str(launch_dir / "hf"))  # no accelerate config from the home
    return {name: run(command, 240, env)
            for name, command in launch_commands(faces_shards, launch_dir).items()}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("launcher", "world"), [("python", 1), ("torchrun", 2),
                                                 ("accelerate", 2)])
def test_the_same_config_runs_under_each_launcher(launched, launch_dir, launcher, world):
    finished(launched[launcher], world)
    results = json.loads((launch_dir / launcher / "eval_results.json").read_text())
    assert results["val"]["num_samples"] == 40  # each eval sample scored once


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_and_accelerate_end_with_the_same_parameters(launched):
    # Same seed and world size: the same shards per rank, the same batches, the same steps
    assert finished(launched["torchrun"], 2) == finished(launched["accelerate"], 2)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_torchrun_agents_form_one_world_of_four(faces_shards, tmp_path):
    port = free_port()

    def agent(node: int) -> list[str]:
        return [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node),
                "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), *trainer_args(faces_shards, tmp_path, "nodes")]

    node0, node1 = run_together([agent(0), agent(1)], 360, clean_env())
    finished(node0, 4)  # the main process runs on node 0 and logs for the world
    assert node1.returncode == 0, node1.stderr[-4000:]
    assert json.loads((tmp_path / "nodes" / "eval_results.json").read_text())[
        "val"]["num_samples"] == 40


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_accelerate_multi_node_config_numbers_two_machines(tmp_path):
    """Two `accelerate launch` with multi_node.yaml on 127.0.0.1: one world of 2."""
    script = tmp_path / "where.py"
    script.write_text("import json, os\nprint(json.dumps({k: os.environ[k] for k in "
                      "('RANK', 'GROUP_RANK', 'WORLD_SIZE')}))\n")
    port = free_port()

    def machine(rank: int) -> list[str]:
        return [str(BIN / "accelerate"), "launch", "--config_file", str(MULTI_NODE),
                "--num_processes", "2", "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(script)]

    results = run_together([machine(0), machine(1)], 150, clean_env(HF_HOME=str(tmp_path)))
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    seen = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    assert sorted(s["RANK"] for s in seen) == ["0", "1"]
    assert {s["WORLD_SIZE"] for s in seen} == {"2"}


# --- the traps, refused with a message ----------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_accelerate_cpu_with_two_processes_is_refused(faces_shards, tmp_path):
    command = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2",
               *trainer_args(faces_shards, tmp_path, "alone")]
    result = run(command, 150, clean_env(HF_HOME=str(tmp_path / "hf")))
    assert result.returncode != 0
    assert "accelerate launch was asked for several processes" in result.stderr
    assert "launch/accelerate/one_node.yaml" in result.stderr
    assert not (tmp_path / "alone" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_two_nodes_that_both_claim_node_rank_0_are_refused(faces_shards, tmp_path):
    """The trainer processes of two agents both started with --node_rank 0 (C-20).

    Here the test plays the agents' part: it serves their store and starts the
    processes with the environment two agents with one process each give them on
    two machines: both rank 0 of node 0. Two real agents on one machine cannot
    show this: the second fails to open the store's port before any trainer starts.
    """
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=120))
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE="2",
                    RANK="0", LOCAL_RANK="0", GROUP_RANK="0", LOCAL_WORLD_SIZE="1",
                    TORCHELASTIC_RUN_ID="c20", TORCHELASTIC_USE_AGENT_STORE="True")
    command = [sys.executable, *trainer_args(faces_shards, tmp_path, "twins")]
    results = run_together([command, command], 150, env)
    logs = [r.stderr for r in results]
    assert [r.returncode for r in results] == [2, 2], logs
    for log in logs:  # each process names the other, with host and pid
        assert "two processes claim the same place in the world" in log
        assert re.search(r"global rank 0 is claimed by \S+ pid \d+ \(rank 0, node rank 0", log)
        assert "node rank 0 with local rank 0 is claimed by" in log
    assert not (tmp_path / "twins" / "checkpoints").exists()
