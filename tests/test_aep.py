"""AEP: weight schemes, the loss, the truncated ensembles, the pruning step and its savings."""
import math

import pytest
import torch
import torch.nn.functional as F

import eenn
import eenn.objectives.aep as aep  # registers "aep"
from eenn.data import TensorDataset
from eenn.network import ExitOutputs
from eenn.prune import (EnsembleClassifier, aep_prune, choose_exit, evaluate_ensemble, load_pruned, prune_at,
                        save_pruned)

SCHEMES = ("uniform", "linear", "learned", "hybrid")


def tiny_net():
    return eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 3, 5], width=0.5)


@pytest.fixture(scope="module")
def digits():
    return eenn.load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """One short AEP run per weight scheme, and one learning theta from the literal weighted sum:
    name -> (net, objective, history)."""
    runs = {}
    for name in (*SCHEMES, "learned-joint"):
        scheme, _, source = name.partition("-")
        torch.manual_seed(0)
        net, obj = tiny_net(), eenn.create_objective("aep", scheme=scheme, learn_weights_from=source or "prefix")
        hist = eenn.fit(net, digits, obj, epochs=4, lr=0.05, batch_size=64, progress=False)
        runs[name] = (net.eval(), obj, hist)
    return runs


# ----------------------------------------------------------------------------------- weights
def test_weight_schemes_by_hand():
    assert torch.allclose(aep.scheme_weights("uniform", 4), torch.tensor([0.25] * 4))
    assert torch.allclose(aep.scheme_weights("linear", 4), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    theta = torch.tensor([0.0, math.log(2), math.log(3)])
    assert torch.allclose(aep.scheme_weights("learned", 3, theta), torch.tensor([1, 2, 3]) / 6)
    # hybrid: prior [1, 2, 3] / 6 times 3 * softmax(theta) = 3 * [3, 1, 2] / 6, renormalised
    theta = torch.tensor([math.log(3), 0.0, math.log(2)])
    prior, factor = torch.tensor([1.0, 2, 3]) / 6, 3 * torch.tensor([3.0, 1, 2]) / 6
    want = prior * factor / (prior * factor).sum()
    assert torch.allclose(want, torch.tensor([3.0, 2, 6]) / 11)
    assert torch.allclose(aep.scheme_weights("hybrid", 3, theta), want)
    # theta starts at 0: learned starts uniform, hybrid starts linear
    for scheme, start in (("learned", "uniform"), ("hybrid", "linear")):
        obj = aep.AEP(scheme, num_exits=5)
        assert torch.allclose(obj.weights(), aep.scheme_weights(start, 5))
    obj = aep.AEP("hybrid", num_exits=3)
    with torch.no_grad():
        obj.theta.copy_(theta)
    assert torch.allclose(obj.weights(), want) and not obj.weights().requires_grad
    with pytest.raises(ValueError, match="unknown"):
        aep.AEP("quadratic")


# -------------------------------------------------------------------------------------- loss
def _hand_example():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]],  # exit 0, two samples, two classes
                           [[1.0, 1.0], [3.0, 0.0]]])  # exit 1
    y = torch.tensor([0, 1])
    # CE by hand: -log softmax at the target
    ce0 = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(math.e / (1 + math.e))) / 2
    ce1 = (-math.log(0.5) - math.log(1 / (math.e**3 + 1))) / 2
    p_y = torch.tensor([[math.e**2 / (math.e**2 + 1), math.e / (1 + math.e)],
                        [0.5, 1 / (math.e**3 + 1)]])  # [exit, sample] probability of the target
    return logits, y, torch.tensor([ce0, ce1]), p_y


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loss_is_the_weighted_sum_by_hand(scheme):
    logits, y, ce, p_y = _hand_example()
    obj = aep.AEP(scheme, num_exits=2)
    if obj.theta is not None:
        with torch.no_grad():
            obj.theta.copy_(torch.tensor([0.3, -0.2]))
    w = obj.weights()
    out = obj(ExitOutputs(logits, None), y)
    assert torch.allclose(out["exit_losses"], ce)
    assert torch.allclose(out["loss"], (w * ce).sum())
    ens_ce = -torch.log((w[:, None] * p_y).sum(0)).mean()
    assert torch.allclose(out["ensemble_ce"], ens_ce)


