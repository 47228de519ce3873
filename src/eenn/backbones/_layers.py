"""Small building blocks shared by the built-in backbone families (private)."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

Size = tuple[int, int]


def check_width(width: float) -> None:
    if not width > 0:
        raise ValueError(f"width must be positive, got {width!r}")


def check_size(family: str, option: str, value: int | Sequence[int] | None) -> None:
    """Refuse a layer size (or a list of them) below 1; None (the default) passes."""
    if value is not None and min(value if isinstance(value, (list, tuple)) else [value], default=1) < 1:
        raise ValueError(f"{family}: option {option!r} must be >= 1, got {value!r}")


def check_dropout(family: str, dropout: float) -> None:
    if not 0 <= dropout < 1:
        raise ValueError(f"{family}: option 'dropout' must lie in [0, 1), got {dropout!r}")


def scaled(size: int, width: float, minimum: int = 8) -> int:
    """``size * width`` rounded, but never below ``minimum`` so thin variants stay usable."""
    return max(minimum, int(round(size * width)))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor`` that loses at most 10% (the MobileNet channel rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def conv_out(size: Size, kernel: int | Size, stride: int = 1, padding: int | Size = 0) -> Size:
    """Spatial output size of a convolution (also of a pooling layer)."""
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    p = padding if isinstance(padding, tuple) else (padding, padding)
    return tuple((s + 2 * pi - ki) // stride + 1 for s, ki, pi in zip(size, k, p))  # type: ignore[return-value]


def max_pool2(size: Size) -> tuple[list[nn.Module], Size]:
    """A 2x2/stride-2 max pool for a map of ``size``, leaving alone any dimension that is already
    1 px (so 8x8 inputs never shrink to nothing). Returns ([] or [pool], new size)."""
    kernel = tuple(2 if s >= 2 else 1 for s in size)
    if kernel == (1, 1):
        return [], size
    return [nn.MaxPool2d(kernel, kernel)], tuple(s // k for s, k in zip(size, kernel))  # type: ignore[return-value]


def conv_bn_act(
    in_ch: int,
    out_ch: int,
    kernel_size: int = 3,
    stride: int = 1,
    *,
    groups: int = 1,
    act: Callable[..., nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias: BN supplies it) + BatchNorm + optional activation, 'same' padding."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def avgpool_linear(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """The global-average-pool head used by the CIFAR ResNets, VGGs and MobileNetV2."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def init_weights(modules: Sequence[nn.Module] | nn.Module) -> None:
    """Kaiming-normal convolutions, BN as identity; Linear layers keep PyTorch's default."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    for root in roots:
        for m in root.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
