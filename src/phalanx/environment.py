"""Cluster environments: who started this process, and what its place in the job is.

One small class per launcher that creates the processes itself (torchrun, srun, mpirun,
mpiexec), all with the same members. Each registers itself (`register_environment`), in the
order `detect_environment()` tries them; it returns the first that recognises this process, or
None. Adding a cluster means writing one `Environment` subclass and registering it. `Explicit`
is the place stated by hand, for processes that no launcher started: give it to
`Platform(environment=...)`.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import os
import re
import zlib
from abc import ABC, abstractmethod
from typing import TypeVar

from phalanx import variables
from phalanx.errors import LaunchError, PlatformError
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
    "port_from_job_id",
    "register_environment",
    "registered_environments",
    "unregister_environment",
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


class Environment(ABC):
    """What a launcher tells each process it started: its place in the job and where rank 0 is.

    A subclass implements the abstract members, reading its launcher's variables, and is
    registered with `register_environment` so that `detect_environment` tries it. Example::

        @register_environment
        class MyScheduler(Environment):
            name = "my-scheduler"
            place_variables = ("MY_RANK", "MY_SIZE")

            @staticmethod
            def detect() -> bool:
                return "MY_RANK" in os.environ

            def global_rank(self) -> int:
                return int(os.environ["MY_RANK"])

            ...  # world_size, local_rank, local_world_size, node_rank, main_address, main_port
    """

    name = "environment"
    place_variables: tuple[str, ...] = ()  # where the launcher states the place, for error messages

    @staticmethod
    @abstractmethod
    def detect() -> bool:
        """True when this process was started by this launcher."""

    @abstractmethod
    def world_size(self) -> int:
        """Number of processes in the job."""

    @abstractmethod
    def global_rank(self) -> int:
        """This process's rank in the job, from 0 to world_size() - 1."""

    @abstractmethod
    def local_rank(self) -> int:
        """This process's rank among the job's processes on this node (it picks the device)."""

    @abstractmethod
    def local_world_size(self) -> int:
        """Number of the job's processes on this node."""

    @abstractmethod
    def node_rank(self) -> int:
        """This node's index in the job."""

    @abstractmethod
    def main_address(self) -> str:
        """Where rank 0 hosts the rendezvous store."""

    @abstractmethod
    def main_port(self) -> int:
        """The store's port at main_address()."""

    def hosts_store_externally(self) -> bool:
        """True when the launcher already serves the store at main_address:main_port (torchrun)."""
        return False

    def describe(self) -> str:
        return (
            f"{self.name}: rank {self.global_rank()} of {self.world_size()}, local rank {self.local_rank()} of "
            f"{self.local_world_size()}, node {self.node_rank()}, store at {self.main_address()}:{self.main_port()}"
        )


_EnvironmentClass = TypeVar("_EnvironmentClass", bound=type[Environment])

# The launchers detect_environment() tries, first match wins: torchrun before srun (torchrun
# inside an srun step starts the ranks), Open MPI before MPICH (both may set PMI_RANK).
_registered: list[type[Environment]] = []


def register_environment(
    environment: _EnvironmentClass, *, before: type[Environment] | None = None
) -> _EnvironmentClass:
    """Have `detect_environment` try `environment`: last, or just before the launcher `before`.

    Usable as a class decorator. A class registered again moves to the new place. `before`
    lets a more specific environment win over a general one (a cluster whose jobs also look
    like SLURM's: `register_environment(MyCluster, before=Slurm)`).
    """
    if not (isinstance(environment, type) and issubclass(environment, Environment)):
        raise TypeError(f"register_environment() needs an Environment subclass, got {environment!r}")
    if inspect.isabstract(environment):
        missing = ", ".join(sorted(environment.__abstractmethods__))
        raise TypeError(f"{environment.__name__} cannot be registered: it does not implement {missing}")
    if before is not None and before not in _registered:
        raise ValueError(
            f"register_environment({environment.__name__}, before={before!r}): {before!r} is not registered; "
            f"the registered environments are {_names()}"
        )
    if environment in _registered:
        _registered.remove(environment)
    _registered.insert(len(_registered) if before is None else _registered.index(before), environment)
    return environment


def unregister_environment(environment: type[Environment]) -> None:
    """Stop `detect_environment` from trying `environment` (registered with `register_environment`)."""
    if environment not in _registered:
        raise ValueError(f"{environment!r} is not registered; the registered environments are {_names()}")
    _registered.remove(environment)


def registered_environments() -> tuple[type[Environment], ...]:
    """The registered environments, in the order `detect_environment` tries them."""
    return tuple(_registered)


def _names() -> str:
    return ", ".join(environment.__name__ for environment in _registered) or "none"


