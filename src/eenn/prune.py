"""AEP's pruning step (METHODS.md §3; the whole procedure is an assumption [I]).

On the validation split, the weighted ensemble truncated at each exit k (exits 0..k, weights
renormalised) is scored; the exit k* with the best accuracy is kept (ties go to the smaller k,
the cheaper network) and everything after it is removed with ``net.truncate(k*)``. Inference is
then static: every sample runs to k* and gets the weighted ensemble of exits 0..k*, with no
per-sample threshold. The before/after costs are parameters, MACs per sample and MEASURED
latency (median of timed repeats), reported side by side.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, load, read_description, save
from .data import DataSplits, InputSpec, TensorDataset, TensorLoader
from .network import MultiExitNetwork, exit_position
from .functional import ensemble_so_far

__all__ = ["EnsembleClassifier", "PruneCost", "PruneResult", "aep_prune", "choose_exit", "evaluate_ensemble",
           "load_pruned", "measure_latency", "prune_at", "save_pruned"]


class EnsembleClassifier(nn.Module):
    """Static AEP inference: run ``net`` to its final exit, every exit on the way, and return
    the weighted ensemble's PROBABILITIES ``[B, C]`` (``sum_i w_i p_i / sum_i w_i``; take their
    log for a log-likelihood). ``weights`` has one entry per exit of ``net`` and is stored as
    given (a buffer); the normalisation happens in :func:`ensemble_so_far`."""

    def __init__(self, net: MultiExitNetwork, weights: Tensor | Sequence[float]) -> None:
        super().__init__()
        w = torch.as_tensor(weights, dtype=torch.float32).detach().clone()
        if w.shape != (net.num_exits,):
            raise ValueError(f"need one weight per exit ({net.num_exits}), got shape {tuple(w.shape)}")
        if bool((w < 0).any()) or not bool((w > 0).any()):
            raise ValueError(f"ensemble weights must be >= 0 and not all zero, got {w.tolist()}")
        self.net = net
        self.register_buffer("weights", w.to(_device_of(net)))

    def forward(self, x: Tensor) -> Tensor:
        return ensemble_so_far(self.net(x).logits, self.weights, check=False)[-1]


def prune_at(net: MultiExitNetwork, weights: Tensor | Sequence[float], k: int) -> EnsembleClassifier:
    """The ensemble of exits ``0..k`` on ``net.truncate(k)`` (stages and exits after ``k`` are
    gone; parameters are shared with ``net``)."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    k = exit_position(k, net.num_exits, "prune_at: k")
    return EnsembleClassifier(net.truncate(k), w[: k + 1])


def choose_exit(correct: Sequence[float] | Tensor) -> int:
    """k* = the first index of the best score: ties go to the smaller k, the cheaper network.
    Pass counts of correct samples to compare exactly."""
    scores = torch.as_tensor(correct, dtype=torch.float64)
    return int((scores == scores.max()).nonzero()[0, 0])


@dataclass(frozen=True)
class PruneCost:
    """The cost of static ensemble inference on one network."""

    params: int  # every parameter of the network (heads included)
    macs: int  # per sample: the stages to the last exit kept plus every head on the way
    latency_ms: float | None  # median wall time of one batch of static inference (None: not measured)


