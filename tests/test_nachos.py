"""NACHOS: every loss term on a hand-computed example, the support set, the inference rule and a
short training run on digits."""
import math

import pytest
import torch

import eenn
import eenn.objectives.nachos as nachos_mod
from eenn.data.core import DataSplits
from eenn.network import ExitOutputs
from eenn.objectives import EpochContext
from eenn.objectives.nachos import (NACHOS, classification_loss, cumulative_exit, draw_support_set, macs_penalty,
                                    prior_loss, support_loss)
from eenn.functional import stick_breaking

L2, L43 = math.log(2), math.log(4 / 3)


@pytest.fixture(scope="module")
def digits():
    return eenn.load_dataset("digits", seed=0)


def small_net(head="nachos"):
    torch.manual_seed(0)
    opts = {"width": 4} if head == "nachos" else {}  # narrow NACHOS heads: cheap exits, fast tests
    return eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[2, 5], head=head,
                               head_options=opts, width=0.5)


def tiny_net(num_classes=2, exits=(2,)):
    """A network whose shape matches a hand example (the objective reads its MACs table)."""
    return eenn.create_network("resnet20", in_channels=1, num_classes=num_classes, input_size=8, exits=list(exits),
                               head="nachos", head_options={"width": 4}, width=0.5)


def ctx(net, data, epoch, seed=0):
    return EpochContext(epoch, 10, net, data.train, data.info.mean, data.info.std, torch.device("cpu"), seed)


# ------------------------------------------------------------------------------------------ terms
def test_classification_loss_by_hand():
    # exit 0: sample 0 logits [0, 0] (CE ln 2), sample 1 [ln 3, 0] with y = 0 (CE ln 4/3);
    # final:  sample 0 [0, ln 3] with y = 1 (CE ln 4/3), sample 1 [0, 0] (CE ln 2).
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]], [[0.0, math.log(3)], [0.0, 0.0]]])
    y = torch.tensor([1, 0])
    gates = torch.tensor([[0.25, 0.5], [1.0, 1.0]])  # pi: exit 0 [0.25, 0.5], final [0.75, 0.5]
    want = (0.25 * L2 + 0.5 * L43) / 2 + (0.75 * L43 + 0.5 * L2) / 2
    assert classification_loss(logits, y, stick_breaking(gates)).item() == pytest.approx(want, rel=1e-6)
    obj = NACHOS(mmax=None, prior_beta=0.0)
    obj.prepare(tiny_net())  # only for the MACs table; mmax=None keeps the penalty off
    out = obj(ExitOutputs(logits, gates), y)
    assert out["cls"].item() == pytest.approx(want, rel=1e-6) and out["loss"].item() == pytest.approx(want, rel=1e-6)


def test_prior_loss_by_hand_with_class_balancing_and_clip():
    # Three exits, four samples, two classes. Exit 0 is right on samples 0-2 and wrong on 3:
    # #pos = 3, #neg = 1 -> weights 4/6 and 4/2. Its confidences 0.9, 0 (clipped to 1e-4),
    # 1 (clipped to 1 - 1e-4), 0.2. Exit 1 is right everywhere (#neg = 0: weight 4/8 for the
    # positives) with confidence 0.5. The final exit (wrong everywhere) must not count.
    y = torch.tensor([0, 1, 0, 1])
    right, wrong = torch.tensor([5.0, 0.0]), torch.tensor([0.0, 5.0])
    pick = lambda ok: torch.stack([right if (t == 0) == o else wrong for t, o in zip(y.tolist(), ok)])  # noqa: E731
    logits = torch.stack([pick([1, 1, 1, 0]), pick([1, 1, 1, 1]), pick([0, 0, 0, 0])])
    gates = torch.tensor([[0.9, 0.0, 1.0, 0.2], [0.5] * 4, [1.0] * 4])
    exit0 = -(2 / 3) * (math.log(0.9) + math.log(1e-4) + math.log(1 - 1e-4)) - 2 * math.log(0.8)
    exit1 = -0.5 * 4 * math.log(0.5)
    assert prior_loss(logits, gates, y).item() == pytest.approx((exit0 + exit1) / 8, rel=1e-5)
    # prior_beta scales it inside the objective.
    obj = NACHOS(mmax=None, w_alpha=0.0, prior_beta=2.0)
    obj.prepare(tiny_net(exits=(2, 5)))
    assert obj(ExitOutputs(logits, gates), y)["loss"].item() == pytest.approx(2 * (exit0 + exit1) / 8, rel=1e-5)