def test_learned_weights_get_the_gradient_of_the_chosen_loss():
    logits, y, ce, p_y = _hand_example()
    theta0 = torch.tensor([0.3, -0.2])
    grads = {}
    for source, exit_w in (("joint", "learned"), ("prefix", "learned"), ("ensemble", "prior")):
        obj = aep.AEP("learned", learn_weights_from=source, exit_loss_weights=exit_w, num_exits=2)
        with torch.no_grad():
            obj.theta.copy_(theta0)
        h = logits.clone().requires_grad_(True)
        obj(ExitOutputs(h, None), y)["loss"].backward()
        grads[source] = (obj.theta.grad.clone(), h.grad.clone())
    w = torch.softmax(theta0, 0)
    # joint: d/dtheta_j sum_i w_i CE_i = w_j (CE_j - L), which favours the lowest-loss exit
    assert torch.allclose(grads["joint"][0], w * (ce - (w * ce).sum()))

    def prefix_ce(t):  # mean over k of the CE of the ensemble of exits <= k, written out
        w = torch.softmax(t, 0)
        first = -torch.log(p_y[0]).mean()
        both = -torch.log((w[:, None] * p_y).sum(0)).mean()
        return (first + both) / 2

    t = theta0.clone().requires_grad_(True)
    prefix_ce(t).backward()
    assert torch.allclose(grads["prefix"][0], t.grad)
    t = theta0.clone().requires_grad_(True)
    (-torch.log((torch.softmax(t, 0)[:, None] * p_y).sum(0)).mean()).backward()  # the full ensemble's CE
    assert torch.allclose(grads["ensemble"][0], t.grad)
    # the exits are trained with constant weights: the learned ones, or the prior (uniform here)
    h = logits.clone().requires_grad_(True)
    (w[:, None] * F.cross_entropy(h.flatten(0, 1), y.repeat(2), reduction="none").view(2, 2).mean(1)[:, None]).sum().backward()
    assert torch.allclose(grads["prefix"][1], h.grad)
    h2 = logits.clone().requires_grad_(True)
    (0.5 * F.cross_entropy(h2.flatten(0, 1), y.repeat(2), reduction="none").view(2, 2).mean(1)).sum().backward()
    assert torch.allclose(grads["ensemble"][1], h2.grad)


def test_ensemble_so_far_by_hand():
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3), 0.0]], [[0.0, math.log(4)]]])  # p: [.5 .5] [.75 .25] [.2 .8]
    got = aep.ensemble_so_far(logits, torch.tensor([1.0, 2.0, 1.0]))
    want = torch.tensor([[[0.5, 0.5]], [[2 / 3, 1 / 3]], [[0.55, 0.45]]])
    assert got.shape == (3, 1, 2) and torch.allclose(got, want)
    log_w = torch.log(torch.tensor([1.0, 2.0, 1.0]) / 4)
    assert torch.allclose(aep.ensemble_so_far_log(logits, log_w).exp(), want)
    assert torch.equal(aep.ensemble_so_far(logits, torch.tensor([0.0, 1.0, 1.0]))[0], torch.zeros(1, 2))
    with pytest.raises(ValueError, match=">= 0"):
        aep.ensemble_so_far(logits, torch.tensor([1.0, -1.0, 1.0]))


# ---------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("scores, k", [([5, 8, 8, 7], 1), ([2, 4, 6, 9], 3), ([9, 9, 9], 0), ([0.1, 0.3, 0.2], 1)])
def test_choose_exit_table(scores, k):
    assert choose_exit(scores) == k


@pytest.mark.parametrize("correct_per_exit, k", [([5, 8, 8, 7], 1), ([2, 4, 6, 9], 3)])
def test_aep_prune_picks_the_best_truncation(monkeypatch, correct_per_exit, k):
    # The network's outputs are a hand-made table: exit e answers the first correct_per_exit[e]
    # samples right. Steep weights make each truncated ensemble follow its deepest exit.
    n, num_classes = 10, 10
    y = torch.arange(n) % num_classes
    x = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # the sample's id, read back by the fake forward
    table = torch.stack([torch.where(torch.arange(n) < c, y, (y + 1) % num_classes) for c in correct_per_exit])
    net = tiny_net().eval()

    def fake_forward(inp, exits=None):
        ids = (inp[:, 0, 0, 0] * 255).round().long()
        return ExitOutputs(20.0 * F.one_hot(table[:, ids], num_classes).float(), None)

    monkeypatch.setattr(net, "forward", fake_forward)
    net.input_spec = eenn.InputSpec((1, 8, 8), (0.0,), (1.0,))
    res = aep_prune(net, [1.0, 1e3, 1e6, 1e9], TensorDataset(x, y), latency_batch_size=None)
    assert res.k == k and res.val_acc == [c / n for c in correct_per_exit]
    assert res.promised_acc == correct_per_exit[k] / n
    assert res.module.net.num_exits == k + 1 and res.after.latency_ms is None


