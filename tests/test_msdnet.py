"""MSDNet: blocks are stages whose states are the scales in use (coarsest first); scales drop and
channels compress as configured; the costs count every classifier; it trains on digits; the
engine, the ONNX runner and a saved copy answer as the network does; MSDNet's budgeted thresholds
calibrate on it; bad options are refused in one line."""
import numpy as np
import pytest
import torch
from torch import nn

import eenn
from _helpers import gap_thresholds
from eenn.backbones import default_head
from eenn.backbones.msdnet import DenseLayer, ScaleGrowth, Transition, scale_plan
from eenn.cost import count_macs
from eenn.engine import DynamicEngine
from eenn.outputs import CachedOutputs, collect_outputs
from eenn.policies import calibrate, decide, msdnet_distribution, policy_scores

# 5 blocks of 2, 1, 1, 1, 1 layers on 3 scales of 8x8 digits (8, 4, 2 px): 6 layers, a scale
# dropped every ceil(6 / 3) = 2 layers ("max"), units 4 + 2 per layer.
TINY = dict(blocks=5, base=2, step=1, channels=4, growth=2, classifier_width=16)
# Per block, the state's (C, H, W), coarsest first; units * gr_factor (1, 2, 4) channels per scale:
# 8 units; 10 -> transition 5 (scale 0 dropped); 7; 9 -> 4 (scale 1 dropped); 6.
TINY_STATES = [
    [(32, 2, 2), (16, 4, 4), (8, 8, 8)],
    [(20, 2, 2), (10, 4, 4)],
    [(28, 2, 2), (14, 4, 4)],
    [(16, 2, 2)],
    [(24, 2, 2)],
]


def _tiny(head="msdnet", head_options=None, **opts):
    torch.manual_seed(0)
    return eenn.create_network("msdnet", in_channels=1, num_classes=10, input_size=8, exits="all", head=head,
                               head_options={"width": 16, **(head_options or {})}, **{**TINY, **opts})


def _states(net, x):
    out, state = [], x
    for stage in net.backbone.stages:
        state = stage(state)
        out.append([tuple(t.shape[1:]) for t in state])
    return out