def test_macs_penalty_closed_form_and_gradient():
    macs = torch.tensor([1.0, 2.0, 4.0])
    # sample 0: pi = [0.5, 0.25, 0.25] -> 2 MACs; sample 1: gates 0 -> final, 4 MACs; m = 3.
    gates = torch.tensor([[0.5, 0.0], [0.5, 0.0], [1.0, 1.0]], requires_grad=True)
    pen, m = macs_penalty(stick_breaking(gates), macs, 3.5)
    assert m.item() == pytest.approx(3.0) and pen.item() == 0.0  # below the ceiling
    assert macs_penalty(stick_breaking(gates), macs, 5.0)[0].item() == 0.0  # the full net fits
    assert macs_penalty(stick_breaking(gates), macs, None)[0].item() == 0.0
    pen, _ = macs_penalty(stick_breaking(gates), macs, 2.0)
    assert pen.item() == pytest.approx((3.0 - 2.0) / abs(4.0 - 2.0))
    pen.backward()
    # d/dg_0 (sample 1, g = 0) of sum_i pi_i MACs_i = MACs_0 - MACs_2 = -3; / batch 2 / |4 - 2|.
    assert gates.grad[0, 1].item() == pytest.approx(-0.75)
    assert gates.grad[:2].abs().sum() > 0  # the reference's .item() would give exactly zero here


def test_macs_penalty_trains_the_gates_through_the_objective():
    net = small_net()
    full = net.cost().macs[-1]
    obj = NACHOS(mmax=0.5 * full, w_alpha=0.0, prior_beta=0.0)  # the penalty alone
    obj.prepare(net)
    gates = torch.full((3, 4), 0.1).index_fill_(0, torch.tensor([2]), 1.0).requires_grad_()
    out = obj(ExitOutputs(torch.randn(3, 4, 10), gates), torch.zeros(4, dtype=torch.long))
    assert out["macs_penalty"] > 0 and out["macs"].item() > 0.5 * full
    out["loss"].backward()
    assert (gates.grad[:2] < 0).all()  # raising any early gate lowers the expected MACs


def test_support_loss_by_hand():
    a = torch.tensor([[0.8, 0.9], [0.3, 0.6]])  # A[class, exit]
    gates = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    want = ((0.8 - 0.5) ** 2 + (0.9 - 1) ** 2 + (0.3 - 0.5) ** 2 + (0.6 - 1) ** 2) / 4
    assert support_loss(gates, y, a).item() == pytest.approx(want, rel=1e-6)


def test_ablations_zero_the_right_weight():
    assert (NACHOS(1.0).w_beta, NACHOS(1.0).w_gamma) == (1.0, 1.0)
    assert (NACHOS(1.0, ablation="nopeak").w_beta, NACHOS(1.0, ablation="nopeak").w_gamma) == (1.0, 0.0)
    assert (NACHOS(1.0, ablation="noconstraints").w_beta, NACHOS(1.0, ablation="noconstraints").w_gamma) == (0.0, 1.0)
    with pytest.raises(ValueError, match="unknown ablation"):
        NACHOS(1.0, ablation="nothing")
    assert eenn.create_objective("nachos", mmax=1e5, ablation="nopeak").w_gamma == 0.0
    with pytest.raises(ValueError, match="needs mmax"):
        eenn.create_objective("nachos")


