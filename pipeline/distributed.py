"""Launcher checks: the processes a launcher started must form the world it announced.

The same config runs under `python -m pipeline.train`, torchrun, `accelerate
launch` and Slurm; each launcher tells a process its place through environment
variables. Three ways for that to go wrong are refused at start-up, each with
a message that names the fix:

- a launcher asked for several processes started this one alone: it prepared a
  rendezvous (MASTER_ADDR/MASTER_PORT) but announced no world size, as
  `accelerate launch --cpu --num_processes 2` does;
- the processes did not join one group and each trains as "rank 0 of 1" (a CUDA
  build of torch on a machine without GPUs, when Accelerate is not on the CPU);
- two processes claim the same global rank, or the same (node rank, local rank):
  a node rank written once for every node (case C-20). This is checked through
  the launcher's store before the process group forms, because a group with a
  duplicated rank never forms: it waits for the missing rank until its timeout.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta

from torch import distributed as dist

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

# Where launchers announce a process's place, in the order Accelerate reads them:
# torchrun's names first, then those of MPICH / Intel MPI, Open MPI and MVAPICH.
WORLD_SIZE_KEYS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_KEYS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_KEYS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                   "MV2_COMM_WORLD_LOCAL_RANK")
NODE_RANK_KEY = "GROUP_RANK"  # torchrun: the rank of this process's agent (its node)

# As long as the process group waits for a late rank: nodes may start minutes apart.
ARRIVAL_TIMEOUT = timedelta(minutes=30)

ONE_NODE_FIX = (
    "launch with `accelerate launch --config_file launch/accelerate/one_node.yaml "
    "--num_processes N -m pipeline.train ...` (the trainer uses the CPU by itself when "
    "there is no GPU) or with launch/torchrun.sh"
)


class LaunchError(ConfigError):
    """The launcher's processes do not form one world; the message says how to launch."""


@dataclass(frozen=True)
class Claim:
    """Who a process says it is, and where it runs (for messages)."""

    rank: int
    local_rank: int
    node_rank: int | None
    host: str
    pid: int

    def keys(self) -> dict[str, str]:
        """The places this claim takes, each with its meaning for a message."""
        keys = {f"rank/{self.rank}": f"global rank {self.rank}"}
        if self.node_rank is not None:
            keys[f"node/{self.node_rank}/local/{self.local_rank}"] = (
                f"node rank {self.node_rank} with local rank {self.local_rank}")
        return keys

    def label(self) -> str:
        node = "?" if self.node_rank is None else self.node_rank
        return (f"{self.host} pid {self.pid} (rank {self.rank}, node rank {node}, "
                f"local rank {self.local_rank})")


def read_int(env: Mapping[str, str], keys: tuple[str, ...]) -> int | None:
    """The first of `keys` that is set, as an integer; None when none is."""
    for key in keys:
        text = env.get(key, "").strip()
        if not text:
            continue
        try:
            return int(text)
        except ValueError:
            raise LaunchError(
                f"{key}={text!r} is not an integer; it comes from the launcher: "
                f"unset it, or launch with torchrun, which sets it"
            ) from None
    return None


def read_claim(env: Mapping[str, str]) -> Claim:
    rank = read_int(env, RANK_KEYS)
    local_rank = read_int(env, LOCAL_RANK_KEYS)
    return Claim(rank=0 if rank is None else rank,
                 local_rank=0 if local_rank is None else local_rank,
                 node_rank=read_int(env, (NODE_RANK_KEY,)),
                 host=socket.gethostname(), pid=os.getpid())


def check_not_alone(env: Mapping[str, str]) -> None:
    """Refuse a process whose launcher prepared a rendezvous but announced no world.

    Accelerate's one-process launcher (chosen by `--cpu`, or with no GPU and no
    config file) sets MASTER_ADDR/MASTER_PORT only when more than one process
    was asked for, and never WORLD_SIZE: that pair is the tell.
    """
    if read_int(env, WORLD_SIZE_KEYS) is not None:
        return
    rendezvous = [f"{key}={env[key]}" for key in ("MASTER_ADDR", "MASTER_PORT") if key in env]
    if not rendezvous:
        return
    found = " and ".join(rendezvous)
    if "ACCELERATE_USE_CPU" in env:  # set by accelerate's one-process launcher only
        raise LaunchError(
            f"accelerate launch was asked for several processes ({found}) but started only "
            "this one: `--cpu`, or a machine without GPUs and no config file, selects its "
            f"one-process launcher whatever --num_processes says; {ONE_NODE_FIX}"
        )
    raise LaunchError(
        f"this process found {found} but no world size ({', '.join(WORLD_SIZE_KEYS)}): a "
        "launcher prepared a rendezvous without telling the process its rank, so it would "
        f"train alone; {ONE_NODE_FIX}; for a one-process run, unset MASTER_ADDR and MASTER_PORT"
    )