@dataclass
class PruneResult:
    """What :func:`aep_prune` chose and what it saves."""

    k: int  # the exit kept as the last one (0-based; num_exits - 1 means nothing was pruned)
    exit_name: str
    weights: list[float]  # the ensemble weights of the kept exits, as given
    val_acc: list[float]  # validation accuracy of the ensemble truncated at each exit
    module: EnsembleClassifier  # the pruned, static ensemble
    before: PruneCost
    after: PruneCost
    latency_batch_size: int
    full: EnsembleClassifier | None = field(default=None, repr=False)  # the unpruned ensemble

    @property
    def promised_acc(self) -> float:
        """The validation accuracy of the pruned ensemble: what it promises on new data."""
        return self.val_acc[self.k]

    def ratios(self) -> dict[str, float | None]:
        """after / before, per cost."""
        def r(a, b):
            return None if a is None or b is None else a / b
        return {"params": r(self.after.params, self.before.params), "macs": r(self.after.macs, self.before.macs),
                "latency": r(self.after.latency_ms, self.before.latency_ms)}

    def report(self) -> str:
        """A small text table: per-k validation accuracy, k*, costs before and after."""
        lines = ["exit  val acc (ensemble truncated there)"]
        lines += [f"{i:>4}  {100 * a:6.2f}%{'  <- k*' if i == self.k else ''}" for i, a in enumerate(self.val_acc)]
        lines.append(f"k* = {self.k} ({self.exit_name}); promised (val) accuracy {100 * self.promised_acc:.2f}%")
        rat = self.ratios()
        lat = f"latency (batch {self.latency_batch_size}, ms)"
        rows = [("params", self.before.params, self.after.params, rat["params"]),
                ("MACs / sample", self.before.macs, self.after.macs, rat["macs"]),
                (lat, self.before.latency_ms, self.after.latency_ms, rat["latency"])]
        w = max(len(r[0]) for r in rows)
        lines.append(f"{'':<{w}}  {'before':>12}  {'after':>12}  after/before")
        for name, b, a, q in rows:
            fmt = (lambda v: "-" if v is None else (f"{v:,.3f}" if isinstance(v, float) else f"{v:,}"))
            lines.append(f"{name:<{w}}  {fmt(b):>12}  {fmt(a):>12}  {'-' if q is None else f'{q:.3f}'}")
        return "\n".join(lines)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _correct_per_exit(net: MultiExitNetwork, weights: Tensor, dataset: TensorDataset,
                      batch_size: int, device) -> Tensor:
    """Correct samples of the ensemble truncated at each exit ``[E]`` (one pass over the data)."""
    loader = TensorLoader(dataset, batch_size, input_spec=net.require_input_spec("aep_prune"), device=device)
    w = weights.to(loader.device)
    correct = torch.zeros(net.num_exits, dtype=torch.int64, device=loader.device)
    for x, y in loader:
        correct += (ensemble_so_far(net(x).logits, w).argmax(-1) == y).sum(1)
    return correct.cpu()


@torch.no_grad()
def evaluate_ensemble(module: nn.Module, dataset: TensorDataset, *, batch_size: int = 512,
                      device: str | torch.device | None = None, input_spec: InputSpec | None = None) -> float:
    """Accuracy of ``module`` (anything returning class scores ``[B, C]``) on ``dataset``, in eval
    mode, the pixels normalised by ``input_spec``, by default that of the network ``module`` is
    or holds (``module.net``, as in an :class:`EnsembleClassifier`). With the same ``batch_size``
    as :func:`aep_prune`, the pruned module's accuracy on the validation split equals the
    promised one exactly."""
    if input_spec is None:
        net = module if isinstance(module, MultiExitNetwork) else getattr(module, "net", None)
        if not isinstance(net, MultiExitNetwork):
            raise ValueError(f"evaluate_ensemble: a {type(module).__name__} carries no input description; "
                             "pass input_spec=")
        input_spec = net.require_input_spec("evaluate_ensemble")
    device = torch.device(device) if device is not None else _device_of(module)
    was = module.training
    module.eval()
    correct, n = 0, 0
    for x, y in TensorLoader(dataset, batch_size, input_spec=input_spec, device=device):
        correct += int((module(x).argmax(-1) == y).sum())
        n += y.numel()
    module.train(was)
    return correct / max(n, 1)


def _random_input(module: nn.Module, input_shape: Sequence[int], batch_size: int, device) -> Tensor:
    """A random batch of the kind ``module`` takes: for a network of token ids (or a module
    holding one, as an :class:`EnsembleClassifier` does) ids in range, drawn as the exporter
    draws its check batch (``eenn.exporter._example_input``); else normal floats."""
    net = module if isinstance(module, MultiExitNetwork) else getattr(module, "net", None)
    dtype = getattr(getattr(net, "backbone", None), "input_dtype", None)
    if isinstance(net, MultiExitNetwork) and dtype is not None and not dtype.is_floating_point:
        from .exporter import _example_input

        return _example_input(net, batch_size, torch.Generator().manual_seed(0)).to(device)
    return torch.randn(batch_size, *input_shape, device=device)


def _latency_batch(net: MultiExitNetwork, val: TensorDataset, batch_size: int, device) -> Tensor | None:
    """``batch_size`` samples of ``val`` (repeated when it holds fewer) as the network takes
    them: real inputs of its kind, normalised by its input description (None: no samples)."""
    if len(val) == 0:
        return None
    idx = torch.arange(batch_size) % len(val)
    loader = TensorLoader(val.subset(idx), batch_size, input_spec=net.require_input_spec("aep_prune"), device=device)
    return next(iter(loader))[0]


