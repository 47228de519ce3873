"""An exit policy as one object: a rule, its per-exit thresholds, the rule's options and the
fallback, with ``to_dict``/``from_dict``.

It is what :func:`~eenn.policies.calibrate` returns and what checkpoints, calibration records
and export manifests store, and what the engine, the staged ONNX runner, the server and
``eenn predict`` take. The methods' own ingredients are its business:

- AEP: ``ExitPolicy("ensemble", th, weights=[...])`` or ``weights="linear"`` (a scheme name,
  resolved once the number of exits is known);
- ZTW: ``ExitPolicy("ensemble", th, ensemble=geometric_ensemble_module)``, stored as its two
  tensors, so a ZTW policy goes into a checkpoint or an export like any other;
- PABEE: ``ExitPolicy("patience", t)``: the patience is the threshold;
- SDN: ``fallback="most_confident"``.

``policy.bind(num_exits)`` checks everything once against a network's exit count and returns a
:class:`BoundPolicy`, which the exit loop (:mod:`.loop`) and the vectorised rule
(:meth:`BoundPolicy.scores`) use.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint import read_description
from ..functional import SCHEMES, scheme_weights
from ..io import decode_inf, read_json
from ..registry import check_options
from .rules import (FALLBACKS, RULES, Scores, as_thresholds, exit_step, get_policy, list_policies, padded_step,
                    threshold_tensor)

__all__ = ["ExitPolicy", "BoundPolicy", "FALLBACKS", "as_policy", "policy_scores"]

_GATED = ("gate", "cumulative")


def _floats(t) -> list | float | None:
    if t is None:
        return None
    t = torch.as_tensor(t, dtype=torch.float32)
    return float(t) if t.dim() == 0 else [float(v) for v in t.reshape(-1)]


class ExitPolicy:
    """``ExitPolicy(rule="max_prob", thresholds=None, *, fallback="final", **options)``.

    ``rule``: a registered rule name (``eenn.policies.list_policies()``) or a function with a
    rule's signature (such a policy cannot be stored). ``thresholds``: one per non-final exit,
    or one value for all, in the rule's own units (``None``: not fitted yet; the policy then
    refuses to run and says to calibrate it). ``options`` go to the rule: ``weights`` (AEP),
    ``ensemble`` (ZTW), ``probs`` (precomputed ensembled probabilities, cached outputs only)."""

    def __init__(self, rule: str | Callable = "max_prob", thresholds=None, *, fallback: str = "final",
                 **options: Any) -> None:
        if isinstance(rule, ExitPolicy):
            raise TypeError("ExitPolicy(rule=...) takes a rule name; to change a policy use policy.replace(...)")
        if not (isinstance(rule, str) or callable(rule)):
            raise TypeError(f"ExitPolicy(rule=...) takes a rule name such as 'max_prob' or a rule function, got a "
                            f"{type(rule).__name__}")
        if isinstance(rule, str) and rule not in list_policies():
            raise ValueError(f"unknown exit rule {rule!r}; choose one of {', '.join(list_policies())}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be 'final' or 'most_confident', got {fallback!r}")
        self.rule = rule
        self.fn = get_policy(rule)
        check_options(f"policy {self.name!r}", self.fn, options, skip=("logits", "gates"))
        w = options.get("weights")
        if isinstance(w, str) and w not in SCHEMES[:2]:
            raise ValueError(f"ensemble weights by name must be 'uniform' or 'linear' (a fixed scheme), got {w!r}")
        if w is not None and not isinstance(w, str):
            options["weights"] = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
        ens = options.get("ensemble")
        if ens is not None:
            if isinstance(ens, torch.nn.Module):
                ens = {"weight": ens.weight, "bias": ens.bias}
            if not isinstance(ens, Mapping) or set(ens) != {"weight", "bias"}:
                raise ValueError("ensemble= takes a ZTW GeometricEnsemble or {'weight': [E, E], 'bias': [E, C]}")
            options["ensemble"] = {k: torch.as_tensor(v, dtype=torch.float32).detach().cpu() for k, v in ens.items()}
        self.options = options
        self.fallback = fallback
        self.thresholds = None if thresholds is None else threshold_tensor(thresholds)

    @property
    def name(self) -> str:
        return self.rule if isinstance(self.rule, str) else getattr(self.rule, "__name__", "custom")

    def replace(self, **changes) -> "ExitPolicy":
        """A copy with some fields changed (``thresholds=``, ``fallback=``, or rule options)."""
        rule = changes.pop("rule", self.rule)
        return ExitPolicy(rule, **{"thresholds": self.thresholds, "fallback": self.fallback, **self.options, **changes})

    # -- storage -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"rule", "thresholds", "fallback", "options"}`` (infinite thresholds stay
        floats; write with :func:`eenn.io.write_json`, which spells them "inf")."""
        if not isinstance(self.rule, str):
            raise ValueError("a policy with a custom rule function cannot be stored; register the rule "
                             "(eenn.policies.register_policy) and name it")
        opts: dict[str, Any] = {}
        for k, v in self.options.items():
            if k == "weights":
                opts[k] = v if isinstance(v, str) else _floats(v)
            elif k == "ensemble":
                opts[k] = {n: t.tolist() for n, t in v.items()}
            else:
                raise ValueError(f"policy option {k!r} is data of one split (precomputed probs), not part of a "
                                 "policy that can be stored")
        return {"rule": self.rule, "thresholds": _floats(self.thresholds), "fallback": self.fallback, "options": opts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExitPolicy":
        """Rebuild from :meth:`to_dict` (also reads the older ``{"name"|"policy", ...}`` records)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"not an exit policy record: expected a JSON object with 'rule' and 'thresholds' (as eenn "
                             f"calibrate writes), got {type(d).__name__}")
        if isinstance(d.get("policy"), Mapping):  # a calibration record or a report: the policy inside
            return cls.from_dict(d["policy"])
        rule = d.get("rule") or d.get("name") or d.get("policy")
        if rule is None:
            raise ValueError(f"not an exit policy record (no 'rule'): keys {sorted(d)}")
        th = d.get("thresholds")
        if th is not None:
            th = [float(v) for v in th] if isinstance(th, (list, tuple)) else float(th)
        return cls(rule, th, fallback=d.get("fallback") or "final",
                   **dict(d.get("options") or d.get("policy_options") or {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExitPolicy":
        """The policy stored in a file eenn wrote: a checkpoint saved with ``policy=``, a
        calibration record (``eenn calibrate``), a ``report.json``, or an export (its directory
        or ``manifest.json``)."""
        p = Path(path)
        if p.is_dir():
            p = p / "manifest.json"
        if not p.exists():
            raise FileNotFoundError(f"no file {p} to read an exit policy from")
        if p.suffix == ".safetensors":
            desc = read_description(p)
            if "policy" not in desc:
                raise ValueError(f"{p} holds no exit policy: save one with eenn.save(net, path, policy=...), or give "
                                 "a calibration record (eenn calibrate)")
            return cls.from_dict(decode_inf(desc["policy"]))
        try:
            return cls.from_dict(read_json(p))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not a JSON file eenn wrote ({e})") from None

    def __repr__(self) -> str:
        th = _floats(self.thresholds)
        opts = "".join(f", {k}=..." for k in self.options)
        return f"ExitPolicy({self.name!r}, thresholds={th}, fallback={self.fallback!r}{opts})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, ExitPolicy):
            return NotImplemented
        try:
            return self.to_dict() == other.to_dict()
        except ValueError:
            return self is other

    # -- use -----------------------------------------------------------------------------
    def bind(self, num_exits: int, *, has_gates: bool | None = None, need_thresholds: bool = True) -> "BoundPolicy":
        """This policy checked against a network with ``num_exits`` exits (and, if given, whether
        its heads emit gates); thresholds expanded to ``[E-1]``."""
        if has_gates is False and self.name in _GATED:
            raise ValueError(f"policy {self.name!r} needs gated exit heads; this network has none "
                             "(use max_prob, entropy, margin, patience or ensemble)")
        if self.thresholds is None and need_thresholds:
            raise ValueError(f"policy {self.name!r} has no thresholds: give thresholds= or fit them with "
                             "eenn.policies.calibrate(...)")
        th = as_thresholds(self.thresholds if self.thresholds is not None else math.inf, num_exits)
        opts = dict(self.options)
        w = opts.get("weights")
        if w is not None:
            w = scheme_weights(w, num_exits) if isinstance(w, str) else w
            if w.shape != (num_exits,):
                raise ValueError(f"need one ensemble weight per exit ({num_exits}), got {w.numel()}")
            if bool((w < 0).any()) or not bool((w > 0).any()):
                raise ValueError(f"ensemble weights must be >= 0 and not all zero, got {w.tolist()}")
            opts["weights"] = w
        ens = opts.get("ensemble")
        if ens is not None and ens["weight"].shape != (num_exits, num_exits):
            raise ValueError(f"the ZTW ensemble is for {ens['weight'].shape[0]} exits, the network has {num_exits}")
        return BoundPolicy(self, num_exits, th, opts)


@dataclass
class BoundPolicy:
    """A policy checked against an exit count: what the exit loop runs."""

    policy: ExitPolicy
    num_exits: int
    thresholds: Tensor  # [E-1] float32
    options: dict

    def __post_init__(self) -> None:
        self.fallback = self.policy.fallback
        self.th = self.thresholds.tolist()  # floats: comparing a tensor with a float makes no extra tensor
        self.step = exit_step(self.policy.fn, self.num_exits, **self.options) or \
            padded_step(self.policy.fn, self.num_exits, **self.options)

    def scores(self, logits: Tensor, gates: Tensor | None = None) -> Scores:
        """The rule on every exit at once (``[E, N, C]`` logits): what calibration sweeps."""
        s = self.policy.fn(logits, gates, **self.options)
        if s.rule not in RULES:
            raise ValueError(f"a policy's rule must be one of {RULES}, got {s.rule!r}")
        return s

    def fires(self, score: Tensor, k: int, rule: str) -> Tensor:
        """Which samples leave at exit ``k`` (``score`` of that exit, ``[n]``)."""
        t = self.th[k]
        if rule == ">=":
            return score >= t
        if rule == ">":
            return score > t
        if rule == "<":
            return score < t
        return score <= t

    def probs(self, s: Scores, logits: Tensor) -> Tensor:
        """The answering probabilities at one exit: the ensemble's for ensemble rules."""
        return s.probs if s.probs is not None else F.softmax(logits.float(), dim=-1)


def as_policy(policy: "ExitPolicy | str | Callable | Mapping", thresholds=None, *, fallback: str | None = None,
              **options) -> ExitPolicy:
    """An :class:`ExitPolicy` from a policy, a record (dict) or a rule name plus thresholds,
    fallback and options (the older call forms)."""
    if isinstance(policy, ExitPolicy):
        if thresholds is None and fallback is None and not options:
            return policy
        changes = dict(options)
        if thresholds is not None:
            changes["thresholds"] = thresholds
        if fallback is not None:
            changes["fallback"] = fallback
        return policy.replace(**changes)
    if isinstance(policy, Mapping):
        p = ExitPolicy.from_dict(policy)
        return as_policy(p, thresholds, fallback=fallback, **options)
    return ExitPolicy(policy, thresholds, fallback=fallback or "final", **options)  # which refuses a non-rule


def policy_scores(policy: "ExitPolicy | str", cached_or_logits, *, gates: Tensor | None = None, **options) -> Scores:
    """The rule's :class:`Scores` on every exit of a cache (or of logits ``[E, N, C]`` and ``gates``)."""
    logits = getattr(cached_or_logits, "logits", cached_or_logits)
    if gates is None:
        gates = getattr(cached_or_logits, "gates", None)
    return as_policy(policy, **options).bind(logits.shape[0], need_thresholds=False).scores(logits, gates)
