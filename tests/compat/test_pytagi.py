"""phalanx.compat.pytagi: every member pyTAGI documents for `pytagi.nn.ddp`, on torch models."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import phalanx as px
from phalanx.compat.pytagi import DDPConfig, DDPSequential
from tests.by_hand import run_by_hand

CPU2 = px.Platform(device="cpu", n_procs=2)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _one_process() -> DDPSequential:
    return DDPSequential(_net(), DDPConfig(device_ids=[0], backend="nccl", device="cpu"), average=True)


def test_config_has_pytagi_fields_and_defaults():
    config = DDPConfig(device_ids=[0, 1])
    assert (config.device_ids, config.backend, config.rank, config.world_size) == ([0, 1], "nccl", 0, 1)
    config.rank, config.world_size = 1, 2  # settable, as pyTAGI's properties
    assert (config.rank, config.world_size, config.device) == (1, 2, "cuda")
    assert DDPConfig([0], backend="gloo").device == "cpu"
    assert "device_ids=[0, 1], backend='nccl', rank=1, world_size=2" in repr(config)


def test_call_and_forward_give_the_output_mean_and_a_zero_variance():
    ddp_model = _one_process()
    x = np.random.default_rng(0).random((4, 1))  # float64, as numpy makes it
    mu, var = ddp_model(x)
    expected = ddp_model.model(torch.as_tensor(x, dtype=torch.float32)).detach().numpy()
    assert isinstance(mu, np.ndarray) and mu.shape == (4, 2) and np.allclose(mu, expected)
    assert np.array_equal(var, np.zeros((4, 2), dtype=np.float32))
    mu2, _ = ddp_model.forward(x, var_x=np.zeros(4))
    assert np.array_equal(mu, mu2)
    assert isinstance(ddp_model.output_z_buffer, torch.Tensor) and ddp_model.output_z_buffer.requires_grad
    ddp_model.output_to_host()
    assert np.array_equal(ddp_model.get_outputs()[0], mu)
    assert ddp_model.get_device_with_index() == "cpu"
    ddp_model.barrier()  # one process: returns at once


def test_an_input_variance_is_refused_rather_than_ignored():
    with pytest.raises(ValueError, match="takes no input variance"):
        _one_process()(np.ones((2, 1)), var_x=np.full(2, 0.1))


def test_backward_with_the_output_gradient_equals_backward_with_the_loss():
    by_loss, by_delta = _one_process(), _one_process()
    x, target = np.ones((3, 1), dtype=np.float32), torch.zeros(3, 2)
    by_loss(x)
    by_loss.backward(((by_loss.output_z_buffer - target) ** 2).sum())
    by_loss.step()
    mu, _ = by_delta(x)
    assert by_delta.input_delta_z_buffer is None
    by_delta.input_delta_z_buffer = 2 * (mu - target.numpy())  # d(loss)/d(output)
    by_delta.backward()
    by_delta.step()
    for a, b in zip(by_loss.model.parameters(), by_delta.model.parameters(), strict=True):
        assert torch.allclose(a, b) and a.grad is None  # step() clears the gradients


def test_eval_builds_no_graph_and_backward_then_says_to_call_train():
    ddp_model = _one_process()
    ddp_model.eval()
    ddp_model(np.ones((1, 1)))
    assert not ddp_model.output_z_buffer.requires_grad
    with pytest.raises(RuntimeError, match=r"eval mode; call train\(\) first"):
        ddp_model.backward(ddp_model.output_z_buffer.sum())
    ddp_model.train()
    ddp_model(np.ones((1, 1)))
    with pytest.raises(RuntimeError, match="pass the loss"):
        ddp_model.backward()


def _train_two_ranks(average: bool, steps: int) -> list[torch.Tensor]:
    """Each rank trains on its own data; returns this rank's parameters, flattened."""
    config = DDPConfig(device_ids=[0, 1], backend="nccl", rank=px.get_rank(), world_size=2, device="cpu")
    torch.manual_seed(100 + px.get_rank())  # different initial weights: DDP must start them equal
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    ddp_model = DDPSequential(model, config, average=average)
    ddp_model.train()
    for step in range(steps):
        x = np.full((4, 1), float(px.get_rank() + step + 1), dtype=np.float32)
        ddp_model(x)
        ddp_model.backward(ddp_model.output_z_buffer.pow(2).mean())
        ddp_model.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _reference(average: bool, steps: int) -> torch.Tensor:
    """One process computing what the two ranks should: SGD(lr=0.01) on the mean or sum of their gradients."""
    torch.manual_seed(100)  # rank 0's initial weights, which DDP gives every rank
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    for step in range(steps):
        grads = []
        for rank in (0, 1):
            model.zero_grad()
            model(torch.full((4, 1), float(rank + step + 1))).pow(2).mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for index, parameter in enumerate(model.parameters()):
                total = grads[0][index] + grads[1][index]
                parameter -= 0.01 * (total / 2 if average else total)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.timeout(100)
