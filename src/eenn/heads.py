"""Exit heads: small classifiers attached after a backbone stage.

Every head has the same shape: a ``body`` that turns the stage's feature into a flat vector,
a linear ``classifier`` to class logits, and optionally a ``gate`` branch, a linear unit and a
sigmoid giving a per-sample exit confidence in [0, 1]. The gate is what differentiable
branching, EENets and NACHOS learn; a single ``Linear(d, K + 1)`` whose last unit is the gate
(as in Scardapane et al.) is the same function as our separate ``Linear(d, K)`` and
``Linear(d, 1)`` on the same vector, so one mechanism serves all three.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .adapters import shape_adapter
from .exit_head import ExitHead, HeadClassifier
from .registry import Registry, check_options
from .token_bodies import AttentionPool, TokenGridConv, TokenPool, token_grid

__all__ = [
    "AttentionPool",
    "ExitHead",
    "HeadClassifier",
    "MixedPool2d",
    "TokenGridConv",
    "TokenPool",
    "create_head",
    "list_heads",
    "register_head",
    "token_grid",
]


class MixedPool2d(nn.Module):
    """SDN's mixed pooling ``a * maxpool + (1 - a) * avgpool`` with a learnable scalar ``a``
    (initialised uniformly in [0, 1], as in SDN)."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.alpha = nn.Parameter(torch.rand(1))

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size
        return self.alpha * nn.functional.max_pool2d(x, k) + (1 - self.alpha) * nn.functional.avg_pool2d(x, k)


def _tokens(in_shape: tuple[int, ...]) -> bool:
    return len(in_shape) == 2


def _need_tokens(name: str, in_shape: tuple[int, ...]) -> None:
    if not _tokens(in_shape):
        raise ValueError(
            f"exit head {name!r} reads token states (tokens, width), but this stage gives shape {in_shape}; "
            "use head 'linear', 'conv' or 'sdn' for feature maps and flat features"
        )


_HEADS: Registry[Callable[..., ExitHead]] = Registry("exit head")


def register_head(name: str | None = None):
    """Decorator: register ``fn(in_shape, num_classes, **options) -> ExitHead``. The option
    ``cascade`` is :func:`create_head`'s, common to every head: a builder does not take it."""
    return _HEADS.register(name)


def list_heads() -> list[str]:
    return _HEADS.names()


def check_head(name: str, options: dict[str, Any] | None = None):
    """The registered head's builder, once ``name`` (and ``options``, when given) are known to fit it."""
    builder = _HEADS.get(name)
    if options is not None and "backbone" in options:
        raise ValueError(f"exit head {name!r}: 'backbone' is not an option (a network gives its heads its own backbone)")
    if options is not None:
        check_options(f"exit head {name!r}", builder, options, skip=("in_shape", "num_classes", "backbone"))
    return builder


def create_head(name: str, in_shape: Sequence[int], num_classes: int, *, cascade: bool = False,
                backbone: nn.Module | None = None, **options: Any) -> ExitHead:
    """Build head ``name`` for per-sample input shape ``in_shape`` ((C, H, W) or (F,));
    ``backbone``: the network's, for heads built from it (``replica``).

    ``cascade=True`` makes it a cascading head (ZTW) that also reads the previous exit's
    ``num_classes`` logits, so it needs a predecessor: a network passes the option on to every
    exit but its first (:class:`~eenn.network.MultiExitNetwork`)."""
    builder = check_head(name, options)
    # A head that builds on the backbone itself (``replica``) names it among its arguments; a
    # network passes its backbone, which is not an option (nothing of it goes into a config).
    extra = {"backbone": backbone} if "backbone" in inspect.signature(builder).parameters else {}
    head = builder(tuple(int(s) for s in in_shape), num_classes, **extra, **options)
    return head.add_cascade(num_classes) if cascade else head


def _pool_flatten(in_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """Global average pooling for (C, H, W) features, the normalised mean over tokens for token
    states (N, D), identity for flat ones."""
    if len(in_shape) == 1:
        return nn.Flatten(), in_shape[0]
    if _tokens(in_shape):
        return TokenPool(in_shape[1]), in_shape[1]
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), in_shape[0]


def _at_least(head: str, option: str, value: int | None, zero: str = "") -> None:
    """Refuse a size option below 1 (None passes); ``zero``: what 0 means, where it may be given."""
    if value is not None and value < 1 and not (zero and value == 0):
        raise ValueError(f"exit head {head!r}: option {option!r} must be >= 1{zero}, got {value}")


