"""The dynamic engine makes, sample for sample, the decision the offline simulation makes on
cached outputs -- for every policy -- while really skipping computation."""
import pytest
import torch

import eenn
from _helpers import spread_net as _net
from eenn.engine import DynamicEngine
from eenn.outputs import CachedOutputs
from eenn.objectives.ztw import GeometricEnsemble
from eenn.policies import calibrate, decide



CASES = [
    ("max_prob", "linear", {}, {}),
    ("entropy", "linear", {}, {}),
    ("margin", "linear", {}, {}),
    ("patience", "linear", {}, {}),
    ("gate", "branching", {}, {}),
    ("cumulative", "branching", {}, {}),
    ("ensemble", "linear", {}, {"weights": torch.tensor([0.1, 0.2, 0.3, 0.4])}),
    ("ensemble", "linear", {}, {"ensemble": GeometricEnsemble(4, 10)}),
    ("max_prob", "sdn", {"head_options": {"cascade": True}}, {}),
]


@pytest.mark.parametrize("fallback", ["final", "most_confident"])
@pytest.mark.parametrize("policy, head, net_opts, opts", CASES, ids=lambda c: str(c)[:20])
def test_engine_equals_simulation(policy, head, net_opts, opts, fallback):
    net = _net(head, **net_opts)
    x = torch.randn(64, 1, 8, 8)
    out = net(x)
    cache = CachedOutputs(out.logits, out.gates, torch.zeros(64, dtype=torch.long))
    # thresholds at the per-exit median score: about half the samples leave at each exit
    scores = eenn.policies.policy_scores(policy, cache, **opts)
    th = scores.score[:-1].median(1).values
    if policy == "patience":
        th = torch.tensor([1.0, 1.0, 2.0])
    sim = decide(policy, cache, th, fallback=fallback, **opts)
    res = DynamicEngine(net, policy, th, fallback=fallback, **opts)(x)
    assert torch.equal(res.exit, sim.exit) and torch.equal(res.depth, sim.depth)
    assert torch.equal(res.prediction, sim.prediction)
    assert torch.allclose(res.macs, torch.tensor(net.cost().dynamic_macs, dtype=torch.float64)[sim.depth])
    if policy != "patience":  # random exits rarely agree, so patience keeps everyone here
        assert 0 < (res.depth < 3).sum() < 64  # some exit early, some do not
    # One sample at a time (the batch-1 path) and in micro-batches: the same answers. Other
    # batch sizes may pick other kernels (last-bit differences), so these thresholds sit
    # halfway between two samples' scores rather than on one.
    if policy != "patience":
        sc = scores.score[:-1].sort(1).values
        i = sc.shape[1] // 2
        th = (sc[:, i] + sc[:, i + 1]) / 2
    eng = DynamicEngine(net, policy, th, fallback=fallback, **opts)
    res = eng(x)
    ones = [eng(x[i:i + 1]) for i in range(16)]
    for field in ("prediction", "exit", "depth", "macs"):
        assert torch.equal(torch.cat([getattr(o, field) for o in ones]), getattr(res, field)[:16]), field
    micro = DynamicEngine(net, policy, th, fallback=fallback, micro_batch=7, **opts)(x)
    assert torch.equal(micro.prediction, res.prediction) and torch.equal(micro.exit, res.exit)
    assert torch.equal(micro.depth, res.depth)


def test_compaction_really_skips_work():
    net = _net()
    net.cost()  # measured once (at batch 1) before we start counting calls
    calls = []
    net.backbone.stages[-1].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.randn(32, 1, 8, 8)
    res = DynamicEngine(net, "max_prob", 0.0)(x)  # every sample fires at exit 0
    assert (res.exit == 0).all() and calls == []
    DynamicEngine(net, "max_prob", [0.0, 2.0, 2.0])(x)
    assert calls == []
    DynamicEngine(net, "max_prob", 2.0)(x)  # nobody fires: all reach the last stage, at full batch
    assert calls == [32]


def test_batch_make_up_does_not_change_answers():
    net = _net()
    x = torch.randn(40, 1, 8, 8)
    eng = DynamicEngine(net, "max_prob", [0.3, 0.5, 0.7])
    whole = eng(x)
    parts = [eng(x[i:i + 1]) for i in range(40)]
    assert torch.equal(whole.prediction, torch.cat([p.prediction for p in parts]))
    assert torch.equal(whole.exit, torch.cat([p.exit for p in parts]))


def test_engine_with_calibrated_thresholds_on_digits():
    data = eenn.load_dataset("digits")
    torch.manual_seed(0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[2, 5], width=0.5)
    eenn.fit(net, data, "joint", epochs=4, lr=0.1, progress=False)
    from eenn.outputs import collect_outputs

    val = collect_outputs(net, data.val)
    test = collect_outputs(net, data.test)
    policy = calibrate("max_prob", val, net.cost(), {"max_drop": 0.02})
    sim = decide(policy, test)
    x = next(iter(eenn.TensorLoader(data.test, len(data.test), mean=data.info.mean, std=data.info.std)))[0]
    res = DynamicEngine(net, policy)(x)
    assert torch.equal(res.prediction, sim.prediction) and torch.equal(res.exit, sim.exit)
    with pytest.raises(RuntimeError, match="eval mode"):
        eng = DynamicEngine(net, policy)
        net.train()
        eng(x)
