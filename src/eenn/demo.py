"""The main job of the README: build a multi-exit network on the embedded scikit-learn digits,
train every exit jointly, and print per-exit accuracy and per-exit MACs."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .data import TensorLoader, load_dataset
from .network import create_network


@torch.no_grad()
def exit_accuracy(net, loader) -> list[float]:
    """Top-1 accuracy of every exit on ``loader``."""
    net.eval()
    correct = torch.zeros(net.num_exits)
    total = 0
    for x, y in loader:
        logits = net(x).logits
        correct += (logits.argmax(-1) == y).sum(1).cpu()
        total += y.numel()
    return (correct / max(total, 1)).tolist()


def run_demo(
    *, backbone: str = "resnet20", exits: str = "all", epochs: int = 30, batch_size: int = 64, seed: int = 0, device: str | None = None
) -> dict:
    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_dataset("digits", seed=seed)
    info = data.info
    net = create_network(
        backbone, in_channels=info.in_channels, num_classes=info.num_classes, input_size=info.input_size, exits=exits
    ).to(dev)
    print(f"eenn demo: {backbone} with {net.num_exits} exits on digits "
          f"({len(data.train)} train / {len(data.val)} val / {len(data.test)} test, {info.input_size[0]}x{info.input_size[1]} grey)")
    norm = dict(mean=info.mean, std=info.std, device=dev)
    train = TensorLoader(data.train, batch_size, shuffle=True, drop_last=True, seed=seed, **norm)
    val = TensorLoader(data.val, 512, **norm)
    test = TensorLoader(data.test, 512, **norm)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * len(train))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        train.set_epoch(epoch)
        total = 0.0
        for x, y in train:
            logits = net(x).logits  # [E, B, C]: every exit's cross-entropy, equally weighted
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(net.num_exits), reduction="sum") / y.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        val_acc = exit_accuracy(net, val)
        print(f"  epoch {epoch + 1:2d}/{epochs}  joint loss {total / len(train):.3f}  "
              f"val acc first/final exit {100 * val_acc[0]:.1f}% / {100 * val_acc[-1]:.1f}%")
    train_s = time.perf_counter() - t0
    test_acc = exit_accuracy(net, test)
    cost = net.cost()
    print(f"\ntrained in {train_s:.1f} s; per-exit test accuracy and cost (MACs per sample):")
    rows = [("exit", "test acc", "MACs", "of full", "params")]
    for i, name in enumerate(net.exit_names):
        rows.append((name, f"{100 * test_acc[i]:.2f}%", f"{cost.macs[i]:,}", f"{100 * cost.fraction[i]:.1f}%", f"{cost.params[i]:,}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  " + "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))
    return {"test_accuracy": test_acc, "macs": list(cost.macs), "train_seconds": train_s}
