"""How a checkpoint holds what is not a flat set of distinct tensors: weights that share memory
(tied or reused) kept once with their other names as aliases, and a nested training state
(optimiser, scheduler, RNG states) as JSON with its tensors moved out beside the weights, under
:data:`STATE_PREFIX`. :mod:`eenn.checkpoint` writes and reads both."""
from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["STATE_PREFIX", "dedupe", "flatten_state", "unflatten_state"]

STATE_PREFIX = "_state/"  # tensors of the training state (optimiser, RNG); not part of the network


def dedupe(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied or reused weights): keep one name
    per storage view and record the others as aliases."""
    seen: dict[tuple, str] = {}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for k, t in state.items():
        sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and sig in seen:
            aliases[k] = seen[sig]
        else:
            seen[sig] = k
            tensors[k] = t.detach().contiguous().cpu()
    return tensors, aliases


def flatten_state(obj: Any, tensors: dict[str, Tensor], path: str) -> Any:
    """Turn a nested state (optimiser, scheduler, RNG states) into JSON, moving its tensors into
    ``tensors``; tuples and non-string dict keys are tagged so that :func:`unflatten_state` restores
    them exactly."""
    if isinstance(obj, Tensor):
        key = STATE_PREFIX + path
        tensors[key] = obj.detach().contiguous().cpu().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten_state(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[flatten_state(k, tensors, f"{path}/k{i}"), flatten_state(v, tensors, f"{path}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays and scalars (numpy's RNG state)
        return {"__array__": obj.tolist(), "dtype": str(obj.dtype)}
    raise TypeError(f"cannot store training state entry {path!r} of type {type(obj).__name__}")


def unflatten_state(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__items__"]}
    if "__array__" in obj:
        import numpy as np

        return np.asarray(obj["__array__"], dtype=obj["dtype"])
    return {k: unflatten_state(v, tensors) for k, v in obj.items()}
