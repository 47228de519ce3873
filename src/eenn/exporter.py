"""Staged ONNX export and an onnxruntime runner with the dynamic engine's early-exit logic.

:func:`export` writes one ONNX graph per segment (the stages between exit ``k-1`` and exit ``k``
plus exit ``k``'s head) and a ``manifest.json`` describing how they chain: the named tensors
handed from one segment to the next (one for the built-in backbones; several for models cut by
:func:`eenn.attach_exits`, whose state is a tuple), the exit policy and its thresholds, per-segment
MACs, the class count, the input shape and the preprocessing.

Reading and running an export (:class:`StagedRunner`, :func:`load_manifest`) lives in
:mod:`eenn.staged`; the names are re-exported here.

The exporter is PyTorch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``): it
needs no extra package and handles every backbone and head in eenn; every graph has a dynamic
batch dimension. Each exported graph is checked against PyTorch on a random batch before the
manifest is written, and the largest absolute logit difference is recorded there.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .export_checks import check_other_batch, output_gap, keep_inputs
from .outputs import collect_outputs
from .io import write_json
from .policies import ExitPolicy, as_policy, calibrate, decide
from .fused import FUSED_RULES, fuse_segments
from .manifest import (EXPORT_TOLERANCE, FORMAT, FORMAT_VERSION, MANIFEST, ExportError, _digest, load_manifest,
                       read_segments)
from .staged import StagedRunner, _session

__all__ = ["ExportError", "export", "load_manifest", "read_segments", "StagedRunner", "EXPORT_TOLERANCE",
           "calibration_record"]


# ------------------------------------------------------------------------------------ export
class _Segment(nn.Module):
    """Segment ``k`` as a module with flat tensor inputs and outputs, as ONNX needs them:
    inputs ``state_in_0 ..`` (or ``input`` for the first) [+ ``prev_logits``], outputs
    ``state_out_0 ..`` (not for the final segment), ``logits`` [+ ``gate``, not for the final]."""

    def __init__(self, net, k: int, n_in: int, cascade: bool) -> None:
        super().__init__()
        self.net, self.k, self.n_in, self.cascade = net, k, n_in, cascade
        self.final = k == net.num_exits - 1

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        prev = inputs[-1] if self.cascade else None
        state_in = inputs[: self.n_in]
        state = state_in[0] if self.n_in == 1 else tuple(state_in)  # the built-in backbones carry one tensor
        state, logits, gate = self.net.forward_segment(self.k, state, prev)
        if self.final:
            return (logits,)
        outs = list(state) if isinstance(state, tuple) else [state]
        # A value carried through unchanged would make a graph output that is also an input;
        # the identity keeps every output a node of its own.
        outs = [o.clone() if any(o is i for i in inputs) else o for o in outs]
        outs.append(logits)
        if gate is not None:
            outs.append(gate)
        return tuple(outs)


@contextlib.contextmanager
def _no_fastpath():
    """nn.MultiheadAttention and nn.TransformerEncoderLayer off their fused inference kernels,
    which have no ONNX form, while a graph is exported (the same arithmetic, decomposed)."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _example_input(net, batch: int, gen: torch.Generator) -> Tensor:
    """A random batch to check the graphs on: normal floats, or, for a network that takes
    integers (token ids), ids the network takes: drawn below the largest embedding table's size
    that runs (the vocabulary, as a rule), else the next; not below every table's, which a
    one-row table (RoBERTa's token types) would make all padding."""
    dtype = getattr(net.backbone, "input_dtype", None)
    if dtype is None or dtype.is_floating_point:
        return torch.randn(batch, *net.input_shape, generator=gen, dtype=dtype or torch.float32)
    sizes = sorted({m.num_embeddings for m in net.modules() if isinstance(m, nn.Embedding)}, reverse=True) or [2]
    for high in sizes:
        ids = torch.randint(0, high, (batch, *net.input_shape), generator=gen, dtype=dtype)
        try:
            with torch.no_grad():
                net(ids)
            return ids
        except (IndexError, RuntimeError):  # an id out of some table's range: a smaller bound
            continue
    return ids


MIN_OPSET = 13


