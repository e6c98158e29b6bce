"""The nodes runner: several nodes, no scheduler; each node's caller runs its ranks; they meet in one store.

The caller on node 0 hosts the job's store at `master_addr:master_port`; callers on the other
nodes and every worker join it. When a node's ranks fail, its caller raises a flag in the store
and every other caller stops its ranks at once. When all are done, each caller publishes its
ranks' values and failures, and reads everyone else's, so every node returns the full list (or
raises the same `WorkerError`). Node 0 keeps the store up until every node has read.

Nothing on the store is unpickled unless it is signed with the job secret: a node's outcome
is a JSON record (its failures and the ranks that returned), each return value is stored as
signed bytes under its own key, and the abort flag is a signed node number.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from datetime import timedelta

import torch.distributed as dist

from phalanx.errors import LaunchError, RankFailure
from phalanx.job_secret import HOW_TO_SET, secret_from_environment
from phalanx.platform import Platform
from phalanx.rendezvous import connect_store, host_store
from phalanx.runners.base import RunRequest
from phalanx.runners.local import LocalJob, LocalRunner

__all__ = ["NodeGroup", "NodesRunner"]

_ABORT = "phalanx/nodes/abort"
_OUTCOME = "phalanx/nodes/outcome/{node}"
_VALUE = "phalanx/nodes/value/{rank}"
_READ = "phalanx/nodes/read/{node}"
_FINISHED = b"finished"
Values = dict[int, bytes]  # pickled return values by global rank


class NodeGroup:
    """This node's view of the other nodes of a static multi-node job."""

    def __init__(self, store: dist.Store, platform: Platform, port: int, secret: bytes) -> None:
        self.store = store
        self._secret = secret
        self.address, self.port = platform.master_addr, port
        self.node, self.n_nodes = platform.node_rank, platform.n_nodes
        self.timeout = platform.timeout_delta
        self._watcher: threading.Thread | None = None
        self.intrusion: LaunchError | None = None  # a forged abort flag, raised by `exchange`

    def watch(self, on_other_node_failure) -> None:
        """Call `on_other_node_failure(node)` when another node raises the abort flag."""

        def wait_for_flag() -> None:
            try:
                # Its own connection: a blocking wait holds the connection it waits on.
                watcher_store = connect_store(self.address, self.port, timedelta(days=365), self._secret)
                watcher_store.wait([_ABORT])
                flag = watcher_store.get(_ABORT)
            except LaunchError as error:  # a flag the job did not raise: stop; `exchange` names the intrusion
                self.intrusion = error
                on_other_node_failure(-1)
                return
            except Exception:
                return
            if flag != _FINISHED and int(flag) != self.node:
                on_other_node_failure(int(flag))

        self._watcher = threading.Thread(target=wait_for_flag, name="phalanx-nodes", daemon=True)
        self._watcher.start()

    def raise_flag(self) -> None:
        """Tell every other node that this node's ranks failed (the first flag raised stays)."""
        try:
            self.store.compare_set(_ABORT, "", str(self.node))
        except Exception:
            pass

    def exchange(self, values: Values, failures: list[RankFailure]) -> tuple[Values, list[RankFailure]]:
        """Publish this node's outcome; return every node's values and failures together."""
        for rank, value in values.items():
            self.store.set(_VALUE.format(rank=rank), value)
        outcome = {"returned": sorted(values), "failures": [dataclasses.asdict(failure) for failure in failures]}
        self.store.set(_OUTCOME.format(node=self.node), json.dumps(outcome))
        if self.intrusion is not None:  # published all the same: the other nodes must not wait for it
            raise self.intrusion
        keys = [_OUTCOME.format(node=node) for node in range(self.n_nodes)]
        try:
            self.store.wait(keys, self.timeout)
        except Exception as error:
            raise LaunchError(
                f"node {self.node}: the other nodes did not report within {self.timeout}; "
                f"check that every node was started with the same master_addr/master_port ({error})"
            ) from error
        all_values: Values = {}
        all_failures: list[RankFailure] = []
        for key in keys:
            outcome = json.loads(self.store.get(key))  # signed: checked before it is parsed
            all_failures += [RankFailure(**record) for record in outcome["failures"]]
            for rank in outcome["returned"]:
                all_values[int(rank)] = self.store.get(_VALUE.format(rank=rank))
        self.store.set(_READ.format(node=self.node), b"1")
        return all_values, all_failures

    def close(self, exchanged: bool) -> None:
        """Release the watchers; after a full exchange, node 0 first waits until every node has read.

        Also after a failed one: a watcher still blocked in the store when the interpreter exits
        makes it abort.
        """
        try:
            if self.node == 0 and exchanged:
                self.store.wait([_READ.format(node=node) for node in range(self.n_nodes)], self.timeout)
            self.store.compare_set(_ABORT, "", _FINISHED)
        except Exception:
            pass
        if self._watcher is not None:
            self._watcher.join(timeout=5)


class NodesRunner(LocalRunner):
    """`launch` on one node of several (`n_nodes > 1`, no scheduler): node 0 hosts the store.

    Every node's caller runs its own share of the ranks as the local runner does; the nodes
    share the job's secret (`PHALANX_JOB_SECRET`), stop together when one fails, and each
    returns the full list of values (see `NodeGroup`).
    """

    def __init__(self, request: RunRequest) -> None:
        super().__init__(request)
        self._nodes: NodeGroup | None = None
        self._node_store: dist.Store | None = None

    def job_secret(self) -> bytes:
        platform = self.platform
        secret = secret_from_environment()
        if secret is None:
            raise LaunchError(
                f"a job on {platform.n_nodes} nodes needs a job secret, the same on every node, to sign what its "
                f"store carries: without one, anyone who can reach {platform.master_addr}:{platform.master_port} "
                f"could run code in it. {HOW_TO_SET}"
            )
        return secret

    def open_store(self, secret: bytes) -> int:
        """Node 0's caller hosts the job's store; the callers of other nodes join it."""
        platform = self.platform
        if platform.node_rank == 0:
            store = host_store(platform.master_addr, platform.master_port, platform.timeout_delta, secret)
        else:
            try:
                store = connect_store(
                    platform.master_addr,
                    platform.master_port,
                    platform.timeout_delta,
                    secret,
                    connect_timeout=platform.connect_timeout_delta,
                )
            except Exception as error:
                raise LaunchError(
                    f"node {platform.node_rank} could not reach node 0's store at {platform.master_addr}:"
                    f"{platform.master_port} within connect_timeout={platform.connect_timeout_delta}: {error}. "
                    "Start node 0 with the same master_addr and master_port, and check that this node can reach "
                    "that address."
                ) from error
        self._node_store = store
        port = platform.master_port or store.port
        self._nodes = NodeGroup(store, platform, port, secret)
        return port

    def start_store(self, secret: bytes) -> None:
        """Nothing to start: `open_store` hosted or joined the store already."""

    def watch_other_nodes(self, local_job: LocalJob) -> None:
        self._nodes.watch(lambda node: local_job.stop())
        local_job.on_failure = self._nodes.raise_flag

    def store_for_caller(self) -> dist.Store:
        return self._node_store

    def finish(
        self, values: dict[int, bytes], failures: list[RankFailure]
    ) -> tuple[dict[int, bytes], list[RankFailure]]:
        return self._nodes.exchange(values, failures)

    def close(self, finished: bool) -> None:
        if self._nodes is not None:
            self._nodes.close(finished)
        self._nodes = None
        self._node_store = None