_NO_HIDDEN = " (or 0/None: no hidden layer)"


def _hidden(head: str, body: nn.Module, dim: int, width: int | None) -> tuple[nn.Module, int]:
    """Optionally add one hidden fully connected layer (the head ``width``)."""
    _at_least(head, "width", width, _NO_HIDDEN)
    if not width:
        return body, dim
    return nn.Sequential(body, nn.Linear(dim, width), nn.ReLU(inplace=True)), width


def _need_spatial(name: str, in_shape: tuple[int, ...]) -> None:
    if len(in_shape) != 3:
        other = ("'linear' (mean over tokens), 'token' (class token), 'lgvit_local' or 'lgvit_global' for token "
                 "states" if _tokens(in_shape) else "'linear' or 'sdn' for flat features")
        raise ValueError(
            f"exit head {name!r} needs a (channels, height, width) feature map, but this stage gives "
            f"shape {in_shape}; use head {other}"
        )


@register_head("linear")
def linear(in_shape, num_classes, *, width: int | None = None, gate: bool = False) -> ExitHead:
    """Global average pool + fully connected (``width`` adds a hidden layer). On token states
    (N, D): LayerNorm, the mean over tokens, fully connected."""
    body, dim = _hidden("linear", *_pool_flatten(in_shape), width)
    return ExitHead(body, dim, num_classes, gate=gate)


