"""EENets (Demir & Akbas): every loss version on hand-computed examples, v4's exit tags (update,
class balancing, persistence, DDP merge), then training on digits, including the claim that a
larger lambda gives a cheaper network."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import eenn
from _helpers import gated_quick_check
from eenn.outputs import collect_outputs
import eenn.objectives.eenets  # noqa: F401  (registers "eenets")
from eenn.callbacks import Callback
from eenn.network import ExitOutputs
from eenn.objectives import EpochContext
from eenn.objectives.branching import hard_exit, soft_cost
from eenn.objectives.eenets import EENets, best_exit_tags, confidence_exit, exit_tag_bce

ROOT = Path(__file__).resolve().parent.parent
L = math.log


class FakeNet:
    """Just what ``prepare`` reads: gates or not, the number of exits and a cost table."""

    def __init__(self, macs, has_gates=True):
        self.has_gates, self.num_exits = has_gates, len(macs)
        self._cost = SimpleNamespace(macs=tuple(macs), dynamic_macs=tuple(macs))

    def cost(self):
        return self._cost


# EENets' literal loss (what the formula tests check term by term); the default adds the
# per-exit CE, the gates' correctness supervision and the uniform start (tested in test_branching).
LITERAL = dict(exit_ce=0.0, gate_bce=0.0, gate_init="none")


def prepared(version, lam=1.0, macs=(1, 2, 4), **options):
    obj = EENets(version=version, lam=lam, **{**LITERAL, **options})
    obj.prepare(FakeNet(macs))
    return obj


def ctx(epoch, n_train=6, num_epochs=10):
    return EpochContext(epoch, num_epochs, None, torch.zeros(n_train), (0.0,), (1.0,), torch.device("cpu"), 0)


def small_net(head="eenets"):
    torch.manual_seed(0)
    return eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[2, 5],
                               head=head, width=0.5)


# The hand example: three exits (gamma = [1, 2, 4] / 4 = [0.25, 0.5, 1]), two classes, two
# samples A (class 0) and B (class 1). Every exit gives both samples the same probabilities
# P_0 = [0.9, 0.1], P_1 = [0.6, 0.4], P_2 = [0.2, 0.8] (logits = log P); confidences
# c_0 = [0.5, 0.2], c_1 = [0.5, 0.75] for A, B; the final one is 1.
P = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
HAND = ExitOutputs(P.log()[:, None, :].expand(3, 2, 2).contiguous(), torch.tensor([[0.5, 0.2], [0.5, 0.75], [1.0, 1.0]]))
Y = torch.tensor([0, 1])


# ------------------------------------------------------------------------------ formulas
def test_v0_is_the_sum_of_every_exits_nll():
    logits, y = torch.randn(3, 5, 4), torch.randint(0, 4, (5,))
    out = prepared("v0")(ExitOutputs(logits, torch.rand(3, 5)), y)
    assert out["loss"].item() == pytest.approx(sum(F.cross_entropy(h, y).item() for h in logits), abs=1e-6)
    # Hand example: A (class 0) and B (class 1) at each exit, averaged over the batch, summed.
    hand = prepared("v0")(HAND, Y)["loss"].item()
    assert hand == pytest.approx((-L(0.9) - L(0.1)) / 2 + (-L(0.6) - L(0.4)) / 2 + (-L(0.2) - L(0.8)) / 2, abs=1e-5)


def test_v1_hand_unrolled():
    # A: P^_1 = 0.5*0.6 + 0.5*0.2 = 0.4, P^_0 = 0.5*0.9 + 0.5*0.4 = 0.65 (true class 0)
    # B: P^_1 = 0.75*0.4 + 0.25*0.8 = 0.5, P^_0 = 0.2*0.1 + 0.8*0.5 = 0.42 (true class 1)
    # C^_1 = [0.5*0.5 + 0.5*1, 0.75*0.5 + 0.25*1] = [0.75, 0.625]; C^_0 = [0.5, 0.55]
    out = prepared("v1", lam=2.0)(HAND, Y)
    assert out["nll"].item() == pytest.approx(-(L(0.65) + L(0.42)) / 2, abs=1e-5)
    assert out["cost"].item() == pytest.approx(0.525, abs=1e-6)
    assert out["loss"].item() == pytest.approx(-(L(0.65) + L(0.42)) / 2 + 2.0 * 0.525, abs=1e-5)


def test_v2_applies_the_v1_loss_at_every_level():
    level0 = -(L(0.65) + L(0.42)) / 2 + 2.0 * (0.5 + 0.55) / 2
    level1 = -(L(0.4) + L(0.5)) / 2 + 2.0 * (0.75 + 0.625) / 2
    level2 = -(L(0.2) + L(0.8)) / 2 + 2.0 * 1.0  # P^_N = P_N, C^_N = 1
    assert prepared("v2", lam=2.0)(HAND, Y)["loss"].item() == pytest.approx(level0 + level1 + level2, abs=1e-5)


def test_v1_v2_against_the_recursion_on_random_inputs():
    logits, y = torch.randn(4, 6, 5), torch.randint(0, 5, (6,))
    c = torch.cat([torch.rand(3, 6), torch.ones(1, 6)])
    gamma = torch.tensor([1.0, 3.0, 4.0, 8.0]) / 8
    p = logits.softmax(-1)
    ph, ch = [p[3]], [gamma[3].expand(6)]
    for i in (2, 1, 0):  # P^_i = c_i P_i + (1 - c_i) P^_{i+1}
        ph.insert(0, c[i, :, None] * p[i] + (1 - c[i, :, None]) * ph[0])
        ch.insert(0, c[i] * gamma[i] + (1 - c[i]) * ch[0])
    term = [F.nll_loss(ph[i].log(), y) + 0.7 * ch[i].mean() for i in range(4)]
    outputs = ExitOutputs(logits, c)
    assert prepared("v1", 0.7, (1, 3, 4, 8))(outputs, y)["loss"].item() == pytest.approx(term[0].item(), abs=1e-5)
    assert prepared("v2", 0.7, (1, 3, 4, 8))(outputs, y)["loss"].item() == pytest.approx(sum(term).item(), abs=1e-5)


def test_v3_weights_are_normalised_mean_confidences():
    # mean c = [0.35, 0.625, 1] (the final exit's confidence is 1) -> w = mean c / 1.975
    w = [0.35 / 1.975, 0.625 / 1.975, 1 / 1.975]
    nll = [-(L(0.9) + L(0.1)) / 2, -(L(0.6) + L(0.4)) / 2, -(L(0.2) + L(0.8)) / 2]
    gamma = [0.25, 0.5, 1.0]
    out = prepared("v3", lam=2.0)(HAND, Y)
    assert out["loss"].item() == pytest.approx(sum(wi * (n + 2.0 * g) for wi, n, g in zip(w, nll, gamma)), abs=1e-5)
    assert out["cost"].item() == pytest.approx(sum(wi * g for wi, g in zip(w, gamma)), abs=1e-6)


def test_v4_tag_update_is_the_argmin_of_nll_plus_cost():
    gamma = torch.tensor([0.25, 0.5, 1.0])
    # lam = 1: A: [-log .9 + .25, -log .6 + .5, -log .2 + 1] = [0.355, 1.011, 2.609] -> 0
    #          B: [-log .1 + .25, -log .4 + .5, -log .8 + 1] = [2.553, 1.416, 1.223] -> 2
    assert best_exit_tags(HAND.logits, Y, gamma, 1.0).tolist() == [0, 2]
    # lam = 3: B: [3.053, 2.416, 3.223] -> 1 (a dearer exit is no longer worth it)
    assert best_exit_tags(HAND.logits, Y, gamma, 3.0).tolist() == [0, 1]
    # lam = 0: the most confident exit on the true class: A -> 0 (0.9), B -> 2 (0.8)
    assert best_exit_tags(HAND.logits, Y, gamma, 0.0).tolist() == [0, 2]


def test_v4_bce_is_class_balanced_per_exit():
    gates = torch.tensor([[0.8, 0.6, 0.3, 0.1], [0.5, 0.4, 0.7, 0.2], [1.0, 1.0, 1.0, 1.0]])
    tags = torch.tensor([0, 0, 1, 2])
    # exit 0: tagged [1, 1, 0, 0], exit rate 0.5 -> every weight 0.5
    bce0 = (0.5 * -L(0.8) + 0.5 * -L(0.6) + 0.5 * -L(0.7) + 0.5 * -L(0.9)) / 4
    # exit 1: tagged [0, 0, 1, 0], exit rate 0.25 -> the positive weighs 0.75, the negatives 0.25
    bce1 = (0.25 * -L(0.5) + 0.25 * -L(0.6) + 0.75 * -L(0.7) + 0.25 * -L(0.8)) / 4
    assert exit_tag_bce(gates, tags).item() == pytest.approx(bce0 + bce1, abs=1e-6)  # no final-exit term


def test_v4_tags_start_seeded_and_change_only_at_the_next_epoch():
    obj = prepared("v4", lam=1.0)
    assert obj.needs_indices and not prepared("v2").needs_indices
    obj.begin_epoch(ctx(0))
    start = obj.tags.clone()
    assert torch.equal(start, torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(0)))
    other = prepared("v4", seed=1)
    other.begin_epoch(ctx(0))
    assert not torch.equal(other.tags, start)
    obj.tags[1], obj.tags[4] = 0, 2  # the hand example's samples A, B are training samples 1, 4
    start = obj.tags.clone()
    idx = torch.tensor([1, 4])
    out = obj(HAND, Y, indices=idx)
    # t = [0, 2]: NLL = -(log 0.9 + log 0.8) / 2, C = (0.25 + 1) / 2; BCE: exit 0 tagged [1, 0]
    # (rate 0.5: weights 0.5), exit 1 tagged [0, 0] (rate 0: nothing to balance, weight 0).
    bce = (0.5 * -L(0.5) + 0.5 * -L(1 - 0.2)) / 2
    assert out["bce"].item() == pytest.approx(bce, abs=1e-6)
    assert out["loss"].item() == pytest.approx(-(L(0.9) + L(0.8)) / 2 + 1.0 * 0.625 + bce, abs=1e-5)
    assert torch.equal(obj.tags, start)  # recorded, not applied yet
    obj.eval()
    obj(HAND, torch.tensor([1, 0]), indices=torch.tensor([2, 3]))  # evaluation records nothing
    obj.train()
    obj.begin_epoch(ctx(1))
    expected = start.clone()
    expected[1], expected[4] = 0, 2  # argmin of NLL + lam C (test above)
    assert torch.equal(obj.tags, expected)
    assert (obj.pending == -1).all()


def test_v4_tags_survive_a_state_dict_round_trip():
    obj = prepared("v4", lam=3.0)
    obj.begin_epoch(ctx(0, n_train=10))
    obj(HAND, Y, indices=torch.tensor([7, 2]))  # records [0, 1], still pending
    state = obj.state_dict()
    fresh = prepared("v4", lam=3.0, seed=5)  # another seed: its own tags would differ
    fresh.load_state_dict(state)
    assert torch.equal(fresh.tags, obj.tags) and torch.equal(fresh.pending, obj.pending)
    obj.begin_epoch(ctx(1, n_train=10))
    fresh.begin_epoch(ctx(1, n_train=10))
    assert torch.equal(fresh.tags, obj.tags) and fresh.tags[[7, 2]].tolist() == [0, 1]
    with pytest.raises(ValueError, match="10 exit tags but the training split has 8"):
        fresh.begin_epoch(ctx(2, n_train=8))


def test_two_stage_trains_v0_first():
    obj = prepared("v1", lam=2.0, two_stage=2)
    assert obj.active == "v0"  # before the first epoch: epoch 0's version
    obj.begin_epoch(ctx(1))
    assert obj(HAND, Y)["loss"].item() == pytest.approx(prepared("v0")(HAND, Y)["loss"].item())
    obj.begin_epoch(ctx(2))
    assert obj(HAND, Y)["loss"].item() == pytest.approx(prepared("v1", lam=2.0)(HAND, Y)["loss"].item())


def test_confidence_exit_from_a_gate_table():
    gates = torch.tensor([
        # fires at 0 | at 1 (0.55) | at 2 | none | none (0.33 < 1/3)
        [0.6, 0.4, 0.3, 0.1, 0.2],
        [0.2, 0.55, 0.34, 0.3, 0.1],
        [0.9, 0.2, 0.9, 0.2, 0.33],
        [1.0, 1.0, 1.0, 1.0, 1.0],
    ])
    assert confidence_exit(gates).tolist() == [0, 1, 2, 3, 3]
    assert confidence_exit(gates, "v1").tolist() == [0, 1, 2, 3, 3]
    # v3: threshold 1/N with N = 3 early exits
    assert confidence_exit(gates, "v3").tolist() == [0, 0, 1, 3, 3]
    assert confidence_exit(gates, "v3", num_exits=3).tolist() == [0, 1, 2, 3, 3]  # N = 2: 0.5


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown EENets loss version 'v5'"):
        EENets(version="v5")
    with pytest.raises(ValueError, match="unknown EENets loss version"):
        confidence_exit(torch.ones(2, 1), "v9")
    with pytest.raises(ValueError, match="lam .* >= 0, got -1"):
        EENets(lam=-1)
    with pytest.raises(ValueError, match="EENets needs gated exit heads.*head='eenets'"):
        EENets().prepare(small_net(head="linear"))
    with pytest.raises(ValueError, match="two_stage .* version='v0'"):
        EENets(version="v0", two_stage=5)
    with pytest.raises(ValueError, match="two_stage must be"):
        EENets(two_stage=-1)
    with pytest.raises(ValueError, match="v4 needs the training samples' indices"):
        prepared("v4")(HAND, Y)


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from types import SimpleNamespace
    from eenn.objectives import EpochContext
    from eenn.objectives.eenets import EENets
    from eenn.network import ExitOutputs

    def run(rank, path):
        dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
        obj = EENets(version="v4", lam=1.0)
        obj.prepare(SimpleNamespace(has_gates=True, num_exits=3, cost=lambda: SimpleNamespace(macs=(1, 2, 4))))
        ctx = lambda e: EpochContext(e, 2, None, torch.zeros(6), (0.0,), (1.0,), torch.device("cpu"), 0)
        obj.begin_epoch(ctx(0))
        p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]).log()
        out = ExitOutputs(p[:, None].expand(3, 2, 2).contiguous(), torch.full((3, 2), 0.5))
        # rank 0 sees samples 0, 1; rank 1 sees 3, 5 (classes 0, 1 -> tags 0, 2 at lam 1)
        obj(out, torch.tensor([0, 1]), indices=torch.tensor([[0, 1], [3, 5]][rank]))
        before = obj.tags.clone()
        obj.begin_epoch(ctx(1))
        expect = before.clone()
        expect[[0, 1, 3, 5]] = torch.tensor([0, 2, 0, 2])
        assert torch.equal(obj.tags, expect), (rank, obj.tags, expect)
        dist.destroy_process_group()

    if __name__ == "__main__":
        # fork: the ranks share this process's imports, which is most of the start-up time
        torch.multiprocessing.start_processes(run, args=(sys.argv[1],), nprocs=2, start_method="fork")
        print("ok")
""")


