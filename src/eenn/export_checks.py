"""How an exported ONNX graph is held to the PyTorch network it came from: every input it is
called with kept in the graph, outputs compared within the export's tolerance (equal infinities
agreeing), and a run at another batch size to catch sizes the ONNX exporter froze."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .manifest import EXPORT_TOLERANCE, ExportError

__all__ = ["check_other_batch", "keep_inputs", "output_gap"]


def keep_inputs(data: bytes, names: list[str], args: tuple) -> bytes:
    """The ONNX graph with every named input, used or not: the exporter drops an input the graph
    does not read (a causal mask that ``is_causal=True`` makes PyTorch ignore, say), while every
    segment is called with all the values carried across its cut."""
    import onnx
    from onnx import helper

    m = onnx.load_from_string(data)
    have = {i.name for i in m.graph.input}
    missing = [(n, a) for n, a in zip(names, args) if n not in have]
    if not missing:
        return data
    for n, a in missing:
        m.graph.input.append(helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(a.numpy().dtype), ["batch", *a.shape[1:]]))
    return m.SerializeToString()


def output_gap(got: np.ndarray, want: Tensor) -> tuple[float, bool]:
    """The largest |ONNX - PyTorch| of one output, and whether it is within the export's
    tolerance (relative to the output's scale; shapes must agree)."""
    if got.shape != tuple(want.shape):
        return float("inf"), False
    if not want.numel():
        return 0.0, True
    a, b = got.astype(np.float64), want.numpy().astype(np.float64)  # masks: bool
    # equal infinities (an additive attention mask's -inf) and NaN against NaN agree; anything
    # against NaN, or an infinity against another value, does not (the gap is then NaN or inf)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):  # inf - inf where they agree: masked out
        diff = float(np.max(np.where(same, 0.0, np.abs(a - b))))
    finite = np.abs(b[np.isfinite(b)])
    return diff, diff <= EXPORT_TOLERANCE * max(1.0, float(finite.max()) if finite.size else 1.0)


def check_other_batch(sess, names_in: list[str], args: tuple, fn, names_out: list[str], batch: int,
                       what: str) -> None:
    """Run an exported graph at a batch size other than the one it was exported at (rows of
    ``args`` repeated or dropped) and compare it with PyTorch (``fn``): a model that reads its
    batch size in a way the ONNX exporter keeps as a constant (``x.view(5, ...)`` after a trace;
    a Hugging Face model before :mod:`eenn.trace_export` rewrites its ATen calls) fails here
    instead of answering wrongly later."""
    other = 2 if batch != 2 else 3
    rows = torch.arange(other) % batch
    args = tuple(a.index_select(0, rows) for a in args)
    with torch.no_grad():
        want = fn(*args)
    want = [want] if isinstance(want, Tensor) else list(want)
    try:
        got = sess.run(None, {n: a.numpy() for n, a in zip(names_in, args)})
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have one type per provider
        got, why = None, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    else:
        bad = [n for n, g_, w_ in zip(names_out, got, want) if not output_gap(g_, w_)[1]]
        why = f"output {bad[0]!r} differs from PyTorch" if bad else None
    if why is not None:
        raise ExportError(
            f"{what}: the ONNX graph exported at batch {batch} does not run at batch {other} ({why}): the model "
            "reads a size from its input in a way the ONNX exporter keeps as a constant. Run this network with "
            "eenn.DynamicEngine, or write that part with public torch functions (x.view(x.size(0), ...))"
        )
