"""Segments traced and optimised for inference give the eager network's answers (to float
rounding), on every kind of network the engine runs; what cannot be traced stays eager."""
import warnings

import pytest
import torch
from torch import nn

import eenn
from _helpers import Skip2, spread_net
from eenn.engine import DynamicEngine
from eenn.inference import OptimizedSegments, tune_cpu_allocator
from eenn.objectives.ztw import GeometricEnsemble

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _fx_net():
    torch.manual_seed(0)
    return eenn.attach_exits(Skip2(in_channels=1, num_classes=10), at=["relu", "relu_1"], input_shape=(1, 8, 8)).eval()


NETS = {
    "linear": lambda: spread_net("linear"),
    "gated": lambda: spread_net("branching"),
    "cascading": lambda: spread_net("sdn", head_options={"cascade": True}),
    "fx-tuple-state": _fx_net,
}
CASES = [
    ("linear", "max_prob", {}),
    ("linear", "patience", {}),
    ("linear", "ensemble", {"weights": torch.tensor([0.1, 0.2, 0.3, 0.4])}),
    ("linear", "ensemble", {"ensemble": GeometricEnsemble(4, 10)}),
    ("gated", "cumulative", {}),
    ("cascading", "entropy", {}),
    ("fx-tuple-state", "margin", {}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net_name, policy, opts", CASES, ids=lambda c: str(c)[:16])
def test_optimized_engine_gives_the_eager_answers(net_name, policy, opts, device):
    net = NETS[net_name]().to(device)
    x = torch.randn(64, 1, 8, 8, device=device)
    eager = DynamicEngine(net, policy, [0.0] * (net.num_exits - 1), **opts)
    with torch.no_grad():  # thresholds between two samples' scores, so rounding cannot flip one
        out = net(x)
        cache = eenn.outputs.CachedOutputs(out.logits, out.gates, torch.zeros(64, dtype=torch.long))
        sc = eenn.policies.policy_scores(policy, cache, **opts).score[:-1].sort(1).values
    th = (sc[:, 32] + sc[:, 33]) / 2 if policy != "patience" else torch.tensor([1.0, 1.0, 2.0])
    eager = DynamicEngine(net, policy, th, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may fall back to eager on these networks
        fast = DynamicEngine(net, policy, th, optimize=True, **opts)
        ref, got = eager(x), fast(x)
        ones = [fast(x[i:i + 1]) for i in range(8)]  # batch 1 and other sizes through one trace
        static = fast.static(x)
    assert all(fast.optimized.traced().values()) and len(fast.optimized.traced()) >= net.num_exits
    for field in ("prediction", "exit", "depth", "macs"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
        assert torch.equal(torch.cat([getattr(o, field) for o in ones]), getattr(ref, field)[:8]), field
    if policy != "patience":
        assert 0 < (ref.depth < net.num_exits - 1).sum() < 64  # the comparison is not trivial
    with torch.no_grad():
        assert torch.allclose(static, net.backbone(x), rtol=1e-4, atol=1e-4)


class BakesBatchSize(nn.Module):
    """Traces, but bakes the batch size into the graph (``len(x)`` is a Python int)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + len(x)


def test_a_piece_that_does_not_trace_faithfully_stays_eager():
    torch.manual_seed(0)
    model = nn.Sequential(BakesBatchSize(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    net = eenn.attach_exits(model, at=["1"], input_shape=(1, 8, 8), leaf_modules=[BakesBatchSize]).eval()
    x = torch.randn(16, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="segment 0 .*stays eager.*differ"):
        res = DynamicEngine(net, "max_prob", [0.5], optimize=True)(x)
    ref = DynamicEngine(net, "max_prob", [0.5])(x)
    assert torch.equal(res.prediction, ref.prediction) and torch.equal(res.exit, ref.exit)
    assert DynamicEngine(net, "max_prob", [0.5], optimize=True).optimized is not None


def test_optimizing_needs_eval_mode():
    net = spread_net().train()
    with pytest.raises(RuntimeError, match="eval mode"):
        OptimizedSegments(net)


def test_cpu_allocator_tuning_is_idempotent():
    import platform

    first = tune_cpu_allocator()
    assert tune_cpu_allocator() is first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True


def test_serial_torch_keeps_pytorch_off_its_thread_pool_on_this_thread_only():
    """Inside the block PyTorch's CPU ops on this thread run serially (the count PyTorch's
    parallel loops read is 1), another thread keeps the process-wide count, answers are the
    same, and the count comes back afterwards, also after an error and when nested."""
    import threading

    from eenn.inference import _openmp, serial_torch

    before = torch.get_num_threads()
    x = torch.randn(512, 64)
    ref = torch.softmax(x, 1)
    seen = {}

    def other():
        seen["other"] = torch.get_num_threads()

    with serial_torch():
        inside = torch.get_num_threads()
        t = threading.Thread(target=other)
        t.start()
        t.join()
        torch.testing.assert_close(torch.softmax(x, 1), ref, rtol=0, atol=0)
        with serial_torch():
            pass
        nested_after = torch.get_num_threads()
    assert torch.get_num_threads() == before and seen["other"] == before
    with pytest.raises(KeyError):
        with serial_torch():
            raise KeyError("boom")
    assert torch.get_num_threads() == before
    if _openmp() is not None:  # PyTorch on OpenMP (Linux wheels): the block takes effect
        assert inside == 1 and nested_after == 1
    else:  # nothing to switch: the block changes nothing
        assert inside == before