def test_v4_tags_are_merged_over_ddp_ranks(tmp_path):
    script = tmp_path / "ddp_tags.py"
    script.write_text(DDP_SCRIPT)
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def digits():
    return eenn.load_dataset("digits", seed=0)


def validation_costs(net, data, version="v2"):
    """Accuracy and expected cost (fraction of the full MACs) of the confidence rule, and the
    soft expected cost, on the validation split."""
    logits, gates, y = collect_outputs(net, data.val)
    frac = torch.tensor(net.cost().fraction)
    ex = confidence_exit(gates, version)
    assert torch.equal(ex, hard_exit(gates)) or version == "v3"  # one rule, two names (threshold 0.5)
    acc = (logits[ex, torch.arange(len(y))].argmax(-1) == y).float().mean().item()
    dist = torch.bincount(ex, minlength=net.num_exits).float() / len(y)
    return {"acc": acc, "hard": (dist * frac).sum().item(), "soft": soft_cost(gates, frac).mean().item(),
            "final_acc": (logits[-1].argmax(-1) == y).float().mean().item()}


RUNS = {  # name: (objective options, epochs)
    "v1": (dict(version="v1", lam=0.3), 6),
    "v2": (dict(version="v2", lam=0.1), 8),
    "v2 lam 10": (dict(version="v2", lam=10.0), 8),
    "v4": (dict(version="v4", lam=0.3), 6),
    "v0 then v1": (dict(version="v1", lam=0.3, two_stage=3), 6),
}


