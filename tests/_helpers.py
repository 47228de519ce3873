"""Small networks and request helpers shared by several test files."""
import io
import json
import time
import urllib.error
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import eenn


ARCHS = ["resnet20", "vit"]


def spread_net(head: str = "linear", arch: str = "resnet20", **opts) -> eenn.MultiExitNetwork:
    """A small network with three early exits and a final one (4 exits), 8x8 grey input, in eval
    mode, with its statistics spread at random so that the exits disagree in interesting ways:

    - ``resnet20``: width 0.5, exits after stages 1, 3, 5, BatchNorm statistics spread;
    - ``vit``: 4 blocks of width 16 (2x2 patches: 16 tokens and a class token), exits after
      blocks 0-2 (token states), LayerNorm affine parameters and linear weights spread."""
    torch.manual_seed(0)
    if arch == "vit":
        net = eenn.create_network("vit", in_channels=1, num_classes=10, input_size=8, exits=[0, 1, 2],
                                  head=head, dim=16, depth=4, heads=2, **opts)
    else:
        net = eenn.create_network(arch, in_channels=1, num_classes=10, input_size=8, exits=[1, 3, 5],
                                  head=head, width=0.5, **opts)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, nn.Linear) and arch == "vit":
                m.weight.normal_(0.0, 1.5 / m.in_features ** 0.5)
    return net.eval()


def gap_thresholds(score: torch.Tensor) -> torch.Tensor:
    """Per early exit (rows of ``score`` [E-1, N]), a threshold halfway across the widest gap
    between neighbouring sample scores in the middle half: between a quarter and three quarters
    of the samples leave, and no score lies near a threshold, where the last-bit differences of
    other kernels, batch sizes, onnxruntime or another processor could flip a decision."""
    sc = score.sort(1).values
    n = sc.shape[1]
    lo, hi = n // 4, 3 * n // 4
    i = lo + (sc[:, lo + 1:hi + 1] - sc[:, lo:hi]).argmax(1)
    rows = torch.arange(sc.shape[0])
    return (sc[rows, i] + sc[rows, i + 1]) / 2


class Skip2(nn.Module):
    """A residual input that lives across two cuts: cut at ``["relu", "relu_1"]`` by
    :func:`eenn.attach_exits`, the middle segment hands it on unchanged (a tuple state)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        s = self.stem(x)
        a = torch.relu(self.a(s))
        b = torch.relu(self.b(a))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(b + s, 1), 1))


def post(url: str, body: bytes, content_type: str = "application/x-npy", path: str = "/predict"):
    """``(status, JSON answer)`` of a POST to a served model (4xx answers included)."""
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_whole(url: str, body: bytes, timeout: float = 180.0) -> None:
    """Until a deployment answers ``body`` (a multi-sample ``.npy``) whole, no answer degraded:
    every replica of every tier is up (on a loaded machine a replica's first call, its imports and
    the onnxruntime session's first run, can outlast the tier timeout just after start-up); bounded."""
    deadline = time.monotonic() + timeout
    while True:
        status, out = post(url, body)
        if status == 200 and not any(r.get("degraded") for r in out["predictions"]):
            return
        assert time.monotonic() < deadline, f"the deployment never answered whole: {status} {out}"


def npy_bytes(a) -> bytes:
    """An array as the bytes of a .npy file."""
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def gated_quick_check(net, data, objective, epochs: int = 8):
    """Train a gated network on ``data`` and return every exit's test accuracy and the test-split
    result of its gates with thresholds fitted on validation for a 1-point drop."""
    import eenn
    from eenn.outputs import collect_outputs
    from eenn.policies import calibrate, report_goal

    eenn.fit(net, data, objective, epochs=epochs, lr=0.05, batch_size=64, progress=False)
    val, test = (collect_outputs(net, split) for split in (data.val, data.test))
    exit_acc = (test.logits.argmax(-1) == test.targets[None]).double().mean(1)
    goal = {"max_drop": 0.01}
    return exit_acc, report_goal(calibrate("gate", val, net.cost(), goal), test, net.cost(), goal)


# The small CLI training run and network the resume tests share (tests/test_resume.py, test_run_audit.py).
MLP_TRAIN = ["train", "--dataset", "digits", "--backbone", "mlp", "--no-progress", "--no-report"]


def mlp_net():
    torch.manual_seed(0)
    return eenn.create_network("mlp", in_channels=1, num_classes=10, input_size=8, exits="all")


def dir_files(out):
    """The files in ``out`` and their bytes: what a refused resume must leave as it was."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def mlp_compare_yaml(folder, methods: str, *, train: str = "", eval: str = ""):
    """A compare file of small MLP runs on 300 digits (``methods``: the YAML lines under
    ``methods:``; ``train``/``eval``: more settings for those sections, ", "-led)."""
    path = folder / "cmp.yaml"
    path.write_text("data: {name: digits, limit: 300}\nmodel: {backbone: mlp, exits: all}\n"
                    f"train: {{epochs: 1, lr: 0.05, progress: false{train}}}\n"
                    f"eval: {{batch_sizes: [], curve_points: 3{eval}}}\n"
                    "methods:\n" + methods)
    return path