@register_environment
class TorchElastic(Environment):
    """torchrun (torch.distributed.elastic): everything is in RANK, WORLD_SIZE, MASTER_ADDR, ..."""

    name = "torchrun"
    place_variables = (variables.RANK, variables.WORLD_SIZE, variables.LOCAL_RANK, variables.LOCAL_WORLD_SIZE)

    @staticmethod
    def detect() -> bool:
        return "TORCHELASTIC_RUN_ID" in os.environ and variables.RANK in os.environ

    def world_size(self) -> int:
        return _int_env(variables.WORLD_SIZE)

    def global_rank(self) -> int:
        return _int_env(variables.RANK)

    def local_rank(self) -> int:
        return _int_env(variables.LOCAL_RANK)

    def local_world_size(self) -> int:
        return _int_env(variables.LOCAL_WORLD_SIZE)

    def node_rank(self) -> int:
        return _int_env(variables.GROUP_RANK, "0")

    def main_address(self) -> str:
        return _env(variables.MASTER_ADDR)

    def main_port(self) -> int:
        return _int_env(variables.MASTER_PORT)

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


@register_environment
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
        if variables.MASTER_ADDR in os.environ:
            return os.environ[variables.MASTER_ADDR]
        nodes = os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_JOB_NODELIST", ""))
        hosts = expand_slurm_nodelist(nodes)
        return hosts[0] if hosts else "127.0.0.1"

    def main_port(self) -> int:
        if variables.MASTER_PORT in os.environ:
            return _int_env(variables.MASTER_PORT)
        return port_from_job_id(f"slurm-{_env('SLURM_JOB_ID', '0')}-{os.environ.get('SLURM_STEP_ID', '')}")


def _launcher_host(uri: str) -> str | None:
    """The first IPv4 address in a launcher's contact URI ("...;tcp://10.0.0.1,192.168.0.2:4444")."""
    match = re.search(r"tcp6?://\[?([0-9a-fA-F.:]+?)\]?[,:]", uri)
    return match.group(1) if match else None


@register_environment
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
        if variables.MASTER_ADDR in os.environ:
            return os.environ[variables.MASTER_ADDR]
        if self.local_world_size() == self.world_size():
            return "127.0.0.1"  # every rank on this node
        # Rank 0 runs where mpirun runs (its default placement): mpirun's contact address.
        host = _launcher_host(os.environ.get("OMPI_MCA_orte_hnp_uri", os.environ.get("PMIX_SERVER_URI4", "")))
        if host is None:
            raise KeyError(variables.MASTER_ADDR)
        return host

    def main_port(self) -> int:
        if variables.MASTER_PORT in os.environ:
            return _int_env(variables.MASTER_PORT)
        job = os.environ.get("OMPI_MCA_ess_base_jobid", os.environ.get("OMPI_MCA_orte_hnp_uri", "0")).split(";")[0]
        return port_from_job_id(f"openmpi-{job}")


@register_environment
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
        if variables.MASTER_ADDR in os.environ:
            return os.environ[variables.MASTER_ADDR]
        if self.local_world_size() == self.world_size():
            return "127.0.0.1"
        host = os.environ.get("PMI_PORT", "").rpartition(":")[0]  # hydra's proxy on mpiexec's host
        if not host:
            raise KeyError(variables.MASTER_ADDR)
        return host

    def main_port(self) -> int:
        if variables.MASTER_PORT in os.environ:
            return _int_env(variables.MASTER_PORT)
        return port_from_job_id(f"mpich-{os.environ.get('PMI_KVSNAME', os.environ.get('PMI_PORT', '0'))}")


