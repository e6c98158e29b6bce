"""File names and source lines for the code a call carries by value, so rank tracebacks can be read.

cloudpickle sends a function defined in `__main__`, on stdin or in a notebook cell by value:
its code object, without the source. Recent cloudpickle (3.1.3; its pull request #560) also
replaces the code's file name with "<dynamic-code>" (`_code_reduce` in
cloudpickle/cloudpickle.py, to make payloads deterministic), so a rank's traceback read
`File "<dynamic-code>", line 14` and no line. `CallPickler` keeps each code object's file
name (a notebook cell's as IPython names it, "Cell In[3]") and notes it; `sources_for`
then picks the lines that a rank cannot read from a file of its own, and `install` puts
them into the rank's `linecache`, where `traceback` (and `inspect.getsource`) look for them.
"""

from __future__ import annotations

import linecache
import pickle
import sys
import types
from collections import ChainMap
from functools import partial
from typing import IO, Any

import cloudpickle

__all__ = ["CallPickler", "install", "sources_for"]

_reduce_code_by_value = cloudpickle.CloudPickler.dispatch_table[types.CodeType]


def _code_in_file(constructor: Any, args: tuple, filename: str) -> types.CodeType:
    """In the rank: the code object cloudpickle rebuilt, under the file name it had in the caller."""
    return constructor(*args).replace(co_filename=filename)


def _reduce_code(file_names: dict[str, str], code: types.CodeType) -> tuple:
    filename = code.co_filename
    shown = file_names.get(filename)
    if shown is None:
        shown = file_names[filename] = _shown_name(filename)
    return _code_in_file, (*_reduce_code_by_value(code), shown)


def _shown_name(filename: str) -> str:
    """The name a traceback should give `filename`: a notebook cell's as IPython's own tracebacks do."""
    ipython = sys.modules.get("IPython")  # never imported here: only a caller inside IPython has cells
    shell = ipython.get_ipython() if ipython is not None else None
    format_code_name = getattr(getattr(shell, "compile", None), "format_code_name", None)  # IPython >= 8
    label = format_code_name(filename) if format_code_name is not None else None
    return " ".join(label) if label else filename  # ("Cell", "In[3]") -> "Cell In[3]"


class CallPickler(cloudpickle.CloudPickler):
    """cloudpickle's pickler, except that code sent by value keeps its file name.

    `file_names` maps the file of every code object sent by value to the name the rank will
    see; `sources_for(pickler.file_names)` gives the lines to send with it.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self.file_names: dict[str, str] = {}
        # The C pickler reads `dispatch_table` once, in __init__. A partial, not a bound
        # method: no cycle through the pickler, which is freed as soon as the dump is done.
        self.dispatch_table = ChainMap(
            {types.CodeType: partial(_reduce_code, self.file_names)}, cloudpickle.CloudPickler.dispatch_table
        )
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)


def sources_for(file_names: dict[str, str]) -> dict[str, list[str]]:
    """The source lines a rank cannot read itself, by the name its tracebacks will use.

    Those are the files whose lines exist only in the caller's memory (IPython's cells, and
    any code whose lines were put into `linecache` with no file behind them) and the
    `__main__` script: a rank on another machine may not see it, and it is the file most
    often edited while a job runs. A module's file is left out: the rank imports the same
    modules from the same paths and reads it. Stdin and `-c` code have no lines anywhere;
    their tracebacks keep `<stdin>` and the line number, as Python's own do.
    """
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    sources = {}
    for filename, shown in file_names.items():
        entry = linecache.cache.get(filename)
        if entry is not None and len(entry) == 4 and entry[1] is None:  # lines held in memory only
            lines = entry[2]
        elif filename == main_file:
            lines = linecache.getlines(filename)
        else:
            continue
        if lines:
            sources[shown] = lines
    return sources


def install(sources: dict[str, list[str]]) -> None:
    """In the rank: make `linecache` (and so `traceback`) find the lines the caller sent.

    An entry whose modification time is None is never dropped by `linecache.checkcache`:
    the lines stay those of the code that runs, even if the script on disk changes.
    """
    for name, lines in sources.items():
        linecache.cache[name] = (sum(map(len, lines)), None, lines, name)