@pytest.fixture(scope="module")
def trained(digits):
    runs = {}
    for name, (options, epochs) in RUNS.items():
        net, obj = small_net(), EENets(**options)
        hist = eenn.fit(net, digits, obj, epochs=epochs, lr=0.05, batch_size=64, progress=False)
        runs[name] = (obj, hist, validation_costs(net, digits, options["version"]))
    return runs


@pytest.mark.parametrize("name", ["v1", "v2", "v4", "v0 then v1"])
def test_eenets_trains(trained, name):
    _, hist, val = trained[name]
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    # Chance is 0.1. The hard rule's accuracy is lower than the final exit's: these tiny early
    # exits are weak (v4 sends ~15% of the samples to the first one at ~0.5 accuracy).
    assert val["final_acc"] > 0.85 and val["acc"] > 0.4


def test_v4_tags_follow_the_network(trained):
    obj, hist, _ = trained["v4"]
    start = torch.randint(0, 3, (len(obj.tags),), generator=torch.Generator().manual_seed(0))
    assert (obj.tags != start).float().mean() > 0.3  # far from the random start
    assert {"train_nll", "train_cost", "train_bce"} <= set(hist[-1])


def test_larger_lambda_gives_a_cheaper_network(trained):
    # Measured (seed 0, default recipe, v2's levels averaged): lambda 0.1 -> hard cost 0.72, soft
    # 0.65; lambda 5 -> 0.47 / 0.48; lambda 10 -> every sample leaves at the first exit (0.358) /
    # 0.42, at 0.81 accuracy.
    # (margins well inside the measured gaps, 0.37 and 0.24: another processor trains a little
    # differently)
    small, large = trained["v2"][2], trained["v2 lam 10"][2]
    assert large["hard"] < small["hard"] - 0.25
    assert large["soft"] < small["soft"] - 0.15
    assert large["acc"] > 0.6