def _max_opset() -> int:
    """The newest opset this PyTorch's exporter writes (23 where it does not say)."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return 23


def _policy_record(net, policy: ExitPolicy) -> dict[str, Any]:
    try:
        bound = policy.bind(net.num_exits, has_gates=net.has_gates)
        return policy.replace(thresholds=bound.thresholds).to_dict()  # one threshold per exit, spelled out
    except ValueError as e:
        raise ExportError(f"cannot export this policy: {e}") from None


def export(net, out_dir: str | os.PathLike, *, policy: ExitPolicy | str = "max_prob", thresholds=None,
           fallback: str | None = None, policy_options: dict | None = None, validation: dict | None = None, opset: int = 17, check_batch: int = 5) -> dict[str, Any]:
    """Write ``net`` (a :class:`~eenn.MultiExitNetwork`) to ``out_dir`` as ``segment_<k>.onnx``
    files plus ``manifest.json``; returns the manifest.

    ``policy``: an :class:`~eenn.policies.ExitPolicy` (e.g. from
    :func:`~eenn.policies.calibrate`; AEP weights and a ZTW ensemble are stored as data), or a
    rule name with ``thresholds`` (``[E-1]`` or one value), ``fallback`` and ``policy_options``; the network's ``input_spec`` (its mean/std, per channel,
    of pixels scaled to [0, 1], and class names) is written as the manifest's ``preprocess`` and
    ``class_names``, which let a server turn images into model inputs (None when the network has
    no input description: such an export takes float model inputs only); ``validation`` (from
    :func:`calibration_record`) stores the validation exit distribution that split planning uses.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    top = _max_opset()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset {opset!r}: the exported graphs need ONNX opset {MIN_OPSET} or later (the exit "
                          f"rule's comparisons), and this PyTorch writes up to {top}; the default is 17")
    spec = net.input_spec
    names = spec.class_names if spec is not None else None
    if names is not None and len(names) != net.num_classes:  # the manifest's loader would refuse them
        raise ExportError(f"net.input_spec names {len(names)} classes, the network has {net.num_classes}: give "
                          "every class a name, or set net.input_spec = dataclasses.replace(net.input_spec, "
                          "class_names=None)")
    record = _policy_record(net, as_policy(policy, thresholds, fallback=fallback, **dict(policy_options or {})))
    modes = {m: m.training for m in net.modules()}
    try:  # in eval mode while exporting, then as the caller had it (a check in the middle of training)
        return _write(net.eval(), out, record, validation, opset, check_batch)
    finally:
        for m, training in modes.items():
            m.training = training


