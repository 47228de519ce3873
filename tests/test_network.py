"""MultiExitNetwork over every registered backbone: shapes, equality with the plain backbone,
cost accounting, gradients, placement."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eenn
from eenn.cost import count_macs, count_params, profile_stages

SIZES = [(1, 8), (1, 28), (3, 32)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", eenn.list_backbones())
def test_every_backbone_as_multi_exit(name, size):
    c, hw = size
    bb = eenn.create_backbone(name, in_channels=c, num_classes=7, input_size=hw)
    net = eenn.MultiExitNetwork(bb, exits="all")
    E = bb.num_stages
    assert net.num_exits == E
    x = torch.randn(2, c, hw, hw)

    # shapes and every parameter reached by a joint loss (train mode, BatchNorm included)
    net.train()
    out = net(x)
    assert out.logits.shape == (E, 2, 7) and out.gates is None
    loss = sum(F.cross_entropy(lg, torch.tensor([0, 1])) for lg in out.logits)
    loss.backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"

    # the final exit is exactly the plain backbone
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x).logits[-1], bb(x))

    # costs: strictly increasing along the exits; the last is the whole backbone + classifier
    cost = net.cost()
    assert all(a < b for a, b in zip(cost.macs, cost.macs[1:])), cost.macs
    assert all(a < b for a, b in zip(cost.dynamic_macs, cost.dynamic_macs[1:]))
    assert cost.macs[-1] == count_macs(bb, torch.zeros(1, c, hw, hw))
    assert cost.params[-1] == count_params([bb])
    assert cost.fraction[-1] == 1.0
    assert cost.total_params == count_params([net])


class Tiny(eenn.Backbone):
    """Three convolutions on 8x8 grey images; every cost below is counted by hand."""

    def __init__(self):
        super().__init__(
            [nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)],
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)),
            input_shape=(1, 8, 8),
        )


def test_cost_matches_hand_count():
    net = eenn.MultiExitNetwork(Tiny(), exits=[0, 1], head="linear")
    cost = net.cost()
    conv0, conv1, conv2 = 4 * 1 * 9 * 64, 8 * 4 * 9 * 16, 8 * 8 * 9 * 16  # Cout*Cin*k*k*Hout*Wout
    head0, head1, cls = 4 * 10, 8 * 10, 8 * 10
    assert cost.head_macs == (head0, head1, cls)
    assert cost.macs == (conv0 + head0, conv0 + conv1 + head1, conv0 + conv1 + conv2 + cls)
    assert cost.dynamic_macs == (conv0 + head0, conv0 + conv1 + head0 + head1, conv0 + conv1 + conv2 + head0 + head1 + cls)
    p0, p1, p2 = 4 * 9 + 4, 8 * 4 * 9 + 8, 8 * 8 * 9 + 8
    ph0, ph1, pc = 4 * 10 + 10, 8 * 10 + 10, 8 * 10 + 10
    assert cost.params == (p0 + ph0, p0 + p1 + ph1, p0 + p1 + p2 + pc)
    assert cost.total_params == p0 + p1 + p2 + ph0 + ph1 + pc
    assert cost.fraction[0] == pytest.approx((conv0 + head0) / cost.macs[-1])
    assert cost.expected_macs([0.5, 0.25, 0.25]) == pytest.approx(
        0.5 * cost.dynamic_macs[0] + 0.25 * cost.dynamic_macs[1] + 0.25 * cost.dynamic_macs[2]
    )
    table = str(cost)
    assert "exit0@stage0" in table and "final" in table and "100.0%" in table


def test_segments_compose_to_forward():
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 4], head="branching").eval()
    x = torch.randn(5, 1, 8, 8)
    full = net(x)
    state, logits, gates = x, [], []
    for k in range(net.num_exits):
        state, lg, g = net.forward_segment(k, state)
        logits.append(lg)
        gates.append(g)
    assert torch.equal(torch.stack(logits), full.logits)
    assert torch.equal(torch.stack(gates), full.gates)
    assert full.gates.shape == (3, 5) and (full.gates[-1] == 1).all()
    assert ((full.gates >= 0) & (full.gates <= 1)).all()
    # running a segment on a subset of the batch gives those samples' rows (eval-mode BN)
    s1, _, _ = net.forward_segment(0, x)
    _, lg_sub, _ = net.forward_segment(1, s1[[0, 3]])
    assert torch.allclose(lg_sub, full.logits[1, [0, 3]], atol=1e-6)


def test_placement_by_cost_distribution():
    bb = eenn.create_backbone("resnet110", in_channels=3, num_classes=10, input_size=32)
    stage_macs, cls = profile_stages(bb.stages, bb.classifier, bb.input_shape)
    total = sum(stage_macs) + cls
    cum = torch.tensor(stage_macs).cumsum(0).tolist()
    for dist in ("linear", "golden", "pareto", "fine"):
        fr = eenn.network.cost_thresholds(dist, 3)
        stages = eenn.place_exits({"distribution": dist, "num_exits": 3}, bb)
        assert stages == eenn.place_exits(f"{dist}:3", bb)
        for f, s in zip(fr, stages):
            # the exit sits after the first stage whose cumulative cost reaches the threshold
            assert cum[s] >= f * total and (s == 0 or cum[s - 1] < f * total), (dist, stages)
    assert eenn.network.cost_thresholds("linear", 3) == [0.25, 0.5, 0.75]
    assert eenn.network.cost_thresholds("pareto", 2) == pytest.approx([0.2, 0.36])
    assert eenn.network.cost_thresholds("fine", 1) == pytest.approx([0.05])
    assert eenn.network.cost_thresholds("golden", 2) == pytest.approx([0.381966, 0.618034], abs=1e-6)


def test_colliding_thresholds_move_to_the_next_stage():
    # resnet20's first stage alone holds ~12% of the cost: both 'fine' thresholds (5%, 9.75%) fall in it
    bb = eenn.create_backbone("resnet20", in_channels=1, num_classes=10, input_size=28)
    assert eenn.place_exits("fine:2", bb) == [0, 1]


@pytest.mark.parametrize(
    "spec, message",
    [
        ([8], "valid stages are 0..7"),
        ([1, 1], "distinct"),
        ("fine:20", "cannot place 20 exits"),
        ("nope:2", "unknown exit distribution"),
        ("sometimes", "not understood"),
        (["block9.9"], "no stage named"),
        ({"distribution": "fine"}, "num_exits"),
    ],
)
def test_bad_placement_is_explained(spec, message):
    bb = eenn.create_backbone("resnet20", in_channels=1, num_classes=10, input_size=8)
    with pytest.raises(ValueError, match=message):
        eenn.MultiExitNetwork(bb, exits=spec)


def test_placement_by_name_and_negative_index():
    bb = eenn.create_backbone("resnet20", in_channels=1, num_classes=10, input_size=8)
    names = [s.name for s in bb.stage_info]
    net = eenn.MultiExitNetwork(bb, exits=[names[2], -3])
    assert net.exit_stages == [2, bb.num_stages - 3]
    assert eenn.MultiExitNetwork(bb, exits="none").num_exits == 1


def test_per_exit_heads_and_options():
    net = eenn.create_network(
        "vgg11", in_channels=3, num_classes=10, input_size=32, exits=[1, 3],
        head=["conv", "sdn"], head_options=[{"width": 16}, {"width": 32}],
    )
    assert net.head_names == ["conv", "sdn"]
    assert net(torch.randn(2, 3, 32, 32)).logits.shape == (3, 2, 10)
    with pytest.raises(ValueError, match="2 exits"):
        eenn.create_network("vgg11", in_channels=3, num_classes=10, input_size=32, exits=[1, 3], head=["conv"])


def test_forward_selected_exits_skips_the_rest():
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 4], head="branching").eval()
    x = torch.randn(3, 1, 8, 8)
    full = net(x)
    only_final = net(x, exits=[-1])
    assert only_final.logits.shape == (1, 3, 10) and torch.equal(only_final.logits[0], full.logits[-1])
    first_two = net(x, exits=[1, 0])
    assert torch.equal(first_two.logits, full.logits[:2]) and torch.equal(first_two.gates, full.gates[:2])
    # heads that are not asked for do not run: their parameters get no gradient
    net.train()
    net(x, exits=[-1]).logits.sum().backward()
    assert all(p.grad is None for p in net.heads.parameters())


def test_cascading_heads_read_the_previous_exit_detached():
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 3, 5],
                              head="sdn", head_options={"cascade": True}).eval()
    assert [h.cascades for h in net.heads] == [False, True, True] and net.cascades
    x = torch.randn(4, 1, 8, 8)
    full = net(x)
    assert torch.equal(net(x, exits=[2]).logits[0], full.logits[2])
    state, prev = x, None
    for k in range(net.num_exits):
        state, lg, _ = net.forward_segment(k, state, prev)
        assert torch.equal(lg, full.logits[k])
        prev = lg
    # the cascade input is detached: exit 1's loss leaves exit 0's head untouched
    net.train()
    net(x).logits[1].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in net.heads[0].parameters())
    assert net.heads[1].classifier.weight.grad.any()


def test_truncate_removes_later_layers_and_exits(tmp_path):
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 3, 5]).eval()
    small = net.truncate(1)
    assert small.num_exits == 2 and small.backbone.num_stages == 4
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(small(x).logits, net(x).logits[:2])
    assert small.cost().macs == net.cost().macs[:2]
    assert small.cost().total_params < net.cost().total_params
    assert count_params([small]) == small.cost().total_params
    path = eenn.save(small, tmp_path / "small.safetensors")
    back = eenn.load(path).eval()
    assert back.truncated_at == 1 and torch.equal(back(x).logits, small(x).logits)
    assert net.truncate(-1) is net


# ------------------------------------------------------------------------ input description
def _tiny(c=1, hw=8):
    torch.manual_seed(0)
    return eenn.create_network("lenet5", in_channels=c, num_classes=10, input_size=hw, exits=[1], width=0.5)


def test_entry_points_refuse_a_network_without_input_spec():
    from eenn.data import TensorDataset
    from eenn.outputs import collect_outputs, evaluate_exits
    from eenn.prune import aep_prune

    net = _tiny()
    assert net.input_spec is None and "input_spec" not in net.config
    ds = TensorDataset(torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8), torch.arange(6) % 10)
    fix = r"net\.input_spec = eenn\.InputSpec\.from_info\(data\.info\).*eenn\.fit"
    with pytest.raises(ValueError, match="collect_outputs.*" + fix):
        collect_outputs(net, ds)
    with pytest.raises(ValueError, match="evaluate_exits.*" + fix):
        evaluate_exits(net, ds)
    with pytest.raises(ValueError, match="aep_prune.*" + fix):
        aep_prune(net, [0.5, 0.5], ds, latency_batch_size=None)
    with pytest.raises(ValueError, match="preprocess.*" + fix):
        net.preprocess(ds.x)
    net.input_spec = eenn.InputSpec((1, 8, 8), (0.5,), (0.25,))
    cache = collect_outputs(net, ds)
    with torch.no_grad():
        assert torch.equal(cache.logits, net.eval()(net.preprocess(ds.x)).logits)


def test_preprocess_passes_float_inputs_through():
    net = _tiny()
    x = torch.randn(3, 1, 8, 8)
    assert net.preprocess(x) is x  # no spec needed: a float tensor is a model input already
    net.input_spec = eenn.InputSpec((1, 8, 8), (0.5,), (0.25,))
    assert net.preprocess(x) is x and net.preprocess(x.double()).dtype == torch.float64
    px = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    assert torch.equal(net.preprocess(px), torch.full((2, 1, 8, 8), 2.0))  # (1 - 0.5) / 0.25


def test_input_spec_survives_save_and_load(tmp_path):
    from eenn.checkpoint import save

    net = _tiny(c=3, hw=8)
    spec = eenn.InputSpec((3, 8, 8), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7), ("a",) * 10)
    net.input_spec = spec
    back = eenn.load(eenn.save(net, tmp_path / "n.safetensors"))
    assert back.input_spec == spec and back.input_spec.class_names == spec.class_names
    small = net.truncate(0)
    assert small.input_spec == spec and small.config["input_spec"] == spec.to_dict()
    back = eenn.load(eenn.save(small, tmp_path / "small.safetensors"))
    assert back.truncated_at == 0 and back.input_spec == spec
    # a checkpoint from before networks carried it: None, or what a trainer wrote beside it
    net.input_spec = None
    assert eenn.load(eenn.save(net, tmp_path / "old.safetensors")).input_spec is None
    old = {"name": "x", "num_classes": 10, "in_channels": 3, "input_size": [8, 8], "mean": list(spec.mean),
           "std": list(spec.std), "class_names": list(spec.class_names)}
    assert eenn.load(save(net, tmp_path / "trainer.safetensors", extra={"data": old})).input_spec == spec


def test_fit_sets_the_input_spec_and_refuses_other_statistics():
    data = eenn.load_dataset("synthetic", num_samples=100)
    net = _tiny()
    eenn.fit(net, data, "joint", epochs=1, batch_size=32, progress=False)
    assert net.input_spec == eenn.InputSpec.from_info(data.info) and net.input_spec.class_names[0] == "class_0"
    eenn.fit(net, data, "joint", epochs=1, batch_size=32, progress=False)  # the same data: fine
    other = eenn.load_dataset("synthetic", num_samples=100, seed=1)
    assert other.info.mean != data.info.mean
    with pytest.raises(ValueError, match="input description.*set net.input_spec = None"):
        eenn.fit(net, other, "joint", epochs=1, batch_size=32, progress=False)
    assert net.input_spec == eenn.InputSpec.from_info(data.info)


def test_create_network_names_bad_arguments_and_options():
    kw = dict(in_channels=1, num_classes=10, input_size=8)
    with pytest.raises(TypeError, match="backbone 'mlp': option 'width' must be a number, got 'abc' .str."):
        eenn.create_network("mlp", **kw, width="abc")
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got '10'"):
        eenn.create_network("mlp", **{**kw, "num_classes": "10"})
    with pytest.raises(ValueError, match="exit head 'linear': option 'width' must be >= 1"):
        eenn.create_network("mlp", **kw, head_options={"width": -3})


@pytest.mark.parametrize("options, message", [
    ({"num_classes": -1}, "num_classes must be an int >= 2, got -1"),
    ({"input_size": (8, 0)}, r"input_size must be a positive int or \(height, width\), got \(8, 0\)"),
    ({"noise": float("nan")}, "noise must be a finite number >= 0"),
])
def test_synthetic_data_set_checks_its_arguments(options, message):
    # (here rather than in test_data.py, which this change was not to touch)
    with pytest.raises(ValueError, match="data set 'synthetic': " + message):
        eenn.load_dataset("synthetic", **options)
