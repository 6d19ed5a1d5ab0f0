"""Two real ranks (torchrun, gloo on 127.0.0.1) read unequal shards.

Each rank runs a collective every step, as DDP does, so a rank with one step
more than the other would block: the gloo timeout and the subprocess timeout
turn that hang into a failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from loader_support import write_unequal_shards

WORKER = Path(__file__).with_name("loader_support.py")
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(args: list[str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(WORKER),
        *args,
    ]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # Own session, so a hang can be ended with the ranks torchrun started
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"two-rank run hung for {TIMEOUT_S} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 20)
@pytest.mark.parametrize(
    "sizes,batch_size,num_workers",
    [([7, 50, 13, 30], 4, 2), ([9], 2, 2)],
    ids=["unequal-shards", "one-shard"],
)
def test_two_ranks_equal_steps_disjoint_keys(tmp_path, sizes, batch_size, num_workers):
    write_unequal_shards(tmp_path / "train", sizes)
    out = tmp_path / "out"
    out.mkdir()
    args = [
        str(tmp_path / "train"),
        str(out),
        "--batch-size",
        str(batch_size),
        "--num-workers",
        str(num_workers),
    ]
    result = run_two_ranks(args)
    assert result.returncode == 0, result.stdout[-4000:]

    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = sum(sizes) // (2 * batch_size)
    for epoch in ("epoch0", "epoch1"):
        runs = [report[epoch] for report in reports]
        assert [run["count"] for run in runs] == [expected, expected]
        assert all(run["max"] == run["min"] == expected for run in runs)
        # Whole shards or strided slices: either way each rank reads its own samples
        assert not set(runs[0]["keys"]) & set(runs[1]["keys"])
    assert all(report["world_size"] == 2 for report in reports)


@pytest.mark.slow
@pytest.mark.timeout(3 * TIMEOUT_S)
def test_two_rank_eval_matches_one_process_c14(tmp_path, faces_shards):
    # faces val: 1 shard for 2 ranks x 2 workers (strided); then unequal shards
    from loader_support import score_sets

    sets = [
        str(faces_shards / "val"),
        str(write_unequal_shards(tmp_path / "unequal", [7, 50, 13, 30]).root),
        str(write_unequal_shards(tmp_path / "tiny", [3, 2]).root),
    ]
    out = tmp_path / "out"
    out.mkdir()
    args = [",".join(sets), str(out), "--eval", "--batch-size", "4", "--num-workers", "2"]
    result = run_two_ranks(args)
    assert result.returncode == 0, result.stdout[-4000:]

    single = score_sets(sets, rank=0, world=1, num_workers=0, batch_size=4)
    for rank in (0, 1):
        gathered = json.loads((out / f"eval-rank{rank}.json").read_text())
        for name in sets:
            one, two = single[name], gathered[name]
            assert two["keys"] == one["keys"]
            assert len(set(two["keys"])) == len(two["keys"])
            assert two["labels"] == one["labels"]
            assert np.allclose(two["probs"], one["probs"], rtol=0, atol=1e-6)
            assert two["metrics"] == one["metrics"]
    locals_ = [json.loads((out / f"eval-rank{r}.json").read_text()) for r in (0, 1)]
    for name in sets:
        # Each rank scored its own part; the parts add up to the whole set
        assert sum(part[name]["local"] for part in locals_) == len(single[name]["keys"])
        assert all(part[name]["local"] > 0 for part in locals_)