def _write(net, out: Path, record: dict[str, Any], validation: dict | None, opset: int,
           check_batch: int) -> dict[str, Any]:
    from . import __version__
    from .backbones.base import head_input

    spec, E = net.input_spec, net.num_exits
    cost = net.cost()
    seg_macs = [cost.dynamic_macs[0]] + [b - a for a, b in zip(cost.dynamic_macs[:-1], cost.dynamic_macs[1:])]
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = _example_input(net, check_batch, gen)
    segments, seg_bytes, worst = [], [], 0.0
    state: Any = x
    prev: Tensor | None = None
    in_names = ["input"]
    with torch.no_grad():
        for k in range(E):
            cascade = k < len(net.heads) and net.heads[k].cascades
            n_in = 1 if k == 0 else len(in_names)
            state_in = (state,) if isinstance(state, Tensor) else tuple(state)
            args = state_in + ((prev,) if cascade else ())
            names_in = list(in_names) + (["prev_logits"] if cascade else [])
            new_state, logits, gate = net.forward_segment(k, state, prev if cascade else None)
            final = k == E - 1
            if final:
                names_out = ["logits"]
                state_out: tuple = ()
            else:
                state_out = (new_state,) if isinstance(new_state, Tensor) else tuple(new_state)
                names_out = [f"state_out_{i}" for i in range(len(state_out))] + ["logits"]
                if gate is not None:
                    names_out.append("gate")
            module = _Segment(net, k, n_in, cascade).eval()
            buf = io.BytesIO()
            with warnings.catch_warnings(), _no_fastpath():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer notes
                torch.onnx.export(module, args, buf, dynamo=False, input_names=names_in, output_names=names_out,
                                  dynamic_axes={n: {0: "batch"} for n in names_in + names_out},
                                  opset_version=opset, do_constant_folding=True)
            data = keep_inputs(buf.getvalue(), names_in, args)
            seg_bytes.append(data)
            fname = f"segment_{k}.onnx"
            (out / fname).write_bytes(data)
            # Check this graph against PyTorch on the same inputs.
            sess = _session(data, 1)
            got = sess.run(None, {n: a.numpy() for n, a in zip(names_in, args)})
            want = [*state_out, logits] + ([gate] if gate is not None and not final else [])
            for name, g_, w_ in zip(names_out, got, want):
                diff, close = output_gap(g_, w_)
                if name == "logits":
                    worst = max(worst, diff)
                if not close:
                    raise ExportError(f"segment {k} output {name!r}: ONNX differs from PyTorch by {diff:.3g}")
            check_other_batch(sess, names_in, args, lambda *a, m=module: m(*a), names_out, check_batch,
                               f"segment {k}")
            tensors_in = [*state_in] + ([prev] if cascade else [])
            segments.append({
                "index": k,
                "exit_name": net.exit_names[k],
                "file": fname,
                "sha256": _digest(data),
                "inputs": [_spec(n, t) for n, t in zip(names_in, tensors_in)],
                "outputs": [_spec(n, t) for n, t in zip(names_out, want)],
                "num_state_outputs": len(state_out),
                "cascade": cascade,
                "macs": int(seg_macs[k]),
                "cumulative_macs": int(cost.dynamic_macs[k]),
                "handoff_bytes_per_sample": int(sum(t[0].numel() * t.element_size() for t in state_out)),
                "head_input_shape": list(head_input(new_state).shape[1:]) if not final else None,
            })
            state, prev = new_state, logits
            in_names = [f"state_in_{i}" for i in range(len(state_out))]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "eenn_version": __version__,
        "torch_version": torch.__version__,
        "exporter": "torch.onnx.export(dynamo=False), TorchScript-based",
        "opset": opset,
        "num_exits": E,
        "num_classes": net.num_classes,
        "input_shape": list(net.input_shape),
        "input_dtype": str(x.dtype).removeprefix("torch."),
        "exit_names": list(net.exit_names),
        "has_gates": bool(net.has_gates),
        "policy": record,
        "preprocess": ({"mean": list(spec.mean), "std": list(spec.std)} if spec is not None and spec.kind == "pixels"
                       else None),  # token ids and float features are model inputs as they are
        "class_names": list(spec.class_names) if spec is not None and spec.class_names is not None else None,
        "validation": validation,
        "dynamic_macs": [int(m) for m in cost.dynamic_macs],
        "check": {"batch": check_batch, "max_abs_logit_diff": worst, "tolerance": EXPORT_TOLERANCE},
        "segments": segments,
    }
    manifest["static"] = _export_static(net, out, x, opset)
    manifest["fused"] = _export_fused(manifest, seg_bytes, out, x, opset)
    tmp = out / (MANIFEST + ".tmp")
    write_json(manifest, tmp)  # strict JSON: infinite thresholds as "inf" / "-inf"
    os.replace(tmp, out / MANIFEST)
    _remove_stale(out, manifest)
    return manifest


def _remove_stale(out: Path, manifest: dict[str, Any]) -> None:
    """Remove the graphs an earlier export into ``out`` left that this manifest does not name
    (a deeper network's last segments, a fused graph this policy has none of), so that the folder
    holds one export only. Other files are left alone."""
    named = {s["file"] for s in manifest["segments"]} | {manifest["static"]["file"], manifest["fused"]["file"]}
    for f in [*out.glob("segment_*.onnx"), out / "fused_batch1.onnx"]:
        if f.name not in named and re.fullmatch(r"segment_\d+\.onnx|fused_batch1\.onnx", f.name) and f.is_file():
            f.unlink()