@register_head("conv")
def conv(in_shape, num_classes, *, width: int | None = None, layers: int = 1, gate: bool = False) -> ExitHead:
    """BranchyNet-style branch: ``layers`` x (conv3x3 + BN + ReLU) with ``width`` channels
    (default: the stage's channels), global average pool, fully connected."""
    _need_spatial("conv", in_shape)
    _at_least("conv", "layers", layers)
    _at_least("conv", "width", width, " (or 0/None: the stage's channels)")
    c = in_shape[0]
    w = int(width or c)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Conv2d(c if i == 0 else w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return ExitHead(nn.Sequential(*mods), w, num_classes, gate=gate)


@register_head("sdn")
def sdn(in_shape, num_classes, *, width: int | None = None, gate: bool = False) -> ExitHead:
    """Shallow-Deep Networks' internal classifier: mixed max/avg pooling with kernel size/4
    (no pooling below 4 px), flatten, fully connected (token states: their normalised mean)."""
    if len(in_shape) == 1:
        body, dim = nn.Flatten(), in_shape[0]
    elif _tokens(in_shape):
        body, dim = _pool_flatten(in_shape)
    else:
        c, h, w = in_shape
        k = min(h, w) // 4 if min(h, w) >= 4 else 1
        if k > 1:
            body = nn.Sequential(MixedPool2d(k), nn.Flatten())
            dim = c * (h // k) * (w // k)
        else:
            body, dim = nn.Flatten(), c * h * w
    body, dim = _hidden("sdn", body, dim, width)
    return ExitHead(body, dim, num_classes, gate=gate)


# Options whose default changed: a network records them explicitly when it is built, and a
# description saved before the change (which lacks them) is rebuilt with the old value.
RECORDED_DEFAULTS: dict[str, dict[str, tuple[Any, Any]]] = {
    "branching": {"gate_probs": (True, False)},  # (default now, what descriptions without it mean)
    "eenets": {"gate_probs": (True, False)},
}


def resolve_head_options(name: str, options: dict[str, Any], *, saved: bool = False) -> dict[str, Any]:
    """``options`` with the recorded defaults of head ``name`` filled in: today's for a new
    network, the earlier ones for a description read back (``saved=True``)."""
    out = dict(options)
    for key, (now, before) in RECORDED_DEFAULTS.get(name, {}).items():
        out.setdefault(key, before if saved else now)
    return out


@register_head("branching")
def branching(in_shape, num_classes, *, width: int | None = None, gate_probs: bool = True) -> ExitHead:
    """Differentiable branching (Scardapane et al. 2020): pool + linear to K logits and one
    gate unit through a sigmoid; with ``gate_probs`` (default) the gate also reads the exit's
    sorted class probabilities [ours] (``gate_probs=False``: the paper's gate, on the features)."""
    body, dim = _pool_flatten(in_shape)
    body, dim = _hidden("branching", body, dim, width)
    return ExitHead(body, dim, num_classes, gate=True, gate_probs=gate_probs)


@register_head("eenets")
def eenets(in_shape, num_classes, *, batch_norm: bool = False, pool: bool = True, gate_probs: bool = True) -> ExitHead:
    """EENets' exit block: optional BatchNorm, global average pooling (``pool=False``
    flattens instead), then separate confidence (sigmoid) and classification branches; with
    ``gate_probs`` (default) the confidence also reads the sorted class probabilities [ours]."""
    if _tokens(in_shape):  # a LayerNorm is in the token body already; BatchNorm is for feature maps
        body, dim = _pool_flatten(in_shape) if pool else (nn.Sequential(nn.LayerNorm(in_shape[1]), nn.Flatten()),
                                                            in_shape[0] * in_shape[1])
        return ExitHead(body, dim, num_classes, gate=True, gate_probs=gate_probs)
    mods: list[nn.Module] = []
    if batch_norm:
        mods.append(nn.BatchNorm2d(in_shape[0]) if len(in_shape) == 3 else nn.BatchNorm1d(in_shape[0]))
    if pool and len(in_shape) == 3:
        mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        dim = in_shape[0]
    else:
        mods.append(nn.Flatten())
        dim = math.prod(in_shape)  # plain integers: the head builds on the meta device too
    return ExitHead(nn.Sequential(*mods), dim, num_classes, gate=True, gate_probs=gate_probs)


@register_head("nachos")
def nachos(in_shape, num_classes, *, width: int = 32, pool: int | str | None = None) -> ExitHead:
    """NACHOS' early-exit classifier: a max-pool (kernel ``pool``), three ReLU + conv3x3 layers
    of ``width``, 2x``width``, 4x``width`` channels, flatten, and a linear layer to K logits plus
    a confidence unit. The default pool is ours [ours]: the kernel that brings the map to at most
    4 px, chosen from this exit's map alone. ``pool="adaptive"`` is NACHOS' own rule (its
    ``get_intermediate_classifiers_adaptive``): kernel 1, 2 or 4, raised while the exit costs at
    least as much as the next one; it needs the next exit, so a network resolves it
    (:func:`eenn.placement.nachos_pools`). On a small backbone NACHOS' heads can cost more than
    the rest of the network: check ``net.cost()``."""
    _need_spatial("nachos", in_shape)
    _at_least("nachos", "width", width)
    if isinstance(pool, str):
        raise ValueError(f"exit head 'nachos': option 'pool' must be an int kernel, None or 'adaptive', got {pool!r}"
                         if pool != "adaptive" else
                         "exit head 'nachos': pool='adaptive' is resolved by the network from the next exit's cost "
                         "(give it in create_network/attach_exits head_options); a head built alone takes an int "
                         "kernel or None")
    _at_least("nachos", "pool", pool)
    c, h, w = in_shape
    k = pool if pool is not None else max(1, -(-min(h, w) // 4))
    mods: list[nn.Module] = [nn.MaxPool2d(k, ceil_mode=True)] if k > 1 else []
    chans = [c, width, 2 * width, 4 * width]
    for cin, cout in zip(chans, chans[1:]):
        mods += [nn.ReLU(), nn.Conv2d(cin, cout, 3, padding=1)]
    mods += [nn.ReLU(), nn.Flatten()]
    hp, wp = -(-h // k), -(-w // k)
    return ExitHead(nn.Sequential(*mods), chans[-1] * hp * wp, num_classes, gate=True)


def msdnet_body(channels: int, width: int = 128) -> nn.Sequential:
    """MSDNet's classifier up to its linear layer: two conv3x3/stride-2 + BN + ReLU layers of
    ``width`` channels, global average pooling, flatten. Also the ``msdnet`` backbone's own."""
    def conv(cin: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]

    return nn.Sequential(*conv(channels), *conv(width), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@register_head("msdnet")
def msdnet(in_shape, num_classes, *, width: int = 128, gate: bool = False) -> ExitHead:
    """MSDNet's classifier (Huang et al. 2018): two strided conv3x3 layers of ``width`` channels
    on the stage's map (the coarsest scale, on the ``msdnet`` backbone), pooled, fully connected."""
    _need_spatial("msdnet", in_shape)
    _at_least("msdnet", "width", width)
    return ExitHead(msdnet_body(in_shape[0], width), width, num_classes, gate=gate)


@register_head("token")
def token(in_shape, num_classes, *, index: int | None = None, width: int | None = None, gate: bool = False,
          backbone: nn.Module | None = None) -> ExitHead:
    """A transformer's class-token head (DeeBERT, PABEE): LayerNorm, the token at ``index``
    (by default 0, the class token), fully connected. ``width`` adds DeeBERT's pooler, one
    hidden layer with tanh. On a network whose own classifier averages the tokens (a ``vit``
    with ``class_token=False``) there is no class token: ``index`` must then be given."""
    _need_tokens("token", in_shape)
    _at_least("token", "width", width, _NO_HIDDEN)
    if index is None:
        pool = next((m for m in getattr(backbone, "classifier", nn.Identity()).modules() if isinstance(m, TokenPool)), None)
        if pool is not None and pool.index is None:
            raise ValueError("exit head 'token': this network has no class token (its classifier averages the "
                             "tokens); use head 'linear' (their mean) or give index= to read one token")
        index = 0
    n, d = in_shape
    if not -n <= index < n:
        raise ValueError(f"exit head 'token': index {index} is outside the {n} tokens of this stage")
    body: nn.Module = TokenPool(d, index)
    if width:
        body, d = nn.Sequential(body, nn.Linear(d, width), nn.Tanh()), width
    return ExitHead(body, d, num_classes, gate=gate)


@register_head("lgvit_local")
def lgvit_local(in_shape, num_classes, *, grid: Sequence[int] | None = None, class_token: bool | None = None,
                gate: bool = False) -> ExitHead:
    """LGViT's local perception head, for early exits of a vision transformer: the patch tokens
    on their grid through a depthwise + pointwise convolution, pooled, fully connected. The grid
    and the class token are read from the token count (49: 7x7; 50: class token + 7x7); name
    ``grid=(h, w)`` and ``class_token`` when the count does not tell (a rectangular grid)."""
    _need_tokens("lgvit_local", in_shape)
    n, d = in_shape
    if grid is None:
        found = token_grid(n)
        if found is None:
            raise ValueError(f"exit head 'lgvit_local': {n} tokens are not a square patch grid (with or without "
                             "a class token); pass grid=(height, width) and class_token=True/False")
        grid, class_token = found[:2], found[2] if class_token is None else class_token
    h, w = (int(g) for g in grid) if len(grid) == 2 else (0, 0)
    if min(h, w) < 1:
        raise ValueError(f"exit head 'lgvit_local': grid must be (height, width) >= 1, got {list(grid)}")
    skip = n - h * w
    if skip not in (0, 1) or (class_token is not None and skip != int(class_token)):
        raise ValueError(f"exit head 'lgvit_local': grid {h}x{w} does not fit {n} tokens "
                         f"(class token: {class_token}); the grid must cover all tokens but an optional first one")
    return ExitHead(TokenGridConv(d, (h, w), skip), d, num_classes, gate=gate)


@register_head("lgvit_global")
def lgvit_global(in_shape, num_classes, *, heads: int = 4, gate: bool = False) -> ExitHead:
    """LGViT's global aggregation head, for late exits of a vision transformer: attention
    pooling over all tokens (``heads`` learned queries), fully connected."""
    _need_tokens("lgvit_global", in_shape)
    return ExitHead(AttentionPool(in_shape[1], heads), in_shape[1], num_classes, gate=gate)


@register_head("replica")
def replica(in_shape, num_classes, *, backbone: nn.Module | None = None, gate: bool = False) -> ExitHead:
    """AEP's exit [C]: a copy of the backbone's own classifier (its layers, freshly initialised),
    behind an adapter [I] that brings this stage's features to what the classifier reads: a 1x1
    convolution to its channels and an average pool to its map size (no pool where the classifier
    pools to a fixed size itself, as a global average pool does), a linear map of widths for
    token states and flat features. The classifier must be a ``nn.Sequential`` ending in a
    ``nn.Linear`` (the registered backbones'); a network passes its backbone when it builds its
    heads."""
    if backbone is None:
        raise ValueError("exit head 'replica' copies the backbone's own classifier: build it as part of a network "
                         "(eenn.create_network(..., head='replica'))")
    clf = getattr(backbone, "classifier", None)
    if isinstance(clf, nn.Linear):
        clf = nn.Sequential(clf)
    if not (isinstance(clf, nn.Sequential) and len(clf) and isinstance(clf[-1], nn.Linear)):
        raise ValueError(f"exit head 'replica': this backbone's classifier ({type(clf).__name__}) is not a "
                         "nn.Linear or a nn.Sequential ending in one, so there is nothing to copy; pick another head")
    target = tuple(int(d) for d in backbone.stage_info[-1].shape)
    body = copy.deepcopy(clf[:-1])
    for m in body.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return ExitHead(nn.Sequential(shape_adapter(tuple(in_shape), target, body), body), clf[-1].in_features, num_classes,
                    gate=gate)

