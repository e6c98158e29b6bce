"""PopTorch's "distributed execution using Open MPI" example on phalanx: only the import changed.

mpirun -np 2 python examples/poptorch_mpirun.py
mpirun --allow-run-as-root --oversubscribe -np 2 python examples/poptorch_mpirun.py   # as root, or few cores
python examples/poptorch_mpirun.py                                                    # one process, no MPI

Each process trains on its own subset of the dataset (the same shuffle seed everywhere),
the gradients are averaged across the processes, and at the end each process prints the
samples it saw and a checksum of its weights (the same in every process). The sizes are
PopTorch's example shrunk to run in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os

import torch

from phalanx.compat import poptorch  # was: import poptorch

SHAPE = (3, 2)


class ExampleModelWithLoss(torch.nn.Module):
    """A linear classifier that returns its loss last when given the labels (PopTorch's convention)."""

    def __init__(self, data_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(int(torch.tensor(data_shape).prod()), num_classes)
        self.loss = torch.nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None):
        scores = self.fc(x.reshape(x.shape[0], -1))
        if target is None:
            return scores
        return scores, self.loss(scores, target)


class ExampleDataset(torch.utils.data.Dataset):
    """Two classes of random points; a sample's last feature is its id / length, to see who got what."""

    def __init__(self, shape: tuple[int, ...], length: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 2, (length,), generator=generator)
        self.data = torch.rand((length, *shape), generator=generator) + self.labels.view(-1, 1, 1)
        self.data[:, 0] = -self.data[:, 0]
        self.data[:, -1, -1] = torch.arange(length) / length

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.data[index], self.labels[index]


def process(process_id: int = 0, num_processes: int = 1, seed: int = 42, length: int = 256) -> dict:
    model_batch_size = 2
    model = ExampleModelWithLoss(data_shape=SHAPE, num_classes=2)

    # Create a poptorch.Options instance to override default options
    opts = poptorch.Options()
    # 4 optimizer steps per call of the model (PopTorch's example: 400)
    opts.deviceIterations(4)
    # 2 replicas per process (here: two turns on this process's device)
    opts.replicationFactor(2)
    # Set the id of the current process and the total number of processes.
    opts.Distributed.configureProcessId(process_id, num_processes)
    # Accumulate the gradient twice before applying it (PopTorch's example: 8)
    opts.Training.gradientAccumulation(2)
    # All the processes must use the same seed if shuffle=True is used for the DataLoader.
    opts.randomSeed(seed)

    training_data = poptorch.DataLoader(
        opts,
        dataset=ExampleDataset(shape=SHAPE, length=length),
        batch_size=model_batch_size,
        shuffle=True,
        drop_last=True,
    )
    poptorch_model = poptorch.trainingModel(model, options=opts)

    seen: list[int] = []
    for batch_number, (data, labels) in enumerate(training_data):
        output, loss = poptorch_model(data, labels)
        seen += (data[:, -1, -1] * length).round().long().tolist()
        scores = ", ".join(f"{score:.3f}" for score in output[-1].tolist())
        print(f"process {process_id}: batch {batch_number}, label {labels[-1].item()} scored {scores}, loss {loss:.4f}")

    checksum = sum(parameter.double().sum().item() for parameter in model.parameters())
    print(f"process {process_id} of {num_processes}: seed {seed}, weights {checksum:.12f}, samples {sorted(seen)}")
    return {"seed": seed, "weights": checksum, "samples": sorted(seen)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42, help="the shuffle seed (must be the same in every process)")
    arguments = parser.parse_args()
    process(
        process_id=int(os.environ.get("OMPI_COMM_WORLD_RANK", 0)),
        num_processes=int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1)),
        seed=arguments.seed,
    )