def _whole_number(field_name: str, value: object, allowed: str, low: int, high: int | None = None) -> int:
    """`value` if it is an int (not a bool) from `low` to `high`; else a PlatformError naming Explicit's field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise PlatformError(field_name, value, allowed, owner="Explicit")
    return value


class Explicit(Environment):
    """A place stated by hand: this process is rank `rank` of `world_size`.

    For processes that no launcher phalanx knows started: a `multiprocessing` loop, two
    terminals, a scheduler of your own. Each process states its own place and gives it to
    `Platform(environment=...)`; `launch` then joins the others as it joins torchrun's
    processes. By default every process runs on this node (`local_world_size=world_size`,
    `local_rank=rank`, `node_rank=0`), and rank 0 hosts the store at `MASTER_ADDR:MASTER_PORT`
    when these are set, else at 127.0.0.1:29500 (torchrun's default port, the same in every
    terminal). Every value is checked here, at construction. Example, in each of two processes::

        rank = int(sys.argv[1])
        platform = px.Platform(device="cpu", environment=Explicit(rank, world_size=2))
        px.launch(train, platform=platform)   # both processes run train, as ranks 0 and 1
    """

    name = "explicit"
    DEFAULT_ADDRESS = "127.0.0.1"
    # torchrun's default port: processes started in two terminals must meet at the same port,
    # so no port derived from a parent process or a clock will do.
    DEFAULT_PORT = 29500

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        local_rank: int | None = None,
        local_world_size: int | None = None,
        node_rank: int | None = None,
        address: str | None = None,
        port: int | None = None,
    ) -> None:
        self._world_size = _whole_number("world_size", world_size, "it must be a whole number >= 1", 1)
        last = self._world_size - 1
        self._rank = _whole_number(
            "rank", rank, f"it must be a whole number from 0 to {last} (world_size - 1)", 0, last
        )
        self._local_world_size = self._world_size
        if local_world_size is not None:
            allowed = f"it counts this node's processes: a whole number from 1 to world_size={world_size}"
            self._local_world_size = _whole_number("local_world_size", local_world_size, allowed, 1, last + 1)
        per_node = self._local_world_size
        self._local_rank = self._rank % per_node
        if local_rank is not None:
            allowed = f"it must be a whole number from 0 to {per_node - 1} (local_world_size - 1)"
            self._local_rank = _whole_number("local_rank", local_rank, allowed, 0, per_node - 1)
        self._node_rank = self._rank // per_node
        if node_rank is not None:
            self._node_rank = _whole_number("node_rank", node_rank, "it must be a whole number >= 0", 0)
        self._address = self._stated_address(address)
        self._port = self._stated_port(port)

    def _stated_address(self, address: str | None) -> str:
        fix = ""
        if address is None:
            address = os.environ.get(variables.MASTER_ADDR, self.DEFAULT_ADDRESS)
            fix = f"It came from {variables.MASTER_ADDR}={address!r} in the environment: set a host there, or unset it."
        if not isinstance(address, str) or not address.strip():
            raise PlatformError("address", address, "it must be rank 0's host name or IP address", fix, "Explicit")
        return address

    def _stated_port(self, port: int | None) -> int:
        allowed = "it must be a port number from 1 to 65535 that rank 0 can bind and every rank reach"
        if port is not None:
            return _whole_number("port", port, allowed, 1, 65535)
        raw = os.environ.get(variables.MASTER_PORT)
        if raw is None:
            return self.DEFAULT_PORT
        fix = f"It came from {variables.MASTER_PORT}={raw!r} in the environment: set a port number there, or unset it."
        try:
            value = int(raw)
        except ValueError:
            raise PlatformError("port", raw, allowed, fix, "Explicit") from None
        if not 1 <= value <= 65535:
            raise PlatformError("port", value, allowed, fix, "Explicit")
        return value

    @staticmethod
    def detect() -> bool:
        return False  # a place stated by hand is given, never found

    def world_size(self) -> int:
        return self._world_size

    def global_rank(self) -> int:
        return self._rank

    def local_rank(self) -> int:
        return self._local_rank

    def local_world_size(self) -> int:
        return self._local_world_size

    def node_rank(self) -> int:
        return self._node_rank

    def main_address(self) -> str:
        return self._address

    def main_port(self) -> int:
        return self._port

    def _values(self) -> tuple[int | str, ...]:
        return (
            self._rank,
            self._world_size,
            self._local_rank,
            self._local_world_size,
            self._node_rank,
            self._address,
            self._port,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Explicit) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return (
            f"Explicit(rank={self._rank}, world_size={self._world_size}, local_rank={self._local_rank}, "
            f"local_world_size={self._local_world_size}, node_rank={self._node_rank}, address={self._address!r}, "
            f"port={self._port})"
        )


# The registered environments in detection order, read afresh each time (module __getattr__ below):
# register with register_environment, not by changing this.
ENVIRONMENTS: tuple[type[Environment], ...]


def __getattr__(name: str) -> object:
    if name == "ENVIRONMENTS":  # derived on each read, so that it follows the registry
        return registered_environments()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_place(environment: Environment) -> None:
    """Refuse, at once, a place that cannot be: a rank outside the world, or a bad count.

    Otherwise such a rank would wait on the store until the timeout for peers that never come.
    """
    rank, world_size = environment.global_rank(), environment.world_size()
    local_rank, local_world_size = environment.local_rank(), environment.local_world_size()
    where = f"under {environment.name}"
    if environment.place_variables:
        where += f" ({', '.join(environment.place_variables)})"
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
    """The launcher that started this process, or None when phalanx must start the ranks itself.

    The registered environments are tried in order (see `register_environment`); the first
    whose `detect()` is true wins.
    """
    for environment in registered_environments():
        if environment.detect():
            return environment()
    return None