def test_pruned_network_is_smaller_matches_and_saves(tmp_path):
    net, w = tiny_net().eval(), torch.tensor([0.1, 0.2, 0.3, 0.4])
    pruned = prune_at(net, w, 1).eval()
    assert pruned.net.num_exits == 2 and pruned.net.backbone.num_stages == 4  # stages after exit 1 are gone
    full, small = net.cost(), pruned.net.cost()
    assert small.total_params < full.total_params and small.dynamic_macs[-1] < full.dynamic_macs[-1]
    assert small.dynamic_macs[-1] == full.dynamic_macs[1]
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        out = pruned(x)
        assert torch.equal(out, aep.ensemble_so_far(net(x).logits, w)[1])
    assert torch.allclose(out.sum(-1), torch.ones(6))
    path = save_pruned(pruned, tmp_path / "pruned.safetensors")
    back = load_pruned(path).eval()
    assert isinstance(back, EnsembleClassifier) and back.net.truncated_at == 1
    assert torch.equal(back.weights, w[:2])
    with torch.no_grad():
        assert torch.equal(back(x), out)
    with pytest.raises(eenn.CheckpointError, match="AEP"):
        load_pruned(eenn.save(net, tmp_path / "plain.safetensors"))


# --------------------------------------------------------------------------------- training
@pytest.mark.parametrize("scheme", SCHEMES)
def test_aep_trains_on_digits(trained, digits, scheme):
    net, obj, hist = trained[scheme]
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert hist[-1]["train_ensemble_ce"] < hist[0]["train_ensemble_ce"]
    w = obj.weights()
    assert torch.allclose(w.sum(), torch.tensor(1.0))
    if scheme in ("learned", "hybrid"):  # theta is trained with the network
        assert not torch.allclose(w, aep.scheme_weights("uniform" if scheme == "learned" else "linear", 4))
    acc = evaluate_ensemble(EnsembleClassifier(net, w), digits.val)
    assert acc > 0.6  # chance is 0.1


def test_promised_accuracy_is_what_the_pruned_network_delivers(trained, digits):
    net, obj, _ = trained["uniform"]
    res = aep_prune(net, obj.weights(), digits.val,
                    latency_batch_size=8, latency_repeats=1)
    assert res.k == choose_exit(res.val_acc)
    assert evaluate_ensemble(res.module, digits.val) == res.promised_acc
    assert res.after.params <= res.before.params and res.after.latency_ms > 0
    assert f"k* = {res.k}" in res.report() and res.ratios()["params"] == res.after.params / res.before.params
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(res.module(x), aep.ensemble_so_far(net(x).logits, obj.weights())[res.k])


def test_learned_weights_do_not_collapse_with_the_default_loss(trained):
    # Learning theta from the weighted sum itself puts the weight on the lowest-loss exit;
    # learning it from the truncated ensembles (the default) keeps every exit in the mix.
    joint, prefix = trained["learned-joint"][1].weights(), trained["learned"][1].weights()
    assert joint.max() > 0.9
    assert prefix.max() < 0.75 and prefix.min() > 0.05


def test_aep_prune_names_its_input_mistakes(digits):
    from eenn.functional import scheme_weights

    net = tiny_net().eval()
    net.input_spec = eenn.InputSpec.from_info(digits.info)
    with pytest.raises(TypeError, match="pass data.val, not data"):
        aep_prune(net, [0.25] * 4, digits)
    with pytest.raises(ValueError, match=r"finite, >= 0 and not all 0, got \[nan"):
        aep_prune(net, [float("nan")] * 4, digits.val)
    # a scheme's name, as the ensemble policy takes it: the scheme's weights
    by_name = aep_prune(net, "linear", digits.val, latency_batch_size=None)
    by_value = aep_prune(net, scheme_weights("linear", 4), digits.val, latency_batch_size=None)
    assert by_name.k == by_value.k and by_name.weights == by_value.weights
