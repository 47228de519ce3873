"""Reading and running a staged ONNX export (written by :func:`eenn.exporter.export`).

:class:`StagedRunner` loads those graphs (all of them, or only a consecutive range, as one tier
of a split deployment does) and runs them through the exit loop (:func:`eenn.policies.
run_exits`), the same code as the PyTorch engine: after each exit the policy decides, the
samples that fire leave, and only the others go on (batch compaction). The decisions can only
differ from the engine's where ONNX and PyTorch logits differ (about 1e-6 in float32): a sample
whose score lies within that distance of a threshold may exit differently. Cascading heads
(Zero Time Waste) are supported: their segment takes the previous exit's logits as an extra
input. The policy (with AEP weights or a ZTW ensemble as data) is stored in the manifest.

A runner holding the whole model, with a rule that has a fused form (:mod:`eenn.fused`) and the
final-exit fallback, answers a sample or a batch with one onnxruntime call of a fused graph
that runs the same loop, compaction included, inside onnxruntime. Such a runner holds the
weights three times (the segments, the batch-1 graph, the any-batch graph: at batch 1 the latter
is 10% slower than the former, hence both); a tier holding some segments holds them once.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .inference import serial_torch
from .manifest import EXPORT_TOLERANCE, MANIFEST, ExportError, _digest, load_manifest, normalise_pixels, read_segments
from .policies.loop import Answers, Running, degrade, run_exits, start
from .policies.policy import ExitPolicy, as_policy

__all__ = ["ExportError", "load_manifest", "read_segments", "StagedRunner", "Running", "Answers", "EXPORT_TOLERANCE"]

_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
           "int32": np.int32, "bool": np.bool_}


def _session(model: bytes, threads: int, optimized_path: str | None = None, *, spin: bool = True,
             mem_pattern: bool = True):
    """An onnxruntime CPU session. ``spin=False``: its worker threads sleep as soon as a run ends
    instead of spinning for the next one. Between the staged runner's segment calls the exit loop
    runs PyTorch code, which spinning threads starve (on 2 cores, batch 256 through 2-thread
    segment sessions took 0.52 ms per sample spinning, 0.16 not); a graph called back to back
    (the static network, the fused batch-1 graph) gains from spinning. ``mem_pattern=False``
    for a graph whose inner shapes change from call to call (the any-batch fused graph's
    compacted levels): onnxruntime's memory planning then gains nothing, and two such sessions
    run at once on two threads slowed each other by 30% with it, not at all without."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_mem_pattern = mem_pattern
    if optimized_path is not None:  # also write the graph as onnxruntime optimised it for this machine
        opts.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _never_fires(bound) -> bool:
    """Whether a bound per-exit policy lets no sample leave before the final exit whatever its
    scores: every threshold out of reach for the rule's comparison (``>=``/``>`` against
    +inf, ``<``/``<=`` against -inf). Policies with state across exits (patience, cumulative,
    ensembles) are not judged: False."""
    from .policies.rules import canonical

    if bound.policy.name not in ("max_prob", "margin", "gate", "entropy") or bound.thresholds.numel() == 0:
        return False
    rule = {"entropy": "<"}.get(bound.policy.name, ">=")
    _, th, _ = canonical(torch.zeros(1), bound.thresholds.float(), rule)
    return bool(torch.isposinf(th).all())


def _check_graph_input(sess, shape: tuple[int, ...], where: Path) -> None:
    """Refuse a manifest ``input_shape`` that segment 0's graph does not take (else every run
    fails inside onnxruntime)."""
    graph = sess.get_inputs()[0].shape
    fixed = graph[1:]
    if len(fixed) != len(shape) or any(isinstance(g, int) and g != d for g, d in zip(fixed, shape)):
        dims = ", ".join(str(g) if isinstance(g, int) else "batch" for g in graph)
        raise ExportError(f"{MANIFEST} of {where}: `input_shape` {list(shape)} does not match the ONNX graph of "
                          f"segment 0, which takes [{dims}]; re-export the model")