def test_two_ranks_keep_identical_parameters_and_average_or_sum_the_gradients():
    def both():
        return _train_two_ranks(True, 3), _train_two_ranks(False, 3)

    (mean0, sum0), (mean1, sum1) = px.launch(both, platform=CPU2)
    assert torch.equal(mean0, mean1) and torch.equal(sum0, sum1)
    assert torch.allclose(mean0, _reference(average=True, steps=3), atol=1e-6)
    assert torch.allclose(sum0, _reference(average=False, steps=3), atol=1e-6)
    assert not torch.allclose(mean0, sum0)


@pytest.mark.timeout(60)
def test_a_config_rank_that_disagrees_with_the_launch_is_an_error():
    def wrong_rank():
        DDPSequential(_net(), DDPConfig([0, 1], "gloo", rank=0, world_size=2))

    with pytest.raises(px.WorkerError, match=r"rank 1 raised .*DDPConfig\(rank=0, world_size=2\) says rank 0 of 2"):
        px.launch(wrong_rank, platform=CPU2)


MIGRATION_PAGE = Path(__file__).resolve().parents[2] / "docs" / "migration" / "pytagi.md"


def _page_script() -> str:
    """The phalanx script of the migration page, so that the page shows code that runs."""
    blocks = re.findall(r"```python\n(.*?)```", MIGRATION_PAGE.read_text(), flags=re.DOTALL)
    return next(block for block in blocks if "from phalanx.compat.pytagi import" in block)


@pytest.mark.cluster
@pytest.mark.timeout(100)
def test_the_migration_page_script_under_mpirun_trains_identical_replicas(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (apt-get install openmpi-bin; .ci/run does)")
    script = tmp_path / "train.py"
    script.write_text(_page_script())
    command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # mpirun passes on each rank's writes as they come, and print() writes the line and its end
    # apart when Python is unbuffered (PYTHONUNBUFFERED=1): look for the lines, not at them.
    reports = dict(re.findall(r"rank (\d) of 2 on cpu: (mean \[[^\]]*\], variance \[[^\]]*\])", result.stdout))
    assert sorted(reports) == ["0", "1"], result.stdout
    assert reports["0"] == reports["1"] and "variance [0. 0.]" in reports["0"]  # the same replica everywhere


def test_a_model_that_is_not_a_torch_module_is_refused():
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module"):
        DDPSequential(copy.copy, DDPConfig([0], device="cpu"))


# A rank started by hand: it states its place in DDPConfig, trains, and reports what its own code sees.
STATED_BY_HAND = """
import hashlib, os, sys
import numpy as np
import torch
import phalanx as px
from phalanx.compat.pytagi import DDPConfig, DDPSequential

rank = int(sys.argv[1])
torch.manual_seed(100 + rank)  # different initial weights: DDP must make them equal
model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
ddp_model = DDPSequential(model, DDPConfig([0, 1], "gloo", rank=rank, world_size=2, device="cpu"))
ddp_model.train()
for step in range(3):
    ddp_model(np.full((4, 1), float(rank + step + 1), dtype=np.float32))
    ddp_model.backward(ddp_model.output_z_buffer.pow(2).mean())
    ddp_model.step()
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
place = [os.environ.get(name) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")]
print(
    f"rank {px.get_rank()} of {px.get_world_size()}: weights {weights}, variables {place}, "
    f"torchelastic {'TORCHELASTIC_RUN_ID' in os.environ}",
    flush=True,
)
"""


@pytest.mark.cluster
@pytest.mark.timeout(100)
def test_ranks_started_by_hand_meet_through_their_config_and_keep_their_place_while_training(tmp_path):
    results = run_by_hand(STATED_BY_HAND, tmp_path)
    reports = {}
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, out + err
        found = re.search(rf"rank {rank} of 2: weights (\w+), variables (.*), torchelastic (\w+)", out)
        assert found, out + err
        reports[rank] = found.groups()
        assert found.group(2) == str([str(rank), str(rank), "2", "29500"])  # the launch's, held while the script runs
        assert found.group(3) == "False"  # joined as stated, not as a torchrun that never ran
    assert reports[0][0] == reports[1][0]  # DDP kept the replicas identical
