"""phalanx: write a training function once, run it on N ranked processes anywhere.

import phalanx as px
px.launch(train, 0.1, platform=px.Platform(device="cpu", n_procs=2))
"""

from __future__ import annotations

from phalanx.cli import add_platform_arguments
from phalanx.context import Context
from phalanx.dist import (
    all_gather,
    all_reduce,
    barrier,
    broadcast_from_master,
    device,
    get_local_rank,
    get_local_world_size,
    get_node_rank,
    get_rank,
    get_restart_count,
    get_world_size,
    is_distributed,
    is_master,
)
from phalanx.errors import (
    CheckpointError,
    HangError,
    LaunchError,
    PhalanxError,
    PlatformError,
    RankFailure,
    SerializationError,
    UntrustedFileError,
    WorkerError,
)
from phalanx.launch import launch, submit
from phalanx.platform import Platform, SlurmOptions
from phalanx.recorder import Recorder
from phalanx.seeding import seed_everything
from phalanx.sweep import SweepResult, sweep
from phalanx.training import ShardedLoader, dataloader, prepare_model, to_device, unwrap_model
from phalanx.wrapper import Wrapper, wrapper

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Context",
    "HangError",
    "LaunchError",
    "PhalanxError",
    "Platform",
    "PlatformError",
    "RankFailure",
    "Recorder",
    "SerializationError",
    "ShardedLoader",
    "SlurmOptions",
    "SweepResult",
    "UntrustedFileError",
    "WorkerError",
    "Wrapper",
    "add_platform_arguments",
    "all_gather",
    "all_reduce",
    "barrier",
    "broadcast_from_master",
    "dataloader",
    "device",
    "get_local_rank",
    "get_local_world_size",
    "get_node_rank",
    "get_rank",
    "get_restart_count",
    "get_world_size",
    "is_distributed",
    "is_master",
    "launch",
    "prepare_model",
    "seed_everything",
    "submit",
    "sweep",
    "to_device",
    "unwrap_model",
    "wrapper",
]

# Last, once everything above exists: take the clean copy of this interpreter that workers are
# forked from, while it is still clean (see phalanx.runners.zygote).
from phalanx.runners import zygote as _zygote

_zygote.prestart()
