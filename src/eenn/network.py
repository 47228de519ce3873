"""MultiExitNetwork: a backbone's stages plus an exit head after chosen stages.

``net(x)`` runs every exit and returns their outputs; it holds no exit policy. Deciding
which exit answers is the job of the policies and the dynamic engine, which run the network
one segment at a time through :meth:`MultiExitNetwork.forward_segment`.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .backbones.base import Backbone, State, create_backbone, default_head, head_input, head_keep
from .cost import CostTable, count_macs, count_params, profile_stages
from .heads import ExitHead, HeadClassifier, create_head, resolve_head_options
from .input_check import check_input
from .placement import EXIT_DISTRIBUTIONS, ExitSpec, cost_thresholds, nachos_pools, place_exits

__all__ = [
    "EXIT_DISTRIBUTIONS",
    "ExitOutputs",
    "MultiExitNetwork",
    "NetworkConfig",
    "cost_thresholds",
    "create_network",
    "place_exits",
]


class ExitOutputs(NamedTuple):
    """Every exit's output, final exit last."""

    logits: Tensor  # [E, B, C]
    gates: Tensor | None  # [E, B] in [0, 1]; the final exit's gate is 1. None if heads have none.


def _per_exit(value: Any, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what}: got {len(value)} entries for {n} exits")
        return list(value)
    return [value] * n


# source["kind"] -> fn(config, *, model, leaf_modules) -> MultiExitNetwork, for networks whose
# backbone another module builds: eenn.trace registers "traced" (attach_exits) when imported,
# so that this module never imports it.
_REBUILDERS: dict[str, Callable[..., "MultiExitNetwork"]] = {}


def exit_position(index: Any, num_exits: int, what: str) -> int:
    """``index`` as a position ``0..num_exits-1`` (a negative one counts from the final exit, as
    in a list); anything else, out of range or not an integer, is a one-line ValueError naming ``what``."""
    n = num_exits
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not -n <= index < n:
        raise ValueError(f"{what} must be an exit index: an integer exit index in {-n}..{n - 1} for this "
                         f"{n}-exit network, got {index!r}")
    return int(index) % n