def check_claim_range(claim: Claim, world_size: int) -> None:
    if not 0 <= claim.rank < world_size:
        raise LaunchError(
            f"RANK={claim.rank} is outside the world of WORLD_SIZE={world_size} processes "
            "(0 .. WORLD_SIZE-1); the launcher computed it wrongly: launch with torchrun, "
            "which numbers the processes itself"
        )


def check_joined(num_processes: int, process_index: int,
                 env: Mapping[str, str] | None = None) -> None:
    """Refuse processes that did not join the launcher's world (each one "rank 0 of 1")."""
    env = os.environ if env is None else env
    world = read_int(env, WORLD_SIZE_KEYS) or 1
    rank = read_int(env, RANK_KEYS) or 0
    if (num_processes, process_index) == (world, rank):
        return
    raise LaunchError(
        f"the launcher started this process as rank {rank} of {world} (WORLD_SIZE, RANK) "
        f"but Accelerate made it rank {process_index} of {num_processes}: the processes did "
        "not join one process group and would each train alone. On a machine without "
        "GPUs run Accelerate on the CPU (ACCELERATE_USE_CPU=1); with GPUs, check that "
        "every process sees them (torch.cuda.device_count())"
    )


def check_launch(env: Mapping[str, str] | None = None,
                 timeout: timedelta = ARRIVAL_TIMEOUT) -> None:
    """Before the process group forms: refuse a lone process and claims taken twice."""
    env = os.environ if env is None else env
    check_not_alone(env)
    world = read_int(env, WORLD_SIZE_KEYS) or 1
    claim = read_claim(env)
    check_claim_range(claim, world)
    if world == 1:
        return
    # Without a launcher's store (srun or mpirun starting Python) claims are not compared.
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    store = launcher_store(env, timeout)
    check_claims(store, claim, world, timeout)
    log.info("launcher: %d processes, each global rank and (node rank, local rank) "
             "claimed once", world)


def launcher_store(env: Mapping[str, str], timeout: timedelta) -> dist.Store:
    """A client of the store torchrun's agents serve, under a key prefix of this attempt."""
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    # A restarted attempt under the same agents must not find the last attempt's claims
    attempt = f"{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    return dist.PrefixStore(f"pipeline/launch/{attempt}/", store)


def register_claim(store: dist.Store, claim: Claim) -> list[str]:
    """Take the claim's places in the store; describe each one another process holds."""
    mine = json.dumps(asdict(claim))
    conflicts = []
    for key, meaning in claim.keys().items():
        holder = store.compare_set(key, "", mine).decode()
        if holder != mine:
            other = Claim(**json.loads(holder))
            conflicts.append(f"{meaning} is claimed by {other.label()} and {claim.label()}")
    return conflicts


def check_claims(store: dist.Store, claim: Claim, world_size: int,
                 timeout: timedelta) -> None:
    """Every process registers, then all wait for the last; all refuse if any clashed."""
    for text in register_claim(store, claim):
        store.set(f"conflict/{store.add('conflicts', 1)}", text)
    if store.add("arrived", 1) == world_size:
        store.set("all_arrived", "1")
    try:
        store.wait(["all_arrived"], timeout)
    except dist.DistStoreError:
        raise LaunchError(
            f"only {store.add('arrived', 0)} of {world_size} processes reached the launcher's "
            f"store within {timeout}: the others failed or joined another master; every node "
            "must use the same master address and port"
        ) from None
    count = store.add("conflicts", 0)
    if count:
        texts = [store.get(f"conflict/{i}").decode() for i in range(1, count + 1)]
        raise LaunchError(
            "two processes claim the same place in the world:\n  " + "\n  ".join(texts)
            + "\nEach node needs its own node rank, computed on that node (not once in a "
            "batch script for all), or let torchrun assign them: --rdzv_backend c10d"
        )
