"""The names of the environment variables phalanx sets or reads, in one place.

phalanx's own (`PHALANX_*`) and the standard ones that torch.distributed and user code read
to know a rank's place (torchrun's names). Modules import the names from here, never spell
them out, so that a rename or a search finds every use.
"""

from __future__ import annotations

__all__ = [
    "DISABLE_ZYGOTE_FORK",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "JOB_SECRET",
    "JOB_SECRET_FILE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "OMP_NUM_THREADS",
    "RANK",
    "RESTART_COUNT",
    "ROLE",
    "ROLE_NAME",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "RUN",
    "SHARED_MEMORY",
    "TORCHELASTIC_ERROR_FILE",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_SIGNALS_TO_HANDLE",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "WORLD_SIZE",
]

# -- phalanx's own ------------------------------------------------------------------------------
RUN = "PHALANX_RUN"  # "1" in the ranks of `phalanx run`: a launch() inside joins them
RESTART_COUNT = "PHALANX_RESTART_COUNT"  # in every rank: 0 on the first try, k on the k-th restart
ROLE = "PHALANX_ROLE"  # "zygote" or "worker" inside phalanx's own processes
DISABLE_ZYGOTE_FORK = "PHALANX_FORK_ZYGOTE"  # "0": never fork the caller, always exec a zygote
SHARED_MEMORY = "PHALANX_SHARED_MEMORY"  # "0": return values never go through shared memory files
JOB_SECRET = "PHALANX_JOB_SECRET"  # the job secret, 64 hex digits, the same in every process of a job
JOB_SECRET_FILE = "PHALANX_JOB_SECRET_FILE"  # or a private file (0600, owned by the user) that holds it

# -- a rank's place, as torchrun states it --------------------------------------------------------
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
NODE_RANK = "NODE_RANK"
GROUP_RANK = "GROUP_RANK"  # torchrun's name for the node's index
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"

# -- what torchrun's agent sets besides (torch/distributed/elastic/agent/server/local_elastic_agent.py)
ROLE_RANK = "ROLE_RANK"
ROLE_NAME = "ROLE_NAME"
ROLE_WORLD_SIZE = "ROLE_WORLD_SIZE"
GROUP_WORLD_SIZE = "GROUP_WORLD_SIZE"
TORCHELASTIC_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
TORCHELASTIC_MAX_RESTARTS = "TORCHELASTIC_MAX_RESTARTS"
TORCHELASTIC_RUN_ID = "TORCHELASTIC_RUN_ID"
TORCHELASTIC_USE_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
TORCHELASTIC_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"
TORCH_NCCL_ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
OMP_NUM_THREADS = "OMP_NUM_THREADS"
TORCHELASTIC_SIGNALS_TO_HANDLE = "TORCHELASTIC_SIGNALS_TO_HANDLE"
