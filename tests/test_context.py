"""Context: checkpoints that resume exactly, write atomically and never run code."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from torch.utils.data import TensorDataset

import phalanx as px
from tests.conftest import CPU, run_script

pytestmark = pytest.mark.timeout(120)

SAMPLES, EPOCHS = 96, 3  # 2 ranks x batch 8: 6 steps per epoch


def _session(checkpoint: str):
    torch.manual_seed(0)  # the same initial weights on every rank
    data = torch.randn(SAMPLES, 5)
    dataset = TensorDataset(data, (data.sum(1, keepdim=True) > 0).float())
    model = px.prepare_model(torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    loader = px.dataloader(dataset, batch_size=8, shuffle=True, seed=11)
    ctx = px.Context(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, epoch=0, step=0)
    px.seed_everything(100 + px.get_rank())  # ranks draw different dropout masks
    ctx.load(checkpoint, missing_ok=True)
    return ctx


def train(checkpoint: str, stop_after: int | None):
    """Train EPOCHS epochs; with stop_after, save and return after that many steps."""
    ctx = _session(checkpoint)
    losses = []
    while ctx.epoch < EPOCHS:
        for x, y in ctx.loader:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(ctx.model(x), y)
            ctx.optimizer.zero_grad()
            loss.backward()
            ctx.optimizer.step()
            ctx.scheduler.step()
            ctx.step += 1
            losses.append(loss.item())
            if ctx.step == stop_after:
                ctx.save(checkpoint)
                return losses, None
        ctx.epoch += 1
    params = [p.detach().clone() for p in px.unwrap_model(ctx.model).parameters()]
    return losses, params


@pytest.mark.parametrize("n_procs", [1, 2])
@pytest.mark.parametrize("stop_after", [4, 9])  # mid-epoch, in the first and in the second epoch
def test_resumed_run_matches_an_uninterrupted_run_bit_for_bit(tmp_path, n_procs, stop_after):
    platform = px.Platform(device="cpu", n_procs=n_procs)
    straight = px.launch(train, str(tmp_path / "unused.pt"), None, platform=platform)
    checkpoint = str(tmp_path / "ckpt.pt")
    first = px.launch(train, checkpoint, stop_after, platform=platform)
    second = px.launch(train, checkpoint, None, platform=platform)
    for rank in range(n_procs):
        losses, params = straight[rank]
        assert len(first[rank][0]) == stop_after
        assert first[rank][0] + second[rank][0] == losses  # exact float equality, every step
        assert all(torch.equal(a, b) for a, b in zip(params, second[rank][1], strict=True))


def test_missing_checkpoint_is_an_error_unless_allowed(tmp_path):
    ctx = px.Context(step=0)
    assert ctx.load(tmp_path / "none.pt", missing_ok=True) is False
    with pytest.raises(px.CheckpointError, match="does not exist"):
        ctx.load(tmp_path / "none.pt")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "code-ran")
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": _RunsCode(marker), "__phalanx__": {}}, path)
    with pytest.raises(px.CheckpointError, match=r"evil.pt was refused: it holds \S*mkdir.*weights_only=True"):
        px.Context(step=0).load(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_checkpoint_gives_a_clear_error_and_loads_nothing(tmp_path, damage):
    model = torch.nn.Linear(3, 3)
    ctx = px.Context(model=model, step=5)
    path = tmp_path / "ckpt.pt"
    ctx.save(path, wait=True)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    before = [p.clone() for p in model.parameters()]
    ctx.step = 6
    with pytest.raises(px.CheckpointError, match="truncated or corrupt"):
        ctx.load(path)
    assert ctx.step == 6 and all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    px.Context(model=torch.nn.Linear(3, 3), step=5).save(tmp_path / "ckpt.pt")
    other = torch.nn.Linear(3, 4)
    before = other.weight.clone()
    ctx = px.Context(model=other, step=0)
    with pytest.raises(px.CheckpointError, match=r"model.weight has shape \(3, 3\), expected \(4, 3\)"):
        ctx.load(tmp_path / "ckpt.pt")
    assert ctx.step == 0 and torch.equal(other.weight, before)


def _crash_during_second_save(path: str, crash_in: str):
    ctx = px.Context(model=torch.nn.Linear(4, 4), step=1)
    ctx.save(path, wait=True)
    ctx.step = 2
    with torch.no_grad():
        ctx.model.weight.add_(1.0)

    def die(*args, **kwargs):
        os._exit(9)  # the process disappears mid-save, as if killed

    if crash_in == "write":
        original_save = torch.save

        def half_written(state, file, *args, **kwargs):
            original_save(state, file, *args, **kwargs)
            file.flush()
            file.truncate(file.tell() // 2)
            die()

        torch.save = half_written
    else:
        os.replace = die
    ctx.save(path)


@pytest.mark.parametrize("crash_in", ["write", "rename"])
def test_process_killed_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, crash_in):
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(px.WorkerError) as info:
        px.launch(_crash_during_second_save, path, crash_in, platform=px.Platform(device="cpu", n_procs=1))
    assert info.value.exit_code == 9
    ctx = px.Context(model=torch.nn.Linear(4, 4), step=0)
    assert ctx.load(path) and ctx.step == 1
    ctx.save(path, wait=True)  # the next save cleans the half-written temporary file up
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_checkpoint_from_a_different_world_size_is_refused_with_the_reason(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    px.launch(lambda: px.Context(step=3).save(path), platform=CPU)
    with pytest.raises(px.CheckpointError, match="saved by 2 ranks and this job has 1"):
        px.Context(step=0).load(path)


def test_checkpoint_holds_every_rank_generator_state(tmp_path):
    path = str(tmp_path / "ckpt.pt")

    def save_then_draw():
        px.seed_everything(px.get_rank())
        px.Context(step=0).save(path)
        return torch.rand(2).tolist()

    def load_then_draw():
        px.Context(step=0).load(path)
        return torch.rand(2).tolist()

    assert px.launch(save_then_draw, platform=CPU) == px.launch(load_then_draw, platform=CPU)
    saved = torch.load(path, weights_only=True)
    assert len(saved["__phalanx__"]["rng"]) == 2


def test_plain_values_and_state_dict_round_trip():
    ctx = px.Context(epoch=3, name="run", history=[0.5, 0.25], scaler=torch.amp.GradScaler("cpu", enabled=False))
    ctx.later = {"best": 0.1}
    state = ctx.state_dict()
    fresh = px.Context(epoch=0, name="", history=[], scaler=torch.amp.GradScaler("cpu", enabled=False))
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert (fresh.epoch, fresh.name, fresh.history, fresh.later) == (3, "run", [0.5, 0.25], {"best": 0.1})


def test_to_and_cpu_move_everything_registered():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    ctx = px.Context(model=model, optimizer=optimizer, weights=torch.ones(2))
    ctx.to("meta")
    assert next(ctx.model.parameters()).device.type == "meta" and ctx.weights.device.type == "meta"
    assert optimizer.state[next(iter(optimizer.state))]["exp_avg"].device.type == "meta"


def test_ddp_wraps_registered_models_in_a_distributed_run():
    def wrap():
        ctx = px.Context(model=torch.nn.Linear(2, 2), frozen=torch.nn.Linear(2, 2).requires_grad_(False)).ddp()
        return type(ctx.model).__name__, type(ctx.frozen).__name__

    assert px.launch(wrap, platform=CPU) == [("DistributedDataParallel", "Linear")] * 2


def test_save_without_waiting_for_the_disk_is_still_a_complete_checkpoint(tmp_path):
    ctx = px.Context(model=torch.nn.Linear(2, 2), step=4)
    ctx.save(tmp_path / "fast.pt", durable=False, wait=True)
    assert sorted(os.listdir(tmp_path)) == ["fast.pt"]  # in place: wait=True returned after the rename
    ctx.save(tmp_path / "fast.pt", durable=False)  # the rename goes on in the background
    ctx.wait()
    assert sorted(os.listdir(tmp_path)) == ["fast.pt"]
    restored = px.Context(model=torch.nn.Linear(2, 2), step=0)
    assert restored.load(tmp_path / "fast.pt") and restored.step == 4
    assert sorted(os.listdir(tmp_path)) == ["fast.pt"]


def test_durable_save_returns_before_the_flush_and_the_file_is_in_place_after_wait(tmp_path):
    ctx = px.Context(model=torch.nn.Linear(64, 64), step=7)
    ctx.save(tmp_path / "ckpt.pt")
    ctx.wait()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 7


def _save_then_return(path: str) -> int:
    px.Context(model=torch.nn.Linear(256, 256), step=px.get_rank()).save(path)
    return px.get_rank()  # the rank ends with its checkpoint possibly still being flushed


def test_a_rank_reports_its_value_only_once_its_last_checkpoint_is_in_place(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    assert px.launch(_save_then_return, path, platform=CPU) == [0, 1]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True)["step"] == 0


def _fail_to_flush(path: str) -> None:
    ctx = px.Context(step=1)
    ctx.save(path, wait=True)
    import phalanx.context

    def no_space(*args):
        raise OSError(28, "No space left on device")

    phalanx.context.os.fsync = no_space  # the next flush fails, as on a full disk
    ctx.step = 2
    ctx.save(path)


def test_a_failed_background_flush_fails_the_rank_and_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(px.WorkerError, match="No space left on device") as info:
        px.launch(_fail_to_flush, path, platform=px.Platform(device="cpu", n_procs=1))
    assert info.value.exc_type == "CheckpointError"
    assert px.Context(step=0).load(path) and torch.load(path, weights_only=True)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_loading_a_directory_says_it_is_one_and_what_to_pass(tmp_path):
    with pytest.raises(px.CheckpointError, match=r"is a directory, not a checkpoint file: pass the path of the file"):
        px.Context(step=0).load(tmp_path)


def test_saving_to_a_directory_fails_the_script_at_once_with_the_path(tmp_path):
    script = f"""
        import phalanx as px
        try:
            px.Context(step=1).save({str(tmp_path)!r})
        except px.CheckpointError as error:
            print("raised in save:", error)
            raise
    """
    result = run_script(script)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"raised in save: cannot write checkpoint {tmp_path}: it is a directory" in result.stdout
    assert "Exception ignored" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == []


def _save_to(path: str) -> str:
    try:
        px.Context(step=1).save(path)
    except px.CheckpointError as error:
        return str(error)
    return "saved"


def test_saving_to_a_directory_raises_on_every_rank(tmp_path):
    for message in px.launch(_save_to, str(tmp_path), platform=CPU):
        assert f"cannot write checkpoint {tmp_path}: it is a directory" in message


def test_a_background_save_that_fails_unwaited_ends_the_program_with_one_line_and_code_1(tmp_path):
    path = tmp_path / "ckpt.pt"
    script = f"""
        import os
        import phalanx as px

        def no_space(fd):
            raise OSError(28, "No space left on device")

        os.fsync = no_space  # the background flush fails, as on a full disk
        px.Context(step=1).save({str(path)!r})
        print("the script ended")
    """
    result = run_script(script)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the script ended" in result.stdout
    lines = [line for line in result.stderr.splitlines() if "phalanx: checkpoint" in line]
    assert lines == [line for line in result.stderr.splitlines() if line.strip()]  # nothing else, no traceback
    assert lines and lines[0].startswith(f"phalanx: checkpoint {path} was not written: [Errno 28] No space left")
    assert not path.exists()


def test_a_torch_older_than_2_6_refuses_to_load(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    px.Context(step=3).save(path, wait=True)
    import phalanx.context

    monkeypatch.setattr(phalanx.context, "_torch_loads_weights_only_safely", lambda: False)
    ctx = px.Context(step=0)
    with pytest.raises(px.CheckpointError, match=r"before torch 2\.6 .*weights_only=True.* Install torch>=2\.6"):
        ctx.load(path)
    assert ctx.step == 0


def test_a_checkpoint_gets_the_umask_permissions_not_private_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        px.Context(step=1).save(tmp_path / "ckpt.pt", wait=True)
    finally:
        os.umask(umask)
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o644


# -- a refused load changes nothing ---------------------------------------------------------------


def _trained_context() -> px.Context:
    """A session with something in every part: trained weights, optimizer moments, a loader mid-epoch."""
    torch.manual_seed(3)
    data = torch.randn(32, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    loader = px.dataloader(TensorDataset(data), batch_size=4, shuffle=True, seed=5, device="cpu")
    ctx = px.Context(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, epoch=0, step=0)
    batches = iter(ctx.loader)
    for _ in range(3):
        (x,) = next(batches)
        ctx.optimizer.zero_grad()
        ctx.model(x).sum().backward()
        ctx.optimizer.step()
        ctx.scheduler.step()
        ctx.step += 1
    ctx.epoch = 1
    return ctx


def _everything(ctx: px.Context) -> dict:
    """A deep copy of all a load could change: parameters, optimizer and scheduler state, counters,
    the loader's position and flags, the generator state."""
    return copy.deepcopy(
        {
            "model": ctx.model.state_dict(),
            "optimizer": ctx.optimizer.state_dict(),
            "scheduler": ctx.scheduler.state_dict(),
            "loader": {**ctx.loader.state_dict(), "flags": (ctx.loader._in_pass, ctx.loader._resuming)},
            "counters": (ctx.epoch, ctx.step),
            "names": sorted(vars(ctx)),
            "rng": torch.get_rng_state(),
        }
    )


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _other_state() -> dict:
    """A checkpoint of the same session, further on: every part of it differs from `_trained_context`."""
    other = _trained_context()
    with torch.no_grad():
        for parameter in other.model.parameters():
            parameter.add_(1.0)
    other.epoch, other.step = 7, 70
    other.loader.load_state_dict({"epoch": 2, "batches": 1})
    state = other.state_dict()
    state["__phalanx__"]["rng"] = [state["__phalanx__"]["rng"]]
    return state