class MultiExitNetwork(nn.Module):
    """A backbone plus one exit head after each chosen stage; the final exit is the backbone's
    own classifier.

    Args:
        backbone: a :class:`~eenn.backbones.Backbone` (see :func:`eenn.create_backbone`).
        exits: stage indices or names, ``"all"``, ``"none"``, or a cost distribution
            (``"fine:2"`` / ``{"distribution": "fine", "num_exits": 2}``; METHODS.md §2).
        head: registered head name, or one per intermediate exit; None: the backbone's
            default (``linear``; MSDNet's classifier, ``msdnet``, on the ``msdnet`` backbone).
        head_options: keyword options for the head(s), a dict or one per exit.
        source: how to rebuild the backbone from data (set by the factories; used by
            :func:`eenn.save`).
    """

    def __init__(
        self,
        backbone: Backbone,
        exits: ExitSpec = "all",
        head: str | Sequence[str] | None = None,
        head_options: dict | Sequence[dict] | None = None,
        *,
        source: dict | None = None,
        saved: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.exit_spec = copy.deepcopy(exits) if not isinstance(exits, (list, tuple)) else list(exits)
        stages = place_exits(exits, backbone)
        head = default_head((backbone.spec or {}).get("name")) if head is None else head  # msdnet's own, else linear
        names = [str(h) for h in _per_exit(head, len(stages), "head")]
        options = [resolve_head_options(h, dict(o or {}), saved=saved)
                   for h, o in zip(names, _per_exit(head_options or {}, len(stages), "head_options"))]
        if any("backbone" in o for o in options):
            raise ValueError("exit head option 'backbone' is not an option (a network gives its heads its own backbone)")
        # The first exit has no predecessor to read, so the head option "cascade" (ZTW) takes
        # effect from the second exit on; the stored options keep it as given.
        # NACHOS' pool="adaptive" depends on the next exit's cost: resolved here, stored as given.
        pools = nachos_pools(backbone, stages, names, options)
        heads = [create_head(h, backbone.stage_info[s].shape, backbone.num_classes, backbone=backbone,
                             **{**(o if k > 0 else {key: v for key, v in o.items() if key != "cascade"}),
                                **({"pool": pools[k]} if k in pools else {})})
                 for k, (h, s, o) in enumerate(zip(names, stages, options))]
        bad = next((k for k, h in enumerate(heads) if not h.reads_keep), None) if backbone.carries_keep else None
        if bad is not None:
            raise ValueError(
                f"exit head {names[bad]!r} (exit {bad}) cannot leave padded tokens out, and this network masks them "
                "(attach_exits with a pad_id): use head 'linear' (the mean of the real tokens), 'token' (the "
                "class token) or 'lgvit_global', or attach_exits(..., pad_id=None) to read every position")
        self._set_exits(stages, heads, names, options)
        if source is None and backbone.spec is not None:
            source = {"kind": "backbone", **backbone.spec}
        self.source = source
        # What _check_input knows without an input_spec: token ids, or a built-in backbone's shape.
        self.takes_token_ids = backbone.input_dtype is not None and not backbone.input_dtype.is_floating_point
        # A built-in backbone takes its shape; a traced model the one it was traced at (its other
        # sizes, a sequence length say, are constants of the cut graph from then on).
        self._known_shape = backbone.input_shape if (source or {}).get("kind") in ("backbone", "traced") else None
        self.truncated_at: int | None = None  # set by truncate(): the exit that became final
        self._parent_config: dict[str, Any] | None = None
        # What the network takes as input (an eenn.InputSpec: shape, normalisation, class names);
        # set by eenn.fit, saved with the checkpoint and the export, used by preprocess().
        self.input_spec = None

    def _set_exits(self, stages: list[int], heads: list[ExitHead], names: list[str], options: list[dict]) -> None:
        """Install the intermediate exits and everything derived from them."""
        gated = [h.has_gate for h in heads]
        if any(gated) and not all(gated):
            raise ValueError(f"either every exit head emits a gate or none does; got heads {names} (gated: {gated})")
        self.exit_stages, self.head_names, self.head_options = list(stages), list(names), list(options)
        self.heads = nn.ModuleList(heads)
        self.has_gates = bool(gated) and all(gated)
        self.cascades = any(h.cascades for h in heads)
        ends = [*self.exit_stages, self.backbone.num_stages - 1]
        self.segment_bounds = [(a + 1, b + 1) for a, b in zip([-1, *ends[:-1]], ends)]
        self._cost: CostTable | None = None

    # ----------------------------------------------------------------------------- shape
    @property
    def num_exits(self) -> int:
        return len(self.heads) + 1

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.backbone.input_shape

    def require_input_spec(self, what: str = "this"):
        """``input_spec``, or a ValueError saying how to set it (``what`` names the caller)."""
        if self.input_spec is None:
            raise ValueError(
                f"{what} needs the network's input description (net.input_spec), which is not set, to know "
                "what it takes (uint8 pixels to normalise, token ids, float features): set net.input_spec = "
                "eenn.InputSpec.from_info(data.info) or train the network with eenn.fit, which sets it")
        return self.input_spec

    def _check_input(self, x: Tensor, where: str, pixels: bool) -> None:
        """Refuse an input the network cannot take, saying what it takes (:func:`.input_check.check_input`)."""
        check_input(self, x, where, pixels)

    @property
    def input_float_dtype(self) -> torch.dtype:
        """The float type the network takes: its parameters' (float32 unless converted)."""
        held = self.__dict__.get("_dtype_of")  # a parameter, held so that calls need not walk the modules
        if held is None:
            held = self.__dict__["_dtype_of"] = (next((p for p in self.parameters() if p.is_floating_point()), None),)
        return held[0].dtype if held[0] is not None else torch.float32

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_dtype_of", None)  # .to(), .half(), ...: look again
        return super()._apply(fn, *args, **kwargs)

    def preprocess(self, x: Tensor) -> Tensor:
        """uint8 pixels ``[..., C, H, W]`` -> the float32 model input (``input_spec.normalize``);
        a floating-point ``x`` is taken to be a model input already and is returned unchanged."""
        if x.is_floating_point():
            return x
        return self.require_input_spec("preprocess").normalize(x)

    @property
    def exit_names(self) -> list[str]:
        info = self.backbone.stage_info
        return [f"exit{i}@{info[s].name}" for i, s in enumerate(self.exit_stages)] + ["final"]

    # --------------------------------------------------------------------------- compute
    def forward_segment(
        self, k: int, state: State, prev_logits: Tensor | None = None
    ) -> tuple[State, Tensor, Tensor | None]:
        """Run segment ``k`` alone: the stages between exit ``k-1`` and exit ``k``, then exit
        ``k``'s head. Returns the state to carry on, the exit's logits and its gate (the final
        exit's gate is 1 when the network has gates, else None). Cascading heads (``cascades``)
        also need the previous exit's logits as ``prev_logits``."""
        state = self._run_stages(k, state)
        logits, gate = self._run_exit(k, state, prev_logits)
        return state, logits, gate

    def _run_stages(self, k: int, state: State) -> State:
        start, end = self.segment_bounds[k]
        for i in range(start, end):
            state = self.backbone.stages[i](state)
        return state

    def _run_exit(self, k: int, state: State, prev_logits: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Exit ``k`` on the state after its stages (a padding mask it carries goes to the head)."""
        if k < len(self.heads):
            head = self.heads[k]
            keep = head_keep(state, self.backbone.carries_keep)
            return head(head_input(state), prev_logits if head.cascades else None, keep)
        logits = self.backbone.classify(state)
        return logits, (logits.new_ones(logits.shape[0]) if self.has_gates else None)

    def forward(self, x: Tensor, exits: Sequence[int] | None = None) -> ExitOutputs:
        """Every exit's output; with ``exits`` (indices, negative allowed) only those exits'
        heads run (and those a cascading head needs), and stages only as deep as the deepest.
        ``x`` must be in the parameters' float type (another one is refused, not converted; the
        engine converts); NaN and inf are not looked for here (training speed; the engine does)."""
        self._check_input(x, "net(x)", pixels=False)
        n = self.num_exits
        wanted = range(n) if exits is None else sorted({exit_position(e, n, "forward(exits=...)") for e in exits})
        if not len(wanted):
            raise ValueError("forward(exits=...) needs at least one exit")
        state: State = x
        logits, gates = [], []
        prev = None
        for k in range(wanted[-1] + 1):
            state = self._run_stages(k, state)
            if k in wanted or (self.cascades and k < len(self.heads)):
                lg, g = self._run_exit(k, state, prev)
                prev = lg
                if k in wanted:
                    logits.append(lg)
                    gates.append(g)
        return ExitOutputs(torch.stack(logits), torch.stack(gates) if self.has_gates else None)

    def truncate(self, exit_index: int) -> "MultiExitNetwork":
        """A smaller network that ends at exit ``exit_index``: the stages after it and the later
        exits are removed for good, and that exit's head becomes the final classifier (AEP's
        pruning step). Parameters are shared with this network, not copied. ``exit_index``: an
        integer in ``-num_exits .. num_exits - 1`` (negative counts from the final exit)."""
        k = exit_position(exit_index, self.num_exits, "truncate: exit_index")
        if k == self.num_exits - 1:
            return self
        if self.heads[k].cascades:
            raise ValueError(f"exit {k} has a cascading head, which cannot become the final classifier")
        s = self.exit_stages[k]
        bb = self.backbone
        new_bb = Backbone(list(bb.stages[: s + 1]), HeadClassifier(self.heads[k]), input_shape=bb.input_shape,
                          stage_names=[i.name for i in bb.stage_info[: s + 1]], input_dtype=bb.input_dtype)
        new_bb.carries_keep = bb.carries_keep
        net = MultiExitNetwork(new_bb, "none", source=copy.deepcopy(self.source))
        net._set_exits(self.exit_stages[:k], list(self.heads[:k]), self.head_names[:k],
                       copy.deepcopy(self.head_options[:k]))
        net.exit_spec = self.exit_spec
        net.input_spec = self.input_spec
        net.truncated_at = k
        net._parent_config = self.config
        return net

    # ------------------------------------------------------------------------------ cost
    def cost(self) -> CostTable:
        """Per-exit MACs and parameters (heads included), measured once and cached."""
        if self._cost is None:
            self._cost = self._measure_cost()
        return self._cost

    def _measure_cost(self) -> CostTable:
        bb = self.backbone
        stage_macs, cls_macs = profile_stages(bb.stages, bb.classifier, bb.input_shape, bb.input_dtype)
        head_macs = []
        for h, s in zip(self.heads, self.exit_stages):
            p = next(h.parameters())
            modes = h.training
            h.eval()
            x = torch.zeros(1, *bb.stage_info[s].shape, device=p.device, dtype=p.dtype)
            prev = (torch.zeros(1, self.num_classes, device=p.device, dtype=p.dtype),) if h.cascades else ()
            head_macs.append(count_macs(h, x, *prev))
            h.train(modes)
        head_macs.append(cls_macs)
        stages = [*self.exit_stages, bb.num_stages - 1]
        cum = torch.tensor(stage_macs, dtype=torch.int64).cumsum(0).tolist()
        backbone_macs = [cum[s] for s in stages]
        macs = [b + h for b, h in zip(backbone_macs, head_macs)]
        dyn = [backbone_macs[e] + sum(head_macs[: e + 1]) for e in range(len(stages))]
        heads = [*self.heads, bb.classifier]
        params = [count_params([*bb.stages[: s + 1], heads[e]]) for e, s in enumerate(stages)]
        return CostTable(
            exit_names=tuple(self.exit_names),
            stage_index=tuple(stages),
            backbone_macs=tuple(backbone_macs),
            head_macs=tuple(head_macs),
            macs=tuple(macs),
            dynamic_macs=tuple(dyn),
            params=tuple(params),
            fraction=tuple(m / macs[-1] for m in macs),
            total_params=count_params([self]),
        )

    # ---------------------------------------------------------------------- description
    @property
    def config(self) -> dict[str, Any]:
        """A JSON-able description from which :meth:`from_config` rebuilds this network."""
        spec = {"input_spec": self.input_spec.to_dict()} if self.input_spec is not None else {}
        if self.truncated_at is not None:
            parent = {k: v for k, v in self._parent_config.items() if k != "input_spec"}
            return {**parent, "truncated_at": self.truncated_at, **spec}
        return {
            "source": copy.deepcopy(self.source),
            "exits": list(self.exit_stages),
            "exit_spec": self.exit_spec,
            "head": list(self.head_names),
            "head_options": copy.deepcopy(self.head_options),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            **spec,
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], *, model: nn.Module | None = None, leaf_modules: Sequence[type] | None = None
    ) -> "MultiExitNetwork":
        """Rebuild from :attr:`config`. Networks made by :func:`eenn.attach_exits` need the
        user's ``model`` again (and its ``leaf_modules``), since code is not part of the
        description."""
        if config.get("input_spec") is not None:  # the input description, on whatever was rebuilt
            from .data.spec import InputSpec

            net = cls.from_config({**config, "input_spec": None}, model=model, leaf_modules=leaf_modules)
            net.input_spec = InputSpec.from_dict(config["input_spec"])
            return net
        if config.get("truncated_at") is not None:
            full = cls.from_config({**config, "truncated_at": None}, model=model, leaf_modules=leaf_modules)
            return full.truncate(config["truncated_at"])
        src = config.get("source") or {}
        kind = src.get("kind")
        if kind == "backbone":
            bb = create_backbone(
                src["name"],
                in_channels=src["in_channels"],
                num_classes=src["num_classes"],
                input_size=src["input_size"],
                **src.get("options", {}),
            )
            return cls(bb, config["exits"], config["head"], config["head_options"], saved=True)
        if kind in _REBUILDERS:  # e.g. "traced", registered by eenn.trace
            return _REBUILDERS[kind](config, model=model, leaf_modules=leaf_modules)
        if isinstance(model, Backbone):
            return cls(model, config["exits"], config["head"], config["head_options"], saved=True)
        raise ValueError(
            "this network was built on a custom Backbone that eenn cannot rebuild from data; "
            "pass model=<that Backbone, freshly built>"
        )


@dataclass
class NetworkConfig:
    """Everything needed to build a multi-exit network on a registered backbone."""

    backbone: str = "resnet20"
    in_channels: int = 3
    num_classes: int = 10
    input_size: int | tuple[int, int] = 32
    backbone_options: dict[str, Any] = field(default_factory=dict)
    exits: Any = "all"
    head: str | list[str] | None = None  # None: the backbone's own default (linear; msdnet for MSDNet)
    head_options: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)

    def build(self) -> MultiExitNetwork:
        bb = create_backbone(
            self.backbone,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            input_size=self.input_size,
            **self.backbone_options,
        )
        return MultiExitNetwork(bb, self.exits, self.head, self.head_options)


def create_network(
    backbone: str,
    *,
    in_channels: int,
    num_classes: int,
    input_size: int | tuple[int, int],
    exits: ExitSpec = "all",
    head: str | Sequence[str] | None = None,
    head_options: dict | Sequence[dict] | None = None,
    **backbone_options: Any,
) -> MultiExitNetwork:
    """Build a registered backbone and attach exits:
    ``create_network("resnet20", in_channels=1, num_classes=10, input_size=28, exits="fine:2")``."""
    return NetworkConfig(
        backbone, in_channels, num_classes, input_size, backbone_options, exits, head, head_options or {}
    ).build()
