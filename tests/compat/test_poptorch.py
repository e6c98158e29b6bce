"""phalanx.compat.poptorch: PopTorch's distributed-execution snippets with only the import changed."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import phalanx as px
from phalanx.compat import poptorch
from tests.by_hand import run_by_hand
from tests.namespaces import one_host

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE = EXAMPLES / "poptorch_mpirun.py"
OPEN_MPI = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
SUMMARY = re.compile(r"process (\d) of 2: seed (\d+), weights (\S+), samples \[([\d, ]*)\]")


def _summaries(stdout: str) -> dict[int, tuple[int, str, list[int]]]:
    """Each process's last line: its seed, its weights' checksum, the ids of the samples it trained on."""
    found = {}
    for process_id, seed, weights, samples in SUMMARY.findall(stdout):
        found[int(process_id)] = (int(seed), weights, [int(s) for s in samples.split(", ")])
    return found


def _require_open_mpi() -> None:
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (apt-get install openmpi-bin; .ci/run does)")


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=100, cwd=cwd)


# -- Options, DataLoader and the models in one process ---------------------------------------


def test_options_chain_and_the_loader_serves_combined_batches():
    opts = poptorch.Options()
    assert opts.deviceIterations(3) is opts and opts.replicationFactor(2) is opts
    assert opts.Training.gradientAccumulation(4) is opts.Training
    assert opts.randomSeed(7) is opts
    assert (opts.Distributed.processId, opts.Distributed.numProcesses) == (0, 1)
    data = torch.utils.data.TensorDataset(torch.arange(100.0))
    loader = poptorch.DataLoader(opts, data, batch_size=2, shuffle=True)
    assert loader.combinedBatchSize == 2 * 3 * 2 * 4
    batches = [batch for (batch,) in loader]
    assert [len(b) for b in batches] == [48, 48] and len(loader) == 2  # drop_last=True, as PopTorch
    assert len(set(torch.cat(batches).tolist())) == 96
    whole = poptorch.DataLoader(opts, data, batch_size=2, shuffle=False, auto_distributed_partitioning=False)
    assert torch.equal(torch.cat([batch for (batch,) in whole]), torch.arange(96.0))


def test_configure_process_id_alone_is_one_process_of_one():
    opts = poptorch.Options()
    assert opts.Distributed.configureProcessId(0, 1) is opts.Distributed
    assert (opts.Distributed.processId, opts.Distributed.numProcesses) == (0, 1)
    with pytest.raises(ValueError, match=r"rank 2 of world size 2 is impossible"):
        poptorch.Options().Distributed.configureProcessId(2, 2)


def test_training_model_makes_device_iterations_steps_over_averaged_micro_batches():
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    reference = copy.deepcopy(net)

    class WithLoss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            out = self.inner(x)
            return out, ((out - y) ** 2).mean()

    opts = poptorch.Options().deviceIterations(2).replicationFactor(2)
    model = poptorch.trainingModel(WithLoss(net), options=opts)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    output, loss = model(x, y)
    assert (
        output.shape == (1, 1) and not output.requires_grad and loss.dim() == 0
    )  # the last micro-batch's, as PopTorch
    # By hand: SGD(lr=0.01), one step per device iteration, each on the mean of two micro-batches.
    for step in range(2):
        reference.zero_grad()
        pair = slice(2 * step, 2 * step + 2)
        ((reference(x[pair]) - y[pair]) ** 2).mean().backward()
        with torch.no_grad():
            for parameter in reference.parameters():
                parameter -= 0.01 * parameter.grad
    for trained, expected in zip(net.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(trained, expected, atol=1e-6)


def test_training_model_rejects_a_batch_that_does_not_divide():
    opts = poptorch.Options().deviceIterations(3)
    model = poptorch.trainingModel(torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Flatten(0)), options=opts)
    with pytest.raises(ValueError, match=r"4 samples does not divide into .* = 3 micro-batches"):
        model(torch.randn(4, 2))


def test_inference_model_returns_every_output_without_gradients():
    net = torch.nn.Linear(2, 3)
    infer = poptorch.inferenceModel(net, poptorch.Options().deviceIterations(2))
    out = infer(torch.randn(6, 2))
    assert out.shape == (6, 3) and not out.requires_grad and not net.training


def test_an_ipu_setting_without_a_torch_meaning_names_the_supported_ones():
    with pytest.raises(AttributeError, match=r"useIpuModel is an IPU setting .* deviceIterations"):
        poptorch.Options().useIpuModel(True)


# -- IPU-only classes --------------------------------------------------------------------------


def test_ipu_only_classes_raise_saying_ipus_are_not_supported_and_what_to_use():
    from phalanx.compat.poptorch.distributed import Partition, VirtualIpuManager

    with pytest.raises(poptorch.IpuNotSupportedError, match=r"VirtualIpuManager.isAvailable needs Graphcore IPUs"):
        VirtualIpuManager.isAvailable()
    with pytest.raises(poptorch.IpuNotSupportedError, match=r"mpirun -np N python script.py.*px.launch"):
        Partition(num_ipus=4, num_gcds=2, num_sync_replicas=4)
    assert poptorch.distributed.Partition is Partition


def test_the_python_start_snippet_stops_at_the_partition_manager_with_advice():
    # PopTorch's "Distributed execution using Python" snippet, import changed.
    with pytest.raises(poptorch.IpuNotSupportedError, match="no partition to create"):
        import multiprocessing  # noqa: F401

        from phalanx.compat.poptorch.distributed import VirtualIpuManager as vipu

        partition_name = "my_partition"
        if vipu.isAvailable():
            vipu.createPartition(partition_name, poptorch.distributed.Partition(num_ipus=4, num_gcds=2))


# -- several processes ------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.timeout(100)
def test_open_mpi_example_gives_each_process_a_disjoint_subset_with_the_same_seed(tmp_path):
    _require_open_mpi()
    result = _run([*OPEN_MPI, "-np", "2", sys.executable, str(EXAMPLE)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    found = _summaries(result.stdout)
    assert sorted(found) == [0, 1], result.stdout
    (seed0, weights0, samples0), (seed1, weights1, samples1) = found[0], found[1]
    assert seed0 == seed1 == 42
    assert not set(samples0) & set(samples1)
    assert sorted(samples0 + samples1) == list(range(256))  # 128 each, every sample once
    assert weights0 == weights1  # DDP kept the replicas identical


@pytest.mark.timeout(60)
def test_processes_with_different_shuffle_seeds_raise_an_error_naming_them():
    def load():
        opts = poptorch.Options().randomSeed(1 + px.get_rank())
        opts.Distributed.configureProcessId(px.get_rank(), px.get_world_size())
        poptorch.DataLoader(opts, torch.utils.data.TensorDataset(torch.arange(8.0)), batch_size=2, shuffle=True)

    message = r"different shuffle seeds \(process 0: randomSeed\(1\), process 1: randomSeed\(2\)\)"
    with pytest.raises(px.WorkerError, match=message):
        px.launch(load, platform=px.Platform(device="cpu", n_procs=2))


@pytest.mark.timeout(100)
def test_processes_started_from_python_meet_through_their_configured_ids(tmp_path):
    # The seed's Python start, without the IPU partition: the script starts the processes.
    script = tmp_path / "start.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing, sys
            sys.path.insert(0, {str(EXAMPLES)!r})


            def process(process_id, num_processes):  # imports in the children only: a faster test
                from poptorch_mpirun import process

                process(process_id, num_processes)


            if __name__ == "__main__":
                ctx = multiprocessing.get_context("spawn")
                num_processes = 2
                processes = []
                for i in range(num_processes):
                    p = ctx.Process(target=process, args=(i, num_processes))
                    p.start()
                    processes.append(p)
                for p in processes:
                    p.join()
                assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
            """
        )
    )
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = _summaries(result.stdout)
    assert sorted(found) == [0, 1], result.stdout
    assert not set(found[0][2]) & set(found[1][2]) and len(found[0][2]) == len(found[1][2]) == 128
    assert found[0][1] == found[1][1]


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_processes_started_from_two_terminals_meet_on_the_default_port(tmp_path):
    """Two shells, two parents, no MASTER_PORT: both meet at 127.0.0.1:29500 (a namespace of their own)."""
    script = tmp_path / "terminal.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(EXAMPLES)!r})\n"
        "from poptorch_mpirun import process\nprocess(int(sys.argv[1]), 2)\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    with one_host("phx-terminals") as host:
        terminals = [
            subprocess.Popen(
                ["ip", "netns", "exec", host, "bash", "-c", f"{sys.executable} {script} {process_id}; exit $?"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp_path,
                env=env,
            )
            for process_id in (0, 1)
        ]
        outputs = [terminal.communicate(timeout=100) for terminal in terminals]
    for terminal, (out, err) in zip(terminals, outputs, strict=True):
        assert terminal.returncode == 0, out + err
    found = _summaries(outputs[0][0] + outputs[1][0])
    assert sorted(found) == [0, 1], outputs
    assert found[0][1] == found[1][1]


@pytest.mark.timeout(100)
def test_inside_a_launch_the_processes_are_the_ranks(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from poptorch_mpirun import process

    results = px.launch(
        lambda: process(px.get_rank(), px.get_world_size(), length=64),
        platform=px.Platform(device="cpu", n_procs=2),
    )
    assert not set(results[0]["samples"]) & set(results[1]["samples"])
    assert sorted(results[0]["samples"] + results[1]["samples"]) == list(range(64))
    assert results[0]["weights"] == results[1]["weights"]


@pytest.mark.timeout(60)
def test_a_process_id_that_disagrees_with_the_launch_is_an_error():
    def configure():
        poptorch.Options().Distributed.configureProcessId(1 - px.get_rank(), 2)

    with pytest.raises(
        px.WorkerError, match=r"configureProcessId\((\d), 2\) says rank \1 of 2, but this process is rank"
    ):
        px.launch(configure, platform=px.Platform(device="cpu", n_procs=2))


# A process started by hand that states its place, then reports what its own code sees.
STATED_BY_HAND = """
import os, sys
import phalanx as px
from phalanx.compat import poptorch
from phalanx.compat import _process_group

opts = poptorch.Options()
opts.Distributed.configureProcessId(int(sys.argv[1]), 2)
place = [os.environ.get(name) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")]
print(
    f"process {px.get_rank()} of {px.get_world_size()}: {type(_process_group._held.platform.environment).__name__}, "
    f"variables {place}, torchelastic {'TORCHELASTIC_RUN_ID' in os.environ}, sum {px.all_reduce(1, op='sum')}",
    flush=True,
)
"""


@pytest.mark.cluster
@pytest.mark.timeout(100)
def test_processes_started_by_hand_join_their_stated_place_not_a_fake_torchrun(tmp_path):
    results = run_by_hand(STATED_BY_HAND, tmp_path)
    for process_id, (code, out, err) in enumerate(results):
        assert code == 0, out + err
        # RANK and the others hold while the script's own code runs (the launch is held open);
        # nothing claims a torchrun that never ran.
        variables = [str(process_id), str(process_id), "2", "2"]
        assert f"process {process_id} of 2: Explicit, variables {variables}, torchelastic False, sum 2" in out, (
            out + err
        )
