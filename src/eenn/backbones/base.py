"""The backbone contract: an ordered list of stages where exits may attach, a final classifier,
and for every stage its per-sample output shape.

A stage maps the running state to the next state. For the built-in backbones the state is one
tensor; for models cut by :func:`eenn.attach_exits` it may be a tuple of tensors whose first
element is the feature an exit head reads (the other elements are values a later stage still
needs, such as the input of a residual add that spans the cut).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..registry import Registry, check_options, is_whole

__all__ = [
    "Backbone",
    "StageInfo",
    "register_backbone",
    "create_backbone",
    "list_backbones",
    "head_input",
    "head_keep",
    "dry_run",
    "default_head",
]

State = Tensor | tuple[Tensor, ...]


def head_input(state: State) -> Tensor:
    """The tensor an exit head reads from a stage's output state."""
    return state[0] if isinstance(state, tuple) else state


def head_keep(state: State, carries: bool) -> Tensor | None:
    """The padding mask (``[B, N]`` bool, True: a real token) that a token network cut with
    ``attach_exits(pad_id=...)`` carries last in its state (``carries``: the backbone's
    ``carries_keep``); None otherwise."""
    return state[-1] if carries and isinstance(state, tuple) else None


@dataclass(frozen=True)
class StageInfo:
    """What an exit attached after this stage will see."""

    index: int
    name: str
    shape: tuple[int, ...]  # per-sample shape of the head input: (C, H, W) or (F,)

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.shape[1:]


@torch.no_grad()
def dry_run(stages: Sequence[nn.Module], input_shape: Sequence[int], batch: int = 2,
            input_dtype: torch.dtype | None = None) -> list[State]:
    """Run ``stages`` in eval mode on zeros of per-sample shape ``input_shape`` (of
    ``input_dtype``, e.g. ``torch.long`` for token ids; by default the parameters' floating
    type); return each stage's output. Used to infer shapes; training mode is restored afterwards."""
    params = [p for s in stages for p in s.parameters()]
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    dtype = input_dtype if input_dtype is not None else dtype
    modes = [s.training for s in stages]
    for s in stages:
        s.eval()
    try:
        state: State = torch.zeros(batch, *input_shape, device=device, dtype=dtype)
        outs = []
        for s in stages:
            state = s(state)
            outs.append(state)
        return outs
    finally:
        for s, m in zip(stages, modes):
            s.train(m)


class Backbone(nn.Module):
    """Ordered ``stages`` plus a final ``classifier``.

    ``forward(x)`` is the plain network (logits of the final classifier); ``stage_info`` gives,
    for every stage, the shape an exit head attached there receives.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        classifier: nn.Module,
        *,
        input_shape: Sequence[int],
        stage_names: Sequence[str] | None = None,
        input_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(stages) < 1:
            raise ValueError("a backbone needs at least one stage")
        self.stages = nn.ModuleList(stages)
        self.classifier = classifier
        self.input_shape = tuple(int(s) for s in input_shape)
        # None: floating-point inputs (the parameters' type); an integer type for token ids.
        self.input_dtype = input_dtype
        names = list(stage_names) if stage_names is not None else [f"stage{i}" for i in range(len(stages))]
        if len(names) != len(stages):
            raise ValueError(f"{len(names)} stage names for {len(stages)} stages")
        outs = dry_run(self.stages, self.input_shape, input_dtype=input_dtype)
        self.stage_info = [
            StageInfo(i, n, tuple(head_input(o).shape[1:])) for i, (n, o) in enumerate(zip(names, outs))
        ]
        with torch.no_grad():
            was = classifier.training
            classifier.eval()
            logits = classifier(head_input(outs[-1]))
            classifier.train(was)
        if logits.dim() != 2:
            raise ValueError(f"the classifier must return [batch, classes] logits, got shape {tuple(logits.shape)}")
        self.num_classes = int(logits.shape[1])
        # Set by create_backbone so that a checkpoint can rebuild the network from data.
        self.spec: dict[str, Any] | None = None
        # Set by attach_exits(pad_id=...): every stage's state ends with the padding mask (head_keep).
        self.carries_keep = False

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward_features(self, x: Tensor) -> Tensor:
        state: State = x
        for stage in self.stages:
            state = stage(state)
        return head_input(state)

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """Every stage's head input, in order (the last one feeds the classifier)."""
        feats = []
        state: State = x
        for stage in self.stages:
            state = stage(state)
            feats.append(head_input(state))
        return feats

    def forward(self, x: Tensor) -> Tensor:
        state: State = x
        for stage in self.stages:
            state = stage(state)
        return self.classify(state)

    def classify(self, state: State) -> Tensor:
        """The final classifier on the last stage's state (given the padding mask when it reads one)."""
        keep = head_keep(state, self.carries_keep)
        if keep is not None and getattr(self.classifier, "takes_keep", False):
            return self.classifier(head_input(state), keep)
        return self.classifier(head_input(state))


_BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")
_DEFAULT_HEADS: dict[str, str] = {}


def register_backbone(name: str | None = None, *, head: str = "linear"):
    """Decorator: register a keyword-only builder
    ``fn(*, in_channels, num_classes, input_size, **options) -> Backbone``; ``head``: the exit
    head its networks get when none is named (MSDNet's own classifier for ``msdnet``)."""
    register = _BACKBONES.register(name)

    def deco(fn):
        fn = register(fn)
        _DEFAULT_HEADS[name or fn.__name__] = head
        return fn

    return deco


def default_head(name: str | None) -> str:
    """The exit head a registered backbone's networks get when none is named (``"linear"`` for
    a name that is not registered, or None: a backbone built otherwise)."""
    return _DEFAULT_HEADS.get(name, "linear")


def list_backbones() -> list[str]:
    return _BACKBONES.names()


def check_backbone(name: str, options: dict[str, Any]):
    """The registered backbone's builder, once ``name`` and the family's ``options`` are known to
    fit it (nothing built: a config names its mistakes before anything trains)."""
    builder = _BACKBONES.get(name)
    check_options(f"backbone {name!r}", builder, options, skip=("in_channels", "num_classes", "input_size"))
    return builder


def _size2(input_size: int | Sequence[int]) -> tuple[int, int]:
    size = [input_size] * 2 if is_whole(input_size) else input_size
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(is_whole(s, 1) for s in size)):
        raise ValueError(f"input_size must be a positive int or (height, width), got {input_size!r}")
    return int(size[0]), int(size[1])


def create_backbone(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    input_size: int | Sequence[int],
    **options: Any,
) -> Backbone:
    """Build a registered backbone. ``options`` are the family's own (``width``, ...)."""
    builder = check_backbone(name, options)
    for arg, value, least in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2)):
        if not is_whole(value, least):
            raise ValueError(f"{arg} must be an int >= {least}, got {value!r}")
    size = _size2(input_size)
    net = builder(in_channels=in_channels, num_classes=num_classes, input_size=size, **options)
    net.spec = {
        "name": name,
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "input_size": list(size),
        "options": dict(options),
    }
    return net