# How each checkpoint is damaged, and what the refusal says (the check that finds it, before any change).
_DAMAGES = {
    "model weight of another shape": (
        lambda state: state["model"].__setitem__("0.weight", torch.zeros(5, 4)),
        "model.0.weight has shape (5, 4), expected (3, 4)",
    ),
    "model misses a key": (lambda state: state["model"].pop("1.bias"), "'model' misses ['1.bias']"),
    "model holds a list for a tensor": (
        lambda state: state["model"].__setitem__("1.bias", [0.5]),
        "model.1.bias is of type list in the checkpoint, expected a tensor",
    ),
    "model is a tensor": (
        lambda state: state.__setitem__("model", torch.zeros(3)),
        "'model' is a module here, but the checkpoint holds a value of type Tensor",
    ),
    "optimizer moment of another shape": (
        lambda state: state["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(4, 3)),
        "optimizer.state[0]['exp_avg'] has shape (4, 3), expected (3, 4)",
    ),
    "optimizer misses param_groups": (
        lambda state: state["optimizer"].pop("param_groups"),
        "'optimizer' misses ['param_groups']",
    ),
    "optimizer has another group size": (
        lambda state: state["optimizer"]["param_groups"][0]["params"].pop(),
        "'optimizer' has parameter groups of sizes [3] in the checkpoint, expected [4]",
    ),
    "optimizer is None": (
        lambda state: state.__setitem__("optimizer", None),
        "'optimizer' (Adam here) needs its state, but the checkpoint holds None",
    ),
    "optimizer is a number": (
        lambda state: state.__setitem__("optimizer", 5),
        "'optimizer' is an optimizer here, but the checkpoint holds a value of type int",
    ),
    "scheduler is None": (
        lambda state: state.__setitem__("scheduler", None),
        "'scheduler' (StepLR here) needs its state, but the checkpoint holds None",
    ),
    "scheduler is a list": (
        lambda state: state.__setitem__("scheduler", [1, 2]),
        "'scheduler' (StepLR here) has a dict for its state, but the checkpoint holds a value of type list",
    ),
    "scheduler is missing": (
        lambda state: state.pop("scheduler"),
        "'scheduler' is registered here but not in the checkpoint",
    ),
    "loader is None": (
        lambda state: state.__setitem__("loader", None),
        "'loader' (ShardedLoader here) needs its state, but the checkpoint holds None",
    ),
    "loader misses batches": (lambda state: state["loader"].pop("batches"), "'loader' misses 'batches'"),
    "loader batches is a string": (
        lambda state: state["loader"].__setitem__("batches", "two"),
        "'loader' has batches='two', expected a whole number >= 0",
    ),
    "epoch is a string": (
        lambda state: state.__setitem__("epoch", "seven"),
        "'epoch' is of type int here, but the checkpoint holds a value of type str",
    ),
    # No check finds this one before loading: the generator states are set last, and put back.
    "generator state is broken": (
        lambda state: state["__phalanx__"].__setitem__("rng", [{"python": "broken"}]),
        "loading the random number generator states failed",
    ),
}


@pytest.mark.parametrize("how", list(_DAMAGES))
def test_a_refused_load_leaves_every_parameter_state_counter_and_position_as_it_was(how):
    ctx = _trained_context()
    state = _other_state()
    damage, reason = _DAMAGES[how]
    damage(state)
    before = _everything(ctx)
    with pytest.raises(
        px.CheckpointError, match="the checkpoint does not fit this Context, nothing was loaded"
    ) as info:
        ctx.load_state_dict(state)
    assert reason in str(info.value)
    assert _same(_everything(ctx), before)


def test_the_undamaged_checkpoint_of_the_refusal_tests_loads_and_changes_everything():
    """The control for the refusal tests: without the damage, every part they compare changes."""
    ctx = _trained_context()
    before = _everything(ctx)
    ctx.load_state_dict(_other_state())
    after = _everything(ctx)
    for part in ("model", "loader", "counters"):
        assert not _same(after[part], before[part]), part
    assert (ctx.epoch, ctx.step, ctx.loader.state_dict()) == (7, 70, {"epoch": 2, "batches": 1})


class _FailsHalfway:
    """A stateful object whose load changes part of it, then raises: only a snapshot can undo it."""

    def __init__(self) -> None:
        self.count, self.name = 1, "first"

    def state_dict(self) -> dict:
        return {"count": self.count, "name": self.name}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self.name = state["name"]


def test_an_object_that_fails_halfway_through_its_load_is_put_back_with_everything_before_it():
    model = torch.nn.Linear(2, 2)
    ctx = px.Context(model=model, tracker=_FailsHalfway())
    state = copy.deepcopy(ctx.state_dict())
    with torch.no_grad():
        state["model"]["weight"].add_(1.0)
    state["tracker"] = {"count": 9}  # the name is missing: the load fails after changing count
    weight = model.weight.detach().clone()
    with pytest.raises(px.CheckpointError, match=r"loading 'tracker' failed \(KeyError.*was put back"):
        ctx.load_state_dict(state)
    assert torch.equal(model.weight, weight) and ctx.tracker.count == 1 and ctx.tracker.name == "first"


def test_a_refused_checkpoint_file_names_every_mismatch_and_changes_nothing(tmp_path):
    ctx = _trained_context()
    state = _other_state()
    state["loader"] = None
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2)
    torch.save(state, tmp_path / "ckpt.pt")
    before = _everything(ctx)
    with pytest.raises(px.CheckpointError) as info:
        ctx.load(tmp_path / "ckpt.pt")
    assert "'loader' (ShardedLoader here) needs its state, but the checkpoint holds None" in str(info.value)
    assert "optimizer.state[0]['exp_avg'] has shape (2,), expected (3, 4)" in str(info.value)
    assert _same(_everything(ctx), before)


def test_a_non_strict_load_leaves_objects_the_checkpoint_lacks_as_they_are():
    ctx = _trained_context()
    state = _other_state()
    del state["optimizer"], state["loader"]
    optimizer, loader = copy.deepcopy(ctx.optimizer.state_dict()), ctx.loader.state_dict()
    ctx.load_state_dict(state, strict=False)
    assert ctx.step == 70 and _same(ctx.optimizer.state_dict(), optimizer) and ctx.loader.state_dict() == loader


def test_none_saved_for_an_object_a_checkpoint_cannot_hold_keeps_the_object():
    def loss(x):
        return x.sum()

    ctx = px.Context(loss=loss, step=0)
    ctx.load_state_dict({"loss": None, "step": 3})
    assert ctx.loss is loss and ctx.step == 3
    with pytest.raises(px.CheckpointError, match=r"'loss' \(function here\) is not restored from checkpoints"):
        ctx.load_state_dict({"loss": 1.0, "step": 4})
    assert ctx.loss is loss and ctx.step == 3
