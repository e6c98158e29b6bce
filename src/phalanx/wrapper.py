"""DDPW's front door: `Wrapper(platform).start(task, ...)` and the `@wrapper(platform)` decorator.

DDPW calls its tasks in two ways. DDPW 5.3 calls `task(global_rank, local_rank, group, args)`;
DDPW 5.4 and 5.5 call `task(*args, **kwargs, global_rank=..., local_rank=..., group=...,
platform=...)`. phalanx does either, chosen from the task's parameters by `calling_convention`,
with the launch, the failure reports and the clean-up of `phalanx.launch` underneath.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch.distributed as dist

from phalanx.dist import get_local_rank, get_rank
from phalanx.errors import PhalanxError
from phalanx.launch import launch
from phalanx.platform import Platform

__all__ = ["RANK_KEYWORDS", "Wrapper", "calling_convention", "wrapper"]

Convention = Literal["positional", "keywords"]

RANK_KEYWORDS = ("global_rank", "local_rank", "group", "platform")
"""The keywords DDPW 5.5 adds to every call (5.4: all but `platform`)."""

# Where DDPW 5.3 puts the ranks and the group: a parameter with one of these names anywhere
# else can only be meant as a keyword.
_POSITIONAL_PLACES = {"global_rank": 0, "local_rank": 1, "group": 2}
_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_BY_POSITION = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

_CONVENTIONS = (
    "DDPW 5.3 calls task(global_rank, local_rank, group, args), a task with four positional parameters; "
    "DDPW 5.4 and 5.5 call task(*args, **kwargs, global_rank=..., local_rank=..., group=..., platform=...), "
    "a task that takes **kwargs or parameters named global_rank, local_rank or group"
)


def calling_convention(task: Callable[..., Any]) -> Convention | None:
    """How DDPW would call `task`, read from its parameters: "keywords", "positional" or None.

    The first rule that holds decides:

    1. "keywords" (DDPW 5.4, 5.5) when the task takes `**kwargs`, or takes `global_rank`,
       `local_rank` or `group` by keyword anywhere but where 5.3 puts them (the first, second
       and third positional parameter): keyword-only, or later in the list.
    2. "positional" (DDPW 5.3) when the task can take four positional arguments.
    3. "keywords" when it takes `global_rank`, `local_rank` or `group` by keyword.
    4. None: neither; `Wrapper.start` refuses such a task, naming both conventions.

    A callable whose parameters cannot be read (some built-ins) counts as "positional".

    Example::

        calling_convention(lambda global_rank, local_rank, group, args: ...)  # "positional"
        calling_convention(lambda *args, **kwargs: ...)                       # "keywords"
        calling_convention(lambda data, *, global_rank: ...)                  # "keywords"
        calling_convention(lambda data: ...)                                  # None
    """
    try:
        signature = inspect.signature(task)
    except (TypeError, ValueError):
        return "positional"
    parameters = list(signature.parameters.values())
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return "keywords"
    by_position = [parameter.name for parameter in parameters if parameter.kind in _BY_POSITION]
    rank_names = [p for p in parameters if p.name in _POSITIONAL_PLACES and p.kind in _BY_KEYWORD]
    for parameter in rank_names:
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            return "keywords"
        if by_position.index(parameter.name) != _POSITIONAL_PLACES[parameter.name]:
            return "keywords"
    if _binds(signature, (None,) * 4, {}):
        return "positional"
    return "keywords" if rank_names else None


def _binds(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> bool:
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def _name(task: Callable[..., Any]) -> str:
    return getattr(task, "__qualname__", None) or repr(task)


def _positional_args(task: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """The one `args` value that DDPW 5.3's `start(task, args=None)` passes on."""
    if not kwargs and len(args) <= 1:
        return args[0] if args else None
    if not args and set(kwargs) == {"args"}:
        return kwargs["args"]
    given = ", ".join([*(repr(a) for a in args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    raise PhalanxError(
        f"start({_name(task)}, {given}): {_name(task)} takes DDPW 5.3's (global_rank, local_rank, group, args), "
        "which gets one value, args. Pass one tuple: start(task, (a, b)); or let the task take its "
        "arguments the DDPW 5.4/5.5 way: def task(*args, **kwargs), with the ranks in kwargs['global_rank'] ..."
    )


def _rank_keywords(task: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The rank keywords to add to this keyword-convention call: each one the task can take.

    Checked here, in the caller, so that a call that cannot bind fails before any rank starts.
    """
    clashing = [name for name in RANK_KEYWORDS if name in kwargs]
    if clashing:
        raise PhalanxError(
            f"{_name(task)}: {clashing[0]}= is what the wrapper gives the task on every rank; "
            f"pass your value under another name."
        )
    signature = inspect.signature(task)
    parameters = signature.parameters
    takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError as error:
        raise _unbindable(task, signature, error) from None
    keywords = tuple(
        name
        for name in RANK_KEYWORDS
        if name not in bound and (takes_any or (name in parameters and parameters[name].kind in _BY_KEYWORD))
    )
    try:
        signature.bind(*args, **kwargs, **dict.fromkeys(keywords))
    except TypeError as error:
        raise _unbindable(task, signature, error) from None
    return keywords


def _unbindable(task: Callable[..., Any], signature: inspect.Signature, error: TypeError) -> PhalanxError:
    return PhalanxError(
        f"{_name(task)}{signature} cannot take these arguments with the ranks as keywords ({error}). "
        "The arguments reach the task as given, as in DDPW 5.5: start(task, a, b) calls task(a, b, global_rank=..., "
        "...). DDPW 5.4 spread a tuple, start(task, (a, b)); write start(task, a, b) instead."
    )


def _group(make_group: Callable[[], Any] | None) -> Any:
    return dist.group.WORLD if make_group is None else make_group()


def _rank_values(keywords: tuple[str, ...], task_platform: Any, make_group: Callable[[], Any] | None) -> dict:
    values = {"global_rank": get_rank, "local_rank": get_local_rank, "platform": lambda: task_platform}
    return {name: _group(make_group) if name == "group" else values[name]() for name in keywords}


def _call_positional(task: Callable[..., Any], args: Any, make_group: Callable[[], Any] | None) -> Any:
    return task(get_rank(), get_local_rank(), _group(make_group), args)


def _call_with_keywords(
    task: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
    keywords: tuple[str, ...],
    task_platform: Any,
    make_group: Callable[[], Any] | None,
) -> Any:
    return task(*args, **kwargs, **_rank_values(keywords, task_platform, make_group))


def _call_undecorated(
    decorated: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
    keywords: tuple[str, ...],
    task_platform: Any,
    make_group: Callable[[], Any] | None,
) -> Any:
    return _call_with_keywords(decorated.__wrapped__, args, kwargs, keywords, task_platform, make_group)


class Wrapper:
    """Runs DDPW-style tasks on a platform, called the way DDPW 5.3, 5.4 or 5.5 calls them.

    `task_platform` is what a task gets as `platform=` (default: `platform`); `make_group`,
    called on every rank before the task, gives the task's `group` (default: the world group).
    Both are there for front doors such as `phalanx.compat.ddpw`, which hand on their own
    platform object and process groups.

    Example::

        def task(global_rank, local_rank, process_group, args):        # DDPW 5.3
            print(f"rank {global_rank} of {process_group.size()}: {args}")

        def run(*args, **kwargs):                                       # DDPW 5.4, 5.5
            print(f"rank {kwargs['global_rank']}: {args}")

        Wrapper(Platform(device="cpu", n_procs=2)).start(task, ("example",))
        Wrapper(Platform(device="cpu", n_procs=2)).start(run, "example")
    """

    def __init__(
        self,
        platform: Platform | None = None,
        *,
        task_platform: Any = None,
        make_group: Callable[[], Any] | None = None,
    ) -> None:
        self.platform = platform or Platform()
        self.task_platform = self.platform if task_platform is None else task_platform
        self.make_group = make_group

    def start(self, task: Callable[..., Any], /, *args: Any, **kwargs: Any) -> list[Any]:
        """Run `task` on every rank; return the values by global rank.

        A "positional" task (see `calling_convention`) is called as DDPW 5.3 does,
        `task(global_rank, local_rank, group, args)`, with `start(task, args=None)`. A
        "keywords" task is called as DDPW 5.5 does, `task(*args, **kwargs, global_rank=...,
        local_rank=..., group=..., platform=...)`, with each of the four keywords it can take.
        Any other task raises `PhalanxError`, naming both conventions, before a rank starts.
        """
        convention = calling_convention(task)
        if convention == "positional":
            value = _positional_args(task, args, kwargs)
            return launch(_call_positional, task, value, self.make_group, platform=self.platform)
        if convention == "keywords":
            keywords = _rank_keywords(task, args, kwargs)
            return launch(
                _call_with_keywords,
                task,
                args,
                kwargs,
                keywords,
                self.task_platform,
                self.make_group,
                platform=self.platform,
            )
        raise PhalanxError(
            f"{_name(task)}{inspect.signature(task)} matches neither of DDPW's calling conventions: {_CONVENTIONS}. "
            "Give the task one of these shapes."
        )


def wrapper(
    platform: Platform | None = None,
    *,
    task_platform: Any = None,
    make_group: Callable[[], Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., list[Any]]]:
    """Decorator: calling the decorated function runs it on every rank of `platform`.

    Each rank gets the call's own arguments. A function that takes DDPW 5.4/5.5's keywords
    (`calling_convention(fn) == "keywords"`: it takes `**kwargs`, or parameters named
    `global_rank`, `local_rank`, `group`) also gets each of `global_rank`, `local_rank`, `group`
    and `platform` that it can take; any other function gets only its own arguments, as in
    DDPW 5.3. `task_platform` and `make_group` are those of `Wrapper`.

    Example::

        @wrapper(Platform(device="cpu", n_procs=2))
        def run(a, b):
            return a + b

        run(1, 2)  # [3, 3]

        @wrapper(Platform(device="cpu", n_procs=2))
        def ranked(a, **kwargs):
            return a + kwargs["global_rank"]

        ranked(1)  # [1, 2]
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., list[Any]]:
        takes_ranks = calling_convention(fn) == "keywords"

        @functools.wraps(fn)
        def launched(*args: Any, **kwargs: Any) -> list[Any]:
            keywords = _rank_keywords(fn, args, kwargs) if takes_ranks else ()
            chosen = platform or Platform()
            handed_on = chosen if task_platform is None else task_platform
            # `launched` itself travels: a module-level `fn` is pickled by name, and that
            # name now means `launched`, so each rank unwraps it instead of launching again.
            return launch(_call_undecorated, launched, args, kwargs, keywords, handed_on, make_group, platform=chosen)

        return launched

    return decorate
