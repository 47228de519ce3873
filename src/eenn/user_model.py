"""A user's model made from its name, ``"module:function"`` or ``"path/to/file.py:function"``:
networks made by :func:`eenn.attach_exits` keep their weights in a checkpoint but not their code,
so loading them (``eenn.load(..., model=...)``, the CLI's ``--model``) builds the model again."""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

__all__ = ["import_model"]


def import_model(spec: str) -> nn.Module:
    """A fresh user model from ``"module:function"`` (or ``"path/to/file.py:function"``): the
    function (or class) is imported and called without arguments. The current folder is searched
    first, as ``python -m`` does. For networks made by :func:`eenn.attach_exits`, whose code is
    not part of a checkpoint."""
    import importlib
    import importlib.util
    import sys

    where, sep, attr = str(spec).rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise ValueError(f"model {spec!r}: expected MODULE:FUNCTION (e.g. mymodels:make_net or models/net.py:Net)")
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise ValueError(f"model {spec!r}: no file {file}")
            unit = importlib.util.spec_from_file_location(f"_eenn_user_model_{file.stem}", file)
            module = importlib.util.module_from_spec(unit)
            unit.loader.exec_module(module)
        else:
            here = os.getcwd()
            added = "" not in sys.path and here not in sys.path
            if added:  # for this import only
                sys.path.insert(0, here)
            try:
                module = importlib.import_module(where)
            finally:
                if added and here in sys.path:
                    sys.path.remove(here)
    except ModuleNotFoundError as e:
        raise ValueError(f"model {spec!r}: cannot import {e.name!r} (searched the current folder and the Python "
                         "path; give a module name or a .py file)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {spec!r}: {where} has no function or class {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model
