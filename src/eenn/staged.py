"""Reading and running a staged ONNX export (written by :func:`eenn.export.export`).

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
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["ExportError", "load_manifest", "read_segments", "StagedRunner", "Carry", "Answers", "EXPORT_TOLERANCE"]

FORMAT = "eenn.staged_onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXPORT_TOLERANCE = 1e-4  # largest |ONNX logit - PyTorch logit| accepted at export time
_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
           "int32": np.int32, "bool": np.bool_}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ExportError(ValueError):
    """An export that cannot be made or an exported model that cannot be read; says why."""


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
