"""Self-distillation and Zero Time Waste: the losses and the geometric ensemble on hand-computed
examples, then distill -> ztw_heads -> ztw_ensemble trained on digits."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import eenn
from eenn.network import ExitOutputs
from eenn.objectives.distill import SelfDistill
from eenn.objectives.ztw import GeometricEnsemble, ZTWEnsemble, ZTWHeads, load_ensemble, save_ensemble
from eenn.trainer import evaluate_exits

L2, L3 = math.log(2), math.log(3)


@pytest.fixture(scope="module")
def digits():
    return eenn.load_dataset("digits", seed=0)


def small_net(cascade=False):
    # Exits after stages 4 and 6 of 9: a linear exit after the first blocks learns slowly (see
    # test_trainer's heads_only test), and these tests are about the losses, not placement.
    torch.manual_seed(0)
    return eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[4, 6],
                               head_options={"cascade": True} if cascade else None, width=0.5)


# ------------------------------------------------------------------------------- self-distillation
def test_byot_loss_by_hand():
    # student [0, 0] -> p = (1/2, 1/2); teacher [0, 2 ln 3] -> at T = 2, q = (1/4, 3/4) and at
    # T = 1, (1/10, 9/10); y = 1.
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, 2 * L3]]])
    y = torch.tensor([1])
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    alpha, t = 0.4, 2.0
    want = (1 - alpha) * L2 + alpha * t * t * kl + (1 - alpha) * math.log(10 / 9)  # every CE at (1 - alpha)
    out = SelfDistill(temperature=t, alpha=alpha)(ExitOutputs(logits, None), y)
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    assert out["kd"].item() == pytest.approx(t * t * kl, rel=1e-6)


def test_teacher_gets_no_gradient_from_the_distillation_term():
    logits = torch.randn(3, 5, 4, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    for variant in ("byot", "ztw"):
        logits.grad = None
        obj = SelfDistill(alpha=0.5, variant=variant)
        obj(ExitOutputs(logits, None), y)["loss"].backward()
        ce_final = F.cross_entropy(logits[-1], y) * (0.5 if variant == "byot" else 1 / 3)
        (want,) = torch.autograd.grad(ce_final, logits)
        assert torch.allclose(logits.grad[-1], want[-1], atol=1e-6), variant
        assert logits.grad[:-1].abs().sum() > 0


def test_ztw_distill_variant_by_hand():
    # exit 0 [0, 0]; final [0, ln 3] -> p_B = (1/4, 3/4); y = 1.
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, L3]]])
    want = (L2 + math.log(4 / 3)) / 2 + L2  # mean CE of both exits + CE(h_0, p_B) = ln 2
    out = SelfDistill(variant="ztw")(ExitOutputs(logits, None), torch.tensor([1]))
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="unknown variant"):
        SelfDistill(variant="fitnets")


# ------------------------------------------------------------------------------ geometric ensemble
def test_geometric_ensemble_by_hand():
    ens = GeometricEnsemble(2, 2)
    with torch.no_grad():
        ens.weight.copy_(torch.tensor([[L2, 1e3], [0.0, L3]]))  # w[0, 1] (exp = inf) is masked out
        ens.bias.copy_(torch.tensor([[0.0, 0.0], [0.5, -0.5]]))
    # h_1 -> p_1 = (1/4, 3/4); h_2 -> p_2 = (3/4, 1/4)
    logits = torch.tensor([[[0.0, L3]], [[L3, 0.0]]])
    lp1 = torch.tensor([math.log(0.25), math.log(0.75)])
    lp2 = lp1.flip(0)
    z = ens(logits)
    assert torch.allclose(z[0, 0], 2 * lp1, atol=1e-6)  # (1/1) e^{ln 2} log p_1 + 0
    assert torch.allclose(z[1, 0], 0.5 * (lp1 + 3 * lp2) + torch.tensor([0.5, -0.5]), atol=1e-6)


def test_geometric_ensemble_is_a_product_of_experts_and_masks_later_exits():
    torch.manual_seed(1)
    ens = GeometricEnsemble(3, 5, init_std=0.5)
    with torch.no_grad():
        ens.bias.normal_()
    logits = torch.randn(3, 4, 5, requires_grad=True)
    z = ens(logits)
    # i = 2: softmax(z_2) ∝ exp(b_2) p_1^{e^{w_21}/2} p_2^{e^{w_22}/2}
    p = F.softmax(logits, -1)
    w = ens.weight.exp() / 2
    poe = ens.bias[1].exp() * p[0] ** w[1, 0] * p[1] ** w[1, 1]
    assert torch.allclose(F.softmax(z[1], -1), poe / poe.sum(-1, keepdim=True), atol=1e-5)
    # exit i reads exits j <= i only
    (g,) = torch.autograd.grad(z[0].sum() + z[1].sum(), logits)
    assert g[2].abs().sum() == 0 and g[1].abs().sum() > 0
    assert GeometricEnsemble(40, 3).weight.std().item() == pytest.approx(0.01, rel=0.2)  # N(0, std 0.01)


def test_ensemble_save_load_round_trip(tmp_path):
    ens = GeometricEnsemble(3, 10, init_std=0.3)
    path = save_ensemble(ens, tmp_path / "ens.safetensors")
    back = load_ensemble(path)
    x = torch.randn(3, 6, 10)
    assert torch.equal(ens(x), back(x))
    net = small_net()
    with pytest.raises(ValueError, match="no eenn ensemble"):
        load_ensemble(eenn.save(net, tmp_path / "net.safetensors"))


# --------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def distilled(digits, tmp_path_factory):
    net = small_net()
    hist = eenn.fit(net, digits, "distill", epochs=3, lr=0.05, batch_size=64, progress=False)
    return net, hist, eenn.save(net, tmp_path_factory.mktemp("ztw") / "distilled.safetensors")


def test_distill_trains(distilled):
    _, hist, _ = distilled
    assert hist[-1]["train_loss"] < 0.6 * hist[0]["train_loss"]
    assert min(hist[-1]["val_acc"]) > 0.6 and hist[-1]["train_kd"] > 0


def test_ztw_heads_then_ensemble_on_a_frozen_network(digits, distilled, tmp_path):
    base, _, ckpt = distilled
    net = small_net(cascade=True)  # fresh cascading heads; the backbone comes from the checkpoint
    assert net.cascades
    hist = eenn.fit(net, digits, ZTWHeads(checkpoint=ckpt), epochs=2, lr=0.05, batch_size=64, progress=False)
    for k, v in base.backbone.state_dict().items():
        assert torch.equal(v, net.backbone.state_dict()[k]), k
    assert hist[-1]["train_exits"] == [0, 1] and min(hist[-1]["val_acc"]) > 0.6

    before = {k: v.clone() for k, v in net.state_dict().items()}
    obj = ZTWEnsemble()
    hist = eenn.fit(net, digits, obj, epochs=2, lr=0.05, batch_size=64, progress=False)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # weights and BN statistics
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    ens = load_ensemble(save_ensemble(obj.ensemble, tmp_path / "ens.safetensors"))
    mean, std = digits.info.mean, digits.info.std
    raw = evaluate_exits(net, digits.val)["acc"]
    net.eval()
    with torch.no_grad():
        x = eenn.TensorLoader(digits.val, len(digits.val), mean=mean, std=std)
        (xb, yb), = list(x)
        z = ens(net(xb).logits)
    acc = (z.argmax(-1) == yb).float().mean(1).tolist()
    assert acc[0] == pytest.approx(raw[0], abs=0.05)  # one member: a recalibration of exit 0
    assert min(acc) > 0.6


def test_a_ztw_ensemble_run_takes_the_heads_checkpoint_and_reports_with_its_ensemble(digits, distilled, tmp_path,
                                                                                       capsys):
    """eenn train: refused without checkpoint= (it would fit the ensemble to a random network) or with
    one of another network; with the ztw_heads network it trains the ensemble on it, frozen, reports
    with the learned ensemble and stores it in best.safetensors, where evaluate, calibrate, predict
    and export find it."""
    from eenn.cli import main
    from eenn.policies import ExitPolicy
    from eenn.run import open_run

    _, _, plain = distilled
    net = small_net(cascade=True)
    eenn.fit(net, digits, ZTWHeads(checkpoint=plain), epochs=1, lr=0.05, batch_size=64, progress=False)
    heads = eenn.save(net, tmp_path / "heads.safetensors")
    out = tmp_path / "runs" / "z"
    cmd = ["train", "--dataset", "digits", "--backbone", "resnet20", "-B", "width=0.5", "--exits", "4,6",
           "-H", "cascade=true", "--objective", "ztw_ensemble", "--epochs", "2", "--lr", "0.05", "--out", str(out),
           "--no-progress", "--deployments", "eager", "--batch-sizes", "", "--curve-points", "3"]
    assert main(cmd) == 2
    assert "give the ztw_heads run's weights (objective.options.checkpoint" in capsys.readouterr().err
    assert main([*cmd, "-O", f"checkpoint={plain}"]) == 1  # heads without cascades: another network
    assert "ztw_ensemble: checkpoint= must hold this network" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()

    assert main([*cmd, "-O", f"checkpoint={heads}"]) == 0
    best = eenn.load(out / "best.safetensors")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in best.state_dict().items())  # frozen
    learned = eenn.checkpoint.load_state(out / "last.safetensors")[1]["objective"]
    stored = ExitPolicy.load(out / "best.safetensors")
    assert stored.name == "ensemble" and stored.thresholds is not None  # fitted by the report
    assert torch.equal(stored.options["ensemble"]["weight"], learned["ensemble.weight"].cpu())
    report = json.loads((out / "report.json").read_text())
    assert report["policy"]["rule"] == "ensemble" and set(report["policy"]["options"]) == {"ensemble"}
    _, config, _ = open_run(out)  # what eenn evaluate and calibrate read
    assert config.eval.policy == "ensemble"
    assert torch.equal(config.eval.policy_options["ensemble"].weight, learned["ensemble.weight"].cpu())
    # eenn evaluate: the learned ensemble by default; another rule reads the exits themselves
    for rule, out_dir in (("max_prob", "ev1"), ("entropy", "ev2")):
        assert main(["evaluate", str(out), "--policy", rule, "--deployments", "eager", "--batch-sizes", "",
                     "--out", str(tmp_path / out_dir)]) == 0
    assert json.loads((tmp_path / "ev1" / "report.json").read_text())["policy"]["rule"] == "ensemble"
    assert json.loads((tmp_path / "ev2" / "report.json").read_text())["policy"]["options"] == {}
