"""Train a small network on scikit-learn's digits with phalanx: 2 CPU processes by default.

    python examples/digits.py                       # train from scratch, 2 ranks on CPU
    python examples/digits.py --resume              # continue from the last checkpoint
    python examples/digits.py --n-procs 4 --epochs 30
    python examples/digits.py --device gpu --n-procs 1   # on one GPU
    tensorboard --logdir runs/digits                # the curves

Every rank trains on its shard of the data (DistributedDataParallel keeps the models equal),
the master draws the progress bar and writes TensorBoard logs, a checkpoint is saved after
every epoch, and the test accuracy is measured on all ranks and summed.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import TensorDataset

import phalanx as px


def load_digits() -> tuple[TensorDataset, TensorDataset]:
    """The 1,797 8x8 images of scikit-learn's digits, split 80/20 the same way on every rank."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    images, labels = sklearn_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=360, random_state=0)

    def as_dataset(x, y):
        return TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long))

    return as_dataset(train_x, train_y), as_dataset(test_x, test_y)


def make_network() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def evaluate(model: nn.Module, loader: px.ShardedLoader) -> float:
    """Accuracy over the whole test set: each rank counts its shard, the counts are summed."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return px.all_reduce(correct, op="sum") / px.all_reduce(total, op="sum")


def train(options: argparse.Namespace) -> float:
    """Runs on every rank; returns the final test accuracy."""
    from tqdm import tqdm

    px.seed_everything(options.seed)  # the same initial weights on every rank
    train_set, test_set = load_digits()
    model = px.prepare_model(make_network())
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr)
    loader = px.dataloader(train_set, batch_size=options.batch_size, shuffle=True, seed=options.seed)
    test_loader = px.dataloader(test_set, batch_size=120)
    recorder = px.Recorder(options.logdir)
    ctx = px.Context(model=model, optimizer=optimizer, loader=loader, recorder=recorder, epoch=0)
    if options.resume and ctx.load(options.checkpoint, missing_ok=True) and px.is_master():
        print(f"resumed from {options.checkpoint} after epoch {ctx.epoch}", flush=True)

    bar = tqdm(
        total=options.epochs * len(loader),
        initial=ctx.epoch * len(loader),
        disable=not px.is_master(),
        desc="training",
        mininterval=0.5,
    )
    loss_function = nn.CrossEntropyLoss()
    while ctx.epoch < options.epochs:
        for x, y in ctx.loader:
            loss = loss_function(ctx.model(x), y)
            ctx.optimizer.zero_grad()
            loss.backward()
            ctx.optimizer.step()
            ctx.recorder.scalar("train/loss", loss.item())
            ctx.recorder.step()
            bar.update()
        ctx.epoch += 1
        accuracy = evaluate(ctx.model, test_loader)
        ctx.recorder.scalar("test/accuracy", accuracy, step=ctx.epoch)
        bar.set_postfix(epoch=ctx.epoch, accuracy=f"{accuracy:.3f}")
        ctx.save(options.checkpoint)
    bar.close()
    accuracy = evaluate(ctx.model, test_loader)
    ctx.recorder.params(
        {"lr": options.lr, "batch_size": options.batch_size, "ranks": px.get_world_size()},
        {"test/final_accuracy": accuracy},
    )
    ctx.recorder.close()
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description="Train on scikit-learn's digits with phalanx.")
    parser.add_argument("--n-procs", type=int, default=2, help="processes (ranks); default 2")
    parser.add_argument("--device", default="cpu", help="cpu, gpu, mps or auto; default cpu")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs/digits", help="TensorBoard logs")
    parser.add_argument("--checkpoint", default="runs/digits/checkpoint.pt")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    options = parser.parse_args()
    platform = px.Platform(device=options.device, n_procs=options.n_procs)
    accuracies = px.launch(train, options, platform=platform)
    print(f"test accuracy: {accuracies[0]:.4f}")


if __name__ == "__main__":
    main()
