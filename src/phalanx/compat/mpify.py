"""mpify's API on phalanx: change `from mpify import ...` to `from phalanx.compat.mpify import ...`.

    from phalanx.compat.mpify import ranch, in_torchddp, import_star    # was: from mpify import ...

    def fn(x):
        import os
        return int(os.environ["LOCAL_RANK"]), x

    ranch(2, fn, "a")          # [(0, 'a'), (1, 'a')]; the caller is rank 0

`ranch` runs on `px.launch`: workers forked from phalanx's clean copy of the interpreter
(never from a caller that holds CUDA or threads), the caller as a rank
(`caller_rank`), every rank's value back, and a failing rank raises `px.WorkerError` (mpify
returned None for it). Inside each rank `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `RANK` and
`WORLD_SIZE` are in `os.environ`, and a torch process group already exists: `TorchDDPCtx`
checks it rather than creating one.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch

import phalanx as px

__all__ = ["TorchDDPCtx", "global_imports", "import_star", "in_torchddp", "ranch"]


# -- imports inside a function ------------------------------------------------------------------


def _caller_globals() -> dict[str, Any]:
    """The global namespace of the code that called our caller (where its names are looked up)."""
    frame = sys._getframe(2)
    return frame.f_globals


def import_star(modules: Iterable[str] | str, ns: dict[str, Any] | None = None) -> None:
    """Do `from <module> import *` for each module, inside a function.

    The names go into `ns`, by default the global namespace of the calling function, so that
    the function sees them (mpify's default was `__main__`, which is the same thing for a
    function defined in a notebook or a script).

    Example::

        def fn():
            import_star(["math"])
            return sqrt(4.0)            # noqa: F821: `sqrt` came from `from math import *`
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    target = ns if ns is not None else _caller_globals()
    for name in names:
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None)
        if public is None:
            public = [attribute for attribute in vars(module) if not attribute.startswith("_")]
        for attribute in public:
            target[attribute] = getattr(module, attribute)


def global_imports(imports: Iterable[str] | str, ns: dict[str, Any] | None = None) -> None:
    """Run import statements (`import x, y as z`, `from a import b`, `from a import *`) into `ns`.

    `imports` is a list of statements or one multi-line string; `ns` defaults to the calling
    function's global namespace. Anything other than import statements is refused.
    """
    source = imports if isinstance(imports, str) else "\n".join(imports)
    target = ns if ns is not None else _caller_globals()
    _run_imports(source, target)


def _run_imports(source: str, namespace: dict[str, Any]) -> None:
    tree = ast.parse("\n".join(line.strip() for line in source.splitlines()))  # indented docstring-style text
    for statement in tree.body:
        if not isinstance(statement, (ast.Import, ast.ImportFrom)):
            raise ValueError(
                f"imports: {ast.unparse(statement)!r} is not an import statement; only `import ...` and "
                "`from ... import ...` lines are run in the ranks."
            )
    exec(compile(tree, "<mpify imports>", "exec"), namespace)


# -- ranch --------------------------------------------------------------------------------------


def _needed_objects(need: str) -> dict[str, Any]:
    """The caller's `__main__` objects named in `need` (space-separated), to recreate in every rank."""
    main = vars(sys.modules["__main__"])
    missing = [name for name in need.split() if name not in main]
    if missing:
        raise px.PhalanxError(
            f"ranch(need={need!r}): {', '.join(missing)} not defined in __main__. `need` names objects of the "
            "notebook or script; define them first, or pass them as arguments."
        )
    return {name: main[name] for name in need.split()}


def _in_rank(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
    ctx: AbstractContextManager | None,
    imports: str,
    needed: dict[str, Any],
    keep: int | None,
) -> Any:
    """One rank of `ranch`: imports and needed objects into the function's globals, `ctx` around the call."""
    namespaces = [vars(sys.modules["__main__"])]
    fn_globals = getattr(fn, "__globals__", None)
    if fn_globals is not None and fn_globals is not namespaces[0]:
        namespaces.append(fn_globals)  # the function looks its names up here
    for namespace in namespaces:
        if imports:
            _run_imports(imports, namespace)
        namespace.update(needed)
    with ctx if ctx is not None else contextlib.nullcontext():
        value = fn(*args, **kwargs)
    return value if keep is None or px.get_rank() == keep else None