@torch.inference_mode()
def measure_latency(module: nn.Module, input_shape: Sequence[int], batch_size: int, *,
                    device: str | torch.device | None = None, warmup: int = 3, repeats: int = 10,
                    inputs: Tensor | None = None) -> float:
    """Median wall time in MILLISECONDS of ``module`` on one batch of ``batch_size``
    (``warmup`` untimed calls first; CUDA is synchronised around every timed call): ``inputs``
    when given (a batch of real samples), else a random one of the kind the module takes (token
    ids in range for a network of token ids, see :func:`_random_input`)."""
    device = torch.device(device) if device is not None else _device_of(module)
    was = module.training
    module.eval()
    x = inputs.to(device) if inputs is not None else _random_input(module, input_shape, batch_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        module(x)
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        module(x)
        sync()
        times.append(time.perf_counter() - t0)
    module.train(was)
    return 1e3 * statistics.median(times)


def aep_prune(net: MultiExitNetwork, weights: Tensor | Sequence[float], val: TensorDataset, *,
              batch_size: int = 512, device: str | torch.device | None = None,
              latency_batch_size: int | None = 256, latency_repeats: int = 10) -> PruneResult:
    """Choose k* on ``val`` (see the module docstring), cut ``net`` there and measure the costs.

    ``weights``: the ensemble weights, one per exit (e.g. ``AEP.weights()``), or a fixed scheme's
    name (``"uniform"``, ``"linear"``). The pixels of
    ``val`` are normalised by ``net.input_spec``. ``device``: where the data go; by default the
    network's (the network is not moved). Latency is timed on ``latency_batch_size`` samples of
    ``val`` (repeated when it holds fewer); ``latency_batch_size=None`` skips the measurement."""
    if isinstance(val, DataSplits):
        raise TypeError("aep_prune: val is one split (a TensorDataset), the validation one: pass data.val, not data")
    if not isinstance(val, TensorDataset):
        raise TypeError(f"aep_prune: val must be a TensorDataset (e.g. data.val), got {type(val).__name__}")
    if isinstance(weights, str):  # a fixed scheme, as ExitPolicy("ensemble", weights=...) takes it
        from .functional import SCHEMES, scheme_weights

        if weights not in SCHEMES[:2]:
            raise ValueError(f"aep_prune: weights by name must be a fixed scheme ({' or '.join(SCHEMES[:2])}), got "
                             f"{weights!r}; a learned scheme's weights are the trained objective's (AEP.weights())")
        weights = scheme_weights(weights, net.num_exits)
    w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
    if w.shape != (net.num_exits,):
        raise ValueError(f"aep_prune: need one weight per exit ({net.num_exits}), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"aep_prune: the weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    device = torch.device(device) if device is not None else _device_of(net)
    was = net.training
    net.eval()
    try:
        correct = _correct_per_exit(net, w, val, batch_size, device)
    finally:
        net.train(was)
    k = choose_exit(correct)
    full, pruned = EnsembleClassifier(net, w), prune_at(net, w, k)
    costs = []
    x = _latency_batch(net, val, latency_batch_size, device) if latency_batch_size else None
    for m in (full, pruned):
        lat = None
        if latency_batch_size:
            lat = measure_latency(m, net.input_shape, latency_batch_size, device=device, repeats=latency_repeats,
                                  inputs=x)
        c = m.net.cost()
        costs.append(PruneCost(params=c.total_params, macs=c.dynamic_macs[-1], latency_ms=lat))
    n = max(len(val), 1)
    return PruneResult(k=k, exit_name=net.exit_names[k], weights=w[: k + 1].tolist(),
                       val_acc=[int(c) / n for c in correct], module=pruned, before=costs[0], after=costs[1],
                       latency_batch_size=int(latency_batch_size or 0), full=full)


def save_pruned(result: PruneResult | EnsembleClassifier, path: str | os.PathLike) -> Path:
    """Save a pruned ensemble with :func:`eenn.save`: the truncated network's weights, and the
    ensemble weights (plus k* and the validation accuracies, when given a result) in ``extra``."""
    module = result.module if isinstance(result, PruneResult) else result
    info: dict = {"weights": module.weights.tolist()}
    if isinstance(result, PruneResult):
        info.update(k=result.k, val_acc=result.val_acc, promised_acc=result.promised_acc)
    return save(module.net, path, extra={"aep": info})


def load_pruned(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> EnsembleClassifier:
    """The :class:`EnsembleClassifier` saved by :func:`save_pruned`."""
    info = read_description(path).get("extra", {}).get("aep")
    if not info or "weights" not in info:
        raise CheckpointError(f"{path} holds no AEP ensemble weights; was it written by save_pruned?")
    net = load(path, map_location=map_location)
    return EnsembleClassifier(net, info["weights"])
