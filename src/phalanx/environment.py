"""Cluster environments: who started this process, and what its place in the job is.

One small class per launcher that creates the processes itself (torchrun, srun, mpirun,
mpiexec), all with the same members; `detect_environment()` returns the one this process runs
under, or None. Adding a cluster means adding one class to `ENVIRONMENTS`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import zlib
from dataclasses import dataclass

from phalanx.errors import LaunchError
from phalanx.job_secret import secret_from_environment

__all__ = [
    "ENVIRONMENTS",
    "MPICH",
    "Environment",
    "Explicit",
    "OpenMPI",
    "Slurm",
    "TorchElastic",
    "check_place",
    "detect_environment",
    "expand_slurm_nodelist",
]

# Ports derived from a job id fall in 20000-31999: below Linux's ephemeral range (32768-60999),
# where any outgoing connection (one in TIME_WAIT included) could hold the port rank 0 must bind.
_PORT_BASE, _PORT_SPAN = 20000, 12000


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        raise KeyError(name)
    return value


def _int_env(name: str, default: str | None = None) -> int:
    """A whole-number variable; a value that is not one is a `LaunchError` naming the variable."""
    value = _env(name, default)
    try:
        return int(value)
    except ValueError:
        raise LaunchError(
            f"{name}={value!r} is not a whole number. It is set by the launcher that started this process "
            f"(or by hand): give it a number, or unset it."
        ) from None


def port_from_job_id(job_id: str) -> int:
    """A port every process of a job derives alike, different for different jobs.

    With a job secret the port is keyed by it, so that someone who can read the queue (and
    so the job id) cannot compute the port and take it first.
    """
    secret = secret_from_environment()
    if secret is None:
        return _PORT_BASE + zlib.crc32(job_id.encode()) % _PORT_SPAN
    digest = hmac.new(secret, b"phalanx-port:" + job_id.encode(), hashlib.sha256).digest()
    return _PORT_BASE + int.from_bytes(digest[:4], "big") % _PORT_SPAN


class Environment:
    """What a launcher tells each process it started. Subclasses read it from the environment."""

    name = "environment"
    place_variables: tuple[str, ...] = ()  # where the launcher states the place, for error messages

    @staticmethod
    def detect() -> bool:
        """True when this process was started by this launcher."""
        raise NotImplementedError

    def world_size(self) -> int:
        raise NotImplementedError

    def global_rank(self) -> int:
        raise NotImplementedError

    def local_rank(self) -> int:
        raise NotImplementedError

    def local_world_size(self) -> int:
        raise NotImplementedError

    def node_rank(self) -> int:
        raise NotImplementedError

    def main_address(self) -> str:
        """Where rank 0 hosts the rendezvous store."""
        raise NotImplementedError

    def main_port(self) -> int:
        raise NotImplementedError

    def hosts_store_externally(self) -> bool:
        """True when the launcher already serves the store at main_address:main_port (torchrun)."""
        return False

    def describe(self) -> str:
        return (
            f"{self.name}: rank {self.global_rank()} of {self.world_size()}, local rank {self.local_rank()} of "
            f"{self.local_world_size()}, node {self.node_rank()}, store at {self.main_address()}:{self.main_port()}"
        )


class TorchElastic(Environment):
    """torchrun (torch.distributed.elastic): everything is in RANK, WORLD_SIZE, MASTER_ADDR, ..."""

    name = "torchrun"
    place_variables = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

    @staticmethod
    def detect() -> bool:
        return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ

    def world_size(self) -> int:
        return _int_env("WORLD_SIZE")

    def global_rank(self) -> int:
        return _int_env("RANK")

    def local_rank(self) -> int:
        return _int_env("LOCAL_RANK")

    def local_world_size(self) -> int:
        return _int_env("LOCAL_WORLD_SIZE")

    def node_rank(self) -> int:
        return _int_env("GROUP_RANK", "0")

    def main_address(self) -> str:
        return _env("MASTER_ADDR")

    def main_port(self) -> int:
        return _int_env("MASTER_PORT")

    def hosts_store_externally(self) -> bool:
        # torchrun's agent serves a store on MASTER_PORT that the workers join as clients.
        return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compact host lists: "node[01-03,07],gpu5" -> node01, node02, node03, node07, gpu5."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not high:
                hosts.append(prefix + low)
                continue
            width = len(low)
            hosts += [f"{prefix}{number:0{width}d}" for number in range(int(low), int(high) + 1)]
    return hosts


class Slurm(Environment):
    """A task of an `srun` step: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, ..."""

    name = "slurm"
    place_variables = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_TASKS_PER_NODE")

    @staticmethod
    def detect() -> bool:
        # Inside an srun step, not the batch script itself (whose step id is "batch").
        step = os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID"))
        return "SLURM_PROCID" in os.environ and step is not None and step.isdigit()

    def world_size(self) -> int:
        return _int_env("SLURM_NTASKS", _env("SLURM_STEP_NUM_TASKS", "1"))

    def global_rank(self) -> int:
        return _int_env("SLURM_PROCID")

    def local_rank(self) -> int:
        return _int_env("SLURM_LOCALID", "0")

    def local_world_size(self) -> int:
        tasks = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE", ""))
        counts = []
        for item in tasks.split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
            if match:
                counts += [int(match.group(1))] * int(match.group(2) or 1)
        node = self.node_rank()
        return counts[node] if node < len(counts) else self.world_size()

    def node_rank(self) -> int:
        return _int_env("SLURM_NODEID", "0")

    def main_address(self) -> str:
        if "MASTER_ADDR" in os.environ:
            return os.environ["MASTER_ADDR"]
        nodes = os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_JOB_NODELIST", ""))
        hosts = expand_slurm_nodelist(nodes)
        return hosts[0] if hosts else "127.0.0.1"

    def main_port(self) -> int:
        if "MASTER_PORT" in os.environ:
            return _int_env("MASTER_PORT")
        return port_from_job_id(f"slurm-{_env('SLURM_JOB_ID', '0')}-{os.environ.get('SLURM_STEP_ID', '')}")


def _launcher_host(uri: str) -> str | None:
    """The first IPv4 address in a launcher's contact URI ("...;tcp://10.0.0.1,192.168.0.2:4444")."""
    match = re.search(r"tcp6?://\[?([0-9a-fA-F.:]+?)\]?[,:]", uri)
    return match.group(1) if match else None