def ranch(
    nprocs: int,
    fn: Callable[..., Any],
    *args: Any,
    caller_rank: int | None = 0,
    gather: bool = True,
    ctx: AbstractContextManager | None = None,
    imports: str | None = None,
    need: str = "",
    **kwargs: Any,
) -> Any:
    """Run `fn(*args, **kwargs)` in `nprocs` ranked processes; mpify's "ranked launch".

    `caller_rank=k` makes this process rank k (None: it only waits). `gather=True` returns
    every rank's value by rank; `gather=False` returns the caller's value (None when the
    caller is not a rank). `imports` (multi-line import statements) and `need` (names of
    `__main__` objects, space-separated) are brought into every rank's namespace first;
    `ctx` is entered around the call in every rank.

    The ranks run on CPU with a gloo group unless `ctx` is a `TorchDDPCtx`, whose platform
    is used (GPUs with `use_gpu=True`).
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise px.PlatformError("nprocs", nprocs, "it must be a whole number of at least 1", owner="ranch")
    if isinstance(ctx, TorchDDPCtx):
        platform = ctx.platform(nprocs)
    else:
        platform = px.Platform(device="cpu", n_procs=nprocs, cluster="local")
    if caller_rank is not None and platform.node_rank > 0:
        caller_rank = None  # phalanx's caller takes part on node 0 only; this host's caller waits
    keep = None if gather else caller_rank
    values = px.launch(
        _in_rank,
        fn,
        args,
        kwargs,
        ctx,
        imports or "",
        _needed_objects(need),
        keep,
        platform=platform,
        caller_rank=caller_rank,
    )
    if gather:
        return values
    return None if caller_rank is None else values[caller_rank]


# -- torch DDP ----------------------------------------------------------------------------------


class TorchDDPCtx(AbstractContextManager):
    """mpify's context for a torch DDP group of `world_size` ranks, this host's starting at `base_rank`.

    With `ranch` (or `in_torchddp`) phalanx creates the group before the function runs;
    entering this context checks that the rank is where mpify would put it
    (`RANK = LOCAL_RANK + base_rank`), sets `OMP_NUM_THREADS`, and leaves the group to
    phalanx. `platform(nprocs)` is the `px.Platform` it stands for: cuda and nccl when
    `use_gpu` and a GPU is visible, else cpu and gloo; several hosts when `world_size` is
    more than one host's `nprocs`. `port=None` (the default) lets phalanx take a free port;
    give one for several hosts.
    """

    def __init__(
        self,
        world_size: int | None = None,
        base_rank: int = 0,
        use_gpu: bool = True,
        addr: str = "127.0.0.1",
        port: int | None = None,
        num_threads: int = 1,
        **kwargs: Any,
    ) -> None:
        if world_size is not None and not (isinstance(world_size, int) and world_size > base_rank >= 0):
            raise px.PlatformError(
                "world_size", world_size, f"it must be a whole number above base_rank={base_rank}", owner="TorchDDPCtx"
            )
        self.world_size = world_size
        self.base_rank = base_rank
        self.use_gpu = use_gpu
        self.addr = addr
        self.port = port
        self.num_threads = num_threads
        self.kwargs = kwargs

    def platform(self, nprocs: int) -> px.Platform:
        """The phalanx platform for `nprocs` processes on this host."""
        world_size = self.world_size or nprocs
        if world_size % nprocs or self.base_rank % nprocs or self.base_rank + nprocs > world_size:
            raise px.PlatformError(
                "base_rank",
                self.base_rank,
                f"with {nprocs} processes per host and world_size={world_size}, hosts start at multiples of {nprocs}",
                "Run the same nprocs on every host, with base_rank = host index * nprocs.",
                owner="TorchDDPCtx",
            )
        device = "cuda" if self.use_gpu and torch.cuda.is_available() else "cpu"
        return px.Platform(
            device=device,
            n_procs=nprocs,
            n_nodes=world_size // nprocs,
            node_rank=self.base_rank // nprocs,
            n_cpus=self.num_threads,
            master_addr=self.addr,
            master_port=self.port,
            cluster="local",
        )

    def __enter__(self) -> TorchDDPCtx:
        try:
            local_rank = int(os.environ["LOCAL_RANK"])
            int(os.environ["LOCAL_WORLD_SIZE"])
        except KeyError:
            raise px.PhalanxError(
                "TorchDDPCtx needs LOCAL_RANK and LOCAL_WORLD_SIZE in os.environ: use it as ranch(..., ctx=...) "
                "or through in_torchddp, which set them."
            ) from None
        expected = (local_rank + self.base_rank, self.world_size or px.get_world_size())
        if not torch.distributed.is_initialized() or (px.get_rank(), px.get_world_size()) != expected:
            raise px.PhalanxError(
                f"TorchDDPCtx(world_size={self.world_size}, base_rank={self.base_rank}) expects rank {expected[0]} "
                f"of {expected[1]} in a process group, but this process is rank {px.get_rank()} of "
                f"{px.get_world_size()} (group initialised: {torch.distributed.is_initialized()}). Start the ranks "
                "with ranch(..., ctx=this) or in_torchddp(...), which create the group from this context."
            )
        os.environ["OMP_NUM_THREADS"] = str(self.num_threads)
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None  # the group is phalanx's, destroyed when the rank ends


def in_torchddp(
    nprocs: int,
    fn: Callable[..., Any],
    *args: Any,
    world_size: int | None = None,
    base_rank: int = 0,
    ctx: TorchDDPCtx | None = None,
    use_gpu: bool = True,
    need: str = "",
    imports: str = "",
    **kwargs: Any,
) -> Any:
    """Run `fn(*args, **kwargs)` in a torch DDP group of `nprocs` ranks here; return rank `base_rank`'s value.

    `world_size` (default `nprocs`) larger than `nprocs` spreads the group over several
    hosts: call it on each with its own `base_rank` and the same `ctx` address and port.
    """
    if ctx is None:
        ctx = TorchDDPCtx(world_size=world_size or nprocs, base_rank=base_rank, use_gpu=use_gpu)
    values = ranch(nprocs, fn, *args, caller_rank=0, gather=True, ctx=ctx, need=need, imports=imports, **kwargs)
    return values[ctx.base_rank]