def _export_static(net, out: Path, x: Tensor, opset: int) -> dict[str, Any]:
    """The static network as one graph (``static.onnx``): the baseline an early exit must beat,
    and what serving the network whole runs."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), _no_fastpath():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.backbone.eval(), (x,), buf, dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True)
        want = net.backbone(x)
    data = buf.getvalue()
    sess = _session(data, 1)
    diff, close = output_gap(sess.run(None, {"input": x.numpy()})[0], want)
    if not close:
        raise ExportError(f"the static graph: ONNX differs from PyTorch by {diff:.3g}")
    with _no_fastpath():
        check_other_batch(sess, ["input"], (x,), net.backbone.eval(), ["logits"], len(x), "the static graph")
    (out / "static.onnx").write_bytes(data)
    return {"file": "static.onnx", "sha256": _digest(data), "max_abs_logit_diff": diff}


def _export_fused(manifest: dict, seg_bytes: list[bytes], out: Path, x: Tensor, opset: int) -> dict[str, Any]:
    """The batch-1 graph with the exit decisions inside (:mod:`eenn.fused`), when the policy's
    rule has that form; checked against the staged runner sample by sample, with the policy's
    thresholds and with thresholds that send everyone out at the first exit and nobody."""
    policy = ExitPolicy.from_dict(manifest["policy"])
    if manifest["num_exits"] == 1:
        return {"file": None, "reason": "no early exit: the static graph is the whole network"}
    if policy.name not in FUSED_RULES or policy.fallback != "final":
        return {"file": None, "reason": f"policy {policy.name!r} with fallback {policy.fallback!r} has no fused form "
                                        f"(fused: {', '.join(FUSED_RULES)} with the final fallback)"}
    data = fuse_segments(seg_bytes, manifest["segments"], policy.name, manifest["num_classes"], opset)
    (out / "fused_batch1.onnx").write_bytes(data)
    sess = _session(data, 1)
    low = policy.name == "entropy"  # the rule that fires below its threshold
    E = manifest["num_exits"]
    for th in (policy.thresholds.expand(E - 1) if policy.thresholds.dim() == 0 else policy.thresholds,
               torch.full((E - 1,), math.inf if low else -math.inf), torch.full((E - 1,), -math.inf if low else math.inf)):
        runner = StagedRunner({**manifest, "_dir": str(out), "fused": None}, thresholds=th)
        for i in range(len(x)):
            want = runner(x[i:i + 1].numpy())
            pred, exit_, probs = sess.run(None, {"input": x[i:i + 1].numpy(), "thresholds": th.numpy()})
            if (pred[0], exit_[0]) != (want["prediction"][0], want["exit"][0]) or \
                    not np.allclose(probs, want["probs"], atol=EXPORT_TOLERANCE):
                (out / "fused_batch1.onnx").unlink()
                reason = (f"the fused graph answered sample {i} with exit {exit_[0]}, class {pred[0]}, the staged "
                          f"runner with exit {want['exit'][0]}, class {want['prediction'][0]}")
                warnings.warn(f"no fused batch-1 graph: {reason}", RuntimeWarning, stacklevel=3)
                return {"file": None, "reason": reason}
    return {"file": "fused_batch1.onnx", "sha256": _digest(data), "rule": policy.name}


def _spec(name: str, t: Tensor) -> dict[str, Any]:
    return {"name": name, "shape": [None, *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}


def calibration_record(net, val_dataset, policy: ExitPolicy | str, goal, *, fallback: str | None = None,
                       **policy_options) -> dict[str, Any]:
    """Calibrate ``policy`` on a validation split and describe the result as the JSON that
    ``eenn export --calibration`` and ``eenn predict`` read: the fitted policy, the goal, and the
    validation exit and depth distributions that split planning weighs its latencies with, and
    ``weights_sha256``, the weights it was fitted on (:func:`eenn.checkpoint.weights_digest`: the
    ``sha256`` of their checkpoint saved without training state), so that a record for other
    weights is refused."""
    from .checkpoint import weights_digest

    fitted_on = weights_digest(net)
    cache = collect_outputs(net, val_dataset)  # normalised by net.input_spec
    fitted = calibrate(policy, cache, net.cost(), goal, fallback=fallback, **policy_options)
    d = decide(fitted, cache)
    E = net.num_exits
    return {
        "policy": fitted.to_dict(),
        "goal": dict(goal) if isinstance(goal, dict) else {k: v for k, v in vars(goal).items() if v is not None},
        "validation": {
            "samples": int(len(cache.targets)),
            "accuracy": float((d.prediction == cache.targets).float().mean()),
            "exit_distribution": (torch.bincount(d.exit, minlength=E).float() / len(d.exit)).tolist(),
            "depth_distribution": (torch.bincount(d.depth, minlength=E).float() / len(d.depth)).tolist(),
        },
        "weights_sha256": fitted_on,
    }