def _spread(net):
    """Random BatchNorm statistics, so that the untrained exits disagree and are unsure in
    interesting ways (as _helpers.spread_net does for the other backbones); eval mode."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


# --- structure ------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, scales, prune, plan", [
    (6, 3, "max", [(3, 3), (3, 3), (3, 2), (2, 2), (2, 1), (1, 1)]),
    (10, 3, "max", [(3, 3)] * 4 + [(3, 2), (2, 2), (2, 2), (2, 2), (2, 1), (1, 1)]),
    (6, 3, "min", [(3, 3)] * 4 + [(3, 2), (2, 1)]),
    (2, 3, "min", [(3, 2), (2, 1)]),
    (3, 1, "max", [(1, 1)] * 3),
    (6, 4, "max", [(4, 4), (4, 4), (4, 3), (3, 3), (3, 2), (2, 1)]),  # the last layer: the coarsest alone
])
def test_scale_plan(layers, scales, prune, plan):
    assert scale_plan(layers, scales, prune) == plan


def test_blocks_are_stages_of_scales_coarsest_first():
    net = _tiny().eval()
    bb = net.backbone
    assert bb.num_stages == 5 and net.num_exits == 5 and net.exit_stages == [0, 1, 2, 3]
    assert [i.name for i in bb.stage_info] == [f"block{b}" for b in range(5)]
    assert net.head_names == ["msdnet"] * 4 and default_head(bb.spec["name"]) == "msdnet"
    with torch.no_grad():
        assert _states(net, torch.randn(2, 1, 8, 8)) == TINY_STATES
    assert [i.shape for i in bb.stage_info] == [s[0] for s in TINY_STATES]  # the heads read the coarsest
    # the layers: 2 dense layers in block 0; a dense layer and a transition where a scale drops
    kinds = [[type(m).__name__ for m in stage.layers] for stage in bb.stages]
    assert kinds == [["DenseLayer"] * 2, ["DenseLayer", "Transition"], ["DenseLayer"], ["DenseLayer", "Transition"],
                     ["DenseLayer"]]
    # every scale but the finest in use also grows from the next finer one (stride 2), half and half
    grows = [g for g in bb.stages[0].layers[0].scales]
    assert [g.down is None for g in grows] == [True, False, False]
    assert [g.same[-1][0].out_channels for g in grows] == [2, 2, 4] and grows[2].down[-1][0].stride == (2, 2)
    # the default network: 4 blocks (4, 2, 2, 2 layers), 3 scales of 28, 14, 7 px
    big = eenn.create_network("msdnet", in_channels=1, num_classes=10, input_size=28, exits="all", head="msdnet")
    assert big.num_exits == 4 and [len(s.layers) for s in big.backbone.stages] == [4, 3, 2, 3]
    assert [i.shape for i in big.backbone.stage_info] == [(160, 7, 7), (116, 7, 7), (164, 7, 7), (116, 7, 7)]
    assert big.cost().macs[-1] == 23_114_000 and big.cost().dynamic_macs[-1] == 32_997_392
    assert big.cost().params[-1] == 533_334 and big.cost().total_params == 1_487_988


def test_options_change_the_structure_as_said():
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        # "min": every scale until the last two layers; transitions after layers 2 and 4 (of 6)
        net = _tiny(prune="min").eval()
        assert _states(net, x) == [[(16, 2, 2), (8, 4, 4), (4, 8, 8)], [(24, 2, 2), (12, 4, 4), (6, 8, 8)],
                                   [(16, 2, 2), (8, 4, 4), (4, 8, 8)], [(24, 2, 2), (12, 4, 4)], [(32, 2, 2)]]
        # no transitions: 4 + 2 units a layer throughout
        net = _tiny(reduction=0.0).eval()
        assert [s[0][0] for s in _states(net, x)] == [4 * u for u in (8, 10, 12, 14, 16)]
        assert not any(isinstance(m, Transition) for m in net.modules())
        # lin_grow: block b > 0 has step * b + 1 layers (2, 2, 3): 7 layers, 2 scales
        net = _tiny(blocks=3, step_mode="lin_grow", scales=2, gr_factor=[1, 3]).eval()
        assert [sum(isinstance(m, DenseLayer) for m in s.layers) for s in net.backbone.stages] == [2, 2, 3]
        assert [len(s) for s in _states(net, x)] == [2, 2, 1] and _states(net, x)[0][0] == (24, 4, 4)
    # four scales (factors 1, 2, 4, 4): the last layer makes the coarsest alone, nothing is grown for nothing
    net = _tiny(scales=4)
    assert [len(s) for s in _states(net.eval(), x)] == [4, 3, 3, 2, 1]
    net.train()(x).logits.sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    # bottlenecks: a 1x1 conv to at most bn_factor x the new channels before each 3x3; none without
    grow = _tiny().backbone.stages[1].layers[0].scales[0]
    assert isinstance(grow, ScaleGrowth) and grow.same[0][0].kernel_size == (1, 1)
    assert grow.same[0][0].out_channels == min(4 * 8, 2 * 2)  # 8 units at scale 1, bn_factor 2, 2 new channels
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                   for m in _tiny(bottleneck=False, reduction=0.0).modules())
    # width scales channels and growth: half of 8 and 4 is the tiny network
    with torch.no_grad():
        assert _states(_tiny(channels=8, growth=4, width=0.5).eval(), x) == TINY_STATES


def test_cost_grows_block_by_block_and_counts_every_classifier():
    net = _tiny().eval()
    cost = net.cost()
    assert all(a < b for a, b in zip(cost.backbone_macs, cost.backbone_macs[1:]))
    assert all(a < b for a, b in zip(cost.dynamic_macs, cost.dynamic_macs[1:]))
    # MSDNet's classifier on a C x 2 x 2 map: conv3x3/2 to 16 x 1 x 1, conv3x3/2 to 16 x 1 x 1, linear
    by_hand = [c * 16 * 9 + 16 * 16 * 9 + 16 * 10 for c in (32, 20, 28, 16, 24)]
    assert list(cost.head_macs) == by_hand
    assert [m - b for m, b in zip(cost.macs, cost.backbone_macs)] == by_hand
    assert cost.macs[-1] == count_macs(net.backbone, torch.zeros(1, 1, 8, 8))
    assert cost.dynamic_macs[-1] == cost.backbone_macs[-1] + sum(by_hand)
    linear = _tiny(head="linear", head_options={"width": None}).cost()
    assert linear.backbone_macs == cost.backbone_macs and linear.head_macs[:-1] == tuple(c * 10 for c in (32, 20, 28, 16))


# --- training, calibration, deployment ------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    data = eenn.load_dataset("digits")
    net = _tiny()
    history = eenn.fit(net, data, "joint", epochs=6, lr=0.05, batch_size=64, progress=False, seed=0)
    return net.eval(), data, history


def test_it_trains_and_every_exit_beats_chance(trained):
    net, data, history = trained
    assert history[-1]["train_loss"] < 0.2 * history[0]["train_loss"]
    test = collect_outputs(net, data.test)
    acc = (test.logits.argmax(-1) == test.targets[None]).double().mean(1)
    assert (acc > 0.8).all(), acc  # chance: 0.1


def test_msdnet_budgeted_thresholds_calibrate(trained):
    net, data, _ = trained
    val, test = collect_outputs(net, data.val), collect_outputs(net, data.test)
    policy = calibrate("max_prob", val, net.cost(), {"msdnet_q": 1.5})
    share = torch.bincount(decide(policy, val).exit, minlength=5).double() / len(val.targets)
    assert (share - msdnet_distribution(1.5, 5).double()).abs().max() < 0.05, share
    x = next(iter(eenn.TensorLoader(data.test, len(data.test), input_spec=net.input_spec)))[0]
    res = DynamicEngine(net, policy)(x)  # the engine takes the thresholds as they were fitted
    assert torch.equal(res.exit, decide(policy, test).exit)
    assert res.macs.mean() < net.cost().dynamic_macs[-1]


@pytest.mark.parametrize("policy, head_options", [("max_prob", {}), ("entropy", {}), ("gate", {"gate": True})])
def test_engine_equals_simulation(policy, head_options):
    net = _spread(_tiny(head_options=head_options))
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        out = net(x)
    cache = CachedOutputs(out.logits, out.gates, torch.zeros(64, dtype=torch.long))
    th = gap_thresholds(policy_scores(policy, cache).score[:-1])
    sim = decide(policy, cache, th)
    eng = DynamicEngine(net, policy, th)
    res = eng(x)
    assert torch.equal(res.exit, sim.exit) and torch.equal(res.prediction, sim.prediction)
    assert len(res.exit.unique()) >= 3  # the case exercises compaction: several exits answer
    assert torch.allclose(res.macs, torch.tensor(net.cost().dynamic_macs, dtype=torch.float64)[sim.depth])
    ones = [eng(x[i:i + 1]) for i in range(8)]  # the batch-1 path
    assert torch.equal(torch.cat([o.exit for o in ones]), res.exit[:8])


def test_onnx_runner_and_a_saved_copy_answer_as_the_network(tmp_path):
    net = _spread(_tiny())
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        out = net(x)
        th = gap_thresholds(policy_scores("max_prob", CachedOutputs(out.logits, None, torch.zeros(64, dtype=torch.long))).score[:-1])
    want = DynamicEngine(net, "max_prob", th)(x)
    m = eenn.export(net, tmp_path / "onnx", policy="max_prob", thresholds=th)
    # the scales in use cross each cut, a lone scale too (block 3 -> 4)
    assert [s["num_state_outputs"] for s in m["segments"]] == [3, 2, 2, 1, 0]
    assert m["segments"][0]["handoff_bytes_per_sample"] == 4 * sum(c * h * w for c, h, w in TINY_STATES[0])
    got = eenn.StagedRunner(tmp_path / "onnx")(x.numpy())
    for field in ("exit", "depth", "prediction"):
        assert np.array_equal(got[field], getattr(want, field).numpy()), field
    again = eenn.load(eenn.save(net, tmp_path / "m.safetensors")).eval()
    assert again.config["source"]["options"] == TINY and again.head_names == ["msdnet"] * 4
    with torch.no_grad():
        assert torch.equal(again(x).logits, out.logits)


def test_cli_trains_it(tmp_path):
    from eenn.cli import main

    out = tmp_path / "run"
    # no --head: MSDNet's networks get its classifier as their exit head, and the run's config names it
    assert main(["train", "--dataset", "digits", "--limit", "200", "--backbone", "msdnet",
                 "-B", "blocks=2", "-B", "channels=4", "-B", "growth=2", "-B", "classifier_width=8", "-H", "width=8",
                 "--epochs", "1", "--out", str(out), "--no-progress", "--no-report"]) == 0
    net = eenn.load(out / "best.safetensors")
    assert net.num_exits == 2 and net.head_names == ["msdnet"] and net.config["source"]["name"] == "msdnet"
    assert "head: msdnet" in (out / "config.yaml").read_text()


def test_its_default_exit_head_is_msdnets_classifier_and_another_can_be_named():
    tiny = dict(in_channels=1, num_classes=10, input_size=8, exits="all", **TINY)
    assert eenn.create_network("msdnet", **tiny).head_names == ["msdnet"] * 4
    assert eenn.create_network("msdnet", head="linear", **tiny).head_names == ["linear"] * 4
    assert eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[2]).head_names == ["linear"]
    from eenn.config import load_config

    assert load_config(None, ["model.backbone=msdnet"]).model.head == "msdnet"
    assert load_config(None, ["model.backbone=msdnet", "model.head=sdn"]).model.head == "sdn"
    assert load_config(None, []).model.head == "linear"  # the other families' configs are as before


# --- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"prune": "avg"}, "option 'prune' must be 'max' or 'min', got 'avg'"),
    ({"step_mode": "grow"}, "option 'step_mode' must be 'even' or 'lin_grow', got 'grow'"),
    ({"reduction": 1.5}, r"option 'reduction' must be in \[0, 1\]"),
    ({"growth": 1}, "option 'growth' must be an int >= 2, got 1"),
    ({"scales": 0}, "option 'scales' must be an int >= 1, got 0"),
    ({"blocks": 0}, "option 'blocks' must be an int >= 1, got 0"),
    ({"gr_factor": [1, 2]}, r"option 'gr_factor' must be one int >= 1 per scale \(3\), got \[1, 2\]"),
    ({"bn_factor": [1, 0, 4]}, "option 'bn_factor' must be one int >= 1 per scale"),
    ({"gr_factor": [1, 2.5, 4]}, "option 'gr_factor' must be a list of ints or None"),
    ({"width": 0.0}, "width must be positive"),
    ({"depth": 3}, "does not accept option.*'depth'.*it accepts"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as err:
        eenn.create_backbone("msdnet", in_channels=1, num_classes=10, input_size=8, **options)
    assert "\n" not in str(err.value)


def test_the_msdnet_head_needs_a_feature_map():
    with pytest.raises(ValueError, match="exit head 'msdnet' needs a .channels, height, width. feature map"):
        eenn.create_head("msdnet", (64,), 10)
    with pytest.raises(ValueError, match="exit head 'msdnet': option 'width' must be >= 1"):
        eenn.create_head("msdnet", (16, 4, 4), 10, width=0)
    head = eenn.create_head("msdnet", (16, 7, 7), 10, gate=True)
    logits, gate = head(torch.randn(3, 16, 7, 7))
    assert logits.shape == (3, 10) and gate.shape == (3,)