def _caller(sess):
    """``sess``'s run with its output names fixed, ``call(feeds) -> outputs``, without the Python
    wrapper's per-call work: ``InferenceSession.run`` lists the outputs and checks the feeds'
    names on every call, ~1.5 us of a batch-1 call (an Identity graph: 3.9 us through ``run``, 2.4
    through this, on the 2-core EPYC). Feeds built by eenn, always complete, are all it gets; an
    onnxruntime without the binding attribute gets the public ``run``."""
    names = [o.name for o in sess.get_outputs()]
    inner = getattr(sess, "_sess", None)
    if inner is None or not callable(getattr(inner, "run", None)):
        return lambda feeds: sess.run(names, feeds)
    run = inner.run
    return lambda feeds: run(names, feeds, None)


def _static_session(model: bytes, threads: int):
    """The static graph (``static.onnx``: input -> final logits) with the answer of the final
    exit appended (``prediction``, ``probs``), as an onnxruntime session."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load_from_string(model)
    g = m.graph
    logits = g.output[0].name
    g.node.extend([helper.make_node("ArgMax", [logits], ["eenn/prediction"], axis=-1, keepdims=0),
                   helper.make_node("Softmax", [logits], ["eenn/probs"], axis=-1)])
    classes = g.output[0].type.tensor_type.shape.dim[-1]
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("eenn/prediction", TensorProto.INT64, [None]),
                     helper.make_tensor_value_info("eenn/probs", TensorProto.FLOAT, [None, classes.dim_value or None])])
    return _session(m.SerializeToString(), threads)


def _fused_session(segments: dict[int, bytes], manifest: dict[str, Any], rule: str, threads: int):
    """The fused graphs (:mod:`eenn.fused`) built from the segments as onnxruntime optimises them
    on this machine: ``(batch-1 session, any-batch session or None)``. onnxruntime does not apply
    its blocked-layout (NCHWc) convolutions inside ``If`` branches, so a graph fused from the
    exported segments runs every segment after the first about twice as slowly as the same
    segment alone; fused from the already optimised segments it does not. Those are specific to
    this processor, hence built here at load time, not at export. The any-batch graph is left
    out (None, with a warning) where it cannot be built; the runner then loops over the segments."""
    from .fused import fuse_segments

    with tempfile.TemporaryDirectory(prefix="eenn-fused-") as tmp:
        optimised = []
        for k in sorted(segments):
            _session(segments[k], threads, optimized_path=f"{tmp}/segment_{k}.onnx")
            optimised.append(Path(f"{tmp}/segment_{k}.onnx").read_bytes())
    args = (optimised, manifest["segments"], rule, int(manifest["num_classes"]), int(manifest["opset"]))
    one = _session(fuse_segments(*args), threads)
    try:
        batched = _session(fuse_segments(*args, batched=True), threads, mem_pattern=False)
    except Exception as e:  # noqa: BLE001 - the segment loop answers batches instead
        warnings.warn(f"no fused graph for batches ({type(e).__name__}: {e}); batches run segment by segment",
                      RuntimeWarning, stacklevel=3)
        batched = None
    return one, batched


def _non_finite(x: np.ndarray) -> ExportError:
    return ExportError(f"the input holds {int((~np.isfinite(x)).sum())} non-finite values (NaN, infinity, or beyond "
                       f"{x.dtype}'s range), which no exit can answer; send finite numbers")


# ------------------------------------------------------------------------------------ runner
class StagedRunner:
    """Run an exported model with onnxruntime through the exit loop.

    ``StagedRunner(dir)(x)`` runs every segment and returns ``{prediction, exit, depth, probs,
    degraded}`` (NumPy arrays in batch order); ``x``: finite float model inputs, uint8 pixels
    (normalised with the manifest's ``preprocess``, as the server does) or token ids. ``segments=(a, b)`` loads only segments
    ``a..b-1`` (one tier); :meth:`start` and :meth:`advance` then run a batch through them.
    ``policy`` (an :class:`~eenn.policies.ExitPolicy` or a rule name), ``thresholds`` and
    ``fallback`` override the manifest's; ``models`` gives the segments' ONNX bytes by index
    instead of reading them from the export directory.
    """

    def __init__(self, path: str | os.PathLike | dict, *, segments: tuple[int, int] | None = None,
                 threads: int = 1, policy: ExitPolicy | str | None = None, thresholds=None, fallback: str | None = None,
                 models: dict[int, bytes] | None = None) -> None:
        self.manifest = m = path if isinstance(path, dict) else load_manifest(path)
        self.num_exits, self.num_classes = int(m["num_exits"]), int(m["num_classes"])
        self.input_shape = tuple(m["input_shape"])
        self.input_dtype = np.dtype(m.get("input_dtype", "float32"))
        a, b = segments if segments is not None else (0, self.num_exits)
        if not 0 <= a < b <= self.num_exits:
            raise ExportError(f"segments ({a}, {b}) out of range for {self.num_exits} segments")
        self.first, self.stop = a, b
        stored = ExitPolicy.from_dict(m["policy"])
        self.policy = as_policy(stored if policy is None else policy, thresholds, fallback=fallback)
        other = self.policy.name != stored.name
        if isinstance(policy, str) and not other:  # the stored rule by name: its thresholds and options
            self.policy = as_policy(stored, thresholds, fallback=fallback)
        self.has_gates = bool(m["has_gates"])
        try:
            self.bound = self.policy.bind(self.num_exits, has_gates=self.has_gates)
        except ValueError as e:  # the stored thresholds and options (ensemble weights) are for the stored rule only
            why = f" (the export's thresholds are for its {stored.name!r} rule)" if other and thresholds is None else ""
            raise ExportError(f"{e}{why}") from None
        self.sessions: dict[int, Any] = {}
        loaded: dict[int, bytes] = {}
        base = Path(m.get("_dir", "."))
        for seg in m["segments"][a:b]:
            # ``models`` carries the graphs in memory (to a Ray worker on another machine).
            data = models[seg["index"]] if models is not None else (base / seg["file"]).read_bytes()
            if _digest(data) != seg["sha256"]:
                raise ExportError(f"{base / seg['file']} does not match its checksum in the manifest; re-export")
            self.sessions[seg["index"]] = sess = _session(data, threads, spin=False)
            if seg["index"] == 0:
                _check_graph_input(sess, self.input_shape, base)
            loaded[seg["index"]] = data
        self._calls = {k: _caller(sess) for k, sess in self.sessions.items()}
        self.segments = m["segments"]
        # A single sample through the whole model: one call of the fused graph (eenn.fused), when
        # the export has one for this runner's rule.
        self._set_fused(None, None)
        fused = m.get("fused") or {}
        if (fused.get("file") and (a, b) == (0, self.num_exits) and fused.get("rule") == self.policy.name
                and self.policy.fallback == "final"):
            # Built from the segments (also when they came in memory, on a Ray worker); the exported
            # file is the portable fallback and is checked like a segment when it is read.
            try:
                self._set_fused(*_fused_session(loaded, m, self.policy.name, threads))
            except Exception as e:  # noqa: BLE001 - the exported (portable, slower) fused graph instead
                path = base / fused["file"]
                if models is not None or not path.exists():
                    raise ExportError(f"the fused batch-1 graph could not be built ({type(e).__name__}: {e})") from None
                data = path.read_bytes()
                if _digest(data) != fused["sha256"]:
                    raise ExportError(f"{path} does not match its checksum in the manifest; re-export") from None
                warnings.warn(f"the fused batch-1 graph could not be built from the optimised segments "
                              f"({type(e).__name__}: {e}); using the exported one", RuntimeWarning, stacklevel=2)
                self._set_fused(_session(data, threads), None)
            self._fused_th = self.bound.thresholds.numpy() if self.num_exits > 1 else np.zeros(1, np.float32)
        # Served whole under a policy that lets nobody leave early (every threshold out of reach):
        # the static graph answers, without the exits' heads and decisions (a baseline deployment).
        self._threads, self._static_bytes, self._static_sess = threads, None, None
        static = m.get("static") or {}
        if (a, b) == (0, self.num_exits) and static.get("file"):
            self._static_bytes = models.get("static") if models is not None else (
                (base / static["file"]).read_bytes() if (base / static["file"]).exists() else None)
            if self._static_bytes is not None and _digest(self._static_bytes) != static["sha256"]:
                raise ExportError(f"{base / static['file']} does not match its checksum in the manifest; re-export")
        self._use_static()

    def _use_static(self) -> None:
        """Answer through the static graph while the policy cannot fire before the final exit
        (built the first time it is needed); through the exit loop otherwise."""
        self._static_call = None
        if self._static_bytes is None or self.policy.fallback != "final" or not _never_fires(self.bound):
            return
        if self._static_sess is None:
            self._static_sess = _static_session(self._static_bytes, self._threads)
        self._static_call = _caller(self._static_sess)

    def _at_once(self, x: np.ndarray):
        """The whole model's answer to ``x`` in one onnxruntime call, ``(prediction, exit,
        probs)``: the static graph's where the policy cannot fire, else the fused graph's; None
        where neither serves (the segment loop answers)."""
        if not len(x):
            return None
        if self._static_call is not None:
            pred, probs = self._static_call({"input": x})
            return pred, np.full(len(x), self.num_exits - 1, np.int64), probs
        call = self._fused_for(len(x))
        return None if call is None else call({"input": x, "thresholds": self._fused_th})

    def _set_fused(self, one, batched) -> None:
        """The fused graphs' sessions (batch 1, any batch; None: none) and their calls."""
        self.fused, self.fused_batched = one, batched
        self._fused_calls = (None if one is None else _caller(one), None if batched is None else _caller(batched))

    @property
    def thresholds(self):
        return self.bound.thresholds

    def set_policy(self, policy: ExitPolicy | str, thresholds=None, *, fallback: str | None = None) -> None:
        """Serve another policy from now on (new thresholds after a refit, say): checked against
        this model, as at construction. The fused batch-1 graph takes the thresholds as an input,
        so it stays while the rule (and the final-exit fallback) does; for another rule it is
        dropped and single samples run through the segments."""
        policy = as_policy(policy, thresholds, fallback=fallback)
        try:
            bound = policy.bind(self.num_exits, has_gates=self.has_gates)
        except ValueError as e:
            raise ExportError(str(e)) from None
        if self.fused is not None:
            if policy.name != self.policy.name or policy.fallback != "final":
                self._set_fused(None, None)
            else:
                self._fused_th = bound.thresholds.numpy() if self.num_exits > 1 else np.zeros(1, np.float32)
        self.policy, self.bound = policy, bound
        self._use_static()

    def exit_outputs(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every exit's output on a batch ``x``, nobody leaving: ``(logits [E, N, C], gates [E, N]
        or None)``, as :class:`~eenn.outputs.CachedOutputs` holds them (what a shadow run to the
        final exit sees, to compare the early exits' answers with the final one's)."""
        if (self.first, self.stop) != (0, self.num_exits):
            raise ExportError("this runner holds only some segments; exit_outputs needs all of them")
        state: Any = (torch.from_numpy(self._input(x)),)
        prev, logits, gates = None, [], []
        for k in range(self.num_exits):
            state, prev, g = self._segment(k, state, prev)
            logits.append(prev)
            if g is not None:
                gates.append(g.reshape(-1).float())
        return torch.stack(logits), (torch.stack(gates) if self.has_gates else None)

    # -- the whole model ----------------------------------------------------------------
    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if (self.first, self.stop) != (0, self.num_exits):
            raise ExportError("this runner holds only some segments; use start()/advance()")
        x = self._input(x)
        got = self._at_once(x)
        if got is not None:  # one call, nothing around it
            pred, exit_, probs = got
            return {"prediction": pred, "exit": exit_, "depth": exit_.copy(), "probs": probs,
                    "degraded": np.zeros(len(x), bool)}
        answers, rest = self.advance(self.start(x))
        assert rest is None
        with serial_torch():
            return {k: v.numpy() for k, v in answers.ordered(len(x)).items()}

    # -- one tier's share ----------------------------------------------------------------
    def start(self, x: np.ndarray) -> Running:
        """A batch ``[B, *input_shape]`` (as :meth:`__call__` takes it) before segment 0."""
        return start((torch.from_numpy(self._input(x)),))

    def _input(self, x) -> np.ndarray:
        """``x`` as the model input: float inputs as they are (finite only), uint8 pixels
        normalised with the manifest's ``preprocess`` as the server does, token ids in the
        export's ``input_dtype``."""
        floats = self.input_dtype.kind == "f"
        if (type(x) is np.ndarray and x.dtype == self.input_dtype and x.shape[1:] == self.input_shape
                and x.flags.c_contiguous):  # as it comes (a sample at batch 1 costs ~40 us in all)
            if floats and not np.isfinite(x).all():
                raise _non_finite(x)
            return x
        x = np.asarray(x)
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ExportError(f"this model takes inputs of shape [batch, {', '.join(map(str, self.input_shape))}], "
                              f"got {list(x.shape)}; pad or resize the inputs, or re-export for this shape")
        if x.dtype == np.uint8 and floats:
            # the server's own normalisation (InputSpec.normalize), bit for bit what net.preprocess gives
            try:
                return np.ascontiguousarray(normalise_pixels(x, self.manifest), dtype=self.input_dtype)
            except ValueError as e:
                raise ExportError(str(e)) from None
        if floats and x.dtype.kind != "f" or x.dtype == np.uint8:
            took = f"float model inputs{' or uint8 pixels' if self.manifest.get('preprocess') else ''}" if floats \
                else f"{self.input_dtype} token ids (uint8 arrays are read as pixels: x.astype(np.{self.input_dtype}))"
            raise ExportError(f"this model takes {took}, got an array of {x.dtype}")
        with np.errstate(over="ignore"):
            x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if floats and not np.isfinite(x).all():
            raise _non_finite(x)
        return x

    def advance(self, running: Running, stop: int | None = None) -> tuple[Answers, Running | None]:
        """Run ``running`` through this runner's segments (up to ``stop``); return the samples
        that exited on the way and the rest (None when nobody is left)."""
        stop = self.stop if stop is None else min(stop, self.stop)
        if not self.first <= running.next < self.stop:
            raise ExportError(f"this runner holds segments {self.first}..{self.stop - 1}, the features are for "
                              f"segment {running.next}")
        answers = Answers()
        got = None
        if running.next == 0 and stop == self.num_exits:
            x = running.state[0] if isinstance(running.state, tuple) else running.state
            got = self._at_once(x.numpy())
        if got is not None:
            pred, exit_, probs = got
            e = torch.from_numpy(exit_)
            answers.add(running.index, torch.from_numpy(pred), e, e, torch.from_numpy(probs))
            return answers, None
        # The loop's PyTorch code stays on this thread: PyTorch's pool would spin between the
        # segments' onnxruntime calls and take their cores (eenn.inference.serial_torch).
        with serial_torch():
            rest = run_exits(self.bound, running, self._segment, answers, stop=stop, probs=True)
        return answers, rest

    def _fused_for(self, n: int):
        """The call of the fused graph that answers ``n`` samples at once (batch 1: the batch-1
        graph, more: the any-batch one; ``call(feeds) -> [prediction [B], exit [B], probs [B,
        C]]``), or None (the segment loop answers)."""
        return self._fused_calls[n > 1] if n >= 1 else None

    def degrade(self, running: Running) -> Answers:
        """Answer every sample of ``running`` with the deepest exit already computed (when the
        tier that should go on is unreachable); the answers are flagged as degraded."""
        answers = Answers()
        try:
            degrade(running, answers)
        except ValueError as e:
            raise ExportError(str(e)) from None
        return answers

    def _segment(self, k: int, state: tuple, prev):
        seg = self.segments[k]
        feeds = {spec["name"]: s.numpy() for spec, s in zip(seg["inputs"], state)}
        if seg["cascade"]:
            feeds["prev_logits"] = prev.numpy()
        outs = self._calls[k](feeds)
        n_state = seg["num_state_outputs"]
        logits = torch.from_numpy(outs[n_state])
        gate = None
        if self.has_gates:
            gate = torch.from_numpy(outs[n_state + 1]) if k < self.num_exits - 1 else torch.ones(len(logits))
        return tuple(torch.from_numpy(o) for o in outs[:n_state]), logits, gate