class OpenMPI(Environment):
    """A rank started by Open MPI's mpirun: OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, ..."""

    name = "openmpi"
    place_variables = (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    )

    @staticmethod
    def detect() -> bool:
        return "OMPI_COMM_WORLD_RANK" in os.environ and "OMPI_COMM_WORLD_SIZE" in os.environ

    def world_size(self) -> int:
        return _int_env("OMPI_COMM_WORLD_SIZE")

    def global_rank(self) -> int:
        return _int_env("OMPI_COMM_WORLD_RANK")

    def local_rank(self) -> int:
        return _int_env("OMPI_COMM_WORLD_LOCAL_RANK", "0")

    def local_world_size(self) -> int:
        return _int_env("OMPI_COMM_WORLD_LOCAL_SIZE", str(self.world_size()))

    def node_rank(self) -> int:
        # OMPI_COMM_WORLD_NODE_RANK is a rank among the processes of a node, not the node's
        # index; mpirun places ranks in blocks by default.
        return self.global_rank() // max(1, self.local_world_size())

    def main_address(self) -> str:
        if "MASTER_ADDR" in os.environ:
            return os.environ["MASTER_ADDR"]
        if self.local_world_size() == self.world_size():
            return "127.0.0.1"  # every rank on this node
        # Rank 0 runs where mpirun runs (its default placement): mpirun's contact address.
        host = _launcher_host(os.environ.get("OMPI_MCA_orte_hnp_uri", os.environ.get("PMIX_SERVER_URI4", "")))
        if host is None:
            raise KeyError("MASTER_ADDR")
        return host

    def main_port(self) -> int:
        if "MASTER_PORT" in os.environ:
            return _int_env("MASTER_PORT")
        job = os.environ.get("OMPI_MCA_ess_base_jobid", os.environ.get("OMPI_MCA_orte_hnp_uri", "0")).split(";")[0]
        return port_from_job_id(f"openmpi-{job}")