class TagRecorder(Callback):
    def __init__(self):
        self.tags = []

    def on_epoch_start(self, trainer):  # after begin_epoch: the tags this epoch trains with
        self.tags.append(trainer.objective.tags.clone())


@pytest.mark.filterwarnings("ignore:resuming .* with changed settings")
def test_resumed_v4_run_continues_with_the_same_tags(digits, tmp_path):
    def run(epochs, out_dir=None):
        rec = TagRecorder()
        config = eenn.TrainConfig(epochs=epochs, lr=0.05, batch_size=128, progress=False, schedule="constant",
                                  out_dir=str(out_dir) if out_dir else None)
        eenn.Trainer(config, [rec]).fit(small_net(), digits, EENets(version="v4", lam=0.3))
        return rec.tags

    straight = run(3)
    run(2, tmp_path)
    resumed = run(3, tmp_path)  # picks up last.safetensors after epoch 2
    assert len(resumed) == 1 and torch.equal(resumed[0], straight[2])
    assert not torch.equal(straight[2], straight[0])


def test_default_recipe_keeps_every_exit_alive_and_its_confidences_save_computation(digits):
    # As for differentiable branching (test_branching): every exit well above chance and the
    # confidences, fitted on validation for a 1-point drop, save MACs on the test split
    # (measured 1.59x at the default lambda, exits at 87 / 98 / 99%; with twice the mean of the
    # exits' cross-entropies instead of their sum beside v2's averaged levels, 1.48x, first exit 61%).
    exit_acc, fitted = gated_quick_check(small_net(), digits, EENets())
    assert exit_acc.min() > 0.7, exit_acc
    assert fitted["speedup"] > 1.4 and fitted["accuracy"] > 0.9, fitted
