"""Holding the accuracy of a served early-exit model while its traffic drifts (after Apparate).

The thresholds of an exported model were calibrated on a validation split; when the inputs
change (noisier images, another camera), the early exits may start answering differently from
the final exit far more often than the calibration allowed. :class:`AgreementMonitor` watches
for that on live traffic:

- a share of the served samples (``shadow_fraction``, chosen by a seeded generator) is queued
  and run, by a background thread with its own :class:`~eenn.staged.StagedRunner`, through
  every segment to the final exit, nobody leaving, keeping every exit's output;
- the last ``window`` such samples form a cache (:class:`~eenn.outputs.CachedOutputs`) whose
  targets are the final exit's answers: on it, each exit's agreement with the final exit, and
  the *served* agreement, what the current policy answers (:func:`eenn.policies.decide`);
- every ``check_every`` shadow samples (once the window holds ``min_samples``, at most once per
  ``min_interval_s``), if the served agreement is below the goal ``1 - max_drop`` by more than
  ``tolerance``, or above it by more than ``tolerance`` while a refit would save computation,
  the thresholds are refitted on the window (:func:`eenn.calibrate` with ``max_drop``: the final
  exit is right on every window sample by definition, so the goal is the agreement) and given
  to the live runners (``apply``). Every change is logged (time, thresholds before and after,
  the window agreement before and after, the reason) and :meth:`AgreementMonitor.revert` undoes
  the last one.

``tolerance`` (default ``"auto"``): two binomial standard errors of an agreement of ``goal``
measured on the samples in the window, ``2 * sqrt(goal * (1 - goal) / n)`` (0.0088 for a goal
of 0.99 on 512 samples), so that the sampling noise of the window alone rarely triggers a refit.

The agreement is that of the served answers with the final exit's, not accuracy: no labels
arrive with live traffic. Where the final exit is wrong, agreeing with it costs nothing more.
"""
from __future__ import annotations

import collections
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..io import encode_inf
from ..outputs import CachedOutputs
from ..policies import ExitPolicy, calibrate, decide, policy_scores
from .monitor_config import MonitorConfig, cost_table_from_manifest, thresholds_of

__all__ = ["AgreementMonitor", "MonitorConfig"]