class MPICH(Environment):
    """A rank started by MPICH's or Intel MPI's mpiexec (hydra): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID."""

    name = "mpich"
    place_variables = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")

    @staticmethod
    def detect() -> bool:
        return "PMI_RANK" in os.environ and "PMI_SIZE" in os.environ and not OpenMPI.detect()

    def world_size(self) -> int:
        return _int_env("PMI_SIZE")

    def global_rank(self) -> int:
        return _int_env("PMI_RANK")

    def local_rank(self) -> int:
        return _int_env("MPI_LOCALRANKID", "0")

    def local_world_size(self) -> int:
        return _int_env("MPI_LOCALNRANKS", str(self.world_size()))

    def node_rank(self) -> int:
        return self.global_rank() // max(1, self.local_world_size())  # hydra places ranks in blocks

    def main_address(self) -> str:
        if "MASTER_ADDR" in os.environ:
            return os.environ["MASTER_ADDR"]
        if self.local_world_size() == self.world_size():
            return "127.0.0.1"
        host = os.environ.get("PMI_PORT", "").rpartition(":")[0]  # hydra's proxy on mpiexec's host
        if not host:
            raise KeyError("MASTER_ADDR")
        return host

    def main_port(self) -> int:
        if "MASTER_PORT" in os.environ:
            return _int_env("MASTER_PORT")
        return port_from_job_id(f"mpich-{os.environ.get('PMI_KVSNAME', os.environ.get('PMI_PORT', '0'))}")


@dataclass
class Explicit(Environment):
    """Places given by hand (PopTorch's process_id / num_processes): one process per call."""

    process_id: int
    num_processes: int
    address: str = "127.0.0.1"
    port: int = 29400
    local_id: int | None = None
    local_count: int | None = None
    node: int = 0

    name = "explicit"

    @staticmethod
    def detect() -> bool:
        return False

    def world_size(self) -> int:
        return self.num_processes

    def global_rank(self) -> int:
        return self.process_id

    def local_rank(self) -> int:
        return self.process_id if self.local_id is None else self.local_id

    def local_world_size(self) -> int:
        return self.num_processes if self.local_count is None else self.local_count

    def node_rank(self) -> int:
        return self.node

    def main_address(self) -> str:
        return self.address

    def main_port(self) -> int:
        return self.port


ENVIRONMENTS: tuple[type[Environment], ...] = (TorchElastic, Slurm, OpenMPI, MPICH)


def check_place(environment: Environment) -> None:
    """Refuse, at once, a place that cannot be: a rank outside the world, or a bad count.

    Otherwise such a rank would wait on the store until the timeout for peers that never come.
    """
    rank, world_size = environment.global_rank(), environment.world_size()
    local_rank, local_world_size = environment.local_rank(), environment.local_world_size()
    where = f"under {environment.name} ({', '.join(environment.place_variables)})"
    if world_size < 1:
        raise LaunchError(f"world size {world_size} {where}: a job needs at least one rank")
    if not 0 <= rank < world_size:
        raise LaunchError(
            f"rank {rank} is outside world size {world_size} {where}: ranks go from 0 to {world_size - 1}. "
            "Fix the variables: every process of the job needs the same world size and a rank of its own."
        )
    if not 0 <= local_rank < max(local_world_size, 1) or local_world_size > world_size:
        raise LaunchError(
            f"local rank {local_rank} of {local_world_size} on this node does not fit world size {world_size} "
            f"{where}. Fix the variables."
        )


def detect_environment() -> Environment | None:
    """The launcher that started this process, or None when phalanx must start the ranks itself."""
    for environment in ENVIRONMENTS:
        if environment.detect():
            return environment()
    return None
