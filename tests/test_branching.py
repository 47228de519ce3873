"""Differentiable branching (Scardapane et al. 2020): formulas on hand-computed examples, then
training on digits, including the user-facing claim that a larger lambda gives a cheaper network."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import eenn
from _helpers import gated_quick_check
from eenn.outputs import collect_outputs
import eenn.objectives.branching  # noqa: F401  (registers "branching")
from eenn.network import ExitOutputs, MultiExitNetwork
from eenn.objectives.branching import (Branching, balanced_bce, correctness_bce, exit_costs, hard_exit, init_gates,
                                      probs_nll, soft_cost, soft_output)
from eenn.functional import soft_conditional, soft_conditional_recursive, stick_breaking

# The paper's literal loss (what the formula tests below check term by term).
LITERAL = dict(exit_ce=0.0, gate_bce=0.0, gate_init="none")


class FakeNet:
    """Just what ``prepare`` reads: gates or not, and a cost table."""

    def __init__(self, macs, has_gates=True):
        self.has_gates, self.num_exits = has_gates, len(macs)
        self._cost = SimpleNamespace(macs=tuple(macs), dynamic_macs=tuple(m + 1 for m in macs))

    def cost(self):
        return self._cost


def small_net(head="branching"):
    torch.manual_seed(0)
    return eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[2, 5],
                               head=head, width=0.5)


def prepared(macs=(1, 2, 4), **options):
    obj = Branching(**{**LITERAL, **options})
    obj.prepare(FakeNet(macs))
    return obj


# ------------------------------------------------------------------------------ formulas
def test_soft_conditional_recursion_equals_stick_breaking():
    g = torch.rand(4, 5)
    g[-1] = 1.0
    values = torch.randn(4, 5, 3)
    # pi_b = g_b prod_{j<b} (1 - g_j), unrolled by hand for E = 4.
    pi = torch.stack([g[0], (1 - g[0]) * g[1], (1 - g[0]) * (1 - g[1]) * g[2], (1 - g[0]) * (1 - g[1]) * (1 - g[2])])
    assert torch.allclose(stick_breaking(g), pi)
    assert torch.allclose(pi.sum(0), torch.ones(5))
    levels = soft_conditional_recursive(values, g)
    assert torch.allclose(levels[0], soft_conditional(values, g), atol=1e-6)
    assert torch.allclose(levels[0], (pi[..., None] * values).sum(0), atol=1e-6)
    assert torch.equal(levels[-1], values[-1])


def test_cost_term_is_the_expected_cost_under_the_gates():
    # gamma = MACs / MACs of the full net = [1, 2, 4] / 4.
    obj = prepared((1, 2, 4), lam=0.0)
    assert obj.gamma.tolist() == [0.25, 0.5, 1.0]
    gates = torch.tensor([[0.5, 0.2], [0.5, 0.75], [1.0, 1.0]])
    # Sample A: pi = [0.5, 0.5*0.5, 0.5*0.5] -> 0.5*0.25 + 0.25*0.5 + 0.25*1 = 0.5
    # Sample B: pi = [0.2, 0.8*0.75, 0.8*0.25] -> 0.2*0.25 + 0.6*0.5 + 0.2*1 = 0.55
    assert soft_cost(gates, obj.gamma).tolist() == pytest.approx([0.5, 0.55])
    outputs = ExitOutputs(torch.randn(3, 2, 4), gates)
    y = torch.tensor([0, 3])
    base = obj(outputs, y)
    assert base["cost"].item() == pytest.approx(0.525)
    heavy = prepared((1, 2, 4), lam=0.1)(outputs, y)
    assert (heavy["loss"] - base["loss"]).item() == pytest.approx(0.1 * 0.525, abs=1e-6)
    assert heavy["ce"].item() == pytest.approx(base["ce"].item())


def test_probs_and_logits_mixing_give_the_documented_values():
    # Two exits, two classes, one sample of class 0: h_1 = [2, 0], h_2 = [0, 2], g_1 = 0.25.
    outputs = ExitOutputs(torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]]), torch.tensor([[0.25], [1.0]]))
    y = torch.tensor([0])
    s = 1 / (1 + math.exp(-2))  # softmax([2, 0])[0] = 0.8808
    # probs: f~ = 0.25 [s, 1-s] + 0.75 [1-s, s] = [0.3096, 0.6904]; loss = -log 0.3096 = 1.1725
    probs = prepared((1, 2), mix="probs")(outputs, y)["ce"].item()
    assert probs == pytest.approx(-math.log(0.25 * s + 0.75 * (1 - s)))
    assert probs == pytest.approx(1.1725, abs=1e-4)
    # logits: f~ = 0.25 [2, 0] + 0.75 [0, 2] = [0.5, 1.5]; loss = log(1 + e) = 1.3133
    logits = prepared((1, 2), mix="logits")(outputs, y)["ce"].item()
    assert logits == pytest.approx(math.log(1 + math.e))
    assert logits == pytest.approx(1.3133, abs=1e-4)
    assert soft_output(outputs, "probs")[0].tolist() == pytest.approx([0.3096, 0.6904], abs=1e-4)
    assert soft_output(outputs, "logits")[0].tolist() == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)])


def test_final_ce_adds_the_final_exits_cross_entropy():
    outputs = ExitOutputs(torch.randn(3, 5, 4), torch.cat([torch.rand(2, 5), torch.ones(1, 5)]))
    y = torch.randint(0, 4, (5,))
    plain = prepared(final_ce=False)(outputs, y)
    extra = prepared(final_ce=True)(outputs, y)
    ce_final = F.cross_entropy(outputs.logits[-1], y)
    assert extra["final_ce"].item() == pytest.approx(ce_final.item())
    assert (extra["loss"] - plain["loss"]).item() == pytest.approx(ce_final.item(), abs=1e-6)
    assert plain["exit_losses"].tolist() == pytest.approx([F.cross_entropy(h, y).item() for h in outputs.logits])


def test_label_smoothing_of_mixed_probabilities_matches_cross_entropy():
    h = torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    for eps in (0.0, 0.1, 0.3):
        assert probs_nll(h.softmax(-1), y, eps).item() == pytest.approx(
            F.cross_entropy(h, y, label_smoothing=eps).item(), abs=1e-5)
    # A first gate of 1 makes the mixture the first exit alone: the loss is its smoothed CE.
    outputs = ExitOutputs(torch.randn(2, 6, 5), torch.ones(2, 6))
    for mix in ("probs", "logits"):
        got = prepared((1, 2), mix=mix, label_smoothing=0.2)(outputs, y)["ce"].item()
        assert got == pytest.approx(F.cross_entropy(outputs.logits[0], y, label_smoothing=0.2).item(), abs=1e-5)


def test_hard_exit_from_a_gate_table():
    gates = torch.tensor([
        # sample: fires at 0 | at 1 | at threshold, not above | none fires
        [0.7, 0.2, 0.5, 0.1],
        [0.9, 0.6, 0.9, 0.3],
        [1.0, 1.0, 1.0, 1.0],
    ])
    assert hard_exit(gates).tolist() == [0, 1, 1, 2]
    assert hard_exit(gates, threshold=0.8).tolist() == [1, 2, 1, 2]
    assert hard_exit(gates, threshold=0.05).tolist() == [0, 0, 0, 0]


def test_prepare_reads_the_cost_table_of_a_real_network():
    net = small_net()
    obj = eenn.create_objective("branching", lam=0.5)
    obj.prepare(net)
    macs = net.cost().macs
    assert obj.gamma.tolist() == pytest.approx([m / macs[-1] for m in macs])
    assert obj.gamma.tolist() == pytest.approx(list(net.cost().fraction))
    dyn = net.cost().dynamic_macs
    assert exit_costs(net, "dynamic").tolist() == pytest.approx([m / dyn[-1] for m in dyn])


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="gated exit heads.*head='branching'"):
        Branching().prepare(small_net(head="linear"))
    with pytest.raises(ValueError, match="unknown mix 'soft'"):
        Branching(mix="soft")
    with pytest.raises(ValueError, match="lam .* >= 0, got -0.1"):
        Branching(lam=-0.1)
    with pytest.raises(ValueError, match="unknown cost 'flops'"):
        Branching(cost="flops")
    with pytest.raises(ValueError, match="label_smoothing"):
        Branching(label_smoothing=1.5)
    with pytest.raises(ValueError, match="exit_ce must be a finite number >= 0"):
        Branching(exit_ce=-1)
    with pytest.raises(ValueError, match="unknown gate_init 'zeros'"):
        Branching(gate_init="zeros")
    with pytest.raises(RuntimeError, match="prepare"):
        Branching()(ExitOutputs(torch.randn(2, 1, 3), torch.ones(2, 1)), torch.tensor([0]))
    with pytest.raises(ValueError, match="every exit must be computed"):
        prepared((1, 2, 4))(ExitOutputs(torch.randn(2, 1, 3), torch.ones(2, 1)), torch.tensor([0]))


# ------------------------------------------------------------- what keeps the exits alive
def test_uniform_gate_init_starts_the_mixture_uniform():
    net = small_net()  # 3 exits
    Branching().prepare(net)
    out = net.eval()(torch.randn(5, 1, 8, 8))
    pi = stick_breaking(out.gates)
    assert torch.allclose(pi, torch.full_like(pi, 1 / 3), atol=1e-6)
    # PyTorch's own init does not: g ~ 0.5 gives pi ~ [1/2, 1/4, 1/4]
    other = small_net()
    assert not torch.allclose(stick_breaking(other.eval()(torch.randn(5, 1, 8, 8)).gates), pi, atol=0.02)
    init_gates(other)
    assert torch.equal(other.heads[1].gate.bias, net.heads[1].gate.bias)  # logit(1/2) = 0 for the second of 3


def test_gate_supervision_is_class_balanced_bce_on_correctness():
    # Two early exits, four samples; exit 0 right on samples 0 and 1, exit 1 right on sample 0 only.
    y = torch.tensor([0, 1, 2, 3])
    logits = torch.full((3, 4, 4), -5.0)
    logits[0, 0, 0] = logits[0, 1, 1] = logits[0, 2, 0] = logits[0, 3, 0] = 5.0
    logits[1, 0, 0] = logits[1, 1, 0] = logits[1, 2, 0] = logits[1, 3, 0] = 5.0
    logits[2] = 0.0
    gates = torch.tensor([[0.9, 0.6, 0.3, 0.2], [0.7, 0.4, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]])
    t0, t1 = torch.tensor([1.0, 1, 0, 0]), torch.tensor([1.0, 0, 0, 0])

    def by_hand(g, t):  # positives weighted by the negative rate, negatives by the positive rate
        r = t.mean()
        w = t * (1 - r) + (1 - t) * r
        return (-(w * (t * g.log() + (1 - t) * (1 - g).log()))).mean()

    want = by_hand(gates[0], t0) + by_hand(gates[1], t1)
    assert correctness_bce(logits, gates, y).item() == pytest.approx(want.item(), rel=1e-6)
    assert balanced_bce(gates[:2], torch.stack([t0, t1])).item() == pytest.approx(want.item(), rel=1e-6)


def test_default_loss_is_the_literal_one_plus_exit_ce_and_gate_bce():
    logits = torch.randn(3, 6, 4)
    gates = torch.rand(3, 6)
    gates[-1] = 1.0
    y = torch.randint(0, 4, (6,))
    out = ExitOutputs(logits, gates)
    literal = prepared((1, 2, 4), lam=0.3)(out, y)
    full = prepared((1, 2, 4), lam=0.3, exit_ce=0.5, gate_bce=2.0)(out, y)
    per_exit = sum(F.cross_entropy(logits[b], y) for b in range(3))
    want = literal["loss"] + 0.5 * per_exit + 2.0 * correctness_bce(logits, gates, y)
    assert full["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert full["exit_ce"].item() == pytest.approx(per_exit.item(), rel=1e-5)
    assert {"gate_bce", "exit_losses", "ce", "cost"} <= set(full)


def test_gate_reads_its_exits_sorted_probabilities_and_old_descriptions_keep_the_old_gate(tmp_path):
    net = small_net()
    head = net.heads[0]
    assert head.gate_probs and head.gate.in_features == head.feature_dim + 10
    assert net.head_options[0]["gate_probs"] is True  # recorded, so the file says which gate it has
    old = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[2, 5],
                              head="branching", head_options={"gate_probs": False}, width=0.5)
    assert old.heads[0].gate.in_features == old.heads[0].feature_dim
    # a description written before the option existed has no gate_probs: it means the old gate
    cfg = eenn.read_description(eenn.save(old, tmp_path / "old.safetensors"))["network"]
    for o in cfg["head_options"]:
        del o["gate_probs"]
    rebuilt = MultiExitNetwork.from_config(cfg)
    assert rebuilt.heads[0].gate.in_features == rebuilt.heads[0].feature_dim
    rebuilt.load_state_dict(old.state_dict())  # the old weights fit


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def digits():
    return eenn.load_dataset("digits", seed=0)


def validation_costs(net, data):
    """Accuracy and expected cost (fraction of the full MACs) of the hard rule, and the soft cost."""
    logits, gates, y = collect_outputs(net, data.val)
    frac = torch.tensor(net.cost().fraction)
    ex = hard_exit(gates)
    acc = (logits[ex, torch.arange(len(y))].argmax(-1) == y).float().mean().item()
    dist = torch.bincount(ex, minlength=net.num_exits).float() / len(y)
    return {"acc": acc, "hard": (dist * frac).sum().item(), "soft": soft_cost(gates, frac).mean().item(),
            "final_acc": (logits[-1].argmax(-1) == y).float().mean().item()}


@pytest.fixture(scope="module")
def trained(digits):
    """The same net trained with a negligible and with a large lambda (8 epochs each, ~3 s)."""
    runs = {}
    for lam in (0.0, 2.0):
        net = small_net()
        hist = eenn.fit(net, digits, Branching(lam=lam), epochs=8, lr=0.05, batch_size=64, progress=False)
        runs[lam] = (hist, validation_costs(net, digits))
    return runs


def test_branching_trains(trained):
    hist, val = trained[0.0]
    assert hist[-1]["train_loss"] < 0.2 * hist[0]["train_loss"]
    assert val["final_acc"] > 0.85 and val["acc"] > 0.85  # chance is 0.1
    assert {"train_ce", "train_cost"} <= set(hist[-1])


def test_larger_lambda_gives_a_cheaper_network(trained):
    # Measured with the default recipe (seed 0): lambda 0 -> 0.93 of the full MACs under the
    # paper's 0.5 rule (soft 0.78); lambda 2 -> 0.54 (soft 0.53) at 0.94 accuracy. (The literal
    # loss switched all or nothing here: every sample at the final exit, or all at the first.)
    small, large = trained[0.0][1], trained[2.0][1]
    assert large["hard"] < small["hard"] - 0.25
    assert large["soft"] < small["soft"] - 0.15
    assert large["acc"] > 0.85  # cheaper, and still accurate


def test_default_recipe_keeps_every_exit_alive_and_its_gates_save_computation(digits):
    # The quick check of the real-budget claim (benchmarks/lambda_sweep.py prints the full sweep):
    # every exit well above chance (0.1), and the gates, with thresholds fitted on validation for
    # a 1-point drop, save MACs on the test split (measured 1.5x; the literal loss: exits at chance).
    exit_acc, fitted = gated_quick_check(small_net(), digits, Branching())
    assert exit_acc.min() > 0.5, exit_acc
    assert fitted["speedup"] > 1.2 and fitted["accuracy"] > 0.9, fitted


def test_logit_mixing_with_final_ce_trains(digits):
    net = small_net()
    obj = Branching(lam=0.001, mix="logits", final_ce=True, **LITERAL)  # the re-implementation's loss
    hist = eenn.fit(net, digits, obj, epochs=5, lr=0.05, batch_size=64, progress=False)
    assert hist[-1]["train_loss"] < 0.3 * hist[0]["train_loss"]
    assert hist[-1]["val_acc"][-1] > 0.85