class AgreementMonitor:
    """Shadow a share of served samples to the final exit and keep the served agreement with the
    final exit at ``1 - max_drop`` by refitting the thresholds on a sliding window.

    ``model``: an export directory or its manifest (dict). ``apply(policy)`` is called (from the
    monitor's thread) with every new policy, to give it to the live runners (e.g. their
    :meth:`~eenn.staged.StagedRunner.set_policy`). ``policy``: the policy served now (default:
    the manifest's). The settings are :class:`MonitorConfig`'s, as keywords or ``config=``.

    ``observe(x)`` after serving a batch ``x``; :meth:`drain` waits until the queued shadow
    samples are all processed; :meth:`stats` is what ``GET /health`` shows; :meth:`revert`
    undoes the last change; :meth:`close` stops the thread."""

    def __init__(self, model: str | Path | Mapping[str, Any], *, config: MonitorConfig | Mapping | None = None,
                 apply: Callable[[ExitPolicy], None] | None = None, policy: ExitPolicy | None = None,
                 threads: int = 1, start: bool = True, models: Mapping[int, bytes] | None = None,
                 **settings: Any) -> None:
        from ..staged import StagedRunner, load_manifest

        base = config.to_dict() if isinstance(config, MonitorConfig) else dict(config or {})
        cfg = MonitorConfig.from_dict({**base, **settings})
        self.config = cfg
        self.manifest = m = dict(model) if isinstance(model, Mapping) else load_manifest(model)
        self.num_exits, self.num_classes = int(m["num_exits"]), int(m["num_classes"])
        if self.num_exits < 2:
            raise ValueError("a model with one exit has no early exit to monitor")
        self.window = cfg.window
        self.min_samples = cfg.min_samples if cfg.min_samples is not None else cfg.window
        self.check_every = cfg.check_every if cfg.check_every is not None else max(1, cfg.window // 4)
        self.max_pending = cfg.max_pending if cfg.max_pending is not None else 4 * cfg.window
        self.goal = 1.0 - cfg.max_drop
        self.cost = cost_table_from_manifest(m)
        self._macs = torch.tensor(self.cost.dynamic_macs, dtype=torch.float64)
        self._policy = policy if policy is not None else ExitPolicy.from_dict(m["policy"])
        self._policy.bind(self.num_exits, has_gates=bool(m["has_gates"]))  # a clear error now, not in the thread
        # its own runner over every segment (no fused graph: it runs segment by segment to the end)
        # (``models``: the segments' ONNX bytes by index, where the export directory is not at hand)
        self.runner = StagedRunner({**m, "fused": None}, threads=threads, policy=self._policy, models=models)
        self.apply = apply
        self._rng = np.random.default_rng(cfg.seed)
        E, W, C = self.num_exits, self.window, self.num_classes
        self._logits = torch.zeros(E, W, C)
        self._gates = torch.zeros(E, W) if m["has_gates"] else None
        self._pos = self._fill = 0
        self._lock = threading.Lock()  # the window, the counters, the policy, the log
        self._cond = threading.Condition(threading.Lock())  # the queue
        self._queue: collections.deque[np.ndarray] = collections.deque()
        self._pending = 0  # samples queued or being processed
        self._busy = False
        self._stop = False
        self.requests = self.observed = self.shadowed = self.processed = self.dropped = 0
        self.checks = self.calibrations = self.changes_total = 0
        self._since_check = 0
        self._last_change_t = -math.inf
        self._log: collections.deque[dict] = collections.deque(maxlen=cfg.history)
        self._previous: collections.deque[ExitPolicy] = collections.deque(maxlen=cfg.history)
        self.errors: collections.deque[str] = collections.deque(maxlen=20)
        self._stats_key: tuple | None = None
        self._stats: dict[str, Any] | None = None
        self._version = self._policy_version = 0  # bumped by every window / policy change
        self._refitting = threading.RLock()  # one check, refit or revert at a time
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # -- the live side ----------------------------------------------------------------------
    @property
    def policy(self) -> ExitPolicy:
        """The policy served now."""
        return self._policy

    def observe(self, x: np.ndarray) -> int:
        """A batch ``x [B, *input_shape]`` was served: queue the chosen share of it for the shadow
        run (never blocks; beyond ``max_pending`` queued samples the rest is dropped and counted).
        Returns how many samples were queued."""
        x = np.asarray(x)
        with self._lock:
            pick = self._rng.random(len(x)) < self.config.shadow_fraction
            self.requests += 1
            self.observed += len(x)
        n = int(pick.sum())
        if n == 0:
            return 0
        with self._cond:
            room = max(self.max_pending - self._pending, 0)
            take = min(n, room)
            if take:
                chosen = np.flatnonzero(pick)[:take]
                self._queue.append(np.ascontiguousarray(x[chosen], dtype=np.float32))
                self._pending += take
                self._cond.notify_all()
        with self._lock:
            self.shadowed += take
            self.dropped += n - take
        return take

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued shadow sample has been processed (and any refit it caused is
        applied); False if ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: (self._pending == 0 and not self._busy) or self._stop, timeout)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, daemon=True, name="eenn-agreement-monitor")
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the background thread (queued samples are dropped)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the background thread ----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop)
                if self._stop:
                    return
                batch = []
                while self._queue and sum(len(b) for b in batch) < 256:
                    batch.append(self._queue.popleft())
                self._busy = True
            n = sum(len(b) for b in batch)
            try:
                self.process(np.concatenate(batch))
            except Exception as e:  # noqa: BLE001 - the monitor must never take the server down
                with self._lock:
                    self.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._pending -= n
                    self._busy = False
                    self._cond.notify_all()

    def process(self, x: np.ndarray) -> None:
        """Run shadow samples to the final exit and add them to the window, checking the served
        agreement every ``check_every`` samples (the background thread calls this; it is public
        for a monitor run without one, ``start=False``)."""
        logits, gates = self.runner.exit_outputs(x)
        at = 0
        while at < len(x):
            take = min(len(x) - at, self.check_every - self._since_check)
            with self._lock:
                self._add(logits[:, at:at + take], None if gates is None else gates[:, at:at + take])
                self.processed += take
            at += take
            self._since_check += take
            if self._since_check >= self.check_every:
                self._since_check = 0
                self.check()

    def _add(self, logits: torch.Tensor, gates: torch.Tensor | None) -> None:
        n, W = logits.shape[1], self.window
        if n >= W:
            logits, gates = logits[:, -W:], None if gates is None else gates[:, -W:]
            n = W
        idx = (self._pos + torch.arange(n)) % W
        self._logits[:, idx] = logits.float()
        if self._gates is not None and gates is not None:
            self._gates[:, idx] = gates.float()
        self._pos = (self._pos + n) % W
        self._fill = min(self._fill + n, W)
        self._version += 1

    # -- the window ----------------------------------------------------------------------------
    def window_cache(self) -> CachedOutputs:
        """The window, oldest sample first: every exit's outputs, targets = the final exit's answers."""
        with self._lock:
            return self._window_cache()

    def _window_cache(self) -> CachedOutputs:
        W, n = self.window, self._fill
        order = torch.arange(n) if n < W else (self._pos + torch.arange(W)) % W
        logits = self._logits[:, order].clone()
        gates = None if self._gates is None else self._gates[:, order].clone()
        if not n:
            return CachedOutputs(logits, gates, torch.zeros(0, dtype=torch.long))
        target = policy_scores(self._policy, logits, gates=gates).prediction[-1]
        return CachedOutputs(logits, gates, target)

    def _evaluate(self, policy: ExitPolicy, cache: CachedOutputs) -> dict[str, Any]:
        """The served agreement, its expected MACs (share of the full model's) and exit shares of
        ``policy`` on ``cache``."""
        d = decide(policy, cache)
        n = len(cache.targets)
        return {"agreement": float((d.prediction == cache.targets).double().mean()),
                "macs_fraction": float(self._macs[d.depth].mean() / self._macs[-1]),
                "exit_distribution": (torch.bincount(d.exit, minlength=self.num_exits).double() / n).tolist()}

    def tolerance(self, n: int | None = None) -> float:
        """How far the served agreement may stray from the goal before a refit (see the module docstring)."""
        if self.config.tolerance != "auto":
            return float(self.config.tolerance)
        n = self._fill if n is None else n
        return 2.0 * math.sqrt(self.goal * (1.0 - self.goal) / max(n, 1))

    # -- refits --------------------------------------------------------------------------------
    def check(self, now: float | None = None) -> dict[str, Any] | None:
        """Compare the served agreement on the window with the goal; refit when it is out of the
        band (and allowed: enough samples, not too soon after the last change, ``refit`` on).
        Returns the logged change, or None."""
        now = time.time() if now is None else now
        with self._refitting:
            return self._check(now)

    def _check(self, now: float) -> dict[str, Any] | None:
        with self._lock:
            self.checks += 1
            n = self._fill
            if n < self.min_samples or not self.config.refit or now - self._last_change_t < self.config.min_interval_s:
                return None
            cache, policy = self._window_cache(), self._policy
        before = self._evaluate(policy, cache)
        tol = self.tolerance(n)
        a = before["agreement"]
        if a < self.goal - tol:
            reason = (f"served agreement {a:.4f} below the goal {self.goal:.4f} (tolerance {tol:.4f}) on the last "
                      f"{n} shadow samples")
            cheaper_only = False
        elif a > self.goal + tol:
            reason = (f"served agreement {a:.4f} above the goal {self.goal:.4f} (tolerance {tol:.4f}) on the last "
                      f"{n} shadow samples: computation left unsaved")
            cheaper_only = True
        else:
            return None
        return self.refit(reason, cache=cache, before=before, cheaper_only=cheaper_only, now=now)

    def refit(self, reason: str = "refit requested", *, cache: CachedOutputs | None = None,
              before: dict[str, Any] | None = None, cheaper_only: bool = False,
              now: float | None = None) -> dict[str, Any] | None:
        """Refit the thresholds on the window for the goal now and serve them (logged with
        ``reason``). Returns the change, or None when the thresholds stay as they are (or, with
        ``cheaper_only``, when the refit would not save computation)."""
        with self._refitting:
            return self._refit(reason, cache, before, cheaper_only, now)

    def _refit(self, reason, cache, before, cheaper_only, now) -> dict[str, Any] | None:
        with self._lock:
            if cache is None:
                if self._fill < self.min_samples:
                    raise ValueError(f"the window holds {self._fill} samples, a refit needs at least "
                                     f"{self.min_samples}")
                cache = self._window_cache()
            policy = self._policy
        before = before or self._evaluate(policy, cache)
        new = calibrate(policy, cache, self.cost, {"max_drop": self.config.max_drop})
        after = self._evaluate(new, cache)
        with self._lock:
            self.calibrations += 1
        E = self.num_exits
        if thresholds_of(new, E) == thresholds_of(policy, E) or (cheaper_only and
                                                                after["macs_fraction"] >= before["macs_fraction"]):
            return None
        return self._change(policy, new, before, after, reason, "refit", now)

    def revert(self) -> dict[str, Any]:
        """Serve the thresholds before the last change again (logged as a change of its own;
        it counts as a change for ``min_interval_s``). Successive calls walk further back."""
        with self._refitting:
            with self._lock:
                if not self._previous:
                    raise ValueError("no threshold change to revert")
                old, cur = self._previous.pop(), self._policy
                cache = self._window_cache() if self._fill else None
            before = self._evaluate(cur, cache) if cache is not None else None
            after = self._evaluate(old, cache) if cache is not None else None
            return self._change(cur, old, before, after, "revert() of the last change", "revert", None, push=False)

    def _change(self, old: ExitPolicy, new: ExitPolicy, before, after, reason: str, kind: str, now: float | None,
                *, push: bool = True) -> dict[str, Any]:
        now = time.time() if now is None else now
        if self.apply is not None:
            self.apply(new)  # the live runners first: the log tells what is served
        entry = {"time": now, "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)), "kind": kind,
                 "reason": reason, "old_thresholds": thresholds_of(old, self.num_exits),
                 "new_thresholds": thresholds_of(new, self.num_exits),
                 "agreement_before": None if before is None else before["agreement"],
                 "agreement_after": None if after is None else after["agreement"],
                 "macs_fraction_before": None if before is None else before["macs_fraction"],
                 "macs_fraction_after": None if after is None else after["macs_fraction"]}
        with self._lock:
            entry["window_samples"], entry["shadow_samples"] = self._fill, self.processed
            if push:
                self._previous.append(old)
            self._policy = new
            self._policy_version += 1
            self._last_change_t = now
            self.changes_total += 1
            self._log.append(entry)
        return entry

    @property
    def changes(self) -> list[dict[str, Any]]:
        """The logged changes, oldest first (the last ``history``)."""
        with self._lock:
            return list(self._log)

    # -- reporting -----------------------------------------------------------------------------
    def stats(self, last: int = 5) -> dict[str, Any]:
        """What ``GET /health`` shows: the window's per-exit and served agreement with the final
        exit, the goal, the fill, the thresholds and the last ``last`` changes (JSON-able)."""
        with self._lock:
            key = (self._version, self._policy_version)
            if self._stats_key != key:
                window: dict[str, Any] = {"exit_agreement": None, "served_agreement": None, "macs_fraction": None,
                                          "exit_distribution": None}
                if self._fill:
                    cache = self._window_cache()
                    preds = policy_scores(self._policy, cache.logits, gates=cache.gates).prediction
                    window["exit_agreement"] = (preds == cache.targets[None]).double().mean(1).tolist()
                    ev = self._evaluate(self._policy, cache)
                    window.update(served_agreement=ev["agreement"], macs_fraction=ev["macs_fraction"],
                                  exit_distribution=ev["exit_distribution"])
                self._stats, self._stats_key = window, key
            c = self.config
            out = {"goal": self.goal, "max_drop": c.max_drop, "tolerance": self.tolerance(), "rule": self._policy.name,
                   "thresholds": thresholds_of(self._policy, self.num_exits), "shadow_fraction": c.shadow_fraction,
                   "window": self.window, "window_fill": self._fill, "min_samples": self.min_samples,
                   "check_every": self.check_every, "min_interval_s": c.min_interval_s, "refit": c.refit,
                   **self._stats, "requests": self.requests, "observed": self.observed, "shadowed": self.shadowed,
                   "processed": self.processed, "dropped": self.dropped, "pending": self._pending,
                   "checks": self.checks,
                   "calibrations": self.calibrations,
                   "changes_total": self.changes_total, "changes": list(self._log)[-last:] if last else [],
                   "errors": list(self.errors)[-3:]}
        return encode_inf(out)
