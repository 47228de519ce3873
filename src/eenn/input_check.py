"""What a :class:`~eenn.network.MultiExitNetwork` takes as input, checked before it runs: one
place for ``net(x)`` and the dynamic engine, with errors that say what the network takes."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_input"]


def check_input(net, x: Tensor, where: str, pixels: bool) -> None:
    """Refuse an input the network cannot take, saying what it takes: token ids for a model
    of integer inputs; else floats (or, with ``pixels``, uint8 pixels) of the known per-sample
    shape (``input_spec``'s, or a built-in backbone's), or any shape when neither is known."""
    ids, spec = net.takes_token_ids, net.input_spec
    shape = spec.shape if spec is not None else net._known_shape
    if isinstance(x, Tensor):  # the fast path: a dtype test and a tuple comparison
        if ids:
            if not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool) and (
                    shape is None or x.shape[1:] == shape):
                return
        elif (x.is_floating_point() or (pixels and x.dtype == torch.uint8)) and (
                shape is None or x.shape[1:] == shape):
            if not x.is_floating_point() or x.dtype == net.input_float_dtype:
                return
            want = str(net.input_float_dtype).removeprefix("torch.")
            raise ValueError(f"{where}: expected {want} inputs (the parameters' type), got "
                             f"{str(x.dtype).removeprefix('torch.')}: convert with x.to(torch.{want})")
    dims = f"[B, {', '.join(map(str, shape))}]" if shape is not None else "[B, ...]"
    if ids:
        kind = f"token ids ({net.backbone.input_dtype}), padded or cut to the length the network was traced at"
    elif pixels:
        kind = "float model inputs, or uint8 pixels for net.input_spec to normalise"
    else:
        kind = "float model inputs; uint8 pixels go through net.preprocess(x) first"
    if not isinstance(x, Tensor):
        hint = "; torch.as_tensor(x) makes it one" if hasattr(x, "__array__") else ""
        raise TypeError(f"{where}: expected a tensor {dims} ({kind}), got a {type(x).__name__}{hint}")
    got = f"{str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    raise ValueError(f"{where}: expected inputs {dims} ({kind}), got {got}")