def test_gates_are_required():
    with pytest.raises(ValueError, match="head='nachos'"):
        NACHOS(mmax=None).prepare(small_net(head="linear"))
    with pytest.raises(ValueError, match="gates"):
        NACHOS(mmax=None)(ExitOutputs(torch.randn(3, 2, 10), None), torch.zeros(2, dtype=torch.long))


def test_mmax_out_of_range_warns():
    net = small_net()
    macs = net.cost().macs
    with pytest.warns(UserWarning, match="never binds"):
        NACHOS(mmax=macs[-1]).prepare(net)
    with pytest.warns(UserWarning, match="not millions"):
        NACHOS(mmax=2.7).prepare(net)


def test_cumulative_exit_table():
    # columns: pi = [0.8, 0.06, 0.14] (s_1 = 0.86); [0.2, 0.4, 0.4]; [0.1, 0.09, 0.81]; [0.5, 0, 0.5]
    gates = torch.tensor([[0.8, 0.2, 0.1, 0.5], [0.3, 0.5, 0.1, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert cumulative_exit(gates, 0.5).tolist() == [0, 1, 2, 0]  # s >= eps, equality included
    assert cumulative_exit(gates, [0.9, 0.5]).tolist() == [1, 1, 2, 1]
    assert cumulative_exit(gates, torch.tensor([0.9, 0.85, 2.0])).tolist() == [1, 2, 2, 2]  # none fires -> final
    with pytest.raises(ValueError, match="thresholds"):
        cumulative_exit(gates, [0.1, 0.2, 0.3, 0.4])


# ------------------------------------------------------------------------------------ support set
def test_support_set_is_balanced_sized_and_seeded(digits):
    net = small_net()
    obj = NACHOS(mmax=None, support_set=True, support_fraction=0.1)
    obj.prepare(net)
    net.train()
    net.backbone.eval()  # a frozen part in eval mode must stay so
    idx = obj.begin_epoch(ctx(net, digits, 3))
    assert len(idx) == round(0.1 * len(digits.train)) and len(set(idx.tolist())) == len(idx)
    counts = torch.bincount(digits.train.y[idx], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(idx, obj.begin_epoch(ctx(net, digits, 3)))  # same (seed, epoch)
    assert not torch.equal(idx, obj.begin_epoch(ctx(net, digits, 4)))  # another epoch
    other_seed = ctx(net, digits, 3, seed=1).generator(nachos_mod._SUPPORT_STREAM)
    assert not torch.equal(idx, draw_support_set(digits.train.y, 0.1, other_seed))  # another seed
    assert net.training and not net.backbone.training and net.heads[0].training
    assert obj.accuracy.shape == (10, 3) and 0 <= obj.accuracy.min() and obj.accuracy.max() <= 1
    # A by hand for one class and exit.
    obj.begin_epoch(ctx(net, digits, 3))
    sup = digits.train.subset(idx)
    net.eval()
    with torch.no_grad():
        logits = net(ctx(net, digits, 3).normalise(sup.x)).logits
    k = sup.y == 7
    assert obj.accuracy[7, 1].item() == pytest.approx((logits[1, k].argmax(-1) == 7).float().mean().item())


class _Recorder(NACHOS):
    """Test only: records the support set of each epoch and the samples each epoch trained on."""

    needs_indices = True

    def begin_epoch(self, ctx):
        held = super().begin_epoch(ctx)
        self.held.append(held)
        self.seen.append([])
        return held

    def forward(self, outputs, targets, indices=None):
        self.seen[-1].append(indices.cpu())
        return super().forward(outputs, targets)


def test_trainer_holds_the_support_set_out_after_warmup(digits):
    small = DataSplits(digits.train.subset(torch.arange(300)), digits.val, digits.test, digits.info)
    obj = _Recorder(mmax=None, support_set=True, support_warmup=1)
    obj.held, obj.seen = [], []
    hist = eenn.fit(small_net(), small, obj, epochs=2, lr=0.01, batch_size=64, progress=False)
    assert obj.held[0] is None and sorted(torch.cat(obj.seen[0]).tolist()) == list(range(300))
    assert hist[0]["train_sup"] == 0.0 and hist[1]["train_sup"] > 0
    held = set(obj.held[1].tolist())
    assert len(held) == 30
    assert sorted(torch.cat(obj.seen[1]).tolist()) == sorted(set(range(300)) - held)


def test_freeze_backbone_trains_only_the_exits(digits):
    small = DataSplits(digits.train.subset(torch.arange(200)), digits.val, digits.test, digits.info)
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    eenn.fit(net, small, NACHOS(mmax=None, freeze_backbone=True), epochs=1, lr=0.05, batch_size=64, progress=False)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))  # BN stats too
    assert not torch.equal(before["heads.0.classifier.weight"], after["heads.0.classifier.weight"])


# --------------------------------------------------------------------------------------- training
def test_nachos_trains_and_the_constraint_lowers_expected_macs(digits):
    full = small_net().cost().macs[-1]
    runs = {}
    for ablation in (None, "noconstraints"):
        obj = NACHOS(mmax=0.5 * full, support_set=True, ablation=ablation)
        runs[ablation] = eenn.fit(small_net(), digits, obj, epochs=3, lr=0.05, batch_size=64, progress=False)
    hist = runs[None]
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    assert hist[-1]["val_acc"][-1] > 0.5  # chance is 0.1
    assert hist[0]["train_macs_penalty"] > 0  # the ceiling is active
    # The penalty pulls the expected cost down; without it the same run spends far more (seeds
    # 0-2 measured: 0.56-0.66 of the unconstrained cost after 3 epochs).
    assert hist[-1]["train_macs"] < 0.8 * runs["noconstraints"][-1]["train_macs"]


def _pooled(net):
    """Each head's max-pool kernel (1: none)."""
    return [h.body[0].kernel_size if isinstance(h.body[0], torch.nn.MaxPool2d) else 1 for h in net.heads]


def test_adaptive_pool_is_nachos_rule_on_the_cost_table(tmp_path):
    """pool="adaptive" (NACHOS' get_intermediate_classifiers_adaptive): each exit's kernel is the
    first of 1, 2, 4 under which the exit costs less than the next one (net.cost()'s MACs), or 4
    where none does; checked against networks built with the kernels given by hand."""
    def build(pool):
        torch.manual_seed(0)
        return eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=28, exits="all",
                                   head="nachos", head_options=pool)

    net = build({"pool": "adaptive"})
    kernels = _pooled(net)
    assert net.head_options[0]["pool"] == "adaptive"  # stored as given, resolved again when loaded
    assert set(kernels) == {2, 4} and len(set(kernels)) > 1  # ResNet-20's maps: 16-64 channels, top kernel 4
    macs = net.cost().macs
    for k, kernel in enumerate(kernels):
        assert macs[k] < macs[k + 1] or kernel == 4
        if kernel > 1:  # half the kernel would not have been enough
            by_hand = build([{"pool": kernel // 2 if j == k else kk} for j, kk in enumerate(kernels)])
            assert by_hand.cost().macs[k] >= macs[k + 1]
    eenn.save(net, tmp_path / "n.safetensors")
    back = eenn.load(tmp_path / "n.safetensors")
    assert _pooled(back) == kernels
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(back.eval()(x).logits, net.eval()(x).logits)


def test_adaptive_pool_only_where_asked_and_not_on_a_lone_head():
    torch.manual_seed(0)
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=28, exits=[2, 5],
                              head="nachos", head_options=[{"pool": "adaptive"}, {"pool": 3}])
    assert _pooled(net)[1] == 3 and _pooled(net)[0] in (1, 2, 4)
    with pytest.raises(ValueError, match="resolved by the network"):
        eenn.create_head("nachos", (16, 28, 28), 10, pool="adaptive")
    with pytest.raises(ValueError, match="int kernel, None or 'adaptive', got 'max'"):
        eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=28, exits=[2], head="nachos",
                            head_options={"pool": "max"})
