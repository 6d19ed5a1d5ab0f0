"""Launcher checks as functions of an environment and a store: no process is started.

Environments are the ones the launchers really leave (read from accelerate's and
torchrun's code and seen in runs here); claims meet in a real in-memory store.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from torch import distributed as dist

from pipeline.config import ConfigError
from pipeline.distributed import (
    Claim,
    LaunchError,
    check_claim_range,
    check_claims,
    check_joined,
    check_launch,
    check_not_alone,
    read_int,
    register_claim,
)

# What torchrun gives rank 2 of two agents with two processes each (seen here)
TORCHRUN_RANK_2 = {"RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1", "WORLD_SIZE": "4",
                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                   "TORCHELASTIC_USE_AGENT_STORE": "True"}


def accelerate_simple_launcher_env(*flags: str) -> dict[str, str]:
    """The environment accelerate's one-process launcher gives its process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args([*flags, "train.py"])
    args, _, _ = _validate_launch_command(args)
    _, env = prepare_simple_launcher_cmd_env(args)
    return env


# --- a launcher that starts one process where several were asked for ---------------


def test_accelerate_cpu_with_two_processes_is_refused(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    env = accelerate_simple_launcher_env("--cpu", "--num_processes", "2")
    assert "WORLD_SIZE" not in env and env["MASTER_PORT"] == "29500"
    with pytest.raises(LaunchError) as err:
        check_not_alone(env)
    message = str(err.value)
    assert "MASTER_ADDR=127.0.0.1 and MASTER_PORT=29500" in message
    assert "--cpu" in message and "launch/accelerate/one_node.yaml" in message


def test_accelerate_cpu_with_one_process_passes(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    check_not_alone(accelerate_simple_launcher_env("--cpu", "--num_processes", "1"))


@pytest.mark.parametrize("env", [{}, TORCHRUN_RANK_2,
                                 {"MASTER_ADDR": "n1", "MASTER_PORT": "1", "PMI_SIZE": "4"}])
def test_a_process_with_a_world_or_no_rendezvous_passes(env):
    check_not_alone(env)


def test_a_rendezvous_without_world_size_names_the_one_process_fix():
    with pytest.raises(LaunchError, match="unset MASTER_ADDR and MASTER_PORT") as err:
        check_not_alone({"MASTER_ADDR": "node7"})
    assert "found MASTER_ADDR=node7 but no world size (WORLD_SIZE," in str(err.value)


def test_a_launch_error_is_a_config_error_so_the_entry_points_print_one_line():
    assert issubclass(LaunchError, ConfigError)


def test_a_rank_that_is_not_a_number_names_the_variable():
    with pytest.raises(LaunchError, match=r"RANK='\$NODE\*2' is not an integer"):
        read_int({"RANK": "$NODE*2"}, ("RANK",))
    assert read_int({"PMI_SIZE": "3"}, ("WORLD_SIZE", "PMI_SIZE")) == 3
    assert read_int({"WORLD_SIZE": " "}, ("WORLD_SIZE",)) is None


# --- processes that each train as "rank 0 of 1" -------------------------------------


def test_each_process_alone_as_rank_0_of_1_is_refused():
    with pytest.raises(LaunchError, match="rank 1 of 2 .* made it rank 0 of 1"):
        check_joined(1, 0, {"WORLD_SIZE": "2", "RANK": "1"})
    with pytest.raises(LaunchError, match="ACCELERATE_USE_CPU=1"):
        check_joined(1, 0, {"WORLD_SIZE": "2", "RANK": "0"})


@pytest.mark.parametrize(("num", "index", "env"), [
    (1, 0, {}), (4, 2, TORCHRUN_RANK_2), (3, 1, {"OMPI_COMM_WORLD_SIZE": "3",
                                                  "OMPI_COMM_WORLD_RANK": "1"})])
def test_a_process_in_the_launchers_world_passes(num, index, env):
    check_joined(num, index, env)


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(LaunchError, match=r"RANK=4 is outside the world of WORLD_SIZE=4"):
        check_claim_range(claim(rank=4, local=0, node=2, host="b"), 4)


# --- two processes claiming one place (C-20) -----------------------------------------


def claim(rank: int, local: int, node: int | None, host: str) -> Claim:
    return Claim(rank=rank, local_rank=local, node_rank=node, host=host, pid=100 + rank)


def test_a_claim_takes_its_rank_and_its_node_slot():
    assert claim(3, 1, 1, "b").keys() == {"rank/3": "global rank 3",
                                          "node/1/local/1": "node rank 1 with local rank 1"}
    assert list(claim(3, 1, None, "b").keys()) == ["rank/3"]


def test_the_second_claimant_of_a_place_sees_the_first():
    store = dist.HashStore()
    assert register_claim(store, claim(0, 0, 0, "a")) == []
    assert register_claim(store, claim(1, 1, 0, "a")) == []
    assert register_claim(store, claim(2, 0, 1, "b")) == []
    conflicts = register_claim(store, claim(0, 0, 1, "b"))
    assert conflicts == ["global rank 0 is claimed by a pid 100 (rank 0, node rank 0, local "
                         "rank 0) and b pid 100 (rank 0, node rank 1, local rank 0)",
                         "node rank 1 with local rank 0 is claimed by b pid 102 (rank 2, node "
                         "rank 1, local rank 0) and b pid 100 (rank 0, node rank 1, local "
                         "rank 0)"]


def run_together(store, claims: list[Claim], world: int, timeout_s: float = 30) -> list:
    """check_claims in one thread per claim; the exception each raised, or None."""

    def one(c: Claim):
        try:
            check_claims(store, c, world, timedelta(seconds=timeout_s))
        except LaunchError as err:
            return err
        return None

    with ThreadPoolExecutor(len(claims)) as pool:
        return list(pool.map(one, claims))


def test_two_nodes_that_both_claim_node_0_are_all_refused():
    # Both agents given node rank 0: ranks 0, 1, 0, 1 on hosts a, a, b, b
    claims = [claim(r % 2, r % 2, 0, "ab"[r // 2]) for r in range(4)]
    errors = run_together(dist.HashStore(), claims, world=4)
    assert all(isinstance(e, LaunchError) for e in errors)
    message = str(errors[0])
    assert all(str(e) == message for e in errors)  # every process says the same
    # The second claimant of rank 0 and of rank 1 each clash twice: rank and node slot
    assert message.count("\n  ") == 4
    assert "global rank 0 is claimed by a pid 100" in message
    assert "node rank 0 with local rank 1 is claimed by" in message
    assert "--rdzv_backend c10d" in message


def test_a_proper_world_of_two_nodes_passes():
    claims = [claim(r, r % 2, r // 2, "ab"[r // 2]) for r in range(4)]
    assert run_together(dist.HashStore(), claims, world=4) == [None] * 4


def test_a_process_that_never_arrives_is_reported_with_the_count():
    claims = [claim(0, 0, 0, "a"), claim(1, 1, 0, "a")]
    errors = run_together(dist.HashStore(), claims, world=3, timeout_s=1)
    assert all("only 2 of 3 processes reached the launcher's store" in str(e) for e in errors)


def test_check_launch_compares_claims_in_the_agents_tcp_store():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=30))
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port), "WORLD_SIZE": "2",
            "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "t1"}
    # Threads share a pid and host: the two claims differ in their node rank only
    same = [{**base, "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": str(n)} for n in range(2)]
    proper = [{**base, "TORCHELASTIC_RUN_ID": "t2", "RANK": str(r), "LOCAL_RANK": str(r),
               "GROUP_RANK": "0"} for r in range(2)]

    def launch(env):
        try:
            check_launch(env, timeout=timedelta(seconds=30))
        except LaunchError as err:
            return str(err)
        return None

    with ThreadPoolExecutor(2) as pool:
        refused = list(pool.map(launch, same))
        passed = list(pool.map(launch, proper))
    assert all(r is not None and "global rank 0 is claimed by" in r for r in refused)
    assert passed == [None, None]  # another run id: the first attempt's claims are not seen
