"""Staged ONNX export and an onnxruntime runner with the dynamic engine's early-exit logic.

:func:`export` writes one ONNX graph per segment (the stages between exit ``k-1`` and exit ``k``
plus exit ``k``'s head) and a ``manifest.json`` describing how they chain: the named tensors
handed from one segment to the next (one for the built-in backbones; several for models cut by
:func:`eenn.attach_exits`, whose state is a tuple), the exit policy and its thresholds, per-segment
MACs, the class count, the input shape and the preprocessing.

:class:`StagedRunner` loads those graphs (all of them, or only a consecutive range, as one tier
of a split deployment does) and runs them with the semantics of
:class:`eenn.engine.DynamicEngine`: after each exit the policy is evaluated on the outputs
computed so far, the samples that fire leave, and only the others go on (batch compaction). The
policy rules themselves are the same torch functions the engine calls, applied to the ONNX
outputs, so the decisions can only differ where ONNX and PyTorch logits differ (about 1e-6 in
float32): a sample whose score lies within that distance of a threshold may exit differently.
Cascading heads (Zero Time Waste) are supported: their segment takes the previous exit's logits
as an extra input. A ZTW ``GeometricEnsemble`` policy option is refused (it is a module, not
data); AEP ensemble ``weights`` are stored in the manifest.

The exporter is PyTorch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``): it
needs no extra package and handles every backbone and head in eenn; every graph has a dynamic
batch dimension. Each exported graph is checked against PyTorch on a random batch before the
manifest is written, and the largest absolute logit difference is recorded there.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ExportError", "export", "load_manifest", "read_segments", "StagedRunner", "Carry", "Answers",
           "EXPORT_TOLERANCE", "calibration_record"]

FORMAT = "eenn.staged_onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXPORT_TOLERANCE = 1e-4  # largest |ONNX logit - PyTorch logit| accepted at export time
_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
           "int32": np.int32, "bool": np.bool_}


class ExportError(ValueError):
    """An export that cannot be made or an exported model that cannot be read; says why."""


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


def _policy_record(net, policy: str, thresholds, fallback: str, options: dict | None) -> dict[str, Any]:
    from .policies.rules import as_thresholds, get_policy
    from .registry import check_options

    if not isinstance(policy, str):
        raise ExportError("export needs a registered policy name (a function cannot go into the manifest)")
    fn = get_policy(policy)
    options = dict(options or {})
    check_options(f"policy {policy!r}", fn, options, skip=("logits", "gates"))
    if fallback not in ("final", "most_confident"):
        raise ExportError(f"fallback must be 'final' or 'most_confident', got {fallback!r}")
    stored: dict[str, Any] = {}
    for key, value in options.items():
        if key == "weights":
            stored[key] = [float(v) for v in torch.as_tensor(value, dtype=torch.float32).reshape(-1)]
        else:
            raise ExportError(
                f"policy option {key!r} cannot be exported: only data (AEP ensemble weights=) goes into the "
                "manifest; a ZTW GeometricEnsemble is a module, so export with another policy")
    if policy in ("gate", "cumulative") and not net.has_gates:
        raise ExportError(f"policy {policy!r} needs gated exit heads; this network has none")
    th = as_thresholds(thresholds, net.num_exits)
    return {"name": policy, "thresholds": [float(t) for t in th], "fallback": fallback, "options": stored}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export(net, out_dir: str | os.PathLike, *, policy: str = "max_prob", thresholds=1.0, fallback: str = "final",
           policy_options: dict | None = None, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None, class_names: Sequence[str] | None = None,
           validation: dict | None = None, opset: int = 17, check_batch: int = 5) -> dict[str, Any]:
    """Write ``net`` (a :class:`~eenn.MultiExitNetwork`) to ``out_dir`` as ``segment_<k>.onnx``
    files plus ``manifest.json``; returns the manifest.

    ``thresholds`` (``[E-1]`` or one value) and ``fallback`` are the policy's, as for
    :class:`~eenn.engine.DynamicEngine`; ``mean``/``std`` (per channel, of pixels scaled to
    [0, 1]) let a server turn images into model inputs; ``validation`` (from
    :func:`calibration_record`) stores the validation exit distribution that split planning uses.
    """
    from . import __version__
    from .backbones.base import head_input

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    net = net.eval()
    E = net.num_exits
    record = _policy_record(net, policy, thresholds, fallback, policy_options)
    cost = net.cost()
    seg_macs = [cost.dynamic_macs[0]] + [b - a for a, b in zip(cost.dynamic_macs[:-1], cost.dynamic_macs[1:])]
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(check_batch, *net.input_shape, generator=gen)
    segments, worst = [], 0.0
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer notes
                torch.onnx.export(module, args, buf, dynamo=False, input_names=names_in, output_names=names_out,
                                  dynamic_axes={n: {0: "batch"} for n in names_in + names_out},
                                  opset_version=opset, do_constant_folding=True)
            data = buf.getvalue()
            fname = f"segment_{k}.onnx"
            (out / fname).write_bytes(data)
            # Check this graph against PyTorch on the same inputs.
            sess = _session(data, 1)
            got = sess.run(None, {n: a.numpy() for n, a in zip(names_in, args)})
            want = [*state_out, logits] + ([gate] if gate is not None and not final else [])
            for name, g_, w_ in zip(names_out, got, want):
                diff = float(np.max(np.abs(g_.astype(np.float64) - w_.numpy().astype(np.float64)))) if w_.numel() else 0.0
                if name == "logits":
                    worst = max(worst, diff)
                if not diff <= EXPORT_TOLERANCE * max(1.0, float(w_.abs().max())):
                    raise ExportError(f"segment {k} output {name!r}: ONNX differs from PyTorch by {diff:.3g}")
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
        "input_dtype": "float32",
        "exit_names": list(net.exit_names),
        "has_gates": bool(net.has_gates),
        "policy": record,
        "preprocess": ({"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
                       if mean is not None and std is not None else None),
        "class_names": list(class_names) if class_names is not None else None,
        "validation": validation,
        "dynamic_macs": [int(m) for m in cost.dynamic_macs],
        "check": {"batch": check_batch, "max_abs_logit_diff": worst, "tolerance": EXPORT_TOLERANCE},
        "segments": segments,
    }
    from .report import write_json

    tmp = out / (MANIFEST + ".tmp")
    write_json(manifest, tmp)  # strict JSON: infinite thresholds as "inf" / "-inf"
    os.replace(tmp, out / MANIFEST)
    return manifest


def _spec(name: str, t: Tensor) -> dict[str, Any]:
    return {"name": name, "shape": [None, *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}


def calibration_record(net, val_dataset, policy: str, goal, *, mean=None, std=None, fallback: str = "final",
                       **policy_options) -> dict[str, Any]:
    """Calibrate ``policy`` on a validation split and describe the result as the JSON that
    ``eenn export --calibration`` reads: thresholds, and the validation exit and depth
    distributions that split planning weighs its latencies with."""
    from .evaluate import collect_outputs
    from .policies import calibrate, decide

    cache = collect_outputs(net, val_dataset, mean=mean, std=std)
    th = calibrate(policy, cache, net.cost(), goal, fallback=fallback, **policy_options)
    d = decide(policy, cache, th, fallback=fallback, **policy_options)
    E = net.num_exits
    return {
        "policy": policy,
        "thresholds": [float(t) for t in th],
        "fallback": fallback,
        "goal": dict(goal) if isinstance(goal, dict) else {k: v for k, v in vars(goal).items() if v is not None},
        "validation": {
            "samples": int(len(cache.targets)),
            "accuracy": float((d.prediction == cache.targets).float().mean()),
            "exit_distribution": (torch.bincount(d.exit, minlength=E).float() / len(d.exit)).tolist(),
            "depth_distribution": (torch.bincount(d.depth, minlength=E).float() / len(d.depth)).tolist(),
        },
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
    }


# ------------------------------------------------------------------------------------ manifest
def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an exported model (``path``: its directory or ``manifest.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.exists():
        raise ExportError(f"no exported model at {p.parent} (missing {MANIFEST}); run `eenn export` first")
    from .report import read_json

    try:
        m = read_json(p)
    except json.JSONDecodeError as e:
        raise ExportError(f"{p} is not valid JSON ({e})") from None
    if m.get("format") != FORMAT:
        raise ExportError(f"{p}: not an eenn staged export (format {m.get('format')!r})")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportError(f"{p} was written by a newer eenn ({m.get('eenn_version')}); upgrade eenn to read it")
    m["_dir"] = str(p.parent)
    return m


def read_segments(manifest: dict[str, Any], segments: tuple[int, int]) -> dict[int, bytes]:
    """The ONNX bytes of segments ``a..b-1`` of an exported model, by index."""
    base = Path(manifest["_dir"])
    return {s["index"]: (base / s["file"]).read_bytes() for s in manifest["segments"][segments[0]:segments[1]]}


def _session(model: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------ runner
@dataclass
class Carry:
    """The samples of a batch still running after segments ``< next_segment``: what one tier
    hands to the next. ``logits`` / ``gates`` hold every exit computed so far (policies such as
    patience and ensembles read earlier exits, so they travel too)."""

    next_segment: int
    index: np.ndarray  # [n] int64: positions in the original batch
    state: list[np.ndarray]  # the tensors the next segment takes (features)
    logits: np.ndarray  # [k, n, C] float32, k = next_segment
    gates: np.ndarray | None  # [k, n] float32, or None for networks without gates
    batch: int  # size of the original batch

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"state_{i}": s for i, s in enumerate(self.state)}
        out["index"], out["logits"] = self.index, self.logits
        if self.gates is not None:
            out["gates"] = self.gates
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], next_segment: int, batch: int) -> "Carry":
        n_state = sum(1 for k in arrays if k.startswith("state_"))
        return cls(next_segment, arrays["index"], [arrays[f"state_{i}"] for i in range(n_state)],
                   arrays["logits"], arrays.get("gates"), batch)


@dataclass
class Answers:
    """The samples answered so far, indexed by their position in the original batch."""

    index: list[np.ndarray] = field(default_factory=list)
    prediction: list[np.ndarray] = field(default_factory=list)
    exit: list[np.ndarray] = field(default_factory=list)
    depth: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    degraded: list[np.ndarray] = field(default_factory=list)

    def add(self, index, prediction, exit_, depth, probs, degraded: bool = False) -> None:
        self.index.append(np.asarray(index, np.int64))
        self.prediction.append(np.asarray(prediction, np.int64))
        self.exit.append(np.asarray(exit_, np.int64))
        self.depth.append(np.asarray(depth, np.int64))
        self.probs.append(np.asarray(probs, np.float32))
        self.degraded.append(np.full(len(self.index[-1]), degraded))

    def extend(self, other: "Answers") -> None:
        for name in ("index", "prediction", "exit", "depth", "probs", "degraded"):
            getattr(self, name).extend(getattr(other, name))

    def ordered(self, batch: int) -> dict[str, np.ndarray]:
        """Every field as one array in batch order; refuses a batch with unanswered samples."""
        idx = np.concatenate(self.index) if self.index else np.zeros(0, np.int64)
        if len(idx) != batch or len(np.unique(idx)) != batch:
            raise RuntimeError(f"{batch - len(np.unique(idx))} of {batch} samples have no answer")
        order = np.argsort(idx, kind="stable")
        return {name: np.concatenate(getattr(self, name))[order]
                for name in ("prediction", "exit", "depth", "probs", "degraded")}


class StagedRunner:
    """Run an exported model with onnxruntime and the dynamic engine's early-exit logic.

    ``StagedRunner(dir)(x)`` runs every segment and returns ``{prediction, exit, depth, probs,
    degraded}`` (NumPy arrays in batch order). ``segments=(a, b)`` loads only segments
    ``a..b-1`` (one tier); :meth:`start` and :meth:`advance` then run a batch through them.
    ``policy`` / ``thresholds`` / ``fallback`` override the manifest's; ``models`` gives the
    segments' ONNX bytes by index instead of reading them from the export directory.
    """

    def __init__(self, path: str | os.PathLike | dict, *, segments: tuple[int, int] | None = None,
                 threads: int = 1, policy: str | None = None, thresholds=None, fallback: str | None = None,
                 models: dict[int, bytes] | None = None) -> None:
        from .policies.rules import as_thresholds, get_policy

        self.manifest = m = path if isinstance(path, dict) else load_manifest(path)
        self.num_exits, self.num_classes = int(m["num_exits"]), int(m["num_classes"])
        self.input_shape = tuple(m["input_shape"])
        a, b = segments if segments is not None else (0, self.num_exits)
        if not 0 <= a < b <= self.num_exits:
            raise ExportError(f"segments ({a}, {b}) out of range for {self.num_exits} segments")
        self.first, self.stop = a, b
        rec = m["policy"]
        self.policy_name = policy or rec["name"]
        self.policy = get_policy(self.policy_name)
        self.options = {}
        if policy is None and rec.get("options", {}).get("weights") is not None:
            self.options["weights"] = torch.tensor(rec["options"]["weights"], dtype=torch.float32)
        self.fallback = fallback or rec["fallback"]
        self.thresholds = as_thresholds(rec["thresholds"] if thresholds is None else thresholds, self.num_exits)
        self.has_gates = bool(m["has_gates"])
        self.sessions: dict[int, Any] = {}
        base = Path(m.get("_dir", "."))
        for seg in m["segments"][a:b]:
            # ``models`` carries the graphs in memory (to a Ray worker on another machine).
            data = models[seg["index"]] if models is not None else (base / seg["file"]).read_bytes()
            if _digest(data) != seg["sha256"]:
                raise ExportError(f"{base / seg['file']} does not match its checksum in the manifest; re-export")
            self.sessions[seg["index"]] = _session(data, threads)
        self.segments = m["segments"]

    # -- the whole model ----------------------------------------------------------------
    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if (self.first, self.stop) != (0, self.num_exits):
            raise ExportError("this runner holds only some segments; use start()/advance()")
        answers, carry = self.advance(self.start(x))
        assert carry is None
        return answers.ordered(len(x))

    # -- one tier's share ----------------------------------------------------------------
    def start(self, x: np.ndarray) -> Carry:
        """A batch of model inputs ``[B, *input_shape]`` (float) as a carry before segment 0."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        B = x.shape[0]
        return Carry(0, np.arange(B, dtype=np.int64), [x], np.zeros((0, B, self.num_classes), np.float32),
                     np.zeros((0, B), np.float32) if self.has_gates else None, B)

    def advance(self, carry: Carry, stop: int | None = None) -> tuple[Answers, Carry | None]:
        """Run ``carry`` through this runner's segments (up to ``stop``); return the samples that
        exited on the way and the carry of the rest (None when nobody is left)."""
        stop = self.stop if stop is None else min(stop, self.stop)
        if carry.next_segment != self.first:
            raise ExportError(f"this runner starts at segment {self.first}, the features are for "
                              f"segment {carry.next_segment}")
        answers = Answers()
        E = self.num_exits
        th = self.thresholds
        from .policies.rules import canonical

        for k in range(carry.next_segment, stop):
            seg = self.segments[k]
            feeds = {spec["name"]: arr for spec, arr in zip(seg["inputs"], carry.state)}
            if seg["cascade"]:
                feeds["prev_logits"] = carry.logits[-1]
            outs = self.sessions[k].run(None, feeds)
            n_state = seg["num_state_outputs"]
            state, lg = outs[:n_state], outs[n_state]
            logits = np.concatenate([carry.logits, lg[None].astype(np.float32)], 0)
            gates = carry.gates
            if gates is not None:
                g = outs[n_state + 1] if k < E - 1 else np.ones(lg.shape[0], np.float32)
                gates = np.concatenate([gates, g[None].astype(np.float32)], 0)
            carry = Carry(k + 1, carry.index, state, logits, gates, carry.batch)
            s = self._scores(carry)
            if k == E - 1:
                if self.fallback == "final":
                    best = torch.full((len(carry.index),), E - 1, dtype=torch.long)
                else:  # SDN: the most confident exit among all (the earliest on ties)
                    sc, _, _ = canonical(s.score, th.new_zeros(E - 1), s.rule)
                    best = sc.argmax(0)
                self._answer(answers, carry, s, best, np.ones(len(best), bool), E - 1)
                return answers, None
            sc, t, strict = canonical(s.score[k], th[k], s.rule)
            fire = (sc > t if strict else sc >= t).numpy()
            if fire.any():
                self._answer(answers, carry, s, torch.full((int(fire.sum()),), k, dtype=torch.long), fire, k)
                keep = ~fire
                carry = Carry(k + 1, carry.index[keep], [a[keep] for a in carry.state], carry.logits[:, keep],
                              carry.gates[:, keep] if carry.gates is not None else None, carry.batch)
                if not keep.any():
                    return answers, None
        return answers, carry

    def degrade(self, carry: Carry) -> Answers:
        """Answer every sample of ``carry`` with the deepest exit already computed (when the
        tier that should go on is unreachable); the answers are flagged as degraded."""
        answers = Answers()
        k = carry.next_segment - 1
        if k < 0:
            raise ExportError("no exit has been computed for these samples yet; nothing to degrade to")
        s = self._scores(carry)
        self._answer(answers, carry, s, torch.full((len(carry.index),), k, dtype=torch.long),
                     np.ones(len(carry.index), bool), k, degraded=True)
        return answers

    # -- internals -----------------------------------------------------------------------
    def _scores(self, carry: Carry):
        """The policy on the exits computed so far, padded to all exits exactly as the engine
        pads them (zero logits, unit gates): every rule is causal, so exit k's score is final."""
        E, k = self.num_exits, carry.logits.shape[0]
        n = carry.logits.shape[1]
        logits = torch.zeros(E, n, self.num_classes)
        logits[:k] = torch.from_numpy(carry.logits)
        gates = None
        if carry.gates is not None:
            gates = torch.ones(E, n)
            gates[:k] = torch.from_numpy(carry.gates)
        self._padded = logits
        return self.policy(logits, gates, **self.options)

    def _answer(self, answers: Answers, carry: Carry, s, exit_: Tensor, mask: np.ndarray, depth: int,
                degraded: bool = False) -> None:
        m = torch.from_numpy(np.asarray(mask))
        pred = s.prediction[:, m].gather(0, exit_[None]).squeeze(0)
        if "weights" in self.options:  # the answer of an ensemble policy is the ensemble's
            from .objectives.aep import ensemble_so_far

            probs_all = ensemble_so_far(self._padded[:, m], self.options["weights"], check=False)
        else:
            probs_all = torch.softmax(self._padded[:, m], dim=-1)
        probs = probs_all.gather(0, exit_[None, :, None].expand(1, -1, self.num_classes)).squeeze(0)
        answers.add(carry.index[mask], pred.numpy(), exit_.numpy(), np.full(len(exit_), depth), probs.numpy(),
                    degraded)
